"""Serve a trained Engram LM with its tables in a tierstore store, and generate text.

    python -m engram_model.generate --ckpt runs/engram --store runs/engram.store \\
        --device-frac 0.1 --host-frac 0.25 --prompts 8 --max-new-tokens 48 --compare-resident

The store is built from the checkpoint if missing (``tierstore.build_store``, with
config.json and tokenizer.json attached). The dense weights come from the checkpoint
(the tables are not even read from it); every Engram table is served by the store under
device and host budgets smaller than the tables, the rest stays cold on disk.

Prefetch: each forward pass hashes its ids for every Engram layer and starts all row
fetches before block 0 runs (``EngramLM.prepare``); the Engram block waits only on its
own future. Prompts are served in batches from a queue, so while batch i prefills and
decodes, batch i+1's prefill rows are already being fetched. A decode step's ids are
known only after sampling, so its fetch overlaps only the blocks before the first
Engram layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

import tierstore
from tierstore import evict_page_cache, has_profile
from engram_model.checkpoint import load_checkpoint, read_config
from engram_model.data import encode_files, split_files
from engram_model.errors import EngramConfigError
from engram_model.model import EngramLM, EngramPlan, InferenceCache
from engram_model.tokenizer import stdlib_text_files

__all__ = ["ServeTimes", "build_store_for", "open_served_model", "served_model", "serve", "serve_steps", "serve_rounds", "round_ratios", "prompt_batches", "drop_page_cache", "main"]


@dataclass
class ServeTimes:
    """Wall time spent in prefill and decode, and the tokens each produced."""

    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)  # generated ids per batch (B, new)
    last_logits: list[torch.Tensor] = field(default_factory=list)  # final-step logits per batch
    batch_seconds: list[tuple[float, float]] = field(default_factory=list)  # (prefill, decode) per batch

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)


def build_store_for(ckpt: str | Path, store: str | Path, *, force: bool = False, progress: bool = False) -> Path:
    """Build the store of a checkpoint's Engram tables (config and tokenizer attached)."""
    ckpt = Path(ckpt)
    return tierstore.build_store(ckpt / "model.safetensors", store, force=force, progress=progress,
                                 attach=[ckpt / "config.json", ckpt / "tokenizer.json"])


def open_served_model(
    ckpt: str | Path, store_path: str | Path, *, device_budget: int | str = 0, host_budget: int | str = 0,
    policy: str = "default", threads: int = 4, sync_below: int | None = None, use_profile: bool = True,
    device: str = "cpu",
) -> tuple[EngramLM, Tokenizer, tierstore.Store]:
    """The checkpoint's model (dense weights only) with its tables served by the store
    (placed by the store's saved profile unless ``use_profile`` is False). ``device``: where
    the model runs and the store returns rows ("cuda": device tier in GPU memory, host tier
    pinned; never run, needs CUDA)."""
    store = tierstore.open(store_path, device=device, device_budget=device_budget, host_budget=host_budget,
                           policy=policy, threads=threads, use_profile=use_profile)
    try:
        model, tok = served_model(ckpt, store, sync_below=sync_below)
    except BaseException:
        store.close()
        raise
    return model, tok, store


def served_model(ckpt: str | Path, store: tierstore.RowStore, *,
                 sync_below: int | None = None) -> tuple[EngramLM, Tokenizer]:
    """The checkpoint's model (dense weights only) on ``store.device``, its tables served by
    ``store``: any ``tierstore.RowStore`` (``tierstore.open`` or, on every rank of a group,
    ``tierstore.open_sharded``). The caller keeps the store and closes it."""
    model, tok, _ = load_checkpoint(ckpt, tables=False)
    model.to(store.device)
    model.attach_store(store, sync_below=sync_below)
    return model, tok


