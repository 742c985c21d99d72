"""Run by tests/test_estimate.py: two CPU processes (gloo) shard lit_optim's TinyLM the way the built-in task does
(`lit_optim.task.fsdp2.shard_model`: each block, then the root) and train two steps, in fp32 and in bf16-mixed
(FSDP2's mixed-precision policy plus autocast, as Lightning runs it). Before and after every call into FSDP2's
parameter groups the worker adds up what FSDP2 holds beyond the shards: gathered parameters, all-gather buffers,
unsharded gradients and reduce-scatter buffers; the peak of that sum is what `lit_optim.memory_estimate.gathered_bytes`
models. It also adds up the 16-bit weight copies autocast keeps for backward after each forward. It reads FSDP2's
private state (`FSDPParamGroup` and its communication context), so a torch upgrade may need it updated.

    python tests/fsdp2_gathered.py OUT.json
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch

WORLD = 2


def _size(t: torch.Tensor | None, into: dict) -> None:
    if t is not None and t.untyped_storage().nbytes():
        into[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()


def _held(groups) -> int:
    held: dict[int, int] = {}
    for group in groups:
        for fsdp_param in group.fsdp_params:
            param = getattr(fsdp_param, "_unsharded_param", None)
            if param is not None:
                _size(param, held)
                _size(param.grad, held)
        result = getattr(group, "_all_gather_result", None)
        _size(getattr(result, "all_gather_output", None), held)
        ctx = group.comm_ctx
        state = getattr(ctx, "all_gather_state", None)
        _size(getattr(getattr(state, "all_gather_result", None), "all_gather_output", None), held)
        for rs in getattr(ctx, "reduce_scatter_states", ()):
            _size(rs.reduce_scatter_input, held)
    return sum(held.values())


def _probe() -> dict:
    """Patch FSDPParamGroup so that every call updates peak["held"]."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    groups, peak = [], {"held": 0}

    def patch(name: str) -> None:
        original = getattr(FSDPParamGroup, name)

        def call(self, *args, **kwargs):
            if self not in groups:
                groups.append(self)
            peak["held"] = max(peak["held"], _held(groups))
            out = original(self, *args, **kwargs)
            peak["held"] = max(peak["held"], _held(groups))
            return out

        setattr(FSDPParamGroup, name, call)

    for name in ("unshard", "wait_for_unshard", "pre_forward", "post_forward", "pre_backward", "post_backward",
                 "reshard", "finalize_backward"):
        patch(name)
    return peak


def _train(model, tokens: torch.Tensor, precision: str | None, peak: dict) -> dict:
    # 16-bit tensors shaped like a Linear weight (no activation here has such a shape: 32 tokens a rank)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    copies: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes:
            copies[t.untyped_storage().data_ptr()] = t
        return t

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    out = {"copies_after_forward": 0}
    for _ in range(2):  # the second step runs with the groups' buffers already made
        peak["held"] = 0
        copies.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            logits = model(tokens[:, :-1])
        out["copies_after_forward"] = sum(t.untyped_storage().nbytes() for t in copies.values())
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, 512), tokens[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
    out["held"] = peak["held"]
    return out


def worker(rank: int, out: str) -> None:
    from gloo_group import end_rank, gloo_mesh, write_results

    from lit_optim.memory_estimate import gathered_bytes, gathered_parts
    from lit_optim.task.fsdp2 import shard_model
    from lit_optim.task.tiny_lm import TinyLM

    warnings.filterwarnings("ignore")
    peak = _probe()
    results = {}
    with gloo_mesh(rank, WORLD, "29561") as mesh:
        # (name, the Trainer's precision, the one shard_model is told): the last is autocast without FSDP2's policy
        for key, precision, policy in (("32-true", None, None), ("bf16-mixed", "bf16-mixed", "bf16-mixed"),
                                       ("bf16-mixed, autocast only", "bf16-mixed", None)):
            torch.manual_seed(0)
            model = TinyLM(vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=32)
            results[key] = {"parts": gathered_parts(model, policy), "modelled": gathered_bytes(model, policy),
                            "linear_weights": sum(m.weight.numel() for m in model.modules()
                                                  if isinstance(m, torch.nn.Linear))}
            shard_model(model, mesh, precision=policy)
            tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
            results[key].update(_train(model, tokens, precision, peak))
    write_results(out, rank, results)
    end_rank()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1],), nprocs=WORLD)
