"""The data-parallel loop on CPU (gloo): the same rationales, loss and parameters with 1, 2 and 3 processes and
over 2 "nodes", replicated, sharded and offloaded; the same in bf16 with a KL of exactly 0 at step 0; exact
resume after an interruption; crash-safe checkpoints; and what a user's mistakes and signals produce."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

STEPS = 4


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A GSM8K-shaped train file made up here (no shared rows)."""
    path = tmp_path_factory.mktemp("toy") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"What is {i} plus {i % 7}?", "answer": f"{i}+{i % 7}\n#### {i + i % 7}"}) + "\n")
    return str(path)


def launch(out, model, dataset, nproc=1, extra=(), check=True, timeout=3600):
    args = ["--model", model, "--dataset", dataset, "--out", str(out), "--k", "3", "--max-new-tokens", "12",
            "--steps", str(STEPS), "--val-size", "4", "--eval-every", "2", "--eval-max-new-tokens", "8",
            "--heldout-questions", "2", "--lr", "3e-3", "--seed", "1", *extra]
    p = run_script("latro.py", args, nproc, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def metrics(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "reward" in r], [r for r in rows if "val_accuracy" in r]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "model", "model.safetensors"))


def assert_same_run(a, b, steps=None, rel=1e-4, atol=1e-4):
    ma, mb = metrics(a)[0], metrics(b)[0]
    if steps:
        ma, mb = [r for r in ma if r["step"] in steps], [r for r in mb if r["step"] in steps]
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        for key in ("reward", "logp_y", "kl", "elbo", "unfinished", "z_len", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-5), (ra["step"], key)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): a float-level difference in a near-zero gradient can move a weight by a small
    # fraction of lr (3e-3 here); 1e-4 is 3% of one step, far below any real disagreement
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def w1(tmp_path_factory, tiny_dir, toy_data):
    """One process x 4 questions (2 per micro-batch), 4 steps: the run the others are compared with."""
    root = tmp_path_factory.mktemp("runs")
    launch(root / "w1", tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2"])
    return root


@pytest.fixture(scope="module")
def runs(w1, tiny_dir, toy_data):
    """Beside w1: 2 processes x 2 questions replicated and sharded (with and without gradient checkpointing)."""
    root = w1
    launch(root / "replicate", tiny_dir, toy_data, 2, ["--global-questions", "4", "--parallel", "replicate"])
    launch(root / "shard", tiny_dir, toy_data, 2, ["--questions-per-rank", "2", "--parallel", "shard"])
    # the GPU default: activation recomputation in backward
    launch(root / "shard_ckpt", tiny_dir, toy_data, 2, ["--questions-per-rank", "2", "--parallel", "shard",
                                                         "--grad-checkpointing", "on"])
    return root


@pytest.mark.long
@pytest.mark.slow
def test_world_size_invariance(runs):
    assert_same_run(runs / "w1", runs / "replicate")
    assert_same_run(runs / "w1", runs / "shard")
    for a, b in zip(metrics(runs / "shard")[1], metrics(runs / "w1")[1], strict=True):  # validation rows too
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.long
@pytest.mark.slow
def test_gradient_checkpointing_changes_nothing(runs):
    assert_same_run(runs / "shard", runs / "shard_ckpt")


@pytest.mark.slow
def test_training_moves_the_weights_and_logs_every_field(w1, tiny_dir, toy_data):
    before = load_file(os.path.join(tiny_dir, "model.safetensors"))
    after = weights(w1 / "w1")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4
    steps, vals = metrics(w1 / "w1")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in vals] == [0, 2, 4]
    for key in ("reward", "logp_y", "kl", "elbo", "unfinished", "z_len", "grad_norm", "lr", "t_sample", "t_score",
                "t_update", "seconds", "sample_tokens_per_s", "advantage_abs", "no_signal", "late_compiles",
                "decode_shapes"):
        assert all(key in r for r in steps), key
    assert steps[-1]["lr"] == pytest.approx(3e-3 / STEPS)
    assert json.load(open(w1 / "w1" / "config.json"))["parallel"] == "replicate"   # auto, one process on a CPU
    # the saved policy loads in plain transformers
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(w1 / "w1", "checkpoint", "model"))
    assert sum(p.numel() for p in lm.parameters()) > 0
    best = json.load(open(os.path.join(w1 / "w1", "best", "best.json")))
    # ties on accuracy go to the higher held-out log pi(y|x+z): best/ is never a worse model on both counts
    assert [best["val_accuracy"], best["heldout_logp_y"]] == max([v["val_accuracy"], v["heldout_logp_y"]] for v in vals)
    assert not any(os.path.exists(os.path.join(w1 / "w1", f)) for f in ("checkpoint.old", "checkpoint.tmp", "best.tmp"))
    # and eval.py scores a latro.py model like any model folder
    import eval as ev
    rows = ev.main(["--model", os.path.join(w1 / "w1", "best"), "--dataset", toy_data, "--split", "train",
                    "--limit", "2", "--max-new-tokens", "4", "--out", str(w1 / "eval.jsonl")])
    assert len(rows) == 2


