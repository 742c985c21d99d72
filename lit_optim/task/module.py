"""`LanguageModelTask`: next-token training for the built-in TinyLM or a Hugging Face causal LM, via OptimizerMixin.

The model is built in `configure_model`, not in ``__init__``: Lightning calls that hook inside its strategy's device
and precision contexts, so the weights are created directly on the GPU in the training dtype (an 8B Llama in seconds,
with no host copy), and each DDP rank builds its own. Under Lightning's ``ModelParallelStrategy`` (FSDP2, which
requires ``fully_shard`` inside this hook) the model is sharded right after it is built: each decoder layer, then the
whole (`lit_optim.task.fsdp2`; ``trainer=fsdp2`` selects a strategy in which every rank shards).

The config is checked in ``__init__`` (arch, arguments, weights directory), so a mistake is still reported before the
Trainer starts. Outside a Trainer, call ``module.configure_model()`` to build the model on the default device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lit_optim.build import _plain
from lit_optim.mixin import OptimizerMixin
from lit_optim.preflight import check_data_fits_model
from lit_optim.task.models import build_model, check_model_config


class LanguageModelTask(OptimizerMixin, L.LightningModule):
    def __init__(
        self,
        model: Mapping[str, Any] | None = None,
        optim: str | Mapping[str, Any] | None = "adamw_torch",
        scheduler: Mapping[str, Any] | None = None,
        release_grads_after_step: bool = True,
    ) -> None:
        super().__init__(optim=optim, scheduler=scheduler, release_grads_after_step=release_grads_after_step)
        # Plain containers in the checkpoint: a Hydra DictConfig there would not load with weights_only=True.
        model, optim, scheduler = _plain(model), _plain(optim), _plain(scheduler)
        self.save_hyperparameters()
        self.model_config = dict(model or {"arch": "tiny"})
        check_model_config(self.model_config)
        self.model = None

    # Set by `lit-optim train`, whose process ends with the fit: see `on_train_end`.
    release_after_fit = False

    def on_train_end(self) -> None:
        # After fit, Lightning's strategy teardown copies the model and the optimizer state to the host (".cpu()"):
        # 46 s and 64 GB of host memory for a 32.5B model, only to be thrown away when the process exits -- and a host
        # with less memory than the weights fails there. This hook runs after every callback's (the last checkpoint
        # is written), so a run that ends here frees both on the device instead.
        if not self.release_after_fit or self._trainer is None:
            return
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        with torch.no_grad():
            for p in self.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.grad = None

    def setup(self, stage: str) -> None:
        # With a Trainer of your own (lit-optim train checks this before building one): data the model cannot embed
        # would otherwise fail inside step 1.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_data_fits_model(datamodule, self.model_config)

    def configure_model(self) -> None:
        if self.model is None:  # Lightning calls the hook again for every fit/validate/test, and on load
            self.model = build_model(self.model_config)
            from lightning.pytorch.strategies import ModelParallelStrategy

            if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
                from lit_optim.task.fsdp2 import shard_model

                shard_model(self.model, self.device_mesh, precision=self.trainer.precision)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens)
        return out.logits if hasattr(out, "logits") else out

    def model_inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """What `forward` gets from a batch: every token but the last (each token's successor is its label).

        Monitoring callbacks use it to count tokens and to measure FLOPs (`lit_optim.callbacks.SpeedMonitor`).
        """
        return batch[:, :-1]

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(self.model_inputs(batch))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)
