"""The embedded default model.

The default is a small DiffusionGemma trained to solve Sudoku (examples/sudoku/), shipped with
the package under dgplug/data/sudoku/ (config, generation config, safetensors weights, tokenizer,
a bank of held-out puzzles).
`tiny_random_model_path()` is the older default, kept as a fallback: a tiny random DiffusionGemma
built deterministically by transformers itself (seed 0) and cached under $DGPLUG_CACHE
(default ~/.cache/dgplug).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SUDOKU_DIR = Path(__file__).resolve().parent / "data" / "sudoku"
DEFAULT_NAME = "tiny-random-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("DGPLUG_CACHE", Path.home() / ".cache" / "dgplug"))


def sudoku_model_path() -> Path | None:
    """The shipped Sudoku checkpoint directory, or None when the package data is missing."""
    ok = (SUDOKU_DIR / "config.json").exists() and any(SUDOKU_DIR.glob("*.safetensors"))
    return SUDOKU_DIR if ok else None


def default_model_path() -> Path:
    """The embedded default checkpoint: the shipped Sudoku model, else the tiny random one."""
    return sudoku_model_path() or tiny_random_model_path()


def tiny_random_model_path() -> Path:
    """Build (once) and return the tiny random checkpoint directory."""
    from .testing import make_checkpoint, tiny_text_config

    final = cache_dir() / DEFAULT_NAME
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-", dir=final.parent))
    try:
        make_checkpoint(tmp, text=tiny_text_config(num_hidden_layers=6), canvas_length=32, seed=0,
                        qk_norm_scale=0.25, generation={"max_denoising_steps": 16})
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
