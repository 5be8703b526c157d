"""`tierstore build`, `tierstore inspect`, `tierstore verify`, `tierstore gc`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tierstore.format.build import DEFAULT_TABLE_PATTERN, build_store
from tierstore.format.recovery import find_orphans, recover
from tierstore.tiers.shared_host import SHM_DIR, remove_segment, stale_segments
from tierstore.serve.distributed import build_shard
from tierstore.errors import TierStoreError
from tierstore.format.spec import FORMAT_NAME, PAGE_SIZE, read_manifest
from tierstore.format.profile import has_profile
from tierstore.format.quant import NanScaleWarning, Quant
from tierstore.sizes import format_size
from tierstore.format.verify import verify_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a store from a checkpoint",
                       description="Build a store directory from a .safetensors file, a sharded index, "
                                   "or a torch .pt/.bin state dict (loaded with weights_only=True).")
    p.add_argument("checkpoint", help="checkpoint file or directory")
    p.add_argument("out", help="store directory to create")
    p.add_argument("--tables", metavar="REGEX", default=None,
                   help=f"tensor names to store (re.search); default {DEFAULT_TABLE_PATTERN!r}")
    p.add_argument("--dtype", default=None, help="convert rows to this dtype (float32, float16, bfloat16, float8_e4m3fn, float8_e5m2)")
    p.add_argument("--attach", action="append", default=[], metavar="FILE",
                   help="copy FILE into the store (model config, tokenizer); repeatable")
    p.add_argument("--force", action="store_true", help="replace an existing store at OUT")
    p.add_argument("--shard", metavar="RANK/WORLD", default=None,
                   help="write only shard RANK of WORLD (rows RANK::WORLD) into OUT/shard-RANK-of-WORLD, "
                        "for tierstore.serve.distributed")
    p.add_argument("--order-by-profile", metavar="STORE", default=None,
                   help="write rows hottest first, by the access profiles saved in STORE "
                        "(`tierstore profile --save-profile`), so hot rows share pages")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_build)

    p = sub.add_parser("inspect", help="show a store's tables, sizes and format")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_inspect)

    p = sub.add_parser("verify", help="recompute every checksum of a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("gc", help="restore or remove what builds that died left behind",
                       description="List the hidden leftovers of dead builds (.NAME.tmp-PID work directories, "
                                   ".NAME.old-PID stores moved aside by --force) directly inside each DIR; "
                                   "give a missing store back its old copy and remove the rest. "
                                   "Leftovers of running builds are not touched.")
    p.add_argument("dirs", nargs="*", default=["."], metavar="DIR",
                   help="directories holding stores (default: the current directory)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be done")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--shm", action="store_true",
                   help="also remove shared host tiers no process uses (left when every user was killed, "
                        "or by a store since rebuilt)")
    p.add_argument("--shm-dir", default=str(SHM_DIR), help=argparse.SUPPRESS)
    p.set_defaults(func=run_gc)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise TierStoreError(f"--shard {text!r} must look like RANK/WORLD, e.g. 0/4") from None
    return rank, world


def run_build(args: argparse.Namespace) -> int:
    kwargs = dict(tables=args.tables, force=args.force, dtype=args.dtype, progress=not args.quiet, attach=args.attach)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NanScaleWarning)
        if args.shard:
            rank, world = _parse_shard(args.shard)
            out = build_shard(args.checkpoint, args.out, rank, world, **kwargs)
        else:
            out = build_store(args.checkpoint, args.out, order_by=args.order_by_profile, **kwargs)
    for w in caught:  # one line each, like every message of the command
        if issubclass(w.category, NanScaleWarning):
            print(f"tierstore build: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    m = read_manifest(out)
    total = sum(t.nbytes for t in m.tables.values())
    paths = sorted({str(t.source.get("write_path", "?")) for t in m.tables.values()})
    print(f"built {out}: {len(m.tables)} table(s), {format_size(total)} of rows, written {'/'.join(paths)}")
    return 0


def _recover(store: str) -> None:
    """As ``tierstore.open`` does: a build of this store that died mid-swap left it missing and
    its previous copy in ``.NAME.old-TAG``: bring it back (and clean what dead builds left)
    before reading it, saying so on stderr."""
    for line in recover(store):
        print(f"tierstore: {line}", file=sys.stderr)


def quant_doc(quant: Quant | None, lookup_dtype: object) -> dict | None:
    """The ``quant`` field of ``inspect --json``: how a quantized table's stored rows decode."""
    if quant is None:
        return None
    return {**quant.to_json(), "row_bytes": quant.row_bytes, "lookup_dtype": str(lookup_dtype).removeprefix("torch.")}


