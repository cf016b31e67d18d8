"""
tests/bench.py: how fast latro.py samples and updates, against the paths it replaces. Prints tables, asserts nothing.

(a) sample: ms per decode step and per decoded token, tokens/s and the bandwidth achieved (weight bytes x decode
    steps per second, as gpt-fast reports it) of latro's sampling engine (eager; compiled; compiled + CUDA graphs
    on a GPU) against `model.generate(do_sample=True, top_k=0, top_p=1)`, the official code's sampler. Every
    path decodes exactly --new-tokens tokens (no early stop) from the same prompts. Compilation and capture are a
    timed warm-up, reported on a line of their own. For a compiled step, the bytes it moves per decode step
    (Inductor's own count of what its kernels read and write) are printed next to the floor: the weights plus
    the KV cache read once.
(b) update: seconds per rollout and peak memory of latro.py's fused score + update (1 reference forward without
    gradient + 1 policy forward with gradient, log-probs at z/y positions only, chunked) against a naive path
    that mirrors the official code (3 forwards without gradient + 2 with, full-vocabulary log-softmax over all
    positions), each followed by backward and an AdamW step.
(c) e2e: one whole step: a real `latro.py` run (its step 2: sample, score, update, as logged) against the
    official-style step on the same model and rows (generate with output scores and no early stop, then (b)'s
    naive score + update). Random weights rarely stop early, so both decode L tokens.
Each measurement runs in its own process so that its peak memory is its own, and is repeated (--repeats): the
tables give the median and the range. Every row names the model shape it ran and the tokens it decoded.

    python tests/bench.py                                   # CPU, a small random Llama (a few minutes)
    python tests/bench.py --config 8b --device cuda --rows 48 --prompt-len 160 --new-tokens 500 --compile
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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
SAMPLERS = ["hf_generate", "engine", "engine_compiled", "engine_graphs"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help=f"model shape: {', '.join(CONFIGS)}")
    p.add_argument("--parts", default="sample,update,e2e", help="which parts to run: sample, update, e2e")
    p.add_argument("--update-layers", type=int, default=None, help="fewer layers for the update and e2e parts "
                   "(an 8B update with fp32 master weights and AdamW does not fit one GPU without offload)")
    p.add_argument("--rows", type=int, default=8, help="rows decoded together (paper: 48 per GPU)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps")
    p.add_argument("--k", type=int, default=8, help="rollouts per score+update micro-batch; e2e: K per question")
    p.add_argument("--answer-len", type=int, default=8, help="tokens of y")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="also time the compiled engine (and, on a GPU, CUDA "
                   "graphs)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median and range)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for e2e (default: the shared SmolLM2's)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
    return p.parse_args(argv)


def build(args, dtype, layers=None, vocab=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(CONFIGS[args.config], max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.update({k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v})
    torch.manual_seed(0)
    with torch.device(args.device):
        lm = LlamaForCausalLM(LlamaConfig(**cfg, pad_token_id=0)).to(dtype)
    return lm.eval()


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(seconds of each of `repeats` runs, seconds of the first run: warm-up, compilation and capture)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first, runs = time.perf_counter() - t, []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t)
    return runs, first


def spread(values, scale=1.0, fmt="{:.2f}"):
    """'median (min-max)' of a list, scaled."""
    v = sorted(x * scale for x in values)
    return f"{fmt.format(v[len(v) // 2])} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def shape_of(lm) -> str:
    c = lm.config
    n = sum(p.numel() for p in lm.parameters())
    return (f"{c.num_hidden_layers} x {c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads, vocab "
            f"{c.vocab_size}, {n / 1e6:.1f} M")


def measure_sampler(args, which, lm, device):
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (args.rows, args.prompt_len), generator=g)
    u = torch.rand(args.rows, args.new_tokens, generator=g, dtype=torch.float64)
    moved = None
    if which == "hf_generate":
        ids = prompts.to(device)
        def fn():
            lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
    else:
        # no stop ids: every row decodes --new-tokens tokens, like the official sampler; no stop checks either
        latro.STOP_CHECK_EVERY = args.new_tokens
        if which != "engine":   # Inductor counts the bytes its kernels move, per compiled graph
            torch._logging.set_logs(inductor_metrics=True)
            from torch._inductor import metrics
            metrics.reset()
        engine = latro.Engine(lm, [], compile=which != "engine", graphs=which == "engine_graphs")
        rows = prompts.tolist()
        def fn():
            engine.generate(rows, args.new_tokens, uniforms=u)
    with torch.no_grad():
        runs, first = timed(fn, device, args.repeats)
        if which != "hf_generate" and which != "engine":
            moved = metrics.num_bytes_accessed / max(1, len(engine.states))   # one decode-step graph per shape
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    c, S = lm.config, args.prompt_len + args.new_tokens / 2     # the cache read at the average step
    kv_bytes = args.rows * S * c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    kv_bytes *= next(lm.parameters()).element_size()
    return {"ms_per_step": [1000 * r / args.new_tokens for r in runs], "tokens": args.rows * args.new_tokens,
            "ms_per_token": [1000 * r / args.new_tokens / args.rows for r in runs], "shape": shape_of(lm),
            "gb_per_s": weight_bytes * args.new_tokens / sorted(runs)[len(runs) // 2] / 1e9, "warmup_s": first - min(runs),
            "moved_gb": None if moved is None else moved / 1e9, "floor_gb": (weight_bytes + kv_bytes) / 1e9}


def naive_logp(model, x, mask):
    """The official way: log_softmax over the whole vocabulary at every position, then the target tokens."""
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    return (lp * mask[:, 1:]).sum(-1)


def naive_update(lm, ref, opt, ids, P, Z, ctx, K):
    """One official-style score + update over rows [x; z; y]: 3 forwards without gradient, 2 with."""
    z_mask = torch.zeros_like(ids, dtype=torch.bool)
    z_mask[:, P:P + Z] = True
    y_mask = torch.zeros_like(z_mask)
    y_mask[:, P + Z:] = True
    xz, zm = ids[:, :P + Z], z_mask[:, :P + Z]
    with ctx:
        with torch.no_grad():  # policy x+z, reference x+z, policy x+z+y
            naive_logp(lm, xz, zm), naive_logp(ref, xz, zm), naive_logp(lm, ids, y_mask)
        lz, ly = naive_logp(lm, xz, zm), naive_logp(lm, ids, y_mask)   # 2 forwards with gradient
    fin = torch.ones(1, K, dtype=torch.bool, device=ids.device)
    loss, _ = latro.latro_loss(lz.view(1, K), lz.detach().view(1, K), ly.view(1, K), fin, 0.05)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_update(args, which, lm, device, dtype):
    V, K, P, Z, Y = lm.config.vocab_size, args.k, args.prompt_len, args.new_tokens, args.answer_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (K, P + Z + Y), generator=g).to(device)
    ref = build(args, dtype, args.update_layers).requires_grad_(False)
    lm = lm.float() if dtype == torch.bfloat16 else lm  # fp32 master weights, compute under autocast
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-7)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
    if which == "naive":
        fn = lambda: naive_update(lm, ref, opt, ids, P, Z, ctx, K)
    else:
        attn = torch.ones_like(ids)
        z_mask = torch.zeros_like(ids, dtype=torch.bool)
        z_mask[:, P:P + Z] = True
        y_mask = torch.zeros_like(z_mask)
        y_mask[:, P + Z:] = True
        policy, reference, fin = latro.Scorer(lm), latro.Scorer(ref), torch.ones(1, K, dtype=torch.bool, device=device)
        def fn():
            with ctx:
                with torch.no_grad():
                    lref = (reference(ids, attn, z_mask) * z_mask[:, 1:]).sum(-1)
                lz, ly = latro.score(policy, ids, attn, z_mask, y_mask)
            loss, _ = latro.latro_loss(lz.view(1, K), lref.view(1, K), ly.view(1, K), fin, 0.05)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"s_per_rollout": [r / K for r in timed(fn, device, args.repeats)[0]], "shape": shape_of(lm)}


def e2e_inputs(args, workdir):
    """A random-weight model folder with a real tokenizer, and a GSM8K-shaped train file whose prompts are about
    --prompt-len tokens."""
    from transformers import AutoTokenizer
    tok_dir = args.tokenizer or next((p for p in (os.path.join(ROOT, "..", "shared", "gpu", "tok"),
                                                  os.path.join(ROOT, ".gpu", "tok"),
                                                  os.path.expanduser("~/.cache/latro-tests/SmolLM2-135M-Instruct"))
                                      if os.path.isdir(p)), None)
    if tok_dir is None:
        raise SystemExit("e2e needs a tokenizer folder: pass --tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    lm = build(args, torch.float32, args.update_layers, vocab=len(tok)).to("cpu")
    lm.config.eos_token_id, lm.config.pad_token_id = tok.eos_token_id, tok.pad_token_id or tok.eos_token_id
    lm.save_pretrained(os.path.join(workdir, "model"))
    tok.save_pretrained(os.path.join(workdir, "model"))
    words = "eggs apples trees cars dollars baskets hours miles pages cookies".split()
    with open(os.path.join(workdir, "train.jsonl"), "w") as f:
        for i in range(64):
            q = " ".join(words[(i + j) % len(words)] for j in range(max(1, args.prompt_len - 40)))
            f.write(json.dumps({"question": f"{q}? How many?", "answer": f"#### {i}"}) + "\n")
    return os.path.join(workdir, "model"), os.path.join(workdir, "train.jsonl")


def measure_e2e(args, which, device, dtype):
    """Whole steps on `args.rows` = questions x K rows: latro.py itself (its steps 2.., as logged), or the
    official-style step (generate with output scores, no early stop, then the naive score + update) on the same
    model; the first step of each is warm-up. Per step: sampling seconds, score + update seconds, tokens decoded."""
    questions = max(1, args.rows // args.k)
    with tempfile.TemporaryDirectory() as work:
        model, dataset = e2e_inputs(args, work)
        if which == "latro":
            cmd = [sys.executable, os.path.join(ROOT, "latro.py"), "--model", model, "--dataset", dataset, "--out",
                   os.path.join(work, "run"), "--k", str(args.k), "--questions-per-rank", str(questions),
                   "--max-new-tokens", str(args.new_tokens), "--steps", str(1 + args.repeats), "--val-size", "4",
                   "--eval-every", "0", "--heldout-questions", "0", "--lr", "1e-7", "--device", args.device,
                   "--dtype", args.dtype, "--compile", "on" if args.compile else "off", "--save-every", "0"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"latro.py failed:\n{p.stderr[-3000:]}")
            steps = [r for r in map(json.loads, open(os.path.join(work, "run", "metrics.jsonl"))) if "reward" in r][1:]
            return {"s_sample": [r["t_sample"] for r in steps], "s_update": [r["t_score"] + r["t_update"] for r in steps],
                    "tokens": [r["z_len"] * args.rows for r in steps], "shape": json.load(open(os.path.join(
                        model, "config.json")))["vocab_size"]}
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).requires_grad_(False)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-7)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
        import data
        prompts = data.prompt_ids(tok, data.load_split(dataset, "train")[:questions])
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts for _ in range(args.k)], device=device)
        times = []
        for _ in range(1 + args.repeats):   # the first is warm-up, as for latro.py
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), ctx:   # the official sampler: output scores, no early stop
                out = lm.generate(ids, attention_mask=(ids != tok.pad_token_id).long(), do_sample=True, top_k=0,
                                  top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            sync(device)
            t1 = time.perf_counter()
            y = torch.randint(0, len(tok), (ids.shape[0], args.answer_len), device=device)
            rows = torch.cat([out.sequences, y], 1)
            for q in range(questions):  # one question's K rows per micro-batch, as latro.py's default
                naive_update(lm, ref, opt, rows[q * args.k:(q + 1) * args.k], P, args.new_tokens, ctx, args.k)
            sync(device)
            times.append((t1 - t0, time.perf_counter() - t1))
        return {"s_sample": [t[0] for t in times[1:]], "s_update": [t[1] for t in times[1:]],
                "tokens": [ids.shape[0] * args.new_tokens] * args.repeats, "shape": lm.config.vocab_size}


# the names ../shared/gpu/check.sh asks for: the eager engine, and the fastest compiled path of the device
OLD_NAMES = {"latro_static": "engine", "latro_dynamic": "engine"}


def run_one(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    kind, which = args.only.split(":")
    which = OLD_NAMES.get(which, which)
    if which == "latro_static_compiled":
        which = "engine_graphs" if device.type == "cuda" else "engine_compiled"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "e2e":
        res = measure_e2e(args, which, device, dtype)
    else:
        lm = build(args, dtype, args.update_layers if kind == "update" else None)
        base = peak_gb(device) if device.type == "cpu" else 0.0
        res = measure_sampler(args, which, lm, device) if kind == "sample" else measure_update(args, which, lm, device, dtype)
        res["peak_gb"] = peak_gb(device) - base if device.type == "cpu" else peak_gb(device)
    print("RESULT " + json.dumps(res))


def child(args, only):
    argv = [sys.executable, os.path.abspath(__file__), "--only", only] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("only", "compile") and v is not None]
    argv += ["--compile"] if args.compile else []
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
    parts = args.parts.split(",")
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# {dev}, torch {torch.__version__}, config {args.config}"
          f"{f' ({args.update_layers} layers for update/e2e)' if args.update_layers else ''}, {args.dtype}, "
          f"rows {args.rows}, prompt {args.prompt_len}, new tokens {args.new_tokens}, K {args.k}")
    if "sample" in parts:
        samplers = SAMPLERS[:2] + (SAMPLERS[2:3] if args.compile else []) + \
            (SAMPLERS[3:] if args.compile and args.device.startswith("cuda") else [])
        res = {s: child(args, f"sample:{s}") for s in samplers}
        med = lambda v: sorted(v)[len(v) // 2]
        base = med(res["hf_generate"]["ms_per_step"])
        print(f"\nsample: {res['hf_generate']['shape']}; each path decodes {res['hf_generate']['tokens']} tokens "
              f"({args.rows} rows x {args.new_tokens}); median (range) of {args.repeats} runs")
        print("\n| sampler | ms / decode step | ms / decoded token | weights GB/s | vs generate | peak GB |\n"
              "|---|---|---|---|---|---|")
        for s, r in res.items():
            print(f"| {s} | {spread(r['ms_per_step'])} | {spread(r['ms_per_token'], fmt='{:.3f}')} | "
                  f"{r['gb_per_s']:.1f} | {base / med(r['ms_per_step']):.2f}x | {r['peak_gb']:.2f} |")
        for s, r in res.items():
            if s.startswith("engine_"):
                print(f"warm-up of {s} (compilation{', capture' if 'graphs' in s else ''}): {r['warmup_s']:.1f} s; "
                      f"bytes moved per decode step (Inductor's count): {r['moved_gb']:.3f} GB against a floor of "
                      f"{r['floor_gb']:.3f} GB (weights + the KV cache read once)")
    if "update" in parts:
        up = {w: child(args, f"update:{w}") for w in ("naive", "fused")}
        med = lambda v: sorted(v)[len(v) // 2]
        print(f"\nupdate: {up['naive']['shape']}; {args.k} rollouts of {args.prompt_len} + {args.new_tokens} + "
              f"{args.answer_len} tokens per call\n\n| score + update | s / rollout | vs naive | peak GB |\n|---|---|---|---|")
        for w, r in up.items():
            print(f"| {w} | {spread(r['s_per_rollout'], fmt='{:.4f}')} | "
                  f"{med(up['naive']['s_per_rollout']) / med(r['s_per_rollout']):.2f}x | {r['peak_gb']:.2f} |")
    if "e2e" in parts:
        e2e = {w: child(args, f"e2e:{w}") for w in ("official", "latro")}
        med = lambda v: sorted(v)[len(v) // 2]
        total = lambda r: [a + b for a, b in zip(r["s_sample"], r["s_update"])]
        print(f"\ne2e: {max(1, args.rows // args.k)} questions x K {args.k} per step, vocab {e2e['latro']['shape']}, "
              f"L {args.new_tokens}; median (range) of {args.repeats} steps after one warm-up step\n")
        print("| one whole step | tokens decoded | sample s | ms / decoded token | score + update s | total s | vs official |"
              "\n|---|---|---|---|---|---|---|")
        for w, r in e2e.items():
            ms_tok = [1000 * s / max(t, 1) for s, t in zip(r["s_sample"], r["tokens"])]
            print(f"| {w} | {med(r['tokens']):.0f} | {spread(r['s_sample'])} | {spread(ms_tok, fmt='{:.3f}')} | "
                  f"{spread(r['s_update'])} | {spread(total(r))} | {med(total(e2e['official'])) / med(total(r)):.2f}x |")

if __name__ == "__main__":
    main()
