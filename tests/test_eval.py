"""eval.py: batch-size independence, 1 vs 2 processes, maj@k voting on normalised answers, per-rule summary and
rows written atomically to a path that cannot collide, and the errors that come before any decoding."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import eval as ev
from conftest import ROOT, run_script



@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """GSM8K- and ARC-shaped test files made up here."""
    root = tmp_path_factory.mktemp("evalsets")
    with open(root / "gsm.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"question": f"What is {i} times {i + 2}?", "answer": f"#### {i * (i + 2)}"}) + "\n")
    with open(root / "arc.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"toy_{i}", "question": f"Which number is {i}?", "answerKey": "ABCD"[i % 4],
                                "choices": {"text": [str(i), str(i + 1), str(i + 2), str(i + 3)][::1],
                                            "label": ["A", "B", "C", "D"]}}) + "\n")
    return root


def run_cli(argv, nproc=1):
    return run_script("eval.py", argv, nproc)


def rows_of(path):
    return [json.loads(l) for l in open(path)]


def test_batch_size_does_not_change_outputs(tiny_dir, toy_sets, tmp_path):
    outs = []
    for bs in (1, 8):
        ev.main(["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--batch-size",
                 str(bs), "--max-new-tokens", "24", "--out", str(tmp_path / f"b{bs}.jsonl")])
        outs.append([r["output"] for r in rows_of(tmp_path / f"b{bs}.jsonl")])
    assert outs[0] == outs[1] and len(outs[0]) == 10


@pytest.mark.long
@pytest.mark.slow
def test_batch_size_does_not_change_outputs_smollm(smollm_dir, shared_data, tmp_path):
    outs = []
    for bs in (1, 8):
        ev.main(["--model", smollm_dir, "--dataset", os.path.join(shared_data, "gsm8k"), "--limit", "8",
                 "--batch-size", str(bs), "--max-new-tokens", "32", "--out", str(tmp_path / f"b{bs}.jsonl")])
        outs.append([r["output"] for r in rows_of(tmp_path / f"b{bs}.jsonl")])
    assert outs[0] == outs[1]
    assert all(len(o) > 20 for o in outs[0])  # a real model writes text


@pytest.mark.long
@pytest.mark.slow
def test_one_and_two_processes_agree(tiny_dir, toy_sets, tmp_path):
    argv = ["--model", tiny_dir, "--dataset", str(toy_sets / "arc.jsonl"), "--split", "train", "--max-new-tokens",
            "16", "--samples", "3", "--batch-size", "2"]
    p1 = run_cli(argv + ["--out", str(tmp_path / "one.jsonl")])
    p2 = run_cli(argv + ["--out", str(tmp_path / "two.jsonl")], nproc=2)
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-2000:] + p2.stderr[-2000:]
    summary = lambda p: [l for l in p.stdout.splitlines() if l.startswith("arc_challenge")]
    assert summary(p1) == summary(p2) and len(summary(p1)) == 4   # official, exact, and their maj@3
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]
    assert strip(rows_of(tmp_path / "one.jsonl")) == strip(rows_of(tmp_path / "two.jsonl"))


def test_rows_and_summary(tiny_dir, toy_sets, tmp_path, capsys):
    rows = ev.main(["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--limit",
                    "3", "--max-new-tokens", "8", "--samples", "2", "--out", str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    for rule in ("official", "strict", "flexible", "official maj@2"):
        assert f"gsm8k {rule:>18}: " in out
    assert len(rows) == 3
    r = rows_of(tmp_path / "r.jsonl")[0]
    assert {"index", "id", "prompt", "output", "parsed", "correct", "gold", "samples"} <= set(r)
    assert r["prompt"].startswith("<|im_start|>user\nWhat is 0 times 2? Let's think step by step.")
    assert set(r["correct"]) == {"official", "strict", "flexible", "official_maj", "strict_maj", "flexible_maj"}


def test_judge_and_majority():
    ex = data.Example("gsm8k", "a", "q", "18")
    row = ev.judge(ex, ["The answer is 18.", "The answer is 18.0", "so 7", "The answer is $18.", "nothing"])
    assert row["correct"] == {"official": True, "official_maj": True, "strict": True, "strict_maj": True,
                              "flexible": True, "flexible_maj": True}
    assert ev.majority(["18", "18.0", "7", None, None, None]) == "18"   # one value, one vote; None never wins
    assert ev.majority(["7", "18", "18", "7"]) == "7"                   # ties: earliest
    assert ev.majority([None, None]) is None
    arc = data.Example("arc_challenge", "x", "q", "15", ["5", "15", "25", "35"], list("ABCD"), 1)
    assert ev.judge(arc, ["The answer is 15."])["correct"] == {"official": True, "exact": True}
    # the containment rule is fooled, the exact rule is not
    assert ev.judge(arc, ["The answer is 5 or 15."])["correct"] == {"official": True, "exact": False}


def test_maj_votes_on_normalised_answers():
    """Three spellings of one answer are three votes for it, not three answers of one vote each."""
    ex = data.Example("arc_challenge", "x", "q", "photosynthesis", ["respiration", "photosynthesis"], ["A", "B"], 1)
    samples = ["The answer is Photosynthesis.", "The answer is photosynthesis", "The answer is (photosynthesis).",
               "The answer is respiration.", "The answer is respiration."]
    row = ev.judge(ex, ["greedy: no idea"] + samples)
    assert row["parsed"]["official_maj"] == "photosynthesis" and row["correct"]["official_maj"]
    assert row["parsed"]["exact_maj"] == 1 and row["correct"]["exact_maj"]


def test_default_out_never_collides():
    a = ev.default_out("runs/a/best", "gsm8k", "test")
    b = ev.default_out("runs/b/best", "gsm8k", "test")
    assert a != b and a.startswith(os.path.join("runs", "eval", "runs_a_best-gsm8k-test-"))
    assert ev.default_out("runs/a/best", "arc_challenge", "test") != a


def test_rows_and_summary_written_atomically(tiny_dir, toy_sets, tmp_path):
    out = tmp_path / "deep" / "r.jsonl"
    p = run_cli(["--model", tiny_dir, "--dataset", str(toy_sets / "arc.jsonl"), "--split", "train", "--limit", "3",
                 "--max-new-tokens", "8", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["n"] == 3 and summary["rows"] == str(out) and set(summary["rules"]) == {"official", "exact"}
    for name, r in summary["rules"].items():   # the printed lines are the summary's numbers
        assert f"arc_challenge {name:>18}: {r['correct']}/3 " in p.stdout
    assert len(rows_of(out)) == 3 and sorted(os.listdir(out.parent)) == ["r.jsonl", "r.jsonl.summary.json"]
    assert "Loading weights" not in p.stderr   # transformers' own bars stay quiet: eval.py's bar is the progress


@pytest.mark.parametrize("argv, message", [
    (["--model", "./nowhere", "--dataset", "gsm8k"], "--model './nowhere': no such folder"),
    (["--model", "TINY", "--dataset", "no/such/file.jsonl"], "--dataset 'no/such/file.jsonl'"),
    (["--model", "TINY", "--dataset", "gsm8k", "--limit", "0"], "argument --limit: 0 must be >= 1"),
    (["--model", "TINY", "--dataset", "gsm8k", "--samples", "1"], "argument --samples: use 0 (off) or k >= 2"),
    (["--model", "TINY", "--dataset", "gsm8k", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--model", "TINY", "--dataset", "gsm8k", "--batch-size", "-2"], "argument --batch-size: -2 must be >= 1"),
])
def test_errors_are_named(tiny_dir, argv, message):
    p = run_cli([tiny_dir if a == "TINY" else a for a in argv])
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_unwritable_out_fails_before_decoding(tiny_dir, toy_sets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = run_cli(["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train",
                 "--out", str(blocker / "rows.jsonl")])
    assert p.returncode != 0 and "cannot write there" in p.stderr and "Traceback" not in p.stderr
    assert "eval:" not in p.stderr            # no progress bar: nothing was decoded


def test_checkpoint_folder_points_to_its_model(tmp_path, tiny_dir, toy_sets):
    """--model OUT/checkpoint (a latro.py checkpoint, not a model folder) says where the model is."""
    import shutil
    shutil.copytree(tiny_dir, tmp_path / "checkpoint" / "model")
    p = run_cli(["--model", str(tmp_path / "checkpoint"), "--dataset", str(toy_sets / "gsm.jsonl")])
    assert p.returncode != 0 and "has no config.json" in p.stderr and "checkpoint/model" in p.stderr


def test_wilson_and_paired_by_hand():
    """Wilson's interval and the paired comparison against numbers worked out by hand."""
    lo, hi = ev.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    row = lambda i, ok: {"index": i, "correct": {"official": ok, "strict": ok, "flexible": ok}}
    base = [row(i, i < 5) for i in range(20)]              # 5 right
    new = [row(i, 3 <= i < 12) for i in range(20)]         # 9 right: gained 5..11 (7), lost 0..2 (3)
    p = ev.paired(new, base, "gsm8k")["official"]
    assert (p["gained"], p["lost"], p["difference"]) == (7, 3, pytest.approx(0.2))
    # McNemar exact: 2 * P(X <= 3), X ~ Binomial(10, 1/2) = 2 * 176 / 1024
    assert p["mcnemar_p"] == pytest.approx(2 * 176 / 1024)
    se = ((7 + 3 - 4 ** 2 / 20) ** 0.5) / 20
    assert p["interval95"] == pytest.approx([0.2 - 1.96 * se, 0.2 + 1.96 * se])
    with pytest.raises(SystemExit, match="not the same questions"):
        ev.paired(new[:19], base, "gsm8k")


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_evaluation_continues(tiny_dir, tmp_path, sig):
    """Rows are kept as each batch finishes; SIGINT / SIGTERM exit 130 / 143 with a line, SIGKILL just dies; the
    same command then continues and ends with the same rows and summary as an uninterrupted evaluation."""
    data_ = tmp_path / "q.jsonl"
    data_.write_text("".join(json.dumps({"question": f"What is {i} times {i + 2}?", "answer": f"#### {i * (i + 2)}"})
                             + "\n" for i in range(24)))
    argv = ["--model", tiny_dir, "--dataset", str(data_), "--split", "train", "--batch-size", "1",
            "--max-new-tokens", "48", "--samples", "2"]
    ref = run_cli(argv + ["--out", str(tmp_path / "ref.jsonl")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut.jsonl"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *argv, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    part = tmp_path / "cut.jsonl.part0"
    while p.poll() is None and not (part.exists() and part.read_text().count("\n") >= 4):
        time.sleep(0.01)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=3600)
    assert p.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], stderr[-2000:]
    assert "Traceback" not in stderr and not out.exists() and part.read_text().count("\n") >= 4
    if sig != signal.SIGKILL:
        assert "run the same command to continue" in stdout
    q = run_cli(argv + ["--out", str(out)])
    assert q.returncode == 0, q.stderr[-2000:]
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text() and not part.exists()
    strip = lambda path: {k: v for k, v in json.load(open(str(path) + ".summary.json")).items()
                          if k not in ("seconds", "rows")}
    assert strip(out) == strip(tmp_path / "ref.jsonl")


