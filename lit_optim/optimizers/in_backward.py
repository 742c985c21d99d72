"""Optimizer-in-backward for any optimizer: each parameter steps as soon as its gradient is complete.

One sub-optimizer per parameter (``make_sub(group)``: for a registry name, the name's own optimizer or a one-parameter
GaLore/APOLLO, built by `lit_optim/builders/in_backward.py`) steps inside a
``register_post_accumulate_grad_hook`` hook, and the gradient is released right after, so at most a few gradients are
alive at once instead of all of them.

Stepping happens only inside the *stepping window*: while ``optimizer.step(closure)`` runs its closure (which is how
Lightning's automatic optimization calls every optimizer: the closure runs training_step and backward), or inside
``with optimizer.stepping():``. A backward outside the window only accumulates gradients -- that is how gradient
accumulation works: Lightning runs the first micro-batches' closures directly and only the last one inside
``optimizer.step``. ``step()`` itself is otherwise a no-op, except that it steps any parameter whose gradient was
not consumed in backward (a backward outside the window, e.g. manual optimization's ``manual_backward`` followed by
``opt.step()``, or a parameter the last micro-batch did not touch), so results are right in every use; the memory
saving needs the backward inside the window.

What Lightning and the callbacks see is ordinary: ``param_groups`` are the model's (the LR scheduler edits them and
each sub-optimizer gets the group's learning rate before it steps), ``state[p]`` is the sub-optimizer's real state,
``state_dict``/``load_state_dict`` round-trip it exactly, and the global gradient norm (before clipping) is kept in
``last_grad_norm`` (lit_optim's callback logs it as ``grad_norm``).

Not possible in backward, and refused before training by `check_trainer`: global-norm gradient clipping (the global
norm is known only after the last gradient, and every earlier parameter has stepped by then -- use
``clip_per_param_norm``), DDP/FSDP (their gradient reduction runs in their own hooks after ours: ranks would step on
unreduced gradients), and fp16 loss scaling (GradScaler unscales and inf-checks all gradients after backward, before
any step).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lit_optim.bnb_adapter import share_qmaps
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.optimizers.composite import CompositeOptimizer, as_groups, set_group_value
from lit_optim.spec import CPU, GRAD_ACCUM

IN_BACKWARD_SUPPORTS = frozenset({CPU, GRAD_ACCUM})
_GROUP_SYNC = ("lr", "weight_decay")


def _hook(ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None and opt._run.in_window:
            opt._step_param(p)

    return hook


class _Run:
    """What the optimizer and its gradient hooks share about the step in progress. One mutable object rather than
    attributes: a wrapper that forwards attribute reads (Fabric's optimizer wrapper subclasses this class) keeps
    attributes written through it to itself, so ``with wrapper.stepping():`` would never open the hooks' window."""

    __slots__ = ("in_window", "sq_norm", "grad_norm", "unlogged")

    def __init__(self) -> None:
        self.in_window = False
        self.sq_norm: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        self.unlogged = False


class InBackwardOptimizer(CompositeOptimizer):
    """Steps one sub-optimizer per parameter from the backward pass (see the module docstring)."""

    own_prefix = "in_backward_"  # it adds no entries of its own; sub-optimizers (GaLore) keep theirs

    def __init__(self, params, make_sub: Callable[[dict], torch.optim.Optimizer], *,
                 clip_per_param_norm: float | None = None, defaults: Mapping[str, Any] | None = None) -> None:
        groups = as_groups(params)
        if clip_per_param_norm is not None and (isinstance(clip_per_param_norm, bool) or clip_per_param_norm <= 0):
            raise HyperparameterError(f"clip_per_param_norm must be a positive number; got {clip_per_param_norm!r}.")
        super().__init__(groups, {"lr": 1e-3, **dict(defaults or {})})
        self.clip_per_param_norm = None if clip_per_param_norm is None else float(clip_per_param_norm)
        self._subs: dict[int, torch.optim.Optimizer] = {}
        self._group_of: dict[int, int] = {}
        for gi, g in enumerate(self.param_groups):
            hp = {k: v for k, v in g.items() if k != "params"}
            for p in g["params"]:
                self._group_of[id(p)] = gi
                self._subs[id(p)] = make_sub({**hp, "params": [p]})
        share_qmaps(self.lit_optim_inner_optimizers())
        self._run = _Run()
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(_hook(ref)) for p in self._params()]

    # --- composite plumbing ---------------------------------------------------------------------------------------
    def _route(self, p):
        return self._subs[id(p)], p

    def lit_optim_inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._subs.values())

    def _after_load(self) -> None:
        share_qmaps(self.lit_optim_inner_optimizers())

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- stepping -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stepping(self):
        """Backward passes inside this block step each parameter as its gradient completes."""
        run = self._run
        previous, run.in_window = run.in_window, True
        try:
            yield self
        finally:
            run.in_window = previous

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm (before clipping) of the last step."""
        return self._run.grad_norm

    @torch.no_grad()
    def _step_param(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        sq = norm.square()
        run = self._run
        run.sq_norm = sq if run.sq_norm is None else run.sq_norm + sq.to(run.sq_norm.device)
        if self.clip_per_param_norm is not None:
            grad.mul_((self.clip_per_param_norm / (norm + 1e-6)).clamp_(max=1.0).to(grad.dtype))
        group = self.param_groups[self._group_of[id(p)]]
        sub = self._subs[id(p)]
        for sg in sub.param_groups:
            for key in _GROUP_SYNC:
                if key in group and key in sg:
                    set_group_value(sg, key, group[key])
        sub.step()
        p.grad = None
        self._link(p)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with self.stepping(), torch.enable_grad():
                loss = closure()
        for p in self._params():  # gradients not consumed in backward (see the module docstring)
            if p.grad is not None:
                self._step_param(p)
        run = self._run
        if run.sq_norm is not None:
            run.grad_norm, run.unlogged = run.sq_norm.sqrt(), True
        run.sq_norm = None
        return loss

    def pop_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step, once (for logging); None if already taken or no step yet."""
        run = self._run
        if not run.unlogged:
            return None
        run.unlogged = False
        return run.grad_norm

    # --- Lightning ------------------------------------------------------------------------------------------------
    def check_trainer(self, trainer, pl_module=None) -> None:
        """Refuse, before step 1, the Trainer settings in-backward cannot honour -- with the reason and the fix."""
        from lightning.pytorch.strategies import SingleDeviceStrategy

        name = getattr(getattr(self, "lit_optim", None), "name", type(self).__name__)
        problems = []
        if trainer.gradient_clip_val:
            problems.append(
                "Trainer(gradient_clip_val=...) clips by the global gradient norm, which is known only after the last "
                "gradient of the backward pass -- but in-backward has stepped every earlier parameter and freed its "
                "gradient by then. Remove gradient_clip_val and use the hyperparameter clip_per_param_norm=<max "
                "norm>, which clips each parameter's gradient to that norm before it steps"
            )
        if not isinstance(trainer.strategy, SingleDeviceStrategy):
            problems.append(
                f"strategy {type(trainer.strategy).__name__} reduces gradients across processes in its own "
                "autograd hooks (DDP all-reduces in buckets; FSDP reduce-scatters), which run after the "
                "post-accumulate-grad hook that steps the parameter: each rank would step on its local, unreduced "
                "gradient and the replicas would drift apart. Train on one device, or use the name without "
                "in-backward under DDP"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            problems.append(
                "precision '16-mixed' uses a GradScaler, which must unscale every gradient and check them for inf/nan "
                "after backward and before any step, so Lightning runs backward outside optimizer.step: nothing could "
                "step in backward (no memory saved) and stepping during backward would use scaled, unchecked "
                "gradients. Use precision='bf16-mixed' or 'bf16-true'"
            )
        if problems:
            raise IncompatibleConfigError(f"Optimizer {name!r} steps in backward and cannot run with this Trainer: "
                                          + "; ".join(problems) + ".")
