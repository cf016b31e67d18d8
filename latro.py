"""
latro.py: LaTRO (LaTent Reasoning Optimization, Chen et al. 2024, arXiv 2411.04282) in one file.

What it does: for every question x the model samples K chain-of-thought rationales z_1..z_K, appends the gold
answer y = "The answer is {gold}." after each, and scores everything with ONE forward of the policy over
[x ; z ; y] and ONE forward of a frozen reference copy (read at the z positions). Each rationale's self-reward is
the log-likelihood of the gold answer after it minus a KL penalty; REINFORCE with a leave-one-out baseline pushes
the policy towards rationales that make the answer likely, and a direct gradient on log pi(y|x+z) teaches the
answer itself. No reward model, no value network. The loop is plain torch.distributed under torchrun, with
PyTorch's FSDP2 holding fp32 master weights: replicated, sharded, or sharded with the state on the host.

The objective (paper Eq. 2-4), per question, with sums over tokens (no length normalisation):
    r_k  = log pi(y | x+z_k)  -  beta * [ log pi(z_k|x) - log pi_0(z_k|x) ]         self-reward, k1 KL
    A_k  = r_k - 1/(K-1) * sum_{j!=k} r_j                                            leave-one-out baseline
    grad = 1/(N K) sum_i sum_k [ A_k * grad log pi(z_k|x)  +  w_sft * grad log pi(y|x+z_k) ]
    loss = mean over the GLOBAL N*K rationales of [ -stopgrad(A_k) * log pi(z_k|x) - w_sft * log pi(y|x+z_k) ]

Departures from the paper / official code (SalesforceAIResearch/LaTRO), and why:
1. Non-stop penalty: an unfinished rationale's answer reward is gamma * mean(log pi(y|x+z)) of the SAME
   question's K rationales; the official mean over the GPU's batch mixes questions and depends on the GPU count.
2. w_sft = 1 by default, as in the paper's Eq. 4; the official script ships 0 (`--sft-weight 0` restores it).
3. z ends at the end-of-turn / EOS token or where the first answer template of the official list starts ("The
   answer is", "the answer is", "So, the answer is", "Therefore, the answer is", "so the final answer is",
   "Answer:"; case-sensitive, on word boundaries), found in the DECODED text (the official code matches token
   ids, which misses other tokenisations). Neither is part of z, so log pi(z|x) leaves out the stop.
4. Sampling stops as soon as every row has stopped (the official code always generates L tokens).
5. log pi(y|x+z) covers exactly the tokens of y (the official code also scores z's last token), and y is
   tokenised in context, after z, as the model would write it (the official code tokenises y alone).
6. Fused scoring: 1 policy forward with gradient + 1 reference forward (official: 3 without + 2 with), with
   log-probs only at z and y positions, chunk by chunk, never a [B, T, V] fp32 tensor.
7. Each question has its own random stream, seeded by (seed, step, question): the same rationales whatever the
   number of processes, and a resumed run repeats an uninterrupted one.
8. Checkpoints are selected on a held-out slice of train (`--val-size`), never on the test set.
9. Token t is the inverse CDF of softmax(logits) at a uniform u (exactly multinomial sampling at temperature 1,
   no top-k / top-p), drawn from a bf16 replica of the policy refreshed after every update.
10. The GSM8K gold loses its thousands commas ("The answer is 1000."; the official y keeps "1,000").

How to read this file. The method comes first, in the paper's order: the objective (Eq. 2-4) and its
leave-one-out estimator, then what the estimator consumes (the log-probabilities of one scoring forward, the
rationales of the sampler), then one training step that joins them, and the loop that repeats it: Eq. 4 is on
the first screen and every quantity is defined before the step that uses it. A reader who stops at the
"machinery" divider has read the whole algorithm; calls into the machinery are one line each (`setup`,
`engine.generate`, `save_checkpoint`); the map below lists what follows it.

Commands (the README has the CPU quick start with the real SmolLM2-135M-Instruct):
    python latro.py --model microsoft/Phi-3.5-mini-instruct --dataset gsm8k     # 1 GPU: auto picks offload
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B         # 8 x 80 GB: auto shards
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B-Instruct --dataset gsm8k   # the paper
    torchrun --nproc_per_node=2 latro.py --model TINY_FOLDER --dataset FILE.jsonl --k 3   # CPU, gloo (the tests)

Map:
    section                 what it holds                                          paper
    1  The objective        rloo_advantages, latro_loss, lr_at                     Eq. 2-4, Prop. 2, Sec. 5.1
    2  Scoring              Scorer, score, build_batch, answer_ids                 log pi(z|x), log pi(y|x+z)
    3  Sampling             question_uniforms, pick_token, stop rules, rollout     z ~ pi(.|x) at T=1, Sec. 4.3
    4  One step             score_and_backward, train_step                         Eq. 4 applied, AdamW
    5  The loop             validate, evaluate_and_keep_best, main                 selection on a train slice
    --- machinery ---
    6  The engine           KVCache, RotaryTable, decode_attention, Engine         (fast z ~ pi(.|x))
    7  Models               paths, tokenizers, rank 0 reads and the others receive
    8  Distributed          setup_distributed, auto_layout, wrap (FSDP2), collectives, the data order
    9  Flags                get_args, resolve_defaults
    10 The run folder       lock, checksummed checkpoints swapped in whole, resume, signals
    11 Setup                setup, build, restore
"""
import argparse, contextlib, copy, ctypes, fcntl, functools, hashlib, json
import math, os, random, re, shutil, signal, socket, sys, time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data

# Paper Sec. 5.1: beta per task, and the number of optimizer steps at 24 questions x 16 rationales per step.
PAPER_BETA = {"gsm8k": 0.05, "arc_challenge": 0.25}
PAPER_STEPS = {"gsm8k": 117, "arc_challenge": 35}
PAPER_ROLLOUTS_PER_STEP = 24 * 16

# 1. The objective (paper Eq. 2-4) ---------------------------------------------------------------------------

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K): A_k = r_k - mean_{j != k} r_j (leave-one-out baseline)."""
    K = rewards.shape[1]
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)             # (N, K)
    return rewards - baseline

def latro_loss(logp_z, logp_z_ref, logp_y, finished, beta: float, sft_weight: float = 1.0, penalty: float = 2.0):
    """All inputs (N, K); `finished` bool. Returns (loss, stats). The gradient of the loss is minus the
    paper's estimator: 1/(NK) sum [A_k grad logp_z + w grad logp_y]."""
    with torch.no_grad():
        answer_reward = logp_y.detach()                                       # (N, K) log pi(y|x+z)
        # non-stop penalty: gamma x mean answer reward of the same question (LATRO.md sec. 3, departure 1)
        answer_reward = torch.where(finished, answer_reward, penalty * answer_reward.mean(1, keepdim=True))
        kl = logp_z.detach() - logp_z_ref                                     # (N, K) k1 estimate of the KL
        reward = answer_reward - beta * kl                                    # (N, K) self-reward r_k
        advantage = rloo_advantages(reward)                                   # (N, K) A_k
    objective = advantage * logp_z + sft_weight * logp_y                      # (N, K) REINFORCE + answer term
    loss = -objective.mean()
    stats = {"loss": loss.item(), "reward": reward.mean().item(), "logp_y": logp_y.detach().mean().item(),
             "kl": kl.mean().item(), "elbo": (logp_y.detach() - beta * kl).mean().item(),
             "unfinished": (~finished).float().mean().item(), "advantage_abs": advantage.abs().mean().item(),
             # questions whose K rationales all reached L: one shared answer reward, so A_k is the KL term alone
             "no_signal": (~finished).all(1).float().mean().item()}
    return loss, stats

def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear decay from lr to 0 over `steps`, no warm-up (paper Sec. 5.1)."""
    return lr * max(0.0, 1.0 - step / steps)

# 2. Scoring: log pi(z|x) and log pi(y|x+z) from one forward, log-probs at z and y positions only ------------

def _chunk_logprobs(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                                  # (M, V) upcast before softmax
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)   # (M,)

class Scorer(torch.nn.Module):
    """Wraps a causal LM (a module of our own, so FSDP2 hooks this forward): (B, T-1) log-probs of the tokens at
    `target_mask` (token t+1 predicted from position t), zero elsewhere. The vocabulary projection runs `chunk`
    positions at a time, recomputed in backward: the (M, V) fp32 logits never exist all at once."""

    def __init__(self, lm, chunk: int = 1024):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, attention_mask, target_mask):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state     # (B, T, H)
        sel = target_mask[:, 1:]                                              # (B, T-1)
        h, targets = hidden[:, :-1][sel], input_ids[:, 1:][sel]               # (M, H), (M,)
        head, parts = self.lm.get_output_embeddings(), []
        for i in range(0, h.shape[0], self.chunk):
            args = (head, h[i:i + self.chunk], targets[i:i + self.chunk])
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_logprobs(*args))
        out = hidden.new_zeros(sel.shape, dtype=torch.float32)               # (B, T-1)
        return out.masked_scatter(sel, torch.cat(parts)) if parts else out

def score(scorer, ids, attn, z_mask, y_mask):
    """(logp_z, logp_y): per-row SUMS of token log-probs over z and over y, from one forward."""
    tok_logp = scorer(ids, attn, z_mask | y_mask)                             # (B, T-1)
    logp_z = (tok_logp * z_mask[:, 1:]).sum(-1)                               # (B,)
    logp_y = (tok_logp * y_mask[:, 1:]).sum(-1)                               # (B,)
    return logp_z, logp_y

def build_batch(prompt: list, zs: list, ys: list, pad_id: int):
    """Right-padded [x ; z ; y] rows and the masks of the z and y tokens (all (B, T))."""
    rows = [prompt + z + y for z, y in zip(zs, ys)]
    T, B = max(len(r) for r in rows), len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn, z_mask, y_mask = (torch.zeros(B, T, dtype=torch.bool) for _ in range(3))
    for i, (z, y) in enumerate(zip(zs, ys)):
        P, Z = len(prompt), len(z)
        ids[i, :len(rows[i])] = torch.tensor(rows[i])
        attn[i, :len(rows[i])] = True
        z_mask[i, P:P + Z] = True            # exactly the rationale tokens
        y_mask[i, P + Z:P + Z + len(y)] = True  # exactly the answer tokens, end-of-turn included
    return ids, attn.long(), z_mask, y_mask

def answer_ids(tok, ex, z_ids: list, eot: str) -> list:
    """Token ids of y after z, tokenised IN CONTEXT: encode(decode(z) + sep + y), keep what follows z, so a
    SentencePiece model gets the "▁The" it would write there (y alone can give an extra "▁", or "▁The" after a
    newline). sep: a space unless z ends in whitespace. If z's and y's tokens would merge, y follows a newline."""
    z_text = tok.decode(z_ids)
    y_text = ("" if not z_text or z_text[-1].isspace() else " ") + data.answer_text(ex) + eot
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    head, full = enc(z_text), enc(z_text + y_text)
    if full[:len(head)] == head:             # the usual case: z's own tokens are a prefix of the whole
        return full[len(head):]
    anchor = enc("\n")
    return enc("\n" + y_text)[len(anchor):]

# 3. Sampling: z ~ pi(.|x) at temperature 1, cut at the end of turn or the first answer template (Sec. 4.3) ---

# The official stop list (trainer_config.stop_seqs), case-sensitive, matched on word boundaries in the text.
TEMPLATE = re.compile(r"\b(?:Answer:|(?:So, |Therefore, )?[Tt]he answer is(?!\w)|so the final answer is(?!\w))")

def question_uniforms(seed: int, step: int, question: int, k: int, length: int) -> torch.Tensor:
    """(k, length) uniforms from the question's own stream: same rationales whatever the world size."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + question) % 2**63)
    return torch.rand(k, length, generator=g, dtype=torch.float64)

