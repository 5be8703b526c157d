"""End to end: prefill and decode tokens/s with Engram tables resident vs served by the store.

Same process, same prompts (held-out stdlib text), same sampling seed:

* resident: the tables are ``nn.Embedding`` weights in memory (the baseline);
* served, cold: a freshly opened store (device budget <= 1/10 of the tables, host budget
  <= 1/4, the rest on disk) with the store's files dropped from the page cache first;
* served, warm: the same store after serving a different queue of held-out prompts
  (caches filled by earlier traffic, not by these prompts).

Each served run must generate exactly the tokens the resident run does. The three
configurations run interleaved ``--repeats`` times and the best run of each is reported
(the machine is shared; best-of is the least noisy estimate of each one's speed).

Queued-request mode (``--queued L``, on by default with L = 4): the same queue served
twice by fresh stores, once with no announcements and once announcing, before each batch,
the prompts of the next L batches (``serve(announce=L)`` -> ``Store.hint``: the known
future of a request queue). Reported: the live device/host hit ratios of both runs next to
the simulator's prediction for the same events (each table's recorded lookups and hints,
``Table.events``, replayed through fresh tiers by ``tierstore.analysis.simulate.replay_events``).

    python -m benchmarks.bench_e2e [--ckpt runs/learn_engram] [--quick] [--device cuda]

``--device cuda`` runs the model and serves rows on the GPU (device tier in GPU memory, host
tier pinned, cold pages through kvikio when installed); the resident baseline runs there too.
Never run: needs CUDA (benchmarks/gpu_check.py runs it on the device machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import tierstore

from engram_model.checkpoint import load_checkpoint
from engram_model.generate import (
    build_store_for, open_served_model, prompt_batches, serve, table_bytes, tier_summary,
)

from .common import evict, json_line


def _train_small(out: Path, quick: bool) -> Path:
    """A checkpoint to serve when none is given (trained briefly: the access pattern comes
    from the real text's n-grams, not from how well the weights are trained)."""
    from engram_model.train import main as train_main

    args = ["--out", str(out), "--no-progress", "--eval-every", "1000", "--eval-windows", "4"]
    if quick:
        args += ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "600", "--n-layer", "2",
                 "--d-model", "32", "--n-head", "2", "--d-ff", "64", "--engram-heads", "2", "--engram-d-mem", "8",
                 "--data-max-bytes", "300000", "--tok-max-bytes", "300000", "--threads", "1"]
    else:
        args += ["--steps", "20"]
    train_main(args)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Engram LM tokens/s: resident tables vs store-served")
    ap.add_argument("--ckpt", default=None, help="checkpoint dir (default: runs/learn_engram if present, else train one)")
    ap.add_argument("--quick", action="store_true", help="tiny model and workload (for the test)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device-frac", type=float, default=0.1, help="device budget / table bytes (<= 0.1)")
    ap.add_argument("--host-frac", type=float, default=0.25, help="host budget / table bytes (<= 0.25)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the store uses its own)")
    ap.add_argument("--store-threads", type=int, default=2)
    ap.add_argument("--sync-below", type=int, default=tierstore.INLINE_BELOW,
                    help="look up requests of fewer ids in the caller's thread (0: always prefetch)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each is reported")
    ap.add_argument("--queued", type=int, default=4,
                    help="queued-request mode: announce the next L batches' prompts (0: skip the mode)")
    ap.add_argument("--device", default="cpu", help="where the model runs and rows are served: cpu or cuda[:N]")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.batch_size, args.prompt_len, args.max_new_tokens, args.repeats = 4, 2, 16, 8, 1
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else Path("runs/learn_engram")
        if args.quick or not (ckpt / "model.safetensors").exists():
            ckpt = _train_small(Path(tmp) / "ckpt", args.quick)
        store_path = build_store_for(ckpt, Path(tmp) / "store")
        tb = table_bytes(ckpt)
        dev_b, host_b = int(tb * args.device_frac), int(tb * args.host_frac)

        resident, tok, _ = load_checkpoint(ckpt)
        resident.to(args.device)
        queue = prompt_batches(tok, n_prompts=2 * args.prompts, batch_size=args.batch_size, prompt_len=args.prompt_len)
        warmup, batches = queue[: len(queue) // 2], queue[len(queue) // 2 :]  # different held-out text
        kw = dict(max_new_tokens=args.max_new_tokens, seed=0)
        files = [p for p in store_path.rglob("*") if p.is_file()]
        serve(resident, warmup[:1], **kw)  # warm-up: allocator, thread pool
        res_runs, cold_runs, warm_runs = [], [], []
        cold_tiers: dict[str, float] = {}
        warm_tiers: dict[str, float] = {}
        open_s = 0.0
        for _ in range(args.repeats):  # interleaved, so machine noise hits every configuration alike
            res_runs.append(serve(resident, batches, **kw))
            evict(*files)
            t_open = time.perf_counter()
            served, _, store = open_served_model(ckpt, store_path, device_budget=dev_b, host_budget=host_b,
                                                 threads=args.store_threads, sync_below=args.sync_below,
                                                 device=args.device)
            open_s = time.perf_counter() - t_open
            with store:
                cold_runs.append(serve(served, batches, **kw))  # fresh caches, files not in page cache
                cold_tiers = tier_summary(store.stats())
                serve(served, warmup, **kw)  # earlier traffic fills the caches
                store.reset_stats()
                res_runs.append(serve(resident, batches, **kw))
                warm_runs.append(serve(served, batches, **kw))
                warm_tiers = tier_summary(store.stats())
        cold = max(cold_runs, key=lambda r: r.decode_tok_s)
        warm = max(warm_runs, key=lambda r: r.decode_tok_s)
        queued = _queued(ckpt, store_path, queue, kw, dev_b, host_b, args) if args.queued else {}

    same = all(torch.equal(a, b) for r in cold_runs + warm_runs for a, b in zip(res_runs[0].outputs, r.outputs))
    best_pre = max(r.prefill_tok_s for r in res_runs)
    best_dec = max(r.decode_tok_s for r in res_runs)
    out: dict[str, Any] = {
        "bench": "e2e",
        "device": args.device,
        "quick": args.quick,
        "threads": args.threads,
        "table_bytes": tb,
        "device_budget": dev_b,
        "host_budget": host_b,
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.max_new_tokens,
        "store_open_seconds": open_s,
        "resident_prefill_tok_s": best_pre,
        "resident_decode_tok_s": best_dec,
        "repeats": args.repeats,
        "sync_below": args.sync_below,
        "resident_decode_tok_s_runs": [r.decode_tok_s for r in res_runs],
        "cold_decode_tok_s_runs": [r.decode_tok_s for r in cold_runs],
        "warm_decode_tok_s_runs": [r.decode_tok_s for r in warm_runs],
        "cold_prefill_tok_s": cold.prefill_tok_s,
        "cold_decode_tok_s": cold.decode_tok_s,
        "warm_prefill_tok_s": warm.prefill_tok_s,
        "warm_decode_tok_s": warm.decode_tok_s,
        "cold_prefill_ratio": cold.prefill_tok_s / best_pre,
        "cold_decode_ratio": cold.decode_tok_s / best_dec,
        "warm_prefill_ratio": warm.prefill_tok_s / best_pre,
        "warm_decode_ratio": warm.decode_tok_s / best_dec,
        "cold_tiers": cold_tiers,
        "warm_tiers": warm_tiers,
        "identical_tokens": same,
        "queued": queued,
    }
    print(f"e2e: tables {tb / 2**20:.1f} MiB, device budget {dev_b / 2**20:.2f} MiB, host budget "
          f"{host_b / 2**20:.2f} MiB; {args.prompts} prompts x {args.prompt_len} tokens + {args.max_new_tokens} new, "
          f"batch {args.batch_size}, torch threads {args.threads}")
    print(f"  resident     : prefill {best_pre:9,.0f} tok/s  decode {best_dec:8,.0f} tok/s")
    for name, r, t in (("served cold", cold, cold_tiers), ("served warm", warm, warm_tiers)):
        print(f"  {name}  : prefill {r.prefill_tok_s:9,.0f} tok/s ({r.prefill_tok_s / best_pre:.3f}x)  decode "
              f"{r.decode_tok_s:8,.0f} tok/s ({r.decode_tok_s / best_dec:.3f}x)  device hit {t['device_hit_ratio']:.1%}, "
              f"host hit {t['host_hit_ratio']:.1%}, disk rows {t['disk_rows_read']:,.0f}, "
              f"stall {t['stall_seconds'] * 1e3:.0f} ms")
    for L, q in ((k, v) for k, v in queued.items() if k != "identical_tokens"):
        print(f"  queue, announce {L:>2} batches ahead: device hit {q['device_hit_ratio']:.4f} (simulator "
              f"{q['sim_device_hit_ratio']:.4f}), host hit {q['host_hit_ratio']:.4f} (simulator "
              f"{q['sim_host_hit_ratio']:.4f}), {'agree' if q['agree'] else 'DIFFER'}, decode "
              f"{q['decode_tok_s']:,.0f} tok/s")
    print(f"  identical tokens to resident: {same}")
    json_line(out)
    return out


def _queued(ckpt: Path, store_path: Path, batches, kw: dict, dev_b: int, host_b: int, args) -> dict:
    """Serve the whole queue (both halves: more batches for announcements to reach) with no
    announcements and with the next ``args.queued`` batches announced; each run's live hit
    ratios next to the simulator's replay of its recorded events."""

    from tierstore.cache import CacheIndex
    from tierstore.format.profile import load_profile
    from tierstore.analysis.simulate import replay_events

    out: dict = {}
    runs = []
    for L in (0, args.queued):
        served, _, store = open_served_model(ckpt, store_path, device_budget=dev_b, host_budget=host_b,
                                             threads=args.store_threads, sync_below=args.sync_below,
                                             device=args.device)
        with store:
            for t in store._tables.values():
                t.events = []
            r = serve(served, batches, announce=L, **kw)
            runs.append(r)
            live = tier_summary(store.stats())
            sim = {"device": [0, 0], "host": [0, 0]}
            for name, t in store._tables.items():
                prof = load_profile(store.path, name)

                def fresh(tier):
                    return None if tier.index is None else CacheIndex(t.info.rows, tier.capacity, store.policy,
                                                                      profile=prof)

                dev, host = fresh(t.dev), fresh(t.host)
                replay_events(dev, t.events, host=host, host_resident=t.host.resident)
                for k, idx in (("device", dev), ("host", host)):
                    if idx is not None:
                        sim[k][0] += idx.hits
                        sim[k][1] += idx.misses
        out[L] = {"device_hit_ratio": live["device_hit_ratio"], "host_hit_ratio": live["host_hit_ratio"],
                  "sim_device_hit_ratio": sim["device"][0] / max(1, sum(sim["device"])),
                  "sim_host_hit_ratio": sim["host"][0] / max(1, sum(sim["host"])),
                  "decode_tok_s": r.decode_tok_s, "prefill_tok_s": r.prefill_tok_s,
                  "agree": [int(live["device_hits"]), int(live["device_misses"]), int(live["host_hits"]),
                            int(live["host_misses"])] == [*sim["device"], *sim["host"]]}
    resident, _, _ = load_checkpoint(ckpt)
    ref = serve(resident.to(args.device), batches, **kw)
    out["identical_tokens"] = all(torch.equal(a, b) for r in runs for a, b in zip(ref.outputs, r.outputs))
    return out


if __name__ == "__main__":
    main()
