"""Test setup: offline, Triton in its interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny fp32 checkpoint made by transformers (sliding + full layers, 8 experts)."""
    from dgplug.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_ckpt_smooth(tmp_path_factory):
    """As tiny_ckpt but with q/k norms at 0.25 (bf16 / quantization closeness tests)."""
    from dgplug.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_smooth") / "ckpt", qk_norm_scale=0.25)
