"""dgplug: a plugin backend for Google's DiffusionGemma.

    import dgplug
    model = dgplug.load("path/to/checkpoint")          # safetensors directory
    out = model.generate(input_ids)                     # EntropyBound block diffusion

    hf_model = DiffusionGemmaForBlockDiffusion.from_pretrained(...)
    dgplug.patch(hf_model)                              # transformers model on dgplug's kernels
"""

from .errors import CheckpointError, DGPlugError, FormatError, InputError
from .loader import load

__version__ = "0.1.0"
__all__ = ["load", "patch", "unpatch", "patched", "DGPlugError", "CheckpointError", "FormatError", "InputError",
           "__version__"]


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
    """`import dgplug` makes transformers' Auto classes load dgplug-quantized checkpoints."""
    import warnings

    try:
        from dgplug.integrations.hf_quantizer import register

        register()
        from dgplug.integrations.gguf_transformers import register as register_gguf  # after: failures stay apart

        register_gguf()
    except Exception as e:  # noqa: BLE001 - dgplug's own loader works without the registration
        warnings.warn(f"dgplug: could not register its quantizer with transformers ({e})", stacklevel=2)


_register_with_transformers()
