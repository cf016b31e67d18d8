"""
latro.py: LaTRO (LaTent Reasoning Optimization, Chen et al. 2024, arXiv 2411.04282) in one file.

What it does: for every question x the model samples K chain-of-thought rationales z_1..z_K, appends the
gold answer y = "The answer is {gold}." after each, and scores everything with ONE forward of the policy
over [x ; z ; y] and ONE forward of a frozen reference copy (read at the z positions). Each rationale's self-reward is the
log-likelihood of the gold answer after it minus a KL penalty; REINFORCE with a leave-one-out baseline
pushes the policy towards rationales that make the answer likely, and a direct gradient on log pi(y|x+z)
teaches the answer itself. No reward model, no value network. The loop is plain torch.distributed: DDP
replicas for models that fit, FSDP2 (`fully_shard`) for those that do not, launched by torchrun.

The objective (paper Eq. 2-4), per question, with sums over tokens (no length normalisation):
    r_k  = log pi(y | x+z_k)  -  beta * [ log pi(z_k|x) - log pi_0(z_k|x) ]         self-reward, k1 KL
    A_k  = r_k - 1/(K-1) * sum_{j!=k} r_j                                            leave-one-out baseline
    grad = 1/(N K) sum_i sum_k [ A_k * grad log pi(z_k|x)  +  w_sft * grad log pi(y|x+z_k) ]
    loss = mean over the GLOBAL N*K rationales of [ -stopgrad(A_k) * log pi(z_k|x) - w_sft * log pi(y|x+z_k) ]
See `latro_loss` below: the equation is there term by term.

Departures from the paper / official code (SalesforceAIResearch/LaTRO), and why:
1. Non-stop penalty: a rationale that hits L tokens without stopping gets answer reward
   gamma * mean(log pi(y|x+z) of the SAME question's K rationales); the official code uses the mean over the
   GPU's local batch, which mixes questions and makes the update depend on the number of GPUs.
2. w_sft = 1 by default, as in the paper's Eq. 4; the official script ships 0 (`--sft-weight 0` restores it).
3. The rationale ends at the end-of-turn / EOS token or where the answer template starts ("The answer is",
   "So, the answer is", "Therefore, the answer is", "Answer:"), detected on the DECODED text; the official
   code matches token ids, which misses other tokenisations. The stop token and the template are not part of
   z; log pi(z|x) therefore does not include the probability of stopping.
4. Sampling stops as soon as every row has stopped (the official code always generates L tokens).
5. log pi(y|x+z) covers exactly the tokens of y (the official code also scores the last token of z).
6. Scoring is fused: 1 policy forward with gradient + 1 reference forward, instead of 3 without + 2 with.
   Log-probs are taken only at z and y positions, chunk by chunk, never as a [B, T, V] fp32 tensor.
7. Each question has its own random stream, seeded by (seed, step, question), so the same questions get the
   same rationales whatever the number of processes, and a resumed run repeats an uninterrupted one.
8. Checkpoints are selected on a held-out slice of train (`--val-size`), never on the test set.
9. Sampling draws token t as the inverse CDF of softmax(logits) at a uniform u (exactly multinomial sampling
   at temperature 1, no top-k / top-p), so the per-question streams are a handful of uniforms.

Commands:
    # laptop CPU, the real SmolLM2-135M-Instruct on local GSM8K files (under 2 minutes on 2 cores)
    python latro.py --model "$(python tests/smollm.py)" --dataset ../shared/data/gsm8k --out runs/quickstart \
        --k 4 --max-new-tokens 64 --questions-per-rank 2 --steps 4 --lr 1e-5 --val-size 8 --heldout-questions 4 \
        --eval-every 2 --eval-max-new-tokens 32
    # one GPU
    python latro.py --model microsoft/Phi-3.5-mini-instruct --dataset gsm8k
    # full fine-tuning of an 8B model on 8 x 80 GB (FSDP2 is picked: a DDP replica would need ~128 GB)
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B
    # the paper's setting: 8 GPUs x 3 questions x K=16
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B-Instruct --dataset gsm8k
    torchrun --nproc_per_node=8 latro.py --model meta-llama/Llama-3.1-8B-Instruct --dataset arc_challenge
    # CPU, 2 processes over gloo (what the tests do)
    torchrun --nproc_per_node=2 latro.py --model TINY_FOLDER --dataset FILE.jsonl --questions-per-rank 2 --k 3
"""
import argparse
import contextlib
import functools
import json
import os
import random
import re
import resource
import shutil
import time

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
# Flags that must agree between a run and the checkpoint it resumes (the world size need not).
RESUME_KEYS = ("model", "dataset", "k", "beta", "max_new_tokens", "penalty", "sft_weight", "lr", "weight_decay",
               "global_questions", "steps", "seed", "val_size", "grad_clip")


