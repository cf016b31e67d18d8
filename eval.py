"""
eval.py: greedy zero-shot GSM8K and ARC-Challenge accuracy, auditable row by row.

What it does: turns each question into prompt ids exactly as training does (data.prompt_ids: the official
prompt, chat template or BOS), decodes greedily (argmax, no sampling) with latro.py's sampling engine until the
end-of-turn token or --max-new-tokens, parses every output with every rule, and prints one summary line per rule.
With --samples k it also decodes k samples at temperature 1 per question and reports maj@k (majority vote over
the parsed answers), as the paper's Table 2 does with k = 8. Every question becomes one JSONL row (prompt,
output, parsed answer and correctness per rule, gold), and the summary is written beside it as JSON; both are
written atomically, and the output path is checked before any decoding starts.

Rules (data.py):
    GSM8K  official  the official code's rule, exactly: first number after the last "The answer is"
                     (case-sensitive), else the last number; float equality
           strict    lm-evaluation-harness strict-match "The answer is (-?[0-9.,]+)."
           flexible  lm-evaluation-harness flexible-extract: the last number-like token
    ARC    official  the official code's rule, exactly: the gold text is contained in the first sentence that
                     holds "the answer is" (after it), else in the last sentence
           exact     the ONE option chosen by letter / exact text / unambiguous whole-token containment
maj@k votes on normalised answers: GSM8K by numeric value, ARC official by the official rule's answer text
(lower-cased, stripped of brackets, quotes and periods), ARC exact by option.

Departures from the official evaluation:
1. Greedy is argmax decoding; the official code samples at temperature 1e-7.
2. maj@k exists here (the official code has none): k samples at T=1 from per-question random streams.
3. Batched with left padding and position ids counted over real tokens, so outputs do not depend on the
   batch size (tests/test_eval.py checks batch 1 against batch 8).

Commands:
    python eval.py --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset gsm8k --limit 100
    python eval.py --model runs/latro/best --dataset ../shared/data/arc_challenge --samples 8
    torchrun --nproc_per_node=8 eval.py --model meta-llama/Llama-3.1-8B-Instruct --dataset gsm8k
"""
import argparse
import hashlib
import json
import os
import re
import time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import latro


