"""The README's quick start is true: its command runs, some rationales finish, the REINFORCE term acts, and the
metric lines it quotes are what the code prints now. Step 1 and the step-0 evaluation do not depend on --steps,
so one step of the command reproduces them (about a minute on 2 cores)."""
import json
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script


def quickstart_argv(readme: str) -> list:
    line = next(l for l in readme.splitlines() if "latro.py --model" in l and "runs/quickstart" in l)
    return shlex.split(line.split("latro.py", 1)[1])


def quoted(readme: str) -> list:
    """The metric lines the README quotes from runs/quickstart/metrics.jsonl."""
    block = readme.split("`runs/quickstart/metrics.jsonl`", 1)[1].split("```", 2)[1]
    return [l for l in block.splitlines() if l.startswith("{")]


@pytest.mark.slow
def test_readme_quickstart_is_what_the_code_prints(smollm_dir, shared_data, tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    argv = quickstart_argv(readme)
    argv[argv.index("--model") + 1] = smollm_dir
    argv[argv.index("--dataset") + 1] = os.path.join(shared_data, "gsm8k")
    argv[argv.index("--out") + 1] = str(tmp_path / "qs")
    argv[argv.index("--steps") + 1] = "1"
    p = run_script("latro.py", argv, timeout=1200, one_thread=False)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "qs" / "metrics.jsonl")]
    step1 = next(r for r in rows if r.get("step") == 1 and "reward" in r)
    assert step1["unfinished"] < 1 and step1["advantage_abs"] > 1     # rationales finish; REINFORCE acts
    lines = quoted(readme)
    for want in lines[:2]:   # the step-0 evaluation and step 1, as quoted (rounded, some fields left out)
        numbers = dict(re.findall(r'"(\w+)": (-?[\d.e-]+)', want))
        got = next(r for r in rows if r["step"] == int(numbers["step"]) and set(numbers) <= set(r))
        for key, value in numbers.items():   # to the digits quoted: "-30.52" means within 0.005
            tol = 0.5 * 10 ** -len(value.split(".")[1]) if "." in value and "e" not in value else 1e-3 * abs(float(value))
            assert abs(got[key] - float(value)) <= tol + 1e-12, (key, got[key], value)
