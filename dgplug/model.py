"""DiffusionGemma's text model, top to bottom.

One stack of 30 layers (sliding / full attention, dense MLP beside a 128-expert MoE) run two
ways: the causal *encoder* writes the KV cache for the prompt (and for every committed
canvas); the bidirectional *decoder* denoises a canvas against a read-only view of that cache.
Parameter names are the checkpoint's names under `model.decoder.`, so loading is a lookup.
The heavy work goes through `dgplug.ops` (attention, route, moe, head) so kernels can replace it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, settings, threads
from .config import GENERATION_DEFAULTS, Config, TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


def linear(x, w):
    """Bias-free linear (ops.linear: 16-bit weights upcast at use on CPUs without native 16-bit
    matmuls); `w` may be a plain tensor or a packed quantized weight."""
    if isinstance(w, torch.Tensor):
        return ops.linear(x, w)
    return ops.linear(x, w.dequantize(x.dtype))  # packed (QuantizedWeight): dequantised per call


# Projections of one input run as one matmul on CUDA: q|k(|v) and gate|up (fewer, fuller GEMMs;
# at 256 rows a canvas each alone fills part of the GPU). The parameters become row blocks (views)
# of one buffer, so nothing is stored twice; they are stacked again on first use after anything
# that moves them apart (.to(), load_state_dict(assign=True)). A CPU keeps one matmul per
# projection (the results tests compare with transformers, bit for bit where promised).
# DGPLUG_FUSED_PROJECTIONS=0: never; =1: on every device (the tests run it on CPU).
FUSED_PROJECTIONS = settings.switch("DGPLUG_FUSED_PROJECTIONS")


def _adjacent(weights) -> bool:
    """The 2-D weights (of one dtype and width) are consecutive row blocks of one storage."""
    w0 = weights[0]
    at, step, base = w0.data_ptr(), w0.shape[1] * w0.element_size(), w0.untyped_storage().data_ptr()
    for w in weights:
        if not (w.dtype == w0.dtype and w.shape[1] == w0.shape[1] and w.is_contiguous() and w.data_ptr() == at
                and w.untyped_storage().data_ptr() == base):
            return False
        at += w.shape[0] * step
    return True


def stacked(weights) -> torch.Tensor | None:
    """[sum N_i, K]: the weights [N_i, K] as one tensor whose row blocks are the parameters
    themselves (stacked once into one buffer if they are not); None where it does not apply (a CPU
    unless forced, packed quantized weights, mixed dtypes or devices, one tensor twice, autograd
    on: separate matmuls keep the weights' gradients)."""
    if FUSED_PROJECTIONS == "0" or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return None
    w0 = weights[0]
    if FUSED_PROJECTIONS != "1" and w0.device.type != "cuda":
        return None
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None
    if not _adjacent(weights):  # not yet stacked (the checks below run only then, off the hot path)
        if any(w.dtype != w0.dtype or w.device != w0.device or w.shape[1] != w0.shape[1] for w in weights) \
                or len({id(w) for w in weights}) < len(weights):
            return None
        with torch.no_grad(), torch.inference_mode(False):  # a plain tensor even under inference_mode
            buf = torch.cat(list(weights))
            for w, rows in zip(weights, buf.split([w.shape[0] for w in weights])):
                w.data = rows
    # the whole as a new view of the first weight's storage (set_: a view of a parameter made under
    # inference_mode could not be taken outside it; nothing is kept that would outlive a move)
    shape = (sum(w.shape[0] for w in weights), w0.shape[1])
    return torch.empty(0, dtype=w0.dtype, device=w0.device).set_(
        w0.untyped_storage(), w0.storage_offset(), shape, (w0.shape[1], 1))


def projections(h, weights) -> list[torch.Tensor]:
    """[linear(h, w) for w in weights]: one matmul split into views where `stacked` applies."""
    both = stacked(weights)
    if both is None:
        return [linear(h, w) for w in weights]
    return list(linear(h, both).split([w.shape[0] for w in weights], dim=-1))


def gated_mlp(h, gate, up, down):
    """down(gelu_tanh(gate(h)) * up(h)): the dense MLP and the self-conditioning MLP."""
    g, u = projections(h, [gate, up])
    return linear(ops.gelu_mul(g, u), down)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, h):
        return gated_mlp(h, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Attention(nn.Module):
    def __init__(self, tc: TextConfig, i: int):
        super().__init__()
        self.sliding = tc.layer_types[i] == "sliding_attention"
        self.head_dim, self.kv_heads = tc.layer_dims(i)
        self.heads = tc.num_attention_heads
        self.window = tc.sliding_window if self.sliding else None
        self.eps = tc.rms_norm_eps
        self.q_proj = nn.Linear(tc.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(tc.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(tc.hidden_size, self.kv_heads * self.head_dim, bias=False) if self.sliding else None
        self.o_proj = nn.Linear(self.heads * self.head_dim, tc.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, tc.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, tc.rms_norm_eps)

    def project(self, h, cos, sin, slots=None):
        """q, k, v as [B, heads, L, head_dim]. Full layers: V is the raw K projection (K = V).
        slots: (keys, values) [B, kv_heads, L, head_dim] to write k and v into (a static cache)."""
        B, L, _ = h.shape
        ws = [self.q_proj.weight, self.k_proj.weight] + ([self.v_proj.weight] if self.v_proj is not None else [])
        qkv = [t.view(B, L, -1, self.head_dim) for t in projections(h, ws)]
        q, k, v = qkv if len(qkv) == 3 else (*qkv, qkv[1])
        return ops.qkv_heads(q, k, v, self.q_norm.weight, self.k_norm.weight, self.eps, cos, sin, out=slots)

    def forward(self, h, cos, sin, pos, cache: "LayerCache", mode: str, mask=None):
        """mask: [B, total positions] bool (False = padding) or None; keys look their position up in it."""
        q, k, v = self.project(h, cos, sin, cache.canvas_slots())
        B = h.shape[0]
        keys, values, k_pos, valid = cache.with_canvas(k, v, pos, mask)
        if mode == "encode":
            out = ops.attention(q, keys, values, q_pos=pos, k_pos=k_pos, key_valid=valid, causal=True, window=self.window)
            cache.keep(keys, values, k_pos, self.window)
        else:  # denoise: no mask over [cache; canvas], the cache is left as it was
            out = ops.attention(q, keys, values, q_pos=pos, k_pos=k_pos, key_valid=valid, causal=False, window=None)
        out = out.transpose(1, 2).reshape(B, h.shape[1], -1)
        return linear(out, self.o_proj.weight)


class Router(nn.Module):
    def __init__(self, tc: TextConfig):
        super().__init__()
        self.proj = nn.Linear(tc.hidden_size, tc.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(tc.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(tc.num_experts))


class Experts(nn.Module):
    def __init__(self, tc: TextConfig):
        super().__init__()
        E, I, H = tc.num_experts, tc.moe_intermediate_size, tc.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))


class Layer(nn.Module):
    def __init__(self, tc: TextConfig, i: int):
        super().__init__()
        H, eps = tc.hidden_size, tc.rms_norm_eps
        self.top_k, self.eps = tc.top_k_experts, eps
        self.self_attn = Attention(tc, i)
        self.mlp = MLP(H, tc.intermediate_size)
        self.router = Router(tc)
        self.experts = Experts(tc)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2",
                  "post_feedforward_layernorm"):
            setattr(self, n, RMSNorm(H, eps))
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x, cos, sin, pos, cache, mode, scalar, mask=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, mode, mask)
        x, h_dense, h_moe = ops.post_attention(attn, x, self.post_attention_layernorm.weight,
                                               self.pre_feedforward_layernorm.weight,
                                               self.pre_feedforward_layernorm_2.weight, self.eps)
        # dense MLP beside the routed experts; the router reads the raw residual
        dense = self.mlp(h_dense)
        flat = x.reshape(-1, x.shape[-1])
        w, idx = ops.route(flat, self.router.proj.weight, self.router.scale, self.router.per_expert_scale,
                           self.top_k, self.eps)
        moe = ops.moe(h_moe.reshape(flat.shape), idx, w, self.experts.gate_up_proj, self.experts.down_proj)
        return ops.layer_out(x, dense, moe.reshape(x.shape), self.post_feedforward_layernorm_1.weight,
                             self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                             scalar, self.eps)


