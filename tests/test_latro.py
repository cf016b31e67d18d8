"""latro.py: the objective against the paper's estimator, unbiasedness by enumeration, fused scoring against
separate forwards and Hugging Face's cross-entropy, masks, y tokenised in context, the sampling engine against the
plain decode loop (several model families, greedy and sampled, compiled), truncation rules, the layout rule, and
the flags."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import latro
from conftest import build_sentencepiece_tokenizer, build_tiny_model, plain_generate


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
    assert s["unfinished"] == 0.5 and s["kl"] == pytest.approx(0.0) and s["no_signal"] == 0.0


def test_no_signal_counts_questions_whose_rationales_all_went_unfinished():
    """no_signal: the share of questions whose K answer rewards are all the same penalty, so that their
    advantages are the KL term's alone (exactly 0 when the KL is 0, as at step 0)."""
    logp_y, zeros = torch.tensor([[-1.0, -3.0], [-2.0, -5.0], [-4.0, -4.5]]), torch.zeros(3, 2)
    fin = torch.tensor([[False, False], [True, False], [False, False]])
    logp_z = zeros.clone().requires_grad_(True)
    loss, s = latro.latro_loss(logp_z, zeros, logp_y, fin, beta=0.1, sft_weight=0.0)
    assert s["no_signal"] == pytest.approx(2 / 3)
    loss.backward()   # questions 0 and 2 carry no gradient at all; question 1 does
    assert logp_z.grad[[0, 2]].abs().sum() == 0 and logp_z.grad[1].abs().sum() > 0


def separate_logprobs(lm, prompt, z, y):
    """log pi(z|x) from a forward over [x;z] and log pi(y|x+z) from a forward over [x;z;y], HF logits."""
    def tail_logp(ids, n):
        logits = lm(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp[len(lp) - n:].sum() if n else lp.sum() * 0
    return tail_logp(prompt + z, len(z)), tail_logp(prompt + z + y, len(y))


def make_rollouts(tok, lm, n_q=2, k=3, seed=0):
    ex = [data.Example("gsm8k", f"q{i}", f"What is {i} plus 4?", str(i + 4)) for i in range(n_q)]
    prompts = data.prompt_ids(tok, ex)
    g = torch.Generator().manual_seed(seed)
    zs = [[torch.randint(3, len(tok), (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
           for _ in range(k)] for _ in range(n_q)]
    ys = [[latro.answer_ids(tok, e, z, data.end_of_turn(tok)) for z in zq] for e, zq in zip(ex, zs)]
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


# ---------------------------------------------------------------- y tokenised in context

def test_answer_tokenised_in_context_with_sentencepiece():
    """SentencePiece (Mistral, Phi-3.5): y encoded on its own gets an extra "▁" after a period and a "▁The" after
    a newline; in context it gets the tokens the model would write there."""
    tok = build_sentencepiece_tokenizer("phi")
    ex = data.Example("gsm8k", "a", "q", "18")
    for z_text, sep in [("We have 7 eggs.", " "), ("We have 7 eggs.\n", "")]:
        z = tok.encode(z_text, add_special_tokens=False)
        y = latro.answer_ids(tok, ex, z, "<|end|>")
        whole = tok.encode(z_text + sep + "The answer is 18.<|end|>", add_special_tokens=False)
        assert whole[:len(z)] == z and y == whole[len(z):]              # exactly the in-context tokens after z
        assert tok.decode(z + y) == z_text + sep + "The answer is 18.<|end|>"
        alone = tok.encode(sep + "The answer is 18.<|end|>", add_special_tokens=False)
        assert y != alone                                                # what encoding y alone gave


def test_answer_after_a_boundary_that_would_merge(tiny_tok):
    """z ending in a space: byte-level BPE would merge that space into " The"; y then starts a fresh word."""
    ex = data.Example("gsm8k", "a", "q", "7")
    z = tiny_tok.encode("So 3 + 4 = 7. ", add_special_tokens=False)
    y = latro.answer_ids(tiny_tok, ex, z, "<|im_end|>")
    assert tiny_tok.decode(z + y) == "So 3 + 4 = 7. The answer is 7.<|im_end|>"


# ---------------------------------------------------------------- the sampling engine against the plain loop

FAMILIES = {  # tiny configs of the paper's families and their relatives: Llama, Mistral, Qwen2 (biases), Phi-3,
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),    # GPT-2 (learned positions, blocks in .h, no GQA), Gemma-3
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"num_key_value_heads": None}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 512}),   # a rotation per
}                                                                                                  # layer type


