"""
latro.py: LaTRO (LaTent Reasoning Optimization, Chen et al. 2024, arXiv 2411.04282) in one file.

What it does: for every question x the model samples K chain-of-thought rationales z_1..z_K, appends the
gold answer y = "The answer is {gold}." after each, and scores everything with ONE forward of the policy over
[x ; z ; y] and ONE forward of a frozen reference copy (read at the z positions). Each rationale's self-reward
is the log-likelihood of the gold answer after it minus a KL penalty; REINFORCE with a leave-one-out baseline
pushes the policy towards rationales that make the answer likely, and a direct gradient on log pi(y|x+z)
teaches the answer itself. No reward model, no value network. The loop is plain torch.distributed launched
by torchrun, with PyTorch's FSDP2 (`fully_shard`) holding fp32 master weights in every mode: replicated,
sharded over the GPUs, or sharded with weights, gradients and AdamW on the host (one GPU, large models).

The objective (paper Eq. 2-4), per question, with sums over tokens (no length normalisation):
    r_k  = log pi(y | x+z_k)  -  beta * [ log pi(z_k|x) - log pi_0(z_k|x) ]         self-reward, k1 KL
    A_k  = r_k - 1/(K-1) * sum_{j!=k} r_j                                            leave-one-out baseline
    grad = 1/(N K) sum_i sum_k [ A_k * grad log pi(z_k|x)  +  w_sft * grad log pi(y|x+z_k) ]
    loss = mean over the GLOBAL N*K rationales of [ -stopgrad(A_k) * log pi(z_k|x) - w_sft * log pi(y|x+z_k) ]
See `latro_loss` below: the equation is there term by term.

Departures from the paper / official code (SalesforceAIResearch/LaTRO), and why:
1. Non-stop penalty: a rationale that hits L tokens without stopping gets answer reward
   gamma * mean(log pi(y|x+z) of the SAME question's K rationales); the official code uses the mean over the
   GPU's local batch, which mixes questions and makes the update depend on the number of GPUs.
2. w_sft = 1 by default, as in the paper's Eq. 4; the official script ships 0 (`--sft-weight 0` restores it).
3. The rationale ends at the end-of-turn / EOS token or where the first answer template starts (the official
   list: "The answer is", "the answer is", "So, the answer is", "Therefore, the answer is", "so the final
   answer is", "Answer:"; case-sensitive, on word boundaries), detected on the DECODED text; the official code
   matches token ids, which misses other tokenisations. The stop token and the template are not part of z;
   log pi(z|x) therefore does not include the probability of stopping.
4. Sampling stops as soon as every row has stopped (the official code always generates L tokens).
5. log pi(y|x+z) covers exactly the tokens of y (the official code also scores the last token of z), and y is
   tokenised in context, after z, as the model would write it (the official code tokenises y on its own).
6. Scoring is fused: 1 policy forward with gradient + 1 reference forward, instead of 3 without + 2 with.
   Log-probs are taken only at z and y positions, chunk by chunk, never as a [B, T, V] fp32 tensor.
7. Each question has its own random stream, seeded by (seed, step, question), so the same questions get the
   same rationales whatever the number of processes, and a resumed run repeats an uninterrupted one.
8. Checkpoints are selected on a held-out slice of train (`--val-size`), never on the test set.
9. Sampling draws token t as the inverse CDF of softmax(logits) at a uniform u (exactly multinomial sampling
   at temperature 1, no top-k / top-p), from a bf16 replica of the policy refreshed after every update.
10. The GSM8K gold loses its thousands commas ("The answer is 1000."; the official y keeps "1,000").

Commands:
    # laptop CPU, the real SmolLM2-135M-Instruct on local GSM8K files (a few minutes on 2 cores)
    python latro.py --model "$(python tests/smollm.py)" --dataset ../shared/data/gsm8k --out runs/quickstart \
        --k 4 --max-new-tokens 160 --questions-per-rank 2 --steps 4 --lr 1e-5 --val-size 8 --heldout-questions 4 \
        --eval-every 2 --eval-max-new-tokens 32
    # one GPU: the memory plan picks offload (fp32 master, gradients and AdamW on the host) when needed
    python latro.py --model microsoft/Phi-3.5-mini-instruct --dataset gsm8k
    # full fine-tuning of an 8B model on 8 x 80 GB (the plan picks shard: a replica would need ~128 GB)
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B
    # the paper's setting: 8 GPUs x 3 questions x K=16
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B-Instruct --dataset gsm8k
    # what would fit where, without loading any weights
    python latro.py --model microsoft/Phi-3.5-mini-instruct --plan-only --gpu-memory-gb 80
    # CPU, 2 processes over gloo (what the tests do)
    torchrun --nproc_per_node=2 latro.py --model TINY_FOLDER --dataset FILE.jsonl --questions-per-rank 2 --k 3
"""
import argparse
import copy
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data

# Paper Sec. 5.1: beta per task, and the number of optimizer steps at 24 questions x 16 rationales per step.
PAPER_BETA = {"gsm8k": 0.05, "arc_challenge": 0.25}
PAPER_STEPS = {"gsm8k": 117, "arc_challenge": 35}
PAPER_ROLLOUTS_PER_STEP = 24 * 16
# Flags that must agree between a run and the checkpoint it resumes (the world size need not).
RESUME_KEYS = ("model", "dataset", "k", "beta", "max_new_tokens", "penalty", "sft_weight", "lr", "weight_decay",
               "global_questions", "steps", "seed", "val_size", "grad_clip", "dtype")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "best", "best.old",
             "best.tmp")


