"""`dgplug.load(path)`: a checkpoint directory (safetensors) -> a ready DiffusionGemma.

The model is built on the meta device and every parameter is assigned straight from the file,
tensor by tensor, so peak memory is the model plus one tensor. The text stack is stored once
under `model.decoder.*` and serves both modes; the encoder's own layer scalars come from
`model.encoder.language_model.layers.N.layer_scalar`. Vision tensors are skipped: dgplug runs
the text model and rejects image inputs with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import hub, names
from .checkpoint import SafetensorsCheckpoint, validate
from .config import Config, load_config, load_generation_defaults
from .errors import CheckpointError
from .model import DiffusionGemma, inv_freq

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """The compute dtype asked for: a torch dtype or a name as transformers takes them ("bf16",
    "bfloat16", "torch.bfloat16", any case); None or "auto": the checkpoint's own. The model runs in
    float32, bfloat16 or float16 only; any other dtype is refused here, before anything is read."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return None
    name = dtype if isinstance(dtype, str) else None
    if name is not None:
        dtype = DTYPES.get(name.strip().lower().removeprefix("torch."))
    if dtype not in DTYPES.values():
        raise CheckpointError(f"dtype {name if name is not None else dtype!r}: dgplug computes in float32, bfloat16 or "
                              f"float16 (names: {', '.join(sorted(DTYPES))}, or 'auto' for the checkpoint's own)")
    return dtype


def resolve_device(device) -> torch.device | None:
    """torch.device(device), or one error naming it (a malformed name; CUDA asked of a torch without it)."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device {device!r}: {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
    return d


def param_name(hf: str) -> str:
    """Checkpoint name -> dgplug parameter name (the decoder prefix goes, encoder scalars gather)."""
    if hf.startswith(names.HF_PREFIX):
        return hf[len(names.HF_PREFIX):]
    raise KeyError(hf)


def _gpu_form_wanted(t) -> bool:
    return t.device.type == "cuda"


def for_gpu(name: str, t, dtype: torch.dtype):
    """A packed tensor as the GPU path wants it: int4 experts in the order dgplug's MoE kernel reads
    fastest (kernels.quantized_weight.for_gpu_kernels); the linears of a dgplug int4/int8/fp8 checkpoint
    dequantised once to `dtype` (per call, the dequantisation costs several times the matmul:
    cuBLAS on 16-bit weights instead, for ~2.3 GB more at the release's size; DGPLUG_PACKED_LINEARS=1
    keeps them packed); a GGUF's linears and its embedding table likewise, in the dtype they serve
    (decoded per call, every step decodes every weight again: the tied table alone is 0.74 G values
    for the head; dense in bf16, the table costs ~0.9 GB more than its Q6_K blocks at the release's
    size); GGUF experts keep their blocks (the MoE kernels decode them tile by tile)."""
    from dgplug.kernels.ggml import GGMLWeight
    from dgplug.kernels.quantized_weight import QuantizedWeight, for_gpu_kernels, linears_stay_packed

    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return for_gpu_kernels(t, "gate_up" if name.endswith("gate_up_proj") else "down")
    if linears_stay_packed():
        return t
    if isinstance(t, QuantizedWeight):
        return t.dequantize(dtype)
    if isinstance(t, GGMLWeight):
        return t.dequantize()
    return t


def build(cfg: Config, tensors, dtype=None, device=None, generation_defaults=None, check_finite=True) -> DiffusionGemma:
    """Assemble a model from an iterable of (checkpoint name, tensor)."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg, generation_defaults)
    params = dict(model.named_parameters())
    enc_scalars = [None] * cfg.text.num_hidden_layers
    seen = set()
    first_dtype = None
    for hf, t in tensors:
        if names.is_vision(hf):
            continue
        packed = not isinstance(t, torch.Tensor)  # QuantizedWeight / GGMLWeight: stays packed in memory
        if packed and hf.endswith("embed_tokens.weight") and not hasattr(t, "rows"):
            t, packed = t.dequantize(dtype or torch.bfloat16), False  # the table must serve row chunks
        if packed:
            if check_finite and hasattr(t, "nonfinite") and t.nonfinite():
                raise CheckpointError(f"tensor {hf} holds NaN or Inf values")
            t = t.to(device or "cpu")
            if _gpu_form_wanted(t):
                t = for_gpu(hf, t, dtype or first_dtype or torch.bfloat16)
        else:
            if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor {hf} holds NaN or Inf values")
            first_dtype = first_dtype or t.dtype
            target = dtype or first_dtype
            t = t.to(device=device or "cpu", dtype=target if t.is_floating_point() else t.dtype)
        if hf.startswith("model.encoder.language_model.layers.") and hf.endswith(".layer_scalar"):
            enc_scalars[int(hf.split(".")[4])] = t.reshape(())
            continue
        name = param_name(hf)
        if name not in params:
            raise CheckpointError(f"tensor {hf} has no place in the model")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"tensor {hf} has shape {list(t.shape)}, expected {list(p.shape)}")
        _assign(model, name, t)
        seen.add(name)
    missing = [n for n in params if n not in seen and n != "encoder_layer_scalar"]
    if missing:
        raise CheckpointError(f"no tensor for model.decoder.{missing[0]}")
    if any(s is None for s in enc_scalars):
        raise CheckpointError(f"missing {names.ENCODER_SCALAR.format(L=enc_scalars.index(None))}")
    _assign(model, "encoder_layer_scalar", torch.stack(enc_scalars))
    model.inv_freq_sliding = inv_freq(cfg.text, True).to(device or "cpu")
    model.inv_freq_full = inv_freq(cfg.text, False).to(device or "cpu")
    return model.eval()


