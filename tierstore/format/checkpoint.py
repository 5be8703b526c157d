"""Streaming readers for checkpoints: safetensors (single file or sharded) and torch state dicts.

The build reads a table in row chunks, so peak memory is one chunk, not the checkpoint.
safetensors is parsed directly (8-byte header length, JSON header, raw data) and read
with ``os.pread`` into fresh chunk buffers: no mmap, so the address space stays bounded
too. Torch ``.pt``/``.bin`` files are opened with ``torch.load(weights_only=True,
mmap=True)``: tensors stay on disk and a chunk is paged in when sliced.

A safetensors header is checked whole before any row is read: each tensor's shape must fill
exactly its ``data_offsets`` inside the file, and no two tensors may share bytes, since the
reader seeks by offset and slices by shape: a header where the two disagree would otherwise
build rows out of a neighbouring tensor's bytes. Every defect is a ``CheckpointError``.

Rows are moved as raw bytes, so any whole-byte dtype reads the same way: float32/16, bf16,
F8_E4M3/E5M2, U8 (e.g. packed FP4) and F8_E8M0 (block scales, read beside their table).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import is_json_int, os_error, read_full
from .spec import DTYPES

__all__ = ["TensorMeta", "Checkpoint", "open_checkpoint", "READ_DTYPES"]

# safetensors dtype tag -> our dtype name
_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",  # UE8M0 block scales (a quantized table's companion, never a table)
    "U8": "uint8",  # raw bytes, e.g. packed FP4 values
}
# every dtype the readers can slice into rows: the store's dtypes plus scale-only ones
READ_DTYPES: dict[str, tuple[torch.dtype, int]] = {**DTYPES, "float8_e8m0fnu": (torch.float8_e8m0fnu, 1)}
# bytes per element of every safetensors dtype tag with a whole-byte size (sub-byte tags such as
# F4 are absent: their size check is skipped, and the build refuses them as unsupported)
_ST_ELEMENT_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own cap
TAKE_BATCH = 8192  # rows gathered between drops of the mapped pages (<= 8192 x 64 KiB mapped)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # our dtype name, or "unsupported:<tag>"
    file: Path
    offset: int = 0  # byte offset of the tensor's data (safetensors only)

    @property
    def element_size(self) -> int:
        return READ_DTYPES[self.dtype][1]


class Checkpoint:
    """A set of named tensors that can be read a block of rows at a time."""

    def __init__(self, tensors: dict[str, TensorMeta], torch_state: dict[str, torch.Tensor] | None = None):
        self.tensors = tensors
        self._torch_state = torch_state

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a 2-D tensor as a uint8 array (stop - start, row_bytes).

        ``out``: a flat contiguous uint8 array of at least that many bytes to read into (the
        build reuses its chunk buffers; a fresh buffer per chunk page-faults every chunk).
        """
        meta = self.tensors[name]
        row_bytes = meta.shape[1] * meta.element_size
        n = (stop - start) * row_bytes
        if self._torch_state is not None:
            t = self._torch_state[name][start:stop].contiguous()
            rows = t.view(torch.uint8).numpy().reshape(stop - start, row_bytes)
            if out is None:
                return rows
            out[:n] = rows.reshape(-1)
            return out[:n].reshape(stop - start, row_bytes)
        buf = np.empty(n, dtype=np.uint8) if out is None else out[:n]
        offset = meta.offset + start * row_bytes
        try:
            fd = os.open(meta.file, os.O_RDONLY)
        except OSError as e:
            raise os_error(e, f"opening {meta.file}") from e
        try:
            got = read_full(fd, memoryview(buf), offset, meta.file)
        except OSError as e:
            raise os_error(e, f"reading {name} from {meta.file}") from e
        finally:
            os.close(fd)
        if got != n:
            raise CheckpointError(
                f"{meta.file}: truncated: tensor {name!r} rows {start}:{stop} need {n} bytes, got {got}"
            )
        return buf.reshape(stop - start, row_bytes)

    def advise(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows ``start:stop`` now (``posix_fadvise(WILLNEED)``):
        the build hints the next chunk, so its read overlaps this one's conversion. Advisory:
        failures are ignored (the read itself reports them)."""
        meta = self.tensors[name]
        if self._torch_state is not None or not hasattr(os, "posix_fadvise"):
            return
        row_bytes = meta.shape[1] * meta.element_size
        try:
            fd = os.open(meta.file, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, meta.offset + start * row_bytes, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def take_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order) of a 2-D tensor as uint8 (len(rows), row_bytes).

        Reads through a read-only map of the file (safetensors), in ascending file order, so
        scattered rows cost page reads, not a copy of the tensor. Memory stays bounded by
        ``len(rows)``: the mapped pages are dropped from the process (``MADV_DONTNEED``; they
        stay in the page cache) every ``TAKE_BATCH`` rows, since each fault maps up to 16
        cached neighbours as well and a chunk of scattered rows would otherwise hold gigabytes
        of the checkpoint in the process's resident set.
        """
        meta = self.tensors[name]
        row_bytes = meta.shape[1] * meta.element_size
        if self._torch_state is not None:
            t = self._torch_state[name][torch.from_numpy(rows)].contiguous()
            return t.view(torch.uint8).numpy().reshape(len(rows), row_bytes)
        out = np.empty((len(rows), row_bytes), dtype=np.uint8)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")  # ascending file offsets
        size = meta.shape[0] * row_bytes
        base = meta.offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(meta.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), meta.offset - base + size, access=mmap.ACCESS_READ, offset=base)
        view = None
        try:
            view = np.frombuffer(mm, dtype=np.uint8, count=size, offset=meta.offset - base).reshape(-1, row_bytes)
            for i in range(0, len(rows), TAKE_BATCH):  # per batch of rows, not per row
                sel = order[i : i + TAKE_BATCH]
                out[sel] = view[rows[sel]]
                mm.madvise(mmap.MADV_DONTNEED)
        finally:
            del view  # the map cannot close while an array views it
            mm.close()
        return out

    def close(self) -> None:
        self._torch_state = None


