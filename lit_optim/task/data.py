"""Generated training data: token streams from a fixed random sparse Markov chain.

Each token has a handful of likely successors, so a model that learns the chain drives the loss from ln(vocab) towards
the chain's entropy -- a visible, reproducible fall with no download. Seeded: every run sees the same data.
"""

from __future__ import annotations

import itertools
import math
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_optim.errors import HyperparameterError


def markov_corpus(num_tokens: int, vocab_size: int, branching: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    successors = [[rng.randrange(vocab_size) for _ in range(branching)] for _ in range(vocab_size)]
    # Skewed successor probabilities (a softmax of Gaussian logits) leave the model something to learn beyond "one
    # of four"; cumulative weights let a uniform draw pick the successor.
    cumulative = []
    for _ in range(vocab_size):
        w = [math.exp(2.0 * rng.gauss(0.0, 1.0)) for _ in range(branching)]
        total, acc, row = sum(w), 0.0, []
        for x in w:
            acc += x / total
            row.append(acc)
        cumulative.append(row)
    out, token = [], 0
    for _ in range(num_tokens):
        u, row = rng.random(), cumulative[token]
        k = next((i for i, c in enumerate(row) if u < c), branching - 1)
        token = successors[token][k]
        out.append(token)
    return torch.tensor(out, dtype=torch.long)


class TokenWindows(Dataset):
    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]


class ResumableShuffle(DistributedSampler):
    """Per-epoch permutation from (seed, epoch), sharded by rank, able to resume after `skip` indices of an epoch.

    A `DistributedSampler`, so Lightning keeps it under DDP instead of swapping in its own (which cannot resume
    mid-epoch); on one device it is simply rank 0 of 1.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can checkpoint mid-epoch: it records how many batches the trainer has consumed.

    Lightning reads `state_dict()` when it saves and calls `load_state_dict()` before iterating again, so a resumed
    run continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 **kwargs) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=ResumableShuffle(dataset, seed, num_replicas, rank),
                         drop_last=True, **kwargs)
        self.batches_seen = 0

    def __iter__(self):
        start = self.sampler.skip // self.batch_size
        self.batches_seen = start
        for batch in super().__iter__():
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.skip = state["batches_seen"] * self.batch_size


class SyntheticTextDataModule(L.LightningDataModule):
    def __init__(
        self, vocab_size: int = 256, seq_len: int = 64, batch_size: int = 16, train_tokens: int = 131072,
        val_tokens: int = 8192, branching: int = 4, seed: int = 1234, num_workers: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("vocab_size", vocab_size)):
            # DataLoader would refuse batch_size=0 only once the Trainer asks for the first batch.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HyperparameterError(f"data.{key} must be an integer >= 1; got {value!r}.")
        self.save_hyperparameters()

    def token_vocab(self) -> tuple[int, str]:
        """How many token ids the data can hold, and the setting that says so (checked against the model's)."""
        return self.hparams.vocab_size, f"data.vocab_size={self.hparams.vocab_size}"

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        tokens = markov_corpus(h.train_tokens + h.val_tokens, h.vocab_size, h.branching, h.seed)
        self.train_set = TokenWindows(tokens[: h.train_tokens], h.seq_len)
        self.val_set = TokenWindows(tokens[h.train_tokens :], h.seq_len)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        return ResumableLoader(self.train_set, batch_size=self.hparams.batch_size, seed=self.hparams.seed,
                               num_replicas=trainer.world_size if trainer else 1,
                               rank=trainer.global_rank if trainer else 0, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