def pick_token(logits: torch.Tensor, u) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: the inverse CDF of softmax(logits) at u (multinomial at temperature 1);
    greedy (argmax) where u < 0, or everywhere when u is None. No host sync: it runs inside the graph."""
    if u is None:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)                             # (B, V)
    drawn = torch.searchsorted(cdf, (u.clamp(min=0) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return torch.where(u < 0, logits.argmax(-1), drawn.clamp(max=logits.shape[-1] - 1))

def template_cut(tok, ids: list, complete: bool = True):
    """If the decoded text of `ids` holds an answer template, the index where z ends (before the token in which the
    FIRST template starts); else None. A template at the end of an unfinished text waits for one more character
    ("The answer is" may still become "The answer isn't"): stops do not depend on when they are checked."""
    text = tok.decode(ids)
    m = TEMPLATE.search(text)
    if m is None or (not complete and m.end() == len(text) and text[-1].isalnum()):
        return None
    cut = len(ids)
    while cut > 0 and len(tok.decode(ids[:cut])) > m.start():   # the template's first token is not part of z
        cut -= 1
    return cut

def stop_position(ids: list, start: int, stop: set, tok=None, final: bool = False):
    """Where z ends if the row stopped within ids[start:], else None: at its first stop token, or earlier at the
    first answer template (searched only when `tok` is given) of the text before that token."""
    end = next((t for t in range(start, len(ids)) if ids[t] in stop), None)
    cut = template_cut(tok, ids[:end], complete=end is not None or final) if tok is not None else None
    return cut if cut is not None else end

def rollout(engine, tok, exs, qidx, step, args):
    """Sample K rationales per question; returns per question (prompt ids, z list, finished list)."""
    prompts = [p for p in data.prompt_ids(tok, exs) for _ in range(args.k)]
    # q is the question's position in the GLOBAL step, so its stream is the same on any rank
    uniforms = [question_uniforms(args.seed, step, q, args.k, args.max_new_tokens) for q in qidx]
    # all K rationales of all questions of this rank in one batch; `tok` turns on the template stop
    zs, fin = engine.generate(prompts, args.max_new_tokens, uniforms=torch.cat(uniforms), tok=tok)
    K = args.k
    return [(prompts[i * K], zs[i * K:(i + 1) * K], fin[i * K:(i + 1) * K]) for i in range(len(exs))]

# 4. One step on one rank: sample, score, update -------------------------------------------------------------

def score_and_backward(run, exs, rolls):
    """Fused scoring and backward, micro-batch by micro-batch; returns summed stats over this rank."""
    a, tok, model, dev = run.args, run.tok, run.model, run.device
    K, m = a.k, a.micro_questions
    sums, n_micro = {}, len(exs) // m
    for j in range(n_micro):
        # whole questions per micro-batch: the leave-one-out baseline needs a question's K rewards together
        batch = [build_batch(rolls[i][0], rolls[i][1], [answer_ids(tok, exs[i], z, run.eot) for z in rolls[i][1]],
                             tok.pad_token_id) for i in range(j * m, (j + 1) * m)]
        T = max(b[0].shape[1] for b in batch)
        pad = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)
        ids = torch.cat([pad(b[0], tok.pad_token_id) for b in batch]).to(dev)   # (m*K, T)
        attn, z_mask, y_mask = (torch.cat([pad(b[i], 0) for b in batch]).to(dev) for i in (1, 2, 3))
        finished = torch.tensor([f for i in range(j * m, (j + 1) * m) for f in rolls[i][2]], device=dev)
        # the reference first, without gradient, so its activations are gone before the policy's exist
        with torch.no_grad():
            logp_z_ref = (run.ref(ids, attn, z_mask) * z_mask[:, 1:]).sum(-1)   # (m*K,) reference, z only
        model.lm.train(a.grad_checkpointing)  # HF checkpoints only in train mode; dropout is already 0
        if a.parallel == "replicate":          # all-reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(j == n_micro - 1)
        logp_z, logp_y = score(model, ids, attn, z_mask, y_mask)               # (m*K,) each, with grad
        loss, stats = latro_loss(logp_z.view(m, K), logp_z_ref.view(m, K), logp_y.view(m, K),
                                 finished.view(m, K), a.beta, a.sft_weight, a.penalty)
        # loss is a mean over this micro-batch's m*K rows; rescale to a mean over the GLOBAL batch.
        # FSDP2 averages gradients over ranks, hence the extra factor `world`.
        (loss * (m / a.global_questions) * run.world).backward()
        model.lm.eval()
        for key, v in stats.items():  # sums, not means: the loop divides by the global row count after all_sum
            sums[key] = sums.get(key, 0.0) + v * m * K
        sums["z_len"] = sums.get("z_len", 0.0) + z_mask.sum().item()
    return sums

def train_step(run, step: int) -> dict:
    """Sample, score, update: one LaTRO step. A step whose loss or gradient norm is not finite makes no update.
    A checkpoint asked for at the end of the previous step is written here, before this step's update: it is
    then known to be good (the state it holds gave this step a finite loss and gradient)."""
    a, dev, opt, gpu = run.args, run.device, run.opt, run.device.type == "cuda"
    for g in opt.param_groups:  # the schedule is a function of the step: nothing to restore on resume
        g["lr"] = lr_at(step, a.steps, a.lr)
    idx = global_questions(len(run.train), step, a.global_questions, a.seed)
    mine = list(range(run.rank, a.global_questions, run.world))   # positions in the step, strided by rank
    exs = [run.train[idx[q]] for q in mine]
    t = [time.time()]                                                # when each phase ends: its seconds are logged
    torch.cuda.reset_peak_memory_stats(dev) if gpu else None         # and on a GPU, the step's peak memory
    rolls = rollout(run.engine, run.tok, exs, mine, step, a)        # phase 1: K rationales per question
    t.append(time.time())
    sums = score_and_backward(run, exs, rolls)                       # phase 2: fused scoring, loss, backward
    t.append(time.time())
    # the global gradient norm is logged every step; with --grad-clip 0 (paper) the max norm is infinite
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    keys = sorted(sums)   # every rank holds sums over its own rows: add them up, divide by the global rows
    tot = {k: v / (a.global_questions * a.k) for k, v in zip(keys, all_sum([sums[k] for k in keys], dev))}
    finite = math.isfinite(norm) and math.isfinite(tot["loss"])
    if finite and run.pending_save:                                  # the state before this update is good
        save_checkpoint(run, step, confirmed=True)
    if finite:                                                       # phase 3: AdamW, then the replica follows
        opt.step()
        refresh_replica(run.replica, run.model)
    opt.zero_grad(set_to_none=True)
    t.append(time.time())
    secs = dict(zip(("t_sample", "t_score", "t_update"), (end - start for start, end in zip(t, t[1:]))))
    rec = {"step": step + 1, **tot, "grad_norm": norm, "lr": opt.param_groups[0]["lr"], "seconds": t[-1] - t[0],
           **secs, "sample_tokens_per_s": tot["z_len"] * a.global_questions * a.k / secs["t_sample"] / run.world,
           "decode_shapes": len(run.engine.states), "late_compiles": run.engine.late_compiles()}
    rec |= {"peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30} if gpu else {}
    return rec | ({} if finite else {"skipped": "non-finite loss or gradient norm: no update"})

# 5. The loop: validation, the best checkpoint, and main -----------------------------------------------------

@torch.no_grad()
def validate(run) -> dict:
    """Greedy accuracy on the validation slice (strided over ranks) and mean log pi(y|x+z) on the fixed held-out
    rollouts. Both use the replica (the current policy in the compute dtype), which runs no collective, so any
    number of questions over any number of ranks is fine; the sums are then added up once."""
    a, tok, engine = run.args, run.tok, run.engine
    mine = run.val[run.rank::run.world]
    correct, batch = 0, a.questions_per_rank * a.k          # the training rollout's rows: the same decode graph
    for i in tqdm(range(0, len(mine), batch), desc="validation", leave=False, disable=not run.master):
        exs = mine[i:i + batch]
        outs, _ = engine.generate(data.prompt_ids(tok, exs), a.eval_max_new_tokens)
        correct += sum(data.is_correct(e, tok.decode(o, skip_special_tokens=True)) for e, o in zip(exs, outs))
    # the held-out self-reward: same questions, same rationales at every evaluation, so its changes are the
    # policy's alone (a learning curve free of sampling noise)
    scorer, logp_y_sum, rows = Scorer(run.replica, LOGPROB_CHUNK), 0.0, 0
    for ids, attn, z_mask, y_mask in run.heldout[run.rank::run.world]:
        _, logp_y = score(scorer, ids.to(run.device), attn.to(run.device), z_mask.to(run.device), y_mask.to(run.device))
        logp_y_sum, rows = logp_y_sum + logp_y.sum().item(), rows + ids.shape[0]
    correct, n, lsum, lcount = all_sum([correct, len(mine), logp_y_sum, rows], run.device)
    rec = {"val_accuracy": correct / max(n, 1), "val_n": int(n)}
    return rec | ({"heldout_logp_y": lsum / lcount} if lcount else {})

def evaluate_and_keep_best(run, step: int):
    """Validate; OUT/best follows the best accuracy. Ties (common with a small slice or a weak model) go to the
    higher held-out log pi(y|x+z), or without held-out questions to the later step: the trained model."""
    rec = {"step": step, **validate(run)}
    log(run, rec, f"step {step:4d} | validation accuracy {rec['val_accuracy']:.3f} of {rec['val_n']}"
        + (f" | held-out log pi(y|x+z) {rec['heldout_logp_y']:.2f}" if "heldout_logp_y" in rec else ""))
    key = [rec["val_accuracy"], rec.get("heldout_logp_y", step)]
    if run.best is None or key > run.best["key"]:
        run.best = {"key": key, "step": step, "val_accuracy": rec["val_accuracy"]}
        save_best(run, rec)

def main(argv=None):
    args = get_args(argv)
    signals = StopSignals()
    run = setup(args)                                                # data, models, engine, resume
    if run is None:                                                  # a resumed run that had finished
        return close_distributed()
    a, bad, why, done = run.args, 0, "done", run.start
    if a.eval_every and run.val and run.start == 0:
        evaluate_and_keep_best(run, 0)
    for step in range(run.start, a.steps):
        rec = train_step(run, step)                                  # sample, score, update
        done = step + 1
        log(run, rec, f"step {done:4d} | reward {rec['reward']:8.2f} | log pi(y|x+z) {rec['logp_y']:7.2f} | KL "
            f"{rec['kl']:6.3f} | unfinished {rec['unfinished']:.2f} | {rec['seconds']:.0f} s"
            + (" | SKIPPED: non-finite" if "skipped" in rec else ""))
        bad = bad + 1 if "skipped" in rec else 0
        if bad >= MAX_BAD_STEPS:
            stop_diverged(run, first_bad=done - bad + 1, last=rec)    # rolls checkpoint/ back, exits 1
        if a.eval_every and run.val and (done % a.eval_every == 0 or done == a.steps):
            evaluate_and_keep_best(run, done)
        sig = stop_requested(run, signals)                           # all ranks agree (signals, failed writes)
        due, end = a.save_every and done % a.save_every == 0, done in (a.steps, a.stop_after) or sig
        if end and (due or sig == signal.SIGTERM or done in (a.steps, a.stop_after)):
            save_checkpoint(run, done, confirmed=False)              # no next step is left to confirm it
        elif due:   # a periodic checkpoint waits for the next step's loss to confirm it (see train_step)
            run.pending_save = True
        if end:
            why = signal.Signals(sig).name if sig else ("done" if done == a.steps else "stopped (--stop-after)")
            break
    summary(run, done, why)
    close_distributed()
    if signals.received:          # the conventional status of a process ended by a signal: 130 / 143
        raise SystemExit(128 + signals.received)

# ==========================================================================================================
# The machinery: everything below keeps the method above fast and safe at scale. The algorithm is complete
# without it; read on to see how sampling is made fast, how models load, and how a run survives.
# ==========================================================================================================

# 6. The engine: one decode step per token, compiled and captured once per shape -----------------------------

PROMPT_BUCKET = 64      # compiled / captured, prompt lengths are padded to a multiple of this (a few shapes a run)
ROW_BUCKET = 8          # ... and rows to a multiple of this
STOP_CHECK_EVERY = 8    # decode steps between stop checks (each is one host sync)

def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

class KVCache:
    """A static KV cache that the attention layers write through `update`: per layer a (B, Hkv, S, D) key and
    value view into one flat buffer shared by every shape. `index`: the columns the next forward writes."""

    def __init__(self, buf: torch.Tensor, B: int, S: int, heads: int, dim: int):
        view = lambda l, kv: buf[l, kv, :B * heads * S * dim].view(B, heads, S, dim)
        self.k, self.v, self.index = [view(l, 0) for l in range(len(buf))], [view(l, 1) for l in range(len(buf))], None

    def update(self, key, value, layer_idx, **_):
        self.k[layer_idx].index_copy_(2, self.index, key)
        self.v[layer_idx].index_copy_(2, self.index, value)
        return self.k[layer_idx], self.v[layer_idx]

class RotaryTable(torch.nn.Module):
    """A model's rotary embedding as a table indexed by position (as gpt-fast does): the same values, and no data-
    dependent control flow (Phi-3's longrope) in a captured step. Gemma-3: a table per layer type (sliding, full)."""

    def __init__(self, rotary, length: int, dtype, device):
        super().__init__()
        x, pos = torch.zeros(1, dtype=dtype, device=device), torch.arange(length, device=device)[None]
        types = getattr(rotary, "layer_types", None) or [None]
        self.tables = {t: [c[0] for c in rotary(x, pos, *[t] * (t is not None))] for t in types}   # (length, D)

    def forward(self, x, position_ids, layer_type=None):
        cos, sin = self.tables[layer_type]
        return cos[position_ids], sin[position_ids]

def decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The engine's attention (registered with transformers as "latro"). One new token per row reads the KV cache
    once: its H query heads fold onto the Hkv cache heads as (B, Hkv, H/Hkv, D), so grouped-query models (Llama-3-8B:
    32 / 8) never copy K or V per query head, as transformers' SDPA path does (`repeat_kv`) under torch.compile or
    with a mask on CUDA. Products in the compute dtype, the softmax in fp32. Prompts (T > 1) go to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    B, H, T, D = query.shape
    if T > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    Hkv = key.shape[1]
    q = query.view(B, Hkv, H // Hkv, D)                                  # a KV head's query heads, together
    scores = torch.matmul(q, key.transpose(2, 3)).float() * (scaling or D ** -0.5)   # (B, Hkv, H/Hkv, S)
    scores = scores.masked_fill(~attention_mask, float("-inf"))          # mask (B, 1, 1, S): True = visible
    out = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value)   # (B, Hkv, H/Hkv, D)
    return out.reshape(B, 1, H, D), None                                  # (B, T, H, D), as HF expects

class Engine:
    """The sampler: a plain model (in training, the bf16 replica of the policy, refreshed in place), a KV buffer sized
    once, and one decode state per bucketed shape (rows, prompt length, L). A decode step is one function of device
    tensors (the forward over the newest token, the token pick at the row's uniform, the mask / position / cache
    column updates), on a GPU compiled and captured once per shape as a CUDA graph (`prepare`: every shape of a run,
    before step 1), then replayed for every token. Only the stop check, every STOP_CHECK_EVERY tokens, is on host."""

    def __init__(self, lm, stop_ids, compile=False, graphs=False):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register("latro", decode_attention)
        AttentionMaskInterface.register("latro", sdpa_mask)   # full-sequence forwards (held-out scoring): SDPA's
        if hasattr(lm, "set_attn_implementation"):   # whatever the config asks: eager ADDS a bool mask, flash has none
            lm.set_attn_implementation("latro")
        self.lm, self.stop, self.compiled, self.graphs = lm, set(stop_ids), compile, graphs
        # buckets keep the number of compiled / captured shapes small; an eager step runs any shape as it is
        self.prompt_bucket, self.row_bucket = (PROMPT_BUCKET, ROW_BUCKET) if compile or graphs else (1, 1)
        cfg, p = lm.config, next(lm.parameters())
        self.device, self.dtype, self.layers = p.device, p.dtype, cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.buf, self.states, self.prepared, self.max_len = None, {}, None, context_length(cfg)
        decoder = lm.get_decoder()
        if hasattr(decoder, "rotary_emb") and not isinstance(decoder.rotary_emb, RotaryTable):
            decoder.rotary_emb = RotaryTable(decoder.rotary_emb, self.max_len, self.dtype, self.device)
        if compile:   # one compiled function: dynamic=False specialises it per bucketed shape (a handful per run)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.pool = torch.cuda.graph_pool_handle() if graphs else None   # graphs of all shapes share memory

    def shape(self, rows: int, longest_prompt: int, max_new: int) -> tuple:
        """The decode state (rows, prompt columns, L) of a batch; a bucket never pushes a fitting prompt out."""
        P = min(round_up(longest_prompt, self.prompt_bucket), max(longest_prompt, self.max_len - max_new))
        return round_up(rows, self.row_bucket), P, max_new

    def reserve(self, rows: int, length: int):
        """Allocate the KV buffer for `rows` x `length` tokens up front (it grows on demand otherwise)."""
        need = round_up(rows, self.row_bucket) * self.kv_heads * length * self.head_dim
        if self.buf is None or self.buf.shape[-1] < need:
            self.buf, self.states = None, {}           # every view and graph of the old buffer goes with it
            self.buf = torch.zeros(self.layers, 2, need, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def prepare(self, shapes) -> float:
        """Compile and capture every decode shape of a run before it starts: nothing compiles mid-run, where one
        rank would compile for minutes while the others wait in a collective. Returns the seconds it took."""
        t0 = time.time()
        if shapes:   # the KV buffer for the largest shape first: a bigger one later would drop every graph
            B, P, L = max(shapes, key=lambda s: s[0] * (s[1] + s[2]))
            self.reserve(B, P + L)
        for B, P, L in sorted(shapes):
            self._state(B, P, L)
        self.prepared = self.late_compiles()
        return time.time() - t0

    def late_compiles(self) -> int:
        """Compilations (dynamo's own count) and captures since `prepare`: a run should have none."""
        n = len(self.states) * self.graphs + torch._dynamo.utils.counters["stats"]["unique_graphs"] * self.compiled
        return n - (self.prepared or 0)

    def _state(self, B: int, P: int, L: int):
        """The decode state of one shape: the persistent tensors a captured graph reads and writes, warmed up."""
        if (B, P, L) not in self.states:
            if len(self.states) >= 64 and not (self.graphs or self.compiled):   # eager: a bounded cache of shapes
                self.states.clear()
            if self.prepared is not None and (self.graphs or self.compiled):
                print(f"warning: decode shape {B, P, L} compiles mid-run (see late_compiles)", file=sys.stderr)
            self.reserve(B, P + L)
            z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=self.device)
            st = SimpleNamespace(cache=KVCache(self.buf, B, P + L, self.kv_heads, self.head_dim), graph=None,
                                 token=z(B, 1), pos=z(B, 1), col=z(1), t=z(1), mask=z(B, 1, 1, P + L, dt=torch.bool),
                                 u=z(B, L, dt=torch.float64), out=z(B, L))
            try:
                self._warm_up(st)
            except Exception as e:   # Inductor, Triton, CUDA, a model's own code: many types, one line
                what = f"the sampler's decode step failed to {self.phase} for {B} rows x ({P} + {L}) tokens " \
                       f"({type(e).__name__}: {first_line(e)})"   # compiling or capturing: eager may still work
                raise SystemExit(f"{what}; {'--cuda-graphs' if self.phase == 'capture' else '--compile'} off turns "
                                 f"that part off" if self.phase != "run" else f"{what}: the engine cannot drive this "
                                 f"{self.lm.config.model_type!r} model; it needs a decoder whose attention takes "
                                 f"transformers' attention and cache interfaces (Llama, Qwen, Mistral, Phi, ...)"
                                 ) from None
            self.states[B, P, L] = st
        return self.states[B, P, L]

    def _warm_up(self, st):
        """Run the decode step before use (compiling it), then capture it as a CUDA graph. Each warm-up step starts
        at token 0 (u[:, 0], out[:, 0]: within any L; `generate` rewrites it all). Eager runs one, for the tests."""
        st.cache.index, side = st.col, torch.cuda.Stream() if self.graphs else None
        self.phase = "compile" if self.compiled else "run"
        for _ in range(2 if self.compiled or self.graphs else 1):
            st.t.zero_(), st.col.zero_(), st.mask[..., 0].fill_(True)
            if side is not None:   # warm-up on a side stream, as CUDA-graph capture requires
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.step(st)
                torch.cuda.current_stream().wait_stream(side)
            else:
                self.step(st)
        if self.graphs:
            self.phase, st.graph = "capture", torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph, pool=self.pool):
                self.step(st)

    def _step(self, st):
        """One decode step, device tensors only: token t-1 goes in at cache column `col`, token t comes out."""
        st.mask.index_fill_(3, st.col, True)                  # the new token's column becomes visible
        logits = self.lm(input_ids=st.token, attention_mask=st.mask, position_ids=st.pos, cache=st.cache,
                         use_cache=True).logits[:, -1]         # (B, V)
        nxt = pick_token(logits.float(), st.u.index_select(1, st.t).squeeze(1))   # (B,)
        st.out.index_copy_(1, st.t, nxt[:, None])
        st.token.copy_(nxt[:, None])
        st.pos.add_(1), st.col.add_(1), st.t.add_(1)

    def _prefill(self, st, prompts: list, B: int, P: int, S: int, uniforms):
        """Left-padded prompts through the model in one forward; the first token drawn; the state set up."""
        dev, B0 = self.device, len(prompts)
        ids = torch.full((B, P), self.lm.config.pad_token_id or 0, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for i, p in enumerate(prompts + [prompts[0]] * (B - B0)):   # padded rows copy row 0 and are dropped
            ids[i, P - len(p):] = torch.tensor(p)                   # left padding: prompts end at column P-1
            valid[i, P - len(p):P] = True
        ids, valid = ids.to(dev), valid.to(dev)
        # left padding: positions count real tokens only, or rows would depend on their padding
        pos = (valid[:, :P].cumsum(-1) - 1).clamp(min=0)
        # prefill: causal over the prompt, pads invisible; each query also sees itself (no empty softmax rows)
        mask = torch.ones(P, S, dtype=torch.bool, device=dev).tril() & valid[:, None, :]
        mask |= torch.eye(P, S, dtype=torch.bool, device=dev)
        st.cache.index = torch.arange(P, device=dev)
        logits = self.lm(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, cache=st.cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]          # (B, V)
        st.u.fill_(-1.0)                                                          # greedy unless a uniform is given
        if uniforms is not None:
            st.u[:B0].copy_(uniforms)
        st.out[:, 0] = pick_token(logits.float(), st.u[:, 0])
        st.token.copy_(st.out[:, :1]), st.pos.copy_(pos[:, -1:] + 1), st.mask.copy_(valid[:, None, None, :])
        st.col.fill_(P), st.t.fill_(1)
        st.cache.index = st.col

    @torch.no_grad()
    def generate(self, prompts: list, max_new: int, uniforms=None, tok=None):
        """Decode each prompt (token-id lists) until a stop token, the answer template (when `tok` is given) or
        `max_new` tokens; uniforms (B, max_new) sample at T=1, None is greedy. Tokens drawn after a row's stop are
        dropped (stop checks may come late). Returns (ids without the stop token or template, finished flags)."""
        B0 = len(prompts)
        B, P, L = self.shape(B0, max(len(p) for p in prompts), max_new)
        if P + L > self.max_len:
            raise SystemExit(f"prompt + --max-new-tokens = {P + L} tokens exceeds this model's context ({self.max_len})")
        st = self._state(B, P, L)
        self._prefill(st, prompts, B, P, P + L, uniforms)
        host = [[] for _ in range(B0)]          # the drawn ids on the host, extended at each stop check
        length, finished, active = [max_new] * B0, [False] * B0, set(range(B0))
        for t in range(max_new):
            if (t + 1) % STOP_CHECK_EVERY == 0 or t == max_new - 1:
                start, new = len(host[0]), st.out[:B0, len(host[0]):t + 1].tolist()
                for i in range(B0):
                    host[i] += new[i]
                    cut = stop_position(host[i], start, self.stop, tok, final=t == max_new - 1) if i in active else None
                    if cut is not None:
                        length[i], finished[i] = cut, True
                        active.discard(i)
                if not active:                   # early exit: every row has stopped
                    break
            if t < max_new - 1:
                st.graph.replay() if st.graph is not None else self.step(st)   # draws token t+1
        return [host[i][:length[i]] for i in range(B0)], finished

def make_replica(ref_lm):
    """The sampler's plain copy of the policy in the compute dtype (no FSDP hooks, no autocast): at step 0 it
    equals the frozen reference, so it starts as a copy of it."""
    return copy.deepcopy(ref_lm).requires_grad_(False).eval()

@torch.no_grad()
def refresh_replica(replica, model):
    """Copy the policy's current weights into the replica, in place, so its tensors never move (the captured
    graphs stay valid). FSDP2 gathers one module at a time, already cast to the compute dtype."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    dst, done = dict(replica.named_parameters()), set()
    for prefix, module in model.named_modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            for name, p in module.named_parameters(prefix=prefix):
                name = name.removeprefix("lm.")                  # Scorer.lm.x -> x
                if not isinstance(p, DTensor) and name in dst:  # this module's own parameters, now whole
                    dst[name].copy_(p), done.add(name)
            module.reshard()
    assert done == set(dst), f"replica parameters not refreshed: {sorted(set(dst) - done)[:3]}"

# 7. Models: paths, tokenizers, and loading on rank 0 alone (the other ranks receive their part) -------------

def model_path(name: str) -> str:
    """A local model folder (with a model's config.json) or a hub id; a run folder points to its models."""
    path = os.path.expanduser(name)
    if not os.path.exists(path) and not name.startswith((".", "/", "~")):
        return name  # a hub id never starts like a path
    if not os.path.isdir(path):
        raise SystemExit(f"--model {name!r}: " + ("a file, not a model's folder (config.json and weights; a GGUF file "
                         "converts into one as tests/smollm.py does)" if os.path.exists(path) else "no such folder"))
    if is_model_folder(path):
        return path
    inside = [os.path.join(path, d) for d in ("best", "model", "checkpoint/model") if os.path.isdir(os.path.join(path, d))]
    raise SystemExit(f"--model {name!r}: this folder has no config.json of a model, so it is not a model"
                     + " (it is a latro.py run folder)" * os.path.isfile(os.path.join(path, "metrics.jsonl"))
                     + (f"; the models in it are {' and '.join(inside)}" if inside else ""))

def is_model_folder(path: str) -> bool:
    """A folder holding a model's config.json (one that names its model_type; a run's config.json does not)."""
    try:
        return "model_type" in json.load(open(os.path.join(path, "config.json")))
    except (OSError, ValueError, TypeError):
        return False

def load_config(name: str):
    """The model's config, and a check that transformers has a causal language model of its type."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot read its config ({type(e).__name__}: {str(e)[:300]})") from None
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:   # T5, an image model, ...: AutoModelForCausalLM has none
        raise SystemExit(f"--model {name!r}: a {cfg.model_type!r} model is not a causal (decoder-only) language model; "
                         f"LaTRO samples and scores with one (Llama, Qwen, Mistral, Phi, GPT-2, ...)")
    return cfg

def quiet_transformers():
    """transformers' own bars ("Loading weights", "Writing model shards") and warnings off: latro.py and eval.py
    show their own progress."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(), hf_logging.set_verbosity_error()

def load_tokenizer(name: str, vocab: int = None):
    """The model's tokenizer, checked: it has an eos or a pad token, and no id past the model's `vocab` rows."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
    if vocab and len(tok) > vocab:   # an id past the embedding: an IndexError on a CPU, a device assert on a GPU
        raise SystemExit(f"--model {name!r}: its tokenizer has {len(tok)} tokens, more than the {vocab} rows of its "
                         f"embedding (vocab_size in config.json): the tokenizer or the config is another model's")
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise SystemExit(f"--model {name!r}: its tokenizer has neither an eos nor a pad token, so rationales cannot "
                         f"end and rows cannot be padded; set eos_token in its tokenizer_config.json")
    tok.pad_token = tok.pad_token or tok.eos_token   # pad == eos here: masks, not token ids, decide what is padding
    return tok

def stop_token_ids(tok, name: str) -> list:
    """Ids that end a turn: the chat template's end of turn, the eos, the generation config's (Llama-3: several)."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_path(name)).eos_token_id
    except (OSError, ValueError):
        eos = None
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids(data.end_of_turn(tok))} | set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)