def test_out_that_is_a_folder_is_refused_before_decoding(tiny_dir, toy_sets, tmp_path):
    p = run_cli(["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--out",
                 str(tmp_path)])
    assert p.returncode != 0 and "cannot write there (it is a folder)" in p.stderr and "eval:" not in p.stderr


def test_a_model_that_writes_nothing_is_flagged(tmp_path, toy_sets, tiny_tok):
    """Every output empty (here the final norm is zero: every logit 0, argmax the pad token, which decodes to
    nothing): the summary carries a warning and the console says so."""
    from conftest import build_tiny_model
    lm = build_tiny_model(len(tiny_tok), eos_token_id=tiny_tok.eos_token_id, pad_token_id=tiny_tok.pad_token_id)
    torch.nn.init.zeros_(lm.model.norm.weight)
    lm.save_pretrained(tmp_path / "mute")
    tiny_tok.save_pretrained(tmp_path / "mute")
    p = run_cli(["--model", str(tmp_path / "mute"), "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train",
                 "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "m.jsonl")])
    assert p.returncode == 0 and "WARNING: every output is empty" in p.stdout
    assert "every output is empty" in json.load(open(tmp_path / "m.jsonl.summary.json"))["warning"]


def test_two_evaluations_never_share_an_out(tiny_dir, toy_sets, tmp_path):
    """While one evaluation holds OUT (its lock), a second on the same OUT is refused before decoding, in one
    line; the first ends with no lock file left, and OUT is free again."""
    import fcntl
    out, gsm = tmp_path / "rows.jsonl", ["--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train"]
    with open(str(out) + ".lock", "a") as held:        # as a running evaluation holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_cli(["--model", tiny_dir, *gsm, "--max-new-tokens", "8", "--out", str(out)])
    assert p.returncode != 0 and "in use by another evaluation" in p.stderr and "Traceback" not in p.stderr
    assert "eval:" not in p.stderr and not out.exists()
    ev.main(["--model", tiny_dir, *gsm, "--max-new-tokens", "8", "--out", str(out)])   # released: it runs
    assert len(rows_of(out)) == 10 and sorted(os.listdir(tmp_path)) == ["rows.jsonl", "rows.jsonl.summary.json"]
    ev.main(["--model", tiny_dir, *gsm, "--max-new-tokens", "8", "--out", str(out)])   # and again, same process
    assert len(rows_of(out)) == 10


def test_paired_with_rows_of_another_task_are_refused_before_decoding(tiny_dir, toy_sets, tmp_path):
    """Rows with the same indices but not this task's rules (ARC rows against GSM8K questions) would only fail
    in the report, after all the decoding: they are refused first, naming --paired-with."""
    arc = tmp_path / "arc.jsonl"
    ev.main(["--model", tiny_dir, "--dataset", str(toy_sets / "arc.jsonl"), "--split", "train", "--max-new-tokens",
             "8", "--out", str(arc)])
    p = run_cli(["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--limit", "6",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "gsm.jsonl"), "--paired-with", str(arc)])
    assert p.returncode != 0 and "--paired-with" in p.stderr and "another task" in p.stderr
    assert "Traceback" not in p.stderr and "eval:" not in p.stderr


def test_part_files_cut_short_or_from_other_flags(tiny_dir, toy_sets, tmp_path):
    """A part file that holds no row (its flags header cut short by a kill, or another run's header alone) is
    started again, and the evaluation ends with the rows of a clean run. One with rows under other flags is
    refused, in one line."""
    argv = ["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--max-new-tokens", "8"]
    ev.main(argv + ["--out", str(tmp_path / "ref.jsonl")])
    out = tmp_path / "cut.jsonl"
    for header in ('{"flags": {"model": "', json.dumps({"flags": {"limit": 3}}) + "\n"):   # cut short; no rows
        (tmp_path / "cut.jsonl.part0").write_text(header)
        ev.main(argv + ["--out", str(out)])
        assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
    (tmp_path / "other.jsonl.part0").write_text(json.dumps({"flags": {"limit": 3}}) + "\n" + json.dumps(
        {"index": 0}) + "\n")
    p = run_cli(argv + ["--out", str(tmp_path / "other.jsonl")])
    assert p.returncode != 0 and "other flags" in p.stderr and "Traceback" not in p.stderr


def test_a_full_disk_while_appending_rows_keeps_them(tiny_dir, toy_sets, tmp_path, monkeypatch):
    """The disk fills after the first batch: one line, no traceback, the first batch's rows stay in the part
    file, the caller's signal handlers are back, and the same command then ends with a clean run's rows."""
    argv = ["--model", tiny_dir, "--dataset", str(toy_sets / "gsm.jsonl"), "--split", "train", "--batch-size", "4",
            "--max-new-tokens", "8"]
    ev.main(argv + ["--out", str(tmp_path / "ref.jsonl")])
    real, out = ev.evaluate, tmp_path / "full.jsonl"

    class FullAfterOneBatch:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            self.writes += 1
            if self.writes > 1:
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def flush(self):
            self.f.flush()
    monkeypatch.setattr(ev, "evaluate", lambda *a: real(*a[:5], FullAfterOneBatch(a[5]), a[6]))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match=r"cannot append to .*full.jsonl.part0 \(No space left on device\); the rows"):
        ev.main(argv + ["--out", str(out)])
    assert signal.getsignal(signal.SIGINT) is before and not out.exists()
    assert len((tmp_path / "full.jsonl.part0").read_text().splitlines()) == 1 + 4    # the flags and one batch
    monkeypatch.undo()
    ev.main(argv + ["--out", str(out)])
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
