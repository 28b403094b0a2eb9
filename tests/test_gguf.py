"""GGUF: K-quant encoders, streaming export (names/keys/types per ../shared/spec/gguf.md), import,
contract check, and rejection of malformed files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf import quants as gq

from dgplug.converters import gguf_export as ge
from dgplug.converters import gguf_import as gi
from dgplug.converters import kquants as kq
from dgplug.errors import CheckpointError, FormatError

QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS"]


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------
def _test_rows(seed=0, cols=512):
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(cols) * 0.02,              # typical weights
        np.zeros(cols),                                # all zeros
        np.full(cols, 0.37),                           # constant positive
        np.full(cols, -1.5),                           # constant negative
        rng.standard_normal(cols) * 1e3,               # huge (scales stay within fp16)
        rng.standard_normal(cols) * 1e-3,              # tiny
        rng.standard_normal(cols) * 1e-6,              # tinier than fp16 scales resolve
        np.abs(rng.standard_normal(cols)),             # one-signed
        rng.standard_t(2, cols),                       # heavy tails (outliers)
        np.where(rng.random(cols) < 0.05, 5.0, 0.0) * rng.standard_normal(cols),  # sparse spikes
    ]
    return np.stack(rows).astype(np.float32)


# max |err| <= REL * (per-super-block max|x|) + ABS  (the ABS term is the fp16 scale resolution)
# Derivation: half a quantisation step of the sub-block (range/15, /31, absmax/31.5) plus the
# 6-bit (K4/K5) or 8-bit (K6) rounding of the sub-block scale; measured maxima are ~2/3 of these.
# (fp16 subnormal step 2**-24 times the largest scale*quant product of the type).
# Q3_K: quants -4..3 of a step ~max|x|/4 of the sub-block; the value of the sign opposite to the
# largest maps to +4 and is clamped to 3 (a full step, 0.25), plus the 6-bit scale rounding
# (measured maxima 0.2). Q2_K: 0..3 over the range (<= 2 max|x|): half a step 1/3, plus the 4-bit
# rounding of the scale (1.5 d <= max/10 * 2/3) and of the min (dmin/2 <= max/30) (measured 0.37).
# IQ4_XS / IQ4_NL: levels -127..113 of a step d ~ max|x|/127 (the least-squares scale); half the
# widest gap between levels (24, 89 -> 113) is 12/127 = 0.094 of the block's max, plus IQ4_XS's
# 6-bit rounding of the block scale (1/64 of the largest) (measured maxima 0.075 / 0.088); the ABS
# term: fp16's subnormal step 2**-24 times 127.
BOUNDS = {T.Q2_K: (0.45, 1e-4), T.Q3_K: (0.3, 1e-4), T.Q4_K: (0.14, 1e-4), T.Q5_K: (0.07, 2e-4),
          T.Q6_K: (0.03, 3e-4), T.Q8_0: (1 / 254 + 1e-3, 1e-5), T.Q4_0: (1 / 8 + 1e-3, 1e-6),
          T.IQ4_XS: (0.11, 1e-5), T.IQ4_NL: (0.11, 1e-5),
          # gguf-py's encoders of the other 32-blocks (ggml's reference quantizers): Q4_1 / Q5_1 half a step of
          # range/15 or range/31 (range <= 2 max) plus the fp16 rounding of d and m; Q5_0 a full step max/16
          # (the value of the sign opposite to the largest maps to +16, clamped to 15), as Q4_0
          T.Q4_1: (1 / 15 + 2e-3, 1e-6), T.Q5_0: (1 / 16 + 1e-3, 1e-6), T.Q5_1: (1 / 31 + 2e-3, 1e-6)}


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                                   T.IQ4_XS, T.IQ4_NL])
def test_encoder_roundtrip_within_bound(qtype):
    x = _test_rows()
    b = kq.quantize(x, qtype, name="w")
    assert b.dtype == np.uint8
    y = gq.dequantize(b, qtype)
    assert y.shape == x.shape
    rel, ab = BOUNDS[qtype]
    blk = 256 if qtype in kq.K_TYPES or qtype == T.IQ4_XS else 32
    xb, yb = x.reshape(-1, blk), y.reshape(-1, blk)
    bound = rel * np.abs(xb).max(axis=1, keepdims=True) + ab
    assert (np.abs(yb - xb) <= bound).all(), float((np.abs(yb - xb) / bound).max())
    # exact rows stay exact: zeros, and constants within fp16 precision of d
    assert (y[1] == 0).all()
    assert np.allclose(y[2], x[2], rtol=2e-3) and np.allclose(y[3], x[3], rtol=2e-3)
    # deterministic
    assert np.array_equal(b, kq.quantize(x, qtype, name="w"))


def _rmse(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def _naive_asym(x, nmax, sub):
    """Baseline: per sub-block min/max affine quantisation with exact (unquantised) scales."""
    xs = x.reshape(-1, sub)
    mn = np.minimum(xs.min(1, keepdims=True), 0)
    s = (xs.max(1, keepdims=True) - mn) / nmax
    s[s == 0] = 1
    return (np.clip(np.rint((xs - mn) / s), 0, nmax) * s + mn).reshape(x.shape)


def _naive_sym(x, nmax, sub):
    xs = x.reshape(-1, sub)
    d = np.abs(xs).max(1, keepdims=True) / nmax
    d[d == 0] = 1
    return (np.clip(np.rint(xs / d), -nmax, nmax - 1) * d).reshape(x.shape)


@pytest.mark.parametrize("qtype,naive", [
    (T.Q4_K, lambda x: _naive_asym(x, 15, 32)),
    (T.Q5_K, lambda x: _naive_asym(x, 31, 32)),
    (T.Q6_K, lambda x: _naive_sym(x, 32, 16)),
    (T.Q3_K, lambda x: _naive_sym(x, 4, 16)),
    (T.Q2_K, lambda x: _naive_asym(x, 3, 16)),
])
def test_search_beats_naive_minmax(qtype, naive):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    ours = _rmse(gq.dequantize(kq.quantize(x, qtype), qtype), x)
    base = _rmse(naive(x), x)
    # the scale search wins even against a baseline whose scales are not quantised at all
    assert ours < 0.97 * base, (ours, base)


# Byte identity with ggml's reference quantizers: tests/test_kquants.py


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoder_rejects_non_finite(qtype, bad):
    x = _test_rows()[:2].copy()
    x[1, 77] = bad
    with pytest.raises(FormatError, match=r"blk\.3\.attn_q\.weight.*non-finite.*\(1, 77\)"):
        kq.quantize(x, qtype, name="blk.3.attn_q.weight")


def test_encoder_rejects_bad_rows_and_overflow():
    with pytest.raises(FormatError, match="multiple of 256"):
        kq.quantize(np.zeros((2, 96), np.float32), T.Q4_K, name="t")
    with pytest.raises(FormatError, match="too large"):
        kq.quantize(np.full((1, 256), 1e9, np.float32) * np.linspace(-1, 1, 256, dtype=np.float32), T.Q4_K)
    with pytest.raises(FormatError, match="overflow F16"):
        kq.quantize(np.full((1, 32), 1e6, np.float32), T.F16, name="t")
    for qtype in (T.Q4_1, T.Q5_1):  # a scale of 0 but a block minimum past fp16
        with pytest.raises(FormatError, match=f"t: values too large for {qtype.name} .*minimum"):
            kq.quantize(np.full((1, 32), 7e4, np.float32), qtype, name="t")
    with pytest.raises(FormatError, match=r"t: row length 96 is not a multiple of 256 \(IQ4_XS\)"):
        kq.quantize(np.zeros((2, 96), np.float32), T.IQ4_XS, name="t")
    assert kq.quantize(np.zeros((2, 96), np.float32), T.IQ4_NL).shape == (2, 3 * 18)  # blocks of 32
    for qtype in (T.IQ4_XS, T.IQ4_NL):
        with pytest.raises(FormatError, match=f"t: values up to 1e\\+09 are too large for {qtype.name}"):
            kq.quantize(np.full((1, 256), 1e9, np.float32) * np.linspace(-1, 1, 256, dtype=np.float32), qtype,
                        name="t")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
TEXT = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, vocab_size=512,
            head_dim=64, global_head_dim=128)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dgplug.testing import make_checkpoint, tiny_text_config
    return make_checkpoint(tmp_path_factory.mktemp("gguf") / "ckpt", text=tiny_text_config(**TEXT),
                           qk_norm_scale=0.25, max_shard_size="6MB")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_out")
    return {q: ge.export_gguf(ckpt, out / f"m-{q}.gguf", quant=q, progress=False, workers=1) for q in QUANTS}


@pytest.fixture(scope="module")
def hf_tensors(ckpt):
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def test_checkpoint_is_sharded(ckpt):
    assert (Path(ckpt) / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("quant", QUANTS)
def test_export_follows_contract(exported, quant):
    assert gi.check_contract(exported[quant]) == []


def test_metadata_keys(exported):
    r = gi.open_gguf(exported["Q4_K_M"])
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    a = "diffusion-gemma."
    assert f("general.architecture") == "diffusion-gemma"
    assert f("general.file_type") == 15 and f("general.quantization_version") == 2
    assert f(a + "block_count") == 4 and f(a + "embedding_length") == 256
    assert f(a + "attention.key_length") == 128 and f(a + "attention.value_length") == 128  # from per_layer_config
    assert f(a + "attention.key_length_swa") == 64 and f(a + "rope.dimension_count_swa") == 64
    assert f(a + "attention.head_count_kv") == [2, 2, 1, 1]
    assert f(a + "attention.sliding_window_pattern") == [True, True, False, False]
    assert f(a + "attention.causal") is False
    assert f(a + "final_logit_softcapping") == pytest.approx(30.0)
    assert f(a + "rope.freq_base") == pytest.approx(1e6) and f(a + "rope.freq_base_swa") == pytest.approx(1e4)
    assert f("diffusion.canvas_length") == 16 and f("diffusion.eb_max_steps") == 8
    assert f("diffusion.eb_entropy_bound") == pytest.approx(0.1)
    assert f("tokenizer.ggml.model") == "gemma4" and r.get_field("tokenizer.ggml.pre") is None
    assert f("tokenizer.ggml.mask_token_id") == 4 and f("tokenizer.ggml.bos_token_id") == 2
    assert f("tokenizer.ggml.eos_token_id") == 1 and f("tokenizer.ggml.padding_token_id") == 0
    assert f("tokenizer.ggml.token_type")[:6] == [3, 3, 3, 3, 3, 1]
    assert r.get_field("tokenizer.ggml.merges") is None  # WordLevel test tokenizer
    # the test tokenizer (WordLevel, a template without BOS) starts no text with BOS: the file says so
    assert f("tokenizer.ggml.add_bos_token") is False and f("tokenizer.ggml.add_eos_token") is False
    assert "messages" in f("tokenizer.chat_template")
    rope = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert list(np.asarray(rope.data)) == [1.0] * 16 + [1e30] * 48


def test_q4_k_m_mix(exported):
    types = {n: t for n, t, _, _ in gi.inspect_table(exported["Q4_K_M"])["tensors"]}
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_k.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "Q8_0"  # 8 experts
    assert types["blk.0.attn_output.weight"] == "Q5_K"
    for L in range(4):
        assert types[f"blk.{L}.attn_q.weight"] == "Q4_K" and types[f"blk.{L}.ffn_gate_up_exps.weight"] == "Q4_K"
        more = "Q6_K" if L in (2, 3) else "Q4_K"  # use_more_bits in a 4-layer model
        assert types[f"blk.{L}.ffn_down.weight"] == more and types[f"blk.{L}.ffn_down_exps.weight"] == more
        assert types[f"blk.{L}.ffn_gate_inp.weight"] == "F32" and types[f"blk.{L}.attn_norm.weight"] == "F32"
    assert types["self_cond_down.weight"] == "Q4_K"
    # the expert tensors keep ggml's reversed dims: ne = [H, 2I, E]
    shapes = {n: s for n, _, s, _ in gi.inspect_table(exported["Q4_K_M"])["tensors"]}
    assert shapes["blk.0.ffn_gate_up_exps.weight"] == [256, 512, 8]
    assert shapes["blk.0.ffn_down_exps.weight"] == [256, 256, 8]


def test_recipe_rules_for_the_released_shapes():
    kw = dict(n_layers=30, n_experts=128)
    assert [L for L in range(30) if ge.use_more_bits(L, 30)][:6] == [0, 1, 2, 5, 8, 11]
    assert ge.tensor_type("Q4_K_M", "token_embd.weight", (262144, 2816), **kw) == T.Q6_K
    # rows of 2112 / 704 are not multiples of 256: llama.cpp's fallbacks
    assert ge.tensor_type("Q4_K_M", "blk.3.ffn_down.weight", (2816, 2112), layer=3, **kw) == T.Q5_0
    assert ge.tensor_type("Q4_K_M", "blk.2.ffn_down_exps.weight", (128, 2816, 704), layer=2, **kw) == T.Q8_0
    assert ge.tensor_type("Q5_K_M", "blk.3.ffn_down.weight", (2816, 2112), layer=3, **kw) == T.Q5_1
    assert ge.tensor_type("Q4_K_M", "blk.0.ffn_gate_up_exps.weight", (128, 1408, 2816), layer=0, **kw) == T.Q4_K
    assert ge.tensor_type("Q4_K_M", "blk.0.ffn_gate_inp.weight", (128, 2816), layer=0, **kw) == T.F32
    assert ge.tensor_type("BF16", "blk.0.attn_q.weight", (4096, 2816), layer=0, **kw) == T.BF16


def test_low_bit_mixes(exported):
    # the tiny model has 8 experts: llama.cpp's n_expert == 8 rules (attn_k/attn_v Q8_0, attn_output Q5_K)
    for q, base, down in (("Q3_K_M", "Q3_K", "Q4_K"), ("Q3_K_S", "Q3_K", "Q3_K"), ("Q2_K", "Q2_K", "Q3_K"),
                          ("IQ4_XS", "IQ4_XS", "IQ4_XS")):
        types = {n: t for n, t, _, _ in gi.inspect_table(exported[q])["tensors"]}
        assert types["token_embd.weight"] == "Q6_K", q
        assert types["blk.0.attn_k.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "Q8_0", q
        assert types["blk.0.attn_output.weight"] == "Q5_K", q
        for L in range(4):  # Q3_K_M: Q5_K only below n_layers/16 = 0 here
            assert types[f"blk.{L}.attn_q.weight"] == base and types[f"blk.{L}.ffn_gate_up_exps.weight"] == base
            assert types[f"blk.{L}.ffn_down.weight"] == down and types[f"blk.{L}.ffn_down_exps.weight"] == down
        assert types["self_cond_down.weight"] == base


@pytest.mark.parametrize("quant,want", [
    # attn_v (0, 1, 2), attn_k, attn_q, attn_output, ffn_down (layer 0, 2, 3), experts' down (0, 3), gate_up
    ("Q3_K_M", "Q5_K Q5_K Q4_K Q3_K Q3_K Q4_K Q5_1 Q5_0 Q5_0 Q5_1 Q5_0 Q3_K"),
    ("Q3_K_S", "Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K Q4_0 Q4_0 Q4_0 Q4_0 Q4_0 Q3_K"),
    ("Q2_K", "Q3_K Q3_K Q3_K Q2_K Q2_K Q3_K Q4_0 Q4_0 Q4_0 Q4_0 Q4_0 Q2_K"),
    ("Q2_K_S", "Q2_K Q2_K Q2_K Q2_K Q2_K Q2_K Q5_0 Q5_0 Q4_0 Q5_0 Q4_0 Q2_K"),
    ("Q4_K_M", "Q6_K Q6_K Q6_K Q4_K Q4_K Q4_K Q8_0 Q8_0 Q5_0 Q8_0 Q5_0 Q4_K"),
    # without an imatrix the first eighth of the ffn_down layers Q5_K (-> Q5_1), IQ4_XS -> IQ4_NL
    ("IQ4_XS", "IQ4_XS IQ4_XS IQ4_XS IQ4_XS IQ4_XS IQ4_XS Q5_1 Q5_1 IQ4_NL Q5_1 IQ4_NL IQ4_XS"),
])
def test_low_bit_recipes_for_the_released_shapes(quant, want):
    # llama.cpp's llama_tensor_get_type for 30 layers, 128 experts, n_gqa 16/8 = 2; rows of 2112 and
    # 704 are not multiples of 256: Q2_K/Q3_K -> Q4_0 (llama.cpp's tensor_type_fallback since its
    # 2026 refactor; IQ4_NL before), Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
    kw = dict(n_layers=30, n_experts=128, n_gqa=2)
    t = lambda name, shape, **k: ge.tensor_type(quant, name, shape, **kw, **k).name  # noqa: E731
    got = [t("blk.0.attn_v.weight", (2048, 2816), attn_v_index=i, n_attn_v=25) for i in range(3)]
    got += [t("blk.0.attn_k.weight", (2048, 2816)), t("blk.0.attn_q.weight", (4096, 2816)),
            t("blk.5.attn_output.weight", (2816, 8192))]
    got += [t(f"blk.{L}.ffn_down.weight", (2816, 2112), layer=L) for L in (0, 2, 3)]
    got += [t(f"blk.{L}.ffn_down_exps.weight", (128, 2816, 704), layer=L) for L in (0, 3)]
    got += [t("blk.0.ffn_gate_up_exps.weight", (128, 1408, 2816), layer=0)]
    assert " ".join(got) == want
    assert t("token_embd.weight", (262144, 2816)) == "Q6_K"
    # more KV sharing (n_gqa >= 4) gives Q2_K/Q2_K_S's attn_v Q4_K; 8 experts: attn_k/v Q8_0, attn_output Q5_K
    if quant.startswith("Q2_K") or quant == "IQ4_XS":
        assert ge.tensor_type(quant, "blk.0.attn_v.weight", (2048, 2816), n_layers=30, n_experts=128,
                              n_gqa=4) == (T.Q5_K if quant == "IQ4_XS" else T.Q4_K)
    eight = dict(n_layers=30, n_experts=8)
    assert ge.tensor_type(quant, "blk.0.attn_k.weight", (2048, 2816), **eight) == T.Q8_0
    out8 = ge.tensor_type(quant, "blk.0.attn_output.weight", (2816, 4096), **eight)
    assert out8 == (T.Q2_K if quant == "Q2_K_S" else T.Q5_K)
    # with an imatrix (llama.cpp's has_imatrix) IQ4_XS keeps its first ffn_down layers; the others' mixes are the same
    im = [t(f"blk.{L}.ffn_down.weight", (2816, 2112), layer=L, imatrix=True) for L in (0, 2, 3)]
    assert im == (["IQ4_NL"] * 3 if quant == "IQ4_XS" else got[6:9])
    if quant == "IQ4_XS":  # rows not a multiple of 32: IQ4_NL falls back to F16, as llama.cpp
        assert t("blk.5.ffn_down.weight", (2816, 2120), layer=5) == "F16"


def test_f32_round_trip_is_exact(exported, hf_tensors):
    got = dict(gi.iter_hf_tensors(exported["F32"]))
    want = {k: v for k, v in hf_tensors.items() if not k.startswith(("model.encoder.vision", "model.encoder.embed_vision"))}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


# per file type: max |err| / max|w| over every tensor
ROUND_TRIP = {"F16": 1e-3, "BF16": 4e-3, "Q8_0": 5e-3, "Q4_0": 0.13, "Q4_K_M": 0.14, "Q5_K_M": 0.07, "Q6_K": 0.03,
              "Q3_K_M": 0.3, "Q3_K_S": 0.3, "Q2_K": 0.45,
              "IQ4_XS": 0.11}  # the encoders' bounds (BOUNDS above) for the base type


@pytest.mark.parametrize("quant", list(ROUND_TRIP))
def test_quantised_round_trip_within_bound(exported, hf_tensors, quant):
    worst = 0.0
    for k, v in gi.iter_hf_tensors(exported[quant]):
        ref = hf_tensors[k].float()
        worst = max(worst, ((v.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    assert worst < ROUND_TRIP[quant]


def test_config_round_trip(exported, ckpt):
    from dgplug.config import from_dict, load_config, load_generation_defaults
    d = gi.gguf_to_config(exported["Q8_0"])
    got, want = from_dict(d).text, load_config(ckpt).text
    assert got == want
    assert from_dict(d).canvas_length == 16
    gen = load_generation_defaults(ckpt)
    for k in ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold"):
        assert d["generation_config"][k] == pytest.approx(gen[k])
    assert d["mask_token_id"] == 4


def test_tokenizer_from_gguf(exported, ckpt):
    tok = gi.tokenizer_from_gguf(exported["Q8_0"])
    assert tok.convert_tokens_to_ids(["<mask>", "w7"]) == [4, 7]
    assert tok.mask_token_id == 4 and tok.bos_token_id == 2
    # this WordLevel tokenizer has no decoder: it decodes with spaces, and so does the GGUF's (the
    # Sudoku one, whose decoder joins pieces, is checked in test_sudoku)
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(ckpt)).decode([5, 6, 7])
    assert want == "w5 w6 w7" and tok.decode([5, 6, 7]) == want
    # add_bos_token as the source: this one adds none, so neither does the GGUF's tokenizer
    assert AutoTokenizer.from_pretrained(str(ckpt))("w5 w6").input_ids == tok("w5 w6").input_ids == [5, 6]
    from dgplug.names import TOKENS_SPACED

    assert GGUFReader(exported["Q8_0"]).get_field(TOKENS_SPACED) is not None


def _gemma4_like_tokenizer(path):
    """A byte-fallback BPE tokenizer laid out like Gemma 4's: named specials, 256 byte tokens,
    words, then added tokens past the model vocabulary: the image tokens and chat tokens flagged
    special in tokenizer.json only, one declared model-specific special token, Gemma 4's rendered
    tool/channel tokens, and a plain added word."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    named = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(named)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in ["▁", "a", "b", "ab", "▁ab"]:
        vocab[t] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("▁", "ab")], unk_token="<unk>", byte_fallback=True,
                              fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
    tk.add_tokens([AddedToken(t, special=True, normalized=False) for t in
                   ["<|image>", "<image|>", "<|image|>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", '<|"|>']])
    tk.add_tokens([AddedToken("hello", special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", extra_special_tokens={"audio_token": "<|turn>"})
    fast.save_pretrained(str(path))
    return len(fast)


def test_token_types_as_llama_cpp(tmp_path):
    # llama.cpp's converter (Gemma4Model.set_vocab) takes the types from gguf-py's LlamaHfVocab and
    # then marks Gemma 4's channel/tool tokens USER_DEFINED: the same rule must come out of dgplug
    from gguf import TokenType
    from gguf.vocab import LlamaHfVocab

    from dgplug.names import GEMMA4_VISIBLE_TOKENS
    n = _gemma4_like_tokenizer(tmp_path)
    want_tokens, want_types = [], []
    for text, _, ty in LlamaHfVocab(tmp_path).all_tokens():
        want_tokens.append(text.decode())
        want_types.append(int(TokenType.USER_DEFINED) if text.decode() in GEMMA4_VISIBLE_TOKENS else int(ty))
    got = ge.read_tokenizer(tmp_path, n, {})
    assert got["tokens"] == want_tokens and got["types"] == want_types
    by_text = dict(zip(got["tokens"], got["types"]))
    # the image tokens: special in tokenizer.json only -> USER_DEFINED (not CONTROL)
    assert {by_text[t] for t in ("<|image>", "<image|>", "<|image|>")} == {int(TokenType.USER_DEFINED)}
    assert by_text["<|turn>"] == int(TokenType.CONTROL) and by_text["<bos>"] == int(TokenType.CONTROL)
    assert by_text["<0x41>"] == int(TokenType.BYTE) and by_text["<|channel>"] == int(TokenType.USER_DEFINED)


def test_user_defined_tokens_round_trip(tmp_path):
    n = _gemma4_like_tokenizer(tmp_path)
    tokv = ge.read_tokenizer(tmp_path, n, {})
    p = tmp_path / "tok.gguf"
    w = GGUFWriter(p, "diffusion-gemma")
    w.add_string("tokenizer.ggml.model", "gemma4")
    w.add_array("tokenizer.ggml.tokens", tokv["tokens"])
    w.add_array("tokenizer.ggml.token_type", tokv["types"])
    w.add_array("tokenizer.ggml.merges", tokv["merges"])
    w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = gi.tokenizer_from_gguf(p)
    ids = tok.encode("ab<|image>hello", add_special_tokens=False)
    assert ids[-2:] == [tokv["tokens"].index("<|image>"), tokv["tokens"].index("hello")]
    assert tok.decode(ids[-2:], skip_special_tokens=True) == "<|image>hello"  # rendered, not skipped


def _param_counts(reader):
    """(total, shared, one expert of every layer, experts) from a file's tensor table, counted as
    llama.cpp's converter counts them for general.size_label (GGUFWriter.get_total_parameter_count)."""
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}  # ggml order: experts last
    total = sum(int(np.prod(s)) for s in shapes.values())
    exps = [s for k, s in shapes.items() if "_exps." in k and len(s) == 3]
    shared = total - sum(int(np.prod(s)) for s in exps)
    return total, shared, sum(int(np.prod(s[:2])) for s in exps), exps[0][2] if exps else 0


def test_general_metadata_as_llama_cpp(ckpt, exported, tmp_path):
    # llama.cpp's converter (prepare_metadata): gguf-py's Metadata heuristics over the model
    # directory (its name, config.json, README model card, generation_config.json) with the
    # total parameter count, the directory name if that gives no name, the size label from the
    # parameter counts if it gives none; then Metadata.set_gguf_meta_model.
    import gguf
    from gguf.utility import size_label
    src = tmp_path / "diffusiongemma-tiny-it"
    src.mkdir()
    for f in Path(ckpt).iterdir():
        (src / f.name).symlink_to(f)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: google/diffusiongemma-26B-A4B\n"
                                   "tags:\n- text-diffusion\n---\n# DiffusionGemma\n")
    for d, path in ((src, ge.export_gguf(src, tmp_path / "m.gguf", quant="F16", progress=False, workers=1)),
                    (Path(ckpt), exported["Q4_K_M"])):
        r = gi.open_gguf(path)
        total, shared, per_expert, n_exp = _param_counts(r)
        want = gguf.Metadata.load(None, d, None, total)
        want.name = want.name or d.name
        want.size_label = want.size_label or size_label(total, shared, per_expert, n_exp)
        w = GGUFWriter(tmp_path / "unused.gguf", "diffusion-gemma")
        want.set_gguf_meta_model(w)
        want_kv = {k: v.value for kv in w.kv_data for k, v in kv.items()
                   if k.startswith("general.") and k != "general.architecture"}
        got = {k: f.contents() for k, f in r.fields.items() if k.startswith("general.")}
        assert got.pop("general.type") == "model"
        for k in ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment"):
            got.pop(k, None)
        assert got == want_kv
    assert want_kv["general.name"] == "Ckpt" and want_kv["general.size_label"] == "8x2.9M"
    (src / "README.md").write_text("---\nlicense: [apache\n---\n")  # malformed YAML: one clear error
    with pytest.raises(CheckpointError, match="diffusiongemma-tiny-it: cannot read the model metadata"):
        ge.export_gguf(src, tmp_path / "bad.gguf", quant="F16", progress=False, workers=1)
    assert not list(tmp_path.glob("*bad.gguf*"))
    r = gi.open_gguf(tmp_path / "m.gguf")
    assert r.get_field("general.license").contents() == "apache-2.0"
    assert r.get_field("general.base_model.0.organization").contents() == "Google"


def test_deterministic_and_worker_independent(ckpt, exported, tmp_path, monkeypatch):
    monkeypatch.setattr(ge, "CHUNK_ELEMS", 1 << 15)  # many jobs per tensor: exercises the ordered pool
    a = ge.export_gguf(ckpt, tmp_path / "a.gguf", quant="Q4_K_M", progress=True, workers=2)
    assert a.read_bytes() == Path(exported["Q4_K_M"]).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def _with_json(ckpt, tmp_path, name: str, change) -> Path:
    """The checkpoint (linked) with its JSON file `name` changed by change(dict) in place."""
    src = tmp_path / "src"
    src.mkdir()
    for p in Path(ckpt).iterdir():
        if p.name != name:
            os.symlink(p, src / p.name)
    g = json.loads((Path(ckpt) / name).read_text())
    change(g)
    (src / name).write_text(json.dumps(g))
    return src


def _with_generation_config(ckpt, tmp_path, **changes) -> Path:
    """The checkpoint (linked) with its generation_config.json changed."""
    return _with_json(ckpt, tmp_path, "generation_config.json", lambda g: g.update(changes))


def test_null_generation_values_take_released_defaults(ckpt, tmp_path):
    src = _with_generation_config(ckpt, tmp_path, max_denoising_steps=None, t_min=None, t_max=None,
                                  stability_threshold=None, confidence_threshold=None, sampler_config=None)
    r = gi.open_gguf(ge.export_gguf(src, tmp_path / "m.gguf", quant="BF16", progress=False))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("diffusion.eb_max_steps") == 48 and f("diffusion.eb_stability_threshold") == 1
    assert f("diffusion.eb_t_min") == pytest.approx(0.4) and f("diffusion.eb_t_max") == pytest.approx(0.8)
    assert f("diffusion.eb_entropy_bound") == pytest.approx(0.1)
    assert f("diffusion.eb_confidence_threshold") == pytest.approx(0.005)


def test_eos_list_kept_as_end_of_generation_keys(ckpt, tmp_path):
    """generation_config's EOS list (the release's [1, 106, 50]) survives a GGUF: <eos> as eos, the
    others as llama.cpp's end-of-turn / end-of-message keys, read back as the same list by
    dgplug.load and by transformers' from_pretrained (a GGUF kept <eos> alone: the chat model
    loaded from one would not stop at <end_of_turn>)."""
    import dgplug

    src = _with_generation_config(ckpt, tmp_path, eos_token_id=[1, 106, 50])
    path = ge.export_gguf(src, tmp_path / "m.gguf", quant="Q8_0", progress=False)
    r = gi.open_gguf(path)
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert (f("tokenizer.ggml.eos_token_id"), f("tokenizer.ggml.eot_token_id"), f("tokenizer.ggml.eom_token_id")) == (1, 106, 50)
    assert dgplug.load(path).generation_defaults["eos_token_id"] == [1, 106, 50]
    from transformers import DiffusionGemmaForBlockDiffusion

    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert m.generation_config.eos_token_id == [1, 106, 50]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_no_output_left_on_error(ckpt, tmp_path, monkeypatch, exc):
    calls = {"n": 0}
    real = kq.quantize

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(kq, "quantize", flaky)
    with pytest.raises(type(exc)):
        ge.export_gguf(ckpt, tmp_path / "m.gguf", quant="Q8_0", progress=False, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_nan_in_checkpoint_is_named_and_leaves_nothing(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    src.mkdir()
    for p in Path(ckpt).iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, src / p.name)
    for p in Path(ckpt).glob("*.safetensors"):
        sd = load_file(p)
        if "model.decoder.layers.1.self_attn.q_proj.weight" in sd:
            sd["model.decoder.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
        save_file(sd, src / p.name, metadata={"format": "pt"})
    out = tmp_path / "o"
    with pytest.raises(FormatError, match=r"blk\.1\.attn_q\.weight"):
        ge.export_gguf(src, out / "m.gguf", quant="Q4_K_M", progress=False)
    assert list(out.iterdir()) == []


def test_bad_quant_and_missing_tensor(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="unknown file type"):
        ge.export_gguf(ckpt, tmp_path / "m.gguf", quant="IQ2_XXS")
    src = tmp_path / "src"
    src.mkdir()
    for p in Path(ckpt).iterdir():
        if p.name != "model.safetensors.index.json":
            os.symlink(p, src / p.name)
    idx = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if "layers.2.router" not in k}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="lacks"):
        ge.plan_export(src, "Q8_0")



def test_rope_without_gguf_form_refused(ckpt, tmp_path):
    """RoPE settings the GGUF keys cannot carry (a factor, other kinds): one error, not a file
    whose positions differ from the checkpoint's."""
    src = _with_json(ckpt, tmp_path, "config.json",
                     lambda c: c["text_config"]["rope_parameters"]["full_attention"].update(factor=8.0))
    with pytest.raises(CheckpointError, match="rope_parameters"):
        ge.plan_export(src, "Q8_0")

# ---------------------------------------------------------------------------------------------
# Malformed GGUF files
# ---------------------------------------------------------------------------------------------
def test_truncated_and_wrong_magic(exported, tmp_path):
    data = Path(exported["F32"]).read_bytes()
    for n, what in ((len(data) // 2, "past the end"), (200, "truncated"), (20, "truncated"), (2, "not a GGUF")):
        p = tmp_path / f"t{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(FormatError, match=what):
            gi.open_gguf(p)
        assert gi.check_contract(p) and what in gi.check_contract(p)[0]
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + data[4:])
    with pytest.raises(FormatError, match="not a GGUF"):
        gi.iter_hf_tensors(p).__next__()


def test_data_past_eof(exported, tmp_path):
    data = Path(exported["Q4_K_M"]).read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="runs past the end"):
        gi.open_gguf(p)


@pytest.mark.parametrize("counts", [(1 << 60, 1), (1, 1 << 62), (10_000_000, 10_000_000)])
def test_absurd_header_counts_fail_before_allocating(tmp_path, counts):
    p = tmp_path / "absurd.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, *counts) + b"\0" * 64)
    with pytest.raises(FormatError, match="impossible"):
        gi.validate_gguf(p)


def _kv_file(tmp_path, body: bytes, n_kv=1, n_t=0):
    p = tmp_path / "kv.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv) + body + b"\0" * 256)
    return p


def _gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_absurd_lengths_inside_metadata(tmp_path):
    # a string claiming 2**50 bytes
    p = _kv_file(tmp_path, _gstr("general.name") + struct.pack("<IQ", 8, 1 << 50))
    with pytest.raises(FormatError, match="more than the rest of the file"):
        gi.validate_gguf(p)
    # an array of 2**55 uint32
    p = _kv_file(tmp_path, _gstr("x") + struct.pack("<IIQ", 9, 4, 1 << 55))
    with pytest.raises(FormatError, match="more than the file holds"):
        gi.validate_gguf(p)
    # an unknown value type
    p = _kv_file(tmp_path, _gstr("x") + struct.pack("<I", 77))
    with pytest.raises(FormatError, match="unknown value type"):
        gi.validate_gguf(p)


def test_unknown_architecture_and_tensor_type(exported, tmp_path):
    p = tmp_path / "llama.gguf"
    w = GGUFWriter(p, "llama")
    w.add_tensor("x", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="architecture 'llama' is not 'diffusion-gemma'"):
        gi.open_gguf(p)
    # inspect reads any GGUF; the contract check says what it is
    assert [r[0] for r in gi.inspect_table(p)["tensors"]] == ["x"]
    assert any("architecture 'llama'" in q for q in gi.check_contract(p))
    # an importance matrix (general.type imatrix, no architecture, as llama-imatrix writes): named as one
    from dgplug.converters.imatrix import Entry, Imatrix

    im = Imatrix({"blk.0.ffn_up.weight": Entry(np.ones((1, 8)), np.ones(1, np.int64))}, ["calib.txt"], 1, 16)
    path = im.save(tmp_path / "im.gguf")
    want = f"{path} is an importance matrix (general.type 'imatrix'), not a model: it goes to `dgplug convert --imatrix`"
    with pytest.raises(FormatError) as e:
        gi.open_gguf(path)
    assert str(e.value) == want and gi.check_contract(path) == [want]
    assert gi.inspect_table(path)["metadata"]["general.type"] == "imatrix"
    # patch the type of one tensor record to an id ggml does not know
    data = bytearray(Path(exported["F32"]).read_bytes())
    name = b"output_norm.weight"
    i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    nd = struct.unpack_from("<I", data, i)[0]
    struct.pack_into("<I", data, i + 4 + 8 * nd, 4242)
    q = tmp_path / "type.gguf"
    q.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="unknown ggml type 4242"):
        gi.open_gguf(q)