def family_model(name, vocab, seed=0):
    import transformers
    cfg_cls, lm_cls, extra = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=512), **extra})
    torch.manual_seed(seed)
    return getattr(transformers, lm_cls)(cfg).eval()


PROMPTS = ["What is 3 plus 4?", "Eggs", "1,000 dollars and", "Question: Which is a planet? Options: ['Mars', 'Sun']"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("greedy", [True, False])
def test_engine_draws_the_tokens_of_the_plain_loop(tiny_tok, family, greedy):
    lm = family_model(family, len(tiny_tok), seed=5)
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in PROMPTS]
    u = None if greedy else torch.rand(4, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = plain_generate(lm, prompts, 40, tiny_tok.pad_token_id, [tiny_tok.eos_token_id], uniforms=u)
    engine = latro.Engine(copy_of(lm), [tiny_tok.eos_token_id])
    assert engine.generate(prompts, 40, uniforms=u) == want
    # rows do not depend on what they are batched with (left padding, position ids, padded rows)
    alone = engine.generate(prompts[1:2], 40, uniforms=None if u is None else u[1:2])
    assert alone[0][0] == want[0][1]


def copy_of(lm):
    import copy
    return copy.deepcopy(lm)


@pytest.mark.slow
def test_engine_reuses_one_state_per_bucket_and_one_kv_buffer(tiny_tok, monkeypatch):
    """Compiled (or captured), the engine buckets rows and prompt lengths: a few shapes cover a run."""
    monkeypatch.setattr(latro, "PROMPT_BUCKET", 32)
    monkeypatch.setattr(latro, "ROW_BUCKET", 8)
    engine = latro.Engine(build_tiny_model(len(tiny_tok), seed=1), [tiny_tok.eos_token_id], compile=True)
    engine.reserve(16, 32 + 24)
    buf = engine.buf
    for n_rows, text in [(3, "Eggs"), (8, "What is 3 plus 4?"), (5, "1,000 dollars and eggs")]:
        engine.generate([tiny_tok.encode(text, add_special_tokens=False)] * n_rows, 24)
    assert set(engine.states) == {(8, 32, 24)}     # 3, 8 and 5 rows, prompts under 32 tokens: one shape
    engine.generate([tiny_tok.encode("Eggs", add_special_tokens=False)] * 9, 24)
    assert set(engine.states) == {(8, 32, 24), (16, 32, 24)} and engine.buf is buf   # no reallocation


def test_engine_on_smollm_matches_the_plain_loop(smollm_dir):
    lm = latro.load_plain(latro.load_config(smollm_dir), latro.read_weights(smollm_dir), torch.float32,
                          torch.device("cpu"))
    tok = latro.load_tokenizer(smollm_dir)
    ex = data.Example("gsm8k", "a", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7")
    p = data.prompt_ids(tok, [ex])[0]
    u = latro.question_uniforms(0, 0, 0, 3, 24)
    stop = latro.stop_token_ids(tok, smollm_dir)
    want = plain_generate(lm, [p] * 3, 24, tok.pad_token_id, stop, uniforms=u, tok=tok)
    assert latro.Engine(copy_of(lm), stop).generate([p] * 3, 24, uniforms=u, tok=tok) == want


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])   # Gemma-3: the rotary tables per layer type, compiled
def test_compiled_engine_gives_same_tokens(tiny_tok, family):
    """--compile: the torch.compile'd decode step (fullgraph) samples the same tokens as the eager one."""
    lm = build_tiny_model(len(tiny_tok), seed=6) if family == "llama" else family_model(family, len(tiny_tok), 6)
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in PROMPTS[:2]]
    u = torch.rand(2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eager = latro.Engine(copy_of(lm), [tiny_tok.eos_token_id]).generate(prompts, 20, uniforms=u)
    compiled = latro.Engine(copy_of(lm), [tiny_tok.eos_token_id], compile=True).generate(prompts, 20, uniforms=u)
    assert eager == compiled


def test_refresh_replica_copies_the_policy_in_place(tmp_path, tiny_tok):
    """After an update the replica holds the policy's weights (cast), in the same tensors (graphs stay valid)."""
    import torch.distributed as dist
    latro.setup_distributed("cpu")
    try:
        lm = build_tiny_model(len(tiny_tok), seed=7)
        replica = latro.make_replica(build_tiny_model(len(tiny_tok), seed=7).to(torch.bfloat16))
        ptrs = [p.data_ptr() for p in replica.parameters()]
        model = latro.wrap(latro.Scorer(lm), "shard", torch.device("cpu"), torch.bfloat16, 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        latro.refresh_replica(replica, model)
        want = {k: (v + 0.5).to(torch.bfloat16) for k, v in build_tiny_model(len(tiny_tok), seed=7).state_dict().items()}
        got = replica.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert [p.data_ptr() for p in replica.parameters()] == ptrs
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- truncation

class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence per row (one-hot logits), with the interface the engine uses."""

    def __init__(self, scripts, vocab):
        super().__init__()
        from transformers import LlamaConfig
        self.scripts, self.vocab, self.t = scripts, vocab, 0
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_decoder(self):
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        self.t = 0 if input_ids.shape[1] > 1 else self.t + 1
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e4)
        for i in range(input_ids.shape[0]):
            s = self.scripts[i % len(self.scripts)]
            logits[i, 0, s[min(self.t, len(s) - 1)]] = 0.0
        return type("Out", (), {"logits": logits})()


def scripted(tok, texts, max_new=40, check_every=8, stop_at_template=True):
    """The engine over a ScriptedLM, with stops checked every `check_every` tokens (latro.STOP_CHECK_EVERY)."""
    scripts = [tok.encode(t, add_special_tokens=False) for t in texts]
    engine = latro.Engine(ScriptedLM(scripts, len(tok)), [tok.eos_token_id])
    saved, latro.STOP_CHECK_EVERY = latro.STOP_CHECK_EVERY, check_every
    try:
        zs, fin = engine.generate([[1, 2]] * len(texts), max_new, tok=tok if stop_at_template else None)
    finally:
        latro.STOP_CHECK_EVERY = saved
    return [tok.decode(z) for z in zs], fin


@pytest.mark.parametrize("template", ["The answer is", "So, the answer is", "Therefore, the answer is", "Answer:",
                                      "the answer is", "so the final answer is", "The answer is:"])
def test_truncation_at_each_template(tiny_tok, template):
    rationale = "We have 3 + 4 = 7 eggs."
    texts = [f"{rationale} {template} 7.<|im_end|>", "no stop here at all, just eggs and eggs and eggs",
             f"{rationale}<|im_end|> more"]
    for check_every in (1, 3, 8, 64):  # how often stops are checked changes nothing
        zs, fin = scripted(tiny_tok, texts, 30, check_every)
        assert zs[0].strip() == rationale and fin[0]                       # the template is not part of z
        assert len(tiny_tok.encode(zs[1], add_special_tokens=False)) >= 28 and not fin[1]   # unfinished at L
        assert zs[2] == rationale and fin[2]                               # EOS ends z and is not part of it


@pytest.mark.parametrize("text", ["Let me check my answer: 3 + 4 = 7, so 7 eggs remain in all of it",
                                  "Well, the answer isn't 5, it is 7 eggs, counted twice and again",
                                  "The answer island is far, 7 eggs were there, counted twice",
                                  "Bathe answer is not a word but 7 eggs is, counted twice more"])
def test_template_needs_its_exact_words(tiny_tok, text):
    """Case-sensitive "Answer:", word boundaries: none of these is an answer template."""
    for check_every in (1, 8):
        zs, fin = scripted(tiny_tok, [text], 16, check_every)
        assert not fin[0] and tiny_tok.decode(tiny_tok.encode(text, add_special_tokens=False)).startswith(zs[0])


def test_first_of_two_templates_in_one_window(tiny_tok):
    """Two templates within one check window: z ends at the FIRST, whatever the check period."""
    text = "So 7. The answer is 7. Answer: 7.<|im_end|>"
    for check_every in (1, 3, 8, 64):
        zs, fin = scripted(tiny_tok, [text], 40, check_every)
        assert zs[0] == "So 7." and fin[0]


def test_template_at_the_very_end(tiny_tok):
    """A template that the last allowed token completes counts (the text is complete: nothing can follow)."""
    text = "So it is 7. The answer is"
    n = len(tiny_tok.encode(text, add_special_tokens=False))
    for check_every in (1, 4, 8):
        zs, fin = scripted(tiny_tok, [text + " 7."], n, check_every)
        assert zs[0] == "So it is 7." and fin[0]


def test_greedy_eval_does_not_stop_at_template(tiny_tok):
    zs, fin = scripted(tiny_tok, ["So 7. The answer is 7.<|im_end|>"], 40, stop_at_template=False)
    assert zs[0] == "So 7. The answer is 7." and fin[0]


def test_pick_token_is_multinomial_and_greedy_below_zero():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]]).repeat(40000, 1)
    u = torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(latro.pick_token(logits, u), minlength=3).double() / 40000
    assert abs(counts[1] - 0.75) < 0.01 and counts[2] == 0
    assert latro.pick_token(logits[:2], torch.tensor([-1.0, 0.01], dtype=torch.float64)).tolist() == [1, 0]


def test_same_seed_same_rationales_and_loss(tiny_tok):
    lm = build_tiny_model(len(tiny_tok), seed=4)
    ex = data.Example("gsm8k", "a", "What is 2 plus 2?", "4")
    prompt = data.prompt_ids(tiny_tok, [ex])[0]
    engine = latro.Engine(copy_of(lm), [tiny_tok.eos_token_id])

    def run(seed):
        u = latro.question_uniforms(seed, step=3, question=1, k=4, length=24)
        zs, fin = engine.generate([prompt] * 4, 24, uniforms=u, tok=tiny_tok)
        ys = [latro.answer_ids(tiny_tok, ex, z, "<|im_end|>") for z in zs]
        ids, attn, zm, ym = latro.build_batch(prompt, zs, ys, 0)
        lz, ly = latro.score(latro.Scorer(lm), ids, attn, zm, ym)
        loss, _ = latro.latro_loss(lz.view(1, 4), lz.detach().view(1, 4), ly.view(1, 4), torch.tensor([fin]), 0.05)
        return zs, loss.item()
    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a[0] != c[0]


# ---------------------------------------------------------------- the layout rule (--parallel auto)

from fsdp_memory import MODELS  # noqa: E402  (the shapes the README's memory table names)

LLAMA_8B, PHI35 = (dict(MODELS[m], tie_word_embeddings=False) for m in ("llama-3.1-8b", "phi-3.5-mini"))


def test_auto_layout_is_the_rule_in_the_help(monkeypatch):
    """Several processes shard; one process on a GPU offloads when 16 B per parameter plus two compute-dtype
    copies exceed AUTO_OFFLOAD_SHARE of the GPU's memory; a CPU replicates. Parameter counts from the configs."""
    from transformers import LlamaConfig
    count = lambda kw: sum(p.numel() for p in latro.meta_model(LlamaConfig(**kw), torch.float32).parameters())
    n8b, phi = count(LLAMA_8B), count(PHI35)
    assert (n8b, phi) == (8_030_261_248, 3_821_079_552)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 10**9}))
    assert latro.auto_layout(n8b, 8, gpu, torch.bfloat16) == "shard"
    assert latro.auto_layout(phi, 1, gpu, torch.bfloat16) == "offload"          # 20 B x 3.8 B = 76 GB > 48 GB
    assert latro.auto_layout(phi, 1, torch.device("cpu"), torch.float32) == "replicate"
    assert latro.auto_layout(phi, 2, torch.device("cpu"), torch.float32) == "shard"
    # the threshold itself: just under and just over the share of an 80 GB GPU, in bf16 (20 bytes per parameter)
    edge = latro.AUTO_OFFLOAD_SHARE * 80 * 10**9 / 20
    assert latro.auto_layout(int(edge * 0.99), 1, gpu, torch.bfloat16) == "replicate"
    assert latro.auto_layout(int(edge * 1.01), 1, gpu, torch.bfloat16) == "offload"
    assert latro.auto_layout(int(edge * 0.99), 1, gpu, torch.float32) == "offload"   # fp32 copies: 24 B a parameter


