"""latro.py: the objective against the paper's estimator, unbiasedness by enumeration, fused scoring against
separate forwards and Hugging Face's cross-entropy, truncation rules, masks, seeds, and the samplers."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import latro
from conftest import build_tiny_model


# ---------------------------------------------------------------- leave-one-out baseline

def test_rloo_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    a = latro.rloo_advantages(r)
    # baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    want = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(a.sum(1), torch.zeros(2))


def test_rloo_advantages_sum_to_zero_random():
    r = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(latro.rloo_advantages(r).sum(1), torch.zeros(7, dtype=torch.float64))


# ---------------------------------------------------------------- the loss and its gradient

def test_penalty_and_reward_values():
    logp_y = torch.tensor([[-1.0, -3.0]])
    logp_z = torch.tensor([[-5.0, -6.0]])
    ref = torch.tensor([[-4.0, -7.0]])
    fin = torch.tensor([[True, False]])
    loss, s = latro.latro_loss(logp_z, ref, logp_y, fin, beta=0.5, sft_weight=1.0, penalty=2.0)
    # row 1 is unfinished: answer reward 2 * mean(-1, -3) = -4 instead of -3
    r = torch.tensor([-1.0 - 0.5 * (-5 + 4), -4.0 - 0.5 * (-6 + 7)])
    assert s["reward"] == pytest.approx(r.mean().item())
    a = r - r.flip(0)  # K = 2: the baseline is the other rationale's reward
    assert loss.item() == pytest.approx((-(a * logp_z[0]) - logp_y[0]).mean().item())
    assert s["unfinished"] == 0.5 and s["kl"] == pytest.approx(0.0)


def separate_logprobs(lm, prompt, z, y):
    """log pi(z|x) from a forward over [x;z] and log pi(y|x+z) from a forward over [x;z;y], HF logits."""
    def tail_logp(ids, n):
        logits = lm(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp[len(lp) - n:].sum() if n else lp.sum() * 0
    return tail_logp(prompt + z, len(z)), tail_logp(prompt + z + y, len(y))


def make_rollouts(tok, lm, n_q=2, k=3, seed=0):
    ex = [data.Example("gsm8k", f"q{i}", f"What is {i} plus 4?", str(i + 4)) for i in range(n_q)]
    prompts = [tok.encode(data.render_prompt(tok, e), add_special_tokens=False) for e in ex]
    g = torch.Generator().manual_seed(seed)
    zs = [[torch.randint(3, len(tok), (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
           for _ in range(k)] for _ in range(n_q)]
    ys = [[latro.answer_ids(tok, e, z) for z in zq] for e, zq in zip(ex, zs)]
    return prompts, zs, ys


def test_fused_logprobs_equal_separate_forwards_and_hf_cross_entropy(tiny_tok):
    lm = build_tiny_model(len(tiny_tok), seed=1)
    prompts, zs, ys = make_rollouts(tiny_tok, lm, n_q=1, k=4)
    ids, attn, zm, ym = latro.build_batch(prompts[0], zs[0], ys[0], tiny_tok.pad_token_id)
    for chunk in (3, 1024):  # several chunks and one chunk give the same numbers
        lz, ly = latro.score(latro.Scorer(lm, chunk), ids, attn, zm, ym)
        for i, (z, y) in enumerate(zip(zs[0], ys[0])):
            sz, sy = separate_logprobs(lm, prompts[0], z, y)
            torch.testing.assert_close(lz[i], sz, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ly[i], sy, atol=1e-5, rtol=1e-5)
            # HF's own loss: labels = y tokens only, -100 elsewhere; cross_entropy is the token mean
            labels = torch.full((1, ids.shape[1]), -100)
            labels[0, ym[i]] = ids[i, ym[i]]
            ce = lm(input_ids=ids[i:i + 1], attention_mask=attn[i:i + 1], labels=labels).loss
            torch.testing.assert_close(ly[i], -ce * len(y), atol=1e-5, rtol=1e-5)


def test_masks_cover_exactly_z_and_y(tiny_tok):
    ids, attn, zm, ym = latro.build_batch([5, 6, 7], [[10, 11], []], [[20, 21, 22], [30]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 10, 11, 20, 21, 22], [5, 6, 7, 30, 0, 0, 0, 0]]
    assert zm.nonzero().tolist() == [[0, 3], [0, 4]]
    assert ym.nonzero().tolist() == [[0, 5], [0, 6], [0, 7], [1, 3]]
    assert attn.sum(1).tolist() == [8, 4]


def test_loss_gradient_equals_paper_estimator(tiny_tok):
    """grad(latro_loss) == -(1/NK) sum_k [A_k grad logp_z_k + w grad logp_y_k], A computed by hand."""
    torch.manual_seed(0)
    lm, ref_lm = build_tiny_model(len(tiny_tok), seed=2), build_tiny_model(len(tiny_tok), seed=3)
    N, K, beta, w, gamma = 2, 3, 0.1, 0.7, 2.0
    prompts, zs, ys = make_rollouts(tiny_tok, lm, N, K, seed=5)
    finished = torch.tensor([[True, False, True], [True, True, True]])
    # fused path, as latro.py runs it
    lz, ly, lref = [], [], []
    for q in range(N):
        ids, attn, zm, ym = latro.build_batch(prompts[q], zs[q], ys[q], tiny_tok.pad_token_id)
        a, b = latro.score(latro.Scorer(lm, 4), ids, attn, zm, ym)
        with torch.no_grad():
            r, _ = latro.score(latro.Scorer(ref_lm), ids, attn, zm, ym)
        lz.append(a), ly.append(b), lref.append(r)
    loss, _ = latro.latro_loss(torch.stack(lz), torch.stack(lref), torch.stack(ly), finished, beta, w, gamma)
    fused = torch.autograd.grad(loss, list(lm.parameters()))
    # independent path: separate forwards, rewards and leave-one-out by hand, Eq. 4 term by term
    sz = [[separate_logprobs(lm, prompts[q], zs[q][k], ys[q][k]) for k in range(K)] for q in range(N)]
    est = 0
    for q in range(N):
        with torch.no_grad():
            ans = [sz[q][k][1].item() for k in range(K)]
            ans = [a if finished[q, k] else gamma * sum(ans) / K for k, a in enumerate(ans)]
            rew = [ans[k] - beta * (sz[q][k][0].item() - lref[q][k].item()) for k in range(K)]
        for k in range(K):
            adv = rew[k] - (sum(rew) - rew[k]) / (K - 1)
            est = est + (adv * sz[q][k][0] + w * sz[q][k][1]) / (N * K)
    manual = torch.autograd.grad(-est, list(lm.parameters()))
    for (name, _), g1, g2 in zip(lm.named_parameters(), fused, manual):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- unbiasedness by enumeration

class ToyPolicy(torch.nn.Module):
    """z = (z1, z2) over a vocabulary of V tokens, pi(z1) pi(z2|z1); p(y|z) = sigmoid(w[z1, z2])."""

    def __init__(self, V=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(V, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))

    def logp_z(self, z1, z2):
        return torch.log_softmax(self.a, 0)[z1] + torch.log_softmax(self.b, 1)[z1, z2]

    def logp_y(self, z1, z2):
        return F.logsigmoid(self.w[z1, z2])


def test_estimator_is_unbiased_by_enumeration():
    V, K, beta, N = 3, 4, 0.3, 60000
    pol, ref = ToyPolicy(V, seed=1), ToyPolicy(V, seed=2)
    with torch.no_grad():  # the reference differs from the policy, so the KL term matters
        ref.a.add_(0.5)
    # exact gradient of J = E_z[log p(y|z)] - beta KL(pi || pi0) by enumerating the V*V rationales
    z1, z2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    z1, z2 = z1.flatten(), z2.flatten()
    lp = pol.logp_z(z1, z2)
    J = (lp.exp() * (pol.logp_y(z1, z2) - beta * (lp - ref.logp_z(z1, z2).detach()))).sum()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(J, list(pol.parameters()))])
    # the estimator, N questions x K samples, in 20 chunks for a standard error
    g = torch.Generator().manual_seed(0)
    probs = lp.detach().exp()
    chunks = []
    for _ in range(20):
        idx = torch.multinomial(probs, (N // 20) * K, replacement=True, generator=g).view(-1, K)
        s1, s2 = z1[idx], z2[idx]
        loss, _ = latro.latro_loss(pol.logp_z(s1, s2), ref.logp_z(s1, s2).detach(), pol.logp_y(s1, s2),
                                   torch.ones_like(idx, dtype=torch.bool), beta, sft_weight=1.0)
        chunks.append(-torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(pol.parameters()))]))
    chunks = torch.stack(chunks)
    mean, se = chunks.mean(0), chunks.std(0) / math.sqrt(len(chunks))
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all(), (mean - exact, se)
    # and the test has power: a baseline that includes r_k itself shrinks the REINFORCE term by (K-1)/K
    assert ((mean - exact).abs().max() < 0.1 * exact.abs().max())


# ---------------------------------------------------------------- truncation and sampling

class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence per row (one-hot logits), with the interface `generate` uses."""

    def __init__(self, scripts, vocab, config):
        super().__init__()
        self.scripts, self.vocab, self.config, self.t = scripts, vocab, config, 0
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        self.t = 0 if input_ids.shape[1] > 1 else self.t + 1
        logits = torch.full((len(self.scripts), 1, self.vocab), -1e4)
        for i, s in enumerate(self.scripts):
            logits[i, 0, s[min(self.t, len(s) - 1)]] = 0.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("template", ["The answer is", "So, the answer is", "Therefore, the answer is",
                                      "Answer:", "the answer is"])