def _assign(model, name: str, t):
    mod = model
    *path, leaf = name.split(".")
    for p in path:
        mod = getattr(mod, p)
    if isinstance(t, torch.Tensor):
        setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=False))
    else:  # packed quantized weight: a plain attribute in place of the parameter
        delattr(mod, leaf)
        setattr(mod, leaf, t)


def load(path, dtype=None, device=None, check_finite: bool = True, *, revision: str | None = None,
         token: str | bool | None = None, gguf_file: str | None = None) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint as a dgplug model.

    path: a Hugging Face directory (config.json + safetensors), a dgplug-quantized directory
    (int4/int8/fp8: weights stay packed in memory), a .gguf file (or a directory holding one), or
    a hub id "owner/name" (dgplug.hub: `revision`, `token`, HF_HUB_OFFLINE as in transformers;
    `gguf_file` names one .gguf file of the repository or directory).
    dtype: torch dtype or name ("bf16", "fp32", "torch.float16", ...); default (or "auto"): the checkpoint's own.
    device: where to put the weights (default CPU)."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)  # before anything is read
    repo = str(path) if hub.is_hub_id(path) else None
    path = hub.resolve(path, revision=revision, token=token, gguf_file=gguf_file)
    gguf = gguf_file_of(path)
    if gguf is not None:
        model = load_gguf(gguf, dtype, device, check_finite)
    elif (cfg := load_config(path)).raw.get("quantization_config"):
        model = load_quantized(path, cfg, dtype, device)
    else:
        ckpt = SafetensorsCheckpoint(path)
        specs = validate(ckpt, cfg)
        model = build(cfg, ((s.hf, ckpt.get(s.hf)) for s in specs), dtype, device, load_generation_defaults(path),
                      check_finite)
        model.source = str(path)
        model.tokenizer = load_tokenizer(path)
    if repo is not None:  # name the model as the user did, not by its cache folder
        model.source = repo + (f"/{gguf_file}" if gguf_file else "")
    return model


def load_tokenizer(path: Path):
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer should not stop id-based use
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from None


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf (or the first shard of the one
    split GGUF) in a directory without safetensors."""
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        with open(path, "rb") as f:  # the magic only: a checkpoint file can be tens of GB
            return path if f.read(4) == b"GGUF" else None
    found = sorted(path.glob("*.gguf"))
    if not found or any(path.glob("*.safetensors")):
        return None
    from dgplug.converters.gguf_import import model_file

    if (one := model_file(found)) is None:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(f.name for f in found)}): name one")
    return one


def gguf_dtype(device) -> torch.dtype | None:
    """A GGUF's dtype when none is asked for: bf16 on a GPU (fp32 there would run every matmul, the
    MoE's included, in fp32, and double the dequantised linears and table), else None (fp32)."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else None


def load_gguf(path: Path, dtype=None, device=None, check_finite=True) -> DiffusionGemma:
    """Architecture from the GGUF metadata, tokenizer from the vocabulary; weights of the ggml block types
    (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K, IQ4_XS, IQ4_NL) stay packed (kernels.ggml.GGMLWeight, served in
    `dtype`, default fp32, bf16 on a GPU: gguf_dtype), every other tensor is dequantised."""
    from dgplug.converters.gguf_import import gguf_to_config, iter_hf_tensors, open_gguf, tokenizer_from_gguf

    from .config import from_dict

    dtype = dtype or gguf_dtype(device)
    reader = open_gguf(path, "c")  # parsed once (gguf-py reads the whole vocabulary: most of a load's time)
    raw = gguf_to_config(reader)
    gen = raw.pop("generation_config", None)
    raw.pop("mask_token_id", None)
    cfg = from_dict(raw, str(path))
    model = build(cfg, iter_hf_tensors(reader, dtype, packed=True), dtype, device, gen, check_finite)
    model.source = str(path)
    try:
        model.tokenizer = tokenizer_from_gguf(reader)
    except Exception:  # noqa: BLE001 - a GGUF without a usable vocabulary still runs on ids
        model.tokenizer = None
    return model


def load_quantized(path: Path, cfg: Config, dtype=None, device=None) -> DiffusionGemma:
    """A dgplug int4/int8/fp8 directory: linear and expert weights stay packed (QuantizedWeight)."""
    from dgplug.converters.quant import load_quantized_tensors

    qc = cfg.raw["quantization_config"]
    if qc.get("quant_method") != "dgplug":
        raise CheckpointError(f"{path / 'config.json'}: quantization method {qc.get('quant_method')!r} is not dgplug's")
    tensors = load_quantized_tensors(path)
    order = [s.hf for s in names.text_tensors(cfg.text)]
    missing = [n for n in order if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}")
    model = build(cfg, ((n, tensors[n]) for n in order), dtype, device, load_generation_defaults(path))
    model.source = str(path)
    model.tokenizer = load_tokenizer(path)
    return model

def weight_bytes(model) -> tuple[int, int]:
    """(bytes of packed weights, bytes of every other parameter and buffer) of a dgplug model,
    each piece of memory counted once (tied / shared tensors, expert views)."""
    seen: set = set()
    packed = other = 0

    def once(t: torch.Tensor) -> int:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for mod in model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            other += once(t)
        for v in vars(mod).values():
            if not isinstance(v, torch.Tensor) and hasattr(v, "nbytes") and hasattr(v, "dequantize"):
                parts = [v.blocks] if hasattr(v, "blocks") else [v.qweight, v.scale] + ([v.zero] if v.zero is not None else [])
                packed += sum(once(t) for t in parts)
    return packed, other
