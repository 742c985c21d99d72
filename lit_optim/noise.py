"""Silence chatter from backends that says nothing about optimizers, and print each log line once (command-line
entry points only: a library must not change its user's logging)."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _add_filter_once(logger_name: str, *prefixes: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropMessages(*prefixes))


def quiet_import_noise() -> None:
    # torchao warns about optional CUDA kernels it cannot load on CPU-only machines, and torch about an enum
    # registration torchao makes; neither concerns optimizer state.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # bitsandbytes on CPU tries to fetch an optional 4-bit matmul kernel (inference, not optimizers) from the Hugging
    # Face hub at import and tells every run to `pip install kernels`; its other warnings stay.
    _add_filter_once("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
    # torch's compile cache asks torchao's state subclasses for a hash they do not implement (the cache still works),
    # once per run; torch's pytree deprecates an isinstance check Lightning's own code makes.
    warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's LR monitor copies torchao's and schedule-free's tensor learning rates with torch.tensor(tensor).
    warnings.filterwarnings("ignore", message="To copy construct from a tensor",
                            module="lightning.pytorch.callbacks.lr_monitor")
    # Lightning advertises its cloud logger at every Trainer start.
    _add_filter_once("lightning.pytorch.utilities.rank_zero", "💡 Tip:")


def one_copy_of_each_line() -> None:
    """Call after Hydra has configured logging and Lightning is imported, before the Trainer is built.

    Lightning gives its `lightning` logger a console handler of its own *and* lets records propagate to the root
    logger, which Hydra has given a console and a file handler: every Lightning INFO line came out twice (stderr and
    stdout). Its own handler goes when the root logger has handlers; the root's console and train.log keep them. The
    mixin reports each optimizer it builds (on rank 0) with the same numbers as `build_optimizer`'s own log line, so
    that one is dropped here too.
    """
    import lightning  # noqa: F401 - adds the handler this removes

    root = logging.getLogger()
    if root.handlers:
        lit_logger = logging.getLogger("lightning")
        for handler in list(lit_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lit_logger.removeHandler(handler)
    # On the handlers Hydra made for this job, not on the logger: a library caller of build_optimizer in the same
    # process (a test, a notebook) still gets the line.
    for handler in root.handlers:
        # Exactly the types Hydra's job logging makes; subclasses (pytest's capture handlers) are someone else's.
        if type(handler) not in (logging.StreamHandler, logging.FileHandler):
            continue
        if not any(isinstance(f, _DropMessages) for f in handler.filters):
            handler.addFilter(_DropMessages("lit_optim built "))
