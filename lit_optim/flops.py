"""Peak FLOP/s of the device (for MFU) and FLOPs of one training batch.

Peak FLOP/s: Lightning's `get_available_flops` misses the names H200 drivers report ("NVIDIA H200" has neither "sxm1"
nor "nvl1" in it), and its H200 and H100 NVL entries are the datasheets' with-sparsity figures, twice what dense
matrix products can reach. `DENSE_PEAK_FLOPS` holds the dense figures of the Hopper parts under the names their
drivers report; every other device goes to Lightning's table.

Batch FLOPs: Lightning's `measure_flops` (a `FlopCounterMode` count of forward and backward) run on a meta-device
stand-in of the module -- no memory, no compute, no effect on the real parameters or their gradients -- or, when the
model cannot run on meta tensors, the 6 * N * tokens rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

# Dense (no sparsity) tensor-core peaks from NVIDIA's H100 / H200 datasheets, per GPU.
_H100_SXM = {torch.float64: 67e12, torch.float32: 67e12, "tfloat32": 494.7e12, torch.bfloat16: 989.4e12,
             torch.float16: 989.4e12, torch.float8_e4m3fn: 1978.9e12, torch.float8_e5m2: 1978.9e12,
             torch.int8: 1978.9e12}
_H100_PCIE = {torch.float64: 51e12, torch.float32: 51e12, "tfloat32": 378e12, torch.bfloat16: 756e12,
              torch.float16: 756e12, torch.float8_e4m3fn: 1513e12, torch.float8_e5m2: 1513e12, torch.int8: 1513e12}
_NVL = {torch.float64: 60e12, torch.float32: 60e12, "tfloat32": 417.5e12, torch.bfloat16: 835.5e12,
        torch.float16: 835.5e12, torch.float8_e4m3fn: 1670.5e12, torch.float8_e5m2: 1670.5e12, torch.int8: 1670.5e12}
DENSE_PEAK_FLOPS: Mapping[str, Mapping[Any, float]] = {
    "h100 sxm": _H100_SXM,  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ...", "NVIDIA GH200 480GB"
    "h100 pcie": _H100_PCIE,  # "NVIDIA H100 PCIe"
    "h100 nvl": _NVL,  # "NVIDIA H100 NVL"
    "h200 sxm": _H100_SXM,  # "NVIDIA H200": the H100 SXM's compute with more, faster memory
    "h200 nvl": _NVL,  # "NVIDIA H200 NVL"
}


def hopper_chip(device_name: str) -> str | None:
    """The `DENSE_PEAK_FLOPS` key for a Hopper device name as the driver reports it, or None."""
    name = device_name.lower()
    if "h200" in name:
        return "h200 nvl" if "nvl" in name else "h200 sxm"
    if "h100" in name or "gh200" in name:
        if "nvl" in name:
            return "h100 nvl"
        if "pcie" in name or "hbm2e" in name:
            return "h100 pcie"
        return "h100 sxm"
    return None


def peak_flops_for_name(device_name: str, dtype: torch.dtype | str, fp32_matmul_precision: str = "highest"):
    """Dense peak FLOP/s of one device of a known Hopper name for `dtype`, else None (float32 means TF32 when the
    float32 matmul precision is not "highest", as in Lightning)."""
    chip = hopper_chip(device_name)
    if chip is None:
        return None
    if dtype is torch.float32 and fp32_matmul_precision != "highest":
        dtype = "tfloat32"
    value = DENSE_PEAK_FLOPS[chip].get(dtype)
    return None if value is None else float(value)


def available_flops(device: torch.device, dtype: torch.dtype | str) -> float | None:
    """Peak FLOP/s of `device` for `dtype`: our Hopper table first, then Lightning's `get_available_flops`."""
    if device.type == "cuda":
        value = peak_flops_for_name(torch.cuda.get_device_name(device), dtype, torch.get_float32_matmul_precision())
        if value is not None:
            return value
    if device.type not in ("cuda", "xla"):
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    value = get_available_flops(device, dtype)
    return None if value is None else float(value)


def _first_float_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (list, tuple)) else ()
    for v in values:
        t = _first_float_tensor(v)
        if t is not None:
            return t
    return None


def measure_batch_flops(module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> int:
    """FLOPs of forward + backward of `module(*args, **kwargs)`, counted by Lightning's `measure_flops` on meta.

    The module's parameters and buffers are replaced (through `torch.func.functional_call`) by meta tensors of the
    same shapes, so nothing is computed or allocated and the real parameters' gradients are untouched. Raises if the
    model cannot run on meta tensors (data-dependent control flow, `.item()`, custom kernels).
    """
    from lightning.fabric.utilities.throughput import measure_flops
    from torch.func import functional_call
    from torch.utils._pytree import tree_map

    def to_meta(x):
        return x.detach().to("meta") if isinstance(x, torch.Tensor) else x

    state = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
             for n, p in module.named_parameters()}
    state.update({n: to_meta(b) for n, b in module.named_buffers()})
    meta_args, meta_kwargs = tree_map(to_meta, tuple(args)), tree_map(to_meta, dict(kwargs or {}))

    def forward():
        return functional_call(module, state, meta_args, meta_kwargs)

    def loss(out):
        t = _first_float_tensor(out)
        if t is None:
            raise ValueError("the forward output holds no floating-point tensor to differentiate")
        return t.sum()

    with torch.enable_grad():
        return int(measure_flops(module, forward, loss))


def six_n_flops(num_params: int, tokens: int) -> int:
    """The 6 * N * tokens estimate of training FLOPs (forward 2N, backward 4N per token)."""
    return 6 * int(num_params) * int(tokens)


def resolve_batch_flops(
    module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None, tokens: int | None,
    warn: Callable[[str], None] | None = None,
) -> tuple[int | None, str]:
    """(FLOPs per batch, how they were obtained: "measured" | "6N" | "unknown").

    A sharded model (FSDP2: DTensor parameters) is not run: its forward gathers parameters from every rank, and the
    monitors measure on rank 0 alone, which would wait for the others forever. A DTensor's numel is the whole
    parameter's, so the 6N estimate still counts the full model each rank computes."""
    sharded = any(hasattr(p, "device_mesh") for p in module.parameters())
    if not sharded:
        try:
            return measure_batch_flops(module, args, kwargs), "measured"
        except Exception as err:  # noqa: BLE001 - any failure of the meta run falls back to the estimate
            if warn is not None:
                warn(f"FLOPs could not be measured on a meta copy of the model ({type(err).__name__}: {err}); "
                     "using 6 * params * tokens.")
    if tokens:
        n = sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())
        return six_n_flops(n, tokens), "6N"
    return None, "unknown"
