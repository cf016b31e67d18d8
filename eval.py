"""
eval.py: greedy zero-shot GSM8K and ARC-Challenge accuracy, auditable row by row.

What it does: turns each question into prompt ids exactly as training does (data.prompt_ids: the official
prompt, chat template or BOS), decodes greedily (argmax, no sampling) with latro.py's sampling engine until the
end-of-turn token or --max-new-tokens, parses every output with every rule, and prints one summary line per rule
with a 95% interval. With --samples k it also decodes k samples at temperature 1 per question and reports maj@k
(majority vote over the parsed answers), as the paper's Table 2 does with k = 8. With --paired-with it compares
this model, question by question, with an earlier evaluation of another model on the same questions.

How to read it: RULES names every parse rule; `judge` applies them to one question; `summarize` and `paired`
turn rows into figures; `evaluate` decodes and appends rows as it goes; `main` loads, continues, and writes.

Rules (data.py has them): GSM8K official (the official code's: first number after the last "The answer is",
else the last number), strict and flexible (lm-evaluation-harness); ARC official (the official code's
containment) and exact (the ONE option chosen). maj@k votes on normalised answers: numbers by value, ARC
official by the rule's answer text, ARC exact by option.

Output: OUT (one JSON row per question: prompt, output, finished, tokens, parsed answer and correctness per rule,
gold) and OUT.summary.json. Rows are appended to OUT.part<rank> as each batch finishes; an evaluation that was
killed or interrupted continues when run again with the same flags, and ends with the same OUT and summary.
Intervals: Wilson 95% for an accuracy; for a paired difference, the Wald interval of the difference of paired
proportions, and McNemar's exact two-sided p on the questions where the two models disagree.

Departures from the official evaluation:
1. Greedy is argmax decoding; the official code samples at temperature 1e-7.
2. maj@k exists here (the official code has none): k samples at T=1 from per-question random streams.
3. Batched with left padding and position ids counted over real tokens, so outputs do not depend on the
   batch size (tests/test_eval.py checks batch 1 against batch 8).

Commands:
    python eval.py --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset gsm8k --limit 100
    python eval.py --model runs/latro/best --dataset ../shared/data/arc_challenge --samples 8
    python eval.py --model runs/latro/best --dataset arith --paired-with runs/eval/base.jsonl
    torchrun --nproc_per_node=8 eval.py --model meta-llama/Llama-3.1-8B-Instruct --dataset gsm8k
"""
import fcntl, glob, hashlib, json, math, os, re, signal, time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import latro

ROW_FLAGS = ("model", "dataset", "split", "limit", "max_new_tokens", "samples", "seed", "dtype")  # decide the rows

def get_args(argv=None):
    p = latro.Parser(description="Greedy zero-shot GSM8K / ARC-Challenge scoring.")
    a = p.add_argument
    a("--model", required=True, help="hub name, local folder, or a latro.py model (OUT/best, OUT/checkpoint/model)")
    a("--dataset", required=True, help="gsm8k | arc_challenge | arith[:SEED] | hub id | local file or folder")
    a("--split", default="test", help="dataset split")
    a("--limit", type=latro.POSITIVE, default=None, help="score only the first N questions")
    a("--batch-size", type=latro.POSITIVE, default=16, help="questions decoded together per process")
    a("--max-new-tokens", type=latro.POSITIVE, default=500, help="generation limit (paper: 500)")
    a("--samples", type=latro.COUNT, default=0, help="k for maj@k: k samples at T=1 per question (paper: 8); 0 = off")
    a("--seed", type=latro.SEED, default=0, help="seed of the maj@k samples")
    a("--out", default=None, help="per-question JSONL, the summary in OUT.summary.json; default: under runs/eval/")
    a("--paired-with", default=None, help="another model's OUT, same questions: difference, 95%% interval, McNemar p")
    a("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 on GPU, fp32 on CPU")
    a("--compile", **latro.ONOFF, help="torch.compile the decode step (auto: GPU)")
    a("--cuda-graphs", **latro.ONOFF, help="CUDA-graph the decode step (auto: GPU)")
    a("--device", default=None, help="override the device (cpu, cuda:0)")
    args = p.parse_args(argv)
    p.error("argument --samples: use 0 (off) or k >= 2 for maj@k") if args.samples == 1 else None
    return args