def context_length(cfg) -> int:
    """Positions the sampler and the scorer may use: the trained context (before rope scaling), the sliding
    window, and at most 16k (the rotary table's size)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    limits = [getattr(cfg, "max_position_embeddings", None), rope.get("original_max_position_embeddings"),
              getattr(cfg, "sliding_window", None), 1 << 14]
    return min(n for n in limits if n)

def check_lengths(tok, examples: list, lengths: list, max_new: int, limit: int, answer: bool):
    """Every prompt must fit the context with L new tokens (and y, for training): checked at load time, so that
    a long row fails now, naming its file and line, not hours into a run."""
    y = lambda e: len(tok.encode(" " + data.answer_text(e) + data.end_of_turn(tok), add_special_tokens=False))
    bad = [(n + max_new + (y(e) if answer else 0), e, n) for e, n in zip(examples, lengths)]
    if bad := [b for b in bad if b[0] > limit]:
        (need, e, n), tail = bad[0], " and the answer" * answer
        raise SystemExit(f"{e.where}: the prompt is {n} tokens; with {max_new} new tokens{tail} it needs {need} "
                         f"positions, more than the model's {limit} ({len(bad)} of {len(examples)} rows are too "
                         f"long): lower --max-new-tokens or remove the rows")

def meta_model(cfg, dtype):
    """The model's modules on the meta device (no memory), sdpa attention, dropout off (deterministic)."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except ValueError as e:   # no SDPA attention (Gemma-2's soft-capping, gpt-oss's sinks, Mamba): the scorer needs it
        raise SystemExit(f"--model {cfg.name_or_path!r}: cannot build it ({str(e)[:300]})") from None
    for m in lm.modules():  # nn.Dropout modules and the attention_dropout floats the attention kernels read
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return lm.eval()

