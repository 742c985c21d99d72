"""Parameter classification and param groups.

Weight decay is skipped for biases, normalisation weights (by module type and by name), every other 1-D parameter,
and names the model lists in `no_weight_decay()`. "1-D" means the parameter's own shape, also under FSDP1, which
shows the optimizer 1-D slices of every parameter, and under DeepSpeed ZeRO-3, which empties each one (its shape is
kept in `ds_shape`). Frozen parameters are left out. `lr_scales` gives matching
parameters their own named group with a scaled learning rate (e.g. ``{"embedding": 0.1}``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lit_optim.errors import HyperparameterError
from lit_optim.spec import FSDP2_FIX

log = logging.getLogger("lit_optim")

# Hugging Face's no-decay name rule, plus generic norm spellings.
_NO_DECAY_NAME = re.compile(r"(^|\.)bias$|layernorm|layer_norm|rmsnorm|(^|\.)norm($|\.)|_norm($|\.)|(^|\.)ln_?\w*\.")
# Selector names accepted in lr_scales besides regexes.
EMBEDDING, HEAD = "embedding", "head"


@dataclass(frozen=True)
class ParamInfo:
    """What lit_optim knows about one trainable parameter."""

    name: str
    param: nn.Parameter
    module_type: str  # class name of the owning module ("" when only named parameters were given)
    is_embedding: bool
    is_head: bool  # output projection: tied to the embedding, or a Linear named like a head
    decay: bool


@dataclass
class GroupPlan:
    """Param groups ready for an optimizer constructor, plus the bookkeeping behind them."""

    groups: list[dict]
    param_info: dict[int, ParamInfo]  # id(param) -> info
    frozen: list[str] = field(default_factory=list)
    model: nn.Module | None = None

    def names(self, group: dict) -> list[str]:
        return [self.param_info[id(p)].name for p in group["params"]]

    def summary(self) -> str:
        parts = []
        for g in self.groups:
            n = sum(_numel(p) for p in g["params"])
            parts.append(f"{g['name']}: {n:,} params in {len(g['params'])} tensors"
                         + (f" (lr x{g['lr_scale']:g})" if g.get("lr_scale", 1.0) != 1.0 else ""))
        total = sum(_numel(p) for g in self.groups for p in g["params"])
        text = f"{total:,} trainable params in {len(self.groups)} groups -- " + "; ".join(parts)
        if self.frozen:
            text += f"; {len(self.frozen)} frozen tensors excluded"
        return text


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types = (*norm_types, nn.RMSNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def fsdp1_shapes(root: nn.Module | None) -> dict[int, torch.Size]:
    """The shapes of the parameters FSDP1 (`FullyShardedDataParallel`) flattened in or under `root`, by parameter id.

    With `use_orig_params=True` (Lightning's default) each parameter stays a tensor of its own, but a rank holds only
    its part of the flattened whole; a 64 x 64 weight reads as shape (4096,), (1000,) or (0,). `root` must be the
    outermost wrapper: Lightning's FSDPStrategy wraps the LightningModule from outside (`trainer.strategy.model`),
    and the module itself cannot see it. FSDP1 keeps the shapes only in its private handle metadata, hence the
    defensive reads (a parameter it flattened whose shape is not found is refused in `classify`).
    """
    if root is None:
        return {}
    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be wrapped without it; keep the import off
        return {}
    from torch.distributed.fsdp import FullyShardedDataParallel

    shapes: dict[int, torch.Size] = {}
    for module in FullyShardedDataParallel.fsdp_modules(root):
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        params, original = getattr(flat, "_params", None), getattr(flat, "_shapes", None)
        if params is not None and original is not None:
            shapes.update({id(p): torch.Size(shape) for p, shape in zip(params, original)})
    return shapes


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3 empties the data and keeps the count


def _shape(p: torch.Tensor, shapes: Mapping[int, torch.Size]) -> torch.Size:
    # FSDP1 slices (shapes from the wrapper's metadata), DeepSpeed ZeRO-3 partitions (empty data, the whole shape in
    # ds_shape), else the parameter itself.
    if id(p) in shapes:
        return shapes[id(p)]
    ds_shape = getattr(p, "ds_shape", None)
    return torch.Size(ds_shape) if ds_shape is not None else p.shape


def classify(
    model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
    no_decay: Iterable[str] = (),
    original_shapes: Mapping[int, torch.Size] | None = None,
) -> tuple[list[ParamInfo], list[str], nn.Module | None]:
    """Classify trainable parameters; returns (infos in model order, frozen names, model or None).

    `original_shapes` ({id(param): shape}, from `fsdp1_shapes` of the outer FSDP1 wrapper) gives the shapes of
    parameters FSDP1 flattened when the model handed over is the module inside that wrapper."""
    if isinstance(no_decay, str):
        no_decay = [no_decay]  # one pattern, not its characters (`+optim.no_decay=bias` on the command line)
    if not isinstance(no_decay, Iterable):
        raise HyperparameterError(f"no_decay must be a regex or a list of regexes of parameter names, e.g. "
                                  f"[bias, norm]; got {no_decay!r}.")
    extra = []
    for pattern in no_decay:
        try:
            extra.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise HyperparameterError(f"no_decay: {pattern!r} is not a regular expression ({err}); give a regex or "
                                      "a list of them, e.g. [bias, norm].") from None
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        owner: dict[int, nn.Module] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), module)
        named = list(model.named_parameters())
        listed = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        listed = set(listed)
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        shapes = {**fsdp1_shapes(model), **(original_shapes or {})}
    else:
        model, owner, listed, embeddings, out_emb, shapes = None, {}, set(), set(), None, dict(original_shapes or {})
        named = list(model_or_named_params)
        if named and not (isinstance(named[0], tuple) and len(named[0]) == 2 and isinstance(named[0][0], str)):
            raise HyperparameterError(
                "build_optimizer needs an nn.Module or (name, parameter) pairs, e.g. model.named_parameters(); "
                f"got an iterable of {type(named[0]).__name__}."
            )
    # A tensor listed twice (a tied weight under two names) is one parameter: stepped once, in its first place.
    seen: set[int] = set()
    named = [(n, p) for n, p in named if not (id(p) in seen or seen.add(id(p)))]
    head_ids = {id(out_emb.weight)} if isinstance(out_emb, nn.Module) and hasattr(out_emb, "weight") else set()
    infos, frozen = [], []
    for name, p in named:
        if getattr(p, "_is_flat_param", False):
            raise HyperparameterError(
                f"Parameter {name!r} is one of FSDP1's flat parameters (use_orig_params=False): weights, biases and "
                "norms of a wrapped module concatenated into one tensor, which cannot get per-parameter weight decay "
                f"or learning rates. Keep use_orig_params=True (the default of Lightning's FSDPStrategy), or use "
                f"FSDP2 ({FSDP2_FIX})."
            )
        if not p.requires_grad:
            frozen.append(name)
            continue
        if getattr(p, "_fsdp_flattened", False) and id(p) not in shapes:
            raise HyperparameterError(
                f"Parameter {name!r} is a 1-D slice FSDP1 made of a parameter whose shape lit_optim cannot see, so it "
                "cannot tell weights (weight decay) from biases and norms. Build the optimizer from the outermost "
                "FullyShardedDataParallel wrapper, or pass original_shapes=lit_optim.param_groups.fsdp1_shapes("
                "wrapper); under Lightning the mixin does this itself."
            )
        module = owner.get(id(p))
        is_head = id(p) in head_ids or bool(re.search(r"(^|\.)(lm_head|output|head|classifier)\.weight$", name))
        is_emb = id(p) in embeddings or (module is None and "embed" in name)
        decay = not (
            len(_shape(p, shapes)) <= 1
            or (module is not None and _is_norm(module))
            or _NO_DECAY_NAME.search(name.lower())
            or name in listed
            or any(name.startswith(f"{n}.") or name.endswith(f".{n}") for n in listed)
            or any(r.search(name) for r in extra)
        )
        infos.append(ParamInfo(name, p, type(module).__name__ if module else "", is_emb, is_head, decay))
    return infos, frozen, model


def build_param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    no_decay: Iterable[str] = (),
    lr_scales: Mapping[str, float] | None = None,
    original_shapes: Mapping[int, torch.Size] | None = None,
) -> GroupPlan:
    """Named groups: ``decay`` and ``no_decay`` (and ``<selector>/decay`` ... for each `lr_scales` entry)."""
    infos, frozen, model = classify(model_or_named_params, no_decay, original_shapes)
    if not infos:
        raise HyperparameterError(
            "The model has no trainable parameters (all requires_grad=False): nothing to optimize.")
    if lr_scales is not None and not isinstance(lr_scales, Mapping):
        raise HyperparameterError(f"lr_scales must map parameter kinds to multipliers, e.g. {{embedding: 0.1}}; "
                                  f"got {lr_scales!r}.")
    scales = dict(lr_scales or {})
    for key, value in scales.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise HyperparameterError(f"lr_scales[{key!r}] must be a non-negative finite number, got {value!r}.")
    patterns = {k: re.compile(k) for k in scales if k not in (EMBEDDING, HEAD)}

    def selector(info: ParamInfo) -> str | None:
        for key in scales:
            if (key == EMBEDDING and info.is_embedding) or (key == HEAD and info.is_head):
                return key
            if key in patterns and patterns[key].search(info.name):
                return key
        return None

    buckets: dict[tuple[str | None, bool], list[torch.Tensor]] = {}
    for info in infos:
        buckets.setdefault((selector(info), info.decay), []).append(info.param)
    unused = [k for k in scales if not any(sel == k for sel, _ in buckets)]
    if unused:
        raise HyperparameterError(
            f"lr_scales selectors {unused} match no trainable parameter. Use 'embedding', 'head', or a regex on "
            "parameter names (see model.named_parameters())."
        )
    groups = []
    for (sel, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] or "", not kv[0][1])):
        scale = float(scales[sel]) if sel else 1.0
        base = "decay" if decay else "no_decay"
        groups.append({
            "params": params,
            "name": f"{sel}/{base}" if sel else base,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * scale,
            "lr_scale": scale,
        })
    return GroupPlan(groups, {id(i.param): i for i in infos}, frozen, model)