def default_out(model: str, dataset: str, split: str, flags: dict = None) -> str:
    """runs/eval/<the model's whole path>-<dataset>-<split>.jsonl, plus a short hash of the absolute paths and the
    flags that decide the rows, so that two models (every run's OUT/best), or two --limit, never share a file."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.normpath(s)).strip("_.") or "model"
    key = hashlib.sha1(f"{os.path.abspath(model)}|{os.path.abspath(dataset)}|{flags}".encode()).hexdigest()[:8]
    return os.path.join("runs", "eval", f"{slug(model)}-{slug(dataset)}-{split}-{key}.jsonl")

def claim_out(path: str, flags: dict):
    """Fail before the expensive part: make the folder, write (then remove) a probe next to `path`, and hold
    path.lock (flock, released when this process ends) so that two evaluations never append to one OUT. An OUT
    that is not eval.py's, or holds an evaluation under other flags (its summary says), is never written over."""
    try:
        if os.path.isdir(path) or os.path.isfile(path) and open(path, errors="replace").read(8) not in ("", '{"index"'):
            raise FileExistsError(17, "it is a folder" if os.path.isdir(path) else "it is not eval.py's rows")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path + ".probe", "w").close(), os.remove(path + ".probe")
        [f.close() for f in latro.LOCKS if f.name == path + ".lock"]   # this process's, from an earlier call
        latro.LOCKS.append(open(path + ".lock", "a"))
        fcntl.flock(latro.LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        old = json.load(open(path + ".summary.json")) if os.path.isfile(path + ".summary.json") else {}
        if isinstance(old, dict) and old.get("flags", flags) != flags:   # hours of rows, not lost to a typo
            return f"--out {path!r} holds an evaluation with other flags (its .summary.json): pass another --out"
    except BlockingIOError:
        return f"--out {path!r} is in use by another evaluation: wait for it or pass another --out"
    except (OSError, ValueError) as e:
        return f"--out {path!r}: cannot write there ({e.strerror or e}); pass another --out"

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
    top = max(votes.values(), default=0)
    return next((v for v, k in zip(values, keys) if k is not None and votes[k] == top), None)

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

# ----------------------------------------------------------------------------------------------------------
# Figures: accuracy with its interval, and the paired comparison of two models

def wilson(k: int, n: int, z: float = 1.96) -> list:
    """The Wilson score 95% interval of k successes in n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]

def summarize(rows: list, task: str, n_samples: int) -> dict:
    """Per rule: correct, n, accuracy, its 95% interval, and the number of unparseable outputs."""
    names = list(RULES[task]) + ([f"{r}_maj" for r in RULES[task]] if n_samples else [])
    out = {}
    for name in names:
        ok = sum(r["correct"][name] for r in rows)
        bad = sum(r["parsed"][name] is None for r in rows)   # reported, never hidden in the accuracy
        out[name.replace("_maj", f" maj@{n_samples}")] = {"correct": ok, "n": len(rows), "accuracy": ok / max(
            len(rows), 1), "interval95": wilson(ok, len(rows)), "unparseable": bad}
    return out

def paired(rows: list, base: list, task: str) -> dict:
    """Per greedy rule: this model minus the other on the same questions, the 95% interval of that difference,
    and McNemar's exact two-sided p (a binomial test on the b + c questions where exactly one is right)."""
    other = {r["index"]: r for r in base}
    if sorted(other) != [r["index"] for r in rows]:
        raise SystemExit("--paired-with: its rows are not the same questions as this evaluation's")
    out = {}
    for name in RULES[task]:
        b = sum(other[r["index"]]["correct"][name] and not r["correct"][name] for r in rows)   # lost
        c = sum(r["correct"][name] and not other[r["index"]]["correct"][name] for r in rows)   # gained
        n, d = len(rows), (c - b) / len(rows)
        se = math.sqrt(max(b + c - (c - b) ** 2 / n, 0)) / n
        p = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)) if b + c else 1.0
        out[name] = {"difference": d, "interval95": [d - 1.96 * se, d + 1.96 * se], "gained": c, "lost": b,
                     "mcnemar_p": p}
    return out

# ----------------------------------------------------------------------------------------------------------
# Decoding (rows appended as they come), continuing an interrupted evaluation, and the report

