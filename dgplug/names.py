"""The one table of tensor names: Hugging Face checkpoint <-> GGUF (and shapes).

Every converter, loader and adapter reads names from here. HF names are relative to
`model.decoder.` unless they start with `model.`; `{L}` is the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass

HF_PREFIX = "model.decoder."
ENCODER_SCALAR = "model.encoder.language_model.layers.{L}.layer_scalar"
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

# (hf name under model.decoder., gguf name). Order is the canonical tensor order.
TOP = [
    ("embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("self_conditioning.pre_norm.weight", "self_cond_pre_norm.weight"),
    ("self_conditioning.gate_proj.weight", "self_cond_gate.weight"),
    ("self_conditioning.up_proj.weight", "self_cond_up.weight"),
    ("self_conditioning.down_proj.weight", "self_cond_down.weight"),
]

LAYER = [
    ("layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight"),
    ("layers.{L}.self_attn.q_proj.weight", "blk.{L}.attn_q.weight"),
    ("layers.{L}.self_attn.k_proj.weight", "blk.{L}.attn_k.weight"),
    ("layers.{L}.self_attn.v_proj.weight", "blk.{L}.attn_v.weight"),  # sliding layers only
    ("layers.{L}.self_attn.o_proj.weight", "blk.{L}.attn_output.weight"),
    ("layers.{L}.self_attn.q_norm.weight", "blk.{L}.attn_q_norm.weight"),
    ("layers.{L}.self_attn.k_norm.weight", "blk.{L}.attn_k_norm.weight"),
    ("layers.{L}.post_attention_layernorm.weight", "blk.{L}.post_attention_norm.weight"),
    ("layers.{L}.pre_feedforward_layernorm.weight", "blk.{L}.ffn_norm.weight"),
    ("layers.{L}.mlp.gate_proj.weight", "blk.{L}.ffn_gate.weight"),
    ("layers.{L}.mlp.up_proj.weight", "blk.{L}.ffn_up.weight"),
    ("layers.{L}.mlp.down_proj.weight", "blk.{L}.ffn_down.weight"),
    ("layers.{L}.post_feedforward_layernorm_1.weight", "blk.{L}.post_ffw_norm_1.weight"),
    ("layers.{L}.pre_feedforward_layernorm_2.weight", "blk.{L}.pre_ffw_norm_2.weight"),
    ("layers.{L}.post_feedforward_layernorm_2.weight", "blk.{L}.post_ffw_norm_2.weight"),
    ("layers.{L}.post_feedforward_layernorm.weight", "blk.{L}.post_ffw_norm.weight"),
    ("layers.{L}.router.proj.weight", "blk.{L}.ffn_gate_inp.weight"),
    ("layers.{L}.router.scale", "blk.{L}.ffn_gate_inp.scale"),
    ("layers.{L}.router.per_expert_scale", "blk.{L}.ffn_down_exps.scale"),
    ("layers.{L}.experts.gate_up_proj", "blk.{L}.ffn_gate_up_exps.weight"),
    ("layers.{L}.experts.down_proj", "blk.{L}.ffn_down_exps.weight"),
    ("layers.{L}.layer_scalar", "blk.{L}.layer_output_scale.weight"),
]
# The encoder's own layer scalars (the only encoder text tensors in the checkpoint).
ENCODER_LAYER = [(ENCODER_SCALAR, "blk.{L}.enc_layer_output_scale.weight")]
ROPE_FREQS_GGUF = "rope_freqs.weight"
# dgplug's own GGUF key (llama.cpp ignores it): the source tokenizer has no merges and no decoder, so
# it decodes with a space between tokens (llama.cpp, and dgplug without the key, join the pieces)
TOKENS_SPACED = "tokenizer.dgplug.decode_with_spaces"
# Gemma 4 tokens llama.cpp's chat parser must read: its converter writes them USER_DEFINED (rendered)
GEMMA4_VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                   "<tool_response|>", '<|"|>'})


@dataclass(frozen=True)
class TensorSpec:
    hf: str  # full checkpoint name
    gguf: str
    shape: tuple[int, ...]
    layer: int | None  # None for top-level tensors
    kind: str  # "embed", "norm", "linear", "experts", "router", "scalar"


def _kind(hf: str) -> str:
    if "embed_tokens" in hf:
        return "embed"
    if "experts." in hf:
        return "experts"
    if "router." in hf:
        return "router"
    if "layer_scalar" in hf:
        return "scalar"
    if "norm" in hf:
        return "norm"
    return "linear"


def text_tensors(tc) -> list[TensorSpec]:
    """Every text tensor of a checkpoint, in canonical order, with its expected shape.

    `tc` is a `dgplug.config.TextConfig`.
    """
    H, V, I, E, Im = tc.hidden_size, tc.vocab_size, tc.intermediate_size, tc.num_experts, tc.moe_intermediate_size
    nh = tc.num_attention_heads
    shapes_top = {
        "embed_tokens.weight": (V, H),
        "norm.weight": (H,),
        "self_conditioning.pre_norm.weight": (H,),
        "self_conditioning.gate_proj.weight": (I, H),
        "self_conditioning.up_proj.weight": (I, H),
        "self_conditioning.down_proj.weight": (H, I),
    }
    out = [TensorSpec(HF_PREFIX + hf, gg, shapes_top[hf], None, _kind(hf)) for hf, gg in TOP]
    for L in range(tc.num_hidden_layers):
        sliding = tc.layer_types[L] == "sliding_attention"
        hd = tc.head_dim if sliding else tc.global_head_dim
        kvh = tc.num_key_value_heads if sliding else tc.num_global_key_value_heads
        shapes = {
            "input_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (nh * hd, H),
            "self_attn.k_proj.weight": (kvh * hd, H),
            "self_attn.v_proj.weight": (kvh * hd, H),
            "self_attn.o_proj.weight": (H, nh * hd),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (I, H),
            "mlp.up_proj.weight": (I, H),
            "mlp.down_proj.weight": (H, I),
            "router.proj.weight": (E, H),
            "router.scale": (H,),
            "router.per_expert_scale": (E,),
            "experts.gate_up_proj": (E, 2 * Im, H),
            "experts.down_proj": (E, H, Im),
            "layer_scalar": (1,),
        }
        for hf, gg in LAYER:
            suffix = hf.split(".", 2)[2]
            if suffix == "self_attn.v_proj.weight" and not sliding:
                continue
            shape = shapes.get(suffix, (H,))
            out.append(TensorSpec(HF_PREFIX + hf.format(L=L), gg.format(L=L), shape, L, _kind(hf)))
        for hf, gg in ENCODER_LAYER:
            out.append(TensorSpec(hf.format(L=L), gg.format(L=L), (1,), L, "scalar"))
    return out


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)
