"""lit_optim's own low-bit Adam, AdamW and Lion: block-wise companded 8-bit or 4-bit moments, one fused step.

On CUDA the step is one Triton launch per bucket of tensors (`lit_optim.kernels.triton_lowbit`): each parameter,
gradient and state byte is read once and written once, and nothing is compiled per shape, so the first step costs
what the others do. Elsewhere (CPU) the same math runs in plain torch (`lit_optim.kernels.reference`).

Every tensor is quantized the same way whatever its size (the last block padded), so a shard under FSDP keeps its
parameter's precision. State is plain tensors -- codes (int8/uint8) and fp32 scales per block, a CPU step count --
so checkpoints load with ``torch.load(weights_only=True)`` and resume exactly.

FSDP2 (``fully_shard``: DTensor parameters sharded on dim 0 over a 1-D mesh): each rank steps its own rows and keeps
codes for them, in buffers sized for the *largest* shard (``ceil(dim0 / world)`` rows, padded to whole blocks), so
every rank's buffers have the same length L and the same kind of codes (bits, block size). A smaller shard uses the
first blocks; the rest stay zero. ``state_dict()`` returns those buffers as DTensors of shape ``(world, L)``, row r
being rank r's, sharded on dim 0 over the parameter's mesh, plus ``shard_layout`` (world, dim0, elements per row), so
torch.distributed.checkpoint writes each rank's own codes and reads them back to the same rank: a resume on the same
number of ranks is exact. On another number of ranks the blocks fall elsewhere and the codes cannot be resharded
exactly: DCP refuses the other ``(world, L)`` shape, and ``load_state_dict`` refuses a layout that differs (the
full-state-dict path). Replicated DTensors keep plain (replicated) state; other placements (HSDP's 2-D meshes,
``Shard(dim > 0)``) are refused at the first step.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lit_optim.kernels import codes
from lit_optim.kernels.reference import ADAM, ADAMW, LION, MOMENTS, step_tensor

DEFAULT_BLOCK = {8: 256, 4: 256}
KERNELS = ("auto", "triton", "torch")


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor (FSDP2 shard): its local part is what this rank steps and keeps state for.
    return t.to_local() if hasattr(t, "to_local") else t


LAYOUT_KEY = "shard_layout"  # in state_dict() only: int64 (world, dim0, elements per row) of a dim-0-sharded parameter


@dataclass(frozen=True)
class _Shards:
    """How FSDP2 splits a parameter: dim 0 in `world` chunks of ``ceil(dim0 / world)`` rows (torch.chunk), the last
    ranks' possibly shorter or empty."""

    mesh: Any
    world: int
    dim0: int
    row: int  # elements per row

    @property
    def numel(self) -> int:
        """Elements of the largest shard: what every rank's buffers are sized for."""
        return -(-self.dim0 // self.world) * self.row

    def record(self) -> torch.Tensor:
        return torch.tensor([self.world, self.dim0, self.row], dtype=torch.int64)


def _shards(p: torch.Tensor) -> _Shards | None:
    """The sharding of a DTensor parameter whose state is sharded with it; None where each rank's state is plain
    (a plain tensor, or a DTensor replicated on every rank). Placements lit_optim cannot shard state for are refused."""
    placements = getattr(p, "placements", None)
    if placements is None or not hasattr(p, "device_mesh"):
        return None
    if all(pl.is_replicate() for pl in placements):
        return None  # every rank holds and steps the whole tensor: its state is replicated, as DCP takes plain state
    from torch.distributed.tensor import Shard

    if len(placements) == 1 and type(placements[0]) is Shard and placements[0].dim == 0 and p.dim() > 0:
        dim0 = p.shape[0]
        return _Shards(p.device_mesh, p.device_mesh.size(), dim0, p.numel() // dim0 if dim0 else 0)
    raise ValueError(
        f"lit_optim's fused low-bit optimizers shard their state for DTensor parameters sharded on dim 0 over a 1-D "
        f"mesh (FSDP2's fully_shard default) or replicated ones; this parameter (shape {tuple(p.shape)}) has "
        f"placements {tuple(placements)} on a {p.device_mesh.ndim}-D mesh (HSDP's 2-D mesh, Shard(dim > 0) from "
        "shard_placement_fn, or a partial/strided tensor). Fix: fully_shard over a 1-D mesh with the default "
        "placement, or use adamw_torch for these parameters."
    )


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _LowBitOptimizer(torch.optim.Optimizer):
    MODE: int = ADAMW

    def __init__(self, params: Iterable, lr: float | torch.Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        if bits not in DEFAULT_BLOCK:
            raise ValueError(f"bits={bits!r}: lit_optim's fused optimizers keep 8-bit or 4-bit moments (bits=8 or 4)")
        block_size = DEFAULT_BLOCK[bits] if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 32 or block_size > 4096 \
                or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size!r}: must be a power of two from 32 to 4096")
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
        lr_value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
        if not math.isfinite(lr_value) or lr_value < 0:
            raise ValueError(f"lr={lr_value!r}: must be a finite number >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: two numbers in [0, 1)")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps={eps!r}: must be >= 0")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay={weight_decay!r}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bits=bits,
                        block_size=block_size, stochastic_rounding=bool(stochastic_rounding))
        self.kernel = kernel
        super().__init__(params, defaults)

    # --- state ----------------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        local = _local(p)
        if local.is_complex() or not local.is_floating_point():
            raise ValueError(f"{type(self).__name__} steps real floating-point parameters, got {local.dtype}")
        numel = self._buffer_numel(p)
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state.update(codes.empty_state(numel, group["bits"], group["block_size"], MOMENTS[self.MODE], local.device))
        return state

    @staticmethod
    def _buffer_numel(p: torch.Tensor) -> int:
        """Elements the state buffers are sized for: the local tensor's, or under FSDP2 the largest shard's."""
        local, shards = _local(p), _shards(p)
        if shards is None:
            return local.numel()
        if local.numel() > shards.numel:
            raise ValueError(f"a shard of {local.numel()} elements of a {tuple(p.shape)} parameter over "
                             f"{shards.world} ranks: more than the {shards.numel} of dim-0 chunks (torch.chunk) that "
                             "lit_optim sizes its state for")
        return shards.numel

    def state_dict(self) -> dict:
        # Under FSDP2 each rank's codes and scales go out as its row of a (world, L) DTensor sharded on dim 0, so DCP
        # saves every rank's own and loads them back to the same rank (a plain tensor would be taken as replicated:
        # one rank's copy for all). The live state stays plain; the DTensors share its storage.
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state, changed = dict(sd["state"]), False
        for index, entry in sd["state"].items():
            shards = _shards(params[index]) if isinstance(index, int) and index < len(params) else None
            if shards is None or not isinstance(entry, dict):
                continue
            from torch.distributed.tensor import DTensor, Shard

            out = {LAYOUT_KEY: shards.record()}
            for key, value in entry.items():
                if key in codes.STATE_KEYS and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                    n = value.numel()
                    value = DTensor.from_local(value.view(1, n), shards.mesh, [Shard(0)], run_check=False,
                                               shape=torch.Size([shards.world, n]), stride=(n, 1))
                out[key] = value
            state[index], changed = out, True
        return {**sd, "state": state} if changed else sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype -- the fp32 scales to bf16, and the integer
        # codes too, through a temporary copy of each. So torch loads the groups and step counts only, and the codes
        # and scales are put in place here with their own dtypes, on the parameter's device. Sharded state (DTensors,
        # FSDP2) gives its local row, checked against this run's sharding.
        saved = state_dict["state"]
        steps_only = {pid: {k: v for k, v in st.items() if k == "step"} for pid, st in saved.items()}
        super().load_state_dict({**state_dict, "state": steps_only})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        mine = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, mine):
            entry = saved.get(pid, {})
            tensors = {k: v for k, v in entry.items() if k in codes.STATE_KEYS and isinstance(v, torch.Tensor)}
            if not tensors:
                continue
            group = group_of[id(p)]
            self._check_layout(pid, p, entry.get(LAYOUT_KEY))
            want = codes.empty_state(self._buffer_numel(p), group["bits"], group["block_size"], MOMENTS[self.MODE],
                                     "meta")
            for key, value in tensors.items():
                local = _local(value).reshape(-1)
                if key in want and local.numel() != want[key].numel():
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: state {key!r} of parameter {pid!r} holds "
                        f"{local.numel()} elements here, but a {tuple(p.shape)} parameter on this rank "
                        f"({group['bits']}-bit, block {group['block_size']}) needs {want[key].numel()}: the checkpoint "
                        "was written for another parameter shape or another sharding. Resume with the model and the "
                        "number of FSDP ranks it was trained with."
                    )
                self.state[p][key] = local.to(device=_local(p).device, copy=True)

    def _check_layout(self, pid, p: torch.Tensor, saved: torch.Tensor | None) -> None:
        shards = _shards(p)
        here = None if shards is None else [shards.world, shards.dim0, shards.row]
        there = None if saved is None else [int(x) for x in _local(saved).reshape(-1).tolist()]
        if there is None or there == here:
            return
        were = (f"sharded over {there[0]} ranks (FSDP2; dim 0 of {there[1]} rows)" if len(there) == 3
                else f"with layout {there}")
        now = ("not sharded here" if here is None
               else f"here it is sharded over {here[0]} ranks (dim 0 of {here[1]} rows)")
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: the low-bit state of parameter {pid!r} was saved {were}, but "
            f"{now}. Its codes are quantized in blocks of each rank's shard, so they cannot be resharded exactly. "
            f"Resume on {there[0]} ranks, or load the model weights only and start the optimizer state afresh."
        )

    # --- step -----------------------------------------------------------------------------------------------------
    def _scalars(self, group: dict, step: int) -> dict:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        out = dict(beta1=beta1, beta2=beta2, eps=group.get("eps", 0.0), weight_decay=group["weight_decay"])
        if self.MODE != LION:
            out["inv_bc1"] = 1.0 / (1.0 - beta1 ** step)
            out["inv_sqrt_bc2"] = 1.0 / math.sqrt(1.0 - beta2 ** step)
        out["lr"] = lr
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p] or self._init_state(p, group)
                state["step"] += 1
                local, grad = _local(p), _local(p.grad)
                if local.numel() == 0:
                    continue
                state = codes.prefix(state, local.numel(), group["bits"], group["block_size"])
                buckets[(local.device, local.dtype, grad.dtype, int(state["step"]))].append((local, grad, state))
            for (device, _, _, step), items in buckets.items():
                self._step_bucket(group, gi, device, step, items)
        return loss

    def _step_bucket(self, group: dict, group_index: int, device: torch.device, step: int, items: list) -> None:
        scalars = self._scalars(group, step)
        lr = scalars["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device:
            scalars["lr"] = float(lr)
        sr = group["stochastic_rounding"]
        seed = (step * 1_000_003 + group_index * 7919) % (1 << 31)  # a function of the step: resumes reproduce it
        common = dict(mode=self.MODE, bits=group["bits"], block_size=group["block_size"], stochastic_rounding=sr,
                      **scalars)
        use_triton = self.kernel == "triton" or (self.kernel == "auto" and device.type == "cuda")
        if use_triton and not _triton_usable(device):
            if self.kernel == "triton":
                raise RuntimeError(f"kernel='triton' needs Triton and a CUDA device (parameters are on {device})")
            if device.type == "cuda" and not getattr(self, "_warned_no_triton", False):
                warnings.warn(f"{type(self).__name__}: Triton is not installed, so CUDA parameters step through the "
                              "plain-torch reference, many times slower than the fused kernel. Fix: pip install triton",
                              stacklevel=3)
                self._warned_no_triton = True
            use_triton = False
        fused = [(p, g, s) for p, g, s in items if p.is_contiguous()] if use_triton else []
        if fused:
            from lit_optim.kernels.triton_lowbit import step_many

            if isinstance(common["lr"], torch.Tensor) and common["lr"].dtype != torch.float32:
                common["lr"] = common["lr"].float()
            step_many([p for p, _, _ in fused], [g.contiguous() for _, g, _ in fused], [s for _, _, s in fused],
                      seed=seed, **common)
        rest = [it for it in items if not (use_triton and it[0].is_contiguous())]
        generator = None
        if sr and rest:
            generator = torch.Generator(device=device).manual_seed(seed)
        for p, g, s in rest:
            step_tensor(p, g, s, generator=generator, **common)


class LowBitAdamW(_LowBitOptimizer):
    """AdamW (decoupled weight decay) with `bits`-bit block-wise moments; see the module docstring."""

    MODE = ADAMW

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)


class LowBitAdam(_LowBitOptimizer):
    """Adam (weight decay as an L2 term in the gradient) with `bits`-bit block-wise moments."""

    MODE = ADAM

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)


class LowBitLion(_LowBitOptimizer):
    """Lion (sign of an interpolated momentum; decoupled weight decay) with a `bits`-bit block-wise momentum."""

    MODE = LION

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, 0.0, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)
