"""The data-parallel loop on CPU (gloo): the same rationales, loss and parameters with 1 and 2 processes, in
DDP and FSDP mode; exact resume after an interruption; crash-safe checkpoints; clear errors for bad flags."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script

STEPS = 4


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A GSM8K-shaped train file made up here (no shared rows)."""
    path = tmp_path_factory.mktemp("toy") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"What is {i} plus {i % 7}?", "answer": f"{i}+{i % 7}\n#### {i + i % 7}"}) + "\n")
    return str(path)


def launch(out, model, dataset, nproc=1, extra=(), check=True):
    args = ["--model", model, "--dataset", dataset, "--out", str(out), "--k", "3", "--max-new-tokens", "12",
            "--steps", str(STEPS), "--val-size", "4", "--eval-every", "2", "--eval-max-new-tokens", "8",
            "--heldout-questions", "2", "--lr", "3e-3", "--seed", "1", *extra]
    p = run_script("latro.py", args, nproc)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def metrics(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "reward" in r], [r for r in rows if "val_accuracy" in r]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "model", "model.safetensors"))


def assert_same_run(a, b, steps=None):
    ma, mb = metrics(a)[0], metrics(b)[0]
    if steps:
        ma, mb = [r for r in ma if r["step"] in steps], [r for r in mb if r["step"] in steps]
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        for key in ("reward", "logp_y", "kl", "elbo", "unfinished", "z_len", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): a float-level difference in a near-zero gradient can move a weight by a small
    # fraction of lr (3e-3 here); 1e-4 is 3% of one step, far below any real disagreement
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, toy_data):
    """One process x 4 questions, and 2 processes x 2 questions in DDP and in FSDP mode (with and without
    gradient checkpointing): 4 steps each."""
    root = tmp_path_factory.mktemp("runs")
    launch(root / "w1", tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2"])
    launch(root / "ddp", tiny_dir, toy_data, 2, ["--global-questions", "4", "--parallel", "ddp"])
    launch(root / "fsdp", tiny_dir, toy_data, 2, ["--questions-per-rank", "2", "--parallel", "fsdp"])
    # the GPU default: FSDP with activation recomputation in backward
    launch(root / "fsdp_ckpt", tiny_dir, toy_data, 2, ["--questions-per-rank", "2", "--parallel", "fsdp",
                                                       "--grad-checkpointing", "on"])
    return root


@pytest.mark.slow
def test_world_size_invariance_ddp(runs):
    assert_same_run(runs / "w1", runs / "ddp")


@pytest.mark.slow
def test_world_size_invariance_fsdp_and_ddp_equals_fsdp(runs):
    assert_same_run(runs / "w1", runs / "fsdp")
    assert_same_run(runs / "ddp", runs / "fsdp")
    for a, b in zip(metrics(runs / "fsdp")[1], metrics(runs / "ddp")[1], strict=True):  # validation rows too
        assert a == pytest.approx(b, rel=1e-5)
    # FSDP holds half the parameters, gradients and AdamW state per rank on 2 ranks; DDP holds all of it
    ddp, fsdp, one = (metrics(runs / r)[0][-1]["train_state_gb"] for r in ("ddp", "fsdp", "w1"))
    assert ddp == pytest.approx(one) and 0.45 < fsdp / ddp < 0.55


@pytest.mark.slow
def test_fsdp_with_gradient_checkpointing_changes_nothing(runs):
    assert_same_run(runs / "fsdp", runs / "fsdp_ckpt")


@pytest.mark.slow
def test_training_moves_the_weights_and_logs_every_field(runs, tiny_dir, toy_data):
    before = load_file(os.path.join(tiny_dir, "model.safetensors"))
    after = weights(runs / "w1")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4
    steps, vals = metrics(runs / "w1")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in vals] == [0, 2, 4]
    for key in ("reward", "logp_y", "kl", "elbo", "unfinished", "z_len", "grad_norm", "lr", "t_sample",
                "t_update", "sample_tokens_per_s", "peak_mem_gb"):
        assert all(key in r for r in steps), key
    assert steps[-1]["lr"] == pytest.approx(3e-3 / STEPS)
    # the saved policy loads in plain transformers
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(runs / "w1", "checkpoint", "model"))
    assert sum(p.numel() for p in lm.parameters()) > 0
    assert os.path.isfile(os.path.join(runs / "w1", "best", "model.safetensors"))
    best = json.load(open(os.path.join(runs / "w1", "best", "best.json")))
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in vals)
    assert not os.path.exists(os.path.join(runs / "w1", "checkpoint.old"))
    # and eval.py scores a latro.py checkpoint like any model folder
    import eval as ev
    rows = ev.main(["--model", os.path.join(runs / "w1", "best"), "--dataset", toy_data, "--split", "train",
                    "--limit", "2", "--max-new-tokens", "4", "--out", str(runs / "eval.jsonl")])
    assert len(rows) == 2


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode", [(1, "none"), (2, "fsdp")])
def test_resume_is_exact(runs, tmp_path, tiny_dir, toy_data, nproc, mode):
    q = ["--questions-per-rank", str(4 // nproc)] + (["--parallel", mode] if nproc > 1 else [])
    out = tmp_path / "resumed"
    launch(out, tiny_dir, toy_data, nproc, q + ["--save-every", "1", "--stop-after", "2"])
    assert [r["step"] for r in metrics(out)[0]] == [1, 2]
    launch(out, tiny_dir, toy_data, nproc, q + ["--save-every", "1", "--resume"])
    assert_same_run(runs / ("w1" if nproc == 1 else "fsdp"), out, steps={3, 4})


@pytest.mark.slow
def test_crash_between_renames_keeps_last_good_checkpoint(runs, tmp_path, tiny_dir, toy_data):
    out = tmp_path / "crash"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2", "--stop-after", "2"])
    # simulate a crash mid-save: the good checkpoint was moved aside and a half-written one lies about
    os.replace(out / "checkpoint", out / "checkpoint.old")
    os.makedirs(out / "checkpoint.tmp" / "model")
    (out / "checkpoint.tmp" / "state.pt").write_bytes(b"truncated")
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "4", "--micro-questions", "2", "--resume"])
    assert_same_run(runs / "w1", out, steps={3, 4})


