"""
tests/bench.py: how fast latro.py samples and updates, against the paths it replaces. Prints tables, asserts nothing.

(a) Sampler: ms per decode step and tokens/s of latro.generate (static and dynamic KV cache, optionally
    compiled) against `model.generate(do_sample=True, top_k=0, top_p=1)`, the official code's sampler. Every
    path decodes exactly --new-tokens tokens (no early stop) from the same prompts, so the ratio is per step.
(b) Score + update: seconds per rollout and peak memory of latro.py's fused path (1 reference forward without
    gradient + 1 policy forward with gradient, log-probs at z/y positions only, chunked) against a naive path
    that mirrors the official code (3 forwards without gradient + 2 with, full-vocabulary log-softmax over all
    positions), each followed by backward and an AdamW step.
Each measurement runs in its own process so that its peak memory is its own.

    python tests/bench.py                                   # CPU, a small random Llama (a few minutes)
    python tests/bench.py --config 8b --device cuda --rows 48 --prompt-len 160 --new-tokens 500 --compile
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import latro  # noqa: E402

CONFIGS = {  # LlamaConfig fields; "smollm2-135m" and "8b" are the shapes of SmolLM2-135M and Llama-3.1-8B
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help=f"model shape: {', '.join(CONFIGS)}")
    p.add_argument("--update-layers", type=int, default=None, help="fewer layers for the score+update part only "
                   "(an 8B update with fp32 master weights and AdamW does not fit one GPU)")
    p.add_argument("--rows", type=int, default=8, help="rows decoded together (paper: 48 per GPU)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps")
    p.add_argument("--k", type=int, default=8, help="rollouts per score+update micro-batch")
    p.add_argument("--answer-len", type=int, default=8, help="tokens of y")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="also time the static sampler under torch.compile")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up; the best is kept")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
    return p.parse_args(argv)


def build(args, dtype, layers=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(CONFIGS[args.config], max_position_embeddings=4096, tie_word_embeddings=False)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(args.device):
        lm = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    return lm.eval()


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure_sampler(args, which, lm, device):
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (args.rows, args.prompt_len), generator=g)
    u = torch.rand(args.rows, args.new_tokens, generator=g, dtype=torch.float64)
    if which == "hf_generate":
        ids = prompts.to(device)
        def fn():
            lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
    else:
        sampler = "dynamic" if which == "latro_dynamic" else "static"
        step_fn = torch.compile(lm, mode="reduce-overhead", dynamic=False) if which == "latro_static_compiled" else None
        rows = prompts.tolist()
        def fn():  # no stop ids: every row decodes --new-tokens tokens, like the official sampler
            latro.generate(lm, rows, args.new_tokens, 0, [], uniforms=u, sampler=sampler, step_fn=step_fn)
    with torch.no_grad():
        sec = timed(fn, device, args.repeats)
    return {"ms_per_step": 1000 * sec / args.new_tokens, "tokens_per_s": args.rows * args.new_tokens / sec}


def measure_update(args, which, lm, device, dtype):
    V, K, P, Z, Y = lm.config.vocab_size, args.k, args.prompt_len, args.new_tokens, args.answer_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (K, P + Z + Y), generator=g).to(device)
    attn = torch.ones_like(ids)
    z_mask = torch.zeros_like(ids, dtype=torch.bool)
    z_mask[:, P:P + Z] = True
    y_mask = torch.zeros_like(z_mask)
    y_mask[:, P + Z:] = True
    ref = build(args, dtype, args.update_layers).requires_grad_(False)
    lm = lm.float() if dtype == torch.bfloat16 else lm  # fp32 master weights, compute under autocast
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-7)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
    fin = torch.ones(1, K, dtype=torch.bool, device=device)

    def full_logp(model, x, mask):  # the official way: log_softmax over the whole vocabulary at every position
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        return (lp * mask[:, 1:]).sum(-1)

    if which == "naive":
        xz, zm = ids[:, :P + Z], z_mask[:, :P + Z]
        def fn():
            with ctx:
                with torch.no_grad():  # 3 forwards without gradient: policy x+z, reference x+z, policy x+z+y
                    full_logp(lm, xz, zm), full_logp(ref, xz, zm), full_logp(lm, ids, y_mask)
                lz, ly = full_logp(lm, xz, zm), full_logp(lm, ids, y_mask)   # 2 forwards with gradient
                lref = lz.detach()
            loss, _ = latro.latro_loss(lz.view(1, K), lref.view(1, K), ly.view(1, K), fin, 0.05)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        policy, reference = latro.Scorer(lm), latro.Scorer(ref)
        def fn():
            with ctx:
                with torch.no_grad():
                    lref = (reference(ids, attn, z_mask) * z_mask[:, 1:]).sum(-1)
                lz, ly = latro.score(policy, ids, attn, z_mask, y_mask)
            loss, _ = latro.latro_loss(lz.view(1, K), lref.view(1, K), ly.view(1, K), fin, 0.05)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    sec = timed(fn, device, args.repeats)
    return {"s_per_rollout": sec / K}


def run_one(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    kind, which = args.only.split(":")
    lm = build(args, dtype, args.update_layers if kind == "update" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_gb(device) if device.type == "cpu" else 0.0
    res = measure_sampler(args, which, lm, device) if kind == "sample" else measure_update(args, which, lm, device, dtype)
    res["peak_gb"] = peak_gb(device) - base if device.type == "cpu" else peak_gb(device)
    print("RESULT " + json.dumps(res))


def child(args, only):
    argv = [sys.executable, os.path.abspath(__file__), "--only", only] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("only", "compile") and v is not None]
    p = subprocess.run(argv, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{only} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    args = get_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.only:
        return run_one(args)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# {dev}, torch {torch.__version__}, config {args.config}{f' ({args.update_layers} layers for the update)' if args.update_layers else ''},"
          f" {args.dtype}, rows {args.rows}, prompt {args.prompt_len}, new tokens {args.new_tokens}, K {args.k}")
    samplers = ["hf_generate", "latro_dynamic", "latro_static"] + (["latro_static_compiled"] if args.compile else [])
    res = {s: child(args, f"sample:{s}") for s in samplers}
    base = res["hf_generate"]["ms_per_step"]
    print("\n| sampler | ms / decode step | tokens / s | vs generate | peak GB |\n|---|---|---|---|---|")
    for s, r in res.items():
        print(f"| {s} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | {base / r['ms_per_step']:.2f}x | {r['peak_gb']:.2f} |")
    up = {w: child(args, f"update:{w}") for w in ("naive", "fused")}
    print("\n| score + update | s / rollout | vs naive | peak GB |\n|---|---|---|---|")
    for w, r in up.items():
        print(f"| {w} | {r['s_per_rollout']:.4f} | {up['naive']['s_per_rollout'] / r['s_per_rollout']:.2f}x | {r['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
