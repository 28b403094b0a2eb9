"""transformers loading of dgplug-quantized checkpoints (docs/quantized-format.md), weights kept packed.

`register()` (idempotent; call it from `import dgplug`) registers `quant_method = "dgplug"` with
transformers' `register_quantization_config` / `register_quantizer`. Then
`DiffusionGemmaForBlockDiffusion.from_pretrained(OUTDIR)` (and the Auto classes) build the model on
meta, swap every quantized module for a packed twin whose tensors carry the checkpoint's own names,
and load the packed tensors as they are:

* a quantized `nn.Linear` `X` (checkpoint tensor `X.weight`) becomes `PackedLinear`: a child module
  `weight` holding parameters `qweight`, `scale` (and `zero` for int4), i.e. exactly the checkpoint
  names `X.weight.qweight` ...; `forward` dequantises the weight transiently (the torch twin of a
  packed-linear kernel) and runs `F.linear`. On CUDA the dequantised weight is kept (outside the
  state dict, one copy for the tied encoder/decoder pair): per call the dequantisation costs
  several times the matmul. `DGPLUG_PACKED_LINEARS=1` dequantises per call there too.
* `experts` becomes `PackedExperts`: children `gate_up_proj` / `down_proj` holding the packed
  tensors; `forward` wraps them (no copy) in `kernels.quantized_weight.QuantizedWeight` and calls
  `kernels.moe.moe_forward` (Triton on CUDA, the torch twin otherwise).

The encoder's text layers are tied to the decoder's by transformers; the tie map is rewritten from
`X.weight` to `X.weight.qweight` / `.scale` / `.zero`, so the packed tensors exist once in memory.
Checkpoints written with `quantize_embedding=True` (int8 embedding) are not loadable here yet.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_METHOD = "dgplug"
_REGISTERED = False


def _packed_shapes(scheme: str, lead: tuple, N: int, K: int, group_size: int) -> dict:
    if scheme == "int4":
        ng = -(-K // group_size)
        return {"qweight": (torch.uint8, lead + (N, K // 2)), "scale": (torch.float16, lead + (N, ng)),
                "zero": (torch.uint8, lead + (N, ng))}
    qdt = torch.int8 if scheme == "int8" else torch.float8_e4m3fn
    return {"qweight": (qdt, lead + (N, K)), "scale": (torch.float32, lead + (N,))}


class PackedTensor(nn.Module):
    """Holds the packed tensors of one quantized weight as frozen parameters (checkpoint names)."""

    def __init__(self, scheme: str, shape: tuple, group_size: int, device="meta"):
        super().__init__()
        *lead, N, K = shape
        self.scheme, self.group_size, self.logical_shape = scheme, group_size, tuple(shape)
        for name, (dt, shp) in _packed_shapes(scheme, tuple(lead), N, K, group_size).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shp, dtype=dt, device=device), requires_grad=False))

    def quantized_weight(self):
        from dgplug.kernels.moe import QuantizedWeight

        return QuantizedWeight(self.scheme, self.qweight, self.scale, getattr(self, "zero", None), self.group_size,
                               self.logical_shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        from dgplug.converters.quant import dequantize

        parts = {"qweight": self.qweight, "scale": self.scale, "group_size": self.group_size}
        if self.scheme == "int4":
            parts["zero"] = self.zero
        return dequantize(parts, dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={self.logical_shape}, group_size={self.group_size}"


class PackedLinear(nn.Module):
    """Bias-free linear over a packed weight [out, in]."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = PackedTensor(scheme, (out_features, in_features), group_size, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _keep_dense(x):
            drop_dense(self.weight.qweight)
            return F.linear(x, self.weight.dequantize(x.dtype))
        return F.linear(x, kept_dense(self.weight.qweight, x.dtype, self.weight.dequantize))


def _keep_dense(x: torch.Tensor) -> bool:
    """Whether a packed linear on x's device keeps its dequantised weight (CUDA, unless
    DGPLUG_PACKED_LINEARS=1): per call, the dequantisation costs several times the matmul."""
    from dgplug.kernels.quantized_weight import linears_stay_packed

    return x.is_cuda and not linears_stay_packed()


def kept_dense(packed: torch.Tensor, dtype: torch.dtype, dequantize) -> torch.Tensor:
    """dequantize(dtype), kept on the packed tensor itself (also the GGUF modules' weights): the
    modules tied to it share one copy; a reload, an in-place copy_ or a move of the packed tensor
    makes a new one (the old one dropped first); and no other tensor's copy is ever taken for it,
    as a cache keyed by address could once another model's tensor reuses that address."""
    kept = packed.__dict__.setdefault("_dgplug_dense", {})
    stamp = (packed.device, packed.data_ptr(), 0 if packed.is_inference() else packed._version)
    got = kept.get(dtype)
    if got is None or got[0] != stamp:
        kept.pop(dtype, None)
        got = kept[dtype] = (stamp, dequantize(dtype))
    return got[1]


def dense_copies(packed: torch.Tensor) -> dict:
    """{dtype: the dequantised copy kept on `packed`} (empty where none is kept)."""
    return {dt: dense for dt, (_, dense) in packed.__dict__.get("_dgplug_dense", {}).items()}


def drop_dense(packed: torch.Tensor) -> None:
    """Forget a kept copy (a call off CUDA: its GPU memory goes)."""
    packed.__dict__.pop("_dgplug_dense", None)