def test_truncation_at_each_template(tiny_tok, template):
    from transformers import LlamaConfig
    rationale = "We have 3 + 4 = 7 eggs."
    full = tiny_tok.encode(f"{rationale} {template} 7.<|im_end|>", add_special_tokens=False)
    other = tiny_tok.encode("no stop here at all, just eggs and eggs and eggs", add_special_tokens=False)
    eos = tiny_tok.encode(f"{rationale}<|im_end|> more", add_special_tokens=False)
    lm = ScriptedLM([full, other, eos], len(tiny_tok), LlamaConfig(vocab_size=len(tiny_tok)))
    for check_every in (1, 3, 8, 64):  # how often stops are checked changes nothing
        zs, fin = latro.generate(lm, [[1, 2], [1, 2], [1, 2]], 30, tiny_tok.pad_token_id, [tiny_tok.eos_token_id],
                                 tok=tiny_tok, sampler="dynamic", check_every=check_every)
        assert tiny_tok.decode(zs[0]).strip() == rationale and fin[0]    # the template is not part of z
        assert len(zs[1]) == 30 and not fin[1]                           # unfinished: L tokens, no stop
        assert tiny_tok.decode(zs[2]) == rationale and fin[2]            # EOS ends z and is not part of it


def test_greedy_eval_does_not_stop_at_template(tiny_tok):
    from transformers import LlamaConfig
    full = tiny_tok.encode("So 7. The answer is 7.<|im_end|>", add_special_tokens=False)
    lm = ScriptedLM([full], len(tiny_tok), LlamaConfig(vocab_size=len(tiny_tok)))
    out, fin = latro.generate(lm, [[1, 2]], 40, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], sampler="dynamic")
    assert tiny_tok.decode(out[0]) == "So 7. The answer is 7." and fin[0]


