"""Nothing lost (issue 15): a kill at any instant of a checkpoint write, a second run on the same folder, damaged
checkpoints, a model that is not finite, rows too long for the model, everyday mistakes, an evaluation that is
interrupted, and host memory on resume (rank 0 reads, the others receive)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import eval as ev
import latro
from conftest import ROOT, build_tiny_model, run_script
from test_distributed import launch, metrics, start_long_run, toy_data  # noqa: F401  (toy_data is a fixture)

METHOD_KEYS = ("step", "reward", "logp_y", "kl", "elbo", "loss", "unfinished", "z_len", "grad_norm", "lr",
               "advantage_abs")
KILL = ["--questions-per-rank", "2", "--steps", "3", "--save-every", "1", "--eval-every", "1"]


def killed_run(out, tiny_dir, toy_data, at, extra=()):
    """latro.py under tests/killhook.py: SIGKILL at the at-th filesystem step (0: run to the end)."""
    args = ["--model", tiny_dir, "--dataset", toy_data, "--out", str(out), "--k", "3", "--max-new-tokens", "12",
            "--val-size", "4", "--eval-max-new-tokens", "8", "--heldout-questions", "2", "--lr", "3e-3", "--seed", "1",
            *KILL, *extra]
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "killhook.py"), str(at),
                           os.path.join(ROOT, "latro.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=3600)


@pytest.mark.long
@pytest.mark.slow
def test_a_kill_at_any_instant_of_the_writes_resumes_bit_exact(tmp_path, tiny_dir, toy_data):
    """Kill -9 the run at instants spread over all of its filesystem steps (checkpoint and best/ writes, their
    swaps and cleanups, metrics); then --resume (or, before any checkpoint exists, --overwrite) finishes the run
    with exactly the weights and metrics of an uninterrupted run."""
    ref = killed_run(tmp_path / "ref", tiny_dir, toy_data, 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    total = int(ref.stderr.rsplit("FS_STEPS ", 1)[1].split()[0])
    want, want_rows = load_file(tmp_path / "ref" / "checkpoint" / "model" / "model.safetensors"), metrics(tmp_path / "ref")
    instants = sorted({round(1 + i * (total - 2) / 9) for i in range(10)})
    for at in instants:
        out = tmp_path / f"k{at}"
        p = killed_run(out, tiny_dir, toy_data, at)
        assert p.returncode == -signal.SIGKILL, (at, p.stderr[-2000:])
        q = killed_run(out, tiny_dir, toy_data, 0, ["--resume"])
        if "--resume: no checkpoint" in q.stderr:
            q = killed_run(out, tiny_dir, toy_data, 0, ["--overwrite"])
        assert q.returncode == 0 and "Traceback" not in q.stderr, (at, q.stderr[-3000:])
        got = load_file(out / "checkpoint" / "model" / "model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), at
        method = lambda rows: [{k: r[k] for k in METHOD_KEYS} for r in rows]   # timings and memory differ
        assert method(metrics(out)[0]) == method(want_rows[0]), at               # exactly, not to a tolerance
        assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".old")) and f != "checkpoint.old"], at
    print(f"killed at {len(instants)} instants of {total} filesystem steps ({instants}): every resume exact")


@pytest.mark.slow
def test_one_run_one_folder(tmp_path, tiny_dir, toy_data):
    """While a run holds its folder, a second run on it is refused in every mode, naming the holder; the first
    run is not disturbed."""
    out = tmp_path / "owned"
    a = start_long_run(out, tiny_dir, toy_data)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", *extra], check=False)
            assert p.returncode != 0 and "is in use by another run (pid" in p.stderr, (extra, p.stderr[-2000:])
            assert f"pid {a.pid} on " in p.stderr and "Traceback" not in p.stderr
    finally:
        a.send_signal(signal.SIGTERM)
        stdout, stderr = a.communicate(timeout=3600)
    assert a.returncode == 143, stderr[-2000:]
    steps = [r["step"] for r in metrics(out)[0]]
    assert steps == list(range(1, len(steps) + 1))                     # no step twice, none lost


def damaged_runs(tmp_path, tiny_dir, toy_data):
    """A run stopped after 2 steps: checkpoint/ (step 2) and checkpoint.old/ (step 1, confirmed by step 2)."""
    out = tmp_path / "good"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "3", "--save-every", "1",
                                         "--stop-after", "2"])
    return out


def overwrite_middle(path, n=64):
    """64 bytes of 0x7f in the middle of a file (in a header for small files, in tensor data for large ones)."""
    with open(path, "r+b") as f:
        f.seek(max(0, os.path.getsize(path) // 2 - n // 2))
        f.write(b"\x7f" * n)


def resume_args(out, tiny_dir, toy_data):
    args = latro.get_args(["--model", tiny_dir, "--dataset", toy_data, "--out", str(out), "--k", "3",
                           "--max-new-tokens", "12", "--steps", "3", "--val-size", "4", "--eval-every", "2",
                           "--eval-max-new-tokens", "8", "--heldout-questions", "2", "--lr", "3e-3", "--seed", "1",
                           "--questions-per-rank", "2", "--resume"])
    args.dtype = "fp32"                      # as setup resolves it on a CPU
    train, val = data.split_validation(data.load_split(toy_data, "train"), 4, 1)
    args.data_digest = latro.rows_digest(train + val)   # as setup computes it
    return latro.resolve_defaults(args, "gsm8k", 1, len(train), len(val))


@pytest.mark.slow
def test_every_damaged_file_gives_a_line_or_a_verified_fallback(tmp_path, tiny_dir, toy_data, capsys):
    """Each file of the checkpoint in turn truncated, overwritten in the middle, or deleted: --resume names the
    file and falls back to checkpoint.old (step 1); with both damaged, one line and no load. One damaged resume
    runs end to end."""
    good = damaged_runs(tmp_path, tiny_dir, toy_data)
    files = sorted(os.path.relpath(os.path.join(d, n), good / "checkpoint")
                   for d, _, names in os.walk(good / "checkpoint") for n in names)
    assert {"model/model.safetensors", "state.pt", "resume.json", "manifest.json"} <= set(files)
    damages = {"truncate": lambda p: os.truncate(p, os.path.getsize(p) // 2), "bytes": overwrite_middle,
               "delete": os.remove}
    for name in files:
        for how, damage in damages.items():
            out = tmp_path / "d"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(good, out)
            damage(out / "checkpoint" / name)
            folder, state = latro.find_checkpoint(resume_args(out, tiny_dir, toy_data))
            note = capsys.readouterr().out
            assert folder.endswith("checkpoint.old") and state["step"] == 1, (name, how)
            assert "falling back to" in note and (name.split("/")[-1] in note or "manifest" in note), (name, how, note)
    shutil.rmtree(out)
    shutil.copytree(good, out)
    (out / "checkpoint" / "state.pt").write_bytes(b"garbage")
    os.remove(out / "checkpoint.old" / "model" / "model.safetensors")
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint in .* that can be used: .*state.pt does not match "
                                         r"its checksum .*model.safetensors is missing"):
        latro.find_checkpoint(resume_args(out, tiny_dir, toy_data))
    shutil.rmtree(out / "checkpoint.old")
    shutil.copytree(good / "checkpoint.old", out / "checkpoint.old")
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "3", "--save-every", "1",
                                             "--resume"])
    assert "state.pt does not match its checksum (damaged); falling back to" in p.stdout
    assert "resumed from" in p.stdout and metrics(out)[0][-1]["step"] == 3


def test_resume_json_is_checked_for_sense(tmp_path, tiny_dir, toy_data):
    out = tmp_path / "r" / "checkpoint"
    out.mkdir(parents=True)
    for text, message in [("{", "cannot be read"), ('{"step": 99, "confirmed": true, "best": null, "config": {}, '
                                                     '"n_params": 1}', "says step 99, which is not within --steps 3"),
                          ('{"step": 1}', "lacks confirmed, best, config, n_params")]:
        (out / "resume.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            latro.read_resume(str(out), resume_args(tmp_path / "r", tiny_dir, toy_data))


def test_interrupted_swaps_settle(tmp_path):
    """Every state a kill can leave between the renames of a swap ends with one whole copy in place."""
    def whole(path, text):
        os.makedirs(path, exist_ok=True)
        (path / "x").write_text(text)
        latro.write_manifest(str(path))
    base = tmp_path / "checkpoint"
    whole(base, "new")                                       # done: a leftover partial .tmp goes
    (tmp_path / "checkpoint.tmp").mkdir()
    latro.settle(str(base))
    assert (base / "x").read_text() == "new" and not (tmp_path / "checkpoint.tmp").exists()
    shutil.rmtree(base)                                      # between the renames: .old whole, .tmp whole
    whole(tmp_path / "checkpoint.old", "old")
    whole(tmp_path / "checkpoint.tmp", "newer")
    latro.settle(str(base))
    assert (base / "x").read_text() == "newer" and (tmp_path / "checkpoint.old" / "x").read_text() == "old"
    shutil.rmtree(base)                                      # .tmp only partly written: .old takes the place
    (tmp_path / "checkpoint.tmp").mkdir()
    latro.settle(str(base))
    assert not (tmp_path / "checkpoint.old").exists() and (base / "x").read_text() == "old"
    whole(tmp_path / "checkpoint.old", "stale")              # the reported case: a partial .old blocks nothing
    (tmp_path / "checkpoint.old" / "manifest.json").unlink()
    whole(tmp_path / "checkpoint.tmp", "half")
    (tmp_path / "checkpoint.tmp" / "manifest.json").unlink()

    def part(tmp, write):
        os.makedirs(tmp)
        (tmp_path / "checkpoint.tmp" / "x").write_text("next")
    import torch.distributed as dist
    latro.setup_distributed("cpu")
    try:
        latro.write_folder(str(base), [part], 0.0, "the checkpoint", True, keep_prev=True)
    finally:
        dist.destroy_process_group()
    assert (base / "x").read_text() == "next" and (tmp_path / "checkpoint.old" / "x").read_text() == "old"
    assert latro.verify(str(base)) is None and not (tmp_path / "checkpoint.tmp").exists()


def test_resume_settles_best_too(tmp_path):
    """A kill between best/'s renames leaves best.old and best.tmp and no best/; a resumed run may never write
    best/ again (no better step), so --resume puts the newest whole copy in place before anything else."""
    for name, text in (("best.old", "old"), ("best.tmp", "new")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "x").write_text(text)
        latro.write_manifest(str(tmp_path / name))
    with pytest.raises(SystemExit, match="no checkpoint"):
        latro.find_checkpoint(SimpleNamespace(out=str(tmp_path), steps=4))
    assert (tmp_path / "best" / "x").read_text() == "new" and not (tmp_path / "best.tmp").exists()


def test_a_changed_model_that_latro_wrote_is_refused_before_use(tmp_path, tiny_dir):
    """best/ and checkpoint/model carry checksums (manifest.json): a byte changed since latro.py wrote them is
    named when eval.py or latro.py loads the model, not scored or trained on; a plain model folder loads as ever."""
    best, ckpt = tmp_path / "best", tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, best), shutil.copytree(tiny_dir, ckpt / "model")
    (best / "best.json").write_text("{}"), (ckpt / "resume.json").write_text("{}")
    latro.write_manifest(str(best)), latro.write_manifest(str(ckpt))
    for folder in (tiny_dir, best, ckpt / "model", f"{ckpt / 'model'}/"):
        assert "model.embed_tokens.weight" in latro.read_weights(str(folder))
    for folder in (best, ckpt / "model"):
        overwrite_middle(folder / "model.safetensors")    # tensor data: finite values, the same size
        for name in (str(folder), f"{folder}/"):
            with pytest.raises(SystemExit, match=r"model.safetensors does not match its checksum .*changed since"):
                latro.read_weights(name)
    with pytest.raises(SystemExit, match="does not match its checksum"):
        ev.main(["--model", str(best), "--dataset", "arith", "--limit", "2", "--out", str(tmp_path / "e.jsonl")])
    assert not (tmp_path / "e.jsonl.part0").exists()   # nothing decoded


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_dir):
    """A model with a NaN weight, and one whose tokenizer has neither eos nor pad."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("broken")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    lm = build_tiny_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    lm.save_pretrained(root / "nan")
    tok.save_pretrained(root / "nan")
    shutil.copytree(tiny_dir, root / "noeos")
    cfg = json.load(open(root / "noeos" / "tokenizer_config.json"))
    cfg.update(eos_token=None, pad_token=None, chat_template=None)
    json.dump(cfg, open(root / "noeos" / "tokenizer_config.json", "w"))
    if (root / "noeos" / "chat_template.jinja").exists():
        os.remove(root / "noeos" / "chat_template.jinja")
    weights = load_file(os.path.join(tiny_dir, "model.safetensors"))
    for name, change in [("truncated", None), ("missing", lambda sd: sd.pop("model.layers.0.mlp.down_proj.weight")),
                         ("shape", lambda sd: sd.update({"model.norm.weight": torch.ones(7)})),
                         ("vocab", lambda sd: sd.update({k: v[:50] for k, v in sd.items() if v.shape[0] == len(tok)}))]:
        shutil.copytree(tiny_dir, root / name)
        if change is None:   # a copy or download cut short
            os.truncate(root / name / "model.safetensors", 1000)
            continue
        sd = dict(weights)
        change(sd)
        save_file(sd, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(root / "vocab" / "config.json"))   # a model of 50 tokens beside another's tokenizer
    cfg.update(vocab_size=50, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    json.dump(cfg, open(root / "vocab" / "config.json", "w"))
    import transformers as tf
    v, ids = len(tok), dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name, lm in [("t5", tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=v, d_model=16, d_ff=32, num_layers=1,
                                                                       num_heads=2, d_kv=8))),   # not decoder-only
                     ("bert", tf.BertModel(tf.BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))),
                     ("mamba", tf.MambaForCausalLM(tf.MambaConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1,
                                                                  **ids))),   # no attention at all
                     ("opt", tf.OPTForCausalLM(tf.OPTConfig(vocab_size=v, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                            num_attention_heads=2, word_embed_proj_dim=16, **ids)))]:
        lm.save_pretrained(root / name), tok.save_pretrained(root / name)   # OPT: attention, but its own cache calls
    (root / "model.gguf").write_bytes(b"GGUF" + bytes(60))   # a file, not a folder
    return root


