"""`make demo`: the whole story on the embedded default, in a few minutes on a 2-core CPU.

1. train (or reuse) a small Engram LM on the Python standard library's source,
2. build its table store (`tierstore build`, config and tokenizer attached) and verify it,
3. serve the model with its tables in the store under budgets smaller than the tables
   (device tier 1/10, host tier 1/4, the rest cold on disk), a first start with no
   profile and the page cache dropped: generated text, tokens/s against the all-in-memory
   model, hit rates per tier;
4. the placement workflow: trace the training text through the model, save its row counts
   into the store as the profile (`tierstore trace`, `tierstore profile --save-profile`);
5. serve again, page cache dropped, now with the saved profile: the hottest rows are loaded
   into the tiers at open. The last JSON line is this run.

    python -m tierstore_cli.demo [--workdir runs/demo] [--train-seconds 150] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tierstore.format.spec import read_manifest
from tierstore.sizes import format_size
from tierstore.format.verify import verify_store


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="checkpoint and store live here")
    ap.add_argument("--train-seconds", type=float, default=150.0, help="training time budget (CPU)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (stops earlier at the time budget)")
    ap.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    ap.add_argument("--prompts", type=int, default=32,
                    help="held-out prompts served (and timed against the resident model round by round, one "
                         "round per batch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the served and the resident run (2 on a busy 2-core VM: OpenMP "
                         "hand-offs made small ops 10-20x slower, and the store's threads need a core)")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--profile-tokens", type=int, default=200_000, help="training tokens traced for the profile")
    ap.add_argument("--quick", action="store_true", help="tiny model and run (for tests)")
    args = ap.parse_args(argv)
    from engram_model import generate, train  # the model sits on top of the store: import it here

    t_start = time.perf_counter()
    ckpt, store = args.workdir / "model", args.workdir / "store"
    print(f"tierstore demo: device {'cuda' if torch.cuda.is_available() else 'cpu (no GPU: the device tier is a budgeted in-memory cache)'}")
    if args.retrain or not (ckpt / "model.safetensors").exists():
        _step(f"1. training a small Engram LM on the Python standard library ({args.train_seconds:.0f} s budget)")
        shutil.rmtree(store, ignore_errors=True)  # a new checkpoint needs a new store
        targs = ["--out", str(ckpt), "--steps", str(args.steps), "--time-budget", str(args.train_seconds),
                 "--threads", str(args.train_threads)]
        if args.quick:
            targs += ["--d-model", "64", "--n-layer", "2", "--d-ff", "128", "--vocab-size", "1024",
                      "--data-max-bytes", str(2 << 20), "--tok-max-bytes", str(1 << 20), "--eval-every", "10",
                      "--eval-windows", "8", "--engram-d-mem", "32", "--engram-base-size", "2000", "--no-progress"]
        train.main(targs)
    else:
        _step(f"1. reusing the checkpoint in {ckpt} (--retrain to train again)")
    if not (store / "manifest.json").exists():
        _step("2. building the table store from the checkpoint")
        generate.build_store_for(ckpt, store, progress=True)
    else:
        _step(f"2. reusing the store in {store}")
    m = read_manifest(store)
    for t in m.tables.values():
        print(f"   {t.name}: {t.rows:,} rows x {t.dim} {t.dtype} = {format_size(t.nbytes)}")
    report = verify_store(store, progress=False)
    print(f"   verify: {'ok' if report.ok else 'FAILED'} ({report.pages:,} pages checked)")
    if not report.ok:
        return 1
    _step("3. serving the model from the store: device tier 1/10 of the tables, host tier 1/4, rest on disk;\n"
          "   a first start: no profile, page cache dropped")
    gargs = ["--ckpt", str(ckpt), "--store", str(store), "--device-frac", "0.1", "--host-frac", "0.25",
             "--prompts", str(args.prompts), "--batch-size", str(args.batch_size),
             "--max-new-tokens", str(args.max_new_tokens),
             "--threads", str(args.threads), "--compare-resident", "--drop-cache",
             # the next batch's rows are fetched while this one decodes, not while it prefills: on a
             # busy 2-core machine the fetch's CPU then no longer lands in the prefill's time
             "--prefetch-next-at", "decode"]
    before = generate.main([*gargs, "--no-profile"])
    _step("4. placement: trace the training text through the model and save its row counts as the store's profile")
    from . import cli

    trace = args.workdir / "train.trace.zst"
    tokens = 5000 if args.quick else args.profile_tokens
    if cli.main(["trace", "--checkpoint", str(ckpt), "--stdlib", "--split", "train", "--max-tokens", str(tokens),
                 "--out", str(trace)]) or cli.main(["profile", "--trace", str(trace), "--store", str(store),
                                                   "--save-profile", "--capacity", "0.1", "--policy", "default"]):
        return 1
    _step("5. serving again, page cache dropped, with the saved profile: hot rows loaded into the tiers at open")
    after = generate.main(gargs)
    print(f"\nplacement: decode {before['served_decode_tok_s'] / before['resident_decode_tok_s']:.2f}x -> "
          f"{after['served_decode_tok_s'] / after['resident_decode_tok_s']:.2f}x of resident, device hit "
          f"{before['device_hit_ratio']:.1%} -> {after['device_hit_ratio']:.1%}, disk rows "
          f"{before['disk_rows_read']:,.0f} -> {after['disk_rows_read']:,.0f} (no profile -> saved profile)")
    print(f"served/resident with the saved profile, timed round by round ({after['rounds']} batches of "
          f"{args.batch_size}), medians of the rounds: decode {after['decode_ratio_median']:.2f}x, prefill "
          f"{after['prefill_ratio_median']:.2f}x (whole queue: {after['served_decode_tok_s'] / after['resident_decode_tok_s']:.2f}x, "
          f"{after['served_prefill_tok_s'] / after['resident_prefill_tok_s']:.2f}x)")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    print(json.dumps(after))  # the last line: the run with the saved profile
    return 0


if __name__ == "__main__":
    sys.exit(main())