def evaluate(engine, tok, examples: list, indices: list, args, part, bar) -> list:
    """Rows for the given (index, example) pairs, appended to `part` (flushed) as each batch finishes."""
    rows = []
    for b in range(0, len(examples), args.batch_size):
        exs, idx = examples[b:b + args.batch_size], indices[b:b + args.batch_size]
        prompts = data.prompt_ids(tok, exs)   # the same prompt ids as training
        # greedy: no uniforms (argmax); no `tok`, so generation stops at end-of-turn only, never at the answer
        # template as training rollouts do: the answer after "The answer is" is what we score
        greedy, finished = engine.generate(prompts, args.max_new_tokens)
        samples = [[] for _ in exs]
        if args.samples:
            # maj@k: k samples at T=1 from the question's own stream (keyed by its index, not its batch or rank)
            u = torch.cat([latro.question_uniforms(args.seed, 0, i, args.samples, args.max_new_tokens) for i in idx])
            outs, _ = engine.generate([p for p in prompts for _ in range(args.samples)], args.max_new_tokens, u)
            samples = [outs[j * args.samples:(j + 1) * args.samples] for j in range(len(exs))]
        for e, i, p, g, f, s in zip(exs, idx, prompts, greedy, finished, samples):
            outputs = [tok.decode(o, skip_special_tokens=True) for o in [g] + s]
            row = {"index": i, "id": e.id, "prompt": tok.decode(p), "output": outputs[0], "finished": f,
                   "tokens": len(g), "gold": e.gold, **judge(e, outputs)}
            rows.append(row | ({"samples": outputs[1:]} if s else {}))
        part.write("".join(json.dumps(r) + "\n" for r in rows[-len(exs):])), part.flush()   # on disk at once
        bar.update(len(exs) * dist.get_world_size())
    return rows

def rows_so_far(out: str, flags: dict) -> dict:
    """{index: row} already in OUT.part* from an earlier, interrupted run with the same flags."""
    done = {}
    for path in sorted(glob.glob(glob.escape(out) + ".part*")):
        lines = open(path, errors="replace").read().splitlines()
        if len(lines) > 1 and lines[0] != json.dumps({"flags": flags}):   # (a lone header holds no rows)
            raise SystemExit(f"{path}: an unfinished evaluation with other flags: delete {out}.part* or another --out")
        for line in lines[1:]:
            try:
                row = json.loads(line)
                done[row["index"]] = row
            except (ValueError, KeyError, TypeError):   # a line a kill cut short: that question is decoded again
                pass
    return done

def report(args, flags: dict, rows: list, base: list, task: str, out: str, seconds: float, world: int,
           device) -> dict:
    """OUT and OUT.summary.json, written atomically, and one line per rule (and per paired comparison)."""
    summary = {"model": args.model, "dataset": args.dataset, "split": args.split, "n": len(rows),
               "max_new_tokens": args.max_new_tokens, "samples": args.samples, "seconds": seconds, "world": world,
               "flags": flags,
               "device": device.type, "rows": out, "unfinished": sum(not r["finished"] for r in rows) / len(rows),
               "mean_tokens": sum(r["tokens"] for r in rows) / len(rows), "rules": summarize(rows, task, args.samples)}
    if base is not None:
        summary |= {"paired_with": args.paired_with, "paired": paired(rows, base, task)}
    if all(not r["output"].strip() for r in rows):
        summary["warning"] = "every output is empty: the model writes nothing (a damaged model, or a wrong template)"
    latro.write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    latro.write_atomic(out + ".summary.json", json.dumps(summary, indent=1))
    print(f"model {args.model} | {args.dataset} {args.split} | {len(rows)} questions | greedy, "
          f"{args.max_new_tokens} new tokens | unfinished {summary['unfinished']:.3f}, mean length "
          f"{summary['mean_tokens']:.1f} tokens | {seconds:.0f} s on {world} x {device.type} | rows: {out}")
    for name, r in summary["rules"].items():
        lo, hi = r["interval95"]
        print(f"{task} {name:>18}: {r['correct']}/{r['n']} ({100 * r['accuracy']:.1f}%, 95% {100 * lo:.1f}-"
              f"{100 * hi:.1f})  unparseable {r['unparseable']}")
    for name, r in summary.get("paired", {}).items():
        lo, hi = r["interval95"]
        print(f"{task} {name:>9} vs paired: {100 * r['difference']:+.1f} points (95% {100 * lo:+.1f} to "
              f"{100 * hi:+.1f}), gained {r['gained']}, lost {r['lost']}, McNemar p {r['mcnemar_p']:.3g}")
    print(f"WARNING: {summary['warning']}") if "warning" in summary else None
    return summary

