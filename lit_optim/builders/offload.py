"""Registry names with ``offload=cpu``: the name's optimizer over host copies of the parameters, behind
`OffloadOptimizer` -- which names can, the options, and the host kernel."""

from __future__ import annotations

import dataclasses

import torch

from lit_optim.bnb_adapter import private_override_manager
from lit_optim.builders.construct import BuildContext, construct
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.optimizers.offload import OffloadOptimizer, sharded_problem
from lit_optim.spec import CPU, DDP, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

OFFLOAD_TARGETS = ("cpu",)


def offload_problem(spec: OptimizerSpec) -> str | None:
    """Why registry name `spec` cannot step on the host behind `OffloadOptimizer`, or None if it can."""
    if spec.requires_cuda or CPU not in spec.supports:
        return "its step runs only on CUDA, so it cannot step on the host"
    if spec.paged:
        return ("its state lives in paged (CUDA managed) memory, which the driver already moves to the host on "
                "demand; pick one: paging, or the unpaged name " + repr(spec.name.removeprefix("paged_"))
                + " with offload=cpu")
    if spec.train_eval_switch:
        return ("it is schedule-free: its train()/eval() swap edits the parameters it steps, which would be the host "
                "copies")
    if spec.target.endswith(("InBackwardOptimizer", ":Lomo", ":AdaLomo")):
        return "it steps in backward on the device gradients; offload steps after backward"
    if spec.builder is not None:
        return ("it is built from the model's structure (which parameters are projected or partitioned), which the "
                "host copies do not carry")
    return None


def check_offload_options(spec: OptimizerSpec, group_opts: dict) -> None:
    """Validate ``offload``/``offload_gradients`` (popped into `group_opts`); off values are dropped."""
    target = group_opts.get("offload")
    grads = group_opts.pop("offload_gradients", False)
    if target is not None and target not in OFFLOAD_TARGETS:
        raise HyperparameterError(f"offload must be null or one of {list(OFFLOAD_TARGETS)}; got {target!r}.")
    if not isinstance(grads, bool):
        raise HyperparameterError(f"offload_gradients must be true or false; got {grads!r}.")
    if target is None:
        group_opts.pop("offload", None)
        if grads:
            raise HyperparameterError("offload_gradients=true needs offload=cpu (gradients go where the state is); "
                                      "set offload=cpu too.")
        return
    problem = offload_problem(spec)
    if problem is not None:
        raise HyperparameterError(f"Optimizer {spec.name!r} cannot use offload={target!r}: {problem}. Drop offload, or "
                                  "pick a name that runs on the CPU (`lit-optim list` shows which).")
    if group_opts.get("in_backward"):
        raise HyperparameterError(
            f"Optimizer {spec.name!r}: in_backward and offload={target!r} cannot be combined: in-backward steps each "
            "parameter on the device during backward, offload steps on the host after it. Choose one.")
    group_opts["offload_gradients"] = grads


def offload_supports(spec: OptimizerSpec, offload_gradients: bool) -> frozenset:
    """What the name still supports once offloaded: never FSDP; with gradient offload no DDP, clipping, accumulation."""
    keep = {CPU, DDP, GRAD_CLIP, GRAD_ACCUM} - ({DDP, GRAD_CLIP, GRAD_ACCUM} if offload_gradients else set())
    return spec.supports & frozenset(keep)


def host_kernel(spec: OptimizerSpec, kwargs: dict, params: list[torch.Tensor]) -> dict:
    """torch Adam/AdamW steps offloaded state with its fused CPU kernel unless the user chose one.

    Only for parameters that really live on an accelerator: a model already on the CPU keeps the name's own kernel
    (foreach and fused round differently in the last bit, and offload must not change its numbers).
    """
    if spec.target not in ("torch.optim:AdamW", "torch.optim:Adam") or {"fused", "foreach"} & set(kwargs):
        return kwargs
    fused_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if any(p.device.type != "cpu" for p in params) and all(p.dtype in fused_dtypes for p in params):
        return {**kwargs, "fused": True}
    return kwargs


def build_offloaded(spec: OptimizerSpec, groups: list[dict], kwargs: dict, context: BuildContext, *,
                    offload_gradients: bool) -> tuple[OffloadOptimizer, OptimizerSpec]:
    """`spec`'s optimizer over host copies of the parameters, and the spec of what was built (narrower support)."""
    params = [p for g in groups for p in g["params"]]
    if any(hasattr(p, "to_local") for p in params):  # FSDP2 shards: refuse before the host copies fail on DTensors
        raise IncompatibleConfigError(f"Optimizer {spec.name!r} with offload=cpu cannot run with this Trainer: "
                                      + sharded_problem("ModelParallelStrategy") + ".")
    kwargs = host_kernel(spec, kwargs, params)
    fp32 = {id(p) for p in context.fp32_state_params}

    def make_inner(host_groups: list[dict]) -> torch.optim.Optimizer:
        inner = construct(spec, host_groups, kwargs, context)
        if spec.backend == "bitsandbytes":
            # bnb resolves overrides by the module's own parameter, not our host copy: key them by the copy.
            host_of = {id(p): h for p, h in zip(params, (h for g in host_groups for h in g["params"]))}
            private_override_manager(inner, [host_of[id(p)] for p in params if id(p) in fp32], stand_ins=host_of)
        return inner

    optimizer = OffloadOptimizer(groups, make_inner, offload_gradients=offload_gradients, name=spec.name)
    return optimizer, dataclasses.replace(spec, supports=offload_supports(spec, offload_gradients))
