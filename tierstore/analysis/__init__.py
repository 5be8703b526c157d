"""Offline analysis: row-access traces, their replay through the cache policies, the
offline optimum and tier sizing (``tierstore profile`` and ``tierstore size``).

- ``simulate``: traces (save, load) and exact replay through the compiled cache walk;
- ``stack_distance``: LRU hit counts at every capacity from one pass;
- ``belady``: the offline optimum (Belady's MIN with bypass).

Builds on the format and the cache layer; the serving runtime never imports it.
"""