def test_pick_token_is_multinomial():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]]).repeat(40000, 1)
    u = torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(latro.pick_token(logits, u), minlength=3).double() / 40000
    assert abs(counts[1] - 0.75) < 0.01 and counts[2] == 0


def test_same_seed_same_rationales_and_loss(tiny_tok):
    lm = build_tiny_model(len(tiny_tok), seed=4)
    prompt = tiny_tok.encode(data.render_prompt(tiny_tok, data.Example("gsm8k", "a", "What is 2 plus 2?", "4")),
                             add_special_tokens=False)
    def run(seed):
        u = latro.question_uniforms(seed, step=3, question=1, k=4, length=24)
        zs, fin = latro.generate(lm, [prompt] * 4, 24, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], uniforms=u,
                                 tok=tiny_tok)
        ex = data.Example("gsm8k", "a", "What is 2 plus 2?", "4")
        ids, attn, zm, ym = latro.build_batch(prompt, zs, [latro.answer_ids(tiny_tok, ex, z) for z in zs], 0)
        lz, ly = latro.score(latro.Scorer(lm), ids, attn, zm, ym)
        loss, _ = latro.latro_loss(lz.view(1, 4), lz.detach().view(1, 4), ly.view(1, 4),
                                   torch.tensor([fin]), 0.05)
        return zs, loss.item()
    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a[0] != c[0]


