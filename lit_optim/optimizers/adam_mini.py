"""Adam-mini (Zhang et al., 2024): one second-moment value per Hessian-structured block instead of per element.

The paper partitions a Transformer's parameters by the dense sub-blocks of its Hessian:

- query and key projections: one block per attention head (``head_dim`` output rows each);
- value, attention output, MLP and every other 2-D weight: one block per output neuron (row);
- token embedding and output head: one block per token (row);
- 1-D parameters (norms, biases): one block per tensor.

The first moment stays per element (as in Adam); the step is m̂ / (sqrt(v̂_block) + eps) with decoupled weight decay.
State per parameter: n elements of first moment plus one value per block -- about half of AdamW's.

Why not the adam-mini package: it finds blocks by matching parameter names of a few model families and needs the
head counts passed in; this one reads the partition off the model's modules (or takes it given), so the blocks of
any model are explicit, tested, and carried in the optimizer state for exact resume.

Heads are found on the model: an ``n_heads``/``num_heads`` attribute on the attention module or one of its parents
(lit_optim's TinyLM: fused ``qkv`` on ``Block.n_heads``), or Hugging Face's ``config.num_attention_heads`` /
``num_key_value_heads`` (Llama's ``q_proj``/``k_proj``). ``n_heads``, ``n_kv_heads`` and ``d_model`` hyperparameters
override them; when attention weights exist and the heads cannot be found, building fails and names what is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lit_optim.errors import HyperparameterError

QUERY = {"q_proj", "q", "query", "wq", "q_lin", "to_q", "query_proj"}
KEY = {"k_proj", "k", "key", "wk", "k_lin", "to_k", "key_proj"}
# Fused projections, rows laid out [q; k; v]: lit_optim's TinyLM, nanoGPT's `c_attn` (GPT-2), MPT's `Wqkv`.
FUSED_QKV = {"qkv", "qkv_proj", "wqkv", "to_qkv", "c_attn"}
# Fused per head, rows laid out [q_h; k_h; v_h] for each head h in turn (GPT-NeoX, Pythia).
INTERLEAVED_QKV = {"query_key_value"}
_HEAD_ATTRS = ("n_heads", "num_heads", "num_attention_heads", "n_head")
_KV_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads", "n_kv_head")


@dataclass(frozen=True)
class Partition:
    """Blocks over the rows of a parameter viewed as (rows, numel // rows): consecutive (rows, rows_per_block)."""

    rows: int
    segments: tuple[tuple[int, int], ...]
    kind: str

    @property
    def blocks(self) -> int:
        return sum(n // k for n, k in self.segments)


def _view_rows(p: torch.Tensor) -> int:
    return p.shape[0] if p.ndim >= 2 else p.numel()


def default_partition(p: torch.Tensor, kind: str = "neuron") -> Partition:
    if p.ndim >= 2:
        return Partition(p.shape[0], ((p.shape[0], 1),), kind)
    return Partition(p.numel(), ((p.numel(), max(1, p.numel())),), "tensor")


def _find_attr(obj, names) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class _Dims:
    """Attention dimensions for one parameter: hyperparameters first, then the nearest module (the parameter's own,
    then its parents) with a head-count attribute or a Hugging Face ``config`` that has one."""

    def __init__(self, model: nn.Module | None, n_heads, n_kv_heads, d_model) -> None:
        self.n_heads, self.n_kv_heads, self.d_model = n_heads, n_kv_heads, d_model
        self.modules = dict(model.named_modules()) if model is not None else {}

    def heads(self, module_name: str) -> tuple[int | None, int | None, int | None, str]:
        """(query heads, key/value heads, head_dim, where they came from)."""
        if self.n_heads:
            return self.n_heads, self.n_kv_heads, None, "hyperparameter n_heads"
        parts = module_name.split(".") if module_name else []
        for i in range(len(parts), -1, -1):
            mod = self.modules.get(".".join(parts[:i]))
            if mod is None:
                continue
            h = _find_attr(mod, _HEAD_ATTRS)
            if h:
                return h, self.n_kv_heads or _find_attr(mod, _KV_ATTRS), None, f"{type(mod).__name__}.n_heads"
            config = getattr(mod, "config", None)
            h = _find_attr(config, _HEAD_ATTRS) if config is not None else None
            if h:
                return (h, self.n_kv_heads or _find_attr(config, _KV_ATTRS), _find_attr(config, ("head_dim",)),
                        f"{type(mod).__name__}.config.num_attention_heads")
        return None, None, None, ""


def _missing(name: str, what: str) -> HyperparameterError:
    return HyperparameterError(
        f"adam_mini: cannot partition {name!r} by attention heads: {what}. Adam-mini needs the number of heads to "
        "give query/key one learning rate per head. Pass it as hyperparameters: n_heads=<query heads> (and "
        "n_kv_heads=<key/value heads> for grouped-query attention; d_model=<hidden size> to check), or put an "
        "`n_heads` attribute on the attention module."
    )


def infer_partitions(infos: Iterable, model: nn.Module | None = None, *, n_heads: int | None = None,
                     n_kv_heads: int | None = None, d_model: int | None = None,
                     fused_qkv: Iterable[str] = ()) -> dict[int, Partition]:
    """id(param) -> Partition for every parameter in `infos` (lit_optim ParamInfo: name, param, is_embedding ...).

    `fused_qkv`: names of further modules whose rows are [q; k; v] (for layouts not recognised by name).
    """
    infos = list(infos)
    fused_names = FUSED_QKV | {str(n).lower() for n in ([fused_qkv] if isinstance(fused_qkv, str) else fused_qkv)}
    dims = _Dims(model, n_heads, n_kv_heads, d_model)
    query_rows = {}
    for info in infos:
        module_name = info.name.rpartition(".")[0]
        if module_name.rpartition(".")[2].lower() in QUERY:
            query_rows[module_name.rpartition(".")[0]] = _view_rows(info.param)
    out: dict[int, Partition] = {}
    for info in infos:
        p, name = info.param, info.name
        module_name, _, leaf = name.rpartition(".")
        short = module_name.rpartition(".")[2].lower()
        rows = _view_rows(p)
        if info.is_embedding or info.is_head:
            out[id(p)] = Partition(rows, ((rows, 1),), "token") if p.ndim >= 2 else default_partition(p)
            continue
        if leaf == "in_proj_weight":  # nn.MultiheadAttention keeps [q; k; v] in one parameter of its own
            short = "qkv"
        if short in QUERY | KEY | fused_names | INTERLEAVED_QKV:
            heads, kv, cfg_head_dim, source = dims.heads(module_name)
            if not heads:
                raise _missing(name, "no n_heads/num_heads attribute on its module or parents and no "
                                     "model.config.num_attention_heads")
            if short in INTERLEAVED_QKV:
                if rows % (3 * heads):
                    raise HyperparameterError(
                        f"adam_mini: fused {name!r} has {rows} rows, not divisible by 3 * n_heads = 3*{heads} "
                        f"(from {source}); pass n_heads.")
                hd = rows // (3 * heads)
                out[id(p)] = Partition(rows, ((hd, hd), (hd, hd), (hd, 1)) * heads, "qkv")
            elif short in fused_names:
                kv = kv or heads
                if rows % (heads + 2 * kv):
                    raise HyperparameterError(
                        f"adam_mini: fused {name!r} has {rows} rows, not divisible by n_heads + 2*n_kv_heads = "
                        f"{heads} + 2*{kv} (from {source}); pass n_heads/n_kv_heads.")
                hd = rows // (heads + 2 * kv)
                out[id(p)] = Partition(rows, ((heads * hd, hd), (kv * hd, hd), (kv * hd, 1)), "qkv")
            else:
                hd = cfg_head_dim or (d_model // heads if d_model else None)
                if hd is None and short in QUERY:
                    hd = rows // heads if rows % heads == 0 else None
                if hd is None:  # a key: the head size of its query sibling, else as many key heads as given/queries
                    sibling = query_rows.get(module_name.rpartition(".")[0])
                    hd = sibling // heads if sibling and sibling % heads == 0 else (
                        rows // (kv or heads) if rows % (kv or heads) == 0 else None)
                if not hd or rows % hd:
                    raise HyperparameterError(
                        f"adam_mini: {name!r} has {rows} rows, which do not split into heads of {hd} rows "
                        f"({heads} heads from {source}); pass n_heads / n_kv_heads / d_model.")
                out[id(p)] = Partition(rows, ((rows, hd),), "head")
            continue
        if p.ndim == 2 and rows == 3 * p.shape[1] and dims.heads(module_name)[0]:
            warnings.warn(
                f"adam_mini: {name!r} ({rows} x {p.shape[1]}, in a module with attention heads) looks like a fused "
                "query/key/value projection, but its name is not one Adam-mini knows, so it gets one block per row. "
                f"If its rows are [q; k; v], pass fused_qkv=[{short!r}].", UserWarning, stacklevel=2)
        out[id(p)] = default_partition(p)
    if d_model is not None and dims.n_heads and d_model % dims.n_heads:
        raise HyperparameterError(f"adam_mini: d_model={d_model} is not divisible by n_heads={dims.n_heads}.")
    return out


class AdamMini(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        d_model: int | None = None,
        fused_qkv: list[str] | None = None,
        *,
        partitions: Mapping[int, Partition] | None = None,
    ) -> None:
        """`n_heads`, `n_kv_heads`, `d_model`, `fused_qkv` describe the model for the registry's builder, which
        turns them into `partitions` (see `infer_partitions`); given `partitions`, they are not read."""
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise HyperparameterError(f"adam_mini: invalid lr={lr}, betas={betas} or eps={eps}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        parts = dict(partitions or {})
        self._partitions = {id(p): parts.get(id(p)) or default_partition(p)
                            for g in self.param_groups for p in g["params"]}

    def partition(self, p: torch.Tensor) -> Partition:
        return self._partitions[id(p)]

    @staticmethod
    def _block_mean_sq(g2d: torch.Tensor, part: Partition) -> torch.Tensor:
        out, start = [], 0
        for n, k in part.segments:
            seg = g2d[start:start + n].reshape(n // k, -1)
            out.append(torch.linalg.vector_norm(seg, dim=1, dtype=torch.float32).square_() / seg.shape[1])
            start += n
        return torch.cat(out) if len(out) > 1 else out[0]

    @staticmethod
    def _expand(values: torch.Tensor, part: Partition) -> torch.Tensor:
        """Block values -> one value per row."""
        out, start = [], 0
        for n, k in part.segments:
            nb = n // k
            out.append(values[start:start + nb].repeat_interleave(k) if k > 1 else values[start:start + nb])
            start += nb
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                part = self._partitions[id(p)]
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros(part.blocks, dtype=p.dtype, device=p.device)
                state["step"] += 1
                t = state["step"]
                grad = p.grad
                g2d = grad.reshape(part.rows, -1)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).add_(self._block_mean_sq(g2d, part).to(v.dtype), alpha=1.0 - beta2)
                bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
                denom = (self._expand(v, part).float() / bc2).sqrt_().add_(eps).to(p.dtype)
                p.view(part.rows, -1).addcdiv_(m.view(part.rows, -1), denom.unsqueeze(1), value=-lr / bc1)
        return loss


__all__ = ["AdamMini", "Partition", "infer_partitions"]