# ----------------------------------------------------------------------------------------------------------
# Configuration

def get_args(argv=None):
    p = argparse.ArgumentParser(description="LaTRO training (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="hub name (meta-llama/Llama-3.1-8B-Instruct) or local model folder")
    a("--dataset", default="gsm8k", help="gsm8k | arc_challenge | hub id | local file or folder of JSONL/parquet")
    a("--out", default="runs/latro", help="run folder: config, metrics.jsonl, checkpoint/, best/")
    a("--seed", type=int, default=0, help="seed of the data order, the validation slice and every rationale")
    # the method (paper Sec. 4-5)
    a("--k", type=int, default=16, help="rationales sampled per question (K)")
    a("--beta", type=float, default=None, help="KL coefficient; default 0.05 for GSM8K, 0.25 for ARC (paper)")
    a("--max-new-tokens", type=int, default=500, help="L: rationale length limit in tokens")
    a("--penalty", type=float, default=2.0, help="gamma: an unfinished rationale's answer reward is gamma x the "
      "mean answer reward of its question's K rationales")
    a("--sft-weight", type=float, default=1.0, help="weight of the direct grad log pi(y|x+z) term (paper 1, "
      "official code 0)")
    # optimisation
    a("--questions-per-rank", type=int, default=3, help="questions per process per step (paper: 3 x 8 GPUs)")
    a("--global-questions", type=int, default=None, help="questions per step over all processes; overrides "
      "--questions-per-rank and must divide by the number of processes (keeps a run identical at any scale)")
    a("--micro-questions", type=int, default=1, help="questions per forward/backward micro-batch (K rows each)")
    a("--steps", type=int, default=None, help="optimizer steps; default: the paper's 117 (GSM8K) / 35 (ARC), "
      "scaled to keep the same number of rollouts when the global batch differs from 24 x 16")
    a("--lr", type=float, default=5e-7, help="AdamW peak learning rate, decayed linearly to 0, no warm-up")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=0.0, help="clip the global grad norm to this; 0 = off (paper)")
    # evaluation and checkpoints
    a("--val-size", type=int, default=200, help="train questions held out for checkpoint selection")
    a("--eval-every", type=int, default=20, help="greedy-evaluate the validation slice every N steps; 0 = off")
    a("--eval-max-new-tokens", type=int, default=500, help="generation limit of the validation evaluation")
    a("--heldout-questions", type=int, default=8, help="validation questions whose fixed rationales track the "
      "held-out self-reward (mean log pi(y|x+z) on rationales sampled once at step 0)")
    a("--save-every", type=int, default=20, help="write a resumable checkpoint every N steps (and at the end); "
      "0 = only at the end")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (flags must match the saved run)")
    a("--stop-after", type=int, default=0, help="exit after this step as if interrupted (tests, job limits)")
    # systems
    a("--parallel", choices=["auto", "ddp", "fsdp"], default="auto", help="replicas (ddp) or sharded (fsdp) "
      "data parallel; auto picks fsdp when fp32 weights + AdamW would exceed 60%% of one GPU")
    a("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="compute dtype: bf16 on GPU, fp32 on CPU")
    a("--grad-checkpointing", choices=["auto", "on", "off"], default="auto", help="recompute activations in "
      "backward; auto = on for GPUs")
    a("--sampler", choices=["static", "dynamic"], default="static", help="KV cache of the decode loop: "
      "preallocated (static, compile-friendly) or grown by concatenation (dynamic, the plain path)")
    a("--compile", action="store_true", help="torch.compile the decode step (needs --sampler static)")
    a("--logprob-chunk", type=int, default=1024, help="positions per chunk of the log-softmax over the vocab")
    a("--device", default=None, help="override the device (cpu, cuda:0); default: cuda:LOCAL_RANK if present")
    return p.parse_args(argv)


def resolve_defaults(args, task: str, world: int):
    """Fill the task-dependent defaults and check the batch geometry."""
    if args.k < 2:
        raise SystemExit(f"--k {args.k}: the leave-one-out baseline needs at least 2 rationales per question")
    if args.global_questions is None:
        args.global_questions = args.questions_per_rank * world
    elif args.global_questions < 1 or args.global_questions % world:
        raise SystemExit(f"--global-questions {args.global_questions} does not divide over {world} processes")
    else:
        args.questions_per_rank = args.global_questions // world
    if args.questions_per_rank < 1 or args.questions_per_rank % args.micro_questions:
        raise SystemExit(f"--questions-per-rank {args.questions_per_rank} must be a positive multiple of "
                         f"--micro-questions {args.micro_questions}")
    args.beta = PAPER_BETA[task] if args.beta is None else args.beta
    if args.steps is None:
        args.steps = round(PAPER_STEPS[task] * PAPER_ROLLOUTS_PER_STEP / (args.global_questions * args.k))
    if args.compile and args.sampler != "static":
        raise SystemExit("--compile needs --sampler static (a fixed-shape KV cache)")
    return args


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Models

def model_path(name: str) -> str:
    """A local folder, or a hub id; something that looks like a path but is not a folder is an error."""
    path = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise SystemExit(f"--model {name!r}: no such folder")  # a hub id never starts like a path
    return path


def load_model(name: str, dtype, device):
    """A causal LM by hub name or local folder, dropout off (sampling and scoring are deterministic)."""
    from transformers import AutoModelForCausalLM
    path = model_path(name)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from e
    if getattr(lm.config, "final_logit_softcapping", None):
        raise SystemExit(f"--model {name!r}: logit soft-capping is not supported by the fused scorer")
    for m in lm.modules():  # nn.Dropout modules and the attention_dropout floats the attention kernels read
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return lm.to(device).eval()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name!r}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:300]})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad == eos here: masks, not token ids, decide what is padding
    return tok