# ---------------------------------------------------------------- flags

def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        latro.get_args(["--help"])
    text = capsys.readouterr().out
    for action in latro.get_args(["--model", "x"]).__dict__:
        assert f"--{action.replace('_', '-')}" in text
    assert "(default: None)" not in text and "(default: False)" not in text   # the help says what happens
    assert "(default: 16)" in text and "(default: 0.0)" in text                # real defaults are shown
    with pytest.raises(SystemExit):
        latro.get_args(["--model", "x", "--no-such-flag"])


@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--steps", "-3"), ("--lr", "-1e-3"), ("--lr", "0"), ("--lr", "nan"), ("--max-new-tokens", "-5"),
    ("--max-new-tokens", "0"), ("--micro-questions", "0"), ("--k", "0"), ("--val-size", "-1"), ("--beta", "-0.1"),
    ("--questions-per-rank", "0"), ("--eval-every", "-1"), ("--seed", "x"), ("--seed", "4294967296"),
    ("--weight-decay", "-1"), ("--save-every", "-2"),
])
def test_numeric_flags_are_range_checked_at_parse_time(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        latro.get_args(["--model", "x", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: " in err and len(err.strip().splitlines()) == 1


def test_lr_schedule_linear_to_zero():
    assert [latro.lr_at(s, 4, 1.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_global_batch_geometry():
    args = latro.get_args(["--model", "x", "--global-questions", "24"])
    assert latro.resolve_defaults(args, "gsm8k", 8, 7000, 200).questions_per_rank == 3
    args = latro.resolve_defaults(latro.get_args(["--model", "x"]), "arc_challenge", 8, 1000, 200)
    assert (args.global_questions, args.steps, args.beta) == (24, 35, 0.25)   # the paper's ARC setting
    args = latro.resolve_defaults(latro.get_args(["--model", "x", "--k", "8"]), "gsm8k", 8, 7000, 200)
    assert (args.steps, args.beta) == (234, 0.05)   # half the rollouts per step: twice the steps
    bad = [(["--global-questions", "24"], 5, 7000, 200, "--global-questions 24 does not divide over 5 processes"),
           (["--k", "1"], 1, 7000, 200, "--k 1: the leave-one-out baseline needs at least 2"),
           (["--global-questions", "40"], 1, 36, 4, "--global-questions 40 is more than the 36 train questions"),
           (["--heldout-questions", "8"], 1, 36, 4, "--heldout-questions 8 needs --val-size >= 8")]
    for argv, world, n_train, n_val, message in bad:
        with pytest.raises(SystemExit, match=message):
            latro.resolve_defaults(latro.get_args(["--model", "x", *argv]), "gsm8k", world, n_train, n_val)


def test_import_data_is_light():
    """`import data` needs neither a GPU, the network, nor the datasets package until something is loaded."""
    import subprocess
    import sys
    code = "import sys, data; assert 'datasets' not in sys.modules and 'torch' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], cwd=latro.os.path.dirname(latro.__file__), capture_output=True)
    assert p.returncode == 0, p.stderr


def traced_decode_step(lm, B, P, L):
    """The ATen graph of the engine's decode step, compiled as the engine compiles it (fullgraph, one shape),
    with a backend that records every node instead of handing it to Inductor: what any backend is asked for."""
    from torch._dynamo.backends.common import aot_autograd
    nodes = []

    def record(gm, example_inputs):
        nodes.extend((n.target, n.meta["val"]) for n in gm.graph.nodes
                     if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor))
        return gm.forward
    compile_ = torch.compile
    torch._dynamo.reset()
    try:
        latro.torch.compile = lambda fn, **kw: compile_(fn, **{**kw, "backend": aot_autograd(fw_compiler=record)})
        engine = latro.Engine(lm, [], compile=True)
    finally:
        latro.torch.compile = compile_
    engine.generate([[5 + i] * (P - i) for i in range(B)], L, uniforms=torch.rand(B, L, dtype=torch.float64))
    return nodes


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_reads_the_kv_cache_once(dtype):
    """Grouped-query attention (8 query heads on 2 KV heads): no intermediate of the compiled decode step is as
    large as B x H x S x D (a per-query-head copy of K or V), and the only ones as large as the cache itself,
    B x Hkv x S x D, are the in-place cache writes (index_copy, which Inductor turns back into in-place). In
    bf16 nothing of that size is fp32: the cache is never upcast."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    B, P, L, H, Hkv, D = 8, 64, 64, 8, 2, 16
    nodes = traced_decode_step(LlamaForCausalLM(cfg).eval().to(dtype), B, P, L)
    made = [(str(t), v) for t, v in nodes if not getattr(t, "is_view", False)]   # views alias, they copy nothing
    assert any("bmm" in t for t, _ in made)                                     # the attention is in the graph
    assert max(v.numel() for _, v in made) < B * H * (P + L) * D
    big = {t for t, v in made if v.numel() >= B * Hkv * (P + L) * D}
    assert big <= {"aten.index_copy.default"}, big
    assert not [t for t, v in made if v.numel() >= B * Hkv * (P + L) * D and v.dtype != dtype]


def test_eager_and_sdpa_configs_decode_like_the_plain_loop(tiny_tok):
    """The engine attends with its own decode attention whatever the config asks for: a model whose config
    selects eager (which ADDS a boolean mask) draws the plain loop's tokens, and so does one that selects sdpa."""
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in PROMPTS]
    u = torch.rand(4, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for attn in ("eager", "sdpa"):
        lm = build_tiny_model(len(tiny_tok), seed=8, attn_implementation=attn)
        assert lm.config._attn_implementation == attn
        want = plain_generate(lm, prompts, 24, tiny_tok.pad_token_id, [], uniforms=u)
        assert latro.Engine(copy_of(lm), []).generate(prompts, 24, uniforms=u) == want, attn


@pytest.mark.parametrize("L", [1, 2, 3])
def test_warm_up_stays_within_L(tiny_tok, L):
    """The warm-up steps before use (and before a CUDA-graph capture) run the decode step's own bookkeeping; with
    L of 1, 2 or 3 they must not index past L (an IndexError here, a dead GPU process under CUDA)."""
    lm = build_tiny_model(len(tiny_tok), seed=9)
    prompts = [tiny_tok.encode(t, add_special_tokens=False) for t in PROMPTS[:2]]
    u = torch.rand(2, L, dtype=torch.float64, generator=torch.Generator().manual_seed(L))
    engine = latro.Engine(copy_of(lm), [])
    engine.prepare({engine.shape(2, max(map(len, prompts)), L)})
    assert engine.generate(prompts, L, uniforms=u) == plain_generate(lm, prompts, L, tiny_tok.pad_token_id, [],
                                                                     uniforms=u)
    assert engine.late_compiles() == 0


def test_a_decode_step_that_fails_to_compile_stops_at_start_up_naming_the_flag(tiny_tok, monkeypatch):
    def broken(fn, **kw):
        def step(st):
            raise RuntimeError("inductor: no kernel for this")
        return step
    monkeypatch.setattr(latro.torch, "compile", broken)
    engine = latro.Engine(build_tiny_model(len(tiny_tok), seed=1), [], compile=True)
    with pytest.raises(SystemExit, match=r"failed to compile for 8 rows x \(64 \+ 8\) tokens \(RuntimeError: inductor: "
                                         r"no kernel for this\); --compile off turns that part off"):
        engine.prepare({engine.shape(3, 10, 8)})


@pytest.mark.slow
def test_nothing_compiles_after_start_up_unless_a_shape_was_missed(tiny_tok, capsys):
    """After `prepare`, the shapes it compiled run without compiling; a shape it did not see compiles, warns and
    is counted in late_compiles (dynamo's own count)."""
    torch._dynamo.reset()
    engine = latro.Engine(build_tiny_model(len(tiny_tok), seed=1), [], compile=True)
    prompt = tiny_tok.encode("Eggs", add_special_tokens=False)
    engine.prepare({engine.shape(3, len(prompt), 8)})
    engine.generate([prompt] * 3, 8)
    assert engine.late_compiles() == 0
    engine.generate([prompt] * 12, 8)                       # 16 rows after bucketing: not prepared
    assert engine.late_compiles() >= 1 and "compiles mid-run" in capsys.readouterr().err


def test_torch_memory_tracker_counts_the_state_the_arithmetic_says():
    """tests/fsdp_memory.py drives latro.py's wrapping and scoring under torch's FSDP2 memory tracker, on fake
    tensors and a fake process group of 8 ranks: one rank keeps 4 bytes of fp32 weights and 8 of AdamW state per
    parameter / 8, and beside them the two bf16 copies and the KV cache (a 2-layer model of Llama-3.1-8B's
    width; in a subprocess, whose process group is its own)."""
    import json
    import subprocess
    import sys
    code = ("import argparse, json, sys; sys.path.insert(0, 'tests'); import fsdp_memory as f; shape = "
            "dict(f.MODELS['llama-3.1-8b'], num_hidden_layers=2); a = argparse.Namespace(k=4, questions=3, "
            "prompt=64, L=64, lr=5e-7); print(json.dumps(f.tracked(shape, 8, a)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(latro.__file__), capture_output=True,
                         text=True, timeout=3600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    t = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import LlamaConfig
    n = sum(p.numel() for p in latro.meta_model(LlamaConfig(**(LLAMA_8B | {"num_hidden_layers": 2})), torch.float32).parameters())
    kv = 12 * 128 * 2 * 2 * 8 * 128 * 2                                    # rows x tokens x layers x K,V x heads x dim x bf16
    assert t["layout"] == "shard" and t["state"] == pytest.approx(12 * n / 8 / 2**30, rel=1e-3)
    assert t["kept"] == pytest.approx(t["state"] + (2 * 2 * n + kv) / 2**30, rel=1e-3)
    assert t["peak"] > t["kept"] + 4 * n / 8 / 2**30                      # the gradients, at least, come on top


def test_teach_probe_splits_step_0_advantages_by_kind(tiny_dir):
    """tests/teach_probe.py (the README's figures on what a step rewards) runs on latro.py's own sampler and
    scorer: one summary line, then one line per gamma asked, each splitting the advantages by kind."""
    from conftest import run_script
    r = run_script("tests/teach_probe.py", ["--model", tiny_dir, "--dataset", "arith:3", "--questions", "3",
                                            "--k", "3", "--max-new-tokens", "6", "--gamma", "2", "1.5"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "3 questions x K 3, L 6" in lines[0]
    assert [l.split(":")[0] for l in lines[-2:]] == ["gamma 2", "gamma 1.5"]
    assert all("mean advantage right" in l and "share of the positive advantage on wrong" in l and "stub" in l
               for l in lines[-2:])
