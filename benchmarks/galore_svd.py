"""How GaLore's projector refresh should compute the top-r singular vectors of a weight gradient.

GaLore refreshes every targeted weight's projector from its gradient every ``update_proj_gap`` steps. On a ~1B Llama
(112 targets, rank 512) ``torch.linalg.svd`` made that refresh step take ~23 s on an H200, ~0.12 s per step amortized
over the default gap of 200 -- more than the training step itself. This compares, on real gradients of the model, the
ways to get the same top-r subspace:

- ``svd``:        torch.linalg.svd(G, full_matrices=False), default driver (what the GaLore reference code does);
- ``gesvdj``:     the same with CUDA's Jacobi driver (CUDA only);
- ``gram_eigh``:  eigenvectors of the smaller Gram matrix (G Gᵀ or Gᵀ G, fp32) -- the exact same subspace in exact
                  arithmetic, one small symmetric eigenproblem instead of an SVD;
- ``lowrank``:    torch.svd_lowrank (randomized, niter=2) -- an approximation.

Quality is the gradient energy the rank-r projector keeps, relative to the exact SVD's (1.0 = as good as exact).

    python benchmarks/galore_svd.py --out galore_svd.json           # GPU, the 1B Llama of lowrank_memory.py
    python benchmarks/galore_svd.py --tiny                          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_optim.optimizers.projection import LEFT, projection_side


def top_subspace(g: torch.Tensor, r: int, side: str, method: str) -> torch.Tensor:
    """Orthonormal basis (m x r for LEFT, n x r for RIGHT) of the top-r singular subspace of g on `side`."""
    g = g.float()
    if method in ("svd", "gesvdj"):
        kw = {"driver": "gesvdj"} if method == "gesvdj" else {}
        u, _, vh = torch.linalg.svd(g, full_matrices=False, **kw)
        return u[:, :r] if side == LEFT else vh[:r].t()
    if method == "gram_eigh":
        gram = g @ g.t() if side == LEFT else g.t() @ g
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        return vecs[:, -r:].flip(-1)
    if method == "lowrank":
        u, _, v = torch.svd_lowrank(g, q=r, niter=2)
        return u if side == LEFT else v
    raise ValueError(method)


def kept_energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    g = g.float()
    return float((basis.t() @ g).square().sum() if side == LEFT else (g @ basis).square().sum())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gradients(args, device) -> dict[tuple[int, int], list[torch.Tensor]]:
    import transformers

    cfg = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=2048)
    if args.tiny:
        cfg.update(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.bfloat16)
        tokens = torch.randint(0, cfg["vocab_size"], (1, (32 if args.tiny else 1024) + 1))
    logits = model(tokens[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)).backward()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
            by_shape.setdefault(tuple(p.shape), []).append(p.grad.detach().clone())
    return by_shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rank", type=int, default=None, help="default 512 (16 with --tiny)")
    ap.add_argument("--per-shape", type=int, default=3, help="gradients timed per weight shape")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rank = args.rank or (16 if args.tiny else 512)
    methods = ["svd", "gram_eigh", "lowrank"] + (["gesvdj"] if device.type == "cuda" else [])
    grads = gradients(args, device)
    counts = {shape: len(gs) for shape, gs in grads.items()}
    rows = []
    for shape, gs in grads.items():
        side = projection_side(shape, "std")
        r = min(rank, *shape)
        for method in methods:
            times, quality = [], []
            for g in gs[: args.per_shape] * 2:  # first pass warms the solver up; only the second is timed
                sync(device)
                t0 = time.perf_counter()
                basis = top_subspace(g, r, side, method)
                sync(device)
                times.append(time.perf_counter() - t0)
                exact = top_subspace(g, r, side, "svd") if method != "svd" else basis
                quality.append(kept_energy(g, basis, side) / kept_energy(g, exact, side))
            timed = times[len(times) // 2:]
            rows.append({"shape": list(shape), "side": side, "rank": r, "method": method,
                         "count_in_model": counts[shape],
                         "ms": statistics.median(timed) * 1e3, "kept_energy_vs_svd": min(quality)})
            print(f"{str(shape):14s} {side:5s} r={r:4d} {method:10s} {rows[-1]['ms']:9.1f} ms  "
                  f"energy vs svd {rows[-1]['kept_energy_vs_svd']:.6f}", flush=True)
    print("\nwhole refresh of the model (every target once):")
    totals = {}
    for method in methods:
        totals[method] = sum(r["ms"] * r["count_in_model"] for r in rows if r["method"] == method)
        print(f"  {method:10s} {totals[method] / 1e3:8.2f} s   ({totals['svd'] / totals[method]:.1f}x vs svd)")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "rank": rank, "tiny": args.tiny}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "refresh_ms": totals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