def test_inspect_table_and_contract_problems(exported, tmp_path):
    tab = gi.inspect_table(exported["Q6_K"])
    assert tab["metadata"]["general.architecture"] == "diffusion-gemma"
    names = [r[0] for r in tab["tensors"]]
    assert names[0] == "rope_freqs.weight" and "token_embd.weight" in names
    row = next(r for r in tab["tensors"] if r[0] == "blk.0.attn_q.weight")
    assert row[1] == "Q6_K" and row[2] == [256, 256] and row[3] == 256 * 256 // 256 * 210
    # a file lacking a tensor and the mask token: reported, not raised
    r = gi.open_gguf(exported["F32"])
    p = tmp_path / "partial.gguf"
    w = GGUFWriter(p, "diffusion-gemma")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "general.name", "tokenizer.ggml.mask_token_id"):
            continue
        v = f.contents()
        if k == "tokenizer.ggml.tokens":
            v = ["<|channel>"] + v[1:]  # a token llama.cpp's chat parser must see, typed CONTROL below
        w.add_key_value(k, v, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name != "blk.1.ffn_norm.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    probs = gi.check_contract(p)
    assert "missing metadata key tokenizer.ggml.mask_token_id" in probs
    assert "missing metadata key general.name" in probs
    assert "missing tensor blk.1.ffn_norm.weight" in probs
    assert "token '<|channel>' has type CONTROL, expected USER_DEFINED" in probs


# ---------------------------------------------------------------------------------------------
# Export with an importance matrix
# ---------------------------------------------------------------------------------------------
def _synthetic_imatrix(ckpt, skip=()):
    """An imatrix for every linear and expert table of the checkpoint (what `dgplug imatrix`
    records), lognormal importances, random counts."""
    from dgplug.config import load_config
    from dgplug.converters.imatrix import Entry, Imatrix
    from dgplug.names import text_tensors

    rng = np.random.default_rng(11)
    im = Imatrix(datasets=["calib.txt", "more.txt"], chunk_count=5, chunk_size=48)
    for s in text_tensors(load_config(ckpt).text):
        if s.kind in ("linear", "experts") and s.gguf not in skip:
            m = s.shape[0] if len(s.shape) == 3 else 1
            counts = rng.integers(1, 50, m)
            im.entries[s.gguf] = Entry(np.exp(rng.normal(0, 1.5, (m, s.shape[-1]))) * counts[:, None], counts)
    return im


def test_export_with_imatrix(ckpt, exported, hf_tensors, tmp_path, monkeypatch, capsys):
    import gguf
    from test_kquants import ggml_quantize  # the scalar port of llama.cpp's quantize_row_q*_K_impl

    from dgplug.errors import InputError
    from dgplug.names import text_tensors
    from dgplug.config import load_config

    im = _synthetic_imatrix(ckpt, skip=("blk.1.attn_q.weight",))
    im.entries["blk.0.ffn_gate_up_exps.weight"].counts[3] = 0  # an expert no token reached: weights 1
    path = im.save(tmp_path / "im.gguf")
    # jobs of 300 rows: they straddle the experts' 512-row matrices, and go through the pool
    monkeypatch.setattr(ge, "CHUNK_ELEMS", 300 * 256)
    a = ge.export_gguf(ckpt, tmp_path / "a.gguf", quant="Q4_K_M", progress=False, workers=2, imatrix=path)
    err = capsys.readouterr().err
    # token_embd.weight (no imatrix has it) is not named
    assert "imatrix: no entry for 1 tensor(s): blk.1.attn_q.weight: quantized unweighted" in err, err
    b = ge.export_gguf(ckpt, tmp_path / "b.gguf", quant="Q4_K_M", progress=False, workers=1, imatrix=im)
    ra, rb, rp = (gguf.GGUFReader(p) for p in (a, b, exported["Q4_K_M"]))
    f = lambda k: ra.get_field(k).contents()  # noqa: E731
    assert f("quantize.imatrix.file") == str(path) and f("quantize.imatrix.dataset") == "calib.txt"
    assert f("quantize.imatrix.entries_count") == len(im.entries) and f("quantize.imatrix.chunks_count") == 5
    assert ra.get_field("quantize.imatrix.entries_count").types == [gguf.GGUFValueType.UINT32]
    assert rb.get_field("quantize.imatrix.file") is None  # an in-memory imatrix has no file
    ta, tb, tp = ({t.name: t for t in r.tensors} for r in (ra, rb, rp))
    weighted = set()
    for n, t in ta.items():
        assert np.array_equal(t.data, tb[n].data), n  # worker count and job size change nothing
        if t.tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K) and n in im.entries:
            weighted.add(n)
            assert not np.array_equal(t.data, tp[n].data), n
        else:  # no entry (blk.1.attn_q, token_embd), Q8_0, F32: as without an imatrix
            assert np.array_equal(t.data, tp[n].data), n
    assert {"blk.0.attn_output.weight", "blk.3.ffn_down_exps.weight", "blk.0.attn_q.weight"} <= weighted
    # the bytes are llama.cpp's: rows at the experts' edges (and an expert never reached)
    # against the scalar port, each expert with its own importance row
    hf = {s.gguf: s.hf for s in text_tensors(load_config(ckpt).text)}
    for n, qt, rows in (("blk.0.ffn_gate_up_exps.weight", T.Q4_K, [(0, 0), (0, 511), (1, 0), (3, 7), (7, 511)]),
                        ("blk.3.ffn_down_exps.weight", T.Q6_K, [(2, 255), (5, 0)]),
                        ("blk.0.attn_output.weight", T.Q5_K, [(0, 0), (0, 100)]),
                        ("blk.2.attn_q.weight", T.Q4_K, [(0, 3)])):
        assert ta[n].tensor_type == qt
        w = hf_tensors[hf[n]].float().numpy()
        w = w.reshape((-1,) + w.shape[-2:])
        imp = im.importance(n)
        data = np.asarray(ta[n].data).reshape(w.shape[0], w.shape[1], -1)
        for e, r in rows:
            assert np.array_equal(data[e, r], ggml_quantize(w[e, r], qt, imp[e]).reshape(-1)), (n, e, r)
    # another model's imatrix: one error naming the tensor, nothing written; a file type without K-quants
    im.entries["blk.0.attn_q.weight"].sum2 = np.ones((1, 17))
    with pytest.raises(InputError, match="imatrix entry blk.0.attn_q.weight has 1 x 17 values; tensor "
                                         "model.decoder.layers.0.self_attn.q_proj.weight needs 1 x 256"):
        ge.export_gguf(ckpt, tmp_path / "c.gguf", quant="Q5_K_M", progress=False, imatrix=im)
    with pytest.raises(InputError, match=r"an imatrix applies to the quantized file types but Q8_0 \(Q2_K_S, Q2_K, "
                                         r"Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_XS, IQ4_NL, "
                                         r"Q4_0, Q4_1, Q5_0, Q5_1\), not Q8_0"):
        ge.export_gguf(ckpt, tmp_path / "c.gguf", quant="Q8_0", progress=False, imatrix=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "im.gguf"]


