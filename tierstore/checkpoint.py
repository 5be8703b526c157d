"""Streaming readers for checkpoints: safetensors (single file or sharded) and torch state dicts.

The build reads a table in row chunks, so peak memory is one chunk, not the checkpoint.
safetensors is parsed directly (8-byte header length, JSON header, raw data) and read
with ``os.pread`` into fresh chunk buffers: no mmap, so the address space stays bounded
too. Torch ``.pt``/``.bin`` files are opened with ``torch.load(weights_only=True,
mmap=True)``: tensors stay on disk and a chunk is paged in when sliced.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, StoreIOError
from .format import DTYPES

__all__ = ["TensorMeta", "Checkpoint", "open_checkpoint"]

# safetensors dtype tag -> our dtype name
_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own cap


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # our dtype name, or "unsupported:<tag>"
    file: Path
    offset: int = 0  # byte offset of the tensor's data (safetensors only)

    @property
    def element_size(self) -> int:
        return DTYPES[self.dtype][1]


class Checkpoint:
    """A set of named tensors that can be read a block of rows at a time."""

    def __init__(self, tensors: dict[str, TensorMeta], torch_state: dict[str, torch.Tensor] | None = None):
        self.tensors = tensors
        self._torch_state = torch_state

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a 2-D tensor as a uint8 array (stop - start, row_bytes)."""
        meta = self.tensors[name]
        row_bytes = meta.shape[1] * meta.element_size
        if self._torch_state is not None:
            t = self._torch_state[name][start:stop].contiguous()
            return t.view(torch.uint8).numpy().reshape(stop - start, row_bytes)
        n = (stop - start) * row_bytes
        buf = np.empty(n, dtype=np.uint8)
        fd = os.open(meta.file, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(buf)], meta.offset + start * row_bytes)
        except OSError as e:
            raise StoreIOError(e.errno, f"reading {name} from {meta.file}: {e.strerror}") from e
        finally:
            os.close(fd)
        if got != n:
            raise CheckpointError(
                f"{meta.file}: truncated: tensor {name!r} rows {start}:{stop} need {n} bytes, got {got}"
            )
        return buf.reshape(stop - start, row_bytes)

    def take_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order) of a 2-D tensor as uint8 (len(rows), row_bytes).

        Reads through a read-only map of the file (safetensors) so scattered rows cost page
        reads, not a copy of the tensor; memory stays bounded by ``len(rows)``.
        """
        meta = self.tensors[name]
        row_bytes = meta.shape[1] * meta.element_size
        if self._torch_state is not None:
            t = self._torch_state[name][torch.from_numpy(rows)].contiguous()
            return t.view(torch.uint8).numpy().reshape(len(rows), row_bytes)
        mm = np.memmap(meta.file, dtype=np.uint8, mode="r", offset=meta.offset, shape=(meta.shape[0], row_bytes))
        try:
            order = np.argsort(rows, kind="stable")  # ascending file offsets
            out = np.empty((len(rows), row_bytes), dtype=np.uint8)
            out[order] = mm[rows[order]]
            return out
        finally:
            del mm

    def close(self) -> None:
        self._torch_state = None


def _read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {hlen} is implausible)")
            header = json.loads(f.read(hlen))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    size = path.stat().st_size
    data_start = 8 + hlen
    out: dict[str, TensorMeta] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at {data_start + end} > file size {size}")
        tag = entry["dtype"]
        out[name] = TensorMeta(
            name=name,
            shape=tuple(int(s) for s in entry["shape"]),
            dtype=_ST_DTYPES.get(tag, f"unsupported:{tag}"),
            file=path,
            offset=data_start + begin,
        )
    return out


def _open_sharded(index_path: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index with a weight_map ({e})") from None
    tensors: dict[str, TensorMeta] = {}
    for shard in sorted(set(weight_map.values())):
        metas = _read_safetensors_header(index_path.parent / shard)
        for name, meta in metas.items():
            if weight_map.get(name) == shard:
                tensors[name] = meta
    missing = set(weight_map) - set(tensors)
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but absent from their shards: {sorted(missing)[:5]}")
    return Checkpoint(tensors)


def _open_torch(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) torch files cannot be memory-mapped; they load whole.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for foreign files
            raise CheckpointError(f"{path}: cannot load as a torch state dict with weights_only=True ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load as a torch state dict with weights_only=True ({e})") from None
    for key in ("state_dict", "model"):  # common wrappers around the state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    tensors = {}
    for name, t in state.items():
        dname = next((n for n, (td, _) in DTYPES.items() if td == t.dtype), f"unsupported:{t.dtype}")
        tensors[name] = TensorMeta(name=name, shape=tuple(t.shape), dtype=dname, file=path)
    return Checkpoint(tensors, torch_state=state)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint: a ``.safetensors`` file, a sharded index JSON, a directory holding
    either, or a torch ``.pt``/``.bin``/``.pth`` state dict (loaded with ``weights_only=True``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        singles = sorted(p.glob("*.safetensors"))
        torches = sorted([*p.glob("*.pt"), *p.glob("*.bin"), *p.glob("*.pth")])
        if indexes:
            return _open_sharded(indexes[0])
        if len(singles) == 1:
            return Checkpoint(_read_safetensors_header(singles[0]))
        if len(singles) > 1:
            raise CheckpointError(
                f"{p} holds {len(singles)} .safetensors files but no *.safetensors.index.json; pass one file"
            )
        if len(torches) == 1:
            return _open_torch(torches[0])
        raise CheckpointError(f"{p} holds no .safetensors, index JSON or single .pt/.bin checkpoint")
    if p.name.endswith(".index.json"):
        return _open_sharded(p)
    if p.suffix == ".safetensors":
        return Checkpoint(_read_safetensors_header(p))
    if p.suffix in (".pt", ".bin", ".pth"):
        return _open_torch(p)
    raise CheckpointError(f"{p}: unknown checkpoint type; expected .safetensors, .index.json, .pt, .bin or .pth")
