"""Evidence that LaTRO learns, on the real shared SmolLM2-135M-Instruct: a short CPU run raises the held-out
self-reward (mean log pi(y|x+z) on rationales sampled once, at step 0, for held-out questions) well beyond its
step-to-step noise. About a minute on 2 cores; deselect with -m "not slow"."""
import json
import os
import statistics

import pytest

from conftest import run_script


@pytest.mark.long
@pytest.mark.slow
def test_heldout_self_reward_rises(smollm_dir, shared_data, tmp_path):
    argv = ["--model", smollm_dir, "--dataset",
           os.path.join(shared_data, "gsm8k"), "--out", str(tmp_path), "--k", "2", "--max-new-tokens", "32",
           "--questions-per-rank", "2", "--steps", "6", "--lr", "2e-5", "--val-size", "4", "--heldout-questions", "4",
           "--eval-every", "1", "--eval-max-new-tokens", "4", "--seed", "0"]
    p = run_script("latro.py", argv, timeout=7200, one_thread=False)   # a hang guard
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    held = [r["heldout_logp_y"] for r in rows if "heldout_logp_y" in r]
    assert len(held) == 7
    diffs = [b - a for a, b in zip(held, held[1:])]
    gain = held[-1] - held[0]
    print(f"held-out log pi(y|x+z) by step: {[round(h, 2) for h in held]}; gain {gain:.2f} nats, "
          f"step-to-step std {statistics.stdev(diffs):.2f}")
    assert gain > 1.0 and gain > 3 * statistics.stdev(diffs)