BROKEN = {"truncated": "cannot load it (SafetensorError", "missing": "1 of the tensors its config needs are missing "
          "from its weight files or have another shape (the first: model.layers.0.mlp.down_proj.weight)",
          "shape": "(the first: model.norm.weight (7,) (the config: (32,)))",
          "vocab": "tokens, more than the 50 rows of its embedding (vocab_size in config.json)",
          "t5": "a 't5' model is not a causal (decoder-only) language model",
          "model.gguf": "a file, not a model's folder (config.json and weights; a GGUF file converts into one",
          "bert": "a 'bert' model has no decoder blocks that latro.py can shard",
          "mamba": "MambaForCausalLM does not support an attention implementation through",
          "opt": "the engine cannot drive this 'opt' model; it needs a decoder whose attention takes transformers'"}


@pytest.mark.parametrize("case", ["nan model", "no eos", "run folder", "out is a file", "out under a file",
                                  "huge seed", "tpu", "cuda without a gpu", "long row", *BROKEN])
def test_everyday_mistakes_give_one_line(tmp_path, tiny_dir, toy_data, broken_models, case):
    """Each in latro.py and (where it applies) eval.py: one line naming the culprit, no traceback, before any
    training or decoding."""
    run_dir = tmp_path / "run"
    (run_dir / "best").mkdir(parents=True)
    shutil.copytree(tiny_dir, run_dir / "best", dirs_exist_ok=True)
    json.dump({"k": 3, "beta": 0.05}, open(run_dir / "config.json", "w"))
    open(run_dir / "metrics.jsonl", "w").close()
    (tmp_path / "afile").write_text("")
    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text(open(toy_data).read() + json.dumps({"question": "Janet has eggs. " * 300,
                                                            "answer": "#### 1"}) + "\n")
    model, data_, extra, message = tiny_dir, toy_data, [], None
    if case == "nan model":
        model, message = str(broken_models / "nan"), "of its tensors hold NaN or inf values"
    elif case == "no eos":
        model, message = str(broken_models / "noeos"), "its tokenizer has neither an eos nor a pad token"
    elif case == "run folder":
        model, message = str(run_dir), f"(it is a latro.py run folder); the models in it are {run_dir / 'best'}"
    elif case == "huge seed":
        extra, message = ["--seed", "1180591620717411303424"], "argument --seed: 1180591620717411303424 must be >= 0 and <="
    elif case == "tpu":
        extra, message = ["--device", "tpu:7"], "--device 'tpu:7': latro runs on cpu or cuda"
    elif case == "cuda without a gpu":
        extra, message = ["--device", "cuda"], "--device 'cuda': no GPU is visible to this process"
    elif case == "long row":
        data_, message = str(long_rows), f"{long_rows} line 41: the prompt is"
    elif case in BROKEN:   # a damaged or mismatched model: never trained or scored with random or missing rows
        model, message = str(broken_models / case), BROKEN[case]
    if case.startswith("out"):
        out = tmp_path / "afile" if case == "out is a file" else tmp_path / "afile" / "x"
        p = launch(out, model, data_, 1, extra, check=False)
        assert p.returncode != 0 and "--out" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        return
    p = launch(tmp_path / "o", model, data_, 1, extra, check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len([l for l in p.stderr.splitlines() if l.strip() and "%|" not in l]) == 1, p.stderr[-2000:]   # bars aside
    if case in ("nan model", "run folder", "long row", "tpu", *BROKEN) and case != "bert":   # eval.py needs no blocks
        q = run_script("eval.py", ["--model", model, "--dataset", data_, "--split", "train", "--max-new-tokens",
                                   "8", "--out", str(tmp_path / "e.jsonl"), *extra])
        assert q.returncode != 0 and "Traceback" not in q.stderr, q.stderr[-2000:]
        assert message.split(":")[0].replace("--seed", "") in q.stderr or message in q.stderr, q.stderr[-2000:]


def test_disk_full_in_a_tokenizer_save_and_on_the_metrics_append(tmp_path):
    """A bare Exception from a part (the tokenizer's save on a full disk) is a failed write like any other; a
    failed metrics append stops the run at the step's end with one line."""
    import torch.distributed as dist
    latro.setup_distributed("cpu")
    try:
        def bad(tmp, write):
            os.makedirs(tmp)
            raise Exception("No space left on device (os error 28)")
        with pytest.raises(SystemExit, match=r"cannot write the best model to .*No space left on device"):
            latro.write_folder(str(tmp_path / "best"), [bad], 0.0, "the best model", True)
        assert not (tmp_path / "best.tmp").exists()
        run = SimpleNamespace(master=True, metrics=str(tmp_path / "nodir" / "metrics.jsonl"), error=None,
                              device=torch.device("cpu"))
        latro.log(run, {"step": 1}, "step 1")
        with pytest.raises(SystemExit, match=r"cannot append to .*metrics.jsonl \(No such file or directory\); "
                                             r"stopping, the last checkpoint is kept"):
            latro.stop_requested(run, SimpleNamespace(received=0))
    finally:
        dist.destroy_process_group()


def test_nothing_that_is_not_the_runs_is_deleted_or_written_over(tmp_path, tiny_dir, toy_data):
    """A model's folder as --out (its config.json is no run's), an --overwrite that would delete the --model it
    loads (OUT/best), a --resume of a folder that does not exist: each refused in one line, before any folder,
    lock or deletion. eval.py: an --out that is not its rows or holds an evaluation under other flags, and
    --paired-with naming --out itself or rows of other questions of the same task and count."""
    import torch.distributed as dist
    model, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_dir, model), shutil.copytree(tiny_dir, run / "best")
    (run / "metrics.jsonl").write_text("{}\n")
    before = {p: p.read_bytes() for p in [*model.iterdir(), *(run / "best").iterdir()]}
    args = lambda out, m, **kw: SimpleNamespace(**{"out": str(out), "model": str(m), "resume": False,
                                                   "overwrite": False, **kw})
    latro.setup_distributed("cpu")
    try:
        for a, message in [(args(model, model), "is a model's folder (its config.json), not a run's"),
                           (args(model, tiny_dir, overwrite=True), "is a model's folder"),
                           (args(run, run / "best", overwrite=True), f"would delete --model '{run / 'best'}' (in "),
                           (args(run, f"{run}/./best/", overwrite=True), "would delete --model"),
                           (args(tmp_path / "nothing", tiny_dir, resume=True), "no checkpoint in")]:
            with pytest.raises(SystemExit, match=re.escape(message)):
                latro.claim_run_folder(a, True)
        latro.claim_run_folder(args(run, tiny_dir, overwrite=True), True)   # another --model: the run goes
        assert not (run / "best").exists() and not (run / "metrics.jsonl").exists()
    finally:
        dist.destroy_process_group()
    assert all(p.read_bytes() == b for p, b in before.items() if "run" not in p.parts) and len(before) > 8
    assert not (tmp_path / "nothing").exists() and not (model / ".lock").exists()
    rows = tmp_path / "rows.jsonl"
    flags = ["--model", tiny_dir, "--dataset", toy_data, "--split", "train", "--limit", "2", "--max-new-tokens", "4"]
    ev.main(flags + ["--out", str(rows)])
    for out, extra, message in [(model / "config.json", [], "cannot write there (it is not eval.py's rows)"),
                                (rows, ["--paired-with", str(rows)], "cannot be compared with these rows (it is --out"),
                                (rows, ["--limit", "1"], "holds an evaluation with other flags (its .summary.json)"),
                                (tmp_path / "other.jsonl", ["--dataset", "arith", "--paired-with", str(rows)],
                                 "cannot be compared with these rows (other questions)")]:   # same task, positions
        kept = rows.read_bytes()
        with pytest.raises(SystemExit, match=re.escape(message)):
            ev.main(flags + ["--out", str(out), *extra])
        assert rows.read_bytes() == kept
    assert len(ev.main(flags + ["--out", str(rows)])) == 2   # the same flags: the same evaluation, written again
    assert (model / "config.json").read_bytes() == before[model / "config.json"]
    (tmp_path / "new.jsonl.part0").write_bytes(b"\x81\xff garbage\x90")   # not text: started again, one line
    assert len(ev.main(flags + ["--out", str(tmp_path / "new.jsonl")])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("flags, blamed", [(["--beta", "1e300"], "--beta or --penalty"),   # inf already at step 1
                                           (["--beta", "1e38"], "--beta or --penalty"),    # finite: overflows at step 2
                                           (["--penalty", "1e38"], "--beta or --penalty"),
                                           (["--lr", "1e30"], "--lr")])                    # the weights blow up
def test_a_diverged_run_blames_the_flag_at_fault(tmp_path, tiny_dir, toy_data, flags, blamed):
    """The model's log-probs finite (log pi(y|x+z), the KL) but not the loss: the self-rewards overflowed, --beta or
    --penalty is at fault; the model's own numbers not finite: the update diverged, --lr."""
    p = launch(tmp_path / "b", tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "8", *flags],
               check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert re.search(r"steps in a row .* had a non-finite loss or gradient norm and made no update; "
                     r"(the self-rewards overflowed|the update diverged)[^;.]*lower " + re.escape(blamed), p.stderr)


@pytest.mark.slow
def test_a_finished_run_says_so_at_once(tmp_path, tiny_dir, toy_data):
    out = tmp_path / "f"
    launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "2"])
    p = launch(out, tiny_dir, toy_data, 1, ["--questions-per-rank", "2", "--steps", "2", "--resume"])
    assert "has finished all 2 steps (checkpoint at step 2); nothing to do" in p.stdout
    assert "held-out" not in p.stderr + p.stdout and "resumed from" not in p.stdout


