"""`estimate`: each optimizer's peak memory for a model, predicted before training, without allocating the model.

The model is built on the meta device (shapes, no storage) and each optimizer is built on it as lit_optim would build
it, so the parts that depend on the model's structure are the real ones: which tensors GaLore projects and to what
shape, which tensors a backend keeps at 32 bits (bitsandbytes below ``min_8bit_size``, torchao below 4096 elements
or not divisible by its block, bitsandbytes embeddings), Adam-mini's blocks. Then, in bytes:

- weights: every parameter in its dtype (for `lit-optim estimate`, the 16-bit one under a ``bf16-true`` or
  ``16-true`` Trainer precision, to which Lightning converts the model); gradients the same, except in backward
  (one gradient at a time: the largest) and with ``offload_gradients`` (none on the device);
- optimizer state: the registry's theory per parameter (`lit_optim.state_theory`), whose claims the tests check
  against built optimizers; torch keeps its state in the parameter's dtype, bitsandbytes and torchao codes do not.
  It lives on the device, in managed memory (paged names) or on the host (``offload=cpu``);
- activations: a model for decoder transformers -- with activation checkpointing, each layer's input (B*T*d) plus
  one layer recomputed; without, about 34*B*T*d bytes per layer in 16-bit -- plus the logits and their fp32 loss
  (B*T*V*10 bytes);
- step temporaries: PyTorch's multi-tensor (foreach) Adam/AdamW materialises one state-sized tensor (the
  denominator) while it steps; torchao's compiled step dequantises the two moments and upcasts the gradient of one
  tensor at a time (3 x 4 B x the largest tensor); fused and bitsandbytes kernels step in place.

The device peak is the larger of the backward phase (weights, gradients, device state, activations) and the step
(weights, gradients, device state, step temporaries). Checked against the H100 runs recorded in
`benchmarks/results/` (tests/test_estimate.py): within 10% for every recorded configuration.

Sharded over N devices with FSDP2 (``trainer=fsdp2``, `shards=N`), each device keeps 1/N of the weights, gradients,
optimizer state and step temporaries, and the backward phase adds what FSDP2 holds unsharded (`gathered`): the root
unit (everything outside the decoder layers: embeddings, head, final norm, which the root keeps gathered from
forward through backward) with the gradients of its head and norm, and around the layer computing its gradients:
its parameters and the next layer's (prefetched), its gradients and the previous layer's reduce-scatter buffer
(`gathered_bytes`; under ``*-mixed`` gathered in 16 bits and reduced in fp32). That is, to the byte, the peak FSDP2
itself holds on two CPU ranks, in fp32 and in bf16-mixed (tests/fsdp2_gathered.py); it has not been measured on
several GPUs.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lit_optim.build import build_optimizer
from lit_optim.errors import HyperparameterError, IncompatibleConfigError, LitOptimError
from lit_optim.nesting import leaves as nested_leaves
from lit_optim.optimizers.in_backward import InBackwardOptimizer
from lit_optim.registry import get_spec
from lit_optim.state_theory import expected_state_bytes

GIB = 2**30
# Names tried by `suggest` when none are given: from most to least state, the usual ways down.
LADDER = ("adamw_torch_fused", "adamw_8bit", "adamw_torch_4bit", "paged_adamw_8bit", "galore_adamw_8bit_layerwise",
          "apollo_mini_layerwise")


@dataclass
class Estimate:
    """Bytes by where they live, for one optimizer; `error` when the name cannot be built for this model."""

    name: str
    weights: float = 0.0
    gradients: float = 0.0
    state_device: float = 0.0
    state_managed: float = 0.0
    state_host: float = 0.0
    activations: float = 0.0
    step_temporaries: float = 0.0
    host: float = 0.0  # host copies of parameters and gradients when offloaded, besides the state
    gathered: float = 0.0  # FSDP2: unsharded parameters and gradients held during backward
    shards: int | None = None  # FSDP2 over this many devices; None: not sharded
    error: str | None = None

    @property
    def peak_device(self) -> float:
        backward = self.weights + self.gradients + self.state_device + self.activations + self.gathered
        step = self.weights + self.gradients + self.state_device + self.step_temporaries
        return max(backward, step)

    def fits(self, budget_gib: float | None) -> bool | None:
        return None if budget_gib is None or self.error else self.peak_device <= budget_gib * GIB

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_device"] = self.peak_device
        return out


@dataclass(frozen=True)
class Workload:
    """What the activations depend on: tokens per micro-batch and the model's transformer dimensions."""

    batch: int = 1
    seq_len: int = 512
    checkpointing: bool = False
    activation_bytes: int = 2


