"""Where bench_big_table's served rows come from: the V4.1-shaped model and its row sources.

* the store (attached by the model itself, ``EngramLM.attach_store``);
* :class:`MmapRows`: memory maps of the checkpoint's tensors, dequantized per lookup (how a
  server that maps its tables reads them);
* :class:`RamRows`: the whole table loaded into RAM first, rows by ``index_select`` (how the
  serving engines hold Engram tables today);
* :class:`ZeroRows`: zeros at once (the dense model's own speed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import v41_checkpoint as v41

__all__ = ["DENSE_KEY", "v41_parts", "load_model", "MmapRows", "RamRows", "ZeroRows", "attach"]

DENSE_KEY = "tierstore_dense_model"  # config.json key: the backbone's sizes (its weights are in shard 1)


def v41_parts(ckpt: Path) -> tuple[Any, Any]:
    """(V41EngramConfig, CompressionMap) of a checkpoint directory (config.json, tokenizer.json)."""
    from engram_model.compression import build_compression
    from engram_model.deepseek_v41 import V41EngramConfig
    from engram_model.tokenizer import load_tokenizer

    return V41EngramConfig.from_json(ckpt), build_compression(load_tokenizer(ckpt / "tokenizer.json"))


def load_model(ckpt: Path) -> Any:
    """The V4.1-shaped model (``engram_model.deepseek_v41.v41_model``: V4.1's hashing from
    config.json, checked against ``engram_num_embeddings``) with the dense weights of the
    checkpoint's first shard; tables not attached."""
    from safetensors.torch import load_file

    from engram_model.deepseek_v41 import v41_model

    cfg, cmap = v41_parts(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    model = v41_model(cfg, cmap, **json.loads((ckpt / "config.json").read_text())[DENSE_KEY])
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / index["tok_emb.weight"])), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"dense weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.requires_grad_(False)  # no autograd graph, without switching grad off for the whole process
    return model.eval()


class MmapRows:
    """The mmap baseline: one layer's rows read through memory maps of the checkpoint's embed and
    scale tensors (numpy.memmap at their safetensors offsets) and dequantized per lookup here.

    advice: ``mmap.MADV_RANDOM`` (one 4 KiB page per fault) or None (the kernel's default
    readahead). Lookups run in the caller's thread when the layer asks for them (no prefetch):
    how a server that memory-maps its tables reads them.
    """

    def __init__(self, t: v41.EngramTensors, advice: int | None):
        self.rows, self.dim = t.rows, v41.HEAD_DIM
        n_sc = v41.HEAD_DIM // v41.SCALE_BLOCK
        self.w = np.memmap(t.weight_file, dtype=np.uint8, mode="r", offset=t.weight_offset, shape=(t.rows, v41.HEAD_DIM))
        self.s = np.memmap(t.scale_file, dtype=np.uint8, mode="r", offset=t.scale_offset, shape=(t.rows, n_sc))
        if advice is not None:
            for mm in (self.w, self.s):
                mm._mmap.madvise(advice)  # type: ignore[attr-defined]
        self.looked_up = 0

    def fetch(self, packed_ids: Any) -> Any:
        from engram_model.memory import _Deferred

        return _Deferred(lambda: self.lookup(packed_ids))

    def announce(self, packed_ids: Any) -> None:
        """Nothing to do: the page cache hears of a row when it is read."""

    def lookup(self, packed_ids: Any) -> Any:
        """bf16 rows (..., 256): codes and scales gathered from the maps (page faults here), then
        value x 2^(e - 127), exact in bf16 (torch multiplies bf16 in float32 and rounds once)."""
        import torch

        ids = packed_ids.reshape(-1)
        n = len(ids)
        codes, scales = self.gather(ids)  # (n, 256), (n, 8) uint8
        vals = codes.view(torch.float8_e4m3fn).to(torch.bfloat16).view(n, -1, v41.SCALE_BLOCK)
        out = vals * scales.view(torch.float8_e8m0fnu).to(torch.bfloat16).unsqueeze(-1)
        self.looked_up += n
        return out.view(*packed_ids.shape, v41.HEAD_DIM)

    def gather(self, ids: Any) -> tuple[Any, Any]:
        """(codes, scales) of ``ids`` (int64 tensor) as uint8 tensors: page faults here."""
        import torch

        ids = ids.numpy()
        return torch.from_numpy(np.take(self.w, ids, axis=0)), torch.from_numpy(np.take(self.s, ids, axis=0))

    def close(self) -> None:
        for mm in (self.w, self.s):
            mm._mmap.close()  # type: ignore[attr-defined]
        del self.w, self.s


class RamRows(MmapRows):
    """The engines' approach (vLLM, SGLang): the whole table in RAM, loaded from the checkpoint
    before serving (the load is counted as open), rows gathered with ``index_select``. Loaded
    with plain reads in 256 MiB chunks, each dropped from the page cache once copied, so the
    machine holds one copy of the table, not two."""

    def __init__(self, t: v41.EngramTensors):  # not MmapRows.__init__: that maps, this loads
        import torch

        self.rows, self.dim, self.looked_up = t.rows, v41.HEAD_DIM, 0
        n_sc = v41.HEAD_DIM // v41.SCALE_BLOCK
        self.w = torch.from_numpy(self._load(t.weight_file, t.weight_offset, t.rows * v41.HEAD_DIM)).view(t.rows, -1)
        self.s = torch.from_numpy(self._load(t.scale_file, t.scale_offset, t.rows * n_sc)).view(t.rows, -1)

    @staticmethod
    def _load(path: Path, offset: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, dtype=np.uint8)
        step = 256 << 20
        with open(path, "rb", buffering=0) as f:
            for pos in range(0, nbytes, step):
                view = memoryview(out[pos:pos + step])
                got = 0
                while got < len(view):
                    n = os.preadv(f.fileno(), [view[got:]], offset + pos + got)
                    if n <= 0:
                        raise OSError(f"{path}: short read at {offset + pos + got}")
                    got += n
                os.posix_fadvise(f.fileno(), offset + pos, len(view), os.POSIX_FADV_DONTNEED)
        return out

    def gather(self, ids: Any) -> tuple[Any, Any]:
        return self.w.index_select(0, ids), self.s.index_select(0, ids)

    def close(self) -> None:
        del self.w, self.s


class ZeroRows:
    """The compute floor: every lookup answers zeros at once (no I/O, no copy of real rows).
    Tokens/s with it is what the dense model allows; the rest of a step is fetching rows."""

    def __init__(self, rows: int):
        self.rows, self.dim, self.looked_up = rows, v41.HEAD_DIM, 0

    def fetch(self, packed_ids: Any) -> Any:
        import torch

        from engram_model.memory import _Deferred

        self.looked_up += packed_ids.numel()
        return _Deferred(lambda: torch.zeros(*packed_ids.shape, v41.HEAD_DIM, dtype=torch.bfloat16))

    def announce(self, packed_ids: Any) -> None:
        pass


def attach(model: Any, sources: dict[int, Any]) -> None:
    """Serve block L's Engram rows from ``sources[L]`` (a store table or an mmap source)."""
    for blk in model.engram_blocks():
        del blk.engram.memory
        blk.engram.memory = sources[blk.index]
