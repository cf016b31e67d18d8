#!/usr/bin/env bash
# The project's GPU check: one command on a GPU machine that has torch and nothing else (no hub, no pip index).
# From the project root, on your machine:   rm -rf .gpu && cp -r ../shared/gpu .gpu && cp -r ../shared/data .gpu/data
#   (.gpu/ is in .gitignore). On the GPU machine: `bash tests/gpu_check.sh`, carrying .gpu (about 25 MB).
# It installs the pinned transformers/datasets wheels from .gpu/whl over the machine's torch, builds random-weight
# Llama-family models with SmolLM2's real tokenizer (.gpu/tok, .gpu/mkmodel.py), and prints, under "## t=" headers:
#   A  every decode mode at the Llama-3.1-8B shape (48 rows, 160-token prompts, 128 new tokens): generate, eager,
#      compiled, compiled + CUDA graphs: ms per decode step and per token, bytes moved per step against the floor
#   B  latro.py at the 1.2 B shape, FSDP2 (2 processes when there are 2 GPUs, else 1), prompts of two lengths so
#      that the decode shape changes between steps: decode shapes compiled at start-up, late_compiles per step
#      (must be 0), each phase's seconds and the step's peak of GPU memory, then --resume
#   C  eval.py at the 1.2 B shape: ms per decoded token, and a continued (interrupted) evaluation
# About 8 minutes on an H100 / H200; everything is also written to $OUT (default: a temporary folder).
set -u
S=${SCRATCH:-$(mktemp -d)}; ROOT=$PWD; G=$ROOT/.gpu; OUT=${OUT:-$S/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
[ -d "$G/whl" ] || { echo "no .gpu folder: see the header of tests/gpu_check.sh"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S/site" "$G"/whl/*.whl \
  && export PYTHONPATH=$S/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())"); NPROC=$(( NGPU >= 2 ? 2 : 1 ))
T0=$(date +%s); el() { echo; echo "## t=$(( $(date +%s) - T0 ))s $*"; }

el "make models (random weights, SmolLM2's tokenizer) and a GSM8K-shaped file with two prompt lengths"
python3 "$G/mkmodel.py" "$S/m1b" 1b "$G/tok" && python3 "$G/mkmodel.py" "$S/m8b" 8b "$G/tok"
python3 - "$S/two.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):   # short and long questions: the training batches meet two prompt buckets
        q = f"Tom has {i} apples and buys {i % 7} more." + (" He counts them again and again." * 12 if i % 2 else "")
        f.write(json.dumps({"question": q + " How many apples does he have?", "answer": f"#### {i + i % 7}"}) + "\n")
PY

el "A: decode modes at the 8B shape, bf16 (each in its own process; median of 3 runs)"
timeout 420 python3 tests/bench.py --config 8b --device cuda --rows 48 --prompt-len 160 --new-tokens 128 \
  --parts sample --compile --repeats 3 2>&1 | grep -v "^#" | tail -12

el "B: latro.py, 1.2 B shape, FSDP2 x $NPROC process(es), K 16 x 3, L 128, 3 steps then a resume to 4"
L="--model $S/m1b --dataset $S/two.jsonl --out $S/r1b --k 16 --questions-per-rank 3 --max-new-tokens 128 --steps 4
   --val-size 8 --eval-every 2 --eval-max-new-tokens 64 --heldout-questions 3 --save-every 1 --parallel shard"
timeout 300 torchrun --standalone --nproc_per_node=$NPROC latro.py $L --stop-after 3 2>&1 | grep -v "it/s" | tail -12
timeout 200 torchrun --standalone --nproc_per_node=$NPROC latro.py $L --resume 2>&1 | grep -v "it/s" | tail -8
python3 - "$S/r1b" <<'PY'
import json, os, sys
for r in [json.loads(l) for l in open(os.path.join(sys.argv[1], "metrics.jsonl"))]:
    if "reward" in r:
        print(f"step {r['step']}: late_compiles {r['late_compiles']}, decode shapes {r['decode_shapes']}, sample "
              f"{r['t_sample']:.1f} s ({r['z_len']:.0f} tokens a row), score {r['t_score']:.1f} s, update "
              f"{r['t_update']:.1f} s, peak {r['peak_gb']:.1f} GB allocated")
PY

el "C: eval.py, 1.2 B shape, 96 questions, batch 48, 128 tokens, interrupted once and continued"
E="--model $S/m1b --dataset $G/data/gsm8k --limit 96 --batch-size 48 --max-new-tokens 128 --out $S/e.jsonl"
timeout 120 python3 eval.py $E & EP=$!; sleep 45; kill -TERM $EP 2>/dev/null; wait $EP; echo "exit $?"
timeout 200 python3 eval.py $E 2>&1 | tail -5
el done
