"""
eval.py: greedy zero-shot GSM8K and ARC-Challenge accuracy, auditable row by row.

What it does: renders each question with the same prompt and chat template as training (data.py), decodes
greedily (argmax, no sampling) until the end-of-turn token or --max-new-tokens, parses every output with
every rule, and prints one summary line per rule. With --samples k it also decodes k samples at
temperature 1 per question and reports maj@k (majority vote over the parsed answers), as the paper's
Table 2 does with k = 8. Every question becomes one JSONL row (prompt, output, parsed answer and correctness
per rule, gold) so a reviewer can check any number by hand.

Rules (data.py):
    GSM8K  official  first number after the last "The answer is", else the last number; numeric comparison
           strict    lm-evaluation-harness strict-match "The answer is (-?[0-9.,]+)."
           flexible  lm-evaluation-harness flexible-extract: the last number-like token
    ARC    official  the gold option text is contained in the text after "the answer is"
           exact     the option chosen by letter / exact text / unambiguous whole-token containment

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
import json
import os
import time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import latro


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Greedy zero-shot GSM8K / ARC-Challenge scoring.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="hub name, local model folder, or a latro.py checkpoint (OUT/best)")
    a("--dataset", required=True, help="gsm8k | arc_challenge | hub id | local file or folder of JSONL/parquet")
    a("--split", default="test", help="dataset split")
    a("--limit", type=int, default=None, help="score only the first N questions")
    a("--batch-size", type=int, default=16, help="questions decoded together per process")
    a("--max-new-tokens", type=int, default=500, help="generation limit (paper: 500)")
    a("--samples", type=int, default=0, help="k for maj@k: k samples at T=1 per question (paper: 8); 0 = off")
    a("--seed", type=int, default=0, help="seed of the maj@k samples")
    a("--out", default=None, help="per-question JSONL; default runs/eval/<model>-<dataset>-<split>.jsonl")
    a("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 on GPU, fp32 on CPU")
    a("--sampler", choices=["static", "dynamic"], default="static", help="KV cache of the decode loop")
    a("--device", default=None, help="override the device (cpu, cuda:0)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: must be at least 1")
    if args.samples < 0 or args.samples == 1:
        p.error(f"--samples {args.samples}: use 0 (off) or k >= 2 for maj@k")
    return args


# ----------------------------------------------------------------------------------------------------------
# Rules: name -> (extract(text, ex) -> hashable answer or None, correct(answer, ex) -> bool)

def _num_key(v):
    """GSM8K answers vote by numeric value ("18" and "18.0" are one vote)."""
    # a parser returns strings like "18", "18.0" or "1000"; anything float() rejects votes as itself
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# Every rule is (extract, correct) so that greedy scoring and maj@k voting share one code path: maj@k votes
# over the extracted answers and then asks `correct` of the winner. The ARC official rule extracts the text
# after "the answer is" and checks containment of the gold text, exactly the official code's test.
RULES = {
    "gsm8k": {
        "official": (lambda t, ex: data.extract_gsm8k(t), lambda v, ex: data.gsm8k_equal(v, ex.gold)),
        "strict": (lambda t, ex: data.extract_gsm8k_strict(t), lambda v, ex: data.gsm8k_equal(v, ex.gold)),
        "flexible": (lambda t, ex: data.extract_gsm8k_flexible(t), lambda v, ex: data.gsm8k_equal(v, ex.gold)),
    },
    "arc_challenge": {
        "official": (lambda t, ex: data.answer_segment(t),
                     lambda v, ex: v is not None and data.arc_official_correct("the answer is " + v, ex.gold)),
        "exact": (lambda t, ex: data.extract_arc(t, ex.options), lambda v, ex: v == ex.gold_index),
    },
}


def majority(values: list, task: str):
    """The most common parsed answer (None votes do not count; ties go to the earliest), or None."""
    keys = [_num_key(v) if task == "gsm8k" else v for v in values]
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
            vote = majority(parsed[1:], ex.task)
            row["parsed"][f"{name}_maj"] = vote
            row["correct"][f"{name}_maj"] = bool(correct(vote, ex))
    return row


def summarize(rows: list, task: str, n_samples: int) -> list:
    """One line per rule: accuracy with counts, and the number of unparseable outputs."""
    lines, n = [], len(rows)
    names = list(RULES[task]) + ([f"{r}_maj" for r in RULES[task]] if n_samples else [])
    for name in names:
        ok = sum(r["correct"][name] for r in rows)
        bad = sum(r["parsed"][name] is None for r in rows)   # reported, never hidden in the accuracy
        label = name.replace("_maj", f" maj@{n_samples}")
        lines.append(f"{task} {label:>18}: {ok}/{n} ({100 * ok / max(n, 1):.1f}%)  unparseable {bad}")
    return lines


# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(lm, tok, examples: list, indices: list, args, show: bool = True) -> list:
    """Rows for the given (index, example) pairs: greedy output, optional samples, parses per rule."""
    stop = latro.stop_token_ids(tok, lm)
    rows = []
    for b in tqdm(range(0, len(examples), args.batch_size), disable=not show, desc="eval"):
        exs, idx = examples[b:b + args.batch_size], indices[b:b + args.batch_size]
        # the same prompt as training: chat template + "Let's think step by step.", zero-shot
        texts = [data.render_prompt(tok, e) for e in exs]
        # the template already holds any BOS token: encoding must not add a second one
        prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
        # greedy: no uniforms (argmax); no `tok`, so generation stops at end-of-turn only, never at the
        # answer template as training rollouts do: the answer after "The answer is" is what we score
        greedy, _ = latro.generate(lm, prompts, args.max_new_tokens, tok.pad_token_id, stop, sampler=args.sampler)
        samples = [[] for _ in exs]
        if args.samples:
            # maj@k: k samples at T=1 from the question's own stream (keyed by its index, not its batch or rank)
            u = torch.cat([latro.question_uniforms(args.seed, 0, i, args.samples, args.max_new_tokens) for i in idx])
            outs, _ = latro.generate(lm, [p for p in prompts for _ in range(args.samples)], args.max_new_tokens,
                                     tok.pad_token_id, stop, uniforms=u, sampler=args.sampler)
            samples = [outs[j * args.samples:(j + 1) * args.samples] for j in range(len(exs))]
        for e, i, text, g, s in zip(exs, idx, texts, greedy, samples):
            outputs = [tok.decode(o, skip_special_tokens=True) for o in [g] + s]
            row = {"index": i, "id": e.id, "prompt": text, "output": outputs[0], "gold": e.gold, **judge(e, outputs)}
            if s:
                row["samples"] = outputs[1:]
            rows.append(row)
    return rows


def main(argv=None):
    args = get_args(argv)
    rank, world, device = latro.setup_distributed(args.device)
    dtype = latro.pick_dtype(args.dtype, device)

    latro.model_path(args.model)  # fail on a wrong path before any work
    try:
        examples = data.load_split(args.dataset, args.split)
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from e
    examples = examples[:args.limit]
    task = examples[0].task
    tok = latro.load_tokenizer(args.model)
    lm = latro.load_model(args.model, dtype, device)

    t0 = time.time()
    mine = list(range(rank, len(examples), world))  # rows strided by rank
    rows = evaluate(lm, tok, [examples[i] for i in mine], mine, args, show=rank == 0)
    if world > 1:  # every rank's rows to every rank (small: text and a few fields per question)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r["index"])  # the file and the summary read the same whatever the world size
    seconds = time.time() - t0

    if rank == 0:
        name = os.path.basename(os.path.normpath(args.model))
        ds = os.path.basename(os.path.normpath(args.dataset))
        out = args.out or os.path.join("runs", "eval", f"{name}-{ds}-{args.split}.jsonl")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"model {args.model} | {args.dataset} {args.split} | {len(rows)} questions | greedy, "
              f"{args.max_new_tokens} new tokens | {seconds:.0f} s on {world} x {device.type} | rows: {out}")
        for line in summarize(rows, task, args.samples):
            print(line)
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