def read_weights(name: str, verified: bool = False) -> dict:
    """Every tensor (parameters, buffers; fp32, host memory) of the model at `name`, checked finite; a copy latro.py
    wrote (best/, checkpoint/model) is checked against its manifest first, unless `verified` (by find_checkpoint)."""
    from transformers import AutoModelForCausalLM
    parent = os.path.dirname(os.path.normpath(path := model_path(name)))
    for marker, folder, only in [] if verified else [("best.json", path, ""), ("resume.json", parent, "model/")]:
        if os.path.isfile(os.path.join(folder, marker)) and (problem := verify(folder, only)):
            raise SystemExit(f"--model {name!r}: {problem}: latro.py wrote it with checksums, and it changed since")
    try:   # any failure is the model's: OSError, ValueError, safetensors' own error on a truncated file, ...
        lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                        output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:
        raise SystemExit(f"--model {name!r}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    if bad := sorted(info["missing_keys"]) + [f"{k} {tuple(a)} (the config: {tuple(b)})" for k, a, b in
                                              sorted(info["mismatched_keys"])]:   # transformers would start them random
        raise SystemExit(f"--model {name!r}: {len(bad)} of the tensors its config needs are missing from its weight "
                         f"files or have another shape (the first: {bad[0]}): a damaged or mismatched model")
    if getattr(lm.config, "final_logit_softcapping", None):
        raise SystemExit(f"--model {name!r}: logit soft-capping is not supported by the fused scorer")
    full = dict(lm.named_buffers()) | lm.state_dict()
    if bad := [k for k, t in full.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise SystemExit(f"--model {name!r}: {len(bad)} of its tensors hold NaN or inf values (the first: {bad[0]}): "
                         f"the model itself is damaged, and training or evaluating it means nothing")
    return full

def read_on_rank0(name: str, master: bool, verified: bool = False):
    """Rank 0 alone reads the whole model; every rank hears if that failed. The others never hold it whole."""
    full, error = None, None
    try:
        full = read_weights(name, verified) if master else None
    except SystemExit as e:
        error = str(e)
    rank0_verdict(error)
    return full

@torch.no_grad()
def load_plain(cfg, full, dtype, device):
    """A plain (unsharded) model on every rank, filled from rank 0's tensors `full` by broadcast."""
    lm = meta_model(cfg, dtype).to_empty(device=device)
    lm.tie_weights()   # to_empty gives each parameter its own tensor: tied embeddings must share one again
    for name, t in (dict(lm.named_buffers()) | lm.state_dict(keep_vars=True)).items():
        t.copy_(full[name]) if full is not None else None
        dist.broadcast(t.data, src=0) if dist.is_initialized() and dist.get_world_size() > 1 else None
    return lm.requires_grad_(False)

# 8. Distributed: the torchrun idiom, the layout rule, FSDP2, collectives, the data order --------------------

def setup_distributed(device_flag=None):
    """The torchrun idiom: RANK / WORLD_SIZE / LOCAL_RANK from the environment, nccl on GPUs and gloo on CPU,
    one device per process; without torchrun a group of one (FSDP2 needs one). Returns (rank, world, device)."""
    try:
        asked = torch.device(device_flag) if device_flag else None
    except RuntimeError:
        asked = torch.device("meta")   # not a device name: refused below
    if asked and asked.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device_flag!r}: latro runs on cpu or cuda (cpu, cuda, cuda:1)")
    use_cuda = asked.type == "cuda" if asked else torch.cuda.is_available()
    local_rank, n = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count() if use_cuda else 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda and asked in (None, torch.device("cuda")) else asked or "cpu")
    if device.type == "cuda" and device.index >= n:   # cuda:5 of 4 GPUs, or more processes on a node than GPUs
        raise SystemExit((f"--device {device_flag!r}" if device_flag else f"LOCAL_RANK {local_rank}") + ": " + (
            f"cuda:{device.index} is not one of the {n} GPUs this process sees (CUDA_VISIBLE_DEVICES; torchrun's "
            f"--nproc_per_node)" if n else "no GPU is visible to this process"))
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"   # gloo too: offload's gradient norm is on the host
    if not dist.is_initialized() and "RANK" in os.environ:
        # a worker whose torchrun agent died would run on, or hang, unsupervised: the kernel sends it SIGUSR1 when
        # its parent goes (prctl 1 = PR_SET_PDEATHSIG; Linux only). latro.py then stops as on SIGTERM (a
        # checkpoint), and for sure after 60 s; eval.py, whose rows are on disk, just exits. (A parent pid of 1
        # is no sign of a dead agent: in a container, torchrun itself is often pid 1.)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGUSR1))
        try:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))   # a slow start-up: loading, compiling
        except (ValueError, RuntimeError) as e:   # RANK set by hand or by a scheduler, without the rest
            raise SystemExit(f"torch.distributed cannot start from this environment (RANK={os.environ['RANK']}): "
                             f"{first_line(e)}; launch with torchrun, or unset RANK") from None
    elif not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.set_device(device) if device.type == "cuda" else None
    return dist.get_rank(), dist.get_world_size(), device