# ----------------------------------------------------------------------------------------------------------
# Configuration

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the default prints the whole usage first), and which reads "-1e-3"
    as a (negative) value to range-check, not as an unknown option."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low, strict=False):
    """An argparse type: `kind` (int or float), finite, >= low (> low when strict)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return value
    return parse


POSITIVE, COUNT, RATE, WEIGHT = number(int, 1), number(int, 0), number(float, 0, strict=True), number(float, 0)


def get_args(argv=None):
    p = Parser(description="LaTRO training (see the module docstring).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="hub name (meta-llama/Llama-3.1-8B-Instruct) or local model folder")
    a("--dataset", default="gsm8k", help="gsm8k | arc_challenge | hub id | local file or folder of JSONL/parquet")
    a("--out", default="runs/latro", help="run folder: config, metrics.jsonl, checkpoint/, best/")
    a("--overwrite", action="store_true", help="delete the run already in --out (its config, metrics, checkpoint/ "
      "and best/) and start a new one")
    a("--seed", type=COUNT, default=0, help="seed of the data order, the validation slice and every rationale")
    # the method (paper Sec. 4-5)
    a("--k", type=POSITIVE, default=16, help="rationales sampled per question (K)")
    a("--beta", type=WEIGHT, default=None, help="KL coefficient; default 0.05 for GSM8K, 0.25 for ARC (paper)")
    a("--max-new-tokens", type=POSITIVE, default=500, help="L: rationale length limit in tokens")
    a("--penalty", type=WEIGHT, default=2.0, help="gamma: an unfinished rationale's answer reward is gamma x the "
      "mean answer reward of its question's K rationales")
    a("--sft-weight", type=WEIGHT, default=1.0, help="weight of the direct grad log pi(y|x+z) term (paper 1, "
      "official code 0)")
    # optimisation
    a("--questions-per-rank", type=POSITIVE, default=3, help="questions per process per step (paper: 3 x 8 GPUs)")
    a("--global-questions", type=POSITIVE, default=None, help="questions per step over all processes; overrides "
      "--questions-per-rank and must divide by the number of processes (keeps a run identical at any scale)")
    a("--micro-questions", type=POSITIVE, default=1, help="questions per forward/backward micro-batch (K rows each)")
    a("--steps", type=POSITIVE, default=None, help="optimizer steps; default: the paper's 117 (GSM8K) / 35 (ARC), "
      "scaled to keep the same number of rollouts when the global batch differs from 24 x 16")
    a("--lr", type=RATE, default=5e-7, help="AdamW peak learning rate, decayed linearly to 0, no warm-up")
    a("--weight-decay", type=WEIGHT, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=WEIGHT, default=0.0, help="clip the global grad norm to this; 0 = off (paper)")
    a("--max-bad-steps", type=POSITIVE, default=3, help="stop with an error after this many steps in a row whose "
      "loss or gradient norm is not finite (each such step is skipped: no update)")
    # evaluation and checkpoints
    a("--val-size", type=COUNT, default=200, help="train questions held out for checkpoint selection")
    a("--eval-every", type=COUNT, default=20, help="greedy-evaluate the validation slice every N steps; 0 = off")
    a("--eval-max-new-tokens", type=POSITIVE, default=500, help="generation limit of the validation evaluation")
    a("--heldout-questions", type=COUNT, default=8, help="validation questions whose fixed rationales track the "
      "held-out self-reward (mean log pi(y|x+z) on rationales sampled once at step 0)")
    a("--save-every", type=COUNT, default=20, help="write a resumable checkpoint every N steps (and at the end); "
      "0 = only at the end")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (flags must match the saved run)")
    a("--stop-after", type=COUNT, default=0, help="exit after this step as if interrupted (tests, job limits)")
    # systems
    a("--parallel", choices=["auto", "replicate", "shard", "offload", "ddp", "fsdp"], default="auto", help="FSDP2 "
      "layout: replicate (every GPU holds everything), shard (over the GPUs), offload (sharded, with fp32 master "
      "weights, gradients and AdamW on the host); auto picks the first that the memory plan fits. ddp and fsdp "
      "are older names of replicate and shard")
    a("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="compute dtype: bf16 on GPU, fp32 on CPU")
    a("--grad-checkpointing", choices=["auto", "on", "off"], default="auto", help="recompute activations in "
      "backward; auto = on for GPUs")
    a("--compile", choices=["auto", "on", "off"], default="auto", nargs="?", const="on", help="torch.compile the "
      "sampler's decode step; auto = on for GPUs; --compile alone = on")
    a("--cuda-graphs", choices=["auto", "on", "off"], default="auto", help="replay the decode step as a CUDA "
      "graph; auto = on for GPUs")
    a("--prompt-bucket", type=POSITIVE, default=64, help="prompt lengths are padded to a multiple of this, so a few "
      "decode graphs cover a run")
    a("--row-bucket", type=POSITIVE, default=8, help="sampler rows are padded to a multiple of this")
    a("--stop-check-every", type=POSITIVE, default=8, help="decode steps between stop checks (one host sync each)")
    a("--decode-attention", choices=["math", "auto"], default="math", help="attention of the decode step: math "
      "(Inductor fuses the mask into it, as gpt-fast does) or auto (SDPA picks a fused kernel)")
    a("--logprob-chunk", type=POSITIVE, default=1024, help="positions per chunk of the log-softmax over the vocab")
    a("--gpu-memory-gb", type=RATE, default=None, help="plan against this much memory per GPU (default: what the "
      "device has); with --plan-only, plan for such GPUs on any machine; on a CPU run, the memory it may use")
    a("--host-memory-gb", type=RATE, default=None, help="plan against this much host memory (default: this "
      "machine's)")
    a("--plan-only", action="store_true", help="print the memory plan and exit without loading any weights")
    a("--device", default=None, help="override the device (cpu, cuda:0); default: cuda:LOCAL_RANK if present")
    return p.parse_args(argv)


def resolve_defaults(args, task: str, world: int, n_train: int, n_val: int):
    """Fill the task-dependent defaults and check the batch geometry against the data."""
    if args.k < 2:
        raise SystemExit(f"--k {args.k}: the leave-one-out baseline needs at least 2 rationales per question")
    args.parallel = {"ddp": "replicate", "fsdp": "shard"}.get(args.parallel, args.parallel)
    if args.global_questions is None:
        args.global_questions = args.questions_per_rank * world
    elif args.global_questions % world:
        raise SystemExit(f"--global-questions {args.global_questions} does not divide over {world} processes")
    else:
        args.questions_per_rank = args.global_questions // world
    if args.questions_per_rank % args.micro_questions:
        raise SystemExit(f"--questions-per-rank {args.questions_per_rank} must be a positive multiple of "
                         f"--micro-questions {args.micro_questions}")
    if args.global_questions > n_train:
        raise SystemExit(f"--global-questions {args.global_questions} is more than the {n_train} train questions "
                         f"left after --val-size {n_val}: questions would repeat within a step")
    if args.heldout_questions > n_val:
        raise SystemExit(f"--heldout-questions {args.heldout_questions} needs --val-size >= "
                         f"{args.heldout_questions} (it is {n_val})")
    args.beta = PAPER_BETA[task] if args.beta is None else args.beta
    if args.steps is None:
        args.steps = max(1, round(PAPER_STEPS[task] * PAPER_ROLLOUTS_PER_STEP / (args.global_questions * args.k)))
    return args


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Models

def model_path(name: str, flag: str = "--model") -> str:
    """A local folder (checked: it must hold config.json), or a hub id."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path) and not name.startswith((".", "/", "~")):
        return name  # a hub id never starts like a path
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {name!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        inner = os.path.join(path, "model")
        hint = f"; a latro.py checkpoint keeps its model in {inner}" if os.path.isfile(
            os.path.join(inner, "config.json")) else ""
        raise SystemExit(f"{flag} {name!r}: this folder has no config.json, so it is not a model{hint}")
    return path


def load_config(name: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot read its config ({type(e).__name__}: {str(e)[:300]})") from None


def load_model(name: str, dtype, device):
    """A causal LM by hub name or local folder, dropout off (sampling and scoring are deterministic)."""
    from transformers import AutoModelForCausalLM
    try:
        lm = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    if getattr(lm.config, "final_logit_softcapping", None):
        raise SystemExit(f"--model {name!r}: logit soft-capping is not supported by the fused scorer")
    for m in lm.modules():  # nn.Dropout modules and the attention_dropout floats the attention kernels read
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return lm.to(device).eval()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad == eos here: masks, not token ids, decide what is padding
    return tok


def stop_token_ids(tok, lm) -> list:
    """Token ids that end a turn: the chat template's end of turn, the tokenizer's eos, the generation config's."""
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids(data.end_of_turn(tok))}
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------------------
# The memory plan: what each phase holds per GPU and per host, from the model's shape and the flags

def model_shape(cfg) -> dict:
    """Parameter counts (from a weightless model on the meta device) and the sizes the plan needs."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    heads = cfg.num_attention_heads
    return dict(n=sum(p.numel() for p in lm.parameters()), layers=cfg.num_hidden_layers,
                layer_n=sum(p.numel() for p in lm.get_decoder().layers[0].parameters()),
                hidden=cfg.hidden_size, inter=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                vocab=cfg.vocab_size, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def memory_plan(s: dict, a, world: int, mode: str, on_gpu: bool, prompt_len: int, runtime_gb: float,
                tokens: int = None, adam_state: bool = True, local: int = 1) -> list:
    """Rows (item, GB per GPU, GB of host memory, phases it is live in) for one layout; the host column counts
    `local` processes (those of one machine), of which only rank 0 gathers a checkpoint. Phases:
    sample (the replica decodes), score (forward + backward of micro-batches), update (AdamW, then the replica
    refresh), save (a checkpoint: rank 0 gathers full tensors in host memory). fp32 master weights, gradients
    and AdamW m, v: 16 bytes per parameter, divided over the ranks unless replicated, on the host when
    offloaded. The reference and the sampler replica: 2 bytes per parameter each in bf16, on every GPU. On a
    CPU everything is host memory. `tokens`: the tokens of the largest micro-batch (default: the worst case,
    every row at the longest prompt + L + y). Before the first update AdamW has no m, v (`adam_state` False)."""
    G, cb = 2**30, 4 if a.dtype == "fp32" else 2            # bytes per compute-dtype element
    N, H, I, V = s["n"], s["hidden"], s["inter"], s["vocab"]
    shards = 1 if mode == "replicate" else world
    state_on = "host" if mode == "offload" else "gpu"
    rows = a.questions_per_rank * a.k                        # rows the sampler decodes at once
    length = prompt_len + max(a.max_new_tokens, a.eval_max_new_tokens)
    micro_tokens = tokens or a.micro_questions * a.k * (prompt_len + a.max_new_tokens + 24)   # + y
    layer_act = (10 * H + 4 * I) * cb + 2 * H * 4           # saved per token per layer, incl. fp32 norm inputs
    act = micro_tokens * (s["layers"] * H * cb + layer_act if a.grad_checkpointing else s["layers"] * layer_act)
    items = [("fp32 master weights", 4 * N / shards, state_on, "all"),
             ("AdamW m and v (fp32)", 8 * N / shards, state_on, "all" if adam_state else "update"),
             ("gradients (fp32)", 4 * N / shards, state_on, "score update"),
             ("reference pi_0 (frozen)", cb * N, "gpu", "all"),
             ("sampler replica", cb * N, "gpu", "all"),
             ("KV cache", rows * length * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * cb, "gpu", "all"),
             ("decode: prefill activations, logits, pick", rows * prompt_len * (8 * H + 3 * I) * cb + rows * V * 20,
              "gpu", "sample"),
             ("FSDP2 whole layers in flight", (2 * s["layer_n"] + N - s["layers"] * s["layer_n"]) * cb, "gpu",
              "score update"),
             ("activations of one micro-batch", act, "gpu", "score"),
             ("log-prob chunk (fp32 logits + grad)", a.logprob_chunk * V * 12, "gpu", "score"),
             ("checkpoint: full AdamW state on rank 0", 8 * N / local, "host", "save"),
             ("runtime (Python, torch, data; measured)", runtime_gb * G, "host", "all")]
    out = []
    for item, nbytes, where, phases in items:
        where = where if on_gpu else "host"
        nbytes *= local if where == "host" else 1
        out.append((item, nbytes / G if where == "gpu" else 0.0, nbytes / G if where == "host" else 0.0,
                    PHASES if phases == "all" else tuple(phases.split())))
    return out


PHASES = ("sample", "score", "update", "save")


def plan_peaks(rows: list) -> dict:
    """{phase: (GB per GPU, GB of host memory)} of a plan."""
    return {ph: (sum(r[1] for r in rows if ph in r[3]), sum(r[2] for r in rows if ph in r[3])) for ph in PHASES}


def format_plan(rows: list, title: str, gpu_gb: float, host_gb: float, on_gpu: bool, local: int) -> str:
    """The plan as one table: per GPU and per host (all of this machine's processes); on a CPU, host memory."""
    cols = (lambda g, h: f"{g:9.2f} {h:9.2f}") if on_gpu else (lambda g, h: f"{h:9.2f}")
    head = f"{'per GPU':>9s} {'per host':>9s}" if on_gpu else f"{'GB':>9s}"
    lines = [title + ("" if on_gpu else " (a CPU run: all host memory)"),
             f"  {'item':44s} {head}  live in"]
    lines += [f"  {item:44s} {cols(g, h)}  {', '.join(ph)}" for item, g, h, ph in rows]
    lines += [f"  {'peak while ' + ph:44s} {cols(g, h)}" for ph, (g, h) in plan_peaks(rows).items()]
    lines.append(f"  available: {f'{gpu_gb:.1f} GB per GPU, ' if on_gpu else ''}{host_gb:.1f} GB of host memory"
                 + (f" ({local} processes on this host)" if local > 1 else ""))
    return "\n".join(lines)


def host_memory_gb() -> float:
    """Total memory of this machine (Linux /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            return int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def choose_layout(shape, args, world, device, prompt_len, runtime_gb):
    """--parallel auto: the first layout whose plan fits (replicate, shard, offload); print its plan. Refuse
    before any weights load when none fits, with the table and the single changes that would make it fit."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    on_gpu = device.type == "cuda" or bool(args.plan_only and args.gpu_memory_gb)   # planning for GPUs elsewhere
    gpu_gb = args.gpu_memory_gb or (torch.cuda.get_device_properties(device).total_memory / 2**30 if on_gpu else 0)
    host_gb = args.host_memory_gb or (args.gpu_memory_gb if not on_gpu and args.gpu_memory_gb else host_memory_gb())

    plan = lambda a, mode: memory_plan(shape, a, world, mode, on_gpu, prompt_len, runtime_gb, local=local)

    def fits(a, mode):  # 90%: room for the allocator's fragmentation and the CUDA context
        peaks = plan_peaks(plan(a, mode)).values()
        return max(g for g, _ in peaks) <= 0.9 * gpu_gb * on_gpu and max(h for _, h in peaks) <= 0.9 * host_gb
    modes = [args.parallel] if args.parallel != "auto" else (["shard"] if world == 1 else ["replicate", "shard"]) + \
        (["offload"] if on_gpu else [])
    mode = next((m for m in modes if fits(args, m)), modes[-1])
    title = (f"memory plan: {shape['n'] / 1e9:.2f} B parameters, {args.questions_per_rank * args.k} rows x "
             f"({prompt_len} prompt + {args.max_new_tokens} tokens), --parallel {mode}")
    print0(format_plan(plan(args, mode), title, gpu_gb, host_gb, on_gpu, local))
    if fits(args, mode) or args.plan_only:
        return mode
    tries = [("--parallel offload", "offload", {})] if on_gpu and mode != "offload" else []
    tries += [("--grad-checkpointing on", mode, {"grad_checkpointing": True}),
              ("--micro-questions 1", mode, {"micro_questions": 1})]
    tries += [(f"--questions-per-rank {q} --micro-questions 1", mode, {"questions_per_rank": q, "micro_questions": 1})
              for q in range(args.questions_per_rank - 1, 0, -1)]
    would = [flag for flag, m, change in tries if fits(argparse.Namespace(**{**vars(args), **change}), m)]
    raise SystemExit(f"the memory plan above does not fit (--parallel {mode}); "
                     + (f"it would fit with {' or with '.join(would[:3])}" if would else
                        "no single change of --parallel, --grad-checkpointing, --micro-questions or "
                        "--questions-per-rank makes it fit: use more GPUs, a smaller --k or --max-new-tokens"))


# ----------------------------------------------------------------------------------------------------------
# Sampling: one engine for training rollouts, validation, the held-out rollouts and eval.py

# The official stop list (trainer_config.stop_seqs), case-sensitive, matched on word boundaries in the text.
TEMPLATE = re.compile(r"\b(?:Answer:|(?:So, |Therefore, )?[Tt]he answer is(?!\w)|so the final answer is(?!\w))")


def question_uniforms(seed: int, step: int, question: int, k: int, length: int) -> torch.Tensor:
    """(k, length) uniforms from the question's own stream: same rationales whatever the world size."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + question)
    return torch.rand(k, length, generator=g, dtype=torch.float64)


def pick_token(logits: torch.Tensor, u) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: the inverse CDF of softmax(logits) at u (multinomial at temperature 1);
    greedy (argmax) where u < 0, or everywhere when u is None. No host sync: it runs inside the graph."""
    if u is None:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)                             # (B, V)
    drawn = torch.searchsorted(cdf, (u.clamp(min=0) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return torch.where(u < 0, logits.argmax(-1), drawn.clamp(max=logits.shape[-1] - 1))


def template_cut(tok, ids: list, complete: bool = True):
    """If the decoded text of `ids` holds an answer template, the index where z ends (before the token in which
    the FIRST template starts); else None. A template at the very end of an unfinished text waits for one more
    character ("The answer is" may still become "The answer isn't"), so stops do not depend on when they are
    checked."""
    text = tok.decode(ids)
    m = TEMPLATE.search(text)
    if m is None or (not complete and m.end() == len(text) and text[-1].isalnum()):
        return None
    cut = len(ids)
    while cut > 0 and len(tok.decode(ids[:cut])) > m.start():   # the template's first token is not part of z
        cut -= 1
    return cut


def stop_position(ids: list, start: int, stop: set, tok=None, final: bool = False):
    """Where z ends if the row stopped within ids[start:], else None: at its first stop token, or earlier at the
    first answer template (searched only when `tok` is given) of the text before that token."""
    end = next((t for t in range(start, len(ids)) if ids[t] in stop), None)
    cut = template_cut(tok, ids[:end], complete=end is not None or final) if tok is not None else None
    return cut if cut is not None else end


class KVCache:
    """A static KV cache that the model's attention layers write through `update`: per layer one (B, Hkv, S, D)
    key and value view into a flat buffer shared by every shape. `index` holds the columns the next forward
    writes: arange(P) for the prefill, then a 1-element device tensor advanced in place by the decode step."""

    def __init__(self, buf: torch.Tensor, B: int, S: int, heads: int, dim: int):
        n = B * heads * S * dim
        self.k = [buf[l, 0, :n].view(B, heads, S, dim) for l in range(buf.shape[0])]
        self.v = [buf[l, 1, :n].view(B, heads, S, dim) for l in range(buf.shape[0])]
        self.index = None

    def update(self, key, value, layer_idx, **_):
        self.k[layer_idx].index_copy_(2, self.index, key)
        self.v[layer_idx].index_copy_(2, self.index, value)
        return self.k[layer_idx], self.v[layer_idx]


class RotaryTable(torch.nn.Module):
    """Replaces a model's rotary embedding by a table indexed by position (as gpt-fast does): the same values,
    computed once, and no data-dependent control flow (Phi-3's longrope) inside a captured decode step."""

    def __init__(self, rotary, length: int, dtype, device):
        super().__init__()
        cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), torch.arange(length, device=device)[None])
        self.register_buffer("cos", cos[0], persistent=False)   # (length, head_dim)
        self.register_buffer("sin", sin[0], persistent=False)

    def forward(self, x, position_ids):
        return self.cos[position_ids], self.sin[position_ids]


class Engine:
    """The sampler. Holds a plain model (for training: the bf16 replica of the policy, refreshed in place), a KV
    buffer sized once, and one decode state per bucketed shape (rows, prompt length, L). Each decode step is one
    function of device tensors: the model forward over the newest token, the token pick at the row's uniform,
    and the mask / position / cache-column updates. On a GPU it is compiled and captured once per shape as a
    CUDA graph, then replayed for every token; on a CPU the same function runs eagerly (or compiled). Only the
    stop check runs on the host, every `check_every` tokens."""

    def __init__(self, lm, stop_ids, compile=False, graphs=False, prompt_bucket=64, row_bucket=8, check_every=8,
                 attention="math"):
        from torch.nn.attention import SDPBackend
        self.lm, self.stop, self.graphs = lm, set(stop_ids), graphs
        # decode attention: "math" lets Inductor write the one-query attention itself and fuse the mask into it
        # (gpt-fast's choice); "auto" leaves SDPA to pick a fused kernel
        self.backends = [SDPBackend.MATH] if attention == "math" else [
            SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
        # buckets keep the number of compiled / captured shapes small; an eager step runs any shape as it is
        exact = not (compile or graphs)
        self.prompt_bucket, self.row_bucket = (1, 1) if exact else (prompt_bucket, row_bucket)
        self.check_every = check_every
        cfg, p = lm.config, next(lm.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers, self.buf, self.states = cfg.num_hidden_layers, None, {}
        self.max_len = min(getattr(cfg, "max_position_embeddings", 1 << 14), 1 << 14)
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.max_len = min(self.max_len, rope.get("original_max_position_embeddings") or self.max_len)
        decoder = lm.get_decoder()
        if hasattr(decoder, "rotary_emb") and not isinstance(decoder.rotary_emb, RotaryTable):
            decoder.rotary_emb = RotaryTable(decoder.rotary_emb, self.max_len, self.dtype, self.device)
        self.window = getattr(cfg, "sliding_window", None)
        # one compiled function for every shape: dynamic=False specialises it per bucket (a handful per run)
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.pool = torch.cuda.graph_pool_handle() if graphs else None   # graphs of all shapes share memory

    def reserve(self, rows: int, length: int):
        """Allocate the KV buffer for `rows` x `length` tokens up front (it grows on demand otherwise)."""
        need = round_up(rows, self.row_bucket) * self.kv_heads * length * self.head_dim
        if self.buf is None or self.buf.shape[-1] < need:
            self.buf, self.states = None, {}           # every view and graph of the old buffer goes with it
            self.buf = torch.zeros(self.layers, 2, need, dtype=self.dtype, device=self.device)

    def _state(self, B: int, P: int, L: int):
        """The decode state of one shape: persistent tensors a captured graph reads and writes."""
        key = (B, P, L)
        if key not in self.states:
            if len(self.states) >= 64 and not self.graphs:   # exact shapes: keep a bounded number of states
                self.states.clear()
            S, dev = P + L, self.device
            self.reserve(B, S)
            self.states[key] = SimpleNamespace(
                cache=KVCache(self.buf, B, S, self.kv_heads, self.head_dim), graph=None,
                token=torch.zeros(B, 1, dtype=torch.long, device=dev), pos=torch.zeros(B, 1, dtype=torch.long, device=dev),
                col=torch.zeros(1, dtype=torch.long, device=dev), t=torch.zeros(1, dtype=torch.long, device=dev),
                mask=torch.zeros(B, 1, 1, S, dtype=torch.bool, device=dev),
                u=torch.zeros(B, L, dtype=torch.float64, device=dev), out=torch.zeros(B, L, dtype=torch.long, device=dev))
        return self.states[key]

    def _step(self, st):
        """One decode step, device tensors only: token t-1 goes in at cache column `col`, token t comes out."""
        from torch.nn.attention import sdpa_kernel
        st.mask.index_fill_(3, st.col, True)                  # the new token's column becomes visible
        with sdpa_kernel(self.backends):
            logits = self.lm(input_ids=st.token, attention_mask=st.mask, position_ids=st.pos, cache=st.cache,
                             use_cache=True).logits[:, -1]     # (B, V)
        nxt = pick_token(logits.float(), st.u.index_select(1, st.t).squeeze(1))   # (B,)
        st.out.index_copy_(1, st.t, nxt[:, None])
        st.token.copy_(nxt[:, None])
        st.pos.add_(1), st.col.add_(1), st.t.add_(1)

    def _replay(self, st):
        """Run the decode step: eagerly, or as the shape's CUDA graph (captured on first use)."""
        if not self.graphs:
            return self.step(st)
        if st.graph is None:
            saved = [x.clone() for x in (st.token, st.pos, st.col, st.t, st.mask)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                  # warm-up (and compilation) outside the capture
                for _ in range(2):
                    self.step(st)
            torch.cuda.current_stream().wait_stream(side)
            for x, y in zip((st.token, st.pos, st.col, st.t, st.mask), saved):
                x.copy_(y)                                 # the warm-up's writes are overwritten before use
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph, pool=self.pool):
                self.step(st)
        st.graph.replay()

    @torch.no_grad()
    def generate(self, prompts: list, max_new: int, uniforms=None, tok=None):
        """Decode from each prompt (token-id lists) until a stop token, the answer template (when `tok` is
        given) or `max_new` tokens. uniforms (B, max_new) sample at T=1; None is greedy. Tokens drawn after a
        row's stop are discarded, so the result does not depend on how often stops are checked. Returns
        (generated id lists without the stop token or template, finished flags)."""
        B0, dev = len(prompts), self.device
        B = round_up(B0, self.row_bucket)                        # padded rows copy row 0 and are dropped
        P = round_up(max(len(p) for p in prompts), self.prompt_bucket)
        S = P + max_new
        if S > self.max_len or (self.window and S > self.window):
            raise SystemExit(f"prompt + --max-new-tokens = {S} tokens exceeds what the sampler supports for this "
                             f"model ({min(self.max_len, self.window or self.max_len)})")
        st = self._state(B, P, max_new)
        ids = torch.full((B, P), self.lm.config.pad_token_id or 0, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for i, p in enumerate(prompts + [prompts[0]] * (B - B0)):   # left padding: prompts end at column P-1
            ids[i, P - len(p):] = torch.tensor(p)
            valid[i, P - len(p):P] = True
        ids, valid = ids.to(dev), valid.to(dev)
        # left padding: positions count real tokens only, or rows would depend on their padding
        pos = (valid[:, :P].cumsum(-1) - 1).clamp(min=0)
        # prefill: causal over the prompt, pads invisible; each query also sees itself (no empty softmax rows)
        mask = torch.ones(P, S, dtype=torch.bool, device=dev).tril() & valid[:, None, :]
        mask |= torch.eye(P, S, dtype=torch.bool, device=dev)
        st.cache.index = torch.arange(P, device=dev)
        logits = self.lm(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, cache=st.cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]          # (B, V)
        st.u.fill_(-1.0)                                                          # greedy unless a uniform is given
        if uniforms is not None:
            st.u[:B0].copy_(uniforms)
        st.out[:, 0] = pick_token(logits.float(), st.u[:, 0])
        st.token.copy_(st.out[:, :1]), st.pos.copy_(pos[:, -1:] + 1), st.mask.copy_(valid[:, None, None, :])
        st.col.fill_(P), st.t.fill_(1)
        st.cache.index = st.col
        host = [[] for _ in range(B0)]          # the drawn ids on the host, extended at each stop check
        length, finished, active = [max_new] * B0, [False] * B0, set(range(B0))
        for t in range(max_new):
            if (t + 1) % self.check_every == 0 or t == max_new - 1:
                start, new = len(host[0]), st.out[:B0, len(host[0]):t + 1].tolist()
                for i in range(B0):
                    host[i] += new[i]
                    cut = stop_position(host[i], start, self.stop, tok, final=t == max_new - 1) if i in active else None
                    if cut is not None:
                        length[i], finished[i] = cut, True
                        active.discard(i)
                if not active:                   # early exit: every row has stopped
                    break
            if t < max_new - 1:
                self._replay(st)                 # draws token t+1
        return [host[i][:length[i]] for i in range(B0)], finished


def make_replica(ref_lm):
    """The sampler's plain copy of the policy, in the compute dtype: no FSDP hooks, no autocast. At step 0 it
    equals the frozen reference, so it starts as a copy of it."""
    return copy.deepcopy(ref_lm).requires_grad_(False).eval()


@torch.no_grad()
def refresh_replica(replica, model):
    """Copy the policy's current weights into the replica, in place, so its tensors never move (the captured
    graphs stay valid). FSDP2 gathers one module at a time, already cast to the compute dtype."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    dst, done = dict(replica.named_parameters()), set()
    for prefix, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        module.unshard()
        for name, p in module.named_parameters(prefix=prefix):
            name = name.removeprefix("lm.")                  # Scorer.lm.x -> x
            if not isinstance(p, DTensor) and name in dst:  # this module's own parameters, now whole
                dst[name].copy_(p)
                done.add(name)
        module.reshard()
    assert done == set(dst), f"replica parameters not refreshed: {sorted(set(dst) - done)[:3]}"


# ----------------------------------------------------------------------------------------------------------
# Scoring: one forward, log-probs at z and y positions only

def _chunk_logprobs(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                                  # (M, V) upcast before softmax
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)   # (M,)


class Scorer(torch.nn.Module):
    """Wraps a causal LM: forward(input_ids, attention_mask, target_mask) -> (B, T-1) log-probs of the
    tokens at target positions (token t+1 predicted from position t), zero elsewhere. The vocabulary
    projection runs `chunk` positions at a time and is recomputed in backward, so the (M, V) fp32 logits
    never exist all at once. Wrapping the LM in a module of our own lets FSDP2 hook this forward."""

    def __init__(self, lm, chunk: int = 1024):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, attention_mask, target_mask):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state     # (B, T, H)
        sel = target_mask[:, 1:]                                              # (B, T-1)
        h, targets = hidden[:, :-1][sel], input_ids[:, 1:][sel]               # (M, H), (M,)
        head, parts = self.lm.get_output_embeddings(), []
        for i in range(0, h.shape[0], self.chunk):
            args = (head, h[i:i + self.chunk], targets[i:i + self.chunk])
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_logprobs(*args))
        out = hidden.new_zeros(sel.shape, dtype=torch.float32)               # (B, T-1)
        return out.masked_scatter(sel, torch.cat(parts)) if parts else out


def build_batch(prompt: list, zs: list, ys: list, pad_id: int):
    """Right-padded [x ; z ; y] rows and the masks of the z and y tokens (all (B, T))."""
    rows = [prompt + z + y for z, y in zip(zs, ys)]
    T, B = max(len(r) for r in rows), len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn, z_mask, y_mask = (torch.zeros(B, T, dtype=torch.bool) for _ in range(3))
    for i, (z, y) in enumerate(zip(zs, ys)):
        P, Z = len(prompt), len(z)
        ids[i, :len(rows[i])] = torch.tensor(rows[i])
        attn[i, :len(rows[i])] = True
        z_mask[i, P:P + Z] = True            # exactly the rationale tokens
        y_mask[i, P + Z:P + Z + len(y)] = True  # exactly the answer tokens, end-of-turn included
    return ids, attn.long(), z_mask, y_mask


def answer_ids(tok, ex, z_ids: list, eot: str) -> list:
    """Token ids of y after z, tokenised IN CONTEXT: encode(decode(z) + sep + y) and keep what follows z, so
    that a SentencePiece model gets the "▁The" it would write there (encoding y alone can give an extra "▁" or
    a "▁The" after a newline). sep is a space unless z ends in whitespace. When z's tokens and y's would merge
    at the boundary, y is tokenised after a newline instead, which never merges."""
    z_text = tok.decode(z_ids)
    y_text = ("" if not z_text or z_text[-1].isspace() else " ") + data.answer_text(ex) + eot
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    head, full = enc(z_text), enc(z_text + y_text)
    if full[:len(head)] == head:             # the usual case: z's own tokens are a prefix of the whole
        return full[len(head):]
    anchor = enc("\n")
    return enc("\n" + y_text)[len(anchor):]


def score(scorer, ids, attn, z_mask, y_mask):
    """(logp_z, logp_y): per-row SUMS of token log-probs over z and over y, from one forward."""
    tok_logp = scorer(ids, attn, z_mask | y_mask)                             # (B, T-1)
    logp_z = (tok_logp * z_mask[:, 1:]).sum(-1)                               # (B,)
    logp_y = (tok_logp * y_mask[:, 1:]).sum(-1)                               # (B,)
    return logp_z, logp_y


# ----------------------------------------------------------------------------------------------------------
# The objective (paper Eq. 4)

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K): A_k = r_k - mean_{j != k} r_j (leave-one-out baseline)."""
    K = rewards.shape[1]
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)             # (N, K)
    return rewards - baseline


def latro_loss(logp_z, logp_z_ref, logp_y, finished, beta: float, sft_weight: float = 1.0, penalty: float = 2.0):
    """All inputs (N, K); `finished` bool. Returns (loss, stats). The gradient of the loss is minus the
    paper's estimator: 1/(NK) sum [A_k grad logp_z + w grad logp_y]."""
    with torch.no_grad():
        answer_reward = logp_y.detach()                                       # (N, K) log pi(y|x+z)
        # non-stop penalty: gamma x mean answer reward of the same question (LATRO.md sec. 3, departure 1)
        answer_reward = torch.where(finished, answer_reward, penalty * answer_reward.mean(1, keepdim=True))
        kl = logp_z.detach() - logp_z_ref                                     # (N, K) k1 estimate of the KL
        reward = answer_reward - beta * kl                                    # (N, K) self-reward r_k
        advantage = rloo_advantages(reward)                                   # (N, K) A_k
    objective = advantage * logp_z + sft_weight * logp_y                      # (N, K) REINFORCE + answer term
    loss = -objective.mean()
    stats = {"loss": loss.item(), "reward": reward.mean().item(), "logp_y": logp_y.detach().mean().item(),
             "kl": kl.mean().item(), "elbo": (logp_y.detach() - beta * kl).mean().item(),
             "unfinished": (~finished).float().mean().item(), "advantage_abs": advantage.abs().mean().item()}
    return loss, stats


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear decay from lr to 0 over `steps`, no warm-up (paper Sec. 5.1)."""
    return lr * max(0.0, 1.0 - step / steps)


# ----------------------------------------------------------------------------------------------------------
# Data parallel plumbing

def setup_distributed(device_flag=None):
    """The torchrun idiom: RANK / WORLD_SIZE / LOCAL_RANK from the environment, nccl on GPUs and gloo on CPU,
    one device per process. Without torchrun, a process group of one (FSDP2 needs a group even alone).
    Returns (rank, world, device)."""
    use_cuda = str(device_flag).startswith("cuda") or (device_flag is None and torch.cuda.is_available())
    # gloo beside nccl: with --parallel offload some collectives (the gradient norm) see host tensors
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda and device_flag in (None, "cuda") else device_flag or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def close_distributed():
    """All ranks leave together: a rank that tears its group down while another still works can abort (gloo)."""
    dist.barrier()
    dist.destroy_process_group()


def pick_dtype(flag: str, device) -> torch.dtype:
    """--dtype auto: bf16 on GPUs, fp32 on CPUs (where bf16 is ~3x slower)."""
    return torch.bfloat16 if flag == "bf16" or (flag == "auto" and device.type == "cuda") else torch.float32


def wrap(scorer, mode: str, device, compute_dtype, world: int):
    """FSDP2 in every mode, so that the policy computes with compute-dtype parameters cast from fp32 master
    weights in exactly the same way everywhere (the reference is a compute-dtype model: at step 0 the KL is 0).
    Per decoder layer + root; gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    if mode == "replicate":   # a (world, 1) mesh: every rank holds everything, gradients are all-reduced (DDP)
        kw["mesh"] = init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    if mode == "offload":     # sharded, and fp32 master weights, gradients and AdamW live on the host
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in scorer.lm.get_decoder().layers:
        fully_shard(layer, **kw)
    return fully_shard(scorer, **kw)


def all_sum(values: list, device) -> list:
    """Sum a list of floats over ranks (one all_reduce, float64 so that sums of log-probs keep their digits)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank0_verdict(message):
    """Raise on EVERY rank the error that rank 0 found (None: no error), so that no rank waits forever."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SystemExit(box[0])


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list:
    """A seeded permutation of the n train rows for one epoch (cached: a step reads at most two epochs)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def global_questions(n_train: int, step: int, n: int, seed: int) -> list:
    """Train indices of the `n` questions of a step: epochs of a seeded permutation, read in order. A function
    of (seed, step) alone, so a resumed run reads the same questions without saving a data position."""
    return [epoch_order(n_train, seed, pos // n_train)[pos % n_train] for pos in range(step * n, (step + 1) * n)]


def train_state_gb(model, opt) -> float:
    """GB of fp32 parameters + gradients + AdamW state held by THIS rank (local shards; host or device)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**30


def reset_peak_memory(device):
    """Start a phase's peak: the allocator's peak on a GPU, the process's peak RSS (Linux VmHWM) on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # glibc keeps freed heap: give it back first, or a phase would inherit the last phase's peak
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux / glibc: the peak then covers the whole run so far


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return rss_gb(peak=True)


def rss_gb(peak: bool = False) -> float:
    """This process's resident memory (or its peak since the last reset), in GB."""
    try:
        with open("/proc/self/status") as f:
            key = "VmHWM" if peak else "VmRSS"
            return int(next(l for l in f if l.startswith(key)).split()[1]) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux-like KiB


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: never from non-finite weights, written under a temporary name and renamed into place

def weights_finite(model, device) -> bool:
    """All parameters finite, on every rank (a collective: each rank checks its shards)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    bad = sum(int(not torch.isfinite(local(p)).all()) for p in model.parameters())
    return all_sum([bad], device)[0] == 0


def check_disk(path: str, need_gb: float, what: str):
    """The error message when the disk under `path` has less than `need_gb` free, else None."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free / 2**30
    if free < need_gb:
        return (f"cannot write {what} to {path}: it needs about {need_gb:.1f} GB and the disk has {free:.1f} GB free; "
                f"the last good copy is kept")
    return None


def write_folder(path: str, parts: list, need_gb: float, what: str, master: bool):
    """Write folder `path` as `path.tmp`, then swap it into place. Each part is a function (tmp, write) called on
    EVERY rank, since it may gather full tensors (a collective), and writing on rank 0. The parts run one after
    the other, so only one of them is gathered in host memory at a time. A failed write (disk full, permission)
    removes the partial output, names the path and the space it needed, and stops every rank; the last good
    copy is kept."""
    tmp, error = path + ".tmp", None
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written leftover of a crash
    for part in parts:
        try:
            part(tmp, master and error is None)
        except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
            if not master:
                raise
            error = error or (f"cannot write {what} to {path} (about {need_gb:.1f} GB): {str(e).splitlines()[0][:200]}"
                              f"; the partial copy was removed and the last good one is kept")
    if master and error:
        shutil.rmtree(tmp, ignore_errors=True)
    rank0_verdict(error)
    if master:
        swap_into_place(tmp, path)
    dist.barrier()  # no rank runs ahead (and possibly crashes) before the folder is in place


def swap_into_place(tmp: str, path: str):
    """Replace folder `path` by the finished folder `tmp`: the last good copy survives a crash at any point."""
    if os.path.exists(path):  # keep the last good one until the new one is in place
        os.replace(path, path + ".old")
    os.replace(tmp, path)  # atomic on one filesystem: `path` is always whole, or absent with .old whole
    shutil.rmtree(path + ".old", ignore_errors=True)


def save_model_part(model, tok, subdir: str = ""):
    """A write_folder part: the policy's full fp32 weights in `save_pretrained` form (+ the tokenizer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    def part(tmp, write):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if write:
            folder = os.path.join(tmp, subdir)
            model.lm.save_pretrained(folder, state_dict={k.removeprefix("lm."): v for k, v in sd.items()})
            tok.save_pretrained(folder)
    return part


def check_before_saving(path: str, model, need_gb: float, what: str, master: bool, device):
    """Never write from non-finite weights, nor start a write the disk has no room for."""
    if not weights_finite(model, device):   # a collective: every rank has the same answer
        raise SystemExit(f"not writing {path}: the weights are not finite; the last good copy is kept")
    rank0_verdict(check_disk(path, need_gb, what) if master else None)


def save_checkpoint(path: str, model, opt, tok, state: dict, master: bool, device):
    """model/ (save_pretrained, fp32 master weights), state.pt (AdamW, RNGs) and resume.json (step, best, the
    flags that must match), as full (unsharded) tensors: it loads at any world size and in plain transformers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    need = 12 * state["n_params"] / 2**30 * 1.05                      # fp32 weights + AdamW m, v
    check_before_saving(path, model, need, "the checkpoint", master, device)

    def optimizer_part(tmp, write):
        sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if write:
            torch.save({"optimizer": sd, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate()},
                       os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "resume.json"), "w") as f:   # read before any weights load
                json.dump(state, f, indent=1)
    write_folder(path, [save_model_part(model, tok, "model"), optimizer_part], need, "the checkpoint", master)


def save_best(model, tok, path: str, master: bool, record: dict, n_params: int, device):
    """The policy alone, in `save_pretrained` form, with the evaluation record that chose it in best.json."""
    need = 4 * n_params / 2**30 * 1.05
    check_before_saving(path, model, need, "the best model", master, device)

    def record_part(tmp, write):
        if write:
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump(record, f)
    write_folder(path, [save_model_part(model, tok), record_part], need, "the best model", master)


def find_checkpoint(out: str) -> str:
    """OUT/checkpoint, or OUT/checkpoint.old when a crash came between the two renames."""
    for p in (os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old")):
        if all(os.path.isfile(os.path.join(p, f)) for f in ("state.pt", "resume.json")):
            return p
    raise SystemExit(f"--resume: no checkpoint in {out!r} (looked for checkpoint/ and checkpoint.old/)")


def check_resume_config(saved: dict, args):
    """Refuse a resume whose flags would change the run (the world size may change: the update does not)."""
    bad = [f"--{k.replace('_', '-')}: run {getattr(args, k)!r} vs checkpoint {saved.get(k)!r}"
           for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if bad:
        raise SystemExit("--resume: the checkpoint was written by a different run:\n  " + "\n  ".join(bad))


def claim_run_folder(args, master: bool):
    """A run folder belongs to one run: refuse one that holds a run unless --resume or --overwrite."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))] if master else []
    message = None
    if found and not args.resume and not args.overwrite:
        message = (f"--out {args.out!r} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                   f"--overwrite to delete it and start again, or another --out")
    rank0_verdict(message)
    if found and args.overwrite and not args.resume and master:
        print0(f"--overwrite: deleting {', '.join(os.path.join(args.out, f) for f in found)}")
        for f in found:
            p = os.path.join(args.out, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if master:
        os.makedirs(args.out, exist_ok=True)


def read_metrics(path: str, upto: int) -> list:
    """The metric lines of a run up to step `upto`; a torn line (a crash mid-write) is dropped with a note."""
    rows = []
    for n, line in enumerate(open(path) if os.path.exists(path) else [], 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print0(f"--resume: dropping the unreadable line {n} of {path} (a write cut short)")
            continue
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Validation: greedy accuracy on the held-out slice, and the held-out self-reward

@torch.no_grad()
def validate(run) -> dict:
    """Greedy accuracy on the validation slice (strided over ranks) and mean log pi(y|x+z) on the fixed held-out
    rollouts. Both use the replica (the current policy in the compute dtype), which runs no collective, so any
    number of questions over any number of ranks is fine; the sums are then added up once."""
    a, tok, engine = run.args, run.tok, run.engine
    mine = run.val[run.rank::run.world]
    correct, batch = 0, a.questions_per_rank * a.k          # the training rollout's rows: the same decode graph
    for i in range(0, len(mine), batch):
        exs = mine[i:i + batch]
        outs, _ = engine.generate(data.prompt_ids(tok, exs), a.eval_max_new_tokens)
        correct += sum(data.is_correct(e, tok.decode(o, skip_special_tokens=True)) for e, o in zip(exs, outs))
    # the held-out self-reward: same questions, same rationales at every evaluation, so its changes are the
    # policy's alone (a learning curve free of sampling noise)
    scorer, logp_y_sum, rows = Scorer(run.replica, a.logprob_chunk), 0.0, 0
    for ids, attn, z_mask, y_mask in run.heldout[run.rank::run.world]:
        _, logp_y = score(scorer, ids.to(run.device), attn.to(run.device), z_mask.to(run.device), y_mask.to(run.device))
        logp_y_sum, rows = logp_y_sum + logp_y.sum().item(), rows + ids.shape[0]
    correct, n, lsum, lcount = all_sum([correct, len(mine), logp_y_sum, rows], run.device)
    rec = {"val_accuracy": correct / max(n, 1), "val_n": int(n)}
    return rec | ({"heldout_logp_y": lsum / lcount} if lcount else {})


# ----------------------------------------------------------------------------------------------------------
# One step on one rank

def rollout(engine, tok, exs, qidx, step, args):
    """Sample K rationales per question; returns per question (prompt ids, z list, finished list)."""
    prompts = [p for p in data.prompt_ids(tok, exs) for _ in range(args.k)]
    # q is the question's position in the GLOBAL step, so its stream is the same on any rank
    uniforms = [question_uniforms(args.seed, step, q, args.k, args.max_new_tokens) for q in qidx]
    # all K rationales of all questions of this rank in one batch; `tok` turns on the template stop
    zs, fin = engine.generate(prompts, args.max_new_tokens, uniforms=torch.cat(uniforms), tok=tok)
    K = args.k
    return [(prompts[i * K], zs[i * K:(i + 1) * K], fin[i * K:(i + 1) * K]) for i in range(len(exs))]


def score_and_backward(run, exs, rolls):
    """Fused scoring and backward, micro-batch by micro-batch; returns summed stats over this rank."""
    a, tok, model, dev = run.args, run.tok, run.model, run.device
    K, m = a.k, a.micro_questions
    sums, n_micro = {}, len(exs) // m
    for j in range(n_micro):
        # whole questions per micro-batch: the leave-one-out baseline needs a question's K rewards together
        batch = [build_batch(rolls[i][0], rolls[i][1], [answer_ids(tok, exs[i], z, run.eot) for z in rolls[i][1]],
                             tok.pad_token_id) for i in range(j * m, (j + 1) * m)]
        T = max(b[0].shape[1] for b in batch)
        pad = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)
        ids = torch.cat([pad(b[0], tok.pad_token_id) for b in batch]).to(dev)   # (m*K, T)
        attn, z_mask, y_mask = (torch.cat([pad(b[i], 0) for b in batch]).to(dev) for i in (1, 2, 3))
        finished = torch.tensor([f for i in range(j * m, (j + 1) * m) for f in rolls[i][2]], device=dev)
        # the reference first, without gradient, so its activations are gone before the policy's exist
        with torch.no_grad():
            logp_z_ref = (run.ref(ids, attn, z_mask) * z_mask[:, 1:]).sum(-1)   # (m*K,) reference, z only
        model.lm.train(a.grad_checkpointing)  # HF checkpoints only in train mode; dropout is already 0
        if a.parallel == "replicate":          # all-reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(j == n_micro - 1)
        logp_z, logp_y = score(model, ids, attn, z_mask, y_mask)               # (m*K,) each, with grad
        loss, stats = latro_loss(logp_z.view(m, K), logp_z_ref.view(m, K), logp_y.view(m, K),
                                 finished.view(m, K), a.beta, a.sft_weight, a.penalty)
        # loss is a mean over this micro-batch's m*K rows; rescale to a mean over the GLOBAL batch.
        # FSDP2 averages gradients over ranks, hence the extra factor `world`.
        (loss * (m / a.global_questions) * run.world).backward()
        model.lm.eval()
        for key, v in stats.items():  # sums, not means: the loop divides by the global row count after all_sum
            sums[key] = sums.get(key, 0.0) + v * m * K
        sums["z_len"] = sums.get("z_len", 0.0) + z_mask.sum().item()
        sums["tokens"] = max(sums.get("tokens", 0), ids.numel())   # for the memory plan, not a metric
    return sums


def train_step(run, step: int) -> dict:
    """Sample, score, update: one LaTRO step. A step whose loss or gradient norm is not finite makes no update."""
    a, dev, opt = run.args, run.device, run.opt
    for g in opt.param_groups:  # the schedule is a function of the step: nothing to restore on resume
        g["lr"] = lr_at(step, a.steps, a.lr)
    idx = global_questions(len(run.train), step, a.global_questions, a.seed)
    mine = list(range(run.rank, a.global_questions, run.world))   # positions in the step, strided by rank
    exs = [run.train[idx[q]] for q in mine]
    peaks, times, had_state = {}, [time.time()], bool(opt.state)   # AdamW's m, v exist from the first update

    def phase_end(name):
        peaks[name] = peak_memory_gb(dev)
        times.append(time.time())
        reset_peak_memory(dev)

    reset_peak_memory(dev)
    rolls = rollout(run.engine, run.tok, exs, mine, step, a)        # phase 1: K rationales per question
    phase_end("sample")
    sums = score_and_backward(run, exs, rolls)                       # phase 2: fused scoring, loss, backward
    phase_end("score")
    # the global gradient norm is logged every step; with --grad-clip 0 (paper) the max norm is infinite
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    tokens = sums.pop("tokens")
    keys = sorted(sums)   # every rank holds sums over its own rows: add them up, divide by the global rollouts
    tot = dict(zip(keys, all_sum([sums[k] for k in keys], dev)))
    finite = math.isfinite(norm) and math.isfinite(tot["loss"])
    if finite:                                                       # phase 3: AdamW, then the replica follows
        opt.step()
        refresh_replica(run.replica, run.model)
    state_gb = train_state_gb(run.model, opt)
    opt.zero_grad(set_to_none=True)
    phase_end("update")
    n_rows = a.global_questions * a.k
    # the plan at this step's shapes (its largest micro-batch), next to what each phase measured
    plan = plan_peaks(run.plan(tokens=tokens, adam_state=had_state))
    planned = {ph: g if dev.type == "cuda" else h for ph, (g, h) in plan.items()}
    rec = {"step": step + 1, **{k: tot[k] / n_rows for k in keys}, "grad_norm": norm, "lr": opt.param_groups[0]["lr"],
           "t_sample": times[1] - times[0], "t_score": times[2] - times[1], "t_update": times[3] - times[2],
           "sample_tokens_per_s": tot["z_len"] / (times[1] - times[0]) / run.world, "train_state_gb": state_gb,
           "decode_shapes": len(run.engine.states)}   # (rows, prompt bucket, L) shapes so far: one graph each
    for ph in ("sample", "score", "update"):   # measured peak of each phase next to the plan's prediction
        rec[f"peak_gb_{ph}"], rec[f"plan_gb_{ph}"] = peaks[ph], planned[ph]
    if not finite:
        rec["skipped"] = "non-finite loss or gradient norm: no update"
    return rec


# ----------------------------------------------------------------------------------------------------------
# The run: setup, bookkeeping, signals

class StopSignals:
    """SIGINT and SIGTERM end the current step cleanly: the loop asks `agreed()` at each step boundary, where all
    ranks agree (none is left waiting in a collective). SIGTERM, which clusters send before preemption, writes
    a checkpoint first. A second Ctrl-C, later than 2 s after the first, stops at once."""

    def __init__(self):
        self.received, self.at = 0, 0.0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.received and time.time() - self.at > 2:   # torchrun repeats a signal
            raise KeyboardInterrupt
        if not self.received:
            print0(f"\n{signal.Signals(signum).name}: stopping at the end of this step"
                   + (" with a checkpoint" if signum == signal.SIGTERM else " (Ctrl-C again: stop now)"))
        self.received, self.at = max(self.received, signum), time.time()     # SIGTERM (15) outranks SIGINT (2)

    def agreed(self, device) -> int:
        t = torch.tensor([self.received], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def load_data(args, world):
    """Train and validation examples; every row checked, and the flags checked against them."""
    try:
        rows = data.load_split(args.dataset, "train")
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from None
    try:
        train, val = data.split_validation(rows, args.val_size, args.seed)
    except data.DataError as e:
        raise SystemExit(f"{e} of {args.dataset}") from None
    return train, val, resolve_defaults(args, train[0].task, world, len(train), len(val))


def setup(args):
    """Everything before the first step: data, the memory plan (before any weights load), the run folder,
    models, the sampler, the optimizer, resume state and the held-out rollouts. None for --plan-only."""
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gpu = device.type == "cuda" or bool(args.plan_only and args.gpu_memory_gb)   # or planning for GPUs
    dtype = pick_dtype(args.dtype, torch.device("cuda" if gpu else "cpu"))
    args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"    # resolved, so that a resume can check it
    auto = lambda flag: flag == "on" or (flag == "auto" and gpu)
    args.grad_checkpointing, args.compile, args.cuda_graphs = map(auto, (args.grad_checkpointing, args.compile,
                                                                          args.cuda_graphs))
    if args.cuda_graphs and device.type != "cuda" and not args.plan_only:
        raise SystemExit("--cuda-graphs on needs a GPU")
    model_path(args.model)  # fail on a wrong path before any work
    train, val, args = load_data(args, world)
    tok = load_tokenizer(args.model)
    prompt_len = round_up(max(len(p) for p in data.prompt_ids(tok, train + val)), args.prompt_bucket)
    shape = model_shape(load_config(args.model))
    runtime_gb = rss_gb()                          # Python, torch, tokenizer and data: measured, not guessed
    args.parallel = choose_layout(shape, args, world, device, prompt_len, runtime_gb)
    if args.plan_only:
        return None
    claim_run_folder(args, master)
    ckpt = find_checkpoint(args.out) if args.resume else None
    resume = json.load(open(os.path.join(ckpt, "resume.json"))) if ckpt else None
    if resume:
        check_resume_config(resume["config"], args)                # before any weights load

    # models: the policy keeps fp32 master weights (at lr 5e-7 a bf16 weight would round the update away);
    # pi_0 is always the STARTING model (also on resume) in the compute dtype, so at step 0 the KL is exactly 0
    lm = load_model(os.path.join(ckpt, "model") if ckpt else args.model, torch.float32,
                    "cpu" if args.parallel == "offload" else device)
    if args.grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap(Scorer(lm, args.logprob_chunk), args.parallel, device, dtype, world)   # sharded before the rest
    with torch.no_grad():  # FSDP2 picks its root on the first forward: make it go through the root
        one = torch.ones(1, 2, dtype=torch.long, device=device)
        model(one, one, one.bool())
    model.reshard()        # the root keeps its parameters whole after a forward: AdamW must get the shards
    ref_lm = load_model(args.model, dtype, device).requires_grad_(False)
    replica = make_replica(ref_lm)
    engine = Engine(replica, stop_token_ids(tok, lm), compile=args.compile, graphs=args.cuda_graphs,
                    prompt_bucket=args.prompt_bucket, row_bucket=args.row_bucket, check_every=args.stop_check_every,
                    attention=args.decode_attention)
    engine.reserve(args.questions_per_rank * args.k, prompt_len + max(args.max_new_tokens, args.eval_max_new_tokens))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    run = SimpleNamespace(args=args, rank=rank, world=world, device=device, master=master, tok=tok, train=train,
                          val=val, model=model, ref=Scorer(ref_lm, args.logprob_chunk), replica=replica,
                          engine=engine, opt=opt, eot=data.end_of_turn(tok), n_params=shape["n"], start=0,
                          best=None, plan=functools.partial(memory_plan, shape, args, world, args.parallel,
                                                            device.type == "cuda", prompt_len, runtime_gb),
                          metrics=os.path.join(args.out, "metrics.jsonl"))
    # held-out self-reward: rationales sampled once from the initial model (the replica still equals pi_0, also
    # after a resume) for a few validation questions; their log pi(y|x+z) is tracked at every evaluation
    held, q = val[:args.heldout_questions], args.questions_per_rank
    rolls = [r for i in range(0, len(held), q)   # as many rows at once as a training rollout: the same KV buffer
             for r in rollout(engine, tok, held[i:i + q], range(i, min(i + q, len(held))), -1, args)]
    run.heldout = [build_batch(p, zs, [answer_ids(tok, e, z, run.eot) for z in zs], tok.pad_token_id)
                   for e, (p, zs, _) in zip(held, rolls)]
    if resume:
        restore(run, ckpt, resume)
    config = dict(vars(args), world=world, task=train[0].task, n_params=shape["n"], n_train=len(train),
                  n_val=len(val))
    print0(json.dumps(config, indent=1))
    if master and not resume:   # a resumed run keeps the config it started with
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    run.config = {k: config[k] for k in RESUME_KEYS}
    return run


def restore(run, ckpt: str, resume: dict):
    """Weights came from the checkpoint folder; now AdamW state, RNGs, the step and the best record."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
    set_optimizer_state_dict(run.model, run.opt, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    refresh_replica(run.replica, run.model)
    run.start, run.best = resume["step"], resume["best"]
    if run.master:  # drop rows logged after the checkpoint was written (and a torn last line)
        rows = read_metrics(run.metrics, run.start)
        with open(run.metrics, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print0(f"resumed from {ckpt} at step {run.start}")


def log(run, rec: dict):
    """One JSON line per step / evaluation; tqdm.write keeps the progress bar intact."""
    if run.master:
        tqdm.write(json.dumps(rec))
        with open(run.metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")


def evaluate_and_keep_best(run, step: int):
    """Validate; OUT/best follows the best accuracy. Ties (common with a small slice or a weak model) go to the
    higher held-out log pi(y|x+z), or without held-out questions to the later step: the trained model."""
    rec = {"step": step, **validate(run)}
    log(run, rec)
    key = [rec["val_accuracy"], rec.get("heldout_logp_y", step)]
    if run.best is None or key > run.best["key"]:
        run.best = {"key": key, "step": step, "val_accuracy": rec["val_accuracy"]}
        save_best(run.model, run.tok, os.path.join(run.args.out, "best"), run.master, rec, run.n_params, run.device)


def save(run, done: int):
    save_checkpoint(os.path.join(run.args.out, "checkpoint"), run.model, run.opt, run.tok,
                    {"step": done, "best": run.best, "config": run.config, "n_params": run.n_params},
                    run.master, run.device)
    run.saved = done


def summary(run, done: int, last: dict, why: str):
    """The last words of a run: how far it got, its final metrics, and where its models are."""
    a = run.args
    print0(f"{why}: {done} of {a.steps} steps")
    if last:
        print0("final: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("reward", "logp_y", "kl", "unfinished",
                                                                     "grad_norm") if k in last))
    if run.best:
        print0(f"best: {os.path.join(a.out, 'best')} (val_accuracy {run.best['val_accuracy']:.4g} at step "
               f"{run.best['step']})")
    saved = getattr(run, "saved", None) or run.start
    print0(f"checkpoint: {os.path.join(a.out, 'checkpoint')} (step {saved}; continue with --resume)" if saved else
           "checkpoint: none written (SIGTERM, --save-every or the last step write one)")


def main(argv=None):
    args = get_args(argv)
    signals = StopSignals()
    run = setup(args)
    if run is None:                                                  # --plan-only
        return close_distributed()
    a, last, bad, why = run.args, {}, 0, "done"
    if a.eval_every and run.val and run.start == 0:
        evaluate_and_keep_best(run, 0)
    bar = tqdm(range(run.start, a.steps), disable=not run.master, desc="latro", initial=run.start, total=a.steps)
    done = run.start
    for step in bar:
        rec = train_step(run, step)                                  # sample, score, update
        log(run, rec)
        done, last = step + 1, rec
        bar.set_postfix(reward=f"{rec['reward']:.2f}", logp_y=f"{rec['logp_y']:.2f}", kl=f"{rec['kl']:.3f}")
        bad = bad + 1 if "skipped" in rec else 0
        if bad >= a.max_bad_steps:
            raise SystemExit(f"{bad} steps in a row (the last: step {done}) had a non-finite loss or gradient norm "
                             f"and made no update; stopping. The last good checkpoint is kept; try a lower --lr")
        if a.eval_every and run.val and (done % a.eval_every == 0 or done == a.steps):
            evaluate_and_keep_best(run, done)
        sig = signals.agreed(run.device)
        if (a.save_every and done % a.save_every == 0) or done in (a.steps, a.stop_after) or sig == signal.SIGTERM:
            save(run, done)
        if sig or done == a.stop_after:
            why = signal.Signals(sig).name if sig else "stopped (--stop-after)"
            break
    bar.close()
    summary(run, done, last, why)
    close_distributed()
    if signals.received:          # the conventional status of a process ended by a signal: 130 / 143
        raise SystemExit(128 + signals.received)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # the second Ctrl-C: no traceback, no half-written folder
        out = get_args().out
        for name in ("checkpoint.tmp", "best.tmp"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        print0(f"\ninterrupted; the last checkpoint in {out} is kept (continue with --resume)")
        raise SystemExit(130)