class Stopped(BaseException):   # as KeyboardInterrupt: no `except Exception` on the way may swallow it
    """SIGINT or SIGTERM: the rows of every finished batch are kept; the same command continues."""

def on_signal(signum, frame):
    raise Stopped(signum)

def main(argv=None):
    args = get_args(argv)
    latro.quiet_transformers()
    rank, world, device = latro.setup_distributed(args.device)
    dtype = latro.pick_dtype(args.dtype, device)
    args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    auto = lambda flag: flag == "on" or (flag == "auto" and device.type == "cuda")
    if auto(args.cuda_graphs) and device.type != "cuda":
        raise SystemExit("--cuda-graphs on needs a GPU")
    flags = {k: getattr(args, k) for k in ROW_FLAGS}   # the flags that decide the rows
    out = args.out or default_out(args.model, args.dataset, args.split, flags)
    cfg = latro.load_config(args.model)   # fails on a wrong path before any work
    try:
        examples = data.load_split(args.dataset, args.split)[:args.limit]
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from None
    tok = latro.load_tokenizer(args.model, getattr(cfg, "vocab_size", None))
    prompts = data.prompt_ids(tok, examples)
    latro.check_lengths(tok, examples, [len(p) for p in prompts], args.max_new_tokens, latro.context_length(cfg),
                        answer=False)
    done, base = rows_so_far(out, flags), None
    try:   # the other model's rows, read now: a bad file must not cost the decoding
        base = [json.loads(l) for l in open(args.paired_with)] if args.paired_with else None
        assert base is None or all(set(RULES[examples[0].task]) <= set(r["correct"]) for r in base), "another task"
        golds = [(i, e.gold) for i, e in enumerate(examples)]   # the same questions: same positions, same answers
        assert base is None or sorted((r["index"], r["gold"]) for r in base) == golds, "other questions"
        assert not (base and os.path.exists(out) and os.path.samefile(args.paired_with, out)), "it is --out too"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:   # (--out would be written over)
        raise SystemExit(f"--paired-with {args.paired_with!r}: cannot be compared with these rows ({e})") from None
    latro.rank0_verdict(claim_out(out, flags) if rank == 0 else None)   # every rank stops if rank 0 cannot write
    lm = latro.load_plain(cfg, latro.read_on_rank0(args.model, rank == 0), dtype, device)
    engine = latro.Engine(lm, latro.stop_token_ids(tok, args.model), auto(args.compile), auto(args.cuda_graphs))
    mine = [i for i in range(len(examples)) if i not in done][rank::world]   # the rows left, strided by rank
    t0, part_path, signals = time.time(), f"{out}.part{rank}", (signal.SIGINT, signal.SIGTERM)
    handlers = [signal.signal(s, on_signal) for s in signals]   # the caller's, back once the rows are on disk
    header = json.dumps({"flags": flags}) + "\n"   # (a part file's bytes that are not text are not a row)
    text = open(part_path, errors="replace").read() if os.path.exists(part_path) else ""
    text = text if text.startswith(header) else ""   # no rows yet (or a header cut short): start it again
    with open(part_path, "a" if text else "w") as part, tqdm(total=len(examples), initial=len(done), desc="eval",
                                                             unit="q", disable=rank != 0) as bar:
        try:
            part.write(header if not text else "" if text.endswith("\n") else "\n")   # a cut row gets its end
            evaluate(engine, tok, [examples[i] for i in mine], mine, args, part, bar)
        except Stopped as s:
            bar.close()
            print(f"\n{signal.Signals(s.args[0]).name}: stopped; the rows of finished batches are in {part_path}: "
                  f"run the same command to continue", flush=True)
            raise SystemExit(128 + s.args[0]) from None
        except OSError as e:   # a full disk: every finished batch is on disk, and the same command continues
            raise SystemExit(f"cannot append to {part_path} ({e.strerror}); the rows so far are kept") from None
        finally:
            [signal.signal(s, h) for s, h in zip(signals, handlers)]
    latro.close_distributed()   # every rank's part file is complete
    if rank == 0:
        rows = sorted(rows_so_far(out, flags).values(), key=lambda r: r["index"])
        report(args, flags, rows, base, examples[0].task, out, time.time() - t0, world, device)
        [os.remove(path) for path in glob.glob(glob.escape(out) + ".part*") + [out + ".lock"]]
        return rows

if __name__ == "__main__":
    latro.exit_cleanly(main, "lower --batch-size (--samples multiplies it); the rows so far are kept, and the "
                             "same command with a smaller --batch-size continues")