def close_distributed():
    """All ranks leave together: a rank that tears its group down while another still works can abort (gloo)."""
    dist.barrier()
    dist.destroy_process_group()

def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)

def first_line(e: BaseException) -> str:
    """What an error's one line quotes of an exception: its first line, at most 200 characters (else its type)."""
    return (str(e) or type(e).__name__).splitlines()[0][:200]

def exit_cleanly(main, smaller: str, interrupted=lambda: ""):
    """Run a script's `main` and end the process with its status: 0, a signal's (130, 143), or 1 after an error's
    one line. One line too: memory running out (naming the flags that make the work `smaller`), a Ctrl-C that the
    script's own handlers did not turn into a clean stop (loading; a second one) after `interrupted()` tidied up,
    and a collective broken by another rank's failure (whose line says why). Under torchrun, skip the teardown, in
    which gloo's threads can abort a finished process (SIGABRT, "terminate called without an active exception")."""
    try:
        main()
        code = 0
    except KeyboardInterrupt:
        print(f"\ninterrupted{interrupted()}", file=sys.stderr)
        code = 130
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 1 and not isinstance(e.code, int):   # an error's message, printed as Python would print it
            print(e.code, file=sys.stderr)
    except (MemoryError, RuntimeError) as e:   # torch.OutOfMemoryError is a RuntimeError
        text = first_line(e)
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "allocate memory" in text:   # a CPU's words
            print(f"out of memory ({text}): {smaller}", file=sys.stderr)
        elif "RANK" in os.environ and (isinstance(e, dist.DistError) or "by peer" in text):   # nccl's, gloo's
            print(f"rank {os.environ['RANK']} stopped: another process of this run failed or lost its connection "
                  f"(its own line says why; here: {text[:120]})", file=sys.stderr)
        else:
            raise
        code = 1
    if "RANK" in os.environ:
        sys.stdout.flush(), sys.stderr.flush(), os._exit(code)
    raise SystemExit(code)

def pick_dtype(flag: str, device) -> torch.dtype:
    """--dtype auto: bf16 on GPUs, fp32 on CPUs (where bf16 is ~3x slower)."""
    return torch.bfloat16 if flag == "bf16" or (flag == "auto" and device.type == "cuda") else torch.float32

AUTO_OFFLOAD_SHARE = 0.6   # --parallel auto: one GPU holds its training state only within this share of its memory

def auto_layout(n_params: int, world: int, device, compute_dtype) -> str:
    """--parallel auto, a rule to check by hand. Several processes: shard. One process on a GPU: offload when the
    fp32 training state (weights, gradients, AdamW m and v: 16 bytes per parameter) plus two compute-dtype copies
    (reference, sampler) exceed AUTO_OFFLOAD_SHARE of its memory (the rest: KV cache, activations), else replicate."""
    if world > 1:
        return "shard"
    if device.type != "cuda":   # a CPU
        return "replicate"
    need, gpu = n_params * (16 + 2 * compute_dtype.itemsize), torch.cuda.get_device_properties(device).total_memory
    return "offload" if need > AUTO_OFFLOAD_SHARE * gpu else "replicate"

def wrap(scorer, mode: str, device, compute_dtype, world: int):
    """FSDP2 in every mode, so that the policy computes with compute-dtype parameters cast from fp32 master
    weights in exactly the same way everywhere (the reference is a compute-dtype model: at step 0 the KL is 0).
    Per decoder block (a decoder's `.layers`, or GPT-2's `.h`) + root; gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    if mode == "replicate":   # a (world, 1) mesh: every rank holds everything, gradients are all-reduced (DDP)
        kw["mesh"] = init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    if mode == "offload":     # sharded, and fp32 master weights, gradients and AdamW live on the host
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    blocks = [getattr(scorer.lm.get_decoder(), n, None) for n in ("layers", "h")]   # Llama, Qwen, ...; GPT-2
    if not (found := [b for b in blocks if isinstance(b, torch.nn.ModuleList)]):
        raise SystemExit(f"--model {scorer.lm.config.name_or_path!r}: a {scorer.lm.config.model_type!r} model has no "
                         f"decoder blocks that latro.py can shard (a decoder's .layers or .h)")
    for layer in found[0]:
        fully_shard(layer, **kw)
    return fully_shard(scorer, **kw)

def all_sum(values: list, device) -> list:
    """Sum a list of floats over ranks (one all_reduce, float64 so that sums of log-probs keep their digits)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

