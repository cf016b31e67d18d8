"""
tests/fsdp_memory.py: GPU memory per rank of latro.py's training state, counted by torch's own FSDP2 memory
tracker, beside the README's arithmetic. Prints a table, asserts nothing; a few minutes on a CPU, allocating
nothing (every tensor is a FakeTensor: shapes and bytes, no data).

For each model shape the README names (Llama-3.1-8B, Mistral-7B-v0.3, Phi-3.5-mini) on 1 or 8 GPUs of 80 GB:
  arithmetic  the training state, 16 bytes per parameter (fp32 weights 4, gradients 4, AdamW m and v 8) divided
              over the GPUs unless replicated, plus two compute-dtype copies (the reference pi_0 and the sampler's
              replica, 2 bytes each in bf16) on every GPU; and which layout `latro.auto_layout` picks.
  tracker     `FSDPMemTracker` (torch.distributed._tools.fsdp2_mem_tracker) over one rank of a fake process group
              of 1 or 8 ranks: latro.py's own `meta_model`, `wrap` (FSDP2, bf16 compute, fp32 gradients),
              `Scorer`/`score`, `latro_loss` and AdamW, two steps of one micro-batch (K = 16 rows of 320 prompt +
              500 rationale + 16 answer tokens, gradient checkpointing on: the GPU default), with the reference,
              the replica and the engine's KV cache for 48 rows (`Engine.reserve`) held beside it. It reports the
              state the rank keeps after a step (sharded parameters, AdamW state) and the peak of the second
              step's forward and backward, when the AdamW state exists. The layout is the one whose state sits
              on the GPU: replicate on 1 GPU, shard on 8 (offload keeps the state on the host, and on a CPU the
              tracker cannot tell host memory from GPU memory, so offload rows are arithmetic only).
Two things differ from a real run, both stated where they happen: the scorer's boolean selection of the z and
y positions (a shape that depends on data) is a slice of the same size, and the AdamW step runs outside the
tracker (it counts the fused step's DTensor temporaries at their global size, an artifact of fake tensors).

It uses private torch modules (torch.distributed._tools, torch.testing._internal.distributed.fake_pg), which
may change between releases: the README's figures come from torch 2.13.0 and transformers 5.24.0.

    python tests/fsdp_memory.py                          # every model, 1 and 8 GPUs
    python tests/fsdp_memory.py --models llama-3.1-8b --gpus 8
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import latro  # noqa: E402
from bench import CONFIGS  # noqa: E402

GB = 2**30
MODELS = {   # LlamaConfig fields of each model's shape (Phi-3.5's fused qkv and gate_up hold the same parameters)
    "llama-3.1-8b": CONFIGS["8b"],
    "mistral-7b": dict(CONFIGS["8b"], vocab_size=32768),   # Llama-3.1-8B's shape with Mistral's vocabulary
    "phi-3.5-mini": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064),
}


def arithmetic(n: int, gpus: int, layout: str) -> tuple:
    """(GB per GPU, GB of host memory per node while training, GB of host at a checkpoint save) of a layout:
    16 bytes of training state per parameter over `gpus` (all of it per GPU when replicated; on the host when
    offloaded) plus the two bf16 copies per GPU; a save gathers the full AdamW state (8 bytes per parameter) on
    rank 0's host, after the full fp32 weights (4)."""
    state = 16 * n / (1 if layout == "replicate" else gpus)
    gpu = (0 if layout == "offload" else state) + 2 * 2 * n
    host = 16 * n if layout == "offload" else 0
    return gpu / GB, host / GB, (host + 8 * n) / GB


def auto_pick(n: int, gpus: int) -> str:
    """latro.auto_layout's choice for one process per 80 GB GPU (the device's size patched in: no GPU here)."""
    real = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda d: type("Props", (), {"total_memory": 80 * 10**9})
    try:
        return latro.auto_layout(n, gpus, torch.device("cuda", 0), torch.bfloat16)
    finally:
        torch.cuda.get_device_properties = real


class SliceScorer(latro.Scorer):
    """latro.Scorer with its one data-dependent line replaced: `hidden[sel]` has a shape only the data decide,
    which fake tensors cannot carry; a slice of the same number of positions (`self.m`) costs the same memory."""

    def forward(self, input_ids, attention_mask, target_mask):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state     # (B, T, H)
        sel = target_mask[:, 1:]
        h, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1])[:self.m], input_ids[:, 1:].reshape(-1)[:self.m]
        head, parts = self.lm.get_output_embeddings(), []
        for i in range(0, self.m, self.chunk):
            args = (head, h[i:i + self.chunk], targets[i:i + self.chunk])
            parts.append(latro.checkpoint(latro._chunk_logprobs, *args, use_reentrant=False))
        return hidden.new_zeros(sel.shape, dtype=torch.float32).masked_scatter(sel, torch.cat(parts))


