"""
tests/teach_diagnosis.py: where a LaTRO run's answer signal comes from, step by step. Prints a table, asserts
nothing. For each run folder (latro.py's --out), by quarter of its steps: `no_signal` (the share of questions
whose K rationales all reached L unfinished: their answer rewards are one shared penalty, so their advantages
are the KL term's alone and they teach nothing about the answer), `unfinished` (the share of rationales that
reached L), the mean rationale length, and the validation accuracy latro.py logged at the end of the quarter.
With --eval, the summary of an eval.py run on each run's model (`{run}` in the path is the run folder's name)
adds its accuracy and paired gain, and for the generated task the same comparison by distinct problem.

    python tests/teach_diagnosis.py runs/teach0 runs/teach1 runs/teach2
    python tests/teach_diagnosis.py runs/t* --eval 'runs/eval/{run}-val.jsonl.summary.json'
"""
import argparse
import json
import math
import os
import re


def quarters(rows: list, key: str) -> list:
    """The mean of `key` over each quarter of the training steps."""
    n = len(rows)
    cuts = [round(i * n / 4) for i in range(5)]
    return [sum(r[key] for r in rows[a:b]) / max(b - a, 1) for a, b in zip(cuts, cuts[1:])]


def by_problem(rows: list, base: list) -> str:
    """The generated task repeats each arithmetic problem under other names and items, so questions are not
    independent: per distinct problem (start, operations), is the model right more often than the base model,
    or less? A two-sided sign test over the problems that differ."""
    score = {}
    for r, b in zip(rows, base):
        key = re.sub(r"[A-Z][a-z]+|[a-z]+s?\b", "", r["prompt"].split("How many")[0])   # the numbers and signs
        key = " ".join(re.findall(r"\d+", key)) + " " + "".join("+" if w == "gets" else "-" for w in re.findall(
            r"gets|gives away", r["prompt"]))
        score[key] = score.get(key, 0) + r["correct"]["official"] - b["correct"]["official"]
    up, down = sum(v > 0 for v in score.values()), sum(v < 0 for v in score.values())
    n, k = up + down, min(up, down)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return f"{up} better / {down} worse of {len(score)} problems, p {p:.2g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="latro.py run folders")
    p.add_argument("--eval", default=None, help="eval.py summary of each run's model; {run} is the folder's name")
    a = p.parse_args(argv)
    print("| run | steps | no_signal by quarter | unfinished by quarter | rationale tokens by quarter | validation "
          "accuracy (steps) | best | held-out log pi(y\\|x+z) | evaluation, paired gain (95%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in a.runs:
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        steps, vals = [r for r in rows if "reward" in r], [r for r in rows if "val_accuracy" in r]
        fmt = lambda xs, d=2: " / ".join(f"{x:.{d}f}" for x in xs)
        best = json.load(open(os.path.join(run, "best", "best.json")))["step"] if os.path.isdir(
            os.path.join(run, "best")) else "-"
        held = [v["heldout_logp_y"] for v in vals if "heldout_logp_y" in v]
        line = (f"| {os.path.basename(os.path.normpath(run))} | {len(steps)} | {fmt(quarters(steps, 'no_signal'))} | "
                f"{fmt(quarters(steps, 'unfinished'))} | {fmt(quarters(steps, 'z_len'), 1)} | "
                + " ".join(f"{100 * v['val_accuracy']:.0f}" for v in vals)
                + f" ({', '.join(str(v['step']) for v in vals)}) | {best} | "
                + (f"{held[0]:.2f} -> {held[-1]:.2f}" if held else "-") + " | ")
        summary = a.eval and a.eval.format(run=os.path.basename(os.path.normpath(run)))
        if summary and os.path.isfile(summary):
            s = json.load(open(summary))
            acc, pair = s["rules"]["official"], s.get("paired", {}).get("official")
            line += f"{100 * acc['accuracy']:.1f}%" + (f", {100 * pair['difference']:+.1f} ({100 * pair['interval95'][0]:+.1f}, "
                                                      f"{100 * pair['interval95'][1]:+.1f})" if pair else "")
            if pair and "arith" in s["dataset"]:   # the generated task: the same comparison, by distinct problem
                rows = [json.loads(x) for x in open(s["rows"])]
                line += "; " + by_problem(rows, [json.loads(x) for x in open(s["paired_with"])])
        print(line + " |")


if __name__ == "__main__":
    main()
