"""Offline analysis: row-access traces, their replay through the cache policies, the
offline optimum and tier sizing (``tierstore profile`` and ``tierstore size``).

- ``simulate``: traces (save, load) and exact replay through the compiled cache walk;
- ``stack_distance``: LRU hit counts at every capacity from one pass;
- ``belady``: the offline optimum (Belady's MIN with bypass);
- ``hit_ratios``: the policies' hit ratios on a trace's tables, two tiers, a live store
  beside the simulation;
- ``sizing``: the smallest device and host tiers that reach target hit ratios;
- ``plots``: every figure (matplotlib, the ``plot`` extra, imported on first use).

Builds on the format and the cache layer; the serving runtime never imports it, and it
never imports the serving runtime (a live replay is handed the store to use).
"""
