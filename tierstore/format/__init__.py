"""The on-disk format and everything that writes or checks it (docs/format.md).

- ``spec``: the format itself (version 3): the manifest, the row files' pages, page
  checksums, the header page and the build id every file carries;
- ``order``: the row-order file of a hotness-ordered table, and its checksum;
- ``quant``: block-scaled fp8/fp4 rows (DeepSeek-V4.1's Engram tables): layout and dequantization;
- ``checkpoint``: streaming readers of trained checkpoints (safetensors, torch);
- ``build``: checkpoint -> store, in bounded memory, committed atomically;
- ``recovery``: publishing a finished build and putting right what a killed one left;
- ``verify``: recompute every checksum;
- ``profile``: saved per-row access counts, kept in the store for placement.

Below it sit only the foundation modules (``tierstore.errors``, ``files``, ``faults``,
``sizes``, ``ids``); the cache, the tiers and the runtime build on it.
"""
