"""Run by tests/test_estimate.py: two CPU processes (gloo) shard lit_optim's TinyLM the way the built-in task does
(`lit_optim.task.fsdp2.shard_model`: each block, then the root) and record, after every call into FSDP2's parameter
groups during training steps, how many bytes of unsharded parameters and gradients exist on the rank; the peak is
what `lit_optim.memory_estimate.gathered_bytes` models. It reads FSDP2's private state (`FSDPParamGroup`, each
parameter's `_unsharded_param`), so a torch upgrade may need it updated.

    python tests/fsdp2_gathered.py OUT.json
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

WORLD = 2


def _probe():
    """Patch FSDPParamGroup so that each call updates the peaks; returns the dict of peaks."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    groups, peak = [], {"params": 0, "grads": 0, "both": 0}

    def held() -> tuple[int, int]:
        storages, grads = {}, {}
        for group in groups:
            for fsdp_param in group.fsdp_params:
                param = getattr(fsdp_param, "_unsharded_param", None)
                if param is None:
                    continue
                storage = param.untyped_storage()  # the parameters of a group share one all-gather buffer
                if storage.nbytes():
                    storages[storage.data_ptr()] = storage.nbytes()
                if param.grad is not None:
                    grads[param.grad.data_ptr()] = param.grad.numel() * param.grad.element_size()
        return sum(storages.values()), sum(grads.values())

    def patch(name: str) -> None:
        original = getattr(FSDPParamGroup, name)

        def call(self, *args, **kwargs):
            if self not in groups:
                groups.append(self)
            out = original(self, *args, **kwargs)
            params, grads = held()
            peak.update(params=max(peak["params"], params), grads=max(peak["grads"], grads),
                        both=max(peak["both"], params + grads))
            return out

        setattr(FSDPParamGroup, name, call)

    for name in ("unshard", "wait_for_unshard", "pre_forward", "post_forward", "pre_backward", "post_backward",
                 "reshard"):
        patch(name)
    return peak


def worker(rank: int, out: str) -> None:
    from gloo_group import end_rank, gloo_mesh, write_results

    from lit_optim.memory_estimate import gathered_bytes, gathered_parts
    from lit_optim.task.fsdp2 import shard_model
    from lit_optim.task.tiny_lm import TinyLM

    warnings.filterwarnings("ignore")
    peak = _probe()
    with gloo_mesh(rank, WORLD, "29561") as mesh:
        torch.manual_seed(0)
        model = TinyLM(vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=32)
        results = {"parts": gathered_parts(model), "modelled": gathered_bytes(model)}
        shard_model(model, mesh)
        tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
        for _ in range(2):  # the second step runs with the groups' buffers already made
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1)).backward()
            model.zero_grad(set_to_none=True)
        results["measured"] = dict(peak)
    write_results(out, rank, {"tinylm": results})
    end_rank()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1],), nprocs=WORLD)
