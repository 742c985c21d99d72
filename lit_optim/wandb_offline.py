"""Read an offline W&B run (``run-<id>.wandb``) without a server: history, config, metric definitions, summary.

wandb no longer ships a Python reader for its transaction log, and ``wandb.Api()`` needs a server, so checking what
an offline run recorded (in tests, or before ``wandb sync``) means reading the file itself. Its layout:

- a 7-byte file header: the ident ``:W&B``, a little-endian ``uint16`` magic ``0xBEE1`` and a ``uint8`` version (0);
- then a LevelDB-style log in 32 KiB blocks (the first block includes the file header). Each physical record has a
  7-byte header -- CRC-32 (``uint32`` LE, over the type byte followed by the payload), payload length (``uint16``
  LE) and type (1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST) -- and a record never straddles a block: fewer than 7 bytes left
  in a block are zero padding. FIRST/MIDDLE*/LAST fragments join into one payload;
- each payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

    >>> run = OfflineRun.find("outputs/.../wandb")            # doctest: +SKIP
    >>> run.history_value("optim_state/bytes")                 # doctest: +SKIP

Only ``wandb.proto`` (protobuf) is needed, and only when records are decoded.

It ships in the package, not only in the tests, because users need it too: an offline run on a machine with no
network (the GPU nodes this suite targets) can be checked before ``wandb sync``; the README shows how.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptLogError(ValueError):
    """The file is not a W&B transaction log, or a record's checksum or framing is wrong."""


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The logical records' payloads (fragments joined), checksums verified."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise CorruptLogError(f"{path}: too short for a W&B log header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != IDENT or magic != MAGIC or version != VERSION:
        raise CorruptLogError(f"{path}: not a W&B log (header {ident!r}, magic {magic:#x}, version {version})")
    pos, pending = FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + RECORD_HEADER.size > len(data):
            break
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated or trailing zeros
            break
        start = pos + RECORD_HEADER.size
        if length > left_in_block - RECORD_HEADER.size or start + length > len(data):
            raise CorruptLogError(f"{path}: record at byte {pos} runs past its block or the file")
        payload = data[start:start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise CorruptLogError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = start + length
        if kind == FULL:
            if pending is not None:
                raise CorruptLogError(f"{path}: FULL record inside a fragmented one at byte {pos}")
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            pending += payload
            yield bytes(pending)
            pending = None
        else:
            raise CorruptLogError(f"{path}: unexpected record type {kind} at byte {pos}")


def iter_records(path: str | Path):
    """Each record decoded as a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _assign(out: dict[str, Any], item) -> None:
    """Store one history/config/summary item; a nested key (``a``, ``b``) becomes ``out["a"]["b"]``."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        out = out.setdefault(part, {})
    out[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What one offline run recorded, decoded from its ``.wandb`` file."""

    path: Path
    run_id: str = ""
    name: str = ""  # the run's display name
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged row
    config: dict[str, Any] = field(default_factory=dict)  # merged config updates (values JSON-decoded)
    summary: dict[str, Any] = field(default_factory=dict)  # merged summary updates, if any were written
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric records
    record_types: dict[str, int] = field(default_factory=dict)  # record kind -> count

    @classmethod
    def read(cls, path: str | Path) -> OfflineRun:
        run = cls(Path(path))
        for record in iter_records(path):
            kind = record.WhichOneof("record_type") or "none"
            run.record_types[kind] = run.record_types.get(kind, 0) + 1
            if kind == "run":
                run.run_id = record.run.run_id
                run.name = record.run.display_name
                for item in record.run.config.update:
                    _assign(run.config, item)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _assign(row, item)
                run.history.append(row)
            elif kind == "config":
                for item in record.config.update:
                    _assign(run.config, item)
            elif kind == "summary":
                for item in record.summary.update:
                    _assign(run.summary, item)
            elif kind == "metric":
                m = record.metric
                run.metrics.append({
                    "name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric,
                    "summary": [k for k in ("min", "max", "mean", "best", "last", "none", "copy", "first")
                                if getattr(m.summary, k, False)],
                })
        return run

    @classmethod
    def find(cls, directory: str | Path) -> OfflineRun:
        """The newest ``run-*.wandb`` under `directory` (searched recursively)."""
        files = sorted(Path(directory).rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file under {directory}")
        return cls.read(files[-1])

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"

    def history_values(self, key: str) -> list[Any]:
        """Every logged value of `key`, in order."""
        return [row[key] for row in self.history if key in row]

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def metric_summary(self, name_or_glob: str) -> list[str]:
        """The summaries requested with ``define_metric`` for a metric name or glob."""
        for m in self.metrics:
            if name_or_glob in (m["name"], m["glob_name"]):
                return m["summary"]
        return []

    def table(self, key: str) -> dict[str, Any]:
        """The last W&B Table logged under `key`, loaded from the run's files (``columns`` and ``data``)."""
        refs = [v for v in self.history_values(key) if isinstance(v, dict) and v.get("_type") == "table-file"]
        if not refs:
            raise KeyError(f"no table logged under {key!r}")
        return json.loads((self.files_dir / refs[-1]["path"]).read_text())