def _dims(model: nn.Module) -> dict[str, int]:
    """Layers, width, MLP width and vocabulary of a decoder transformer (Hugging Face config or lit_optim's TinyLM)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "hidden_size", None):
        return {"layers": config.num_hidden_layers, "d": config.hidden_size,
                "mlp": getattr(config, "intermediate_size", 4 * config.hidden_size), "vocab": config.vocab_size}
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "embed", None)
    if blocks is not None and isinstance(embed, nn.Embedding):
        d = embed.embedding_dim
        up = getattr(blocks[0], "up", None) if len(blocks) else None
        return {"layers": len(blocks), "d": d, "mlp": up.out_features if isinstance(up, nn.Linear) else 4 * d,
                "vocab": embed.num_embeddings}
    return {}


def activation_bytes(model: nn.Module, work: Workload) -> float:
    dims = _dims(model)
    if not dims:
        return 0.0
    tokens = work.batch * work.seq_len
    width = work.activation_bytes
    # One layer's saved tensors (attention with a fused kernel: no T x T scores): about 34 values per token and unit
    # of width for a 4x MLP, the MLP's part scaled to the real MLP width.
    per_layer = tokens * width / 2 * (18 * dims["d"] + 4 * dims["mlp"])
    if work.checkpointing:
        saved = dims["layers"] * tokens * dims["d"] * width + per_layer
    else:
        saved = dims["layers"] * per_layer
    logits = tokens * dims["vocab"] * (width + 4 + 4)  # logits, their fp32 upcast and its gradient
    return saved + logits


def meta_model(config: Mapping[str, Any]) -> nn.Module:
    """A model of `config` (conf/model/*.yaml) on the meta device: shapes and dtypes, no memory."""
    from lit_optim.task.models import build_model

    cfg = {k: v for k, v in dict(config).items() if k != "pretrained"}
    with torch.device("meta"):
        return build_model(cfg)


def _as_config(optim: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"name": optim} if isinstance(optim, str) else dict(optim)


def _step_temporaries(spec, optimizer, params: list[torch.Tensor], in_backward: bool) -> float:
    largest = max((p.numel() for p in params), default=0)
    leaves = list(nested_leaves([optimizer]))
    if spec.backend == "torchao":
        return 3 * 4 * largest
    temp = 0.0
    for leaf in leaves:
        if type(leaf).__module__.startswith("torch.optim") and type(leaf).__name__ in ("Adam", "AdamW"):
            group = leaf.param_groups[0]
            if not group.get("fused") and group.get("foreach") is not False:
                mine = [p for g in leaf.param_groups for p in g["params"]]
                temp = max(temp, max((p.numel() * p.element_size() for p in mine), default=0) if in_backward
                           else sum(p.numel() * p.element_size() for p in mine))
    return temp


def estimate_one(model: nn.Module, optim: str | Mapping[str, Any], work: Workload, shards: int | None = None,
                 gathered: float | None = None) -> Estimate:
    """One optimizer's estimate; sharded over `shards` devices with FSDP2, which holds `gathered` bytes unsharded
    (`gathered_bytes`), when both are given."""
    est, built = _unsharded(model, optim, work)
    if gathered is None or est.error:
        return est
    from lit_optim.spec import FSDP2

    # What the run checks before step 1: the built optimizer's spec (in backward narrows it), and offload.
    offload = bool(_as_config(optim).get("offload"))
    if offload or FSDP2 not in built.spec.supports:
        mode = " with offload" if offload else " in backward" if built.extra.get("in_backward") else ""
        est.error = (f"{est.name!r}{mode} cannot be sharded with FSDP2 (refused before step 1 under trainer=fsdp2; "
                     f"`lit-optim describe {est.name}` says why)")
        return est
    est.shards = shards
    for part in ("weights", "gradients", "state_device", "step_temporaries"):
        setattr(est, part, getattr(est, part) / shards)
    est.gathered = gathered
    return est


def gathered_parts(model: nn.Module, precision: str | None = None) -> dict[str, int]:
    """Elements of the units lit_optim's FSDP2 sharding makes (each decoder layer, then the root), and the bytes an
    element takes once gathered and once in a reduce-scatter buffer under `precision` (the Trainer's; ``*-mixed``
    gathers in 16 bits and reduces in fp32, `lit_optim.task.fsdp2.mixed_precision_policy`). `root`: the root unit's
    parameters (embeddings, head, final norm); `root_grads`: the part of their gradients that exists from the start
    of backward (all but an untied input embedding's, which comes last); `layer`: the largest decoder layer."""
    from lit_optim.task.fsdp2 import decoder_layers, mixed_precision_policy

    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    input_only = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - linear
    width = max((p.element_size() for p in model.parameters()), default=4)
    policy = mixed_precision_policy(precision)  # the one shard_model applies
    return {"root": sum(p.numel() for p in root), "root_grads": sum(p.numel() for p in root if id(p) not in input_only),
            "layer": max((sum(p.numel() for p in m.parameters()) for m in layers), default=0),
            "gathered_width": policy.param_dtype.itemsize if policy else width,
            "reduce_width": policy.reduce_dtype.itemsize if policy else width}


def gathered_bytes(model: nn.Module, precision: str | None = None) -> float:
    """What FSDP2 holds beyond the shards in backward, at the larger of two moments. While a layer computes its
    gradients: the root unit's parameters (the root is not resharded after forward) and the gradients of its head
    and norm (reduced only when the root's backward ends), the layer's parameters and the next one's, prefetched,
    the layer's gradients, and the previous layer's reduce-scatter buffer. At the end: the root's parameters and
    all their gradients, and the last layer's reduce-scatter buffer."""
    parts = gathered_parts(model, precision)
    g, r = parts["gathered_width"], parts["reduce_width"]
    during = g * (parts["root"] + parts["root_grads"] + 3 * parts["layer"]) + r * parts["layer"]
    end = g * 2 * parts["root"] + r * parts["layer"]
    return max(during, end)


def _unsharded(model: nn.Module, optim: str | Mapping[str, Any], work: Workload) -> tuple[Estimate, Any]:
    """The estimate on one device, and what was built (its `lit_optim` record; None when it could not be)."""
    cfg = _as_config(optim)
    name = str(cfg.get("name"))
    est = Estimate(name)
    params = [p for p in model.parameters() if p.requires_grad]
    est.weights = sum(p.numel() * p.element_size() for p in model.parameters())
    offload = cfg.pop("offload", None)
    offload_grads = bool(cfg.pop("offload_gradients", False))
    try:
        spec = get_spec(name)
        # Built without offload: the state has the same theory either way; offload only moves where it lives.
        optimizer = build_optimizer(model, **cfg)
    except LitOptimError as err:
        est.error = str(err)
        return est, None
    in_backward = isinstance(optimizer, InBackwardOptimizer)  # *_layerwise, in_backward=true, LOMO, AdaLomo
    largest_grad = max((p.numel() * p.element_size() for p in params), default=0)
    grads = sum(p.numel() * p.element_size() for p in params)
    est.gradients = largest_grad if in_backward else grads
    state = sum(expected_state_bytes(optimizer, p) for p in params)
    if offload:
        est.state_host = state
        est.host = est.weights + grads  # master copies of the parameters and their gradients on the host
        if offload_grads:  # each gradient moves to the host as backward completes it
            est.gradients = largest_grad
    elif spec.paged:
        est.state_managed = state
    else:
        est.state_device = state
        est.step_temporaries = _step_temporaries(spec, optimizer, params, in_backward)
    est.activations = activation_bytes(model, work)
    return est, optimizer.lit_optim


def estimate(model: nn.Module | Mapping[str, Any], optims: Sequence[str | Mapping[str, Any]], *,
             batch: int = 1, seq_len: int = 512, checkpointing: bool | None = None, shards: int | None = None,
             precision: str | None = None) -> list[Estimate]:
    """Peak-memory estimates per device for each of `optims` on `model` (a module, or a model config to build on
    meta), `batch` sequences of `seq_len` tokens a device; `shards`: sharded over that many devices with FSDP2,
    whose gathered parameters follow the Trainer's `precision` (``bf16-mixed``: 16-bit)."""
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, numbers.Integral) or shards < 1):
        raise HyperparameterError(f"shards must be a positive number of devices (or None: not sharded); got "
                                  f"{shards!r}.")
    if isinstance(model, Mapping):
        config = dict(model)
        if checkpointing is None:
            checkpointing = bool(config.get("gradient_checkpointing", False))
        model = meta_model(config)
    elif checkpointing is None:
        checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    dtypes = {p.dtype for p in model.parameters()}
    width = 2 if dtypes <= {torch.bfloat16, torch.float16} else 4
    work = Workload(batch, seq_len, bool(checkpointing), width)
    gathered = gathered_bytes(model, precision) if shards is not None else None
    return [estimate_one(model, o, work, shards, gathered) for o in optims]


def suggest(estimates: Iterable[Estimate], budget_gib: float) -> Estimate | None:
    """The estimate with the most state that still fits (closest to plain AdamW's updates), else None."""
    fitting = [e for e in estimates if e.fits(budget_gib)]
    if not fitting:
        return None
    return max(fitting, key=lambda e: (e.state_device + e.state_managed + e.state_host, -e.peak_device))


def table(estimates: Sequence[Estimate], budget_gib: float | None = None) -> str:
    ok = [e for e in estimates if not e.error]
    unit, scale = ("GiB", GIB) if any(e.peak_device >= GIB for e in ok) or not ok else ("MiB", 2**20)
    sharded = any(e.shards is not None for e in ok)
    head = ["optimizer", f"weights {unit}", "grads", "state (device/managed/host)", "activations", "step temp",
            *(["FSDP2 gathered"] if sharded else []), f"peak device {unit}"]
    head += ["fits"] if budget_gib is not None else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def g(x: float) -> str:
        return f"{x / scale:.2f}"

    for e in estimates:
        if e.error:
            lines.append(f"| {e.name} | " + " | ".join(["-"] * (len(head) - 2)) + f" | refused: {e.error} |")
            continue
        cells = [e.name, g(e.weights), g(e.gradients), f"{g(e.state_device)} / {g(e.state_managed)} / "
                 f"{g(e.state_host)}", g(e.activations), g(e.step_temporaries), *([g(e.gathered)] if sharded else []),
                 g(e.peak_device)]
        if budget_gib is not None:
            cells.append("yes" if e.fits(budget_gib) else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compose_run(overrides: Sequence[str]) -> dict[str, Any]:
    """`lit-optim train`'s composed config for `overrides` (recipes included), as plain containers."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import OmegaConf

    from lit_optim.train import _config_path

    path = _config_path()
    init = (initialize_config_module(path.removeprefix("pkg://"), version_base="1.3") if path.startswith("pkg://")
            else initialize_config_dir(path, version_base="1.3"))
    with init:
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


TRUE_16 = {"bf16-true": torch.bfloat16, "16-true": torch.float16}  # precisions that train the model in 16 bits


def shards_of(trainer: Mapping[str, Any]) -> int | None:
    """How many devices a composed ``trainer`` config shards the model over with FSDP2 (``trainer=fsdp2``, or any
    ModelParallelStrategy: the built-in task shards with FSDP2 under it); None when it does not shard (one device,
    DDP: every device holds the whole model)."""
    strategy = trainer.get("strategy")
    target = str(strategy.get("_target_") if isinstance(strategy, Mapping) else strategy)
    if target.startswith("fsdp") or target.endswith("FSDPStrategy"):
        raise IncompatibleConfigError(
            f"lit-optim estimate models FSDP2 sharding (trainer=fsdp2), not FSDP1 (strategy {target!r}), whose "
            "unsharded units depend on its wrap policy; estimate with trainer=fsdp2.")
    from lit_optim.task.fsdp2 import FSDP2Strategy

    fsdp2 = f"{FSDP2Strategy.__module__}.{FSDP2Strategy.__qualname__}"
    if target != fsdp2 and target != "model_parallel" and not target.endswith("ModelParallelStrategy"):
        return None
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1": those devices
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 0:
        return len(devices) * nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or devices not in (-1, "auto", None):
        raise IncompatibleConfigError(
            f"trainer=fsdp2 shards over trainer.devices={devices!r}, which names no number of devices here: give "
            "the number the run will have, e.g. trainer.devices=8 (and trainer.num_nodes=2 for two machines).")
    return count * nodes


def estimate_run(overrides: Sequence[str], optims: Sequence[str] = ()) -> tuple[list[Estimate], dict[str, Any]]:
    """Estimates for a `lit-optim train` command line: its model, batch, optimizer (or each of `optims`, with the
    command line's other ``optim.*`` settings) and, under ``trainer=fsdp2``, sharding."""
    configs = [compose_run([*overrides, f"optim={name}"]) for name in optims] if optims else [compose_run(overrides)]
    data, trainer = configs[0].get("data") or {}, configs[0].get("trainer") or {}
    model: nn.Module | dict = configs[0]["model"]
    checkpointing = bool(model.get("gradient_checkpointing", False))
    if trainer.get("precision") in TRUE_16:  # Lightning converts the model to it, whatever model.dtype says
        model = meta_model(model).to(TRUE_16[trainer["precision"]])
    estimates = estimate(model, [dict(c["optim"]) for c in configs], checkpointing=checkpointing,
                         batch=int(data.get("batch_size") or 1), seq_len=int(data.get("seq_len") or 512),
                         shards=shards_of(trainer), precision=trainer.get("precision"))
    return estimates, configs[0]


def main(argv: Sequence[str]) -> int:
    """`lit-optim estimate [train overrides] [optim=a,b,...] [--budget-gib N]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="lit-optim estimate", description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help="the same overrides as `lit-optim train` (recipe=... too)")
    parser.add_argument("--budget-gib", type=float, help="device memory to fit (default: max_device_memory_gib)")
    args = parser.parse_args(list(argv))
    names: list[str] = []
    rest = []
    for o in args.overrides:
        if o.startswith("optim=") and "," in o:
            names = [n.strip() for n in o.split("=", 1)[1].split(",") if n.strip()]
        else:
            rest.append(o)
    ests, cfg = estimate_run(rest, names)
    budget = args.budget_gib if args.budget_gib is not None else cfg.get("max_device_memory_gib")
    print(table(ests, budget))
    if budget is not None:
        best = suggest(ests, budget)
        if best is None and not names:
            best = suggest(estimate_run(rest, LADDER)[0], budget)
        print(f"\nFits {budget:g} GiB with the most optimizer state: {best.name} ({best.peak_device / GIB:.1f} GiB)."
              if best else f"\nNothing here fits {budget:g} GiB; try optim.offload=cpu, a *_layerwise name, or "
              "model.gradient_checkpointing=true.")
    shards = next((e.shards for e in ests if e.shards is not None), None)
    if shards is not None:
        print(f"\nPer device, sharded over {shards} devices with FSDP2: weights, gradients and optimizer state are "
              "1/N each; 'FSDP2 gathered' is what FSDP2 holds unsharded in backward (modelled, not yet measured on "
              "several GPUs).")
    print("\nEstimated before training (model on the meta device); `lit_optim/memory_estimate.py` says what each "
          "column counts. Managed (paged) and host memory are outside the device peak.")
    return 0
