"""train.py's model flags are derived from ModelConfig: same flags and defaults as the
hand-written parser they replaced, and config -> flags -> config is the identity."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from engram_model.flags import add_flags, flag_fields, from_flags, setting, to_argv
from engram_model.model import ModelConfig
from engram_model.train import build_parser, model_config

# The fields the program sets itself (from the tokenizer, from --seq-len): no flag.
NOT_FLAGS = {"vocab_size", "max_seq_len", "engram_vocab_size", "engram_pad_id", "engram_table"}
# Flags the derivation added (ModelConfig fields that had no flag before).
NEW_FLAGS = {"--rope-theta", "--norm-eps", "--engram-kernel"}


def old_parser() -> argparse.ArgumentParser:
    """train.py's parser as it was written by hand before the derivation (the reference)."""
    ap = argparse.ArgumentParser()
    io = ap.add_argument_group("data and output")
    io.add_argument("--out", default="runs/engram")
    io.add_argument("--text", nargs="*", default=None)
    io.add_argument("--data-max-bytes", type=int, default=24 << 20)
    io.add_argument("--tokenizer", default=None)
    io.add_argument("--vocab-size", type=int, default=8192)
    io.add_argument("--tok-max-bytes", type=int, default=8 << 20)
    io.add_argument("--val-every", type=int, default=20)
    tr = ap.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=600)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--table-lr-mult", type=float, default=5.0)
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--warmup", type=int, default=30)
    tr.add_argument("--grad-clip", type=float, default=1.0)
    tr.add_argument("--eval-every", type=int, default=50)
    tr.add_argument("--eval-windows", type=int, default=128)
    tr.add_argument("--time-budget", type=float, default=0.0)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--quiet", action="store_true")
    m = ap.add_argument_group("model")
    m.add_argument("--n-layer", type=int, default=4)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--d-model", type=int, default=192)
    m.add_argument("--d-ff", type=int, default=512)
    m.add_argument("--n-expert", type=int, default=0)
    m.add_argument("--moe-top-k", type=int, default=2)
    e = ap.add_argument_group("engram")
    e.add_argument("--no-engram", action="store_true")
    e.add_argument("--widen", choices=["ffn", "none"], default="ffn")
    e.add_argument("--engram-layers", type=int, nargs="+", default=[1])
    e.add_argument("--engram-max-ngram", type=int, default=3)
    e.add_argument("--engram-heads", type=int, default=8)
    e.add_argument("--engram-d-mem", type=int, default=128)
    e.add_argument("--engram-base-size", type=int, default=0)
    e.add_argument("--engram-branches", type=int, default=1)
    e.add_argument("--engram-init-std", type=float, default=1.0)
    e.add_argument("--no-signed-sqrt", action="store_true")
    e.add_argument("--random-value-init", action="store_true")
    e.add_argument("--engram-seed", type=int, default=0)
    return ap


def old_model_config(args: argparse.Namespace, vocab: int, cvocab: int, cpad: int, engram: bool) -> ModelConfig:
    """train.py's hand-written flags -> config mapping before the derivation (the reference)."""
    return ModelConfig(
        vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_ff=args.d_ff,
        max_seq_len=max(256, args.seq_len), n_expert=args.n_expert, moe_top_k=args.moe_top_k,
        engram_layers=list(args.engram_layers) if engram else [], engram_vocab_size=cvocab, engram_pad_id=cpad,
        engram_max_ngram=args.engram_max_ngram, engram_heads=args.engram_heads, engram_d_mem=args.engram_d_mem,
        engram_base_size=args.engram_base_size, engram_seed=args.engram_seed,
        engram_signed_sqrt=not args.no_signed_sqrt, engram_branches=args.engram_branches if engram else 1,
        engram_init_std=args.engram_init_std, engram_zero_value=not args.random_value_init,
    )


def _actions(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in ap._actions for opt in a.option_strings if opt not in ("-h", "--help")}


def test_every_old_flag_is_accepted_with_the_same_default():
    old, new = _actions(old_parser()), _actions(build_parser())
    assert set(new) - set(old) == NEW_FLAGS
    for opt, a in old.items():
        b = new[opt]
        assert (b.dest, b.default, b.type, b.nargs, type(b), b.choices) == \
            (a.dest, a.default, a.type, a.nargs, type(a), a.choices), opt
    assert all(new[opt].help for opt in new if opt not in ("--steps", "--batch-size", "--seq-len", "--weight-decay",
                                                           "--warmup", "--eval-every", "--seed"))


@pytest.mark.parametrize("argv", [
    [],
    ["--n-layer", "3", "--engram-layers", "0", "2", "--no-signed-sqrt", "--random-value-init", "--engram-seed", "7",
     "--engram-branches", "2", "--engram-init-std", "0.5", "--seq-len", "512", "--n-expert", "4", "--moe-top-k", "1"],
    ["--no-engram", "--engram-branches", "3", "--d-model", "64", "--n-head", "2", "--engram-base-size", "999"],
])
def test_same_config_as_the_hand_written_mapping(argv):
    new, old = build_parser().parse_args(argv), old_parser().parse_args(argv)
    assert {k: v for k, v in vars(new).items() if k in vars(old)} == vars(old)  # saved training args keep their keys
    engram = not new.no_engram
    assert model_config(new, 600, 400, 3, engram) == old_model_config(old, 600, 400, 3, engram)
    if not engram:  # the parameter-matched baseline sizes itself from the Engram twin
        assert model_config(new, 600, 400, 3, True) == old_model_config(old, 600, 400, 3, True)


