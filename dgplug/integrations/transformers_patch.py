"""`dgplug.patch(model)`: switch a loaded transformers DiffusionGemma to dgplug's kernels, in place.

Liger-Kernel style: nothing is re-loaded or copied. Three swaps, each optional:

- attention: the decoder's attention over [cache; canvas] (no mask, or a key-padding mask) runs
  through `dgplug.kernels.attention`; the encoder's causal attention keeps transformers' SDPA path.
- experts: the routed experts run through `dgplug.kernels.moe.moe_forward` (registered in
  transformers' ExpertsInterface as "dgplug").
- sampler: "fused" replaces each denoise step's head + softmax + multinomial + entropy + soft
  embedding by `dgplug.kernels.sampler.head_sample` (no [B, 256, V] tensor; tokens drawn by
  Gumbel-max on a counter-based generator seeded from torch's global RNG each step);
  "transformers" (default) keeps transformers' own sampler, so a seeded `generate` gives the
  very tokens it gave before the patch.

On CPU the kernels run their PyTorch twins: logits stay within 1e-5 (fp32) of the unpatched
model. `dgplug.unpatch(model)` restores everything. Works with transformers 5.19 through 5.25.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch

ATTN_NAME = "dgplug"
EXPERTS_NAME = "dgplug"


def _dgplug_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """transformers attention-interface function: [B, Hq, Lq, D] in, ([B, Lq, Hq, D], None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa(q, k, v, mask):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kw)[0]

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    bidirectional_keys = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4)
    if causal or scaling not in (None, 1.0) or not bidirectional_keys:
        return sdpa(query, key, value, attention_mask), None
    if attention_mask is None:
        return _canvas_attention(query, key, value, None), None
    # the decoder's mask is a key-padding mask (the same for every query row); anything else goes to SDPA
    per_key = (attention_mask == attention_mask[:, :1, :1, :]).all()
    if torch.compiler.is_compiling():  # a traced branch: no Python bool of a tensor under torch.compile
        return torch.cond(per_key, _canvas_attention_4d, sdpa, (query, key, value, attention_mask)), None
    if bool(per_key):
        return _canvas_attention_4d(query, key, value, attention_mask), None
    return sdpa(query, key, value, attention_mask), None


def _canvas_attention(query, key, value, key_valid):
    """dgplug's attention over [cache; canvas]: every query sees every valid key."""
    from dgplug.kernels.attention import attention

    lq, lk = query.shape[2], key.shape[2]
    q_pos = torch.arange(lk - lq, lk, device=query.device)
    k_pos = torch.arange(lk, device=query.device)
    out = attention(query, key, value, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid, causal=False, window=None)
    return out.transpose(1, 2).contiguous()


def _canvas_attention_4d(query, key, value, mask):
    return _canvas_attention(query, key, value, mask[:, 0, 0, :])


def _dgplug_experts(self, hidden_states, top_k_index, top_k_weights):
    from dgplug.kernels.moe import moe_forward

    return moe_forward(hidden_states, top_k_index, top_k_weights.float(), self.gate_up_proj, self.down_proj)


