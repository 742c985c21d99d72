"""Every input of a run checked before step 1, with one line that names the problem and the fix.

Through `lit-optim train` (its Hydra entry point, in this process): the seed, gradient accumulation, data against the
model, head count, batch size, writable checkpoint directories, and the checkpoint to resume from (missing, a
directory, truncated, another optimizer, another model, resume= a directory that is not a run). Through a Trainer of
your own (the mixin and the built-in task): the same checks that apply there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_inprocess import run_train
from harness import TINY_MODEL, make_data, make_module, run_task
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_optim.errors import HyperparameterError, IncompatibleConfigError, UnwritablePathError
from lit_optim.task.module import LanguageModelTask


def sys_is_read_only() -> bool:
    try:
        os.close(os.open("/sys/.lit_optim_probe", os.O_CREAT | os.O_WRONLY))
        os.unlink("/sys/.lit_optim_probe")
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def adamw_checkpoint(tmp_path_factory) -> Path:
    """A real `lit-optim train` checkpoint of the default tiny LM with adamw_torch, 2 steps."""
    run = tmp_path_factory.mktemp("adamw_run")
    code, err = run_train(run, "trainer.max_steps=2")
    assert code == 0, err[-3000:]
    return run / "checkpoints" / "last.ckpt"


def refused(tmp_path: Path, *overrides: str) -> str:
    """Run `lit-optim train`; it must exit 2 before step 1 with one `lit-optim: ...` line, which is returned."""
    run = tmp_path / "run"
    code, err = run_train(run, "trainer.max_steps=2", *overrides)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lit-optim: "), err[-3000:]
    assert not list(run.rglob("*.ckpt")), "a checkpoint was written: the run got to step 1"
    return last.removeprefix("lit-optim: ")


SIMPLE = {
    "seed-not-a-number": ("seed=abc", "seed must be an integer from 0 to 4294967295; got 'abc'. Set e.g. seed=1234."),
    "seed-float": ("seed=1.5", "seed must be an integer from 0 to 4294967295; got 1.5."),
    "seed-negative": ("seed=-1", "seed must be an integer from 0 to 4294967295; got -1."),
    "accumulate-zero": ("trainer.accumulate_grad_batches=0",
                        "trainer.accumulate_grad_batches must be an integer >= 1 (the number of batches per optimizer "
                        "step; 1: no accumulation); got 0."),
    "data-vocab-larger": ("data.vocab_size=512",
                          "data.vocab_size=512 is larger than model.vocab_size=256: token ids up to 511 would overflow "
                          "the model's embedding. Use data with at most 256 token ids or raise model.vocab_size."),
    "sequence-too-long": ("data.seq_len=256", "data.seq_len=256 is longer than the model's 128 positions "
                          "(model.max_seq_len). Lower data.seq_len or raise model.max_seq_len."),
    "heads-do-not-divide": ("model.n_heads=3", "model.n_heads=3 does not divide model.d_model=128: every head needs "
                            "an equal share. Use a n_heads that divides 128 (e.g. 8, 16, 32, 64)."),
    "batch-size-zero": ("data.batch_size=0", "data.batch_size must be an integer >= 1; got 0."),
}


@pytest.mark.parametrize("case", list(SIMPLE))
def test_bad_run_input_refused_before_step_one(tmp_path, case):
    override, message = SIMPLE[case]
    assert refused(tmp_path, override).startswith(message)


def test_byte_tokens_against_a_smaller_model_vocabulary(tmp_path):
    """The ids the data really holds (here UTF-8 bytes), not only the number data.vocab_size declares."""
    (tmp_path / "notes.txt").write_text("some text " * 200)
    assert refused(tmp_path, "data=text_file", f"data.path={tmp_path}/notes.txt", "data.vocab_size=256",
                   "model.vocab_size=200") == (
        "data.tokenizer=null (UTF-8 bytes: 256 token ids) is larger than model.vocab_size=200: token ids up to 255 "
        "would overflow the model's embedding. Use data with at most 200 token ids or raise model.vocab_size.")


def test_checkpoint_directory_under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("")
    message = refused(tmp_path, f"callbacks.checkpoint.dirpath={tmp_path}/a_file/checkpoints")
    assert message == (f"callbacks.checkpoint.dirpath={tmp_path}/a_file/checkpoints cannot be created: "
                       f"{tmp_path}/a_file is a file, not a directory. Point callbacks.checkpoint.dirpath at a "
                       "directory.")


@pytest.mark.skipif(not sys_is_read_only(), reason="needs a read-only directory even for this user (/sys)")
def test_read_only_checkpoint_directory(tmp_path):
    """A real read-only location (sysfs refuses new files even to root); found now, not at the first save."""
    message = refused(tmp_path, "callbacks.checkpoint.dirpath=/sys/lit_optim_test/checkpoints")
    assert message.startswith("callbacks.checkpoint.dirpath=/sys/lit_optim_test/checkpoints is not writable (in "
                              "/sys, where it would be created): ")
    assert message.endswith("Point callbacks.checkpoint.dirpath at a directory this user can write.")


def test_checkpoint_records_its_optimizer(adamw_checkpoint):
    checkpoint = torch.load(adamw_checkpoint, weights_only=True)
    assert checkpoint["lit_optim"] == {"optimizer": "adamw_torch"}


def test_missing_checkpoint(tmp_path):
    assert refused(tmp_path, f"ckpt_path={tmp_path}/nothing.ckpt").startswith(
        f"ckpt_path={tmp_path}/nothing.ckpt does not exist (relative paths are taken from the directory you ran in).")


def test_checkpoint_path_that_is_a_directory(tmp_path, adamw_checkpoint):
    directory = adamw_checkpoint.parent
    assert refused(tmp_path, f"ckpt_path={directory}") == (
        f"ckpt_path={directory} is a directory. Give a checkpoint file in it (e.g. {directory}/last.ckpt), or "
        "resume=<run dir> to continue that run from its last checkpoint.")


def test_truncated_checkpoint(tmp_path, adamw_checkpoint):
    """What a run killed mid-write left behind before saves were atomic: the first half of a checkpoint."""
    data = adamw_checkpoint.read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    assert refused(tmp_path, f"ckpt_path={tmp_path}/half.ckpt") == (
        f"ckpt_path={tmp_path}/half.ckpt is not a loadable checkpoint (PytorchStreamReader failed reading zip "
        "archive: failed finding central directory): it is truncated (a run killed while writing it) or not a "
        "torch checkpoint. Use another checkpoint of the run, e.g. an earlier step's.")


@pytest.mark.parametrize("other", ["adamw_8bit", "adamw_torch_8bit"])
def test_checkpoint_of_another_optimizer(tmp_path, adamw_checkpoint, other):
    """Today's failure without the check: the state loads, then step 1 dies with KeyError 'state1'."""
    assert refused(tmp_path, f"optim={other}", f"ckpt_path={adamw_checkpoint}") == (
        f"ckpt_path={adamw_checkpoint} was written with optimizer 'adamw_torch' but this run uses '{other}': one's "
        f"state cannot be loaded into the other. Resume with optim=adamw_torch, or start a new run (no "
        f"ckpt_path/resume) to switch optimizers.")