def stop_token_ids(tok, lm) -> list:
    """Token ids that end a turn: the tokenizer's eos and every eos of the generation config."""
    ids = {tok.eos_token_id}
    gen = getattr(lm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------------------
# Sampling

TEMPLATE = re.compile(r"(?:(?:So|Therefore|Thus),? )?the answer is|Answer:", re.IGNORECASE)
TEMPLATE_WINDOW = 32  # tokens decoded per check: room for the longest template even in 1-byte tokens


def question_uniforms(seed: int, step: int, question: int, k: int, length: int) -> torch.Tensor:
    """(k, length) uniforms from the question's own stream: same rationales whatever the world size."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + question)
    return torch.rand(k, length, generator=g, dtype=torch.float64)


def pick_token(logits: torch.Tensor, u) -> torch.Tensor:
    """Greedy when u is None, else the inverse CDF of softmax(logits) at u: multinomial at temperature 1."""
    if u is None:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)                       # (B, V)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)  # (B,)
    return tok.clamp_(max=logits.shape[-1] - 1)


def template_cut(tok, ids: list):
    """If the decoded tail of `ids` contains the answer template, the index where z ends; else None."""
    window = ids[-TEMPLATE_WINDOW:]
    m = TEMPLATE.search(tok.decode(window))
    if m is None:
        return None
    # the last token from which the decoded text still holds the whole template is the template's first token
    j = max(i for i in range(len(window)) if m.group(0) in tok.decode(window[i:]))
    return len(ids) - len(window) + j


def stop_position(ids: list, start: int, stop: set, tok=None):
    """Where z ends if the row stopped within ids[start:], else None: at its first stop token, or earlier at
    the start of an answer template (searched only when `tok` is given) completed before that token."""
    end = next((t for t in range(start, len(ids)) if ids[t] in stop), None)
    cut = template_cut(tok, ids[:end]) if tok is not None else None   # ids[:None] is the whole row
    return cut if cut is not None else end


@torch.no_grad()
def generate(lm, prompts: list, max_new: int, pad_id: int, stop_ids: list, uniforms=None, tok=None,
             sampler: str = "static", step_fn=None, check_every: int = 8):
    """Decode from each prompt (token-id lists) until a stop token, the answer template (when `tok` is
    given) or `max_new` tokens. uniforms (B, max_new) sample at T=1; None is greedy.
    Stops are checked every `check_every` steps (one device sync each); tokens drawn after a row's stop are
    discarded, so the result does not depend on it. Returns (generated id lists without the stop token or
    template, finished flags)."""
    from transformers import DynamicCache, StaticCache
    B, P, dev = len(prompts), max(len(p) for p in prompts), lm.device
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + max_new, dtype=torch.long)
    for i, p in enumerate(prompts):            # left padding: every prompt ends at column P-1
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):P] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    # left padding: positions count real tokens only, or rows would depend on their padding
    pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep=1 below: the prefill needs the last position's logits only, not (B, P, V)
    if sampler == "static":  # fixed shapes: the cache and the mask are allocated once for P + max_new
        cache, span = StaticCache(config=lm.config, max_cache_len=P + max_new), lambda t: mask
    else:
        cache, span = DynamicCache(config=lm.config), lambda t: mask[:, :t]
    step_fn = lm if step_fn is None else step_fn
    logits = lm(input_ids=ids, attention_mask=span(P), position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1).logits[:, -1]                              # (B, V)
    # tokens stay on the device between checks; the host copy is extended once per check
    out = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)
    host = [[] for _ in range(B)]              # the same ids on the host, for the stop checks
    length, finished, active = [max_new] * B, [False] * B, set(range(B))
    stop, u_all, pos = set(stop_ids), None if uniforms is None else uniforms.to(dev), pos[:, -1:]
    for t in range(max_new):
        out[:, t] = pick_token(logits.float(), None if u_all is None else u_all[:, t])     # (B,)
        if (t + 1) % check_every == 0 or t == max_new - 1:
            start, new = len(host[0]), out[:, len(host[0]):t + 1].tolist()
            for i in range(B):
                host[i] += new[i]
                cut = stop_position(host[i], start, stop, tok) if i in active else None
                if cut is not None:
                    length[i], finished[i] = cut, True
                    active.discard(i)
            if not active:                     # early exit: every row has stopped
                break
        if t == max_new - 1:
            break
        mask[:, P + t] = 1  # finished rows keep decoding garbage that is never read
        pos = pos + 1
        logits = step_fn(input_ids=out[:, t:t + 1], attention_mask=span(P + t + 1), position_ids=pos,
                         cache=cache, use_cache=True).logits[:, -1]
    return [host[i][:length[i]] for i in range(B)], finished


# ----------------------------------------------------------------------------------------------------------
# Scoring: one forward, log-probs at z and y positions only

def _chunk_logprobs(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                                  # (M, V) upcast before softmax
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)   # (M,)


class Scorer(torch.nn.Module):
    """Wraps a causal LM: forward(input_ids, attention_mask, target_mask) -> (B, T-1) log-probs of the
    tokens at target positions (token t+1 predicted from position t), zero elsewhere. The vocabulary
    projection runs `chunk` positions at a time and is recomputed in backward, so the (M, V) fp32 logits
    never exist all at once. Wrapping the LM in a module of our own lets DDP / FSDP hook this forward."""

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


def answer_ids(tok, ex, z_ids: list) -> list:
    """Token ids of y after z: "The answer is {gold}." + end-of-turn, with a space unless z ends in one."""
    z_text = tok.decode(z_ids)
    sep = "" if not z_text or z_text[-1].isspace() else " "
    return tok.encode(sep + data.answer_text(ex) + data.end_of_turn(tok), add_special_tokens=False)


def score(scorer, ids, attn, z_mask, y_mask):
    """(logp_z, logp_y): per-row SUMS of token log-probs over z and over y, from one forward."""
    tok_logp = scorer(ids, attn, z_mask | y_mask)                             # (B, T-1)
    logp_z = (tok_logp * z_mask[:, 1:]).sum(-1)                               # (B,)
    logp_y = (tok_logp * y_mask[:, 1:]).sum(-1)                               # (B,)
    return logp_z, logp_y


# ----------------------------------------------------------------------------------------------------------
# The objective (paper Eq. 4)

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
    stats = {"reward": reward.mean().item(), "logp_y": logp_y.detach().mean().item(), "kl": kl.mean().item(),
             "elbo": (logp_y.detach() - beta * kl).mean().item(),
             "unfinished": (~finished).float().mean().item(), "advantage_abs": advantage.abs().mean().item()}
    return loss, stats


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear decay from lr to 0 over `steps`, no warm-up (paper Sec. 5.1)."""
    return lr * max(0.0, 1.0 - step / steps)


# ----------------------------------------------------------------------------------------------------------
# Data parallel plumbing

def unwrap(model):
    """The HF model inside Scorer / DDP(Scorer)."""
    return getattr(model, "module", model).lm


@contextlib.contextmanager
def full_params(model):
    """Under FSDP: all-gather every shard ONCE for a sampling phase (not per decode step), reshard after."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def wrap(scorer, mode: str, device, compute_dtype):
    """DDP replica or FSDP2 shards (per decoder layer + root, fp32 master, compute_dtype compute)."""
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in scorer.lm.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(scorer, mp_policy=mp)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(scorer, device_ids=[device.index] if device.type == "cuda" else None)
    return scorer


def all_sum(values: list, device) -> list:
    """Sum a list of floats over ranks (explicit collective for metrics)."""
    # one all_reduce for all metrics; float64 so that sums of many log-probs keep their digits
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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


def train_state_gb(model, opt) -> float:
    """GB of parameters + gradients + optimizer state held by THIS rank (local shards under FSDP)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**30


def peak_memory_gb(device) -> float:
    """Peak allocated GPU memory, or on CPU the peak resident set of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: written under a temporary name and renamed into place

def save_checkpoint(path: str, model, opt, tok, state: dict, master: bool):
    """policy (save_pretrained, fp32 master weights) + optimizer + step/RNG; crash-safe by rename."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # full (unsharded) tensors, gathered to CPU: a checkpoint that loads at any world size and in plain
    # transformers. A collective: every rank calls it, rank 0 writes.
    model_sd, optim_sd = get_state_dict(model, opt, options=full)
    if master:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written leftover of a crash
        sd = {k.removeprefix("lm."): v for k, v in model_sd.items()}  # Scorer.lm.x -> x, as HF names them
        unwrap(model).save_pretrained(os.path.join(tmp, "model"), state_dict=sd)
        tok.save_pretrained(os.path.join(tmp, "model"))
        # sampling draws from per-question streams keyed by the step, so these global states matter only to
        # code that uses them (none in the default path); saved so that resume restores every RNG anyway
        state = dict(state, rng_torch=torch.get_rng_state(), rng_python=random.getstate())
        torch.save({"optimizer": optim_sd, **state}, os.path.join(tmp, "state.pt"))
        swap_into_place(tmp, path)
    if dist.is_initialized():
        dist.barrier()  # no rank runs ahead (and possibly crashes) before the checkpoint is in place


def swap_into_place(tmp: str, path: str):
    """Replace folder `path` by the finished folder `tmp`: the last good copy survives a crash at any point."""
    if os.path.exists(path):  # keep the last good one until the new one is in place
        os.replace(path, path + ".old")
    os.replace(tmp, path)  # atomic on one filesystem: `path` is always whole, or absent with .old whole
    shutil.rmtree(path + ".old", ignore_errors=True)


def save_pretrained_atomic(model, tok, path: str, master: bool, record: dict):
    """The policy alone, in `save_pretrained` form (loads with AutoModelForCausalLM.from_pretrained), with
    the evaluation record that chose it in best.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict={k.removeprefix("lm."): v for k, v in sd.items()})
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "best.json"), "w") as f:
            json.dump(record, f)
        swap_into_place(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def find_checkpoint(out: str) -> str:
    """OUT/checkpoint, or OUT/checkpoint.old when a crash came between the two renames."""
    for p in (os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old")):
        if os.path.isfile(os.path.join(p, "state.pt")):
            return p
    raise SystemExit(f"--resume: no checkpoint in {out!r} (looked for checkpoint/state.pt and checkpoint.old)")


def check_resume_config(saved: dict, args):
    """Refuse a resume whose flags would change the run (the world size may change: the update does not)."""
    bad = [f"--{k.replace('_', '-')}: run {getattr(args, k)!r} vs checkpoint {saved.get(k)!r}"
           for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if bad:
        raise SystemExit("--resume: the checkpoint was written by a different run:\n  " + "\n  ".join(bad))


# ----------------------------------------------------------------------------------------------------------
# Validation: greedy accuracy on the held-out slice, and the held-out self-reward

@torch.no_grad()
def validate(model, tok, val: list, args, rank: int, world: int, device, ctx, heldout, stop: list):
    """Greedy accuracy on `val` (strided over ranks) and mean log pi(y|x+z) on the fixed held-out rollouts."""
    lm = unwrap(model)
    mine = val[rank::world]
    # greedy rows cost like sampled ones: decode as many at once as a training rollout does (half, for the
    # longer eval limit)
    correct, batch = 0, max(1, args.questions_per_rank * args.k // 2)
    with full_params(model), ctx:
        for i in range(0, len(mine), batch):
            exs = mine[i:i + batch]
            prompts = [tok.encode(data.render_prompt(tok, e), add_special_tokens=False) for e in exs]
            outs, _ = generate(lm, prompts, args.eval_max_new_tokens, tok.pad_token_id, stop, sampler=args.sampler)
            correct += sum(data.is_correct(e, tok.decode(o, skip_special_tokens=True)) for e, o in zip(exs, outs))
    # the held-out self-reward: same questions, same rationales at every evaluation, so its changes are
    # the policy's alone (a learning curve free of sampling noise)
    logp_y_sum = 0.0
    with ctx:
        for ids, attn, z_mask, y_mask in heldout[rank::world]:
            _, logp_y = score(model, ids.to(device), attn.to(device), z_mask.to(device), y_mask.to(device))
            logp_y_sum += logp_y.sum().item()
    correct, n, lsum, lcount = all_sum([correct, len(mine), logp_y_sum,
                                        sum(h[0].shape[0] for h in heldout[rank::world])], device)
    return {"val_accuracy": correct / max(n, 1), "val_n": int(n), "heldout_logp_y": lsum / max(lcount, 1)}


# ----------------------------------------------------------------------------------------------------------
# One step on one rank

def rollout(lm, tok, exs, qidx, step, args, stop, step_fn=None):
    """Sample K rationales per question; returns per question (prompt ids, z list, finished list)."""
    prompts, uniforms = [], []
    for e, q in zip(exs, qidx):
        # the chat template already holds any BOS token: encoding must not add a second one
        prompts += [tok.encode(data.render_prompt(tok, e), add_special_tokens=False)] * args.k
        # q is the question's position in the GLOBAL step, so its stream is the same on any rank
        uniforms.append(question_uniforms(args.seed, step, q, args.k, args.max_new_tokens))
    # all K rationales of all questions of this rank in one batch; `tok` turns on the template stop
    zs, fin = generate(lm, prompts, args.max_new_tokens, tok.pad_token_id, stop, uniforms=torch.cat(uniforms),
                       tok=tok, sampler=args.sampler, step_fn=step_fn)
    K = args.k
    return [(prompts[i * K], zs[i * K:(i + 1) * K], fin[i * K:(i + 1) * K]) for i in range(len(exs))]


def score_and_backward(model, ref, tok, exs, rolls, args, device, ctx, world):
    """Fused scoring and backward, micro-batch by micro-batch; returns summed stats over this rank."""
    lm, K, m = unwrap(model), args.k, args.micro_questions
    sums, n_micro = {}, len(exs) // m
    for j in range(n_micro):
        # whole questions per micro-batch: the leave-one-out baseline needs a question's K rewards together
        batch = [build_batch(rolls[i][0], rolls[i][1], [answer_ids(tok, exs[i], z) for z in rolls[i][1]],
                             tok.pad_token_id) for i in range(j * m, (j + 1) * m)]
        T = max(b[0].shape[1] for b in batch)
        pad = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)
        ids = torch.cat([pad(b[0], tok.pad_token_id) for b in batch]).to(device)   # (m*K, T)
        attn, z_mask, y_mask = (torch.cat([pad(b[i], 0) for b in batch]).to(device) for i in (1, 2, 3))
        finished = torch.tensor([f for i in range(j * m, (j + 1) * m) for f in rolls[i][2]], device=device)
        # the reference first, without gradient, so its activations are gone before the policy's exist
        with torch.no_grad(), ctx:
            logp_z_ref = (ref(ids, attn, z_mask) * z_mask[:, 1:]).sum(-1)      # (m*K,) reference, z only
        lm.train(args.grad_checkpointing)  # HF checkpoints only in train mode; dropout is already 0
        # DDP: all-reduce gradients only after the last micro-batch (FSDP2 reduce-scatters every backward and
        # accumulates the sharded gradients, which keeps memory flat)
        sync = contextlib.nullcontext() if j == n_micro - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx:
                logp_z, logp_y = score(model, ids, attn, z_mask, y_mask)       # (m*K,) each, with grad
            loss, stats = latro_loss(logp_z.view(m, K), logp_z_ref.view(m, K), logp_y.view(m, K),
                                     finished.view(m, K), args.beta, args.sft_weight, args.penalty)
            # loss is a mean over this micro-batch's m*K rows; rescale to a mean over the GLOBAL batch.
            # DDP / FSDP average gradients over ranks, hence the extra factor `world`.
            (loss * (m / args.global_questions) * world).backward()
        lm.eval()
        for key, v in stats.items():  # sums, not means: the loop divides by the global row count after all_sum
            sums[key] = sums.get(key, 0.0) + v * m * K
        sums["z_len"] = sums.get("z_len", 0.0) + z_mask.sum().item()
    return sums


# ----------------------------------------------------------------------------------------------------------
# The loop

def setup_distributed(device_flag=None):
    """The torchrun idiom: RANK / WORLD_SIZE / LOCAL_RANK from the environment (absent: one plain process),
    nccl on GPUs and gloo on CPU, one device per process. Returns (rank, world, device)."""
    use_cuda = str(device_flag).startswith("cuda") or (device_flag is None and torch.cuda.is_available())
    if int(os.environ.get("RANK", -1)) != -1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda and device_flag in (None, "cuda") else device_flag or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def pick_dtype(flag: str, device) -> torch.dtype:
    """--dtype auto: bf16 on GPUs, fp32 on CPUs (where bf16 is ~3x slower)."""
    return torch.bfloat16 if flag == "bf16" or (flag == "auto" and device.type == "cuda") else torch.float32


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    compute_dtype = pick_dtype(args.dtype, device)
    ctx = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else contextlib.nullcontext()
    args.grad_checkpointing = args.grad_checkpointing == "on" or (args.grad_checkpointing == "auto" and device.type == "cuda")

    # data: train minus a held-out validation slice
    model_path(args.model)  # fail on a wrong path before any work
    try:
        train = data.load_split(args.dataset, "train")
    except data.DataError as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from e
    task = train[0].task
    train, val = data.split_validation(train, args.val_size, args.seed)
    args = resolve_defaults(args, task, world)

    # models: the policy keeps fp32 master weights; the frozen reference starts equal, in compute dtype
    tok = load_tokenizer(args.model)
    ckpt = find_checkpoint(args.out) if args.resume else None
    # fp32 master weights whatever the compute dtype: at lr 5e-7 a bf16 weight would round the update away
    lm = load_model(os.path.join(ckpt, "model") if ckpt else args.model, torch.float32, device)
    # pi_0 is always the STARTING model (also on resume), in the compute dtype, so that at step 0 its
    # log-probs equal the policy's and the KL starts at exactly 0
    ref = Scorer(load_model(args.model, compute_dtype, device), args.logprob_chunk).requires_grad_(False)
    if args.grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in lm.parameters())
    # fp32 weights + fp32 grads + AdamW m and v = 16 bytes per parameter for a replica
    if args.parallel == "auto":
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else float("inf")
        args.parallel = "fsdp" if world > 1 and 16 * n_params > 0.6 * gpu_bytes else ("ddp" if world > 1 else "none")
    model = wrap(Scorer(lm, args.logprob_chunk), args.parallel, device, compute_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # the optional compiled decode step (fixed shapes thanks to the static KV cache)
    step_fn = torch.compile(lm, mode="reduce-overhead", dynamic=False) if args.compile else None
    stop = stop_token_ids(tok, lm)

    start = 0
    if ckpt:  # weights came from the checkpoint folder above; now AdamW state, RNGs and the step
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
        check_resume_config(state["config"], args)
        set_optimizer_state_dict(model, opt, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        start = state["step"]
        print0(f"resumed from {ckpt} at step {start}")

    config = dict(vars(args))
    config.update(world=world, task=task, n_params=n_params, n_train=len(train), n_val=len(val))
    print0(json.dumps(config, indent=1))
    if master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    if args.parallel == "fsdp":  # FSDP2 picks its root on the first forward: make it go through the root
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device),
                  torch.ones(1, 2, dtype=torch.bool, device=device))

    # held-out self-reward: rationales sampled once from the initial model (the reference: the same after a
    # resume) for a few validation questions; their log pi(y|x+z) under the policy is tracked at every eval
    held = val[:args.heldout_questions]
    with ctx:
        held_rolls = rollout(ref.lm, tok, held, range(len(held)), -1, args, stop) if held else []
    heldout = [build_batch(p, zs, [answer_ids(tok, e, z) for z in zs], tok.pad_token_id)
               for e, (p, zs, _) in zip(held, held_rolls)]

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    best = state["best_val_accuracy"] if ckpt else -1.0  # the validation accuracy of OUT/best
    if ckpt and master and os.path.exists(metrics_path):  # drop rows logged after the checkpoint was written
        rows = [l for l in open(metrics_path) if json.loads(l)["step"] <= start]
        with open(metrics_path, "w") as f:
            f.writelines(rows)

    def log(rec):  # one JSON line per step / evaluation; tqdm.write keeps the progress bar intact
        if master:
            tqdm.write(json.dumps(rec))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def evaluate_and_keep_best(step):
        nonlocal best
        rec = {"step": step, **validate(model, tok, val, args, rank, world, device, ctx, heldout, stop)}
        log(rec)
        if rec["val_accuracy"] > best:
            best = rec["val_accuracy"]
            save_pretrained_atomic(model, tok, os.path.join(args.out, "best"), master, rec)

    if args.eval_every and start == 0 and val:
        evaluate_and_keep_best(0)
    bar = tqdm(range(start, args.steps), disable=not master, desc="latro", initial=start, total=args.steps)
    for step in bar:
        for g in opt.param_groups:  # the schedule is a function of the step: nothing to restore on resume
            g["lr"] = lr_at(step, args.steps, args.lr)
        idx = global_questions(len(train), step, args.global_questions, args.seed)
        mine = list(range(rank, args.global_questions, world))   # positions in the step, strided by rank
        exs = [train[idx[q]] for q in mine]

        # phase 1: sample K rationales per question (whole parameters on this device)
        t0 = time.time()
        with full_params(model), ctx:
            rolls = rollout(lm, tok, exs, mine, step, args, stop, step_fn)
        t1 = time.time()
        # phase 2: fused scoring, the LaTRO loss, backward, one AdamW step
        sums = score_and_backward(model, ref, tok, exs, rolls, args, device, ctx, world)
        # the global gradient norm is logged every step; with --grad-clip 0 (paper) the max norm is infinite
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP returns a DTensor
        opt.step()
        state_gb = train_state_gb(model, opt)
        opt.zero_grad(set_to_none=True)
        t2 = time.time()

        # every rank holds sums over its own rows: add them up, then divide by the global number of rollouts
        keys = sorted(sums)
        tot = dict(zip(keys, all_sum([sums[k] for k in keys], device)))
        n_rows = args.global_questions * args.k
        rec = {"step": step + 1, **{k: tot[k] / n_rows for k in keys}, "grad_norm": norm.item(),
               "lr": opt.param_groups[0]["lr"], "t_sample": t1 - t0, "t_update": t2 - t1,
               "sample_tokens_per_s": tot["z_len"] / (t1 - t0) / world, "peak_mem_gb": peak_memory_gb(device),
               "train_state_gb": state_gb}
        log(rec)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", logp_y=f"{rec['logp_y']:.2f}", kl=f"{rec['kl']:.3f}")

        done = step + 1
        if args.eval_every and val and (done % args.eval_every == 0 or done == args.steps):
            evaluate_and_keep_best(done)
        if (args.save_every and done % args.save_every == 0) or done == args.steps or done == args.stop_after:
            save_checkpoint(os.path.join(args.out, "checkpoint"), model, opt, tok, {
                "step": done, "best_val_accuracy": best, "config": {k: config[k] for k in RESUME_KEYS}}, master)
        if done == args.stop_after:
            print0(f"stopping after step {done} (--stop-after)")
            break
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
