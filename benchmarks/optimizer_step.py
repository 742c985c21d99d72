"""The optimizer step alone, every AdamW variant side by side in one process on one GPU (issue 13).

What it measures, in this order:

1. the device's copy speed: a large device-to-device copy (bytes read + bytes written over the median time of the
   copies, CUDA events), the ceiling every step below is compared with;
2. per variant, on the same parameters (default 64 x 4096^2 bf16 = 1.074B params) and fresh random-normal gradients
   before every step (never zeros): the first ``optimizer.step()`` (wall time, synchronised: state allocation and any
   compilation included), then ``--warmup`` steps, then ``--steps`` steps each timed with CUDA events (median, min,
   max); the state bytes per parameter counted from the optimizer's state storages (``lit_optim.state_bytes``: torchao's
   tensor subclasses are counted by their inner codes and scales, shared maps once); the bytes model; the achieved TB/s
   and the share of the copy speed.

The bytes model: each tensor read and written once. Read parameter, gradient and state; write parameter and state:
``2 x param bytes + grad bytes + 2 x state bytes`` per parameter, the state bytes as measured (scales, error bits
and shared maps included). bf16 params with bf16 AdamW state: 2*2 + 2 + 2*4 = 14 B/param; with 8-bit state
(2 x 1 B + scales) ~10; with 4-bit state (2 x 0.5 B + scales) ~8; fp32 params add 6 (params and gradient twice as
wide). The floor is that many bytes over the copy speed.

Variants are ``NAME[:key=value,...]``: NAME is a lit_optim registry name (built with ``lit_optim.build_optimizer``,
its param groups and checks), or a dotted class path (``torch.optim.AdamW``, ``flashoptim.FlashAdamW``), built
directly over the parameters; the key=value pairs are extra hyperparameters (Python literals; ``none`` / ``true`` /
``false`` accepted). A variant that cannot run here is skipped with the reason: name not in the registry, backend not
installed, needs CUDA or a newer GPU. One that fails while building or stepping is kept as a row with its error.

    python benchmarks/optimizer_step.py --rounds 2 --out step.json       # the default variants, bf16, on cuda, twice
    python benchmarks/optimizer_step.py --dtype float32 --out step32.json
    python benchmarks/optimizer_step.py --variant adamw_torch_fused --variant "flash_adamw:master_weight_bits=None"
    python benchmarks/optimizer_step.py --device cpu --tensors 2 --dim 64 --steps 2   # CPU smoke test (CI)
    python benchmarks/optimizer_step.py --e2e    # print the end-to-end 8B command (benchmarks/big_models.py)

``torch.optim.AdamW`` (``adamw_torch_fused``) keeps its state in the parameters' dtype: bf16 parameters, bf16 state
(4 B/param), as in the baseline of shared/notes/measurements.md. torchao compiles its step on the first call: its
first step depends on the inductor cache (lit_optim's persistent one; the JSON says which directory and whether it
held anything before the run).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the clone: the package next to it

GIB = 2**30

DEFAULT_VARIANTS = [
    "adamw_torch_fused",  # torch fused AdamW; bf16 params -> bf16 state
    "adamw_torch_8bit",  # torchao AdamW8bit
    "adamw_torch_4bit",  # torchao AdamW4bit
    "adamw_fp8",  # torchao AdamWFp8 (CUDA >= 8.9)
    "adamw_bnb_8bit",  # bitsandbytes AdamW8bit
    "flash_adamw:master_weight_bits=None",  # FlashOptim FlashAdamW, int8 state, no master weights
    "flash_adamw:master_weight_bits=24",  # ... with 24-bit master weights (1 B/param of error bits)
    "adamw_fused_8bit",  # lit_optim's fused Triton kernels
    "adamw_fused_4bit",
]

# The end-to-end comparison: 8B Llama, seq 512, bs 1, no accumulation, one `lit-optim train` process per optimizer.
E2E_COMMAND = "python benchmarks/big_models.py --suite fused --timeout 240 --out fused_e2e.json"


class Skip(Exception):
    """The variant cannot run on this machine; the message says why."""


@dataclass
class Variant:
    text: str  # as given: the row's label
    name: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()
    return tuple(value) if isinstance(value, list) else value


def parse_variant(text: str) -> Variant:
    """``name[:key=value,key=value]``; a value may itself hold commas (``betas=(0.9,0.95)``)."""
    name, _, rest = text.partition(":")
    hp: dict[str, Any] = {}
    if rest.strip():
        for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip().isidentifier():
                raise argparse.ArgumentTypeError(f"variant {text!r}: expected name[:key=value,...], got {item!r}")
            hp[key.strip()] = parse_value(value)
    if not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r} has no name")
    return Variant(text, name.strip(), hp)


# --- timing ---------------------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, reps: int, between=None) -> list[float]:
    """Milliseconds of each of `reps` calls of `fn`: CUDA events on the GPU, host clock on the CPU. `between` runs
    before every call, outside the timed region (fresh gradients)."""
    import torch

    times = []
    if device.type == "cuda":
        pairs = []
        for _ in range(reps):
            if between is not None:
                between()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(reps):
            if between is not None:
                between()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def spread(times: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": [round(t, 4) for t in times]}


def copy_speed(device, nbytes: int, reps: int) -> dict[str, Any]:
    """A device-to-device copy of `nbytes` random bytes: (read + written) / median time."""
    import torch

    def measure() -> tuple[list[float], bool]:  # the buffers live in here: freed on return
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        synchronize(device)
        times = timed(device, lambda: dst.copy_(src), reps)
        return times, bool(torch.equal(dst, src))

    times, ok = measure()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    s = spread(times)
    return {"bytes": nbytes, "reps": reps, **s, "tb_s": 2 * nbytes / (s["median_ms"] * 1e-3) / 1e12,
            "copy_correct": ok, "timer": "cuda events" if device.type == "cuda" else "host clock"}


# --- building -------------------------------------------------------------------------------------------------------

def build(variant: Variant, named: list, device, lr: float, weight_decay: float):
    """(optimizer, how it was built) or Skip with the reason."""
    from lit_optim import build_optimizer
    from lit_optim.errors import UnknownOptimizerError, UnsupportedOptimizerError
    from lit_optim.registry import availability, get_spec
    from lit_optim.spec import CPU

    hp = {"lr": lr, "weight_decay": weight_decay, **variant.hyperparameters}
    try:
        spec = get_spec(variant.name)
    except (UnknownOptimizerError, UnsupportedOptimizerError) as err:
        if "." not in variant.name:
            raise Skip(f"{variant.name!r} is not in lit_optim's registry (`lit-optim list`)") from err
        return build_direct(variant, named, hp)
    ok = availability(spec)
    if not ok.ok:
        raise Skip(ok.reason)
    if device.type != "cuda" and (spec.requires_cuda or CPU not in spec.supports):
        raise Skip(f"needs a CUDA GPU (running on {device.type})")
    opt = build_optimizer(named, variant.name, **hp)
    return opt, {"built": "lit_optim.build_optimizer", "name": spec.name, "backend": spec.backend,
                 "class": spec.target.replace(":", "."), "theory_bytes_per_param":
                     opt.lit_optim.record().get("theory_bytes_per_param")}


def build_direct(variant: Variant, named: list, hp: dict):
    module_name, _, cls_name = variant.name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise Skip(f"{module_name} is not installed ({err})") from err
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise Skip(f"{module_name} has no {cls_name}")
    opt = cls([p for _, p in named], **hp)
    return opt, {"built": "directly", "class": variant.name}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "triton", "torchao", "bitsandbytes", "flashoptim", "lightning"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def inductor_cache() -> dict[str, Any]:
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    held = bool(path and os.path.isdir(path) and any(os.scandir(path)))
    return {"inductor_cache_dir": path, "inductor_cache_held_files_before": held}


# --- one variant ----------------------------------------------------------------------------------------------------

def run_variant(variant: Variant, named: list, args, device, copy: dict) -> dict[str, Any]:
    import torch

    from lit_optim.state_bytes import state_report

    params = [p for _, p in named]
    n_params = sum(p.numel() for p in params)
    row: dict[str, Any] = {"variant": variant.text, "name": variant.name,
                           "hyperparameters": {k: repr(v) if not isinstance(v, (int, float, bool, str, type(None)))
                                               else v for k, v in variant.hyperparameters.items()}}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():  # every variant starts from the same parameters
        for p in params:
            p.normal_(0, 0.02, generator=gen)

    def fresh_grads():
        for p in params:
            p.grad.normal_(generator=gen)

    fresh_grads()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    opt = None
    try:
        t = time.perf_counter()
        try:
            opt, how = build(variant, named, device, args.lr, args.weight_decay)
        except Skip as why:
            return {**row, "status": "skipped", "reason": str(why)}
        row.update(how)
        row["build_s"] = time.perf_counter() - t
        row.update(inductor_cache())  # read after the build: lit_optim points torchao at its persistent cache there
        before = params[0].detach().clone()
        synchronize(device)
        t = time.perf_counter()
        opt.step()
        synchronize(device)
        row["first_step_ms"] = (time.perf_counter() - t) * 1e3
        for _ in range(args.warmup):
            fresh_grads()
            opt.step()
        synchronize(device)
        row.update(spread(timed(device, opt.step, args.steps, between=fresh_grads)))
        synchronize(device)
        report = state_report(opt)
        state_bpp = report.total.bytes / n_params
        elsize = params[0].element_size()
        grad_elsize = params[0].grad.element_size()
        moved_bpp = 2 * elsize + grad_elsize + 2 * state_bpp
        moved = moved_bpp * n_params
        median_s = row["median_ms"] * 1e-3
        row.update({
            "status": "ok",
            "state_bytes": report.total.bytes, "state_bytes_per_param": state_bpp,
            "state_bytes_by_location": {k: v for k, v in report.total.by_location.items() if v},
            "state_bytes_by_dtype": report.total.by_dtype, "quantized_params": report.total.quantized_params,
            "buffer_bytes": report.buffer_bytes,
            "model_bytes_per_param": moved_bpp, "model_bytes": moved,
            "tb_s": moved / median_s / 1e12,
            "pct_of_copy": 100 * moved / median_s / (copy["tb_s"] * 1e12) if copy.get("tb_s") else None,
            "floor_ms": moved / (copy["tb_s"] * 1e12) * 1e3 if copy.get("tb_s") else None,
            "params_finite": bool(all(torch.isfinite(p).all() for p in params)),
            # bf16 rounding can swallow small updates: the share of tensor 0 the steps changed, a sign of writing
            "changed_fraction_tensor0": float((params[0].detach() != before).float().mean()),
        })
        if device.type == "cuda":
            row["peak_above_params_grads_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
            row["allocated_above_params_grads_gib"] = (torch.cuda.memory_allocated(device) - base) / GIB
        return row
    except Exception as err:  # noqa: BLE001 - one variant's failure is a row, the others still run
        first_line = (str(err).strip().splitlines() or [""])[0][:400]
        return {**row, "status": "error", "reason": f"{type(err).__name__}: {first_line}"}
    finally:
        del opt
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # after a CUDA error: the row above says what it was
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()


# --- output ---------------------------------------------------------------------------------------------------------

def fmt(value, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def table(meta: dict, rows: list[dict]) -> str:
    copy = meta["copy"]
    lines = [
        f"device: {meta['device_name']}; torch {meta['versions']['torch']}; copy speed "
        f"{fmt(copy.get('tb_s'), '{:.3f}')} TB/s ({copy.get('bytes', 0) / GIB:.2f} GiB copy, median of "
        f"{copy.get('reps')}, {copy.get('timer')})",
        f"params: {meta['tensors']} x {meta['dim']}^2 {meta['dtype']} = {meta['params'] / 1e9:.3f}B; "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up; lr {meta['lr']}, wd {meta['weight_decay']}",
        "",
        "| variant | state B/param | step ms (median) | min-max ms | first step ms | model B/param | floor ms | TB/s "
        "| % of copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def label(r: dict) -> str:
        return f"{r['variant']} (round {r['round']})" if meta["rounds"] > 1 else r["variant"]

    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append(
            f"| {label(r)} | {r['state_bytes_per_param']:.3f} | {r['median_ms']:.3f} | "
            f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['first_step_ms']:.1f} | {r['model_bytes_per_param']:.2f} | "
            f"{fmt(r['floor_ms'], '{:.3f}')} | {r['tb_s']:.3f} | {fmt(r['pct_of_copy'], '{:.0f}%')} |")
    lines += [f"- {label(r)}: {r['status']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", type=parse_variant, dest="variants",
                    help="NAME[:key=value,...], repeatable (default: every AdamW variant; see the list in the script)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--dim", type=int, default=4096, help="each tensor is dim x dim")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (median, min, max)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list this many times (the spread between rounds is the noise)")
    ap.add_argument("--copy-mib", type=float, default=None,
                    help="size of the copy-speed buffer (default: 2048 on cuda, 64 on cpu)")
    ap.add_argument("--copy-reps", type=int, default=20)
    ap.add_argument("--out", help="JSON file with every number (written after each variant)")
    ap.add_argument("--e2e", action="store_true",
                    help="only print the end-to-end 8B command (benchmarks/big_models.py --suite fused) and exit")
    args = ap.parse_args(argv)
    if args.e2e:
        print(E2E_COMMAND)
        return {"e2e_command": E2E_COMMAND}

    import torch

    from lit_optim.noise import quiet_import_noise

    quiet_import_noise()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    variants = args.variants or [parse_variant(v) for v in DEFAULT_VARIANTS]

    copy_bytes = int((args.copy_mib or (2048 if device.type == "cuda" else 64)) * 2**20)
    copy = copy_speed(device, copy_bytes, args.copy_reps)
    print(f"copy speed: {copy['tb_s']:.3f} TB/s ({copy_bytes / GIB:.2f} GiB read + written, median "
          f"{copy['median_ms']:.3f} ms of {args.copy_reps}, {copy['timer']}; correct: {copy['copy_correct']})",
          flush=True)

    named = []
    for i in range(args.tensors):
        p = torch.nn.Parameter(torch.empty(args.dim, args.dim, dtype=dtype, device=device))
        p.grad = torch.empty_like(p)
        named.append((f"layers.{i}.weight", p))  # 2-D weights: every one in the decay group
    n_params = args.tensors * args.dim * args.dim
    meta = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "versions": versions(), "python": sys.version.split()[0], "dtype": args.dtype, "tensors": args.tensors,
        "dim": args.dim, "params": n_params, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "rounds": args.rounds, "copy": copy,
        "bytes_model": "2 x param bytes + grad bytes + 2 x measured state bytes, per parameter",
        "e2e_command": E2E_COMMAND,
    }
    print(f"params: {args.tensors} x {args.dim}^2 {args.dtype} = {n_params / 1e9:.3f}B on {meta['device_name']}",
          flush=True)
    rows: list[dict] = []
    result = {"meta": meta, "rows": rows}
    for round_ in range(1, args.rounds + 1):
        for variant in variants:
            row = {"round": round_, **run_variant(variant, named, args, device, copy)}
            rows.append(row)
        shown = {k: v for k, v in row.items() if k != "times_ms"}
        print(json.dumps(shown, default=str), flush=True)
        if args.out:  # after every row: a run killed at its time limit keeps the rows that finished
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    del named
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        meta["copy_end"] = copy_speed(device, copy_bytes, args.copy_reps)  # drift of the ceiling over the run
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print("\n" + table(meta, rows), flush=True)
    return result


if __name__ == "__main__":
    main()
