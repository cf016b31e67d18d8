"""
tests/teach_probe.py: what one LaTRO step rewards, on a model as it is, without beta's KL term (0 at step 0).
Samples K rationales for N train questions exactly as latro.py's step 0 does (same streams, same stops), scores
log pi(y|x+z), and splits the leave-one-out advantages A_k of Eq. 4 by what the rationale is: finished with
the gold as its last number ("right"), finished with another ("wrong"), or unfinished at L. Printed for each
non-stop penalty gamma asked: the mean advantage of each kind and the share of the positive advantage that goes
to finished WRONG rationales (what the step teaches besides the answer: to stop); the wrong ones are also split
into those that compute (hold an "=") and stubs (end before any arithmetic). Asserts nothing.

    python tests/teach_probe.py --model "$M" --dataset arith:7 --questions 48 --gamma 2 1
"""
import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data     # noqa: E402
import latro    # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="arith")
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, nargs="+", default=[2.0, 1.0])
    a = p.parse_args()
    from transformers import AutoModelForCausalLM
    tok = latro.load_tokenizer(a.model)
    lm = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    eot, engine, scorer = data.end_of_turn(tok), latro.Engine(lm, latro.stop_token_ids(tok, a.model)), latro.Scorer(lm)
    train = data.load_split(a.dataset, "train")
    idx = latro.global_questions(len(train), 0, a.questions, a.seed)
    exs = [train[i] for i in idx]
    args = argparse.Namespace(k=a.k, max_new_tokens=a.max_new_tokens, seed=a.seed)
    logp_y, fin, right, calc = [], [], [], []
    with torch.no_grad():
        for j in range(0, len(exs), 8):   # 8 questions per batch; question q keeps its step-0 stream
            part = exs[j:j + 8]
            for e, (prompt, zs, fs) in zip(part, latro.rollout(engine, tok, part, list(range(j, j + len(part))), 0, args)):
                ys = [latro.answer_ids(tok, e, z, eot) for z in zs]
                ids, attn, zm, ym = latro.build_batch(prompt, zs, ys, tok.pad_token_id)
                logp_y.append(latro.score(scorer, ids, attn, zm, ym)[1])
                fin.append(torch.tensor(fs))
                texts = [tok.decode(z) for z in zs]
                last = [re.findall(r"-?\d+", t) for t in texts]
                calc.append(torch.tensor(["=" in t for t in texts]))
                right.append(torch.tensor([f and bool(n) and n[-1] == e.gold for f, n in zip(fs, last)]))
    logp_y, fin, right, calc = (torch.stack(t) for t in (logp_y, fin, right, calc))   # (N, K) each
    wrong = fin & ~right
    kinds = {"right": right, "wrong": wrong, "unfinished": ~fin, "wrong, computing": wrong & calc, "stub": wrong & ~calc}
    print(f"{a.model} on {a.dataset}: {len(exs)} questions x K {a.k}, L {a.max_new_tokens}: finished "
          f"{fin.float().mean():.2f}, right {right.float().mean():.2f}, no_signal {(~fin).all(1).float().mean():.2f}")
    print("log pi(y|x+z): " + ", ".join(f"{k} {logp_y[m].mean():.1f} ({m.sum()})" for k, m in kinds.items()) + " nats")
    for gamma in a.gamma:
        reward = torch.where(fin, logp_y, gamma * logp_y.mean(1, keepdim=True))
        adv = latro.rloo_advantages(reward)
        pos = adv.clamp(min=0)
        means = ", ".join(f"{k} {adv[m].mean():+.1f}" if m.any() else f"{k} -" for k, m in kinds.items())
        print(f"gamma {gamma:g}: mean advantage {means}; share of the positive advantage on wrong "
              f"{pos[wrong].sum() / pos.sum():.2f}, on right {pos[right].sum() / pos.sum():.2f}")


if __name__ == "__main__":
    main()