def get_args(argv=None):
    p = latro.Parser(description="Greedy zero-shot GSM8K / ARC-Challenge scoring.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="hub name, local model folder, or a latro.py model (OUT/best, "
      "OUT/checkpoint/model)")
    a("--dataset", required=True, help="gsm8k | arc_challenge | hub id | local file or folder of JSONL/parquet")
    a("--split", default="test", help="dataset split")
    a("--limit", type=latro.POSITIVE, default=None, help="score only the first N questions")
    a("--batch-size", type=latro.POSITIVE, default=16, help="questions decoded together per process")
    a("--max-new-tokens", type=latro.POSITIVE, default=500, help="generation limit (paper: 500)")
    a("--samples", type=latro.COUNT, default=0, help="k for maj@k: k samples at T=1 per question (paper: 8); 0 = off")
    a("--seed", type=latro.COUNT, default=0, help="seed of the maj@k samples")
    a("--out", default=None, help="per-question JSONL (the summary goes to OUT.summary.json); default: "
      "runs/eval/<model path>-<dataset>-<split>.jsonl")
    a("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 on GPU, fp32 on CPU")
    a("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the decode step (auto: GPU)")
    a("--cuda-graphs", choices=["auto", "on", "off"], default="auto", help="CUDA-graph the decode step (auto: GPU)")
    a("--decode-attention", choices=["math", "auto"], default="math", help="attention of the decode step (see "
      "latro.py --help)")
    a("--device", default=None, help="override the device (cpu, cuda:0)")
    args = p.parse_args(argv)
    if args.samples == 1:
        p.error("argument --samples: use 0 (off) or k >= 2 for maj@k")
    return args


def default_out(model: str, dataset: str, split: str) -> str:
    """runs/eval/<the model's whole path>-<dataset>-<split>.jsonl, plus a short hash of the absolute paths, so
    that two models (every run's OUT/best) never write the same file."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.normpath(s)).strip("_.") or "model"
    key = hashlib.sha1(f"{os.path.abspath(model)}|{os.path.abspath(dataset)}".encode()).hexdigest()[:8]
    return os.path.join("runs", "eval", f"{slug(model)}-{slug(dataset)}-{split}-{key}.jsonl")


def check_writable(path: str):
    """Fail before the expensive part: make the folder and write (then remove) a probe next to `path`."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write("probe")
        os.remove(path + ".tmp")
    except OSError as e:
        raise SystemExit(f"--out {path!r}: cannot write there ({e.strerror or e}); pass another --out") from None


def write_atomic(path: str, text: str):
    """Write `text` to path.tmp, then rename it over `path`: a reader never sees half a file."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise SystemExit(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------------------
# Rules: name -> (extract(text, ex) -> answer or None, correct(answer, ex) -> bool)

# Every rule is (extract, correct) so that greedy scoring and maj@k voting share one code path: maj@k votes
# over the normalised extracted answers and then asks `correct` of the winner.
RULES = {
    "gsm8k": {
        "official": (lambda t, ex: data.extract_gsm8k(t), lambda v, ex: data.gsm8k_official_equal(v, ex.gold)),
        "strict": (lambda t, ex: data.extract_gsm8k_strict(t), lambda v, ex: data.gsm8k_equal(v, ex.gold)),
        "flexible": (lambda t, ex: data.extract_gsm8k_flexible(t), lambda v, ex: data.gsm8k_equal(v, ex.gold)),
    },
    "arc_challenge": {
        "official": (lambda t, ex: data.arc_official_answer(t), lambda v, ex: data.arc_official_correct(v, ex.gold)),
        "exact": (lambda t, ex: data.extract_arc(t, ex.options), lambda v, ex: v == ex.gold_index),
    },
}


def vote_key(value):
    """What a vote counts as: a number's value ("18" and "18.0" are one vote), else the text with its spacing
    collapsed (the official ARC answer text is already lower-cased and stripped of brackets and periods)."""
    if isinstance(value, str):
        try:
            return float(value.replace(",", ""))
        except ValueError:
            return " ".join(value.split())
    return value


def majority(values: list):
    """The most common parsed answer (None votes do not count; ties go to the earliest), or None."""
    keys = [None if v is None else vote_key(v) for v in values]
    votes = Counter(k for k in keys if k is not None)   # an unparseable sample is an abstention, not a vote
    if not votes:
        return None
    top = max(votes.values())
    # deterministic tie-break: the first sample (in stream order) whose answer has the top count
    return next(v for v, k in zip(values, keys) if k is not None and votes[k] == top)


def judge(ex, outputs: list) -> dict:
    """Parse one question's outputs (greedy first, then samples) with every rule."""
    row = {"parsed": {}, "correct": {}}
    for name, (extract, correct) in RULES[ex.task].items():
        parsed = [extract(o, ex) for o in outputs]
        row["parsed"][name] = parsed[0]          # None marks an unparseable output; it counts as wrong
        row["correct"][name] = bool(correct(parsed[0], ex))
        if len(outputs) > 1:
            vote = majority(parsed[1:])
            row["parsed"][f"{name}_maj"] = vote
            row["correct"][f"{name}_maj"] = bool(correct(vote, ex))
    return row


def summarize(rows: list, task: str, n_samples: int) -> dict:
    """Per rule: correct, n, accuracy, and the number of unparseable outputs."""
    names = list(RULES[task]) + ([f"{r}_maj" for r in RULES[task]] if n_samples else [])
    out = {}
    for name in names:
        ok = sum(r["correct"][name] for r in rows)
        bad = sum(r["parsed"][name] is None for r in rows)   # reported, never hidden in the accuracy
        out[name.replace("_maj", f" maj@{n_samples}")] = {"correct": ok, "n": len(rows),
                                                           "accuracy": ok / max(len(rows), 1), "unparseable": bad}
    return out


# ----------------------------------------------------------------------------------------------------------

def evaluate(engine, tok, examples: list, indices: list, args, show: bool = True) -> list:
    """Rows for the given (index, example) pairs: greedy output, optional samples, parses per rule."""
    rows = []
    for b in tqdm(range(0, len(examples), args.batch_size), disable=not show, desc="eval"):
        exs, idx = examples[b:b + args.batch_size], indices[b:b + args.batch_size]
        prompts = data.prompt_ids(tok, exs)   # the same prompt ids as training
        # greedy: no uniforms (argmax); no `tok`, so generation stops at end-of-turn only, never at the answer
        # template as training rollouts do: the answer after "The answer is" is what we score
        greedy, _ = engine.generate(prompts, args.max_new_tokens)
        samples = [[] for _ in exs]
        if args.samples:
            # maj@k: k samples at T=1 from the question's own stream (keyed by its index, not its batch or rank)
            u = torch.cat([latro.question_uniforms(args.seed, 0, i, args.samples, args.max_new_tokens) for i in idx])
            outs, _ = engine.generate([p for p in prompts for _ in range(args.samples)], args.max_new_tokens, u)
            samples = [outs[j * args.samples:(j + 1) * args.samples] for j in range(len(exs))]
        for e, i, p, g, s in zip(exs, idx, prompts, greedy, samples):
            outputs = [tok.decode(o, skip_special_tokens=True) for o in [g] + s]
            row = {"index": i, "id": e.id, "prompt": tok.decode(p), "output": outputs[0], "gold": e.gold,
                   **judge(e, outputs)}
            if s:
                row["samples"] = outputs[1:]
            rows.append(row)
    return rows


def main(argv=None):
    args = get_args(argv)
    rank, world, device = latro.setup_distributed(args.device)
    dtype = latro.pick_dtype(args.dtype, device)
    auto = lambda flag: flag == "on" or (flag == "auto" and device.type == "cuda")
    if auto(args.cuda_graphs) and device.type != "cuda":
        raise SystemExit("--cuda-graphs on needs a GPU")
    out = args.out or default_out(args.model, args.dataset, args.split)
    latro.model_path(args.model)  # fail on a wrong path before any work
    if rank == 0:
        check_writable(out)
    try:
        examples = data.load_split(args.dataset, args.split)[:args.limit]
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from None
    task = examples[0].task
    tok = latro.load_tokenizer(args.model)
    lm = latro.load_model(args.model, dtype, device)
    engine = latro.Engine(lm, latro.stop_token_ids(tok, lm), compile=auto(args.compile),
                          graphs=auto(args.cuda_graphs), attention=args.decode_attention)

    t0 = time.time()
    mine = list(range(rank, len(examples), world))  # rows strided by rank
    rows = evaluate(engine, tok, [examples[i] for i in mine], mine, args, show=rank == 0)
    if world > 1:  # every rank's rows to every rank (small: text and a few fields per question)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r["index"])  # the file and the summary read the same whatever the world size
    seconds = time.time() - t0

    if rank == 0:
        rules = summarize(rows, task, args.samples)
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
        summary = {"model": args.model, "dataset": args.dataset, "split": args.split, "n": len(rows),
                   "max_new_tokens": args.max_new_tokens, "samples": args.samples, "seconds": seconds,
                   "world": world, "device": device.type, "rows": out, "rules": rules}
        write_atomic(out + ".summary.json", json.dumps(summary, indent=1))
        print(f"model {args.model} | {args.dataset} {args.split} | {len(rows)} questions | greedy, "
              f"{args.max_new_tokens} new tokens | {seconds:.0f} s on {world} x {device.type} | rows: {out}")
        for name, r in rules.items():
            print(f"{task} {name:>18}: {r['correct']}/{r['n']} ({100 * r['accuracy']:.1f}%)  unparseable "
                  f"{r['unparseable']}")
    latro.close_distributed()
    return rows


if __name__ == "__main__":
    main()