def register() -> None:
    """Register dgplug's attention and experts functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _dgplug_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # the same boolean masks as the sdpa path
    try:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(EXPERTS_NAME, _dgplug_experts)
    except ImportError:  # pragma: no cover - transformers without the experts interface
        pass


def _text_configs(model):
    cfg = model.config
    return [c for c in (cfg, getattr(cfg, "text_config", None)) if c is not None]


def patch(model, attention: bool = True, experts: bool = True, sampler: str = "transformers"):
    """Patch a transformers DiffusionGemmaForBlockDiffusion in place; returns the model."""
    if sampler not in ("transformers", "fused"):
        raise ValueError(f"sampler={sampler!r}: use 'transformers' or 'fused'")
    if not hasattr(model, "_denoising_step"):
        raise TypeError(f"{type(model).__name__} is not a transformers DiffusionGemmaForBlockDiffusion")
    register()
    saved = getattr(model, "_dgplug_saved", None) or {
        id(c): (c._attn_implementation, getattr(c, "_experts_implementation", None)) for c in _text_configs(model)
    }
    model._dgplug_saved = saved
    for c in _text_configs(model):  # the text model only: the vision tower keeps its own attention
        if attention:
            c._attn_implementation_internal = ATTN_NAME
        if experts:
            c._experts_implementation_internal = EXPERTS_NAME
    if sampler == "fused":
        model._denoising_step = types.MethodType(_fused_denoising_step, model)
        _hook_self_conditioning(model)
    elif "_denoising_step" in model.__dict__:
        del model._denoising_step
    return model


def unpatch(model):
    saved = getattr(model, "_dgplug_saved", None)
    if saved is None:
        return model
    for c in _text_configs(model):
        attn, exp = saved.get(id(c), ("sdpa", None))
        c._attn_implementation_internal = attn
        c._experts_implementation_internal = exp
    model.__dict__.pop("_denoising_step", None)
    sc = model.model.decoder.self_conditioning
    sc.__dict__.pop("forward", None)
    del model._dgplug_saved
    return model


@contextlib.contextmanager
def patched(model, **kw):
    """`with dgplug.patched(model): model.generate(...)` - patch for the block, restore after."""
    patch(model, **kw)
    try:
        yield model
    finally:
        unpatch(model)


# -- the fused sampler step -----------------------------------------------------------------
def _hook_self_conditioning(model):
    """Let the decoder take a precomputed soft embedding instead of self-conditioning logits."""
    sc = model.model.decoder.self_conditioning
    cls_forward = type(sc).forward

    def forward(self, inputs_embeds, self_conditioning_signal):
        soft = getattr(model, "_dgplug_soft", None)
        if soft is not None:
            scale = model.model.decoder.embed_tokens.embed_scale.to(inputs_embeds.dtype)
            self_conditioning_signal = soft.to(inputs_embeds.dtype) * scale
        return cls_forward(self, inputs_embeds, self_conditioning_signal)

    sc.forward = types.MethodType(forward, sc)


def _fused_denoising_step(self, decoder_forward, current_canvas, argmax_canvas, input_ids, decoder_position_ids,
                          self_conditioning_logits, mask_mapping, cache=None, finished_denoising=None, cur_step=None,
                          sampler=None, logits_processor=None, diffusion_stopping_criteria=None, **model_kwargs):
    """One denoise step with the fused head + sampler. `self_conditioning_logits` carries the
    previous step's soft embedding [B, L, D] here (never [B, L, V] logits)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    from dgplug.kernels.sampler import head_sample
    from dgplug.sampler import accept

    cache = cache if cache is not None else model_kwargs.pop("past_key_values", None)
    temps = [p for p in (logits_processor or []) if isinstance(p, LinearTemperatureScheduleLogitsProcessor)]
    if len(temps) != len(logits_processor or []):
        raise ValueError("dgplug's fused sampler cannot apply custom logits processors; "
                         "patch with sampler='transformers' to use them")
    T = 1.0
    if temps:
        p = temps[0]
        cur = torch.tensor(cur_step, dtype=torch.int32)
        T = float(p.t_min + ((p.t_max - p.t_min) * (cur / p.max_denoising_steps)))
    self._dgplug_soft = self_conditioning_logits
    cache_kw = {_cache_kwarg(self.model): cache}  # 5.24 says `cache`, 5.19 `past_key_values`
    try:
        out = self.model(decoder_input_ids=current_canvas, self_conditioning_logits=None,
                         decoder_attention_mask=mask_mapping, decoder_position_ids=decoder_position_ids,
                         **cache_kw, **model_kwargs)
    finally:
        self._dgplug_soft = None
    h = out.last_hidden_state
    B, L, D = h.shape
    emb = self.model.decoder.embed_tokens.weight
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    r = head_sample(h.reshape(B * L, D), emb, softcap=self.final_logit_softcapping, temperature=T, seed=seed)
    ent, new_argmax, sampled = r.entropy.view(B, L), r.argmax.view(B, L), r.token.view(B, L)
    soft = r.soft.view(B, L, D)
    mask = accept(ent, sampler.entropy_bound)
    sampler.accepted_token_mask = mask
    new_canvas = torch.where(mask, sampled, sampler.initialize_canvas(B, current_canvas.device))
    if diffusion_stopping_criteria is not None:
        if finished_denoising.any():
            new_argmax = torch.where(finished_denoising[:, None], argmax_canvas, new_argmax)
            new_canvas = torch.where(finished_denoising[:, None], current_canvas, new_canvas)
            if self_conditioning_logits is not None:
                soft = torch.where(finished_denoising[:, None, None], self_conditioning_logits, soft)
        finished_denoising |= _stop(diffusion_stopping_criteria, new_argmax, ent)
    return new_canvas, new_argmax, soft, finished_denoising


def _cache_kwarg(module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _stop(criteria, argmax, ent):
    """transformers' StableAndConfidentStoppingCriteria, fed entropies instead of logits."""
    if criteria.stability_threshold == 0:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    else:
        if criteria.argmax_canvas_history is None:
            criteria.argmax_canvas_history = torch.full((criteria.stability_threshold, *argmax.shape), -1,
                                                        dtype=argmax.dtype, device=argmax.device)
        stable = (criteria.argmax_canvas_history == argmax[None]).all(dim=-1).all(dim=0)
        criteria.argmax_canvas_history = torch.roll(criteria.argmax_canvas_history, shifts=-1, dims=0)
        criteria.argmax_canvas_history[-1] = argmax
    return stable & (ent.mean(dim=-1) < criteria.confidence_threshold)
