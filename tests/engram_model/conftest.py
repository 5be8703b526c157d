"""A tiny trained checkpoint on real stdlib text, shared by the model, train and serving tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engram_model.tokenizer import stdlib_text_files

TINY = ["--steps", "6", "--eval-every", "3", "--eval-windows", "4", "--batch-size", "4", "--seq-len", "32",
        "--vocab-size", "600", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64",
        "--engram-layers", "0", "1", "--engram-heads", "2", "--engram-d-mem", "8", "--threads", "1", "--no-progress", "--quiet",
        "--data-max-bytes", "300000", "--tok-max-bytes", "300000"]


@pytest.fixture(scope="session")
def text_files() -> list[str]:
    return [str(p) for p in stdlib_text_files()[:60]]


@pytest.fixture(scope="session")
def engram_run(tmp_path_factory: pytest.TempPathFactory, text_files: list[str]) -> tuple[Path, dict[str, Any]]:
    from engram_model.train import main

    out = tmp_path_factory.mktemp("ckpt") / "engram"
    res = main([*TINY, "--out", str(out), "--text", *text_files])
    return out, res