def inv_freq(tc: TextConfig, sliding: bool) -> torch.Tensor:
    """RoPE inverse frequencies as transformers' rope_type of the layer kind computes them, fp32 on the CPU
    whatever the ambient device (on meta, arange would import torch._dynamo: seconds of every load)."""
    cpu = torch.device("cpu")
    if sliding:
        d, theta, kind, prf, factor = (tc.head_dim, tc.rope_theta_sliding, tc.rope_type_sliding,
                                       tc.partial_rotary_factor_sliding, tc.rope_factor_sliding)
    else:
        d, theta, kind, prf, factor = (tc.global_head_dim, tc.rope_theta_full, tc.rope_type_full,
                                       tc.partial_rotary_factor_full, tc.rope_factor_full)
    if kind == "proportional":  # rotate the first fraction of pairs, leave the rest still
        angles = int(prf * d // 2)
        rot = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64, device=cpu).float() / d))
        inv = torch.cat([rot, torch.zeros(d // 2 - angles, device=cpu)])
    else:  # "default", "linear"
        dim = int(d * prf)
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=cpu) / dim))
    return inv / factor if factor != 1.0 else inv


def rope_tables(pos, inv_sliding, inv_full, dtype) -> dict:
    """cos/sin [L, d] for each layer kind at absolute positions `pos` (computed in fp32)."""
    out = {}
    for kind, inv in (("sliding", inv_sliding), ("full", inv_full)):
        freqs = pos[:, None].float() * inv[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        out[kind] = (emb.cos().to(dtype), emb.sin().to(dtype))
    return out


@dataclass
class LayerCache:
    keys: torch.Tensor | None = None  # [B, kv_heads, Lc, d]
    values: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # [Lc] absolute positions

    def with_canvas(self, k, v, pos, mask):
        """Keys, values, positions and validity of [cache; new] (mask: [B, positions] or None)."""
        keys = torch.cat([self.keys, k], dim=2) if self.keys is not None else k
        values = torch.cat([self.values, v], dim=2) if self.values is not None else v
        k_pos = torch.cat([self.pos, pos]) if self.pos is not None else pos
        return keys, values, k_pos, (mask[:, k_pos] if mask is not None else None)

    def canvas_slots(self):
        return None  # k and v are new tensors, concatenated by with_canvas

    def keep(self, keys, values, k_pos, window):
        """After an encoder pass: [cache; new] becomes the cache (sliding layers: the last window - 1)."""
        keep = slice(-(window - 1), None) if window is not None else slice(None)
        self.keys, self.values, self.pos = keys[:, :, keep], values[:, :, keep], k_pos[keep]


@dataclass
class KVCache:
    """The encoder's cache: full layers keep every key, sliding layers the last window - 1."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # absolute positions written so far

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([LayerCache() for _ in range(n_layers)])

    def canvas_positions(self, L: int, device) -> torch.Tensor:
        """Absolute positions of a canvas of L tokens after the cached ones."""
        return torch.arange(self.length, self.length + L, device=device)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A view of some batch rows (for decoding only the rows still denoising)."""
        return KVCache([LayerCache(c.keys[rows], c.values[rows], c.pos) for c in self.layers], self.length)


@dataclass
class Output:
    logits: torch.Tensor | None = None  # [B, L, V] fp32, softcapped
    hidden: torch.Tensor | None = None  # [B, L, D] final normed decoder states
    cache: KVCache | None = None


def _single_threaded_when_small(pass_):
    """A pass over ids [B, L] runs on one thread when its projections (tokens x hidden x hidden
    FLOPs) are small: dgplug.threads.for_flops."""

    @functools.wraps(pass_)
    def run(self, ids, *args, **kwargs):
        with threads.for_flops(2 * ids.numel() * self.tc.hidden_size ** 2):
            return pass_(self, ids, *args, **kwargs)

    return run


class DiffusionGemma(nn.Module):
    """The text model: embedding, the layer stack in two modes, self-conditioning, tied head."""

    def __init__(self, cfg: Config, generation_defaults: dict | None = None):
        super().__init__()
        tc = self.tc = cfg.text
        self.cfg = cfg
        self.generation_defaults = dict(generation_defaults or GENERATION_DEFAULTS)
        self.tokenizer = None  # set by dgplug.load when the checkpoint ships one
        self.source = None  # where it was loaded from
        # _weight: no normal_() init (on the meta device it would import torch._dynamo, ~4 s of a CLI start)
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size, _weight=torch.empty(tc.vocab_size, tc.hidden_size))
        self.layers = nn.ModuleList([Layer(tc, i) for i in range(tc.num_hidden_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.self_conditioning = nn.Module()
        self.self_conditioning.pre_norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        for n, shape in (("gate_proj", (tc.intermediate_size, tc.hidden_size)),
                         ("up_proj", (tc.intermediate_size, tc.hidden_size)),
                         ("down_proj", (tc.hidden_size, tc.intermediate_size))):
            setattr(self.self_conditioning, n, nn.Linear(shape[1], shape[0], bias=False))
        # The encoder's own layer scalars (equal to the decoder's in the release; the format lets them differ).
        self.encoder_layer_scalar = nn.Parameter(torch.ones(tc.num_hidden_layers))
        self.register_buffer("inv_freq_sliding", inv_freq(tc, True), persistent=False)
        self.register_buffer("inv_freq_full", inv_freq(tc, False), persistent=False)

    # -- pieces -------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def embed(self, ids):
        w = self.embed_tokens.weight
        return F.embedding(ids, w) * self.embed_scale(w.dtype, w.device)

    def embed_scale(self, dtype, device) -> torch.Tensor:
        """sqrt(hidden) in `dtype` on `device`, made once (no host-to-device copy per step)."""
        scales = self.__dict__.setdefault("_embed_scales", {})
        if (dtype, device) not in scales:
            scales[(dtype, device)] = ops.embed_scale(self.tc.hidden_size, dtype).to(device)
        return scales[(dtype, device)]

    def rope_tables(self, pos, dtype):
        return rope_tables(pos, self.inv_freq_sliding, self.inv_freq_full, dtype)

    def run_layers(self, x, pos, cache: KVCache, mode: str, mask=None):
        tables = self.rope_tables(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = tables["sliding" if layer.self_attn.sliding else "full"]
            scalar = layer.layer_scalar if mode == "denoise" else self.encoder_layer_scalar[i : i + 1]
            x = layer(x, cos, sin, pos, cache.layers[i], mode, scalar, mask)
        return x

    def self_conditioning_input(self, canvas, sc_logits=None, sc_soft=None):
        """x0 = rmsnorm_noscale(E[canvas]*sqrt(D) + MLP_sc(pre_norm(soft embedding)))."""
        e = self.embed(canvas)
        scale = self.embed_scale(e.dtype, e.device)
        s = None
        if sc_logits is not None:
            s = ops.soft_embedding(sc_logits, self.embed_tokens.weight) * scale
        elif sc_soft is not None:
            s = sc_soft.to(e.dtype) * scale
        if s is not None:
            sc = self.self_conditioning
            e = e + gated_mlp(sc.pre_norm(s), sc.gate_proj.weight, sc.up_proj.weight, sc.down_proj.weight)
        return ops.rms_norm(e, None, self.tc.rms_norm_eps)

    def head(self, h):
        """Tied, softcapped LM head: fp32 logits [.., V]."""
        return ops.softcap(ops.linear(h, self.embed_tokens.weight).float(), self.tc.final_logit_softcapping)

    # -- the two modes ------------------------------------------------------------------------
    @torch.no_grad()
    @_single_threaded_when_small
    def encode(self, ids, cache: KVCache, mask=None):
        """Causal pass over new tokens at positions [cache.length, ...); writes the cache.

        mask: [B, positions so far + new] bool (False = left padding), or None."""
        L = ids.shape[1]
        pos = torch.arange(cache.length, cache.length + L, device=ids.device)
        x = self.run_layers(self.embed(ids), pos, cache, "encode", mask)
        cache.length += L
        return self.norm(x)

    @torch.no_grad()
    @_single_threaded_when_small
    def denoise(self, canvas, cache: KVCache, sc_logits=None, sc_soft=None, mask=None):
        """Bidirectional pass over the canvas against a read-only cache: final normed states."""
        pos = cache.canvas_positions(canvas.shape[1], canvas.device)
        x = self.self_conditioning_input(canvas, sc_logits, sc_soft)
        return self.norm(self.run_layers(x, pos, cache, "denoise", mask))

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, self_conditioning_logits=None,
                cache: KVCache | None = None, decoder_attention_mask=None, generator=None):
        """One encoder pass over `input_ids` (if given) and one decoder pass over the canvas.

        As transformers: a missing canvas is drawn uniformly at random; the decoder sees every
        cached key unless `decoder_attention_mask` ([B, context + canvas]) says otherwise."""
        cache = cache if cache is not None else KVCache.empty(self.tc.num_hidden_layers)
        if input_ids is not None:
            mask = attention_mask.bool() if attention_mask is not None else None
            if mask is not None and cache.length:
                mask = torch.cat([torch.ones(mask.shape[0], cache.length, dtype=torch.bool, device=mask.device), mask], 1)
            self.encode(input_ids, cache, mask)
        if cache.length == 0 and input_ids is None:
            raise ValueError("forward needs input_ids or a filled cache")
        if decoder_input_ids is None:
            B = input_ids.shape[0] if input_ids is not None else cache.layers[0].keys.shape[0]
            decoder_input_ids = torch.randint(0, self.tc.vocab_size, (B, self.cfg.canvas_length), generator=generator,
                                              device=self.device)
        dmask = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        h = self.denoise(decoder_input_ids, cache, self_conditioning_logits, mask=dmask)
        return Output(logits=self.head(h), hidden=h, cache=cache)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Block-diffusion generation; see `dgplug.generation.generate` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def edit(self, prompt_ids, **kwargs):
        """In-line editing / infilling: rewrite [[spans]] of a text, the rest locked on the canvas;
        see `dgplug.editing.edit` for the arguments."""
        from .editing import edit

        return edit(self, prompt_ids, **kwargs)
