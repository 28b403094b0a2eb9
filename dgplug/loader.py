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

from . import names
from .checkpoint import SafetensorsCheckpoint, validate
from .config import Config, load_config, load_generation_defaults
from .errors import CheckpointError
from .model import DiffusionGemma, inv_freq

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def param_name(hf: str) -> str:
    """Checkpoint name -> dgplug parameter name (the decoder prefix goes, encoder scalars gather)."""
    if hf.startswith(names.HF_PREFIX):
        return hf[len(names.HF_PREFIX):]
    raise KeyError(hf)


def build(cfg: Config, tensors, dtype=None, device=None, generation_defaults=None, check_finite=True) -> DiffusionGemma:
    """Assemble a model from an iterable of (checkpoint name, tensor)."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg, generation_defaults)
    params = dict(model.named_parameters())
    enc_scalars = [None] * cfg.text.num_hidden_layers
    seen = set()
    first_dtype = None
    for hf, t in tensors:
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


def _assign(model, name: str, t: torch.Tensor):
    mod = model
    *path, leaf = name.split(".")
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=False))


def load(path, dtype=None, device=None, check_finite: bool = True) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint directory (config.json + safetensors) as a dgplug model.

    dtype: torch dtype or name ("bf16", "fp32", ...); default: the checkpoint's own.
    device: where to put the weights (default CPU)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    dtype = resolve_dtype(dtype)
    cfg = load_config(path)
    ckpt = SafetensorsCheckpoint(path)
    specs = validate(ckpt, cfg)
    model = build(cfg, ((s.hf, ckpt.get(s.hf)) for s in specs), dtype, device, load_generation_defaults(path),
                  check_finite)
    model.source = str(path)
    model.tokenizer = load_tokenizer(path)
    return model


def load_tokenizer(path: Path):
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer should not stop id-based use
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from None
