"""DiffusionGemma configuration, read from the raw config.json (the class defaults are not the
released values, and `global_head_dim` / `num_global_key_value_heads` hide in `per_layer_config`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CheckpointError

ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion", "DiffusionGemmaModel")
# A vision tower of one small layer: the tiny test models', and the placeholder of a model loaded
# from a GGUF (which holds no vision weights) through transformers.
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=16)
# Released sampler defaults (spec section 5); used where generation_config.json is silent or null.
GENERATION_DEFAULTS = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    layer_types: list[str]
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25
    rope_type_full: str = "proportional"
    rope_type_sliding: str = "default"
    partial_rotary_factor_sliding: float = 1.0
    rope_factor_sliding: float = 1.0  # "linear" and "proportional" divide the frequencies by `factor`
    rope_factor_full: float = 1.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"

    def layer_dims(self, i: int) -> tuple[int, int]:
        """(head_dim, kv_heads) of layer i."""
        if self.layer_types[i] == "sliding_attention":
            return self.head_dim, self.num_key_value_heads
        return self.global_head_dim, self.num_global_key_value_heads


@dataclass
class Config:
    text: TextConfig
    canvas_length: int = 256
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


ROPE_TYPES = ("default", "linear", "proportional")  # transformers' RoPE kinds that dgplug computes


def _rope_factor(params: dict) -> float:
    """The `factor` the frequencies are divided by: transformers' "linear" and "proportional" use it,
    "default" ignores it."""
    return float(params.get("factor") or 1.0) if params.get("rope_type") in ("linear", "proportional") else 1.0


def _full_layer_override(tc: dict, key: str):
    plc = tc.get("per_layer_config") or {}
    for i, t in enumerate(tc.get("layer_types") or []):
        if t == "full_attention":
            for k in (str(i), i, "full_attention"):
                if k in plc and key in plc[k]:
                    return plc[k][key]
    return None


def from_dict(raw: dict, source: str = "config.json") -> Config:
    """Build a Config from a config.json dict; one clear error when it is not DiffusionGemma."""
    if raw.get("model_type") != "diffusion_gemma":
        archs = raw.get("architectures")
        raise CheckpointError(
            f"{source}: not a DiffusionGemma config (model_type={raw.get('model_type')!r}, architectures={archs})"
        )
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise CheckpointError(f"{source}: missing text_config")
    for key, what in ((raw.get("tie_word_embeddings") is False, "tie_word_embeddings=false (separate encoder, decoder "
                       "and lm_head weights)"), (bool(tc.get("attention_bias")), "attention_bias=true")):
        if key:
            raise CheckpointError(f"{source}: {what} is not supported")
    try:
        n = int(tc["num_hidden_layers"])
        layer_types = tc.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)
        ]
        if layer_types[-1] != "full_attention":  # as transformers: the last layer is always full
            layer_types = [*layer_types[:-1], "full_attention"]
            tc = dict(tc, layer_types=layer_types)
        # transformers writes a full layer's head_dim into per_layer_config only when it differs
        # (an empty {} when no layer differs, as in the Sudoku model, whose full layers keep 32);
        # with no per_layer_config at all, its class default (512) applies
        ghd = (tc.get("global_head_dim") or _full_layer_override(tc, "head_dim")
               or (tc.get("head_dim", 256) if "per_layer_config" in tc else 512))
        gkv = (
            tc.get("num_global_key_value_heads")
            or _full_layer_override(tc, "num_key_value_heads")
            or tc["num_key_value_heads"]
        )
        rope = tc.get("rope_parameters") or {}
        full = rope.get("full_attention") or {}
        sliding = rope.get("sliding_attention") or {}
        text = TextConfig(
            vocab_size=int(tc["vocab_size"]),
            hidden_size=int(tc["hidden_size"]),
            intermediate_size=int(tc["intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(tc["num_attention_heads"]),
            num_key_value_heads=int(tc["num_key_value_heads"]),
            head_dim=int(tc.get("head_dim", 256)),
            global_head_dim=int(ghd),
            num_global_key_value_heads=int(gkv),
            num_experts=int(tc["num_experts"]),
            top_k_experts=int(tc["top_k_experts"]),
            moe_intermediate_size=int(tc["moe_intermediate_size"]),
            sliding_window=int(tc.get("sliding_window", 1024)),
            layer_types=list(layer_types),
            rope_theta_sliding=float(sliding.get("rope_theta", 10_000.0)),
            rope_theta_full=float(full.get("rope_theta", 1_000_000.0)),
            partial_rotary_factor_full=float(full.get("partial_rotary_factor", 1.0 if full else 0.25)),
            rope_type_full=str(full.get("rope_type", "proportional")),
            rope_type_sliding=str(sliding.get("rope_type", "default")),
            partial_rotary_factor_sliding=float(sliding.get("partial_rotary_factor", 1.0)),
            rope_factor_sliding=_rope_factor(sliding),
            rope_factor_full=_rope_factor(full),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=float(tc.get("final_logit_softcapping") or 30.0),
            max_position_embeddings=int(tc.get("max_position_embeddings", 131_072)),
            pad_token_id=int(tc.get("pad_token_id", 0) if tc.get("pad_token_id") is not None else 0),
            eos_token_id=tc.get("eos_token_id", 1),
            bos_token_id=int(tc.get("bos_token_id", 2) or 2),
            hidden_activation=str(tc.get("hidden_activation", "gelu_pytorch_tanh")),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: text_config lacks {e.args[0]!r}") from None
    if text.hidden_activation != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: hidden_activation {text.hidden_activation!r} is not supported")
    if tc.get("use_bidirectional_attention") == "all":
        raise CheckpointError(f"{source}: use_bidirectional_attention='all' is not supported")
    for kind, t in (("sliding_attention", text.rope_type_sliding), ("full_attention", text.rope_type_full)):
        if t not in ROPE_TYPES:  # yarn, llama3, dynamic, longrope: not implemented, never silently dropped
            raise CheckpointError(f"{source}: rope_parameters[{kind!r}] has rope_type {t!r}; dgplug implements "
                                  f"{', '.join(ROPE_TYPES)}")
    for i, t in enumerate(text.layer_types):
        if t not in ("sliding_attention", "full_attention"):
            raise CheckpointError(f"{source}: layer_types[{i}] = {t!r} is unknown")
    if len(text.layer_types) != n:
        raise CheckpointError(f"{source}: layer_types lists {len(text.layer_types)} layers, num_hidden_layers is {n}")
    if not 1 <= text.top_k_experts <= text.num_experts:  # a GGUF's expert_used_count / expert_count
        raise CheckpointError(f"{source}: top_k_experts is {text.top_k_experts}; a model of {text.num_experts} "
                              f"experts (num_experts) routes each token to 1 to {text.num_experts}")
    return Config(
        text=text,
        canvas_length=int(raw.get("canvas_length") or 256),
        image_token_id=raw.get("image_token_id"),
        boi_token_id=raw.get("boi_token_id"),
        eoi_token_id=raw.get("eoi_token_id"),
        raw=raw,
    )


def refuse_quantized(raw: dict, source) -> None:
    """The converters read original checkpoints: a config.json with a quantization_config is one
    error naming the file and the method, before any work."""
    qc = raw.get("quantization_config")
    if qc:
        what = qc.get("quant_method", "?") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{source}: checkpoint is already quantized (quantization_config quant_method="
                              f"{what!r}); convert from the original bf16 checkpoint")


def read_config_json(path: str | Path) -> tuple[dict, Path]:
    """The raw config.json dict of a checkpoint directory (or the file itself), and its path."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise CheckpointError(f"{f}: no config.json")
    return _read_json(f), f


def _read_json(f: Path):
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def load_config(path: str | Path) -> Config:
    raw, f = read_config_json(path)
    return from_dict(raw, str(f))


def load_generation_defaults(path: str | Path) -> dict:
    """Sampler defaults from generation_config.json; nulls and absent keys take the released values."""
    out = dict(GENERATION_DEFAULTS)
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return out
    g = _read_json(f)
    sc = g.get("sampler_config") or {}
    if isinstance(sc, dict) and sc.get("entropy_bound") is not None:
        out["entropy_bound"] = float(sc["entropy_bound"])
    for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
        if g.get(k) is not None:
            out[k] = g[k]
    for k in ("eos_token_id", "pad_token_id", "bos_token_id", "max_length"):
        if g.get(k) is not None:
            out[k] = g[k]
    return out


def special_token_id(gen: dict, key: str):
    """eos/pad/bos id as transformers' DiffusionGemma `generate` resolves it: the generation config's
    value, else the global default of the installed transformers' DiffusionGemmaGenerationConfig
    (5.11: eos [1, 106, 50] and pad 0; 5.24: none), else None. Never the text config's ids."""
    if gen.get(key) is not None:
        return gen[key]
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    return DiffusionGemmaGenerationConfig._get_default_generation_params().get(key)
