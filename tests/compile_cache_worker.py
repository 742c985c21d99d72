"""One fresh process: build a torchao optimizer through lit_optim, take two steps, print times and cache counters.

Run by tests/test_compile_cache.py in two successive processes: what the second one finds in the cache is what every
later training run finds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {
    # each >= 4096 elements and divisible by the block sizes, so the state is the low-bit subclass
    "tiny": [("layers.0.proj.weight", (64, 64))],
    # Llama-3.1-8B: attention q, k, MLP gate, a norm
    "llama": [("layers.0.self_attn.q_proj.weight", (4096, 4096)), ("layers.0.self_attn.k_proj.weight", (1024, 4096)),
              ("layers.0.mlp.gate_proj.weight", (14336, 4096)), ("layers.0.input_layernorm.weight", (4096,))],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="adamw_torch_8bit")
    ap.add_argument("--shapes", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from torch._dynamo.utils import counters

    import lit_optim

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    named = []
    for name, shape in SHAPES[args.shapes]:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        p.grad = torch.randn_like(p)
        named.append((name, p))
    opt = lit_optim.build_optimizer(named, args.optimizer, lr=1e-3, weight_decay=0.1)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({
        "first_s": times[0], "second_s": times[1], "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }), flush=True)


if __name__ == "__main__":
    main()