@pytest.mark.long
@pytest.mark.slow
def test_bf16_kl_is_zero_at_step_0_and_one_process_equals_two(tmp_path, tiny_dir, toy_data):
    """The policy (fp32 master weights cast to bf16 by FSDP2) and the reference (a bf16 model) compute with the
    same numerics in every layout: at step 0 every rollout's KL is exactly 0, and 1 process == 2 processes."""
    extra = ["--dtype", "bf16", "--global-questions", "2", "--steps", "2"]
    launch(tmp_path / "one", tiny_dir, toy_data, 1, extra)
    launch(tmp_path / "two", tiny_dir, toy_data, 2, extra + ["--parallel", "shard"])
    launch(tmp_path / "rep", tiny_dir, toy_data, 2, extra + ["--parallel", "replicate"])
    for run in ("one", "two", "rep"):
        first = metrics(tmp_path / run)[0][0]
        assert first["kl"] == 0.0 and first["step"] == 1, (run, first["kl"])
    assert_same_run(tmp_path / "one", tmp_path / "two", rel=1e-3, atol=2e-3)
    assert_same_run(tmp_path / "one", tmp_path / "rep", rel=1e-3, atol=2e-3)


@pytest.mark.long
@pytest.mark.slow
def test_a_gpt2_style_model_trains_sharded_as_in_one_process(tmp_path, tiny_tok, toy_data):
    """Another layout of a decoder: GPT-2's blocks in .h (not .layers), learned positions, the LM head tied to
    the embedding. FSDP2 shards it over 2 processes as over 1: KL exactly 0 at step 1, the same run."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                    bos_token_id=tiny_tok.bos_token_id, eos_token_id=tiny_tok.eos_token_id,
                                    pad_token_id=tiny_tok.pad_token_id))
    lm.save_pretrained(tmp_path / "gpt2"), tiny_tok.save_pretrained(tmp_path / "gpt2")
    for run, nproc in (("one", 1), ("two", 2)):
        launch(tmp_path / run, str(tmp_path / "gpt2"), toy_data, nproc, ["--global-questions", "2", "--steps", "3"])
        assert metrics(tmp_path / run)[0][0]["kl"] == 0.0
    assert_same_run(tmp_path / "one", tmp_path / "two")
    before, after = lm.state_dict(), weights(tmp_path / "one")
    assert max((before[k] - after[k]).abs().max().item() for k in after) > 1e-4


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_three_processes_and_uneven_validation(tmp_path, tiny_dir, toy_data, mode):
    """3 ranks, 2 held-out questions and 4 validation questions: no rank waits for another at validation, and
    the run is the one a single process makes with the same global batch."""
    extra = ["--global-questions", "3", "--steps", "2"]
    launch(tmp_path / "three", tiny_dir, toy_data, 3, extra + ["--parallel", mode], timeout=3600)   # a hang guard (it once deadlocked)
    launch(tmp_path / "one", tiny_dir, toy_data, 1, extra)
    vals = metrics(tmp_path / "three")[1]
    assert [v["step"] for v in vals] == [0, 2] and all(v["val_n"] == 4 for v in vals)
    for a, b in zip(vals, metrics(tmp_path / "one")[1], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert_same_run(tmp_path / "one", tmp_path / "three")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.long
@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous(tmp_path, tiny_dir, toy_data):
    """The README's multi-node form: torchrun --nnodes 2 --rdzv-backend c10d, here 2 "nodes" x 1 process on
    localhost, with 3 held-out questions over 2 ranks. Same run as 1 process with the same global batch."""
    port, out = free_port(), tmp_path / "nodes"
    common = ["--model", tiny_dir, "--dataset", toy_data, "--k", "3", "--max-new-tokens", "12", "--steps", "2",
              "--val-size", "4", "--eval-every", "2", "--eval-max-new-tokens", "8", "--heldout-questions", "3",
              "--lr", "3e-3", "--seed", "1", "--global-questions", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "latro-test", os.path.join(ROOT, "latro.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(cmd + common + ["--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [n.communicate(timeout=3600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), results[0][1][-3000:]
    launch(tmp_path / "single", tiny_dir, toy_data, 1, ["--global-questions", "2", "--steps", "2",
                                                          "--heldout-questions", "3"])
    assert_same_run(tmp_path / "single", out)


@pytest.mark.slow
def test_offload_updates_like_the_plain_path(w1, tmp_path, tiny_dir, toy_data):
    """--parallel offload (fp32 master weights, gradients and AdamW on the host, the analogue of ZeRO-3 with
    CPU Adam) makes the same update as without offload."""
    launch(tmp_path / "off", tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2",
                                                       "--parallel", "offload"])
    assert_same_run(w1 / "w1", tmp_path / "off")
    assert json.load(open(tmp_path / "off" / "config.json"))["parallel"] == "offload"


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode", [(1, "shard"), pytest.param(2, "shard", marks=pytest.mark.long)])
def test_resume_is_exact(request, tmp_path, tiny_dir, toy_data, nproc, mode):
    q = ["--questions-per-rank", str(4 // nproc), "--parallel", mode] + (["--micro-questions", "2"] if nproc == 1 else [])
    out = tmp_path / "resumed"
    launch(out, tiny_dir, toy_data, nproc, q + ["--save-every", "1", "--stop-after", "2"])
    assert [r["step"] for r in metrics(out)[0]] == [1, 2]
    launch(out, tiny_dir, toy_data, nproc, q + ["--save-every", "1", "--resume"])
    runs = request.getfixturevalue("w1" if nproc == 1 else "runs")   # the two-process runs only when asked
    assert_same_run(runs / ("w1" if nproc == 1 else "shard"), out, steps={3, 4})


@pytest.mark.slow
def test_crash_between_renames_and_a_torn_metrics_line(w1, tmp_path, tiny_dir, toy_data):
    out = tmp_path / "crash"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2", "--stop-after", "2"])
    # a crash mid-save: the good checkpoint was moved aside and a half-written one lies about
    os.replace(out / "checkpoint", out / "checkpoint.old")
    os.makedirs(out / "checkpoint.tmp" / "model")
    (out / "checkpoint.tmp" / "state.pt").write_bytes(b"truncated")
    with open(out / "metrics.jsonl", "a") as f:   # and a metrics line cut short by a kill
        f.write('{"step": 3, "rew')
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2", "--resume"])
    assert "dropping the unreadable line" in p.stdout
    assert_same_run(w1 / "w1", out, steps={3, 4})
    assert not os.path.exists(out / "checkpoint.tmp")


@pytest.mark.long
@pytest.mark.slow
def test_resume_on_a_different_world_size(w1, tmp_path, tiny_dir, toy_data):
    """A checkpoint written by 1 process continues on 2 sharded processes: the checkpoint is a full state dict."""
    out = tmp_path / "rescaled"
    launch(out, tiny_dir, toy_data, 1, ["--global-questions", "4", "--stop-after", "2"])
    launch(out, tiny_dir, toy_data, 2, ["--global-questions", "4", "--parallel", "shard", "--resume"])
    assert_same_run(w1 / "w1", out, steps={3, 4})


def test_resume_with_different_flags_is_refused(tmp_path, tiny_dir, toy_data):
    out = tmp_path / "r"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--stop-after", "1"])
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--resume", "--k", "4"], check=False)
    assert p.returncode != 0 and "--k: run 4 vs checkpoint 3" in p.stderr
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--resume", "--dtype", "bf16"], check=False)
    assert p.returncode != 0 and "--dtype: run 'bf16' vs checkpoint 'fp32'" in p.stderr
    assert json.load(open(out / "config.json"))["dtype"] == "fp32"          # the run's config is not rewritten
    # the same path, other rows: a data file edited since (or a new hub revision) would make another run
    rows = tmp_path / "rows.jsonl"
    rows.write_text(open(toy_data).read())
    launch(tmp_path / "d", tiny_dir, str(rows), 1, ["--questions-per-rank", "2", "--stop-after", "1"])
    rows.write_text(open(toy_data).read().replace('#### 0"', '#### 5"', 1))   # one gold answer
    p = launch(tmp_path / "d", tiny_dir, str(rows), 1, ["--questions-per-rank", "2", "--resume"], check=False)
    assert p.returncode != 0 and re.search(r"the dataset's rows \(their digest\): run '\w+' vs checkpoint", p.stderr)


def test_resume_without_checkpoint_is_refused(tmp_path, tiny_dir, toy_data):
    p = launch(tmp_path / "none", tiny_dir, toy_data, 1, ["--resume"], check=False)
    assert p.returncode != 0 and "--resume: no checkpoint in" in p.stderr


def test_a_run_folder_belongs_to_one_run(tmp_path, tiny_dir, toy_data):
    out = tmp_path / "run"
    first = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "1"])
    assert "done: 1 of 1 steps" in first.stdout and f"checkpoint: {out}/checkpoint (step 1" in first.stdout
    before = (out / "config.json").read_text()
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "1"], check=False)
    assert p.returncode != 0 and "already holds a run (config.json, metrics.jsonl, checkpoint, best)" in p.stderr
    assert "--resume" in p.stderr and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert (out / "config.json").read_text() == before and len(metrics(out)[0]) == 1   # nothing touched
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "1", "--overwrite", "--k", "2"])
    assert "--overwrite: deleting" in p.stdout and json.load(open(out / "config.json"))["k"] == 2
    assert [r["step"] for r in metrics(out)[0]] == [1]                      # a fresh metrics file


def test_non_finite_updates_are_skipped_and_stop_the_run(tmp_path, tiny_dir, toy_data):
    """--lr 1e3 blows the weights up: the non-finite steps make no update, the run stops after 3 of them in a
    row with one line that names the last good step, and checkpoint/ holds no state later than that step (the
    update before the first skipped step was finite but absurd: its weights are not good). best/ is finite."""
    import re
    out = tmp_path / "nan"
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--lr", "1e3", "--steps", "8",
                                              "--eval-every", "1", "--save-every", "1"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "steps in a row" in p.stderr and "had a non-finite loss or gradient norm" in p.stderr
    steps = metrics(out)[0]
    skipped = [r["step"] for r in steps if "skipped" in r]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    good = int(re.search(r"The last good state is step (\d+)", p.stderr).group(1))
    assert good == skipped[0] - 2
    if os.path.exists(out / "checkpoint"):
        assert json.load(open(out / "checkpoint" / "resume.json"))["step"] <= good
        assert f"checkpoint/ holds step {json.load(open(out / 'checkpoint' / 'resume.json'))['step']}" in p.stderr
    else:
        assert "No checkpoint holds a good state" in p.stderr
    w = load_file(os.path.join(out, "best", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.parametrize("extra, message", [
    (["--k", "1"], "--k 1: the leave-one-out baseline needs at least 2"),
    (["--questions-per-rank", "3", "--micro-questions", "2"], "must be a positive multiple of --micro-questions"),
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--lr", "-1e-3"], "argument --lr: -1e-3 must be > 0"),
    (["--val-size", "200"], "--val-size 200 must be smaller than the 40 train rows"),
    (["--global-questions", "38"], "--global-questions 38 is more than the 36 train questions"),
    (["--cuda-graphs", "on"], "--cuda-graphs on needs a GPU"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),   # which one?
])
def test_bad_flags_are_named(tmp_path, tiny_dir, toy_data, extra, message):
    p = launch(tmp_path / "bad", tiny_dir, toy_data, 1, extra, check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "bad")           # failed before it made anything


def test_bad_model_and_dataset_are_named(tmp_path, tiny_dir, toy_data):
    p = launch(tmp_path / "m", "./no/such/model", toy_data, 1, check=False)
    assert p.returncode != 0 and "--model './no/such/model': no such folder" in p.stderr
    p = launch(tmp_path / "d", tiny_dir, "no_such_dataset", 1, check=False)
    assert p.returncode != 0 and "--dataset 'no_such_dataset'" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "Q"}) + "\n")
    p = launch(tmp_path / "d2", tiny_dir, str(bad), 1, check=False)
    assert p.returncode != 0 and f"{bad} line 2: field 'answer'" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def start_long_run(out, tiny_dir, toy_data, extra=()):
    args = [sys.executable, os.path.join(ROOT, "latro.py"), "--model", tiny_dir, "--dataset", toy_data, "--out",
            str(out), "--k", "3", "--max-new-tokens", "12", "--steps", "400", "--val-size", "4", "--eval-every", "0",
            "--heldout-questions", "0", "--questions-per-rank", "2", "--seed", "1", "--save-every", "0", *extra]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and
                                          open(out / "metrics.jsonl").read().count("\n") >= 2):
        time.sleep(0.05)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_the_step_cleanly(tmp_path, tiny_dir, toy_data, sig, code):
    """SIGTERM (a cluster's preemption notice) and SIGINT end the run at the next step boundary without a
    traceback or a tmp folder; SIGTERM writes a checkpoint first, and --resume continues from it."""
    out = tmp_path / "sig"
    p = start_long_run(out, tiny_dir, toy_data)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=3600)
    assert p.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    done = metrics(out)[0][-1]["step"]
    assert f"{sig.name}: {done} of 400 steps" in stdout
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    if sig == signal.SIGTERM:
        assert json.load(open(out / "checkpoint" / "resume.json"))["step"] == done
        q = start_long_run(out, tiny_dir, toy_data, ["--resume", "--stop-after", str(done + 1)])
        assert q.wait(timeout=3600) == 0 and metrics(out)[0][-1]["step"] == done + 1
    else:
        assert not os.path.exists(out / "checkpoint")


def test_failed_write_names_the_path_and_keeps_the_last_good_copy(tmp_path, monkeypatch):
    """A full disk or a permission error mid-write: one line with the path and the size, the partial output
    removed, the last good copy kept. And a disk that is too full is refused before anything is written."""
    import torch.distributed as dist
    import latro
    good = tmp_path / "checkpoint"
    good.mkdir()
    (good / "state.pt").write_text("good")
    calls = []

    def first(tmp, write):
        os.makedirs(tmp)
        (tmp_path / "checkpoint.tmp" / "half").write_text("x")
        raise OSError(28, "No space left on device")

    def second(tmp, write):   # still called (it may be a collective), but told not to write
        calls.append(write)
    free = lambda gb: (lambda p: type("U", (), {"free": gb * 2**30})())   # this machine's disk must not decide
    monkeypatch.setattr(latro.shutil, "disk_usage", free(100))
    latro.setup_distributed("cpu")
    try:
        with pytest.raises(SystemExit, match=r"cannot write the checkpoint to .*checkpoint \(about 3.0 GB\): "
                                             r"\[Errno 28\] No space left on device; the partial copy was removed"):
            latro.write_folder(str(good), [first, second], 3.0, "the checkpoint", True)
        assert calls == [False]
        assert not (tmp_path / "checkpoint.tmp").exists() and (good / "state.pt").read_text() == "good"
        monkeypatch.setattr(latro.shutil, "disk_usage", free(2))
        with pytest.raises(SystemExit, match=r"needs about 5.0 GB and the disk has 2.0 GB free; the last good copy"):
            latro.write_folder(str(good), [second], 5.0, "the checkpoint", True)
        assert calls == [False]   # refused before any part runs
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "checkpoint.tmp").exists() and (good / "state.pt").read_text() == "good"
