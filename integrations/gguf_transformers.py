"""transformers loading of diffusion-gemma GGUF files: `from_pretrained(dir, gguf_file="model.gguf")`.

`register()` (idempotent; `import dgplug` calls it) teaches transformers 5.19 - 5.24 the
"diffusion-gemma" GGUF architecture, so that after `import dgplug`

    AutoModelForImageTextToText.from_pretrained(dir, gguf_file="model.gguf")
    DiffusionGemmaForBlockDiffusion.from_pretrained(dir, gguf_file="model.gguf")
    AutoTokenizer.from_pretrained(dir, gguf_file="model.gguf")

work, as they do for llama.

How transformers 5.19 - 5.24 load a GGUF, and where this hooks in
------------------------------------------------------------------
`from_pretrained(..., gguf_file=...)` refuses to run without `accelerate` (a bare
`is_accelerate_available()` gate; nothing on the GGUF path uses it after that), then goes through
`GgufHfQuantizer` (quant_method "gguf"). There are two paths behind it:

* the new one, for architectures in `integrations.gguf.GGUF_CONFIG_ARCHS` / `GGUF_ARCHS` (qwen35,
  lfm2): the config is rebuilt from the metadata alone, tensors are renamed by `WeightRenaming`s
  and may stay packed. It cannot describe diffusion-gemma exactly: the partial rotation of the full
  layers lives only in the *data* of `rope_freqs.weight` (../shared/spec/gguf.md), and the config
  builder is handed metadata and tensor names, never the file.
* the legacy one, for everything else (llama, gemma3, ...): `modeling_gguf_pytorch_utils.
  load_gguf_checkpoint(path, return_tensors, model_to_load, torch_dtype)` gives the config dict
  (called from `PreTrainedConfig.get_config_dict` and `AutoTokenizer`) and, from
  `GgufHfQuantizer.get_state_dict`, the dequantised tensors under transformers names. Its tables
  (`GGUF_CONFIG_MAPPING`: flat key renames; tensor names from gguf-py's `MODEL_ARCH_NAMES`) cannot
  express the nested DiffusionGemma config (text_config, layer_types, per-type rope) nor its
  tensors (gguf-py does not know the architecture).

So the one patch point is `load_gguf_checkpoint`: for a file whose `general.architecture` is
"diffusion-gemma" it answers with dgplug's own reader (config from `gguf_import.gguf_to_config`,
tensors from `gguf_import.iter_hf_tensors`, names from `dgplug.names`); any other file goes to
transformers' original function unchanged. transformers 5.19 also binds the function by name in
`configuration_utils` and `models.auto.tokenization_auto` at import (5.24 imports it at call
time), so those bindings are replaced too when they hold the original.

What the loaded model holds: the text stack (decoder weights; the encoder's text layers are tied to
them by transformers) and the encoder's own layer scalars, all dequantised (F32/BF16 bit exact) in
the requested dtype (float32 by default). The vision tower is not in a GGUF: the config carries
transformers' default Gemma 4 vision config (the released model's) and its weights stay randomly
initialised, which transformers reports as missing keys. The sampler defaults stored under
`diffusion.*` become the model's `generation_config`.
"""

from __future__ import annotations

import sys

ARCH = "diffusion-gemma"
MIN_VERSION = (5, 19)  # first release with GgufHfQuantizer calling load_gguf_checkpoint(model_to_load=...)
MAX_VERSION = (5, 24)  # last release checked; newer ones are left alone until checked
_BINDERS = ("transformers.configuration_utils", "transformers.models.auto.tokenization_auto")
_ORIGINAL = None


def supported_version(version: str) -> bool:
    from packaging.version import Version

    return MIN_VERSION <= Version(version).release[:2] <= MAX_VERSION


def _architecture(path) -> str | None:
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        return read_gguf_metadata(str(path))[0].get("general.architecture")
    except Exception:  # noqa: BLE001 - not ours to judge: the original reports it
        return None


def _apply_generation_config(model, gen: dict) -> None:
    """The file's diffusion.* sampler values -> the model's generation config (transformers skips
    generation_config.json for a GGUF)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    values = {k: v for k, v in gen.items() if k != "entropy_bound"}
    try:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        values["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=gen["entropy_bound"])
    except Exception:  # noqa: BLE001 - the class moved: keep transformers' default sampler
        pass
    for k, v in values.items():
        setattr(gc, k, v)


def load_gguf_checkpoint(gguf_checkpoint_path, return_tensors=False, model_to_load=None, torch_dtype=None, **kw):
    """transformers' `load_gguf_checkpoint`, answered by dgplug for diffusion-gemma files."""
    if _architecture(gguf_checkpoint_path) != ARCH:
        return _ORIGINAL(gguf_checkpoint_path, return_tensors=return_tensors, model_to_load=model_to_load,
                         torch_dtype=torch_dtype, **kw)
    from dgplug.converters.gguf_import import gguf_to_config, iter_hf_tensors

    config = gguf_to_config(gguf_checkpoint_path)
    gen = config.pop("generation_config")
    config.pop("mask_token_id", None)  # dgplug's own key; DiffusionGemmaConfig has no such field
    # not in a GGUF: the default Gemma 4 vision tower (5.24's default; 5.19 would build none and fail)
    config.setdefault("vision_config", {"model_type": "gemma4_vision"})
    out = {"config": config, "tokenizer": {}, "tokenizer_config": {}}
    if return_tensors:
        out["tensors"] = dict(iter_hf_tensors(gguf_checkpoint_path, dtype=torch_dtype))
        if model_to_load is not None:
            _apply_generation_config(model_to_load, gen)
    return out


load_gguf_checkpoint._dgplug = True


def register() -> bool:
    """Hook diffusion-gemma into transformers' GGUF loading (idempotent). False where not supported."""
    global _ORIGINAL
    import transformers

    if not supported_version(transformers.__version__):
        return False
    from transformers import modeling_gguf_pytorch_utils as mg

    current = mg.load_gguf_checkpoint
    if getattr(current, "_dgplug", False):
        return True
    _ORIGINAL = current
    mg.load_gguf_checkpoint = load_gguf_checkpoint
    for name in _BINDERS:  # modules that imported the function by name (5.19) and are loaded already
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "load_gguf_checkpoint", None) is current:
            mod.load_gguf_checkpoint = load_gguf_checkpoint
    return True
