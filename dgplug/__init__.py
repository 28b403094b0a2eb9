"""dgplug: a plugin backend for Google's DiffusionGemma.

    import dgplug
    model = dgplug.load("path/to/checkpoint")          # safetensors directory
    out = model.generate(input_ids)                     # EntropyBound block diffusion

    hf_model = DiffusionGemmaForBlockDiffusion.from_pretrained(...)
    dgplug.patch(hf_model)                              # transformers model on dgplug's kernels

`import dgplug` is light: torch and transformers load on first use (`dgplug.load`, the CLI's
commands), so `dgplug --help` answers at once. The contract that after `import dgplug`
transformers' Auto classes read dgplug-quantized and GGUF checkpoints holds in either import
order: dgplug registers at once when transformers is already imported, otherwise right after
transformers finishes importing (a one-shot import hook, `_AfterTransformers`).
"""

import importlib.abc
import importlib.util
import sys

from .errors import CheckpointError, DGPlugError, FormatError, InputError

__version__ = "0.1.0"
__all__ = ["load", "patch", "unpatch", "patched", "DGPlugError", "CheckpointError", "FormatError", "InputError",
           "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .loader import load

        return load
    raise AttributeError(f"module 'dgplug' has no attribute {name!r}")


def patch(model, attention: bool = True, experts: bool = True, sampler: str = "transformers"):
    """Switch a loaded transformers DiffusionGemma to dgplug's attention, MoE and (optionally) fused sampler."""
    from dgplug.integrations.transformers_patch import patch as _patch

    return _patch(model, attention=attention, experts=experts, sampler=sampler)


def unpatch(model):
    """Undo `patch`."""
    from dgplug.integrations.transformers_patch import unpatch as _unpatch

    return _unpatch(model)


def patched(model, **kwargs):
    """Context manager: `with dgplug.patched(model, sampler="fused"): model.generate(...)`."""
    from dgplug.integrations.transformers_patch import patched as _patched

    return _patched(model, **kwargs)


def _register_with_transformers() -> None:
    """Make transformers' Auto classes load dgplug-quantized and GGUF checkpoints."""
    import warnings

    try:
        from dgplug.integrations.hf_quantizer import register

        register()
        from dgplug.integrations.gguf_transformers import register as register_gguf  # after: failures stay apart

        register_gguf()
    except Exception as e:  # noqa: BLE001 - dgplug's own loader works without the registration
        warnings.warn(f"dgplug: could not register its quantizer with transformers ({e})", stacklevel=2)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Fires once: finds `transformers` the normal way and registers dgplug after its module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def _drop_transformers_hook() -> None:
    """For a process that never loads through transformers' Auto classes (the `dgplug` command): without the
    hook, the `import transformers` a tokenizer needs does not also import transformers.quantizers (and
    torch.distributed.tensor, sympy): seconds of every CLI start."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTransformers)]


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
