"""Real bytes of optimizer state, counted from storages rather than from what tensors claim to be.

torchao keeps state in tensor subclasses whose apparent dtype is fp32 while the data is uint8 codes plus scales;
bitsandbytes shares its quantization maps between parameters and keeps paged state in CUDA managed memory. So: flatten
wrapper subclasses to their inner tensors, and count each underlying storage once.

`state_report(optimizer)` breaks the bytes down by where they live, by dtype, by quantized vs full-precision state and
by param group. It finds state in, first to last:

1. ``optimizer.lit_optim_state_tensors()`` -- the protocol for wrapper optimizers: yield ``(param, key, tensor)`` for
   every state tensor (``param`` may be ``None`` for state shared by many parameters). Optionally also
   ``optimizer.lit_optim_buffer_tensors()`` yielding ``(param, key, tensor)`` for memory the optimizer owns that is
   not state (host copies of parameters and gradients); it is reported apart, as ``buffer`` bytes;
2. ``optimizer.lit_optim_inner_optimizers()`` -- a wrapper that holds ordinary optimizers (per-parameter optimizers
   run in backward, say) returns them and each is accounted like a top-level one;
3. torchao's ``CPUOffloadOptimizer`` (its per-parameter host optimizers, its on-device optimizer for small tensors,
   and its pinned host copies of parameters and gradients as buffers);
4. ``optimizer.state``, walking nested dicts, lists and plain objects (a GaLore projector's matrices, FlashOptim's
   moments as codes and scales).

State under a key of `WEIGHT_CORRECTION_KEYS` (FlashOptim's ``error_bits``) is counted, and reported apart as weight
correction: it is master-weight precision the optimizer owns, not a quantized moment.

Where memory lives: ``gpu`` (CUDA device memory), ``managed`` (CUDA managed memory: tensors tagged
``is_paged = True``, as bitsandbytes' paged buffers made with ``torch.frombuffer`` are -- their ``device`` says cpu),
``cpu_pinned`` (page-locked host memory) and ``cpu``; other device types keep their name (``xpu``, ``mps``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

LOCATIONS = ("gpu", "managed", "cpu_pinned", "cpu")
ADAMW_FP32_BYTES_PER_PARAM = 8.0  # two fp32 moments
# State keys of the bits that extend a 16-bit parameter's precision (FlashOptim's error-correction bits, 24/32-bit
# master weights): the optimizer owns them, so they count as state, but they are not quantized moments.
WEIGHT_CORRECTION_KEYS = frozenset({"error_bits"})
_WALK_DEPTH = 6


def leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `t`'s data (`t` itself unless it is a wrapper subclass). A DTensor (FSDP2) gives
    its local tensor: bytes are this rank's."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):  # DTensor also names its device mesh
                yield from leaf_tensors(inner)
    else:
        yield t


def local_numel(p: torch.Tensor) -> int:
    """Elements this process holds of `p`: a DTensor's (FSDP2 shard's) local part, else all of them."""
    local = getattr(p, "_local_tensor", None)
    return local.numel() if isinstance(local, torch.Tensor) else p.numel()


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


def state_tensors(value) -> Iterator[torch.Tensor]:
    """Tensors inside one state entry (tensors, or lists/dicts of them, as wrapper optimizers keep, or objects holding
    them, as FlashOptim's moments: codes and scales in attributes)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from state_tensors(v)
    elif value is not None and not isinstance(value, (int, float, bool, str)):
        yield from (t for _, t in _walk(value, "", set()))


def state_bytes_by_param(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, int]:
    """Bytes of state per parameter; a storage shared by several parameters counts for the first one only."""
    seen: set[tuple[str, int]] = set()
    out: dict[torch.Tensor, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            total = 0
            for value in optimizer.state.get(p, {}).values():
                for outer in state_tensors(value):
                    for leaf in leaf_tensors(outer):
                        key = storage_key(leaf)
                        if key not in seen:
                            seen.add(key)
                            total += leaf.untyped_storage().nbytes()
            out[p] = total
    return out


def total_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(state_bytes_by_param(optimizer).values())


# --------------------------------------------------------------------------------------------------------------------
# Where a tensor lives


def _pinning_possible() -> bool:
    # Pinned memory exists only once CUDA is initialised; asking earlier would initialise it for nothing.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def location(t: torch.Tensor, *, paged: bool = False, pinning_possible: bool | None = None) -> str:
    """``gpu``, ``managed``, ``cpu_pinned``, ``cpu`` or another device type, for one plain tensor."""
    if paged or getattr(t, "is_paged", False):
        return "managed"
    if t.is_cuda:
        return "gpu"
    if t.is_cpu:
        if pinning_possible is None:
            pinning_possible = _pinning_possible()
        try:
            return "cpu_pinned" if pinning_possible and t.is_pinned() else "cpu"
        except RuntimeError:
            return "cpu"
    return t.device.type


# Integer or float8 storage of at most one byte: quantized state (bool is not).
_LOW_BIT = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d != torch.bool
                     and not d.is_complex and d.itemsize <= 1)
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


# --------------------------------------------------------------------------------------------------------------------
# Finding state tensors


def _walk(value: Any, key: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) for tensors in nested dicts, lists, tuples and plain objects' attributes."""
    if isinstance(value, torch.Tensor):
        yield key, value
        return
    if depth >= _WALK_DEPTH or value is None or isinstance(value, (str, bytes, int, float, bool, type)):
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items: Iterable = value.items()
    elif isinstance(value, (list, tuple, set)):
        items = enumerate(value)
    elif isinstance(value, (torch.nn.Module, torch.optim.Optimizer)) or callable(value):
        return  # never count a model or another optimizer's parameters as state
    elif hasattr(value, "__dict__"):
        items = vars(value).items()
    else:
        return
    for k, v in items:
        yield from _walk(v, f"{key}.{k}" if key else str(k), seen, depth + 1)


def _group_names(optimizer) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, group in enumerate(getattr(optimizer, "param_groups", []) or []):
        name = str(group.get("name", f"group{i}"))
        for p in group["params"]:
            names.setdefault(id(p), name)
    return names


def _is_cpu_offload(optimizer) -> bool:
    return hasattr(optimizer, "optim_dict") and hasattr(optimizer, "param_d2h_map") and hasattr(optimizer, "d_opt")


@dataclass
class _Source:
    """Where the state of one (possibly inner) optimizer comes from."""

    entries: list[tuple[Any, str, torch.Tensor]]  # (param or None, key, tensor)
    buffers: list[tuple[Any, str, torch.Tensor]]
    params: list[torch.Tensor]
    group_of: dict[int, str]


def _collect(optimizer, out: list[_Source], depth: int = 0) -> None:
    if depth > 4:
        return
    group_of = _group_names(optimizer)
    params = [p for g in getattr(optimizer, "param_groups", []) or [] for p in g["params"]]
    if hasattr(optimizer, "lit_optim_state_tensors"):
        entries = [(p, str(k), t) for p, k, t in optimizer.lit_optim_state_tensors()]
        buffers = [(p, str(k), t) for p, k, t in getattr(optimizer, "lit_optim_buffer_tensors", lambda: ())()]
        out.append(_Source(entries, buffers, params, group_of))
        return
    if hasattr(optimizer, "lit_optim_inner_optimizers"):
        for inner in optimizer.lit_optim_inner_optimizers():
            _collect(inner, out, depth + 1)
        # ...and, below, whatever state the wrapper keeps itself.
    elif _is_cpu_offload(optimizer):
        for inner in ([optimizer.d_opt] if optimizer.d_opt is not None else []) + list(optimizer.optim_dict.values()):
            _collect(inner, out, depth + 1)
        buffers = []
        for p_host in optimizer.param_d2h_map.values():
            buffers.append((p_host, "host_param", p_host))
            if p_host.grad is not None:
                buffers.append((p_host, "host_grad", p_host.grad))
        out.append(_Source([], buffers, params, group_of))
        return
    state = getattr(optimizer, "state", None)
    entries = list(state_entries(state)) if isinstance(state, dict) else []
    out.append(_Source(entries, [], params, group_of))


def state_entries(state: dict) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """``(param, key, tensor)`` for every tensor in an ``optimizer.state``, nested containers and objects included."""
    for p, per_param in state.items():
        if not isinstance(per_param, dict):
            yield from ((p, key, t) for key, t in _walk(per_param, "", set()))
            continue
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):  # the usual case: a tensor per state key
                yield p, key, value
            elif not isinstance(value, (int, float, bool, str)) and value is not None:
                yield from ((p, k, t) for k, t in _walk(value, str(key), set(), 1))


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class StateStats:
    """Bytes and counts for a set of parameters (all of them, or one param group)."""

    name: str = "all"
    tensors: int = 0  # trainable parameter tensors
    params: int = 0  # trainable parameter elements
    bytes: int = 0  # state bytes
    by_location: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOCATIONS, 0))
    by_dtype: dict[str, int] = field(default_factory=dict)
    quantized_tensors: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    full_precision_tensors: int = 0
    full_precision_params: int = 0
    full_precision_bytes: int = 0
    stateless_tensors: int = 0
    stateless_params: int = 0
    weight_correction_bytes: int = 0  # included in `bytes`

    @property
    def bytes_per_param(self) -> float:
        return self.bytes / self.params if self.params else 0.0

    @property
    def ratio_to_adamw_fp32(self) -> float:
        return self.bytes_per_param / ADAMW_FP32_BYTES_PER_PARAM

    def add_bytes(self, nbytes: int, where: str, dtype: torch.dtype) -> None:
        self.bytes += nbytes
        self.by_location[where] = self.by_location.get(where, 0) + nbytes
        name = dtype_name(dtype)
        self.by_dtype[name] = self.by_dtype.get(name, 0) + nbytes

    def add_param(self, numel: int, nbytes: int, quantized: bool) -> None:
        self.tensors += 1
        self.params += numel
        if nbytes == 0:
            self.stateless_tensors += 1
            self.stateless_params += numel
        elif quantized:
            self.quantized_tensors += 1
            self.quantized_params += numel
            self.quantized_bytes += nbytes
        else:
            self.full_precision_tensors += 1
            self.full_precision_params += numel
            self.full_precision_bytes += nbytes