@pytest.mark.long
@pytest.mark.slow
def test_resume_reads_the_full_state_on_rank_0_only(tmp_path, toy_data):
    """2 sharded processes resume a 34 M-parameter model: rank 0 reads the whole model and AdamW state (about
    0.4 GB), rank 1 only receives its shards, so its host peak stays well under rank 0's."""
    from conftest import build_tokenizer
    tok, folder = build_tokenizer(), tmp_path / "m"
    lm = build_tiny_model(len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    full_gb = 12 * sum(p.numel() for p in lm.parameters()) / 2**30           # fp32 weights + AdamW m, v
    extra = ["--questions-per-rank", "1", "--k", "2", "--max-new-tokens", "4", "--eval-every", "0",
             "--heldout-questions", "0", "--parallel", "shard", "--steps", "2"]
    launch(tmp_path / "r", str(folder), toy_data, 2, extra + ["--stop-after", "1"])
    argv = ["--model", str(folder), "--dataset", toy_data, "--out", str(tmp_path / "r"), "--val-size", "4",
            "--lr", "3e-3", "--seed", "1", *extra, "--resume"]
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, "latro.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peaks = None
    for line in agent.stdout:   # the moment the resume is done: read each worker's peak from outside it
        peaks = worker_peaks_gb(agent.pid) if peaks is None and line.startswith("resumed from") else peaks
    assert agent.wait(timeout=3600) == 0 and sorted(peaks) == [0, 1], peaks
    peaks = [peaks[0], peaks[1]]
    print(f"host peak after resume, per rank: {peaks} GB; full state {full_gb:.2f} GB")
    # rank 0 holds at most the whole AdamW state (2/3 of full_gb) at once beyond what rank 1 holds; the gap was
    # 0.16-0.22 GB in runs on quiet cores (allocator noise). A rank 1 that read the whole state would show none.
    assert peaks[1] < peaks[0] - 0.25 * full_gb


def worker_peaks_gb(agent: int) -> dict:
    """{RANK: peak resident memory in GB} of the torchrun agent's workers, read by the kernel's count (VmHWM in
    /proc/PID/status) from outside the processes."""
    peaks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != agent:   # its parent
                continue
            env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
            kib = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
            peaks[int(env["RANK"])] = kib / 2**20
        except (OSError, ValueError, KeyError, StopIteration):   # a process that just ended, or not a worker
            pass
    return peaks


def json_rows(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


FAILING = """import os, runpy, sys, torch
sys.path.insert(0, {root!r})
import latro
OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
def failing(real, after, error=OOM):   # `real`, then `error` from the (after+1)-th call on
    calls = [0]
    def call(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise error
        return real(*a, **k)
    return call
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_failing(patch: str, script: str, args: list, nproc: int = 1, harness: str = None):
    """`python SCRIPT ARGS` (or torchrun, writing the `harness` file) with `patch` applied first: a torch or latro
    function that fails after some calls."""
    code = FAILING.format(root=ROOT, patch=patch)
    if nproc > 1:
        open(harness, "w").write(code)
    launcher = [sys.executable, "-c", code] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                                "--standalone", f"--nproc_per_node={nproc}", harness]
    return subprocess.run(launcher + [os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=3600)


@pytest.mark.slow
def test_running_out_of_memory_is_one_line_and_keeps_the_work(tmp_path, tiny_dir, toy_data):
    """Memory that runs out mid-run (latro.py's batch too big for its layout, or eval.py's) ends with one line
    naming the flags that make the work smaller, no traceback; latro.py's last checkpoint and eval.py's finished
    rows stay, and the same command (a smaller batch for eval.py) continues from them."""
    out = tmp_path / "run"
    argv = ["--model", tiny_dir, "--dataset", toy_data, "--out", str(out), "--k", "3", "--max-new-tokens", "12",
            "--val-size", "4", "--eval-every", "0", "--heldout-questions", "0", "--questions-per-rank", "2",
            "--steps", "4", "--save-every", "1"]
    p = run_failing("torch.optim.AdamW.step = failing(torch.optim.AdamW.step, 2)", "latro.py", argv)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("out of memory (CUDA out of memory. Tried to allocate "
                                                        "20.00 GiB): use --parallel offload or more GPUs, turn "
                                                        "--grad-checkpointing on, or lower --micro-questions")
    assert json.load(open(out / "checkpoint" / "resume.json"))["step"] == 2 and latro.verify(str(out / "checkpoint")) is None
    assert run_script("latro.py", argv + ["--resume"]).returncode == 0 and metrics(out)[0][-1]["step"] == 4
    rows = tmp_path / "e.jsonl"
    flags = ["--model", tiny_dir, "--dataset", toy_data, "--split", "train", "--limit", "6", "--max-new-tokens", "8",
             "--out", str(rows)]
    p = run_failing("latro.Engine.generate = failing(latro.Engine.generate, 2)", "eval.py",
                          flags + ["--batch-size", "2"])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "): lower --batch-size (--samples multiplies it); the rows so far are kept" in p.stderr.splitlines()[-1]
    assert len(open(f"{rows}.part0").read().splitlines()) == 1 + 4   # the header, then 2 batches of 2 rows
    assert len(ev.main(flags + ["--batch-size", "1"])) == 6 and not os.path.exists(f"{rows}.part0")
    # under torchrun, one rank runs out: its line says why; the other's broken collective is one line too
    p = run_failing("if os.environ['RANK'] == '1': torch.optim.AdamW.step = failing(torch.optim.AdamW.step, 0)",
                    "latro.py", argv[:-4] + ["--global-questions", "2", "--out", str(tmp_path / "two")], 2,
                    str(tmp_path / "failing.py"))
    assert p.returncode == 1 and "out of memory (CUDA out of memory." in p.stderr, p.stderr[-3000:]
    assert f'{os.path.join(ROOT, "latro.py")}", line' not in p.stderr, p.stderr[-3000:]   # no traceback of ours


@pytest.mark.slow
def test_a_ctrl_c_while_loading_is_one_line(tmp_path, tiny_dir):
    """Ctrl-C before the scripts' own handlers run (loading a model: minutes at 8B): exit 130 and one line, no
    traceback; latro.py says what is kept."""
    args = ["--model", tiny_dir, "--dataset", "arith", "--out", str(tmp_path / "o"), "--max-new-tokens", "8"]
    p = run_failing("latro.Engine.__init__ = failing(latro.Engine.__init__, 0, KeyboardInterrupt())", "eval.py", args)
    assert p.returncode == 130 and "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == "interrupted"
    p = run_failing("torch.optim.AdamW.__init__ = failing(torch.optim.AdamW.__init__, 0, KeyboardInterrupt())",
                    "latro.py", args + ["--k", "2", "--val-size", "4", "--heldout-questions", "2", "--steps", "2"])
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (f"interrupted; the last checkpoint in {tmp_path / 'o'}, if any, is "
                                                 f"kept (continue with --resume)")


def test_rank_set_without_the_rest_of_torchrun_is_one_line(tmp_path, tiny_dir):
    """RANK in the environment (by hand, or a scheduler's) without MASTER_ADDR: one line, not a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")} | {"RANK": "0",
                                                                                            "WORLD_SIZE": "1"}
    for script in ("latro.py", "eval.py"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--model", tiny_dir, "--dataset", "arith",
                            "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=3600)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert "torch.distributed cannot start from this environment (RANK=0)" in p.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "o")


def test_a_gpu_that_is_not_there_is_named(monkeypatch):
    """--device cuda:7 on a 4-GPU machine, or torchrun with more processes per node than GPUs: one line, before
    any process group starts (a traceback from set_device otherwise)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(SystemExit, match=r"--device 'cuda:7': cuda:7 is not one of the 4 GPUs this process sees"):
        latro.setup_distributed("cuda:7")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(SystemExit, match=r"LOCAL_RANK 5: cuda:5 is not one of the 4 GPUs .*--nproc_per_node"):
        latro.setup_distributed()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match=r"--device 'cuda': no GPU is visible to this process"):
        latro.setup_distributed("cuda")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_torchrun_as_pid_1_is_not_a_dead_agent(tmp_path, tiny_dir, toy_data):
    """In a container whose entrypoint is torchrun, the agent is pid 1, so the workers' parent pid is 1: that must
    not read as a dead agent (a run that checkpoints and stops after one step). Run here in a new pid namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-fp", "--mount-proc", "true"]).returncode:
        pytest.skip("unshare (a new pid namespace) is not available here")
    out = tmp_path / "pid1"
    args = ["--model", tiny_dir, "--dataset", toy_data, "--out", str(out), "--k", "3", "--max-new-tokens", "12",
            "--steps", "3", "--val-size", "4", "--eval-every", "0", "--heldout-questions", "0", "--questions-per-rank", "2"]
    p = subprocess.run(["unshare", "-fp", "--mount-proc", sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=1", os.path.join(ROOT, "latro.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=3600)
    assert p.returncode == 0 and "agent is gone" not in p.stderr, p.stderr[-2000:]
    assert "done: 3 of 3 steps" in p.stdout
