"""Tiny DiffusionGemma checkpoints made by transformers itself, offline and deterministic.

Used by the tests, the benchmarks and as the embedded default model. `tiny_text_config`
returns the kwargs of a `DiffusionGemmaTextConfig`; `make_checkpoint` builds the model with
transformers, optionally reshapes its weights, and saves it with `save_pretrained`.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .config import TINY_VISION


def tiny_text_config(**overrides) -> dict:
    tc = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=8,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"][
            :4
        ],
    )
    tc.update(overrides)
    if "layer_types" not in overrides:
        n = tc["num_hidden_layers"]
        tc["layer_types"] = ["full_attention" if (i % 3 == 2 or i == n - 1) else "sliding_attention" for i in range(n)]
    return tc


def build_hf_model(text: dict | None = None, canvas_length: int = 16, seed: int = 0, dtype=torch.float32,
                   qk_norm_scale: float | None = None, peaked: float | None = None, layer_scalars=None,
                   damp: float | None = None, image_token_id: int | None = None):
    """A transformers DiffusionGemmaForBlockDiffusion with random weights.

    qk_norm_scale: multiply q_norm/k_norm weights (0.25 keeps bf16 rounding harmless, spec section 8).
    peaked: multiply the embedding by this factor, so logits are sharp and the stop test fires.
    layer_scalars: optional (decoder_list, encoder_list) of per-layer scalars.
    damp: multiply every layer's output norms (post-attention, post-feedforward) by this factor, so
    the residual stream keeps the canvas token's identity (with `peaked`: confident, stable logits).
    image_token_id: default vocab - 1; one past the vocabulary keeps it out of generated text
    (transformers 5.11 embeds a generated image-token id as pad, 5.24 and dgplug as itself).
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = text or tiny_text_config()
    v = text["vocab_size"]
    cfg = DiffusionGemmaConfig(
        text_config=dict(text),
        vision_config=dict(TINY_VISION),
        canvas_length=canvas_length,
        boi_token_id=v - 3,
        eoi_token_id=v - 2,
        image_token_id=v - 1 if image_token_id is None else image_token_id,
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("router.scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(1.0 + 0.2 * torch.rand(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
        if qk_norm_scale is not None:
            for name, p in model.named_parameters():
                if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                    p.mul_(qk_norm_scale)
        if damp is not None:
            for name, p in model.named_parameters():
                if "vision" not in name and (name.endswith("post_attention_layernorm.weight")
                                             or name.endswith("post_feedforward_layernorm.weight")
                                             or name.endswith("self_conditioning.down_proj.weight")):
                    p.mul_(damp)
        if peaked is not None:
            model.model.decoder.embed_tokens.weight.mul_(peaked)
        dec = model.model.decoder.layers
        enc = model.model.encoder.language_model.layers
        for i in range(len(dec)):
            ds = layer_scalars[0][i] if layer_scalars else 1.0 + 0.05 * i
            es = layer_scalars[1][i] if layer_scalars else ds
            dec[i].layer_scalar.fill_(ds)
            enc[i].layer_scalar.fill_(es)
    return model.to(dtype)


def make_checkpoint(path: str | Path, text: dict | None = None, canvas_length: int = 16, seed: int = 0,
                    dtype=torch.float32, max_shard_size: str | None = None, generation: dict | None = None,
                    tokenizer: bool = True, **kw) -> Path:
    """Save a tiny random checkpoint (config, generation config, safetensors, tokenizer) to `path`."""
    path = Path(path)
    model = build_hf_model(text, canvas_length, seed, dtype, **kw)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for a model of kilobytes is noise
    try:
        model.save_pretrained(path, **save_kw)
    finally:  # both switches as they were (transformers' enable also turns huggingface_hub's on)
        if shown[0]:
            hf_logging.enable_progress_bar()
        (enable_progress_bars if shown[1] else disable_progress_bars)()
    gen = {
        "max_new_tokens": canvas_length,
        "max_denoising_steps": 8,
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "eos_token_id": [1],
        "pad_token_id": 0,  # no bos_token_id: transformers 5.11's DiffusionGemmaGenerationConfig rejects it
    }
    gen.update(generation or {})
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer:
        save_tokenizer(path, model.config.text_config.vocab_size)
    return path


def save_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A WordLevel tokenizer over `vocab_size` entries: specials, then words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    fast.save_pretrained(str(path))


def probe_inputs(batch: int = 2, prompt: int = 12, canvas: int = 16, seed: int = 0):
    """Fixed random (prompt ids, canvas ids) for comparing models."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (batch, prompt), generator=g), torch.randint(5, 500, (batch, canvas), generator=g)


def probe_logits(model, **kw) -> torch.Tensor:
    """fp32 logits of any DiffusionGemma (dgplug's or transformers') on `probe_inputs`."""
    ids, canvas_ids = probe_inputs(**kw)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas_ids).logits.float()


# Operations that read a value back to the host, or whose output shape depends on the data: none
# may run inside a captured CUDA graph (torch.cuda.graph fails, or freezes the value seen at
# capture). What a CPU cannot show: copies to the host (.cpu(), .tolist()); the GPU check captures.
HOST_SYNC = {"_local_scalar_dense", "nonzero", "nonzero_static", "unique", "_unique2", "unique_consecutive",
             "masked_select", "masked_scatter", "is_nonzero", "equal", "bincount", "histc", "repeat_interleave",
             "index(bool)", "index_put(bool)"}


class OpProbe(TorchDispatchMode):
    """Counts the aten operations dispatched inside ``with OpProbe():`` (``seen``) and records each one
    with the shapes it returned (``trace``): two runs on different data with different traces made
    allocations that depend on the data. ``synced()``: the operations seen that are in HOST_SYNC."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()
        self.trace = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if name in ("index", "index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            name += "(bool)"  # a boolean mask index: its shape depends on the data
        self.seen[name] += 1
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.trace.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out

    def synced(self) -> dict:
        return {k: v for k, v in self.seen.items() if k in HOST_SYNC}
