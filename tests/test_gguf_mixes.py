"""The GGUF file types added after the first set (Q4_K_S, Q5_K_S, Q3_K_L, Q4_1, Q5_0, Q5_1, IQ4_NL) and
llama-quantize's aliases (Q4_K, Q5_K, Q3_K): per-tensor types against tables written out by hand from
llama.cpp's rules (src/llama-quant.cpp, llama_tensor_get_type; the default type of each file type from
its ftype switch; tools/quantize/quantize.cpp's QUANT_OPTIONS for the aliases), and every tensor read
back by gguf-py's decoder within the bound of its type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf import quants as gq

from dgplug.converters import gguf_export as ge
from dgplug.converters import gguf_import as gi

NEW = ["Q4_K_S", "Q5_K_S", "Q3_K_L", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
# general.file_type: llama.h's llama_ftype numbers (gguf-py's LlamaFileType)
FTYPE = {"Q4_K_S": 14, "Q5_K_S": 16, "Q3_K_L": 13, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "IQ4_NL": 25,
         "Q4_K_M": 15, "Q5_K_M": 17, "Q3_K_M": 12}


def _ckpt(path, **text):
    from dgplug.testing import make_checkpoint, tiny_text_config
    return make_checkpoint(path, text=tiny_text_config(vocab_size=512, hidden_size=256, intermediate_size=256,
                                                       head_dim=64, global_head_dim=128, **text), qk_norm_scale=0.25)


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory):
    """8 layers (2, 5, 7 full attention: no attn_v; the 5 attn_v tensors are in layers 0 1 3 4 6), 4 experts
    (llama.cpp's n_expert == 8 rules off), 4 heads over 1 KV head (n_gqa 4); every row 256 wide but the
    experts' down projection (128: the K-quants fall back, the 32-block types do not)."""
    ck = _ckpt(tmp_path_factory.mktemp("mix8") / "ckpt", num_hidden_layers=8, num_experts=4, moe_intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=1, num_global_key_value_heads=1)
    from dgplug.config import load_config
    tc = load_config(ck).text
    assert [i for i, t in enumerate(tc.layer_types) if t == "sliding_attention"] == [0, 1, 3, 4, 6]
    return ck


@pytest.fixture(scope="module")
def ckpt_e8(tmp_path_factory):
    """4 layers (attn_v in layers 0 and 1), exactly 8 experts (llama.cpp's n_expert == 8 rules), n_gqa 2."""
    return _ckpt(tmp_path_factory.mktemp("mixe8") / "ckpt", num_hidden_layers=4, num_experts=8,
                 moe_intermediate_size=256)


@pytest.fixture(scope="module")
def out8(ckpt8, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix8_out")
    return {q: ge.export_gguf(ckpt8, out / f"m-{q}.gguf", quant=q, progress=False, workers=1) for q in NEW}


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _want(mix: dict, name: str, ndim: int) -> str:
    """The type the hand table `mix` gives tensor `name`: F32 for what llama.cpp does not quantize
    (1-D, norms, the router ffn_gate_inp), else by role and layer."""
    if ndim < 2 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return "F32"
    if name == "token_embd.weight":
        return mix["embd"]
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in ("attn_k", "attn_v", "attn_output", "ffn_down", "ffn_down_exps"):
        rule = mix.get(parts[2])
        if rule is not None:
            return rule[int(parts[1])]
    return mix["rest"]


# ---------------------------------------------------------------------------------------------
# 8 layers, 4 experts, n_gqa 4, written out from llama_tensor_get_type:
#   n_layer / 8 = 1 (the "first eighth" is layer 0); attn_v counted over the attn_v tensors only;
#   the tied token embedding is quantized as the output head: Q6_K (rows of 256);
#   experts' down projection, 128 wide: Q4_K -> Q5_0, Q5_K -> Q5_1 (tensor_type_fallback).
# ---------------------------------------------------------------------------------------------
MIX8 = {
    # attn_v: Q5_K while i_attention_wv < 4 (the 4 first attn_v tensors: layers 0 1 3 4; layer 6's is the 5th);
    # ffn_down: Q5_K for layer < n_layer/8; attn_output: base without 8 experts
    "Q4_K_S": dict(rest="Q4_K", embd="Q6_K",
                   attn_v={0: "Q5_K", 1: "Q5_K", 3: "Q5_K", 4: "Q5_K", 6: "Q4_K"},
                   ffn_down=["Q5_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K"],
                   ffn_down_exps=["Q5_1", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0"]),
    # no rule of its own: Q5_K everywhere but the embedding (and the 128-wide rows: Q5_1)
    "Q5_K_S": dict(rest="Q5_K", embd="Q6_K", ffn_down_exps=["Q5_1"] * 8),
    # attn_v Q5_K, ffn_down Q5_K (not Falcon), attn_output Q5_K (not 8 experts)
    "Q3_K_L": dict(rest="Q3_K", embd="Q6_K",
                   attn_v={0: "Q5_K", 1: "Q5_K", 3: "Q5_K", 4: "Q5_K", 6: "Q5_K"},
                   attn_output=["Q5_K"] * 8, ffn_down=["Q5_K"] * 8, ffn_down_exps=["Q5_1"] * 8),
    # the legacy types: their base everywhere but the embedding (128 is a multiple of 32: no fallback)
    "Q4_1": dict(rest="Q4_1", embd="Q6_K"),
    "Q5_0": dict(rest="Q5_0", embd="Q6_K"),
    "Q5_1": dict(rest="Q5_1", embd="Q6_K"),
    # attn_v Q5_K when n_gqa >= 4; without an imatrix ffn_down Q5_K for layer < n_layer/8 (experts: -> Q5_1)
    "IQ4_NL": dict(rest="IQ4_NL", embd="Q6_K",
                   attn_v={0: "Q5_K", 1: "Q5_K", 3: "Q5_K", 4: "Q5_K", 6: "Q5_K"},
                   ffn_down=["Q5_K"] + ["IQ4_NL"] * 7, ffn_down_exps=["Q5_1"] + ["IQ4_NL"] * 7),
}

# 4 layers, 8 experts: attn_k and attn_v Q8_0 (after every other attn_v rule); attn_output Q5_K for
# the file types in llama.cpp's n_expert == 8 list (Q4_K_S, IQ4_NL among them; not Q3_K_L, whose
# attn_output then stays Q3_K; Q5_K_S and the legacy types keep their base); n_layer/8 = 0: no layer
# is in the first eighth
K8, V8 = ["Q8_0"] * 4, {0: "Q8_0", 1: "Q8_0"}
MIX_E8 = {
    "Q4_K_S": dict(rest="Q4_K", embd="Q6_K", attn_k=K8, attn_v=V8, attn_output=["Q5_K"] * 4),
    "Q5_K_S": dict(rest="Q5_K", embd="Q6_K", attn_k=K8, attn_v=V8),
    "Q3_K_L": dict(rest="Q3_K", embd="Q6_K", attn_k=K8, attn_v=V8, ffn_down=["Q5_K"] * 4, ffn_down_exps=["Q5_K"] * 4),
    "Q4_1": dict(rest="Q4_1", embd="Q6_K", attn_k=K8, attn_v=V8),
    "Q5_0": dict(rest="Q5_0", embd="Q6_K", attn_k=K8, attn_v=V8),
    "Q5_1": dict(rest="Q5_1", embd="Q6_K", attn_k=K8, attn_v=V8),
    "IQ4_NL": dict(rest="IQ4_NL", embd="Q6_K", attn_k=K8, attn_v=V8, attn_output=["Q5_K"] * 4),
}


@pytest.mark.parametrize("quant", NEW)
def test_mix_as_llama_cpp(out8, quant):
    r = GGUFReader(out8[quant])
    assert r.get_field("general.file_type").contents() == FTYPE[quant]
    got = {t.name: t.tensor_type.name for t in r.tensors}
    want = {t.name: _want(MIX8[quant], t.name, len(t.shape)) for t in r.tensors}
    assert got == want
    assert gi.check_contract(out8[quant]) == []


@pytest.mark.parametrize("quant", NEW)
def test_mix_with_8_experts(ckpt_e8, tmp_path, quant):
    p = ge.export_gguf(ckpt_e8, tmp_path / f"{quant}.gguf", quant=quant, progress=False, workers=1)
    r = GGUFReader(p)
    got = {t.name: t.tensor_type.name for t in r.tensors}
    assert got == {t.name: _want(MIX_E8[quant], t.name, len(t.shape)) for t in r.tensors}


# max |err| / max |w| of a tensor, per ggml type (tests/test_gguf.py's BOUNDS): Q4_1 / Q5_1 half a step of
# range/15 or range/31 (range <= 2 max) plus the fp16 rounding of d and m; Q5_0 a full step max/16 (the
# value of the sign opposite to the block's largest maps to +16, clamped to 15), as Q4_0
ERR = {"F32": 0.0, "Q8_0": 1 / 254 + 1e-3, "Q6_K": 0.03, "Q5_K": 0.07, "Q4_K": 0.14, "Q3_K": 0.3,
       "Q4_1": 1 / 15 + 2e-3, "Q5_0": 1 / 16 + 1e-3, "Q5_1": 1 / 31 + 2e-3, "IQ4_NL": 0.11}


@pytest.mark.parametrize("quant", NEW)
def test_every_tensor_reads_back(ckpt8, out8, quant):
    from safetensors.numpy import load_file

    src = {}
    for f in sorted(Path(ckpt8).glob("*.safetensors")):
        src.update(load_file(f))
    hf = {it.gguf: it.src.name for it in ge.plan_export(ckpt8, quant)[1] if it.src is not None}
    checked = 0
    for t in GGUFReader(out8[quant]).tensors:
        if t.name not in hf:  # rope_freqs: computed, not read
            continue
        w = src[hf[t.name]].astype(np.float32)
        got = gq.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        err = float(np.abs(got - w).max() / max(float(np.abs(w).max()), 1e-12))
        assert err <= ERR[t.tensor_type.name], (t.name, t.tensor_type.name, err)
        checked += 1
    assert checked == len(hf) > 100  # every text tensor of the checkpoint


# ---------------------------------------------------------------------------------------------
# The released shapes: 30 layers (n/8 = 3), 128 experts, n_gqa 16 / 8 = 2, 25 attn_v tensors; rows of
# 2112 (ffn_down) and 704 (experts' down) are not multiples of 256 but are of 32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant,want", [
    # attn_v (index 0, 3, 4), attn_k, attn_q, attn_output, ffn_down (layer 0, 2, 3), experts' down (0, 2, 3), gate_up
    ("Q4_K_S", "Q5_K Q5_K Q4_K Q4_K Q4_K Q4_K Q5_1 Q5_1 Q5_0 Q5_1 Q5_1 Q5_0 Q4_K"),
    ("Q5_K_S", "Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_K"),
    ("Q3_K_L", "Q5_K Q5_K Q5_K Q3_K Q3_K Q5_K Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q3_K"),
    ("Q4_1", "Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1 Q4_1"),
    ("Q5_0", "Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0 Q5_0"),
    ("Q5_1", "Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1 Q5_1"),
    ("IQ4_NL", "IQ4_NL IQ4_NL IQ4_NL IQ4_NL IQ4_NL IQ4_NL Q5_1 Q5_1 IQ4_NL Q5_1 Q5_1 IQ4_NL IQ4_NL"),
])
def test_mixes_for_the_released_shapes(quant, want):
    kw = dict(n_layers=30, n_experts=128, n_gqa=2)
    t = lambda name, shape, **k: ge.tensor_type(quant, name, shape, **{**kw, **k}).name  # noqa: E731
    got = [t("blk.0.attn_v.weight", (2048, 2816), attn_v_index=i, n_attn_v=25) for i in (0, 3, 4)]
    got += [t("blk.0.attn_k.weight", (2048, 2816)), t("blk.0.attn_q.weight", (4096, 2816)),
            t("blk.5.attn_output.weight", (2816, 8192))]
    got += [t(f"blk.{L}.ffn_down.weight", (2816, 2112), layer=L) for L in (0, 2, 3)]
    got += [t(f"blk.{L}.ffn_down_exps.weight", (128, 2816, 704), layer=L) for L in (0, 2, 3)]
    got += [t("blk.0.ffn_gate_up_exps.weight", (128, 1408, 2816), layer=0)]
    assert " ".join(got) == want
    assert t("token_embd.weight", (262144, 2816)) == "Q6_K"
    # n_gqa >= 4: IQ4_NL's attn_v Q5_K; Q4_K_S's attn_v rule counts tensors, not heads
    v4 = t("blk.0.attn_v.weight", (2048, 2816), attn_v_index=6, n_attn_v=25, n_gqa=4)
    assert v4 == {"IQ4_NL": "Q5_K", "Q3_K_L": "Q5_K", "Q4_K_S": "Q4_K"}.get(quant, got[3])
    # with an imatrix IQ4_NL keeps its first ffn_down layers and Q5_0 gives them Q5_1 (i < 30/8, as
    # Q4_0 gives Q4_1); the others' mixes do not depend on it
    im = [t(f"blk.{L}.ffn_down.weight", (2816, 2112), layer=L, imatrix=True) for L in (0, 2, 3)]
    assert im == {"IQ4_NL": ["IQ4_NL"] * 3, "Q5_0": ["Q5_1", "Q5_1", "Q5_0"]}.get(quant, got[6:9])
    # 8 experts: attn_k Q8_0; attn_output Q5_K in llama.cpp's list (Q4_K_S, IQ4_NL), Q3_K_L keeps Q3_K
    assert t("blk.0.attn_k.weight", (2048, 2816), n_experts=8) == "Q8_0"
    assert t("blk.0.attn_output.weight", (2816, 4096), n_experts=8) == {
        "Q4_K_S": "Q5_K", "IQ4_NL": "Q5_K", "Q3_K_L": "Q3_K", "Q5_K_S": "Q5_K"}.get(quant, quant)
    if quant in ("Q4_1", "Q5_0", "Q5_1", "IQ4_NL"):  # rows not a multiple of 32: F16 (dgplug's rule)
        assert t("blk.5.ffn_down.weight", (2816, 2120), layer=5) == "F16"


# ---------------------------------------------------------------------------------------------
# Aliases, the CLI, the imatrix
# ---------------------------------------------------------------------------------------------
def test_aliases_are_their_targets(ckpt8, tmp_path):
    assert ge.ALIASES == {"Q5_K": "Q5_K_M", "Q4_K": "Q4_K_M", "Q3_K": "Q3_K_M"}
    for alias, target in (("Q4_K", "Q4_K_M"), ("q5_k", "Q5_K_M"), ("Q3_k", "Q3_K_M")):
        a = ge.export_gguf(ckpt8, tmp_path / f"{alias}.gguf", quant=alias, progress=False, workers=1)
        b = ge.export_gguf(ckpt8, tmp_path / f"{target}.gguf", quant=target, progress=False, workers=1)
        assert GGUFReader(a).get_field("general.file_type").contents() == FTYPE[target]
        assert a.read_bytes() == b.read_bytes(), alias
    assert ge.file_type(" q4_k_s ") == "Q4_K_S" and ge.file_type("iq4_nl") == "IQ4_NL"


def test_cli_takes_every_type_and_alias_in_any_case(ckpt8, tmp_path):
    from typer.testing import CliRunner

    from dgplug.cli import app
    from dgplug.cli.common import CLIError
    from dgplug.cli.convert import quant_arg

    for q in NEW + ["Q4_K_M"]:
        assert quant_arg(q.lower(), None) == q
    assert [quant_arg(a, None) for a in ("Q4_K", "q5_k", "Q3_k")] == ["Q4_K_M", "Q5_K_M", "Q3_K_M"]
    # llama-quantize's numbers (its QUANT_OPTIONS: the llama_ftype values, general.file_type)
    assert [quant_arg(n, None) for n in ("15", "2", "7", "18", "30", "21")] == [
        "Q4_K_M", "Q4_0", "Q8_0", "Q6_K", "IQ4_XS", "Q2_K_S"]
    with pytest.raises(CLIError, match=r"aliases Q5_K = Q5_K_M, Q4_K = Q4_K_M, Q3_K = Q3_K_M"):
        quant_arg("Q1_0", None)
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "m.gguf"), "-q", "q4_k", "--quiet"])
    assert r.exit_code == 0, r.output
    assert GGUFReader(tmp_path / "m.gguf").get_field("general.file_type").contents() == FTYPE["Q4_K_M"]
    # Q8_0 has no importance path (in llama.cpp either): --imatrix refused before any work
    im = tmp_path / "im.gguf"
    im.write_bytes(b"")
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "x.gguf"), "-q", "q8_0", "--imatrix", str(im)])
    assert r.exit_code == 1 and "(Q8_0: llama.cpp's Q8_0 has no importance path)" in r.stderr, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_file_types(ckpt8, out8, tmp_path):
    from test_gguf import _synthetic_imatrix
    from test_kquants import ggml_legacy_row, ggml_quantize, ggml_quantize_iq4

    from dgplug.errors import InputError

    assert {"Q4_K_S", "Q5_K_S", "Q3_K_L", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= set(ge.IMATRIX_FILE_TYPES)
    assert "Q8_0" not in ge.IMATRIX_FILE_TYPES
    im = _synthetic_imatrix(ckpt8)
    with pytest.raises(InputError, match="an imatrix applies to the quantized file types but Q8_0 .*, not Q8_0"):
        ge.export_gguf(ckpt8, tmp_path / "x.gguf", quant="Q8_0", progress=False, imatrix=im)
    from safetensors.numpy import load_file
    src = {}
    for f in sorted(Path(ckpt8).glob("*.safetensors")):
        src.update(load_file(f))
    def legacy(rows, qt, imp):  # quantize_row_q{4,5}_{0,1}_impl, restated in test_kquants
        return np.stack([ggml_legacy_row(r, qt, imp) for r in rows.reshape(-1, rows.shape[-1])])

    for quant, n, qt, ref in (("IQ4_NL", "blk.0.ffn_down.weight", T.IQ4_NL, ggml_quantize_iq4),
                              ("Q4_K_S", "blk.6.attn_v.weight", T.Q4_K, ggml_quantize),
                              ("Q3_K_L", "blk.3.ffn_down.weight", T.Q5_K, ggml_quantize),
                              ("Q4_0", "blk.0.ffn_down.weight", T.Q4_1, legacy),
                              ("Q4_0", "blk.3.attn_q.weight", T.Q4_0, legacy),
                              ("Q5_0", "blk.0.ffn_down_exps.weight", T.Q5_1, legacy),
                              ("Q5_1", "blk.5.attn_output.weight", T.Q5_1, legacy),
                              # the fallbacks of 128-wide rows: Q4_K -> Q5_0, Q3_K -> Q4_0, weighted too
                              ("Q4_K_S", "blk.3.ffn_down_exps.weight", T.Q5_0, legacy),
                              ("Q2_K", "blk.3.ffn_down_exps.weight", T.Q4_0, legacy)):
        p = tmp_path / f"{quant}.gguf"
        if not p.exists():
            ge.export_gguf(ckpt8, p, quant=quant, progress=False, workers=1, imatrix=im)
        types, plain = _types(p), {it.gguf: it.qtype.name for it in ge.plan_export(ckpt8, quant, False)[1]}
        # IQ4_NL: llama.cpp's first-eighth ffn_down rule holds without an imatrix only; Q4_0 / Q5_0:
        # with one only (the first eighth Q4_1 / Q5_1)
        first = {"IQ4_NL": "IQ4_NL", "Q4_0": "Q4_1", "Q5_0": "Q5_1"}.get(quant)
        want = dict(plain, **({"blk.0.ffn_down.weight": first, "blk.0.ffn_down_exps.weight": first} if first else {}))
        assert types == want, quant
        t = next(t for t in GGUFReader(p).tensors if t.name == n)
        assert t.tensor_type == qt
        hf = {it.gguf: it.src.name for it in ge.plan_export(ckpt8, quant, True)[1] if it.src is not None}
        w = src[hf[n]].astype(np.float32)
        data = np.asarray(t.data).reshape(w.shape[0], -1)
        for row in (0, w.shape[0] - 1):  # llama-quantize --imatrix's bytes
            imp = im.importance(n)[row if w.ndim == 3 else 0]  # experts: each its own row
            assert np.array_equal(data[row], ref(w[row:row + 1], qt, imp).reshape(-1)), (quant, n, row)


def test_per_tensor_options_as_llama_quantize():
    # llama.cpp's llama_tensor_get_type: --token-embedding-type as given; --tensor-type, first match
    # wins and skips the mix; --pure skips the mix; --output-tensor-type types the tied token_embd;
    # the fallbacks for rows the type cannot hold still apply (704 and 2112 are not multiples of 256)
    kw = dict(n_layers=30, n_experts=128, n_gqa=2)

    def t(name, shape, ov, quant="Q4_K_M", **k):
        return ge.tensor_type(quant, name, shape, **{**kw, **k}, overrides=ov).name

    ov = ge.parse_overrides(["attn_v=Q8_0", "attn=q4_0", r"ffn_down_exps=q6_k"])
    assert t("blk.0.attn_v.weight", (2048, 2816), ov, attn_v_index=0, n_attn_v=25) == "Q8_0"
    assert t("blk.0.attn_q.weight", (4096, 2816), ov) == "Q4_0"
    assert t("blk.3.ffn_down_exps.weight", (128, 2816, 704), ov, layer=3) == "Q8_0"  # Q6_K -> Q8_0
    assert t("blk.3.ffn_down.weight", (2816, 2112), ov, layer=3) == "Q5_0"  # the mix: Q4_K -> Q5_0
    assert t("blk.0.ffn_gate_inp.weight", (128, 2816), ov) == "F32"  # the router is never quantized
    pure = ge.parse_overrides(pure=True)
    assert t("blk.0.attn_v.weight", (2048, 2816), pure, attn_v_index=0, n_attn_v=25) == "Q4_K"  # not Q6_K
    assert t("blk.0.ffn_down.weight", (2816, 2112), pure, layer=0) == "Q5_0"
    assert t("token_embd.weight", (262144, 2816), pure) == "Q4_K"
    assert t("token_embd.weight", (262144, 2816), ge.parse_overrides(output_tensor_type="q8_0")) == "Q8_0"
    both = ge.parse_overrides(token_embedding_type="Q5_K", output_tensor_type="Q8_0")
    assert t("token_embd.weight", (262144, 2816), both) == "Q5_K"
    assert t("token_embd.weight", (262144, 2816), both, quant="F16") == "Q5_K"  # as given, whatever the file type
    with pytest.raises(ge.InputError, match="--token-embedding-type Q4_K: token_embd.weight has rows of 704"):
        t("token_embd.weight", (512, 704), ge.parse_overrides(token_embedding_type="q4_k"))
    for bad, msg in ((["attn_v"], "give PATTERN=TYPE"), (["attn_v=q9_k"], "'q9_k' is not a ggml type dgplug writes"),
                     (["(=q8_0"], "bad pattern")):
        with pytest.raises(ge.InputError, match=msg):
            ge.parse_overrides(bad)


def test_per_tensor_options_on_the_command_line(ckpt8, tmp_path):
    from typer.testing import CliRunner

    from dgplug.cli import app

    g = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(g), "-q", "q4_k_m", "--tensor-type", r"blk\.0\.=q8_0",
                                 "--tensor-type", "no_such_tensor=q8_0", "--pure"])
    assert r.exit_code == 0, r.output
    got = _types(g)
    want = {it.gguf: it.qtype.name for it in ge.plan_export(ckpt8, "Q4_K_M", False, ge.parse_overrides(
        [r"blk\.0\.=q8_0"], pure=True))[1]}
    assert got == want
    assert got["blk.0.attn_q.weight"] == "Q8_0" and got["blk.1.attn_v.weight"] == "Q4_K"  # pure: no Q6_K attn_v
    assert got["blk.1.ffn_down_exps.weight"] == "Q5_0"  # 128-wide rows: Q4_K's fallback
    assert "--tensor-type no_such_tensor=q8_0 matches no quantized tensor" in r.stderr
    assert GGUFReader(g).get_field("general.file_type").contents() == 15  # Q4_K_M, as llama-quantize keeps it
    for args, msg in ((["-q", "q4_k_m", "--tensor-type", "attn=q3"], "'q3' is not a ggml type dgplug writes"),
                      (["-q", "int4", "--pure"], "--pure: GGUF options (llama.cpp's); --quant int4 writes safetensors")):
        r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "x.gguf"), *args])
        assert r.exit_code == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_split_writing_as_llama_cpp(ckpt8, out8, tmp_path):
    # --split-max-tensors / --split-max-size: gguf-py's shards (NAME-0000i-of-0000n.gguf, split.* keys),
    # read back as one model with the same tensors, bit for bit, as the single file
    from typer.testing import CliRunner

    from dgplug.cli import app

    one = out8["Q5_0"]
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "m.gguf"), "-q", "q5_0", "--split-max-tensors",
                                 "40", "--quiet"])
    assert r.exit_code == 0, r.output
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    n = len(shards)
    assert n >= 3 and [s.name for s in shards] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*"))  # no temporary file left
    assert "wrote " + ", ".join(str(s) for s in shards) in r.stdout
    split = gi.open_gguf(shards[0])
    ref = GGUFReader(one)
    got = {t.name: np.asarray(t.data).tobytes() for t in split.tensors}
    assert got == {t.name: np.asarray(t.data).tobytes() for t in ref.tensors}
    for i, s in enumerate(shards):
        g = GGUFReader(s)
        assert g.get_field("split.no").contents() == i and g.get_field("split.count").contents() == n
        assert len(g.tensors) <= 40
    # a second run refuses without --overwrite, naming a shard, and leaves the shards as they are
    before = [s.stat().st_mtime_ns for s in shards]
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "m.gguf"), "-q", "q5_0", "--split-max-tensors", "40"])
    assert r.exit_code == 1 and f"{shards[0]} exists: pass --overwrite" in r.stderr, r.output
    assert [s.stat().st_mtime_ns for s in shards] == before
    # a size that holds everything: one plain file, no split keys (as llama.cpp's converter)
    r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "w.gguf"), "-q", "q5_0", "--split-max-size", "5G",
                                 "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "w.gguf").is_file() and "split.count" not in GGUFReader(tmp_path / "w.gguf").fields
    from dgplug.cli.convert import split_size_arg
    assert [split_size_arg(v) for v in ("48G", "500m", "2k", "123")] == [48 * 10**9, 500 * 10**6, 2000, 123]
    for args, msg in ((["--split-max-size", "4X"], "--split-max-size '4X': give a positive number"),
                      (["--split-max-tensors", "0"], "--split-max-tensors 0: give a positive number")):
        r = CliRunner().invoke(app, ["convert", str(ckpt8), str(tmp_path / "x.gguf"), "-q", "q8_0", *args])
        assert r.exit_code == 1 and msg in r.stderr, r.output