def tracked(shape: dict, gpus: int, a) -> dict:
    """GB on one rank of `gpus`: the state kept after a step, and the peak of a step's forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM, LlamaConfig
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    dev, layout = torch.device("cpu"), "replicate" if gpus == 1 else "shard"
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=8192)
    lm = latro.meta_model(cfg, torch.float32)   # meta tensors; the mesh and the FSDP2 wrapping outside fake mode
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    scorer = SliceScorer(lm, latro.LOGPROB_CHUNK)
    model = latro.wrap(scorer, layout, dev, torch.bfloat16, gpus)
    rows, T, z, y = a.k, a.prompt + a.L + 16, a.L, 16                     # one question's K rows, every z at L
    scorer.m = rows * (z + y)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=True)
        tracker = FSDPMemTracker(model, opt)
        with tracker:   # made inside the tracker, which counts only what it sees made (no track_external here)
            ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)   # pi_0 and the sampler, bf16
            replica = latro.make_replica(ref)
            engine = latro.Engine(replica, [])
            engine.reserve(a.questions * a.k, a.prompt + a.L)             # the KV cache of a step's rollouts
        ids, attn = torch.zeros(rows, T, dtype=torch.long), torch.ones(rows, T, dtype=torch.long)
        z_mask, y_mask = torch.zeros(rows, T, dtype=torch.bool), torch.zeros(rows, T, dtype=torch.bool)
        z_mask[:, a.prompt:a.prompt + z], y_mask[:, a.prompt + z:a.prompt + z + y] = True, True
        finished = torch.ones(1, rows, dtype=torch.bool)
        for step in range(2):
            with tracker:
                lm.train()
                logp_z, logp_y = latro.score(model, ids, attn, z_mask, y_mask)
                item, torch.Tensor.item = torch.Tensor.item, lambda t: 0.0   # latro_loss's logged stats: no data
                loss, _ = latro.latro_loss(logp_z.view(1, rows), logp_z.detach().view(1, rows),
                                           logp_y.view(1, rows), finished, 0.05)
                torch.Tensor.item = item
                loss.backward()
            peak = tracker.get_tracker_snapshot("peak")[dev]["Total"]
            opt.step()   # outside the tracker: see the docstring
            opt.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()
        with tracker:   # what the rank keeps between steps: parameters, AdamW state, copies, KV cache
            kept = tracker.get_tracker_snapshot("current")[dev]
    dist.destroy_process_group()
    state = sum(v for k, v in kept.items() if str(k).endswith(("SHARDED_PARAM", "OPT")))
    return {"layout": layout, "state": state / GB, "kept": kept["Total"] / GB, "peak": peak / GB}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"model shapes: {', '.join(MODELS)}")
    p.add_argument("--gpus", default="1,8", help="GPUs (one process each) to count for")
    p.add_argument("--k", type=int, default=16, help="rationales per question: the rows of a micro-batch")
    p.add_argument("--questions", type=int, default=3, help="questions per GPU per step: rows = questions x K")
    p.add_argument("--prompt", type=int, default=320, help="prompt tokens (GSM8K's longest, bucketed)")
    p.add_argument("--L", type=int, default=500, help="rationale tokens")
    p.add_argument("--lr", type=float, default=5e-7)
    a = p.parse_args(argv)
    print(f"# torch {torch.__version__}; GB = 2^30 bytes; per rank of one process per GPU; micro-batch {a.k} rows x "
          f"({a.prompt} + {a.L} + 16) tokens; KV cache {a.questions * a.k} rows x {a.prompt + a.L}")
    print("| model | GPUs | auto picks | arithmetic, GB per GPU: replicate / shard / offload | arithmetic, GB of "
          "host: replicate or shard / offload (at a save) | tracker, GB on one rank: layout, state kept / all kept "
          "/ peak of a step |")
    print("|---|---|---|---|---|---|")
    from transformers import LlamaConfig
    for name in a.models.split(","):
        n = sum(t.numel() for t in latro.meta_model(LlamaConfig(**MODELS[name], tie_word_embeddings=False),
                                                      torch.float32).parameters())
        for gpus in map(int, a.gpus.split(",")):
            t0 = time.time()
            gpu = [arithmetic(n, gpus, lay)[0] for lay in ("replicate", "shard", "offload")]
            (_, host, save), (_, off, off_save) = arithmetic(n, gpus, "shard"), arithmetic(n, gpus, "offload")
            t = tracked(MODELS[name], gpus, a)
            print(f"| {name} ({n / 1e9:.2f} B) | {gpus} | {auto_pick(n, gpus)} | " + " / ".join(f"{g:.1f}" for g in gpu)
                  + f" | {host:.0f} ({save:.0f}) / {off:.0f} ({off_save:.0f}) | {t['layout']}: {t['state']:.1f} / "
                  f"{t['kept']:.1f} / {t['peak']:.1f} ({time.time() - t0:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
