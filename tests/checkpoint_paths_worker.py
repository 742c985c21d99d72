"""A fresh process that loads every kind's checkpoint through the given paths, as a user's script would: nothing
imported but torch, Lightning and the user's module (which imports lit_optim). Prints ``RESULT {json}``: per path and
kind, "ok" or the error, and whether torchao had been imported when the first checkpoint was read.

    python checkpoint_paths_worker.py <path>[,<path>...] <index.json>      # path: load | fit | cli | fabric
"""

from __future__ import annotations

import json
import sys
import traceback

import torch


def main(paths: str, index_file: str) -> None:
    import checkpoint_support as cs

    index = json.loads(open(index_file).read())
    torchao_first = "torchao" in sys.modules  # before any checkpoint is read
    results: dict[str, dict[str, str]] = {}
    for path in paths.split(","):
        for kind, entry in index.items():
            if path not in entry.get("paths", [path]):
                continue
            reference = torch.load(entry["reference"], weights_only=True)
            try:
                globals()[f"check_{path}"](cs, entry, reference)
                results.setdefault(path, {})[kind] = "ok"
            except Exception as e:  # noqa: BLE001 - every kind is reported, not just the first failure
                results.setdefault(path, {})[kind] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    print("RESULT " + json.dumps({"results": results, "torchao_imported_before_first_read": torchao_first}))


def check_load(cs, entry, reference) -> None:
    """Plain `torch.load(weights_only=True)` (no map_location), and `Module.load_from_checkpoint(path)`. A checkpoint
    of the old format: the Trainer's reader (`LitOptimCheckpointIO`) in a process that has not imported torchao."""
    if entry.get("old_format"):
        from lit_optim.checkpoint import LitOptimCheckpointIO

        assert "torchao" not in sys.modules
        state = LitOptimCheckpointIO().load_checkpoint(entry["lightning"])["optimizer_states"][0]["state"]
        assert any(type(v).__name__ == "OptimState8bit" for s in state.values() for v in s.values())
        return
    for name in ("lightning", "fabric"):
        checkpoint = torch.load(entry[name], weights_only=True)
        optimizer = checkpoint["optimizer_states"][0] if name == "lightning" else checkpoint["optimizer"]
        assert optimizer["state"], name
    module = cs.Net.load_from_checkpoint(entry["lightning"])
    assert module.optim_config == entry["optim"], module.optim_config
    _same_weights(module, reference)


def check_fit(cs, entry, reference) -> None:
    """`Trainer.fit(ckpt_path=...)` restores the optimizer state exactly and trains on; validate/test load it too."""
    capture = _Capture(cs)
    t = cs.trainer(_tmp(), cs.STEPS + 1, callbacks=[capture])
    t.fit(cs.Net(optim=entry["optim"]), cs.data(), ckpt_path=entry["lightning"])
    assert t.global_step == cs.STEPS + 1, t.global_step
    assert cs.same(capture.state, reference["state"]), "optimizer state after the restore differs"
    for stage in ("validate", "test"):
        module = cs.Net(optim=entry["optim"])
        getattr(cs.trainer(_tmp(), 1), stage)(module, cs.data(16), ckpt_path=entry["lightning"], verbose=False)
        _same_weights(module, reference)


def check_cli(cs, entry, reference) -> None:
    """`fit --ckpt_path` in a LightningCLI script."""
    from lightning.pytorch.cli import LightningCLI

    capture = _Capture(cs)
    cli = LightningCLI(
        cs.Net, cs.Data, run=True, save_config_callback=None,
        trainer_defaults={"callbacks": [capture], "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                          "default_root_dir": _tmp()},
        args=["fit", "--ckpt_path", entry["lightning"], "--model.optim", json.dumps(entry["optim"]),
              "--trainer.max_steps", str(cs.STEPS + 1)],
    )
    assert cli.trainer.global_step == cs.STEPS + 1, cli.trainer.global_step
    assert cs.same(capture.state, reference["state"]), "optimizer state after the restore differs"


def check_fabric(cs, entry, reference) -> None:
    """`fabric.load` into objects built with `lit_optim.build_optimizer` and `fabric.setup`, then one more step."""
    import lightning as L

    import lit_optim

    fabric = L.Fabric(accelerator="cpu", devices=1)
    module = cs.Net(optim=entry["optim"])  # any nn.Module: the LightningModule is used as one
    optimizer = lit_optim.build_optimizer(module, **entry["optim"])
    model, optimizer = fabric.setup(module, optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(entry["fabric"], state)
    assert state["step"] == cs.STEPS
    assert cs.same(cs.flat_state(optimizer.optimizer), reference["state"]), "optimizer state after load differs"
    _same_weights(module, reference, "fabric_weights")
    x, y = next(iter(cs.data()))
    fabric.backward(torch.nn.functional.mse_loss(model(x), y))
    optimizer.step()
    optimizer.zero_grad()


class _Capture:
    """The optimizer state when training starts, i.e. right after Lightning restored it."""

    def __new__(cls, cs):
        from lightning.pytorch.callbacks import Callback

        class Capture(Callback):
            state = None

            def on_train_start(self, trainer, pl_module):
                self.state = cs.flat_state(trainer.optimizers[0])

        return Capture()


def _same_weights(module, reference, key: str = "weights") -> None:
    weights = module.state_dict()
    assert weights.keys() == reference[key].keys()
    assert all(torch.equal(weights[k], v) for k, v in reference[key].items()), "weights differ"


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="run_", dir=".")  # the test's own directory (the worker's cwd), not /tmp


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