class PackedExperts(nn.Module):
    """Routed experts over packed gate_up [E, 2I, H] and down [E, H, I] (kernels.moe)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, scheme: str, group_size: int, device="meta"):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter
        self.gate_up_proj = PackedTensor(scheme, (num_experts, 2 * inter, hidden), group_size, device)
        self.down_proj = PackedTensor(scheme, (num_experts, hidden, inter), group_size, device)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from dgplug.kernels.moe import moe_forward

        return moe_forward(hidden_states, top_k_index, top_k_weights.float(), self.gate_up_proj.quantized_weight(),
                           self.down_proj.quantized_weight())


def _is_quantized_name(key: str, qc: dict) -> bool:
    """`key` is a module path relative to the text stack (decoder.* / encoder.language_model.*)."""
    import re

    if key.startswith("encoder.language_model."):
        key = "decoder." + key[len("encoder.language_model."):]
    if not key.startswith("decoder."):
        return False
    return bool(re.fullmatch(
        r"decoder\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|experts)"
        r"|self_conditioning\.(gate|up|down)_proj)", key))


def replace_modules(model, scheme: str, group_size: int) -> list[str]:
    """Swap the quantized modules of a (meta) DiffusionGemma model for packed twins; returns their names."""
    qc = {"scheme": scheme}
    replaced = []
    for name, module in list(model.named_modules()):
        key = name[len("model."):] if name.startswith("model.") else name
        if not _is_quantized_name(key, qc):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dev = next(iter(module.parameters())).device
        if isinstance(module, nn.Linear):
            new = PackedLinear(module.in_features, module.out_features, scheme, group_size, dev)
        elif key.endswith("experts"):
            new = PackedExperts(module.num_experts, module.hidden_dim, module.intermediate_dim, scheme, group_size, dev)
        else:
            continue
        parent._modules[child] = new
        replaced.append(name)
    return replaced


def _rewrite_ties(model, replaced: list[str]) -> None:
    """X.weight (linear) / X.gate_up_proj (experts) tie entries -> their packed tensors."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for mod in model.modules():
        keys = getattr(mod, "all_tied_weights_keys", None)
        if not keys:
            continue
        new = {}
        for tgt, src in keys.items():
            tgt_full = tgt
            # the map of a submodel is relative to it; the suffix test is enough for the rewrite
            if any(tgt_full.endswith(r[len("model."):] + "." + leaf) or tgt_full.endswith(r + "." + leaf)
                   for r in replaced for leaf in ("weight", "gate_up_proj", "down_proj")):
                for part in ("qweight", "scale", "zero"):
                    cand = f"{tgt}.{part}"
                    if mod is model and cand not in params:
                        continue
                    new[cand] = f"{src}.{part}"
            else:
                new[tgt] = src
        mod.all_tied_weights_keys = new


def register() -> bool:
    """Register the dgplug quantization method with transformers (idempotent). False if unavailable."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception:  # noqa: BLE001 - transformers missing or too old
        return False

    class DGPlugQuantConfig(QuantizationConfigMixin):
        def __init__(self, scheme: str = "int4", group_size: int | None = 128, modules_to_not_convert=None,
                     embedding_scheme=None, clip: bool = False, format_version: int = 1, quant_method=QUANT_METHOD,
                     **kwargs):
            self.quant_method = QUANT_METHOD
            self.scheme = scheme
            self.group_size = group_size
            self.modules_to_not_convert = list(modules_to_not_convert or [])
            self.embedding_scheme = embedding_scheme
            self.clip = clip
            self.format_version = format_version
            from dgplug.converters.quant import FORMAT_VERSION, SCHEMES

            if scheme not in SCHEMES:
                raise ValueError(f"quantization_config.scheme {scheme!r} is not one of {SCHEMES}")
            if int(format_version) > FORMAT_VERSION:
                raise ValueError(f"quantization_config.format_version {format_version} is newer than this dgplug")

    class DGPlugHfQuantizer(HfQuantizer):
        requires_calibration = True  # only pre-quantized checkpoints (made by `dgplug convert`)

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("dgplug quantization loads checkpoints made by `dgplug convert --quant`; "
                                 "it does not quantize on load")
            if self.quantization_config.embedding_scheme:
                raise ValueError("this checkpoint has an int8 embedding (quantize_embedding=True), which transformers "
                                 "loading does not support yet; load it with dgplug.load or reconvert without it")

        def _process_model_before_weight_loading(self, model, **kwargs):
            qc = self.quantization_config
            gs = int(qc.group_size or 128)
            replaced = replace_modules(model, qc.scheme, gs)
            _rewrite_ties(model, replaced)
            model._dgplug_packed = replaced
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self) -> bool:
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DGPlugQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DGPlugHfQuantizer)
    _REGISTERED = True
    return True


def packed_bytes(model) -> tuple[int, int]:
    """(bytes of packed tensors, bytes of all other parameters and buffers), counting shared tensors once."""
    seen = set()
    packed = other = 0
    for mod in model.modules():
        for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel() * p.element_size()
            if isinstance(mod, PackedTensor):
                packed += n
            else:
                other += n
    return packed, other


__all__ = ["register", "PackedLinear", "PackedExperts", "PackedTensor", "packed_bytes", "replace_modules",
           "QUANT_METHOD"]