def test_export_low_bit_with_imatrix(ckpt, exported, hf_tensors, tmp_path, capsys):
    import gguf
    from test_kquants import ggml_quantize, ggml_quantize_iq4

    from dgplug.config import load_config
    from dgplug.errors import InputError
    from dgplug.names import text_tensors

    im = _synthetic_imatrix(ckpt)
    hf = {s.gguf: s.hf for s in text_tensors(load_config(ckpt).text)}
    for quant, checks in (("Q2_K", (("blk.0.ffn_gate_up_exps.weight", T.Q2_K, [(0, 0), (5, 300)]),
                                    ("blk.2.ffn_down_exps.weight", T.Q3_K, [(1, 17)]))),
                          ("Q3_K_M", (("blk.1.attn_q.weight", T.Q3_K, [(0, 5)]),
                                      ("blk.3.ffn_down.weight", T.Q4_K, [(0, 9)]))),
                          ("IQ4_XS", (("blk.0.ffn_gate_up_exps.weight", T.IQ4_XS, [(0, 0), (7, 511)]),
                                      ("blk.1.attn_q.weight", T.IQ4_XS, [(0, 5)]),
                                      ("blk.0.attn_output.weight", T.Q5_K, [(0, 3)])))):
        r = gguf.GGUFReader(ge.export_gguf(ckpt, tmp_path / f"{quant}.gguf", quant=quant, progress=False, workers=1,
                                           imatrix=im))
        assert gi.check_contract(tmp_path / f"{quant}.gguf") == []
        ts, plain = {t.name: t for t in r.tensors}, {t.name: t for t in gguf.GGUFReader(exported[quant]).tensors}
        for n, qt, rows in checks:  # llama-quantize --imatrix's bytes, each expert with its own row
            assert ts[n].tensor_type == qt and not np.array_equal(ts[n].data, plain[n].data), n
            w = hf_tensors[hf[n]].float().numpy()
            w = w.reshape((-1,) + w.shape[-2:])
            data = np.asarray(ts[n].data).reshape(w.shape[0], w.shape[1], -1)
            for e, row in rows:
                ref = ggml_quantize_iq4 if qt == T.IQ4_XS else ggml_quantize
                assert np.array_equal(data[e, row], ref(w[e, row], qt, im.importance(n)[e]).reshape(-1))
    # Q2_K_S: refused without an imatrix (as llama-quantize), and with one that lacks a Q2_K tensor
    with pytest.raises(InputError, match=r"Q2_K_S needs an importance matrix .*dgplug imatrix"):
        ge.export_gguf(ckpt, tmp_path / "s.gguf", quant="Q2_K_S", progress=False)
    lacking = _synthetic_imatrix(ckpt, skip=("blk.1.attn_q.weight", "blk.2.ffn_up.weight"))
    with pytest.raises(InputError, match=r"imatrix has no entry for blk.1.attn_q.weight \(and 1 more\): Q2_K_S "
                                         "needs one for every Q2_K tensor"):
        ge.export_gguf(ckpt, tmp_path / "s.gguf", quant="Q2_K_S", progress=False, imatrix=lacking)
    assert not (tmp_path / "s.gguf").exists()
    s = ge.export_gguf(ckpt, tmp_path / "s.gguf", quant="Q2_K_S", progress=False, workers=1, imatrix=im)
    types = {n: t for n, t, _, _ in gi.inspect_table(s)["tensors"]}
    assert types["blk.0.ffn_down_exps.weight"] == "Q2_K" and types["token_embd.weight"] == "Q6_K"
    assert gi.check_contract(s) == [] and gguf.GGUFReader(s).get_field("general.file_type").contents() == 21