def quant_label(q: dict) -> str:
    """``fp8 e4m3 + ue8m0/32, 256 values (bf16 on lookup)``: what ``inspect`` prints for a
    quantized table instead of its stored dtype (``264 uint8``)."""
    values, scales = q["scheme"].split("/")
    lookup = {"bfloat16": "bf16"}.get(q["lookup_dtype"], q["lookup_dtype"])
    return f"{values.replace('_', ' ')} + {scales}/{q['block']}, {q['values']} values ({lookup} on lookup)"


def run_inspect(args: argparse.Namespace) -> int:
    _recover(args.store)
    m = read_manifest(args.store)
    tables = [
        {"name": t.name, "rows": t.rows, "dim": t.dim, "dtype": t.dtype, "row_bytes": t.row_bytes,
         "row_stride": t.row_stride, "bytes": t.nbytes, "file": t.file, "file_bytes": t.file_bytes,
         "hot_ordered": t.order_file is not None, "profile": has_profile(args.store, t.name),
         "shard": t.source.get("shard"), "nan_scales": t.source.get("nan_scales"),
         "quant": quant_doc(t.quant, t.lookup_dtype)}
        for t in m.tables.values()
    ]
    doc = {"format": FORMAT_NAME, "version": m.version, "build_id": m.build_id, "created": m.created, "checksum": m.checksum,
           "page_size": PAGE_SIZE, "tables": tables, "attachments": m.attachments,
           "total_bytes": sum(t["bytes"] for t in tables)}
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"store {args.store}  format {FORMAT_NAME} v{m.version}  created {m.created}  "
          f"checksums {m.checksum['scheme']} per {m.checksum['block_size']} B")
    w = max([len(t["name"]) for t in tables] + [5])
    kinds = [quant_label(t["quant"]) if t["quant"] else t["dtype"] for t in tables]
    wk = max([len(k) for k in kinds] + [14])
    print(f"{'table':<{w}}  {'rows':>12}  {'dim':>5}  {'dtype':<{wk}}  {'size':>10}  notes")
    for t, kind in zip(tables, kinds):
        notes = [n for n, on in (("profile", t["profile"]), ("hot-ordered", t["hot_ordered"])) if on]
        if t["nan_scales"]:
            notes.append(f"{t['nan_scales']:,} NaN scales")
        if t["shard"]:
            notes.append(f"shard {t['shard']['rank']}/{t['shard']['world_size']} of {t['shard']['global_rows']:,} rows")
        dim = t["quant"]["values"] if t["quant"] else t["dim"]  # a quantized row: its values, as looked up
        print(f"{t['name']:<{w}}  {t['rows']:>12,}  {dim:>5}  {kind:<{wk}}  {format_size(t['bytes']):>10}  "
              f"{', '.join(notes)}")
    print(f"total {format_size(doc['total_bytes'])} in {len(tables)} table(s)"
          + (f"; attachments: {', '.join(m.attachments)}" if m.attachments else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    _recover(args.store)
    report = verify_store(args.store, progress=not args.quiet)
    if args.json:
        print(json.dumps({"ok": report.ok, "tables": report.tables, "pages": report.pages, "bytes": report.bytes,
                          "mismatches": [vars(m) for m in report.mismatches]}))
    elif report.ok:
        print(f"ok: {report.tables} table(s), {report.pages:,} pages, {format_size(report.bytes)} verified")
    else:
        for m in report.mismatches:
            print(f"MISMATCH table {m.table!r} block {m.page} offset {m.offset} first_row {m.first_row}: {m.detail}",
                  file=sys.stderr)
        print(f"verify failed: {len(report.mismatches)} bad block(s) in {args.store}", file=sys.stderr)
    return 0 if report.ok else 1


def run_gc(args: argparse.Namespace) -> int:
    items = []
    for d in args.dirs:
        for o in find_orphans(d):
            done = None if args.dry_run else o.clean()
            items.append({"path": str(o.path), "kind": o.kind, "store": str(o.store), "pid": o.pid,
                          "action": o.action, "result": done})
            if not args.json:
                print(done or f"would {o.action} {o.path}" + (f" -> {o.store}" if o.action == "restore" else ""))
    if args.shm:
        for seg in stale_segments(Path(args.shm_dir)):
            done = None
            if not args.dry_run:
                remove_segment(seg)
                done = f"removed unused shared host tier {seg}"
            items.append({"path": str(seg), "kind": "shm", "store": None, "pid": None, "action": "remove",
                          "result": done})
            if not args.json:
                print(done or f"would remove unused shared host tier {seg}")
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "items": items}))
    elif not items:
        print(f"no leftovers of dead builds in {', '.join(args.dirs)}"
              + (f" and no unused shared host tier in {args.shm_dir}" if args.shm else ""))
    failed = any(i["result"] and i["result"].startswith("could not") for i in items)
    return 1 if failed else 0