def table_bytes(ckpt: str | Path) -> int:
    """Bytes of all Engram tables of a checkpoint (from config.json; float32 rows)."""
    meta = read_config(ckpt)
    return sum(rows * dim * 4 for rows, dim in meta.get("tables", {}).values())


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Drop the files' cached pages for cold-start measurements (through tierstore's one
    eviction, which flushes dirty pages first: ``POSIX_FADV_DONTNEED`` skips them)."""
    for p in paths:
        evict_page_cache(p)


def prompt_batches(tok: Tokenizer, *, n_prompts: int, batch_size: int, prompt_len: int,
                   files: Sequence[Path] | None = None) -> list[torch.Tensor]:
    """Held-out real text (the validation files of the default split) cut into equal prompts."""
    files = list(files) if files is not None else split_files(stdlib_text_files())[1]
    ids = torch.from_numpy(encode_files(tok, files, max_bytes=4 << 20).astype("int64"))
    need = n_prompts * prompt_len
    if len(ids) < need:
        raise EngramConfigError(f"only {len(ids)} prompt tokens in the text, need {need}")
    stride = (len(ids) - prompt_len) // max(1, n_prompts)
    prompts = torch.stack([ids[i * stride : i * stride + prompt_len] for i in range(n_prompts)])
    return list(prompts.split(batch_size))


def _sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _wait_for(device: torch.device) -> None:
    """On CUDA, let the queued kernels finish before a clock is read (the current stream only)."""
    if device.type == "cuda":  # never run: needs CUDA
        torch.cuda.current_stream(device).synchronize()


@torch.no_grad()
def serve_steps(
    model: EngramLM, batches: Sequence[torch.Tensor], *, max_new_tokens: int, temperature: float = 0.8,
    top_k: int = 50, seed: int = 0, prefetch_next: bool = True, announce: int = 0, next_at: str = "start",
) -> Iterator[ServeTimes]:
    """:func:`serve` one batch at a time: yields its (growing) ServeTimes after each batch, so
    two models can be timed round by round under the same load (:func:`serve_rounds`)."""
    if next_at not in ("start", "decode"):
        raise EngramConfigError(f"next_at={next_at!r}: choose 'start' (batch i+1's fetch starts with batch i) or "
                                "'decode' (after batch i's prefill)")
    model.eval()
    device = model.tok_emb.weight.device  # prompts, sampling and caches follow the model
    batches = [b.to(device) for b in batches]
    gen = torch.Generator(device=device).manual_seed(seed)
    times = ServeTimes()
    plan: EngramPlan | None = model.prepare(batches[0]) if prefetch_next and batches else None
    for i, idx in enumerate(batches):
        B, P = idx.shape
        if announce:  # the queue's window is batches i+1 .. i+announce: announce what entered it
            for j in range(i + 1 if i == 0 else i + announce, min(i + announce, len(batches) - 1) + 1):
                model.announce(batches[j])
        if P + max_new_tokens > model.cfg.max_seq_len:
            raise EngramConfigError(f"prompt {P} + {max_new_tokens} new tokens exceeds max_seq_len {model.cfg.max_seq_len}")
        t0 = time.perf_counter()
        cur = plan if plan is not None else model.prepare(idx)
        plan = None
        if prefetch_next and i + 1 < len(batches) and next_at == "start":
            plan = model.prepare(batches[i + 1])
        cache = InferenceCache(model, B)
        logits, _ = model(idx, plan=cur, cache=cache)
        nxt = _sample(logits[:, -1], temperature, top_k, gen)
        _wait_for(device)
        t1 = time.perf_counter()
        if prefetch_next and i + 1 < len(batches) and next_at == "decode":
            plan = model.prepare(batches[i + 1])
        new = [nxt]
        for _ in range(max_new_tokens - 1):
            logits, _ = model(nxt[:, None], cache=cache)
            nxt = _sample(logits[:, -1], temperature, top_k, gen)
            new.append(nxt)
        _wait_for(device)
        t2 = time.perf_counter()
        times.prefill_seconds += t1 - t0
        times.prefill_tokens += B * P
        times.decode_seconds += t2 - t1
        times.decode_tokens += B * (max_new_tokens - 1)
        times.batch_seconds.append((t1 - t0, t2 - t1))
        times.outputs.append(torch.stack(new, 1))
        times.last_logits.append(logits[:, -1].clone())
        yield times


def serve(model: EngramLM, batches: Sequence[torch.Tensor], **kw: Any) -> ServeTimes:
    """Prefill and decode every batch of the queue; returns timings and the generated ids.

    prefetch_next: start batch i+1's row fetches before batch i computes (``next_at="start"``)
    or once its prefill is done (``"decode"``: the fetch overlaps batch i's decode steps only).
    announce: before serving batch i, announce the prompts of batches i+1 .. i+announce
    (``EngramLM.announce``: the queue's known future reaches the store's cache policy).
    """
    times = ServeTimes()
    for times in serve_steps(model, batches, **kw):
        pass
    return times


def serve_rounds(models: Sequence[EngramLM], batches: Sequence[torch.Tensor], **kw: Any) -> list[ServeTimes]:
    """Serve the same queue on every model, batch by batch in turn (round i: batch i on each
    model, the order reversed every other round), so that a load spike on a shared machine
    falls on all of them alike; one ServeTimes per model. A served model's prefetch of batch
    i+1 starts in its round i, as in :func:`serve`."""
    runs = [serve_steps(m, batches, **kw) for m in models]
    times = [ServeTimes() for _ in models]
    for r in range(len(batches)):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for k in order:
            times[k] = next(runs[k])
    return times


def round_ratios(served: ServeTimes, base: ServeTimes) -> dict[str, float]:
    """Medians over the rounds of served/base throughput (base seconds / served seconds), per
    phase: robust to a round that a load spike slowed."""
    pre = [b[0] / max(s[0], 1e-9) for s, b in zip(served.batch_seconds, base.batch_seconds)]
    dec = [b[1] / max(s[1], 1e-9) for s, b in zip(served.batch_seconds, base.batch_seconds)]
    return {"prefill_ratio_median": statistics.median(pre) if pre else 0.0,
            "decode_ratio_median": statistics.median(dec) if dec else 0.0}


def tier_summary(stats: dict[str, Any]) -> dict[str, float]:
    """Hit ratios per tier and disk rows read, from ``store.stats()``."""
    return {
        "device_hit_ratio": float(stats["device"].get("hit_ratio", 0.0)),
        "host_hit_ratio": float(stats["host"].get("hit_ratio", 0.0)),
        "device_hits": float(stats["device"].get("hits", 0)),
        "device_misses": float(stats["device"].get("misses", 0)),
        "host_hits": float(stats["host"].get("hits", 0)),
        "host_misses": float(stats["host"].get("misses", 0)),
        "disk_rows_read": float(stats["disk"].get("rows_read", 0)),
        "prefetch_hidden_fraction": float(stats.get("latency", {}).get("hidden_fraction", 0.0)),
        "stall_seconds": float(stats.get("latency", {}).get("stall_seconds", 0.0)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Generate with Engram tables served from tierstore")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (engram_model.train --out)")
    ap.add_argument("--store", default=None, help="store directory (default: CKPT.store; built if missing)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the store even if it exists")
    ap.add_argument("--device-budget", default=None, help="bytes (e.g. 1MiB); default --device-frac of the tables")
    ap.add_argument("--host-budget", default=None, help="bytes; default --host-frac of the tables")
    ap.add_argument("--device-frac", type=float, default=0.1)
    ap.add_argument("--host-frac", type=float, default=0.25)
    ap.add_argument("--policy", default="default")
    ap.add_argument("--prompt", default=None, help="one prompt text (default: held-out stdlib snippets)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts to serve")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; 1: small decode ops lose to OpenMP hand-offs with 2 on a shared 2-core VM")
    ap.add_argument("--compare-resident", action="store_true", help="also run with tables in memory")
    ap.add_argument("--no-profile", action="store_true", help="ignore the store's saved profile (no placement)")
    ap.add_argument("--drop-cache", action="store_true",
                    help="evict the store's files from the page cache first (a cold start)")
    ap.add_argument("--device", default="cpu", help="where the model runs and rows are served: cpu or cuda[:N]")
    ap.add_argument("--prefetch-next-at", choices=["start", "decode"], default="start",
                    help="when batch i+1's row fetches start: with batch i (start) or after its prefill (decode)")
    ap.add_argument("--sequential", action="store_true",
                    help="with --compare-resident: serve the whole queue on the store, then on the resident model "
                         "(default: round by round, batch i on each in turn, so both see the same machine load)")
    ap.add_argument("--sync-below", type=int, default=None,
                    help="lookups of fewer ids run in the model's thread when the layer needs them, the rest are "
                         "prefetched (overlapping the blocks before the Engram layer); default: the store's "
                         "INLINE_BELOW; 0: prefetch every lookup")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ckpt = Path(args.ckpt)
    store_path = Path(args.store) if args.store else ckpt.with_name(ckpt.name + ".store")
    if args.rebuild or not store_path.exists():
        t0 = time.perf_counter()
        build_store_for(ckpt, store_path, force=args.rebuild, progress=True)
        print(f"built store {store_path} in {time.perf_counter() - t0:.1f}s")
    tbytes = table_bytes(ckpt)
    dev_b = tierstore.parse_size(args.device_budget) if args.device_budget else int(tbytes * args.device_frac)
    host_b = tierstore.parse_size(args.host_budget) if args.host_budget else int(tbytes * args.host_frac)
    resident = None
    resident_load_s = 0.0
    if args.compare_resident:
        # The baseline is loaded first, and this process's first forward pass (torch's one-off
        # costs: allocator, kernels' first use) runs on it, on held-out text that is not served
        # below: otherwise whichever run goes first pays them (bench_e2e warms up the same way).
        # It reads only the checkpoint, never the store's files, so the store still starts cold.
        t0 = time.perf_counter()
        resident, tok, _ = load_checkpoint(ckpt)
        resident.to(args.device)
        resident_load_s = time.perf_counter() - t0
        spare = prompt_batches(tok, n_prompts=2 * args.prompts, batch_size=1, prompt_len=args.prompt_len)[1::2]
        serve(resident, [torch.cat(spare[: args.batch_size])], max_new_tokens=2, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.drop_cache:
        drop_page_cache([p for p in store_path.rglob("*") if p.is_file()])
    t0 = time.perf_counter()
    model, tok, store = open_served_model(ckpt, store_path, device_budget=dev_b, host_budget=host_b, policy=args.policy,
                                          use_profile=not args.no_profile, device=args.device,
                                          sync_below=args.sync_below)
    open_s = time.perf_counter() - t0
    with store:
        if args.prompt:
            batches = [torch.tensor([tok.encode(args.prompt).ids])]
        else:
            batches = prompt_batches(tok, n_prompts=args.prompts, batch_size=args.batch_size, prompt_len=args.prompt_len)
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                  next_at=args.prefetch_next_at)
        if resident is not None and not args.sequential:  # round by round: the same load on both
            served, ref = serve_rounds([model, resident], batches, **kw)
        else:
            served = serve(model, batches, **kw)
        tiers = tier_summary(store.stats())
    print(f"tables {tierstore.format_size(tbytes)}; device budget {tierstore.format_size(dev_b)}, "
          f"host budget {tierstore.format_size(host_b)}, rest on disk ({store_path})")
    for b, out in zip(batches[:1], served.outputs[:1]):
        print("--- prompt ---\n" + tok.decode(b[0].tolist()) + "\n--- generated ---\n" + tok.decode(out[0].tolist()))
    res: dict[str, Any] = {
        "served_prefill_tok_s": served.prefill_tok_s, "served_decode_tok_s": served.decode_tok_s,
        "table_bytes": tbytes, "device_budget": dev_b, "host_budget": host_b, **tiers,
        "profile": not args.no_profile and any(has_profile(store_path, t) for t in store.tables),
        "page_cache_dropped": args.drop_cache, "device": str(store.device), "threads": args.threads,
        "sync_below": args.sync_below, "prefetch_next_at": args.prefetch_next_at,
        "open_seconds": open_s,
    }
    print(f"store-served: prefill {served.prefill_tok_s:,.0f} tok/s, decode {served.decode_tok_s:,.0f} tok/s "
          f"(open {open_s:.2f} s, not counted)")
    print(f"hit ratio: device {tiers['device_hit_ratio']:.1%}, host {tiers['host_hit_ratio']:.1%} "
          f"(of device misses), disk rows read {tiers['disk_rows_read']:,.0f}")
    if resident is not None:
        if args.sequential:
            ref = serve(resident, batches, **kw)
        same = all(torch.equal(a, b) for a, b in zip(ref.outputs, served.outputs))
        res.update(resident_prefill_tok_s=ref.prefill_tok_s, resident_decode_tok_s=ref.decode_tok_s,
                   same_tokens_as_resident=same, resident_load_seconds=resident_load_s,
                   rounds=len(batches), interleaved=not args.sequential, **round_ratios(served, ref))
        print(f"resident    : prefill {ref.prefill_tok_s:,.0f} tok/s, decode {ref.decode_tok_s:,.0f} tok/s "
              f"(load {resident_load_s:.2f} s, not counted); served/resident prefill "
              f"{served.prefill_tok_s / ref.prefill_tok_s:.2f}x, decode {served.decode_tok_s / ref.decode_tok_s:.2f}x; "
              f"identical tokens: {same}; median of {len(batches)} rounds: prefill "
              f"{res['prefill_ratio_median']:.2f}x, decode {res['decode_ratio_median']:.2f}x")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