@dataclass
class StateReport:
    """Optimizer state of one optimizer: totals, per group, and buffers the optimizer owns that are not state."""

    total: StateStats
    groups: dict[str, StateStats]
    buffer_bytes: int = 0
    buffer_by_location: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOCATIONS, 0))
    unattributed_bytes: int = 0  # state not tied to a trainable parameter (counted in the total)
    # storage keys of the memory the device allocator cannot see, for de-duplication against other accounts
    host_storages: dict[str, set] = field(default_factory=lambda: {"managed": set(), "cpu_pinned": set()})

    def metrics(self, prefix: str = "optim_state") -> dict[str, float]:
        t = self.total
        m: dict[str, float] = {
            f"{prefix}/bytes": t.bytes,
            f"{prefix}/bytes_per_param": t.bytes_per_param,
            f"{prefix}/ratio_to_adamw_fp32": t.ratio_to_adamw_fp32,
            f"{prefix}/trainable_params": t.params,
            f"{prefix}/trainable_tensors": t.tensors,
            f"{prefix}/quantized_params": t.quantized_params,
            f"{prefix}/quantized_tensors": t.quantized_tensors,
            f"{prefix}/quantized_bytes": t.quantized_bytes,
            f"{prefix}/full_precision_params": t.full_precision_params,
            f"{prefix}/full_precision_tensors": t.full_precision_tensors,
            f"{prefix}/full_precision_bytes": t.full_precision_bytes,
            f"{prefix}/stateless_params": t.stateless_params,
            f"{prefix}/unattributed_bytes": self.unattributed_bytes,
            f"{prefix}/weight_correction_bytes": t.weight_correction_bytes,
            f"{prefix}/buffer_bytes": self.buffer_bytes,
        }
        m.update({f"{prefix}/bytes_{where}": n for where, n in t.by_location.items()})
        m.update({f"{prefix}/bytes_dtype/{d}": n for d, n in sorted(t.by_dtype.items())})
        m.update({f"{prefix}/buffer_bytes_{where}": n for where, n in self.buffer_by_location.items() if n})
        for name, g in self.groups.items():
            m[f"{prefix}/group/{name}/bytes"] = g.bytes
            m[f"{prefix}/group/{name}/params"] = g.params
            m[f"{prefix}/group/{name}/bytes_per_param"] = g.bytes_per_param
            m[f"{prefix}/group/{name}/quantized_params"] = g.quantized_params
            m[f"{prefix}/group/{name}/full_precision_params"] = g.full_precision_params
        return {k: float(v) for k, v in m.items()}

    TABLE_COLUMNS = (
        "group", "tensors", "params", "state_bytes", "bytes_per_param", "ratio_to_adamw_fp32", "quantized_tensors",
        "quantized_params", "quantized_bytes", "full_precision_tensors", "full_precision_params",
        "full_precision_bytes", "stateless_params", "bytes_gpu", "bytes_managed", "bytes_cpu_pinned", "bytes_cpu",
        "dtypes",
    )

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows (one per param group, then ``all``) for a W&B Table or a console print."""

        def row(s: StateStats) -> list[Any]:
            return [
                s.name, s.tensors, s.params, s.bytes, round(s.bytes_per_param, 4), round(s.ratio_to_adamw_fp32, 4),
                s.quantized_tensors, s.quantized_params, s.quantized_bytes, s.full_precision_tensors,
                s.full_precision_params, s.full_precision_bytes, s.stateless_params,
                *(s.by_location.get(w, 0) for w in LOCATIONS),
                ", ".join(f"{d}:{n}" for d, n in sorted(s.by_dtype.items())),
            ]

        return list(self.TABLE_COLUMNS), [*(row(g) for g in self.groups.values()), row(self.total)]


@dataclass
class _Gathered:
    sources: list[_Source]
    params: dict[int, torch.Tensor]  # id -> trainable parameter
    group_of: dict[int, str]  # id(param) -> group name


def _gather(optimizer) -> _Gathered:
    sources: list[_Source] = []
    _collect(optimizer, sources)
    group_of: dict[int, str] = {}
    for src in sources:
        for pid, name in src.group_of.items():
            group_of.setdefault(pid, name)
    group_of.update(_group_names(optimizer))  # a wrapper's own group names win over its inner ones
    params: dict[int, torch.Tensor] = {}
    for p in [*(p for g in getattr(optimizer, "param_groups", []) or [] for p in g["params"]),
              *(p for src in sources for p in src.params)]:
        params.setdefault(id(p), p)
    return _Gathered(sources, params, group_of)


def _skey(t: torch.Tensor) -> tuple[bool, int]:
    return (t.is_cuda, t.untyped_storage().data_ptr())


def _storages(g: _Gathered, seen: set) -> Iterator[tuple]:
    """(param or None, group, key, leaf, nbytes, location, is_buffer) per distinct storage -- the hot loop of the
    monitors, kept free of per-item objects."""
    excluded = set()  # parameters and gradients are never state, even when an object in the state refers to one
    for p in g.params.values():
        excluded.update(_skey(leaf) for leaf in leaf_tensors(p.detach()))
        if p.grad is not None:
            excluded.update(_skey(leaf) for leaf in leaf_tensors(p.grad))
    pinning = _pinning_possible()
    params, group_of, plain = g.params, g.group_of, torch.Tensor
    for is_buffer in (False, True):
        for src in g.sources:
            for p, key, outer in (src.buffers if is_buffer else src.entries):
                paged = getattr(outer, "is_paged", False)
                for leaf in ((outer,) if type(outer) is plain else leaf_tensors(outer)):
                    storage = leaf.untyped_storage()
                    skey = (leaf.is_cuda, storage.data_ptr())
                    if skey in seen or (not is_buffer and skey in excluded):
                        continue
                    seen.add(skey)
                    owner = p if p is not None and id(p) in params else None
                    yield (owner, group_of.get(id(owner), "other") if owner is not None else "other", key, leaf,
                           storage.nbytes(), location(leaf, paged=paged, pinning_possible=pinning), is_buffer)


def state_report(optimizer) -> StateReport:
    """Account every state storage of `optimizer` once (see the module docstring for where state is found)."""
    g = _gather(optimizer)
    total = StateStats()
    groups: dict[str, StateStats] = {}
    report = StateReport(total, groups)
    per_param_bytes: dict[int, int] = {}
    quantized: set[int] = set()
    for param, group, key, leaf, nbytes, where, is_buffer in _storages(g, set()):
        if where in report.host_storages:
            report.host_storages[where].add(_skey(leaf))
        if is_buffer:
            report.buffer_bytes += nbytes
            report.buffer_by_location[where] = report.buffer_by_location.get(where, 0) + nbytes
            continue
        dtype = leaf.dtype
        correction = key in WEIGHT_CORRECTION_KEYS
        total.add_bytes(nbytes, where, dtype)
        total.weight_correction_bytes += nbytes if correction else 0
        if param is None:
            report.unattributed_bytes += nbytes
            continue
        pid = id(param)
        stats = groups.get(group)
        if stats is None:
            stats = groups[group] = StateStats(group)
        stats.add_bytes(nbytes, where, dtype)
        stats.weight_correction_bytes += nbytes if correction else 0
        per_param_bytes[pid] = per_param_bytes.get(pid, 0) + nbytes
        if dtype in _LOW_BIT and leaf.numel() > 1 and not correction:
            quantized.add(pid)
    for pid, p in g.params.items():
        name = g.group_of.get(pid, "other")
        nbytes, q = per_param_bytes.get(pid, 0), pid in quantized
        stats = groups.get(name)
        if stats is None:
            stats = groups[name] = StateStats(name)
        # Bytes are this rank's storages, so parameters are this rank's elements too (an FSDP2 shard's).
        stats.add_param(local_numel(p), nbytes, q)
        total.add_param(local_numel(p), nbytes, q)
    return report
