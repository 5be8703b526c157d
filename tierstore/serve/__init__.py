"""The serving runtime: a store open for lookups.

- ``store``: ``tierstore.open`` and ``Store`` (lookup, prefetch, hint, stats);
- ``table``: one table served through its tiers (device cache -> host cache -> disk);
- ``prefetcher``: the worker pool and the futures ``prefetch`` returns;
- ``buffers``: pooled output tensors;
- ``distributed``: tables sharded across the ranks of a ``torch.distributed`` group.

Builds on the format, the cache layer and the tiers; nothing below imports it.
"""
