"""Tune and check lit_optim's fused low-bit step kernel on one GPU: time per launch configuration against the copy
speed, next to torch's fused AdamW, with the first (compiling) step timed in a fresh Triton cache.

    python benchmarks/lowbit_kernel.py --out lowbit_kernel.json      # 64 x 4096^2 bf16 parameters (1.07B)

Bytes counted per parameter (each tensor read once and written once): bf16 parameter read and written (4), bf16
gradient read (2), codes read and written (2 moments: 8-bit 4, 4-bit 2) and the fp32 scales (2 moments x 2 x 4 / block).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def copy_speed(gib: float = 2.0) -> float:
    n = int(gib * (1 << 30))
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / time_ms(lambda: dst.copy_(src)) / 1e9  # TB/s as bytes / ms / 1e9


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sweep(bits: int, block: int, params, grads, report) -> None:
    from lit_optim.kernels import codes
    from lit_optim.kernels.reference import ADAMW
    from lit_optim.kernels.triton_lowbit import step_many

    states = [codes.empty_state(p.numel(), bits, block, 2, "cuda") for p in params]
    work = [p.clone() for p in params]
    bpp = 4 + 2 + 2 * 2 * bits / 8 + 2 * 2 * 4 / block
    hp = dict(mode=ADAMW, bits=bits, block_size=block, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.01, inv_bc1=1.0, inv_sqrt_bc2=1.0)
    t0 = time.perf_counter()
    compiled = step_many(work, grads, states, **hp)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ptx = compiled.asm.get("ptx", "")
    print(f"{bits}-bit kernel: fma.rn.f32 in PTX {ptx.count('fma.rn.f32')}, ld.global.v4 {ptx.count('ld.global.v4')}, "
          f"registers {getattr(compiled, 'n_regs', '?')}, spills {getattr(compiled, 'n_spills', '?')}")
    report(f"lit_optim {bits}-bit default", time_ms(lambda: step_many(work, grads, states, **hp)), bpp, first)
    configs = [dict(span=16), dict(span=64), dict(span=256), dict(num_warps=2, span=64), dict(exact=True)]
    for cfg in configs:
        try:
            ms = time_ms(lambda c=cfg: step_many(work, grads, states, **c, **hp))
        except RuntimeError as err:  # a configuration the compiler refuses
            print(f"  {cfg}: {type(err).__name__}: {err}"[:200])
            continue
        report(f"  {bits}-bit block={block} {cfg}", ms, bpp)
    assert all(torch.isfinite(w).all() for w in work[:2])


def bitwise_summary() -> None:
    """Kernel against the plain-torch reference on this GPU, every mode, bits and dtype: which outputs differ."""
    from lit_optim.kernels import codes
    from lit_optim.kernels.reference import ADAM, ADAMW, LION, step_tensor
    from lit_optim.kernels.triton_lowbit import step_many

    for bits, block in ((8, 256), (4, 128)):
        for mode in (ADAM, ADAMW, LION):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                shapes = [(2048, 1024), (3, 1000), (257,)]
                ref = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
                fused = [p.clone() for p in ref]
                sr, sf = [], []
                for p in ref:
                    st = codes.empty_state(p.numel(), bits, block, 1 if mode == LION else 2, "cuda")
                    sr.append(st)
                    sf.append({k: v.clone() for k, v in st.items()})
                for step in range(1, 4):
                    grads = [torch.randn_like(p) for p in ref]
                    hp = dict(mode=mode, bits=bits, block_size=block, lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                              weight_decay=0.1, inv_bc1=1 / (1 - 0.9 ** step),
                              inv_sqrt_bc2=1 / (1 - 0.99 ** step) ** 0.5)
                    for p, g, st in zip(ref, grads, sr):
                        step_tensor(p, g, st, **hp)
                    step_many(fused, grads, sf, exact=True, **hp)
                diff = {"param": sum(int((a != b).sum()) for a, b in zip(ref, fused))}
                for key in sr[0]:
                    diff[key] = sum(int((x[key] != y[key]).sum()) for x, y in zip(sr, sf))
                print(f"bitwise {bits}-bit mode={mode} {str(dtype)[6:]}: differing elements {diff}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_cold_"))
    bitwise_summary()
    torch.manual_seed(0)
    speed = copy_speed()
    n_params = args.tensors * args.dim * args.dim
    params = [torch.randn(args.dim, args.dim, device="cuda", dtype=torch.bfloat16) for _ in range(args.tensors)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    rows_out = []
    print(f"{torch.cuda.get_device_name()}  copy speed {speed:.2f} TB/s  params {n_params / 1e9:.3f}B", flush=True)

    def report(label, ms, bytes_per_param, first_s=None):
        floor = bytes_per_param * n_params / speed / 1e9
        row = dict(label=label, ms=ms, bytes_per_param=bytes_per_param, floor_ms=floor, pct=100 * floor / ms,
                   first_step_s=first_s)
        rows_out.append(row)
        print(f"{label:<34} {ms:8.3f} ms  floor {floor:6.3f} ms  {row['pct']:5.1f}% of copy speed"
              + (f"  first step {first_s:.2f} s" if first_s is not None else ""), flush=True)

    # torch fused AdamW, bf16 state (what HF/Lightning users run with bf16 weights)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    report("torch AdamW fused (bf16 state)", time_ms(opt.step), 14, time.perf_counter() - t0)
    del opt, ps
    torch.cuda.empty_cache()

    for bits, block in ((8, 256), (4, 128), (4, 256)):
        sweep(bits, block, params, grads, report)
        torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_tb_s=speed,
                           params=n_params, rows=rows_out), f, indent=1)
    best = {b: min((r for r in rows_out if r["label"].strip().startswith(f"{b}-bit") and "exact" not in r["label"]),
                   key=lambda r: r["ms"], default=None) for b in (8, 4)}
    print("\nbest:", {b: (r["label"].strip(), round(r["ms"], 3), round(r["pct"], 1)) for b, r in best.items() if r})



if __name__ == "__main__":
    main()
