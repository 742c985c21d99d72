"""CPU offload of optimizer state: any host-capable optimizer steps on host copies of the parameters.

`OffloadOptimizer` keeps a host copy of every parameter (pinned when CUDA exists, so copies can be asynchronous) and
an inner optimizer built over those copies by a factory, with the same group structure. ``step`` runs the closure
(Lightning's training_step + backward), brings the gradients to the host, steps the inner optimizer there and copies
the updated parameters back. The optimizer state never touches the device.

Two levels:

- ``offload_gradients=False``: gradients stay on the device until ``step``, so Lightning's gradient clipping (which
  reads ``param_groups``' gradients), GradScaler and DDP's reduced gradients are all right at step time;
- ``offload_gradients=True``: each gradient is copied to the host in a post-accumulate-grad hook as soon as it is
  complete and freed on the device, so the device never holds all gradients at once. Clipping, accumulation, DDP and
  fp16 loss scaling need the device gradients after backward and are refused by `check_trainer`.

What Lightning sees is ordinary: ``param_groups`` hold the device parameters (schedulers edit them; hyperparameters
are copied into the inner groups before each inner step), ``state[p]`` shows the inner optimizer's host state for
device parameter ``p``, and ``state_dict``/``load_state_dict`` round-trip it. ``state`` is a fresh view on every
read: Lightning moves "the optimizer state" to the root device after a resume by assigning into ``state[p]``, which
would otherwise pull the offloaded state onto the GPU.

The host copies are the master weights while training; they are refreshed from the device parameters before the
first step and after ``load_state_dict`` (Lightning restores the model's weights after the optimizer was built).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lit_optim.errors import IncompatibleConfigError
from lit_optim.optimizers.composite import as_groups, set_group_value
from lit_optim.state_bytes import state_tensors


def _host_copy(p: torch.Tensor, pin: bool) -> torch.Tensor:
    host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
    host.copy_(p.detach())
    return host.requires_grad_(p.requires_grad)


def _grad_hook(ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._gradient_ready(p)

    return hook


class OffloadOptimizer(torch.optim.Optimizer):
    """Steps `make_inner(host_groups)` on host copies of the parameters (see the module docstring)."""

    def __init__(self, params, make_inner: Callable[[list[dict]], torch.optim.Optimizer], *,
                 offload_gradients: bool = False, name: str | None = None) -> None:
        groups = as_groups(params)
        self._pin = torch.cuda.is_available()
        self._host: dict[int, torch.Tensor] = {}
        host_groups = []
        for g in groups:
            hosts = []
            for p in g["params"]:
                self._host[id(p)] = _host_copy(p, self._pin)
                hosts.append(self._host[id(p)])
            host_groups.append({**g, "params": hosts})
        self.inner = make_inner(host_groups)
        self.offload_gradients = bool(offload_gradients)
        self._name = name or type(self.inner).__name__
        self._built = False
        super().__init__(groups, dict(self.inner.defaults))
        self._built = True
        self._grad_buffers: dict[int, torch.Tensor] = {}
        self._pending: set[int] = set()  # gradients already on the host, waiting for step
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._h2d_done: torch.cuda.Event | None = None
        self._host_stale = True
        self._handles = []
        if self.offload_gradients:
            ref = weakref.ref(self)
            self._handles = [p.register_post_accumulate_grad_hook(_grad_hook(ref))
                             for p in self._params() if p.requires_grad]

    # --- what Lightning, schedulers and checkpoints see ------------------------------------------------------------
    @property
    def state(self) -> defaultdict:
        # Fresh dicts: writes into them (Lightning's _optimizer_to_device after a resume) must not reach host state.
        view: defaultdict = defaultdict(dict)
        inner = self.__dict__.get("inner")
        if inner is None:
            return view
        for p in self._params():
            s = inner.state.get(self._host[id(p)])
            if s:
                view[p] = dict(s)
        return view

    @state.setter
    def state(self, value) -> None:
        if value:
            raise AttributeError(f"{type(self).__name__}.state is a view of the host state; use load_state_dict.")

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for p in self._params():
            yield p, self._host[id(p)]

    def lit_optim_inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.inner]

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_built"):
            raise NotImplementedError(f"{type(self).__name__} cannot take param groups after it was built; "
                                      "build it again with all groups.")
        super().add_param_group(param_group)

    def lit_optim_state_tensors(self) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
        """For lit_optim's state monitor: the inner's host state, attributed to the device parameters."""
        for p, h in self._pairs():
            for key, value in self.inner.state.get(h, {}).items():
                for t in state_tensors(value):
                    yield p, str(key), t

    def lit_optim_buffer_tensors(self) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
        for p, h in self._pairs():
            yield p, "host_param", h
            buf = self._grad_buffers.get(id(h))
            if buf is not None:
                yield p, "host_grad", buf

    def state_dict(self) -> dict[str, Any]:
        self._wait_h2d()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError(
                f"{type(self).__name__}: the saved optimizer state has different param groups "
                f"({[len(s['params']) for s in saved_groups]} params) than this optimizer "
                f"({[len(g['params']) for g in self.param_groups]}); was the model or the optimizer configuration "
                "changed?")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        # The inner numbers its parameters in the same order; its own load casts and places state on the host.
        position = {saved_id: i for i, saved_id in enumerate(i for s in saved_groups for i in s["params"])}
        self._wait_h2d()
        self.inner.load_state_dict({
            "state": {position[k]: v for k, v in state_dict["state"].items()},
            "param_groups": self.inner.state_dict()["param_groups"],
        })
        self._sync_groups()
        self._host_stale = True  # the module's weights may have been restored too

    # --- stepping --------------------------------------------------------------------------------------------------
    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _grad_buffer(self, h: torch.Tensor) -> torch.Tensor:
        buf = self._grad_buffers.get(id(h))
        if buf is None:
            buf = self._grad_buffers[id(h)] = torch.empty(h.shape, dtype=h.dtype, pin_memory=self._pin)
        return buf

    def _wait_h2d(self) -> None:
        # The host copies must not change while the previous step's non-blocking copies to the device still read them.
        if self._h2d_done is not None:
            self._h2d_done.synchronize()
            self._h2d_done = None

    def _sync_streams(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()

    @torch.no_grad()
    def _gradient_ready(self, p: torch.Tensor) -> None:
        grad, h = p.grad, self._host[id(p)]
        if grad is None:
            return
        buf = self._grad_buffer(h)
        if id(p) in self._pending:  # a second backward before step (manual optimization): accumulate on the host
            self._sync_streams()
            buf.add_(grad.to("cpu"))
        elif grad.is_cuda:
            stream = self._stream(grad.device)
            stream.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(stream):
                buf.copy_(grad, non_blocking=True)
            grad.record_stream(stream)  # the allocator must not reuse the freed gradient before the copy ran
        else:
            buf.copy_(grad)
        self._pending.add(id(p))
        p.grad = None

    @torch.no_grad()
    def _to_host(self) -> None:
        """Gradients (and, when stale, parameters) device -> host, all copies queued before one wait."""
        self._wait_h2d()
        cuda = [p for p in self._params() if p.is_cuda]
        contexts = {}
        for p in cuda:
            if p.device not in contexts:
                stream = self._stream(p.device)
                stream.wait_stream(torch.cuda.current_stream(p.device))
                contexts[p.device] = stream
        for p, h in self._pairs():
            ctx = torch.cuda.stream(contexts[p.device]) if p.is_cuda else contextlib.nullcontext()
            with ctx:
                if self._host_stale:
                    h.copy_(p.detach(), non_blocking=True)
                if id(p) in self._pending:
                    h.grad = self._grad_buffers[id(h)]
                elif p.grad is not None:
                    buf = self._grad_buffer(h)
                    buf.copy_(p.grad, non_blocking=True)
                    h.grad = buf
                else:
                    h.grad = None
        self._sync_streams()
        self._pending.clear()
        self._host_stale = False

    @torch.no_grad()
    def _to_device(self) -> None:
        event = None
        for p, h in self._pairs():
            if h.grad is not None:
                p.copy_(h, non_blocking=True)
                if p.is_cuda:
                    event = event or torch.cuda.Event()
        if event is not None:
            event.record()
            self._h2d_done = event

    def _sync_groups(self) -> None:
        # Schedulers and Lightning edit the outer groups; the inner must step with their values.
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for key, value in outer.items():
                if key != "params" and key in inner:
                    set_group_value(inner, key, value)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._to_host()
        self._sync_groups()
        self.inner.step()
        self._to_device()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._pending.clear()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- Lightning ------------------------------------------------------------------------------------------------
    def check_trainer(self, trainer, pl_module=None) -> None:
        """Refuse, before step 1, the Trainer settings offload cannot honour -- with the reason and the fix."""
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        strategy, problems = trainer.strategy, []
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            problems.append(sharded_problem(type(strategy).__name__))
        elif not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            problems.append(f"strategy {type(strategy).__name__} is not supported with offload; use one device or DDP")
        if self.offload_gradients:
            why = "offload_gradients moves each gradient to the host and frees it on the device during backward"
            if trainer.gradient_clip_val:
                problems.append(f"Trainer(gradient_clip_val=...) clips the device gradients after backward, but {why}; "
                                "set offload_gradients=false (gradients stay on the device until step, clipping "
                                "works) or remove gradient_clip_val")
            if trainer.accumulate_grad_batches > 1:
                problems.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches} sums gradients over "
                                f"backward passes on the device, but {why}; set offload_gradients=false or "
                                "accumulate_grad_batches=1")
            if isinstance(strategy, DDPStrategy):
                problems.append(f"DDP all-reduces gradients in its own hooks after the one that moves them, so {why} "
                                "before it is reduced and ranks would step on local gradients; set "
                                "offload_gradients=false under DDP")
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                problems.append(f"precision '16-mixed' unscales and inf-checks the device gradients after backward, "
                                f"but {why}; use precision='bf16-mixed' or offload_gradients=false")
        if problems:
            name = getattr(getattr(self, "lit_optim", None), "name", self._name)
            raise IncompatibleConfigError(f"Optimizer {name!r} with offload=cpu cannot run with this Trainer: "
                                          + "; ".join(problems) + ".")


def sharded_problem(who: str) -> str:
    """Why offload refuses sharded training (the Trainer check, and the build when parameters are DTensors)."""
    own = ("FSDPStrategy(cpu_offload=True)" if who == "FSDPStrategy"
           else "fully_shard(..., offload_policy=CPUOffloadPolicy())")
    return (f"strategy {who} shards parameters and optimizer state across ranks itself, and full host copies of the "
            f"parameters would undo the sharding; use FSDP's own CPU offload ({own}) or train with DDP/one device "
            "and offload=cpu")
