"""The embedded default model.

Until a trained one ships, the default is a tiny random DiffusionGemma built deterministically
by transformers itself (seed 0) and cached under $DGPLUG_CACHE (default ~/.cache/dgplug).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_NAME = "tiny-random-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("DGPLUG_CACHE", Path.home() / ".cache" / "dgplug"))


def default_model_path() -> Path:
    """Build (once) and return the default checkpoint directory."""
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