@pytest.mark.parametrize("greedy", [True, False])
def test_static_and_dynamic_samplers_give_same_tokens(tiny_tok, greedy):
    lm = build_tiny_model(len(tiny_tok), seed=5)
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in ["What is 3 plus 4?", "Eggs", "1,000 dollars and"]]
    u = None if greedy else torch.rand(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = [latro.generate(lm, prompts, 40, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], uniforms=u,
                           sampler=s) for s in ("static", "dynamic")]
    assert outs[0] == outs[1]
    # and rows do not depend on what they are batched with (left padding, position ids)
    alone = latro.generate(lm, prompts[1:2], 40, tiny_tok.pad_token_id, [tiny_tok.eos_token_id],
                           uniforms=None if u is None else u[1:2])
    assert alone[0][0] == outs[0][0][1]


def test_samplers_agree_on_smollm(smollm_dir):
    lm = latro.load_model(smollm_dir, torch.float32, torch.device("cpu"))
    tok = latro.load_tokenizer(smollm_dir)
    ex = data.Example("gsm8k", "a", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7")
    p = tok.encode(data.render_prompt(tok, ex), add_special_tokens=False)
    u = latro.question_uniforms(0, 0, 0, 3, 24)
    outs = [latro.generate(lm, [p] * 3, 24, tok.pad_token_id, latro.stop_token_ids(tok, lm), uniforms=u, tok=tok,
                           sampler=s) for s in ("static", "dynamic")]
    assert outs[0] == outs[1]


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        latro.get_args(["--help"])
    text = capsys.readouterr().out
    for action in latro.get_args(["--model", "x"]).__dict__:
        assert f"--{action.replace('_', '-')}" in text
    with pytest.raises(SystemExit):
        latro.get_args(["--model", "x", "--no-such-flag"])


def test_lr_schedule_linear_to_zero():
    assert [latro.lr_at(s, 4, 1.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.slow
def test_compiled_sampler_gives_same_tokens(tiny_tok):
    """--compile: the torch.compile'd decode step samples the same tokens as the eager one (CPU, inductor)."""
    lm = build_tiny_model(len(tiny_tok), seed=6)
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in ["What is 3 plus 4?", "Eggs and 1,000"]]
    u = torch.rand(2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    step_fn = torch.compile(lm, mode="reduce-overhead", dynamic=False)
    eager = latro.generate(lm, prompts, 20, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], uniforms=u)
    compiled = latro.generate(lm, prompts, 20, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], uniforms=u,
                              step_fn=step_fn)
    assert eager == compiled


def test_global_batch_geometry():
    args = latro.get_args(["--model", "x", "--global-questions", "24"])
    assert latro.resolve_defaults(args, "gsm8k", world=8).questions_per_rank == 3
    args = latro.get_args(["--model", "x"])
    args = latro.resolve_defaults(args, "arc_challenge", world=8)
    assert (args.global_questions, args.steps, args.beta) == (24, 35, 0.25)   # the paper's ARC setting
    args = latro.resolve_defaults(latro.get_args(["--model", "x", "--k", "8"]), "gsm8k", world=8)
    assert (args.steps, args.beta) == (234, 0.05)   # half the rollouts per step: twice the steps
    with pytest.raises(SystemExit, match="--global-questions 24 does not divide over 5 processes"):
        latro.resolve_defaults(latro.get_args(["--model", "x", "--global-questions", "24"]), "gsm8k", world=5)
    with pytest.raises(SystemExit, match="--k 1"):
        latro.resolve_defaults(latro.get_args(["--model", "x", "--k", "1"]), "gsm8k", world=1)


def test_import_data_is_light():
    """`import data` needs neither a GPU, the network, nor the datasets package until something is loaded."""
    import subprocess
    import sys
    code = "import sys, data; assert 'datasets' not in sys.modules and 'torch' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], cwd=latro.os.path.dirname(latro.__file__), capture_output=True)
    assert p.returncode == 0, p.stderr
