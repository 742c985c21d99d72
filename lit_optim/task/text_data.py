"""Your own text as training data: a local .txt/.jsonl file (or a directory of them) cut into fixed-length windows.

    lit-optim train data=text_file data.path=corpus.txt                       # UTF-8 bytes as tokens (vocab 256)
    lit-optim train recipe=llama31_8b_adamw_8bit model.pretrained=/models/Llama-3.1-8B data.path=/data/corpus.jsonl

Tokens come from the model's tokenizer in a local directory (``transformers.AutoTokenizer``, ``local_files_only``:
nothing is downloaded) or, with ``tokenizer: null``, from the raw UTF-8 bytes, which suits the built-in tiny model.
Documents are joined with the tokenizer's end-of-sequence token and the stream is cut into windows of ``seq_len + 1``
tokens (input and shifted target), the last ``val_fraction`` of them held out for validation.

Without a ``path`` the module warns and generates the same Markov-chain tokens as ``data=synthetic``, so a recipe
runs as is; a ``path`` (or ``tokenizer``) that is given but missing is an error before training starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_optim.errors import BackendNotInstalledError, HyperparameterError, MissingPathError
from lit_optim.task.data import SyntheticTextDataModule, TokenWindows

TEXT_SUFFIXES = (".txt", ".jsonl")
_CHUNK_CHARS = 1 << 20  # tokenize big .txt files a megabyte of lines at a time


def find_text_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself if it is a file, else every .txt/.jsonl file below it (sorted, so runs are reproducible)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():  # a file named explicitly is read as plain text unless it is .jsonl
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise MissingPathError(f"data.path={str(path)!r} is a directory without .txt or .jsonl files.")
        return files
    raise MissingPathError(f"data.path={str(path)!r} does not exist (relative paths are taken from the directory "
                           f"you ran in). Give an existing .txt/.jsonl file or directory, or drop data.path to train "
                           f"on synthetic tokens.")


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a local directory (tokenizer.json / tokenizer_config.json); never downloads."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise MissingPathError(f"data.tokenizer={str(path)!r} is not a directory. Point it at a local model or "
                               f"tokenizer directory (with tokenizer.json), or data.tokenizer=null for byte tokens.")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BackendNotInstalledError(
            "data.tokenizer needs transformers: pip install 'lit-optim[transformers]' (or data.tokenizer=null for "
            "byte-level tokens)."
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingPathError(f"data.tokenizer={str(path)!r}: no usable tokenizer there ({err}).") from None


def iter_documents(files: list[Path], text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces: .txt files in chunks of whole lines, .jsonl files one record at a time."""
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise MissingPathError(f"{f}:{lineno}: not valid JSON ({err.msg}).") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise MissingPathError(f"{f}:{lineno}: no string field {text_field!r} (set data.text_field).")
                    yield record[text_field], True
        else:
            with f.open(encoding="utf-8", errors="replace") as fh:
                chunk: list[str] = []
                size = 0
                for line in fh:
                    chunk.append(line)
                    size += len(line)
                    if size >= _CHUNK_CHARS:
                        yield "".join(chunk), False
                        chunk, size = [], 0
                yield "".join(chunk), True


class TextFileDataModule(SyntheticTextDataModule):
    """Fixed-length token windows from local text files; synthetic tokens (with a warning) when `path` is None."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 256,
        seq_len: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        text_field: str = "text",
        max_tokens: int | None = None,
        append_eos: bool = True,
        seed: int = 1234,
        num_workers: int = 0,
        synthetic_train_tokens: int = 131072,
        synthetic_val_tokens: int = 8192,
    ) -> None:
        super().__init__(vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size,
                         train_tokens=synthetic_train_tokens, val_tokens=synthetic_val_tokens, seed=seed,
                         num_workers=num_workers)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise HyperparameterError(f"data.val_fraction must be in [0, 1); got {val_fraction}.")
        self.files: list[Path] | None = None
        self.tokenizer: Any = None
        if path is None:
            rank_zero_warn("data=text_file without data.path: training on SYNTHETIC tokens (as data=synthetic). "
                           "Set data.path=<a .txt/.jsonl file or directory> to use your own text.")
            return
        # Everything that can be wrong with the paths fails here, while the run is being built.
        self.files = find_text_files(path)
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer)
            n = len(self.tokenizer)
            if n > vocab_size:
                raise HyperparameterError(
                    f"The tokenizer in {tokenizer!r} has {n} tokens but the model's vocab_size is {vocab_size}; "
                    f"token ids would overflow the embedding. Use the model's own tokenizer or raise model.vocab_size."
                )
        elif vocab_size < 256:
            raise HyperparameterError(
                f"data.tokenizer=null uses UTF-8 bytes as tokens (256 ids) but model.vocab_size is {vocab_size}."
            )
        elif vocab_size > 256:
            rank_zero_warn(f"data.tokenizer=null: UTF-8 bytes as tokens, 256 of the model's {vocab_size} ids. Set "
                           "data.tokenizer (or model.pretrained) to a local tokenizer directory for real tokens.")

    def token_vocab(self) -> tuple[int, str]:
        if self.tokenizer is not None:
            return len(self.tokenizer), f"the tokenizer of data.tokenizer ({len(self.tokenizer)} tokens)"
        if self.files is not None:
            return 256, "data.tokenizer=null (UTF-8 bytes: 256 token ids)"
        return super().token_vocab()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize_files(self) -> torch.Tensor:
        h = self.hparams
        eos = getattr(self.tokenizer, "eos_token_id", None) if h.append_eos else None
        ids: list[int] = []
        for text, ends_document in iter_documents(self.files, h.text_field):
            ids.extend(self.encode(text))
            if ends_document and eos is not None:
                ids.append(eos)
            if h.max_tokens and len(ids) >= h.max_tokens:
                del ids[h.max_tokens:]
                break
        return torch.tensor(ids, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.files is None:
            return super().setup(stage)
        h = self.hparams
        tokens = self.tokenize_files()
        windows = (len(tokens) - 1) // h.seq_len
        n_val = max(0, min(windows - 1, max(1, round(windows * h.val_fraction)))) if h.val_fraction > 0 else 0
        if windows - n_val < 1:
            raise HyperparameterError(
                f"data.path={h.path!r} gives {len(tokens)} tokens: too few for one window of seq_len={h.seq_len} "
                f"(plus {n_val} for validation). Add text or lower data.seq_len."
            )
        split = (windows - n_val) * h.seq_len
        self.train_set = TokenWindows(tokens[: split + 1], h.seq_len)
        self.val_set = TokenWindows(tokens[split:], h.seq_len)
        rank_zero_info(f"text_file: {len(tokens):,} tokens from {len(self.files)} file(s) -> "
                       f"{len(self.train_set)} train / {len(self.val_set)} val windows of {h.seq_len}.")
