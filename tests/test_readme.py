"""The README's commands are what the code runs, and its claims hold: the quick start's REINFORCE term acts and its
held-out curve rises; the teaching run's commands run (shortened: a few steps, a few questions) and eval.py's
summary has every field the README reports. Claims, not digits: float kernels differ between CPUs, and sampling
turns those differences into other tokens, so the README quotes rounded figures with the spread it saw."""
import json
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script

README = open(os.path.join(ROOT, "README.md")).read()


def command(marker: str, without: str = "\0") -> list:
    """(script, argv after the script name) of the README command line holding `marker` (and not `without`)."""
    line = next(l for l in README.splitlines() if marker in l and without not in l and ("latro.py" in l or "eval.py" in l))
    script = "latro.py" if "latro.py --model" in line else "eval.py"
    return script, shlex.split(line.split(script, 1)[1].split("#")[0])


def with_flags(argv: list, **flags) -> list:
    """argv with each --flag's value replaced (or the flag added)."""
    argv = list(argv)
    for flag, value in flags.items():
        name = "--" + flag.replace("_", "-")
        if name in argv:
            argv[argv.index(name) + 1] = str(value)
        else:
            argv += [name, str(value)]
    return argv


@pytest.mark.long
@pytest.mark.slow
def test_quickstart_reinforce_acts_and_the_heldout_curve_rises(smollm_dir, shared_data, tmp_path):
    script, argv = command("runs/quickstart")
    argv = with_flags(argv, model=smollm_dir, dataset=os.path.join(shared_data, "gsm8k"), out=tmp_path / "qs", steps=2)
    p = run_script(script, argv, timeout=7200, one_thread=False)   # a hang guard, not a speed target
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "qs" / "metrics.jsonl")]
    step1 = next(r for r in rows if r.get("step") == 1 and "reward" in r)
    assert step1["unfinished"] < 1 and step1["advantage_abs"] > 1     # rationales finish; REINFORCE acts
    held = [r["heldout_logp_y"] for r in rows if "heldout_logp_y" in r]
    assert len(held) == 2 and held[1] > held[0]                       # the held-out self-reward rises
    assert "step    1 | reward" in p.stdout and "done: 2 of 2 steps" in p.stdout


@pytest.mark.long
@pytest.mark.slow
def test_teaching_run_commands_and_summary_fields(smollm_dir, tmp_path):
    """The README's teaching run, shortened: 2 training steps, 8 test questions, 16 new tokens."""
    script, train = command("runs/teach")
    assert script == "latro.py"
    train = with_flags(train, model=smollm_dir, out=tmp_path / "teach", seed=0, steps=2, val_size=8, eval_every=2,
                       max_new_tokens=16, eval_max_new_tokens=16)
    p = run_script("latro.py", train, timeout=7200, one_thread=False)
    assert p.returncode == 0, p.stderr[-3000:]
    _, base = command("--out runs/eval/base.jsonl", without="--paired-with")
    _, trained = command("--paired-with runs/eval/base.jsonl")
    shrink = dict(limit=8, max_new_tokens=16)
    base = with_flags(base, model=smollm_dir, out=tmp_path / "base.jsonl", **shrink)
    assert keep_rule(tmp_path / "teach" / "metrics.jsonl") in (0, 1)   # the loop's rule reads a real run's metrics
    assert trained[trained.index("--model") + 1] == "runs/teach$S/best"
    trained = with_flags(trained, model=tmp_path / "teach" / "best", out=tmp_path / "trained.jsonl",
                         paired_with=tmp_path / "base.jsonl", **shrink)
    for argv in (base, trained):
        q = run_script("eval.py", argv, timeout=7200, one_thread=False)
        assert q.returncode == 0, q.stderr[-3000:]
    summary = json.load(open(tmp_path / "trained.jsonl.summary.json"))
    assert {"n", "unfinished", "mean_tokens", "rules", "paired"} <= set(summary) and summary["n"] == 8
    for rule in ("official", "strict", "flexible"):
        assert {"accuracy", "interval95", "unparseable"} <= set(summary["rules"][rule])
        assert {"difference", "interval95", "gained", "lost", "mcnemar_p"} <= set(summary["paired"][rule])
    for field in ("interval95", "mcnemar_p", "unfinished", "mean_tokens"):   # the README names what it reports
        assert field in README


def keep_rule(metrics) -> int:
    """Exit status of the teaching loop's rule on a metrics.jsonl: 0 keeps the run, 1 trains again."""
    import subprocess
    import sys
    line = next(l for l in README.splitlines() if "python -c" in l and "runs/teach$S/metrics.jsonl" in l)
    code = shlex.split(line.split("&&")[0])[-1].replace("runs/teach$S/metrics.jsonl", str(metrics))
    return subprocess.run([sys.executable, "-c", code]).returncode


@pytest.mark.parametrize("slices, status", [([0.17, 0.21], 1), ([0.17, 0.22], 0), ([0.2, 0.1], 1), ([0.1], 1)])
def test_teaching_loop_keeps_a_run_only_if_its_slice_rose_5_points(slices, status, tmp_path):
    rows = [{"step": 1, "reward": -30.0}] + [{"step": 90 * i, "val_accuracy": v} for i, v in enumerate(slices)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert keep_rule(tmp_path / "metrics.jsonl") == status


def test_no_unfilled_template_fields():
    """Figures are filled into the README by hand or by script: a `{NAME}` left behind is a figure never written."""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)   # code blocks may hold braces
    assert not re.findall(r"\{[A-Z][A-Z0-9_]{2,}\}", prose)