def test_checkpoint_of_another_model(tmp_path, adamw_checkpoint):
    message = refused(tmp_path, "model.d_model=64", "model.n_heads=2", f"ckpt_path={adamw_checkpoint}")
    assert message.startswith(f"ckpt_path={adamw_checkpoint} holds another model than this run builds: "
                              "model.embed.weight is [256, 128] there but [256, 64] here (and ")
    assert message.endswith("Resume with the model settings it was trained with (a lit-optim run's are in its "
                            ".hydra/config.yaml), or start a new run without ckpt_path/resume.")


def test_resume_of_something_that_is_not_a_run(tmp_path):
    assert refused(tmp_path, f"resume={tmp_path}/nowhere").startswith(f"resume={tmp_path}/nowhere is not a directory.")
    (tmp_path / "plain").mkdir()
    assert refused(tmp_path, f"resume={tmp_path}/plain").startswith(
        f"resume={tmp_path}/plain has no .hydra/overrides.yaml: it is not the directory of a `lit-optim train` run")


def test_llama_heads_checked_when_the_module_is_built():
    pytest.importorskip("transformers")
    with pytest.raises(HyperparameterError, match=r"^model.num_attention_heads=3 does not divide "
                                                  r"model.hidden_size=64: every head needs an equal share"):
        LanguageModelTask(model={"arch": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 3})
    with pytest.raises(HyperparameterError, match=r"^model.num_key_value_heads=3 does not divide "
                                                  r"model.num_attention_heads=4"):
        LanguageModelTask(model={"arch": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3})


# --- a Trainer of your own: the mixin and the built-in task check what applies there ---------------------------------


def own_fit_must_fail(tmp_path, module, data, error, match, *, ckpt_path=None, ckpt_dir=None, **trainer_kw):
    ckpt_dir = ckpt_dir or tmp_path / "own_ckpt"
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(tmp_path),
                        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1)], **trainer_kw)
    with pytest.raises(error, match=match):
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    assert trainer.global_step == 0
    assert not (tmp_path / "own_ckpt").exists() or not list((tmp_path / "own_ckpt").iterdir())


def test_own_trainer_accumulation_zero(tmp_path):
    own_fit_must_fail(tmp_path, make_module({"name": "adamw_torch"}), make_data(), HyperparameterError,
                      r"^Trainer\(accumulate_grad_batches=...\) must be an integer >= 1", accumulate_grad_batches=0)


def test_own_trainer_data_vocabulary_larger_than_the_model(tmp_path):
    own_fit_must_fail(tmp_path, make_module({"name": "adamw_torch"}), make_data(vocab_size=512), HyperparameterError,
                      r"^data.vocab_size=512 is larger than model.vocab_size=256")


def test_own_trainer_unwritable_checkpoint_directory(tmp_path):
    (tmp_path / "a_file").write_text("")
    own_fit_must_fail(tmp_path, make_module({"name": "adamw_torch"}), make_data(), UnwritablePathError,
                      r"a_file is a file, not a directory", ckpt_dir=tmp_path / "a_file" / "ckpt")


def test_own_trainer_checkpoint_of_another_optimizer_and_model(tmp_path):
    run_task({"name": "adamw_torch"}, 2, tmp_path=tmp_path, checkpoint_every=2)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    shutil.move(ckpt, tmp_path / "adamw.ckpt")
    own_fit_must_fail(tmp_path, make_module({"name": "adamw_torch_8bit"}), make_data(), IncompatibleConfigError,
                      r"written with optimizer 'adamw_torch' but this run uses 'adamw_torch_8bit'",
                      ckpt_path=tmp_path / "adamw.ckpt")
    wider = make_module({"name": "adamw_torch"}, model={**TINY_MODEL, "d_model": 128})
    own_fit_must_fail(tmp_path, wider, make_data(), IncompatibleConfigError,
                      r"holds another model than this run builds: model.embed.weight is \[256, 64\] there but "
                      r"\[256, 128\] here", ckpt_path=tmp_path / "adamw.ckpt")