def test_resume_with_different_flags_is_refused(tmp_path, tiny_dir, toy_data):
    out = tmp_path / "r"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--stop-after", "1"])
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--resume", "--k", "4"], check=False)
    assert p.returncode != 0 and "--k: run 4 vs checkpoint 3" in p.stderr


def test_resume_without_checkpoint_is_refused(tmp_path, tiny_dir, toy_data):
    p = launch(tmp_path / "none", tiny_dir, toy_data, 1, ["--resume"], check=False)
    assert p.returncode != 0 and "--resume: no checkpoint in" in p.stderr


@pytest.mark.parametrize("extra, message", [
    (["--k", "1"], "--k 1: the leave-one-out baseline needs at least 2"),
    (["--questions-per-rank", "3", "--micro-questions", "2"], "must be a positive multiple of --micro-questions"),
    (["--compile", "--sampler", "dynamic"], "--compile needs --sampler static"),
])
def test_bad_flags_are_named(tmp_path, tiny_dir, toy_data, extra, message):
    p = launch(tmp_path / "bad", tiny_dir, toy_data, 1, extra, check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_bad_model_and_dataset_are_named(tmp_path, tiny_dir, toy_data):
    p = launch(tmp_path / "m", "./no/such/model", toy_data, 1, check=False)
    assert p.returncode != 0 and "--model './no/such/model': no such folder" in p.stderr
    p = launch(tmp_path / "d", tiny_dir, "no_such_dataset", 1, check=False)
    assert p.returncode != 0 and "--dataset 'no_such_dataset'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_resume_on_a_different_world_size(runs, tmp_path, tiny_dir, toy_data):
    """A checkpoint written by 1 process continues on 2 FSDP processes: the checkpoint is a full state dict."""
    out = tmp_path / "rescaled"
    launch(out, tiny_dir, toy_data, 1, ["--global-questions", "4", "--stop-after", "2"])
    launch(out, tiny_dir, toy_data, 2, ["--global-questions", "4", "--parallel", "fsdp", "--resume"])
    assert_same_run(runs / "w1", out, steps={3, 4})