def test_add_bos_token_follows_the_source_tokenizer():
    """tokenizer.ggml.add_bos_token says what the source tokenizer does: tokenizer_config's flag when it
    has one, else whether tokenizer.json's template starts with BOS; true (Gemma's) when neither tells."""
    from dgplug.converters.gguf_export import _adds_bos

    bos = {"bos_token": "<bos>"}
    with_bos = {"post_processor": {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}}
    without = {"post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}]}}
    assert _adds_bos(with_bos, bos) is True and _adds_bos(without, bos) is False
    assert _adds_bos(without, {**bos, "add_bos_token": True}) is True  # the flag wins
    assert _adds_bos(with_bos, {**bos, "add_bos_token": False}) is False
    assert _adds_bos({}, bos) is True and _adds_bos({"post_processor": None}, {}) is True


def test_non_finite_named_at_its_index_in_the_whole_tensor(tmp_path):
    """The conversion encodes a tensor in parts of rows; a NaN is named at its index in the tensor,
    not in the part (here the third expert of four, row 50 of 100)."""
    from dgplug.checkpoint import StoredTensor

    x = np.zeros((4, 100, 64), np.float32)
    x[2, 50, 7] = np.nan
    f = tmp_path / "x.bin"
    x.tofile(f)
    st = StoredTensor("x", str(f), "F32", x.shape, 0, x.nbytes)
    with pytest.raises(FormatError) as e:
        ge._encode(st, None, 200, 300, 64, int(T.Q8_0), "blk.0.ffn_down_exps.weight")
    assert str(e.value) == ("blk.0.ffn_down_exps.weight: 1 non-finite value(s) in the rows read (the first, nan, "
                            "at index (2, 50, 7)); refusing to quantize NaN/Inf")


def _copy_with(src, dst, change: dict):
    """src rewritten by gguf-py with metadata keys changed: key -> (value, GGUFValueType, array type)."""
    r = gi.open_gguf(src)
    w = GGUFWriter(dst, "diffusion-gemma")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v, vt, sub = change.get(k, (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None))
        w.add_key_value(k, v, vt, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=T(int(t.tensor_type)))  # blocks: bytes per row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_contract_checks_values_and_types(exported, tmp_path):
    """inspect's contract check reads the values and the types of the keys, as llama.cpp's loader does
    (a key of another type is refused there), not only their presence."""
    from gguf import GGUFValueType as VT

    src, a = exported["Q8_0"], "diffusion-gemma"
    n = gi.open_gguf(src).get_field(f"{a}.expert_count").contents()
    assert gi.check_contract(_copy_with(src, tmp_path / "same.gguf", {})) == []
    cases = [
        ({f"{a}.attention.causal": (True, VT.BOOL, None)}, f"metadata key {a}.attention.causal is True, expected False"),
        ({f"{a}.attention.shared_kv_layers": (2, VT.UINT32, None)},
         f"metadata key {a}.attention.shared_kv_layers is 2, expected 0"),
        ({f"{a}.expert_used_count": (n + 5, VT.UINT32, None)},
         f"metadata key {a}.expert_used_count is {n + 5}: a model of {n} experts ({a}.expert_count) uses 1 to {n}"),
        ({"tokenizer.ggml.mask_token_id": (99999, VT.UINT32, None)},
         "metadata key tokenizer.ggml.mask_token_id is 99999, outside the vocabulary of"),
        ({"diffusion.canvas_length": (32, VT.INT32, None)}, "metadata key diffusion.canvas_length is i32, expected u32"),
        ({f"{a}.attention.layer_norm_rms_epsilon": ("1e-6", VT.STRING, None)},
         f"metadata key {a}.attention.layer_norm_rms_epsilon is string, expected f32"),
    ]
    for i, (change, want) in enumerate(cases):
        probs = gi.check_contract(_copy_with(src, tmp_path / f"c{i}.gguf", change))
        assert len(probs) == 1 and probs[0].startswith(want), (want, probs)
    # a file_type whose default mix is not the file's (llama-quantize --tensor-type): a note, not a problem
    problems, notes = gi.contract_report(_copy_with(src, tmp_path / "ft.gguf", {"general.file_type": (15, VT.UINT32, None)}))
    assert problems == [] and len(notes) == 1 and notes[0].startswith(
        "general.file_type is 15 (Q4_K_M), but blk.0.ffn_gate_up_exps.weight is Q8_0"), notes
    # a wrong size: one line naming the key, and the tensors it sizes summarised, not one line each
    width = gi.open_gguf(src).get_field(f"{a}.embedding_length").contents()
    probs = gi.check_contract(_copy_with(src, tmp_path / "e.gguf", {f"{a}.embedding_length": (width // 2, VT.UINT32, None)}))
    assert probs[0] == (f"metadata key {a}.embedding_length is {width // 2}, but token_embd.weight rows are "
                        f"{width} wide") and len(probs) <= 6 and "more tensors" in probs[-1], probs
    # a layer count that disagrees with the per-layer arrays names both keys and the file
    layers = gi.open_gguf(src).get_field(f"{a}.block_count").contents()
    p = _copy_with(src, tmp_path / "b.gguf", {f"{a}.block_count": (layers + 1, VT.UINT32, None)})
    with pytest.raises(FormatError) as e:
        gi.gguf_to_config(p)
    assert str(e.value) == (f"{p}: {a}.block_count is {layers + 1}, but {a}.attention.sliding_window_pattern "
                            f"lists {layers} layers")


def test_big_endian_named(exported, tmp_path):
    data = bytearray(Path(exported["F32"]).read_bytes())
    struct.pack_into(">I", data, 4, 3)
    p = tmp_path / "be.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="a big-endian GGUF"):
        gi.open_gguf(p)


def _split(src, dst, per_shard):
    """src rewritten as a split GGUF by gguf-py (llama.cpp's gguf-split layout: PREFIX-00001-of-0000n.gguf,
    split.no / split.count / split.tensors.count, the metadata in the first shard)."""
    r = gi.open_gguf(src)
    w = GGUFWriter(dst, "diffusion-gemma", split_max_tensors=per_shard)
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=T(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(Path(dst).parent.glob(Path(dst).stem + "-*-of-*.gguf"))


def test_split_gguf_reads_as_one_model(exported, tmp_path):
    """A split GGUF (as llama.cpp's gguf-split or gguf-py write it) opens from its first shard, or from
    the directory holding its shards, as the whole model: the same tensors, bit for bit, as the one file."""
    import torch

    import dgplug

    src = exported["Q4_K_M"]
    d = tmp_path / "split"
    d.mkdir()
    shards = _split(src, d / "m.gguf", per_shard=40)
    assert len(shards) >= 3 and shards[0].name.endswith("-00001-of-%05d.gguf" % len(shards))
    whole, joined = gi.open_gguf(src), gi.open_gguf(shards[0])
    assert [t.name for t in joined.tensors] == [t.name for t in whole.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(whole.tensors, joined.tensors))
    assert gi.check_contract(shards[0]) == []
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = dgplug.load(src)
    for where in (shards[0], d):
        m = dgplug.load(where)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values()))
    assert torch.equal(ref.generate(ids, max_denoising_steps=2, seed=1).sequences,
                       m.generate(ids, max_denoising_steps=2, seed=1).sequences)
    with pytest.raises(FormatError, match=f"shard 2 of {len(shards)} of a split GGUF: give the first shard "
                                          rf"\({shards[0].name}\)"):
        gi.open_gguf(shards[1])
    shards[-1].rename(tmp_path / "away.gguf")
    with pytest.raises(FormatError, match=f"shard {len(shards)} of {len(shards)} of this split GGUF is missing"):
        gi.open_gguf(shards[0])
