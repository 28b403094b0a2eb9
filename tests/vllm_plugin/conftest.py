"""Tests of dgplug's vLLM plugin; they run only where vLLM is installed (the vLLM venv, .ci/vllm).

The main test venv has no vLLM: every test in this folder is then skipped with the reason.
vLLM's engine cannot run DiffusionGemma on a CPU (its V2 model runner needs Triton's GPU backend,
and the CPU build refuses diffusion models on the V1 runner), so these tests drive vLLM's own
config objects, parallel layers, distributed groups and weight loader directly, and run the
model's standalone (dgplug attention) path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # vllm_helpers (shared with tp_worker.py)
from vllm_helpers import free_port, make_vllm_config  # noqa: E402

_REASON = None
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:  # absent, or only a namespace folder of that name
    _REASON = "vLLM is not installed in this venv (run .ci/vllm: it builds the vLLM CPU venv)"
else:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a broken install (e.g. torchvision beside CPU torch)
        _REASON = f"import vllm failed: {type(e).__name__}: {e}"


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_dist(tmp_path_factory):
    """One-process gloo 'world' with vLLM's model-parallel groups (tensor parallel 1)."""
    if _REASON is not None:
        pytest.skip(_REASON)
    from dgplug.integrations import vllm_plugin

    vllm_plugin.register()
    from dgplug.testing import make_checkpoint

    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    tmp = tmp_path_factory.mktemp("dgplug_vllm")  # under pytest's base temp, pruned like the rest
    ckpt = make_checkpoint(tmp / "ckpt")
    vc = make_vllm_config(ckpt)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1)
    return {"ckpt": ckpt, "tmp": tmp}


@pytest.fixture(scope="session")
def vllm_diffusion_gemma(vllm_dist):
    """vLLM's ``vllm.model_executor.models.diffusion_gemma`` module, imported on the CPU venv too.

    That module imports vLLM's Gemma 4 multimodal stack (``gemma4_mm.py``), which does
    ``from transformers.models.gemma4 import Gemma4Processor``; transformers' Gemma4Processor needs
    torchvision, which the CPU venv uninstalls (broken beside CPU torch). These tests exercise the
    text path only: the processor is a name in annotations and in the multimodal processing info,
    never built. So where the real class does not import, a placeholder class stands in for it on
    the ``transformers.models.gemma4`` module object before vLLM's import (transformers' lazy
    module returns an attribute set this way). Where it imports (a GPU venv) it is left alone."""
    import transformers.models.gemma4 as gemma4

    try:
        gemma4.Gemma4Processor
    except (ImportError, AttributeError):

        class Gemma4Processor:  # placeholder: text-only tests never build a Gemma 4 processor
            def __init__(self, *args, **kwargs):
                raise RuntimeError("placeholder Gemma4Processor (tests without torchvision): not for use")

        gemma4.Gemma4Processor = Gemma4Processor
    from vllm.model_executor.models import diffusion_gemma

    return diffusion_gemma