class _DuplicateKey(Exception):
    """A JSON object names the same key twice (which copy is meant is ambiguous)."""


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _check_tensor_entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype tag, shape, begin, end) of one header entry, or CheckpointError saying what is wrong."""
    bad = f"{path}: tensor {name!r}"
    fix = "the checkpoint's header is corrupt; re-export or re-download it"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad}: header entry is a {type(entry).__name__}, expected an object "
                              f"with dtype, shape and data_offsets; {fix}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(f"{bad}: header entry lacks {', '.join(missing)}; {fix}")
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(tag, str):
        raise CheckpointError(f"{bad}: dtype {tag!r} is not a string; {fix}")
    if not (isinstance(shape, list) and all(is_json_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{bad}: shape {_short(shape)} is not a list of non-negative integers; {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_json_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad}: data_offsets {_short(offsets)} are not two integers "
                              f"0 <= begin <= end; {fix}")
    begin, end = offsets
    size = _ST_ELEMENT_SIZE.get(tag)
    if size is not None:
        span, need, want = end - begin, 0 if 0 in shape else size, ""
        for i, d in enumerate(shape):  # stop once past the span: a corrupt shape can hold huge numbers
            need *= d
            if need > span and i < len(shape) - 1:
                want = f"more than {span} bytes"
                break
        if need != span:
            want = want or f"{need} bytes"
            raise CheckpointError(f"{bad}: shape {_short(shape)} of {tag} ({size} bytes each) needs {want}, "
                                  f"but data_offsets [{begin}, {end}] span {span}; {fix}")
    return tag, tuple(shape), begin, end


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Parse and validate a safetensors header: every tensor's dtype, shape and byte range agree,
    lie inside the file and overlap no other tensor, so a read can never return another tensor's
    bytes or run past the end. Anything malformed raises ``CheckpointError``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {hlen} is implausible)")
            text = f.read(hlen)
            size = os.fstat(f.fileno()).st_size
        if len(text) != hlen:
            raise CheckpointError(f"{path}: truncated: the header needs {hlen} bytes after the length, "
                                  f"the file holds {len(text)}; re-download the checkpoint")
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: safetensors header names {e.args[0]!r} twice; "
                              "the header is corrupt, re-export or re-download the checkpoint") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long, too deep
        raise CheckpointError(f"{path}: safetensors header is not valid UTF-8 JSON ({type(e).__name__}: "
                              f"{str(e)[:200]}); re-export or re-download the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object "
                              "mapping tensor names to entries; re-export or re-download the checkpoint")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ {_short(meta)} is not an object of strings to strings; "
                              "re-export or re-download the checkpoint")
    data_start = 8 + hlen
    out: dict[str, TensorMeta] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tag, shape, begin, end = _check_tensor_entry(path, name, entry)
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at {data_start + end} > file size "
                                  f"{size}; re-download the checkpoint")
        if end > begin:
            ranges.append((begin, end, name))
        out[name] = TensorMeta(
            name=name,
            shape=shape,
            dtype=_ST_DTYPES.get(tag, f"unsupported:{tag}"),
            file=path,
            offset=data_start + begin,
        )
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} (bytes {b0}:{e0}) and {n1!r} (bytes {b1}:{e1}) overlap; "
                                  "the header is corrupt, re-export or re-download the checkpoint")
    return out


def _open_sharded(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except OSError as e:
        raise CheckpointError(f"cannot read sharded-checkpoint index {index_path}: {e.strerror or e}") from None
    except _DuplicateKey as e:  # json would keep the last copy: which shard holds the tensor is ambiguous
        raise CheckpointError(f"{index_path}: names {e.args[0]!r} twice; which entry is meant is ambiguous: "
                              "fix or re-download the index") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index: not valid UTF-8 JSON "
                              f"({str(e)[:200]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index: needs a \"weight_map\" object "
                              "mapping tensor names to shard file names")
    root = index_path.parent
    tensors: dict[str, TensorMeta] = {}
    for shard in sorted(set(weight_map.values())):
        rel = Path(shard)
        if not shard or rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name inside {root}; "
                                  "the weight_map may only name shards next to the index")
        if not (root / rel).is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} is missing from {root}; "
                                  "download every shard the weight_map names")
        metas = _read_safetensors_header(root / rel)
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
        dname = next((n for n, (td, _) in READ_DTYPES.items() if td == t.dtype), f"unsupported:{t.dtype}")
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
        if len(indexes) > 1:  # no silent pick: each may name other shards
            raise CheckpointError(f"{p} holds {len(indexes)} sharded-checkpoint indexes "
                                  f"({', '.join(i.name for i in indexes)}); pass the one to build from, "
                                  f"e.g. {indexes[0]}")
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