def rank0_verdict(message):
    """Raise on EVERY rank the error that rank 0 found (None: no error), so that no rank waits forever."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SystemExit(box[0])

@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list:
    """A seeded permutation of the n train rows for one epoch (cached: a step reads at most two epochs)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order

def global_questions(n_train: int, step: int, n: int, seed: int) -> list:
    """Train indices of the `n` questions of a step: epochs of a seeded permutation, read in order. A function
    of (seed, step) alone, so a resumed run reads the same questions without saving a data position."""
    return [epoch_order(n_train, seed, pos // n_train)[pos % n_train] for pos in range(step * n, (step + 1) * n)]

# 9. Flags: the method, the run, the systems -----------------------------------------------------------------

class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends "(default: X)", except where there is none to show (None: the help text says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (not the whole usage first), and which reads "-1e-3" as a (negative)
    value to range-check, not as an unknown option."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **{"formatter_class": DefaultsHelp, **kw})
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def number(kind, low, strict=False, high=None):
    """An argparse type: `kind` (int or float), finite, >= low (> low when strict), <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or (strict and value == low) or value > (high or math.inf):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}"
                                             + (f" and <= {high}" if high else ""))
        return value
    return parse

POSITIVE, COUNT, RATE, WEIGHT = number(int, 1), number(int, 0), number(float, 0, strict=True), number(float, 0)
SEED = number(int, 0, high=2**32 - 1)
MAX_BAD_STEPS = 3        # non-finite steps in a row (each skipped: no update) before a run stops
LOGPROB_CHUNK = 1024     # positions per chunk of the log-softmax over the vocabulary (the scorer's peak)
ONOFF = dict(choices=["auto", "on", "off"], default="auto")

def get_args(argv=None):
    p = Parser(description="LaTRO training (see the module docstring).")
    m = p.add_argument_group("the method (paper Sec. 4-5; defaults are the paper's)").add_argument
    m("--k", type=POSITIVE, default=16, help="rationales sampled per question (K)")
    m("--beta", type=WEIGHT, default=None, help="KL coefficient; default 0.05 for GSM8K, 0.25 for ARC (paper)")
    m("--max-new-tokens", type=POSITIVE, default=500, help="L: rationale length limit in tokens")
    m("--penalty", type=WEIGHT, default=2.0, help="gamma: an unfinished rationale's answer reward is gamma x the "
      "mean answer reward of its question's K rationales")
    m("--sft-weight", type=WEIGHT, default=1.0, help="weight of the grad log pi(y|x+z) term (paper 1, official 0)")
    m("--lr", type=RATE, default=5e-7, help="AdamW peak learning rate, decayed linearly to 0, no warm-up")
    m("--weight-decay", type=WEIGHT, default=0.0, help="AdamW weight decay")
    m("--grad-clip", type=WEIGHT, default=0.0, help="clip the global grad norm to this; 0 = off (paper)")
    m("--questions-per-rank", type=POSITIVE, default=3, help="questions per process per step (paper: 3 x 8 GPUs)")
    m("--global-questions", type=POSITIVE, default=None, help="questions per step over all processes (overrides "
      "--questions-per-rank; must divide by the number of processes): the same run at any scale")
    m("--steps", type=POSITIVE, default=None, help="optimizer steps; default: the paper's 117 (GSM8K) / 35 (ARC), "
      "scaled to keep its number of rollouts when the global batch differs from 24 x 16")
    group = p.add_argument_group("the run")
    r, either = group.add_argument, group.add_mutually_exclusive_group().add_argument   # --overwrite or --resume
    r("--model", required=True, help="hub name (meta-llama/Llama-3.1-8B-Instruct) or local model folder")
    r("--dataset", default="gsm8k", help="gsm8k | arc_challenge | arith[:SEED] (generated) | hub id | local file "
      "or folder of JSONL/parquet")
    r("--out", default="runs/latro", help="run folder: config, metrics.jsonl, checkpoint/, best/")
    either("--overwrite", action="store_true", help="delete the run already in --out and start a new one")
    either("--resume", action="store_true", help="continue from OUT/checkpoint (flags must match the saved run)")
    r("--seed", type=SEED, default=0, help="seed of the data order, the validation slice and every rationale")
    r("--val-size", type=COUNT, default=200, help="train questions held out for checkpoint selection")
    r("--eval-every", type=COUNT, default=20, help="greedy-evaluate the validation slice every N steps; 0 = off")
    r("--eval-max-new-tokens", type=POSITIVE, default=500, help="generation limit of the validation evaluation")
    r("--heldout-questions", type=COUNT, default=8, help="validation questions whose rationales, sampled once at "
      "step 0, track the held-out self-reward (mean log pi(y|x+z))")
    r("--save-every", type=COUNT, default=20, help="write a checkpoint every N steps (and at the end); 0 = the end")
    r("--stop-after", type=COUNT, default=0, help="exit after this step as if interrupted (tests, job limits)")
    s = p.add_argument_group("the systems").add_argument
    s("--parallel", choices=["auto", "replicate", "shard", "offload"], default="auto", help="FSDP2 layout: "
      "replicate (every GPU holds everything), shard (over the GPUs), offload (sharded, fp32 master weights, "
      "gradients and AdamW on the host). auto: shard with several processes; one process on a GPU offloads when "
      "16 bytes per parameter (fp32 weights, gradients, AdamW) plus the reference and the sampler in the compute "
      f"dtype exceed {AUTO_OFFLOAD_SHARE * 100:.0f}%% of the GPU's memory, else replicates; a CPU replicates")
    s("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="compute dtype: bf16 on GPU, fp32 on CPU")
    s("--grad-checkpointing", **ONOFF, help="recompute activations in backward; auto = on for GPUs")
    s("--compile", **ONOFF, help="torch.compile the sampler's decode step; auto = on for GPUs")
    s("--cuda-graphs", **ONOFF, help="replay the decode step as a CUDA graph; auto = on for GPUs")
    s("--micro-questions", type=POSITIVE, default=1, help="questions per forward/backward micro-batch (K rows each)")
    s("--device", default=None, help="override the device (cpu, cuda:0); default: cuda:LOCAL_RANK if present")
    return p.parse_args(argv)

def resolve_defaults(args, task: str, world: int, n_train: int, n_val: int):
    """Fill the task-dependent defaults and check the batch geometry against the data."""
    if args.global_questions is None:
        args.global_questions = args.questions_per_rank * world
    problems = [(args.k < 2, f"--k {args.k}: the leave-one-out baseline needs at least 2 rationales per question"),
                (args.global_questions % world, f"--global-questions {args.global_questions} does not divide over "
                                                f"{world} processes")]
    args.questions_per_rank = args.global_questions // world
    problems += [(args.questions_per_rank % args.micro_questions, f"--questions-per-rank {args.questions_per_rank} "
                  f"must be a positive multiple of --micro-questions {args.micro_questions}"),
                 (args.global_questions > n_train, f"--global-questions {args.global_questions} is more than the "
                  f"{n_train} train questions left after --val-size {n_val}: questions would repeat within a step"),
                 (args.heldout_questions > n_val, f"--heldout-questions {args.heldout_questions} needs --val-size >= "
                  f"{args.heldout_questions} (it is {n_val})")]
    if bad := [message for wrong, message in problems if wrong]:
        raise SystemExit(bad[0])
    args.beta = PAPER_BETA[task] if args.beta is None else args.beta
    if args.steps is None:
        args.steps = max(1, round(PAPER_STEPS[task] * PAPER_ROLLOUTS_PER_STEP / (args.global_questions * args.k)))
    return args

# 10. The run folder: one owner, checksummed folders swapped in whole (a kill at any instant), resume, signals ---

RESUME_KEYS = ("model", "dataset", "k", "beta", "max_new_tokens", "penalty", "sft_weight", "lr", "weight_decay",
               "global_questions", "steps", "seed", "val_size", "grad_clip", "dtype", "data_digest")   # on --resume
def rows_digest(examples: list) -> str:
    """12 hex digits of a sha256 of every question, gold and option in order: --resume refuses rows changed since."""
    return hashlib.sha256(repr([(e.question, e.gold, e.options) for e in examples]).encode()).hexdigest()[:12]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "best", "best.old",
             "best.tmp")
LOCKS = []   # this process's lock files: the kernel releases a lock when its holder dies

def claim_run_folder(args, master: bool):
    """A run folder belongs to one run: locked (flock) for the run's life (a second run on it, in any mode, is refused
    with the holder's pid and host), and refused if it holds a run, unless --resume/--overwrite. Nothing that is not
    the run's is deleted or written over: not a model's folder as --out, nor the --model (OUT/best) of --overwrite."""
    model = os.path.realpath(os.path.expanduser(args.model))
    doomed = [os.path.realpath(os.path.join(args.out, f)) for f in RUN_FILES if args.overwrite]
    inside = next((d for d in doomed if os.path.commonpath([d, model]) == d), None)   # the run file holding --model
    refusals = [(args.resume and not os.path.isdir(args.out), f"--resume: no checkpoint in {args.out!r}: no such folder"),
                (is_model_folder(args.out), f"--out {args.out!r} is a model's folder (its config.json), not a run's: "
                                            f"pass another --out"),
                (inside, f"--overwrite would delete --model {args.model!r} (in {inside}): copy it first, or pass "
                         f"another --out")]
    message, found = next((m for bad, m in refusals if bad), None) if master else None, []
    try:   # the refusals above come before a folder or a lock is made for nothing
        if master and message is None:
            os.makedirs(args.out, exist_ok=True)
            LOCKS.append(open(os.path.join(args.out, ".lock"), "a+"))
            fcntl.flock(LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            LOCKS[-1].truncate(0), LOCKS[-1].write(f"pid {os.getpid()} on {socket.gethostname()}"), LOCKS[-1].flush()
            found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    except BlockingIOError:
        message = f"--out {args.out!r} is in use by another run ({open(LOCKS[-1].name).read()}): wait for it or stop it"
    except OSError as e:
        message = f"--out {args.out!r}: cannot make a run folder there ({e.strerror}; is it, or a parent, a file?)"
    if found and not args.resume and not args.overwrite:
        message = (f"--out {args.out!r} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                   f"--overwrite to delete it and start again, or another --out")
    rank0_verdict(message)
    if found and args.overwrite:
        print0(f"--overwrite: deleting {', '.join(os.path.join(args.out, f) for f in found)}")
        [remove(os.path.join(args.out, f)) for f in found]

def remove(path: str):
    """Delete a file or folder if it exists; a kill halfway leaves a partial one that the next call finishes."""
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)

def write_atomic(path: str, text: str):
    """Write `text` to path.tmp, then rename it over `path`: a reader (or a kill) never meets half a file."""
    try:
        open(path + ".tmp", "w").write(text), os.replace(path + ".tmp", path)
    except OSError as e:
        remove(path + ".tmp")
        raise SystemExit(f"cannot write {path}: {e.strerror or e}") from None

def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        [h.update(block) for block in iter(lambda: f.read(1 << 24), b"")]
    return h.hexdigest()

def write_manifest(folder: str):
    """manifest.json, written last into a folder: {file: [bytes, sha256]} of everything else in it."""
    files = sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({n: [os.path.getsize(os.path.join(folder, n)), sha256(os.path.join(folder, n))] for n in files}, f)

def verify(folder: str, only: str = ""):
    """None if every file of the manifest (under `only`) is there with its size and checksum, else what is wrong."""
    try:
        sums = json.load(open(os.path.join(folder, "manifest.json")))
    except (OSError, ValueError):
        return "its manifest.json is missing or unreadable (an unfinished write)"
    for name, (size, digest) in [(n, s) for n, s in sums.items() if n.startswith(only)]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size or sha256(path) != digest:
            return f"{path} does not match its checksum (damaged)"

def settle(path: str):
    """Finish what a kill interrupted: if `path` is missing, the newest whole copy (.tmp, else .old) takes its
    place; a partial .tmp goes. Safe at any instant, any number of times."""
    whole = [p for p in (path + ".tmp", path + ".old") if os.path.isdir(p) and verify(p) is None]
    if not os.path.isdir(path) and whole:
        os.replace(whole[0], path)
    remove(path + ".tmp")

def write_folder(path: str, parts: list, need_gb: float, what: str, master: bool, keep_prev: bool = False):
    """Write `path.tmp` and its manifest, then swap it in (the old copy becomes `path.old`, kept or deleted): a whole
    copy exists under one of the names at every instant. Each part (tmp, write) runs on EVERY rank (it may gather:
    a collective), writing on rank 0. A failed write removes the partial copy, says why, and stops every rank."""
    tmp, error = path + ".tmp", None
    if master:
        settle(path)
        remove(path + ".old") if keep_prev else None       # room on the disk; `path` is still whole
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30
        error = (f"cannot write {what} to {path}: it needs about {need_gb:.1f} GB and the disk has {free:.1f} GB "
                 f"free; the last good copy is kept") if free < need_gb else None
    rank0_verdict(error)
    for part in parts + [lambda tmp, write: write and write_manifest(tmp)]:
        try:
            part(tmp, master and error is None)
        except Exception as e:   # OSError, torch's RuntimeError, a tokenizer's bare Exception: all I/O here
            if not master:
                raise
            error = error or (f"cannot write {what} to {path} (about {need_gb:.1f} GB): {first_line(e)}"
                              f"; the partial copy was removed and the last good one is kept")
    remove(tmp) if master and error else None
    rank0_verdict(error)
    if master:
        remove(path + ".old")
        os.replace(path, path + ".old") if os.path.isdir(path) else None
        os.replace(tmp, path)
        remove(path + ".old") if not keep_prev else None
    dist.barrier()  # no rank runs ahead (and possibly crashes) before the folder is in place

def save_model_part(run, subdir: str = ""):
    """A write_folder part: the policy's full fp32 weights in `save_pretrained` form, and the tokenizer. Never
    from non-finite weights (each rank checks its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    if all_sum([sum(int(not torch.isfinite(local(p)).all()) for p in run.model.parameters())], run.device)[0]:
        raise SystemExit("not writing a checkpoint: the weights are not finite; the last good copy is kept")
    lm = run.model.lm   # a tied weight (GPT-2's lm_head = wte) is written once in every layout, as save_pretrained does
    tied = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - dict(lm.named_parameters()).keys()

    def part(tmp, write):
        sd = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if write:
            sd = {k[3:]: v for k, v in sd.items() if k[3:] not in tied}
            lm.save_pretrained(os.path.join(tmp, subdir), state_dict=sd)
            run.tok.save_pretrained(os.path.join(tmp, subdir))
    return part

def save_checkpoint(run, step: int, confirmed: bool):
    """OUT/checkpoint: model/ (save_pretrained, fp32), state.pt (full AdamW state, RNGs), resume.json (step, best, the
    flags that must match, confirmed good?): it loads at any world size. The previous one stays as checkpoint.old."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = {"step": step, "confirmed": confirmed, "best": run.best, "n_params": run.n_params,
             "config": {k: run.config[k] for k in RESUME_KEYS}}

    def optimizer_part(tmp, write):
        sd = get_optimizer_state_dict(run.model, run.opt, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
        if write:
            torch.save({"optimizer": sd, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate()},
                       os.path.join(tmp, "state.pt"))
            json.dump(state, open(os.path.join(tmp, "resume.json"), "w"), indent=1)
    write_folder(os.path.join(run.args.out, "checkpoint"), [save_model_part(run, "model"), optimizer_part],
                 12 * run.n_params / 2**30 * 1.05, "the checkpoint", run.master, keep_prev=True)
    run.pending_save, run.saved = False, step

def save_best(run, record: dict):
    """The policy alone, in `save_pretrained` form, with the evaluation record that chose it in best.json."""
    write_folder(os.path.join(run.args.out, "best"), [save_model_part(run), lambda tmp, write: write and json.dump(
        record, open(os.path.join(tmp, "best.json"), "w"))], 4 * run.n_params / 2**30 * 1.05, "the best model", run.master)

def read_resume(folder: str, args) -> dict:
    """resume.json of a checkpoint, checked for sense; raises ValueError saying what is wrong."""
    try:
        state = json.load(open(os.path.join(folder, "resume.json")))
    except (OSError, ValueError) as e:
        raise ValueError(f"its resume.json cannot be read ({type(e).__name__})") from None
    if missing := [k for k in ("step", "confirmed", "best", "config", "n_params") if k not in state]:
        raise ValueError(f"its resume.json lacks {', '.join(missing)}")
    if not isinstance(state["step"], int) or not 0 <= state["step"] <= args.steps:
        raise ValueError(f"its resume.json says step {state['step']!r}, which is not within --steps {args.steps}")
    return state

def find_checkpoint(args):
    """On rank 0, before anything loads: (folder, resume.json) of the newest checkpoint whose files match their
    checksums, checkpoint/ or else checkpoint.old/ (saying what was wrong with the other)."""
    base, found, notes = os.path.join(args.out, "checkpoint"), [], []
    [settle(os.path.join(args.out, name)) for name in ("checkpoint", "best")]   # what a kill left, in both
    for folder in filter(os.path.isdir, (base, base + ".old")):
        try:
            problem = verify(folder)
            found += [] if problem else [(read_resume(folder, args), folder)]
        except ValueError as e:
            problem = str(e)
        notes += [f"{folder}: {problem}"] if problem else []
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {args.out!r} that can be used" + (": " + "; ".join(notes)
                         if notes else " (looked for checkpoint/ and checkpoint.old/)"))
    state, folder = max(found, key=lambda f: f[0]["step"])
    [print0(f"--resume: {note}; falling back to {folder} (step {state['step']})") for note in notes]
    name = lambda k: "the dataset's rows (their digest)" if k == "data_digest" else f"--{k.replace('_', '-')}"
    bad = [f"{name(k)}: run {getattr(args, k)!r} vs checkpoint {state['config'].get(k)!r}"
           for k in RESUME_KEYS if k in state["config"] and state["config"][k] != getattr(args, k)]   # (older runs)
    if bad:   # the world size may change: the update does not
        raise SystemExit("--resume: the checkpoint was written by a different run:\n  " + "\n  ".join(bad))
    return folder, state

def stop_diverged(run, first_bad: int, last: dict):
    """Steps first_bad.. were skipped as non-finite: step first_bad-1's update left finite but unusable weights, so
    the last good state is step first_bad-2; checkpoint/ rolls back to no later than that; every rank stops."""
    good, base, message = first_bad - 2, os.path.join(run.args.out, "checkpoint"), None
    if run.master:
        for folder in filter(os.path.isdir, (base, base + ".old")):   # drop every checkpoint after the last good
            remove(folder) if verify(folder) or read_resume(folder, run.args)["step"] > good else None
        settle(base)
        held = read_resume(base, run.args)["step"] if os.path.isdir(base) else None
        overflow = math.isfinite(last["logp_y"]) and math.isfinite(last["kl"])   # the model's log-probs are fine
        cause = "the self-rewards overflowed: lower --beta or --penalty" if overflow else \
            "the update diverged: try a lower --lr"
        message = (f"{last['step'] - first_bad + 1} steps in a row ({first_bad}-{last['step']}) had a non-finite loss "
                   f"or gradient norm and made no update; {cause}. " + ("Step 1 already failed: the starting model "
                   "or the flags are at fault. " if first_bad == 1 else f"The last good state is step {good}. ")
                   + (f"checkpoint/ holds step {held}." if held is not None else "No checkpoint holds a good state."))
    rank0_verdict(message)

def log(run, rec: dict, line: str):
    """One short console line; every field to metrics.jsonl. A failed append stops the run at the step's end."""
    if run.master:
        print(line, flush=True)
        try:
            with open(run.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            run.error = run.error or f"cannot append to {run.metrics} ({e.strerror}); stopping, the last " \
                                     f"checkpoint is kept"

class StopSignals:
    """SIGINT and SIGTERM end the step cleanly: the loop asks at step boundaries, where all ranks agree. SIGTERM (a
    cluster's preemption) writes a checkpoint first; so does SIGUSR1 (the torchrun agent died: see setup_distributed),
    which also ends the process 60 s later whatever happens. A second Ctrl-C, 2 s after the first, stops at once."""

    def __init__(self):
        self.received, self.at = 0, 0.0
        [signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.received and time.time() - self.at > 2:   # torchrun repeats a signal
            raise KeyboardInterrupt
        if signum == signal.SIGUSR1:
            print("the torchrun agent is gone: stopping with a checkpoint", file=sys.stderr, flush=True)
            signal.alarm(60)           # SIGALRM's default action ends the process, even one stuck in a collective
            signum = signal.SIGTERM
        if not self.received:
            print0(f"\n{signal.Signals(signum).name}: stopping at the end of this step"
                   + (" with a checkpoint" if signum == signal.SIGTERM else " (Ctrl-C again: stop now)"))
        self.received, self.at = max(self.received, signum), time.time()     # SIGTERM (15) outranks SIGINT (2)

def stop_requested(run, signals) -> int:
    """At a step boundary: the signal any rank received (0: none), agreed by all ranks; a failed metrics write
    on rank 0 stops every rank here, with its message."""
    rank0_verdict(run.error)
    t = torch.tensor([signals.received], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

def summary(run, done: int, why: str):
    """The last words of a run: how far it got and where its models are."""
    a, saved = run.args, run.saved or run.start
    print0(f"{why}: {done} of {a.steps} steps" + (f"\nbest: {os.path.join(a.out, 'best')} (val_accuracy "
           f"{run.best['val_accuracy']:.4g} at step {run.best['step']})" if run.best else ""))
    print0(f"checkpoint: {os.path.join(a.out, 'checkpoint')} (step {saved}" + ("; continue with --resume)" if saved <
           a.steps else ")") if saved else "checkpoint: none written (SIGTERM, --save-every or the last step write one)")

# 11. Setup: data, the run folder, models, the engine, resume ------------------------------------------------

def setup(args):
    """Everything before the first step: data (every row checked), the layout, the run folder, the setup printed,
    then models, the engine, AdamW, resume state, held-out rollouts. None when a resumed run has already finished."""
    quiet_transformers()
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed), random.seed(args.seed)
    gpu = device.type == "cuda"
    dtype = pick_dtype(args.dtype, device)
    args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"    # resolved, so that a resume can check it
    args.grad_checkpointing, args.compile, args.cuda_graphs = (f == "on" or (f == "auto" and gpu) for f in (
        args.grad_checkpointing, args.compile, args.cuda_graphs))
    if args.cuda_graphs and not gpu:
        raise SystemExit("--cuda-graphs on needs a GPU")
    cfg = load_config(args.model)                                  # fails on a wrong path before any work
    try:
        train, val = data.split_validation(data.load_split(args.dataset, "train"), args.val_size, args.seed)
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from None
    resolve_defaults(args, train[0].task, world, len(train), len(val))
    args.data_digest = rows_digest(train + val)                    # --resume checks that the rows are the same
    tok = load_tokenizer(args.model, getattr(cfg, "vocab_size", None))
    lengths = [len(p) for p in data.prompt_ids(tok, train + val)]
    check_lengths(tok, train + val, lengths, max(args.max_new_tokens, args.eval_max_new_tokens),
                  context_length(cfg), answer=True)   # every row fits: checked now, not hours into the run
    n_params = sum(p.numel() for p in meta_model(cfg, torch.float32).parameters())   # no memory: meta tensors
    if args.parallel == "auto":
        args.parallel = auto_layout(n_params, world, device, dtype)
    run = SimpleNamespace(args=args, rank=rank, world=world, device=device, master=rank == 0, tok=tok, train=train,
                          val=val, n_params=n_params, start=0, best=None, saved=None, pending_save=False, error=None,
                          eot=data.end_of_turn(tok), dtype=dtype, cfg=cfg, metrics=os.path.join(args.out, "metrics.jsonl"),
                          lengths={e.where: n for e, n in zip(train + val, lengths)})
    claim_run_folder(args, run.master)
    box = [find_checkpoint(args) if args.resume and run.master else (None, None)]
    dist.broadcast_object_list(box, src=0)                          # rank 0 verified it; every rank reads it
    ckpt, resume = box[0]
    if resume and resume["step"] >= args.steps:                     # before any weights load or any sampling
        print0(f"the run in {args.out} has finished all {args.steps} steps (checkpoint at step {resume['step']}); "
               f"nothing to do")
        return None
    a, start = args, resume["step"] if resume else 0   # the resolved setup first: loading and sampling take a while
    run.config = dict(vars(a), world=world, task=train[0].task, n_params=n_params, n_train=len(train), n_val=len(val))
    print0(f"latro: {a.model} ({n_params / 1e6:.1f} M parameters) on {a.dataset} ({len(train)} train, {len(val)} "
           f"validation) | {world} x {device.type}, {a.dtype}, --parallel {a.parallel}\n  method: K {a.k}, beta "
           f"{a.beta}, L {a.max_new_tokens}, gamma {a.penalty}, w_sft {a.sft_weight}, lr {a.lr} -> 0, "
           f"{a.global_questions} questions per step, {a.steps} steps\n  run: {a.out} (config.json: every flag), "
           f"validation every {a.eval_every or 'never'}, checkpoint every {a.save_every or 'end'}"
           + (f", from step {start}" if start else ""))
    build(run, ckpt)
    restore(run, ckpt, resume) if resume else None
    if run.master and not run.start:   # config.json: every flag, resolved; a resumed run keeps its own
        write_atomic(os.path.join(args.out, "config.json"), json.dumps(run.config, indent=1))
    return run

def build(run, ckpt):
    """The policy (FSDP2, fp32 master weights), the frozen reference and the sampler's replica (compute dtype),
    the engine with every decode shape compiled, AdamW, and the held-out rollouts. Rank 0 alone reads each
    model and the others receive their part: host memory holds one whole copy per node, not one per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    a, dev = run.args, run.device
    lm = meta_model(run.cfg, torch.float32)   # the policy keeps fp32 master weights: lr 5e-7 vanishes in bf16
    if a.grad_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    run.model = wrap(Scorer(lm, LOGPROB_CHUNK), a.parallel, dev, run.dtype, run.world)   # before any weights load
    full = read_on_rank0(os.path.join(ckpt, "model") if ckpt else a.model, run.master, verified=ckpt is not None)
    with torch.no_grad():   # each rank gets its shards of rank 0's tensors; parameters on the host with offload
        run.model.to_empty(device=torch.device("cpu") if a.parallel == "offload" else dev)
        for m in run.model.modules():
            m._buffers.update({k: b.to(dev) for k, b in m._buffers.items() if b is not None})
        sd = {} if full is None else {"lm." + k: v for k, v in full.items() if "lm." + k in run.model.state_dict()}
        set_model_state_dict(run.model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, b in run.model.named_buffers():   # buffers no state dict holds (rotary inv_freq): broadcast them
            b.copy_(full[name[3:]]) if full is not None else None
            dist.broadcast(b, src=0) if run.world > 1 else None
        # FSDP2 picks its root on the first forward: make it go through the root
        one = torch.ones(1, 2, dtype=torch.long, device=dev)
        run.model(one, one, one.bool())
    run.model.reshard()    # the root keeps its parameters whole after a forward: AdamW must get the shards
    if ckpt:               # pi_0 is always the STARTING model, also on resume: at step 0 the KL is exactly 0
        del full
        full = read_on_rank0(a.model, run.master)
    ref_lm = load_plain(run.cfg, full, run.dtype, dev)
    del full
    run.ref, run.replica = Scorer(ref_lm, LOGPROB_CHUNK), make_replica(ref_lm)
    run.engine = Engine(run.replica, stop_token_ids(run.tok, a.model), a.compile, a.cuda_graphs)
    L, E, q = (a.max_new_tokens, a.eval_max_new_tokens), run.engine, a.questions_per_rank
    if a.compile or a.cuda_graphs:   # rows of training, validation and held-out batches x prompt buckets x L
        rows = {q * a.k, a.heldout_questions % q * a.k} | {len(run.val[r::run.world]) % (q * a.k) for r in
                                                           range(run.world)}
        shapes = {E.shape(r, n, l) for r in rows - {0} for n in set(run.lengths.values()) for l in L}
        print0(f"sampler: {len(shapes)} decode shapes compiled{' and captured' * a.cuda_graphs} in "
               f"{E.prepare(shapes):.0f} s; nothing compiles after this")
    E.reserve(q * a.k, max(run.lengths.values()) + max(L))
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=True)
    # the held-out self-reward: rationales sampled once from the initial model (the replica still equals pi_0,
    # also on resume) for a few validation questions; their log pi(y|x+z) is tracked at every evaluation
    held, rolls = run.val[:a.heldout_questions], []
    for i in tqdm(range(0, len(held), q), desc="held-out rationales", disable=not (run.master and held)):
        rolls += rollout(E, run.tok, held[i:i + q], range(i, min(i + q, len(held))), -1, a)
    run.heldout = [build_batch(p, zs, [answer_ids(run.tok, e, z, run.eot) for z in zs], run.tok.pad_token_id)
                   for e, (p, zs, _) in zip(held, rolls)]

def restore(run, ckpt: str, resume: dict):
    """Weights came with `build`; now AdamW state (rank 0 reads it, mmap-ed, and each rank receives its
    shards), the RNGs, the step and the best record; metrics logged after the checkpoint are dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", mmap=True, weights_only=False) \
        if run.master else {}
    set_optimizer_state_dict(run.model, run.opt, optim_state_dict=state.get("optimizer", {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    rng = [state.get("rng_torch"), state.get("rng_python")]
    dist.broadcast_object_list(rng, src=0)
    torch.set_rng_state(rng[0]), random.setstate(rng[1])
    refresh_replica(run.replica, run.model)
    run.start, run.best = resume["step"], resume["best"]
    if run.master:   # a torn last line (a kill mid-write) is dropped with a note
        rows = []
        for n, line in enumerate(open(run.metrics) if os.path.exists(run.metrics) else [], 1):
            try:
                rows += [r for r in [json.loads(line)] if r.get("step", 0) <= run.start]
            except json.JSONDecodeError:
                print0(f"--resume: dropping the unreadable line {n} of {run.metrics} (a write cut short)")
        write_atomic(run.metrics, "".join(json.dumps(r) + "\n" for r in rows))   # a kill here keeps the old file
    print0(f"resumed from {ckpt} at step {run.start}")

def interrupted() -> str:
    """latro.py stopped at once (a second Ctrl-C, or one during loading): no folder is left half swapped."""
    out = get_args().out
    for name in ("checkpoint", "best") if int(os.environ.get("RANK", 0)) == 0 and os.path.isdir(out) else ():
        settle(os.path.join(out, name))
    return f"; the last checkpoint in {out}, if any, is kept (continue with --resume)"

if __name__ == "__main__":
    exit_cleanly(main, "use --parallel offload or more GPUs, turn --grad-checkpointing on, or lower --micro-questions, "
                 "--questions-per-rank, --k or --max-new-tokens; the last checkpoint is kept", interrupted)