def _random_config(rng: np.random.Generator) -> ModelConfig:
    n_head = int(rng.integers(1, 5))
    n_layer = int(rng.integers(1, 6))
    n_expert = int(rng.integers(0, 4))
    layers = sorted(rng.choice(n_layer, size=int(rng.integers(1, n_layer + 1)), replace=False).tolist())
    return ModelConfig(
        vocab_size=int(rng.integers(10, 9000)), n_layer=n_layer, n_head=n_head,
        d_model=n_head * 2 * int(rng.integers(1, 40)), d_ff=int(rng.integers(1, 900)),
        max_seq_len=int(rng.integers(1, 2000)), rope_theta=float(rng.uniform(1, 1e6)),
        norm_eps=float(rng.uniform(1e-9, 1e-3)), n_expert=n_expert, moe_top_k=int(rng.integers(1, max(n_expert, 1) + 1)),
        engram_layers=layers, engram_vocab_size=int(rng.integers(1, 9000)), engram_pad_id=int(rng.integers(0, 10)),
        engram_max_ngram=int(rng.integers(2, 6)), engram_heads=int(rng.integers(1, 9)),
        engram_d_mem=int(rng.integers(1, 300)), engram_base_size=int(rng.integers(0, 10**6)),
        engram_seed=int(rng.integers(0, 2**31)), engram_kernel=int(rng.integers(1, 8)),
        engram_signed_sqrt=bool(rng.integers(2)), engram_branches=int(rng.integers(1, 4)),
        engram_init_std=float(rng.uniform(0, 3)), engram_zero_value=bool(rng.integers(2)),
    )


@pytest.mark.parametrize("seed", range(20))
def test_config_to_flags_and_back_is_identity(seed):
    cfg = _random_config(np.random.default_rng(seed))
    args = build_parser().parse_args(to_argv(cfg))
    program_set = {k: getattr(cfg, k) for k in NOT_FLAGS}
    assert from_flags(ModelConfig, args, **program_set) == cfg
    if cfg.max_seq_len >= 256:  # what train.py builds from the same flags
        args.seq_len = cfg.max_seq_len
        assert model_config(args, cfg.vocab_size, cfg.engram_vocab_size, cfg.engram_pad_id, True) == cfg


def test_defaults_round_trip_to_no_flags():
    assert to_argv(ModelConfig(engram_vocab_size=5)) == [
        "--n-layer", "4", "--n-head", "4", "--d-model", "192", "--d-ff", "512", "--rope-theta", "10000.0",
        "--norm-eps", "1e-05", "--n-expert", "0", "--moe-top-k", "2", "--engram-layers", "1",
        "--engram-max-ngram", "3", "--engram-heads", "8", "--engram-d-mem", "128", "--engram-base-size", "0",
        "--engram-seed", "0", "--engram-kernel", "4", "--engram-branches", "1", "--engram-init-std", "1.0",
    ]  # booleans at their default need no switch


def test_every_field_has_a_flag_or_is_set_by_the_program():
    dests = {a.dest for a in build_parser()._actions}
    flagged = {f.name: dest for f, _, _, dest in flag_fields(ModelConfig)}
    assert set(flagged) == {f.name for f in dataclasses.fields(ModelConfig)} - NOT_FLAGS
    assert set(flagged.values()) <= dests
    assert flagged["engram_signed_sqrt"] == "no_signed_sqrt" and flagged["engram_zero_value"] == "random_value_init"


def test_helper_on_its_own():
    @dataclasses.dataclass
    class Cfg:
        width: int = setting(3, "how wide")
        ratio: float = setting(0.5, "a ratio", group="other")
        names: list[int] = setting([1, 2], "some ids")
        fast: bool = setting(False, "go fast")
        careful: bool = setting(True, "skip the checks")
        hidden: str = setting("x", "set by the program", cli=False)

    ap = argparse.ArgumentParser()
    groups = add_flags(ap, Cfg)
    assert set(groups) == {"model", "other"}
    args = ap.parse_args(["--width", "9", "--names", "4", "--fast", "--no-careful"])
    assert from_flags(Cfg, args) == Cfg(width=9, names=[4], fast=True, careful=False)
    assert from_flags(Cfg, args, hidden="y", width=1).hidden == "y"
    a, b = Cfg(), Cfg()
    a.names.append(5)
    assert b.names == [1, 2]  # list defaults are not shared between instances
    with pytest.raises(ValueError, match="names=\\[\\]"):
        to_argv(Cfg(names=[]))

    @dataclasses.dataclass
    class Plain:
        width: int = 3

    with pytest.raises(TypeError, match="Plain.width"):
        add_flags(argparse.ArgumentParser(), Plain)
