"""The README's DDP/FSDP2 support matrix (lit_optim/support_matrix.py): every refused cell is refused by a real
Trainer.fit before step 1 with the matrix's reason, and every supported cell names a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import TINY_MODEL, fsdp1_trainer, make_data

from lit_optim import support_matrix
from lit_optim.errors import IncompatibleConfigError
from lit_optim.registry import get_spec
from lit_optim.spec import CPU
from lit_optim.task.module import LanguageModelTask

ROOT = Path(__file__).resolve().parent.parent
CELLS = support_matrix.cells()
REFUSED = [(f, kind, row[kind]) for f, row in CELLS for kind in support_matrix.STRATEGIES if row[kind] is not None]


ShardedTask = LanguageModelTask  # shards itself in configure_model under ModelParallelStrategy (FSDP2)


@pytest.fixture
def no_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("family", "kind", "reason"), REFUSED, ids=[f"{f.key}-{k}" for f, k, _ in REFUSED])
def test_refused_cell_stops_before_step_1(family, kind, reason, tmp_path, no_process_group):
    runnable = [c for c in family.configs if CPU in get_spec(c["name"]).supports]
    if kind == "FSDP1":  # the module's own configure_optimizers, as Lightning calls it, under the stand-in
        from lit_optim.mixin import check_trainer_compatibility

        trainer = fsdp1_trainer()
        with pytest.raises(IncompatibleConfigError) as err:
            if runnable:
                module = LanguageModelTask(model=TINY_MODEL, optim={"lr": 1e-2, **runnable[0]})
                module._trainer = trainer
                module.configure_model()
                module.configure_optimizers()
            else:
                check_trainer_compatibility(get_spec(family.configs[0]["name"]), trainer, "cuda")
    elif not runnable:  # CUDA-only names (FlashOptim): the same check, on a real Trainer with the real strategy
        from lit_optim.mixin import check_trainer_compatibility

        trainer = L.Trainer(strategy=support_matrix.strategy(kind), accelerator="cpu", devices=1, logger=False)
        with pytest.raises(IncompatibleConfigError) as err:
            check_trainer_compatibility(get_spec(family.configs[0]["name"]), trainer, "cuda")
    else:
        optim = {"lr": 1e-2, **runnable[0]}
        module = (ShardedTask if kind == "FSDP2" else LanguageModelTask)(model=TINY_MODEL, optim=optim)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, strategy=support_matrix.strategy(kind),
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            default_root_dir=str(tmp_path))
        with pytest.raises(IncompatibleConfigError) as err:
            trainer.fit(module, make_data())
        assert trainer.global_step == 0
    assert reason in str(err.value)
    assert "\n" not in reason and len(reason) < 400


def test_every_tested_by_names_a_real_test():
    named = set(support_matrix.TESTED_BY.values()) | {support_matrix.REFUSAL_TEST}
    for entry in named:
        if not entry.startswith("tests/"):
            continue
        path, _, func = entry.split(" (")[0].partition("::")
        assert re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M), entry


def test_every_allowed_cell_is_tested_or_says_why_not():
    for family, row in CELLS:
        for kind in support_matrix.STRATEGIES:
            if row[kind] is None:
                assert (family.key, kind) in support_matrix.TESTED_BY, (family.key, kind)
