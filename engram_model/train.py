"""Train the Engram LM (or the no-Engram baseline) on real text, on CPU.

    python -m engram_model.train --out runs/engram                 # stdlib source, defaults
    python -m engram_model.train --out runs/base --no-engram       # baseline, FFN widened
    python -m engram_model.train --text a.txt b.txt --steps 2000 ...

Optimizers: the Engram tables get sparse gradients and SparseAdam (only the rows a step
read are updated; as the paper: own group, 5x learning rate, no weight decay, docs/engram.md); everything
else AdamW. Both follow one schedule (linear warm-up, cosine to 10%).

Baseline: ``--no-engram`` drops the Engram layers and, with ``--widen ffn`` (default),
widens every block's feed-forward so that the total parameter count matches the Engram
model of the same flags: d_ff += (params(Engram model) - params(plain model)) / (3 d
n_layer). The widened model spends more compute per token; at equal tokens that favours
the baseline. ``--widen none`` keeps the same backbone (equal compute, fewer parameters).

Output directory: model.safetensors, config.json (config + validation history),
tokenizer.json. Two runs with the same --seed, --batch-size and --seq-len see exactly
the same token windows in the same order.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engram_model.checkpoint import save_checkpoint
from engram_model.compression import build_compression
from engram_model.data import TokenData, encode_files, split_files
from engram_model.errors import EngramConfigError
from engram_model.flags import add_flags, from_flags
from engram_model.model import EngramLM, ModelConfig
from engram_model.tokenizer import PAD_TOKEN, load_tokenizer, stdlib_text_files, train_tokenizer

__all__ = ["build_parser", "model_config", "train", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the Engram LM on CPU", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = ap.add_argument_group("data and output")
    io.add_argument("--out", default="runs/engram", help="checkpoint directory")
    io.add_argument("--text", nargs="*", default=None, help="text files (default: the Python stdlib *.py files)")
    io.add_argument("--data-max-bytes", type=int, default=24 << 20, help="cap on text read (bytes)")
    io.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    io.add_argument("--vocab-size", type=int, default=ModelConfig.vocab_size, help="BPE vocabulary when training the tokenizer")
    io.add_argument("--tok-max-bytes", type=int, default=8 << 20, help="text used to train the tokenizer")
    io.add_argument("--val-every", type=int, default=20, help="hold out every n-th file for validation")
    tr = ap.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=600)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    tr.add_argument("--table-lr-mult", type=float, default=5.0, help="Engram tables' LR = lr * this (SparseAdam)")
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--warmup", type=int, default=30)
    tr.add_argument("--grad-clip", type=float, default=1.0, help="clip norm of the dense gradients")
    tr.add_argument("--eval-every", type=int, default=50)
    tr.add_argument("--eval-windows", type=int, default=128, help="validation windows of seq-len tokens")
    tr.add_argument("--time-budget", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    tr.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar: print a line per evaluation")
    tr.add_argument("--quiet", action="store_true", help="with --no-progress: print nothing per evaluation")
    groups = add_flags(ap, ModelConfig)  # --n-layer ... --engram-seed: one flag per ModelConfig field
    e = groups["engram"]
    e.add_argument("--no-engram", action="store_true", help="baseline without Engram layers")
    e.add_argument("--widen", choices=["ffn", "none"], default="ffn", help="baseline: match parameters by widening")
    return ap


def model_config(args: argparse.Namespace, vocab: int, cvocab: int, cpad: int, engram: bool) -> ModelConfig:
    """The model the flags describe; the tokenizer sets the vocabularies and the pad id,
    ``--seq-len`` the rotary table length, ``engram=False`` drops the Engram layers."""
    no_engram = {} if engram else {"engram_layers": [], "engram_branches": 1}
    return from_flags(ModelConfig, args, vocab_size=vocab, max_seq_len=max(256, args.seq_len),
                      engram_vocab_size=cvocab, engram_pad_id=cpad, **no_engram)


@torch.no_grad()
def evaluate(model: EngramLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation cross-entropy (nats/token) over fixed windows."""
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches:
        _, loss = model(x, y)
        assert loss is not None
        tot += float(loss) * y.numel()
        n += y.numel()
    model.train()
    return tot / n


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as configured by ``args`` (see :func:`build_parser`); returns the summary."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    files = [Path(f) for f in args.text] if args.text else stdlib_text_files()
    train_files, val_files = split_files(files, args.val_every)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(
        train_files, vocab_size=args.vocab_size, max_bytes=args.tok_max_bytes)
    cmap = build_compression(tok)
    pad = tok.token_to_id(PAD_TOKEN)
    if pad is None:
        raise EngramConfigError(f"tokenizer has no {PAD_TOKEN} token; train it with engram_model.tokenizer")
    val_bytes = max(1 << 20, args.data_max_bytes // args.val_every)
    data = TokenData(encode_files(tok, train_files, args.data_max_bytes), encode_files(tok, val_files, val_bytes),
                     seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    vocab, cvocab, cpad = tok.get_vocab_size(), cmap.num_compressed, int(cmap.lookup[pad])

    cfg = model_config(args, vocab, cvocab, cpad, engram=not args.no_engram)
    widened_from = None
    if args.no_engram and args.widen == "ffn":
        target = EngramLM(model_config(args, vocab, cvocab, cpad, engram=True), cmap.lookup).num_params()["total"]
        plain = EngramLM(cfg).num_params()["total"]
        n_ffn = args.n_layer * max(1, args.n_expert)
        widened_from = cfg.d_ff
        cfg.d_ff += max(0, round((target - plain) / (3 * args.d_model * n_ffn)))
    model = EngramLM(cfg, cmap.lookup if cfg.engram_layers else None)
    model.train()
    params = model.num_params()

    dense = model.dense_parameters()
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]
    opt_dense = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    opts: list[torch.optim.Optimizer] = [opt_dense]
    tables = model.table_parameters()
    if tables:
        opts.append(torch.optim.SparseAdam(tables, lr=args.lr * args.table_lr_mult, betas=(0.9, 0.95)))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in opts]
    val_batches = data.val_batches(args.eval_windows)
    history: list[dict[str, float]] = []
    tokens_per_step = args.batch_size * args.seq_len
    train_time = 0.0
    bar = tqdm(range(args.steps), disable=args.no_progress, desc="engram" if tables else "baseline", dynamic_ncols=True)
    ema = None
    step = 0
    for step in bar:
        if step % args.eval_every == 0:
            vl = evaluate(model, val_batches)
            history.append({"step": step, "tokens": step * tokens_per_step, "val_loss": vl, "train_seconds": train_time})
            if args.no_progress and not args.quiet:
                print(f"step {step:5d}  val loss {vl:.4f}  train {train_time:7.1f}s", flush=True)
        t0 = time.perf_counter()
        x, y = data.next_batch()
        _, loss = model(x, y)
        assert loss is not None
        total = loss + 0.01 * model.aux_loss() if args.n_expert else loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(dense, args.grad_clip)
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        train_time += time.perf_counter() - t0
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.set_postfix(loss=f"{ema:.3f}", val=f"{history[-1]['val_loss']:.3f}", tok_s=f"{(step + 1) * tokens_per_step / train_time:.0f}")
        if args.time_budget and train_time > args.time_budget:
            break
    steps_done = step + 1 if args.steps else 0
    vl = evaluate(model, val_batches)
    history.append({"step": steps_done, "tokens": steps_done * tokens_per_step, "val_loss": vl, "train_seconds": train_time})
    bar.close()

    summary = {
        "kind": "engram" if tables else "baseline",
        "steps": steps_done,
        "tokens": steps_done * tokens_per_step,
        "final_val_loss": vl,
        "train_seconds": train_time,
        "tokens_per_second": steps_done * tokens_per_step / max(train_time, 1e-9),
        "params": params,
        "d_ff": cfg.d_ff,
        "widened_from_d_ff": widened_from,
        "vocab_size": vocab,
        "compressed_vocab_size": cvocab,
        "compression_reduction": cmap.reduction,
        "train_tokens_available": int(len(data.train)),
        "val_tokens": int(len(data.val)),
        "wall_seconds": time.perf_counter() - t_start,
    }
    save_checkpoint(model, tok, args.out, extra={"training": {"args": vars(args), "summary": summary, "history": history}})
    return {"summary": summary, "history": history, "out": str(args.out)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    res = train(args)
    s = res["summary"]
    print(f"{s['kind']}: {s['steps']} steps, {s['tokens']:,} tokens, val loss {s['final_val_loss']:.4f}, "
          f"{s['tokens_per_second']:.0f} tok/s, params {s['params']['total']:,} "
          f"(tables {s['params']['tables']:,}) -> {res['out']}")
    print(json.dumps(s))
    return res


if __name__ == "__main__":
    main()
