"""GGUF weights kept packed (kernels.ggml): the torch dequantisers against gguf-py's decoder (bit for
bit in fp32), the packed weight's rows / lookup / expert views, the Triton MoE reading the blocks
against its torch twin, and a packed GGUF model against the same file dequantised at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from dgplug.converters import kquants as kq
from dgplug.kernels import ggml
from dgplug.kernels.ggml import PACKED_TYPES, GGMLWeight, dequantize_blocks


def _random_blocks(qtype, rows, cols, seed=0) -> np.ndarray:
    """Every bit pattern in the quants; fp16 scale fields random but finite."""
    qk, nb = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, cols // qk, nb), dtype=np.uint8)
    for at in ggml._F16_FIELDS[qtype]:
        b[:, :, at:at + 2] = (rng.standard_normal((rows, cols // qk)) * 0.01).astype(np.float16).view(np.uint8) \
            .reshape(rows, cols // qk, 2)
    return b.reshape(rows, cols // qk * nb)


def _encoded_blocks(qtype, w: np.ndarray) -> np.ndarray:
    """Real weights encoded by gguf-py (32-element types) or dgplug's K-quant / IQ4 encoders."""
    if qtype in kq.ENCODED_TYPES:
        return kq.quantize(w, qtype, name="w")
    return gq.quantize(w, qtype)


def _same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    return np.array_equal(a.numpy().view(np.uint32), np.ascontiguousarray(b, dtype=np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_dequantisers_bit_exact_against_gguf_py(qtype):
    w = (np.random.default_rng(1).standard_normal((24, 512)) * 0.05).astype(np.float32)
    for raw in (_random_blocks(qtype, 24, 512), _encoded_blocks(qtype, w)):
        got = dequantize_blocks(torch.from_numpy(raw.copy()), qtype)
        assert got.shape == (24, 512) and got.dtype == torch.float32
        assert _same_bits(got, gq.dequantize(raw, qtype))


def test_dequantise_chunks_and_dtypes(monkeypatch):
    raw = _random_blocks(T.Q4_K, 40, 1024, seed=2)
    ref = gq.dequantize(raw, T.Q4_K)
    monkeypatch.setattr(ggml, "_CHUNK", 3000)  # 2 rows per chunk: the loop and its last short chunk
    got = dequantize_blocks(torch.from_numpy(raw), T.Q4_K)
    assert _same_bits(got, ref)
    bf = dequantize_blocks(torch.from_numpy(raw), T.Q4_K, torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, torch.from_numpy(ref).to(torch.bfloat16))
    with pytest.raises(ValueError, match="Q4_K rows must be uint8"):
        dequantize_blocks(torch.zeros(3, 100, dtype=torch.uint8), T.Q4_K)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_triton_row_decoder_matches_torch(qtype):
    """The Triton decoder (what rows / lookup / linear of a packed weight use on a GPU), in the
    interpreter: fp32 bit for bit against the torch decoder (= gguf-py), bf16 its rounding; rows
    not a multiple of its tile and K of several blocks."""
    raw = torch.from_numpy(_random_blocks(qtype, 21, 768, seed=3))
    ref = dequantize_blocks(raw, qtype, impl="torch")
    got = dequantize_blocks(raw, qtype, impl="triton")
    assert got.shape == (21, 768) and _same_bits(got, ref.numpy())
    bf = dequantize_blocks(raw.reshape(3, 7, -1), qtype, torch.bfloat16, impl="triton")
    assert bf.shape == (3, 7, 768) and torch.equal(bf.reshape(21, 768), ref.to(torch.bfloat16))
    if GGML_QUANT_SIZES[qtype][0] == 32:  # K = 3 and 5 blocks: the decoder's K tile of 128 runs past the row
        for k in (96, 160):
            raw = torch.from_numpy(_random_blocks(qtype, 5, k, seed=k))
            assert _same_bits(dequantize_blocks(raw, qtype, impl="triton"), dequantize_blocks(raw, qtype).numpy())


def test_row_decoder_choice_and_errors():
    raw = torch.from_numpy(_random_blocks(T.Q8_0, 2, 64))
    assert dequantize_blocks(raw[:0], T.Q8_0, impl="triton").shape == (0, 64)
    with pytest.raises(ValueError, match="impl must be None, 'torch' or 'triton', got 'cuda'"):
        dequantize_blocks(raw, T.Q8_0, impl="cuda")


def test_packed_weight_views():
    qtype = T.Q6_K
    E, N, K = 3, 10, 512
    raw = _random_blocks(qtype, E * N, K, seed=3).reshape(E, N, -1)
    full = torch.from_numpy(gq.dequantize(raw, qtype))
    w = GGMLWeight(qtype, torch.from_numpy(raw), (E, N, K))
    assert w.nbytes == raw.size and w.shape == (E, N, K) and w.dim() == 3
    assert _same_bits(w.dequantize(), full.numpy())
    e1 = w[1]  # an expert: still packed, a view of the same memory
    assert isinstance(e1, GGMLWeight) and e1.shape == (N, K) and e1.blocks.data_ptr() != w.blocks.data_ptr()
    assert e1.blocks.untyped_storage().data_ptr() == w.blocks.untyped_storage().data_ptr()
    assert torch.equal(e1.dequantize(), full[1])
    assert torch.equal(e1.rows(2, 7), full[1, 2:7]) and torch.equal(e1[2:7], full[1, 2:7])
    ids = torch.tensor([[4, 0], [9, 4]])
    assert torch.equal(e1.lookup(ids), torch.nn.functional.embedding(ids, full[1]))
    assert e1.to(dtype=torch.bfloat16).rows(0, 3).dtype == torch.bfloat16
    with pytest.raises(IndexError):
        w.rows(0, 2)
    with pytest.raises(ValueError, match="needs uint8 blocks"):
        GGMLWeight(qtype, torch.from_numpy(raw), (E, N, K + 256))
    with pytest.raises(ValueError, match="not kept packed"):
        GGMLWeight(T.TQ2_0, torch.from_numpy(raw), (E, N, K))


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_nonfinite_is_read_from_the_scales(qtype):
    raw = _random_blocks(qtype, 4, 256, seed=4)
    w = GGMLWeight(qtype, torch.from_numpy(raw.copy()), (4, 256))
    assert not w.nonfinite() and bool(torch.isfinite(w.dequantize()).all())
    at = ggml._F16_FIELDS[qtype][-1]
    bad = raw.copy()
    bad[2, at:at + 2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    w = GGMLWeight(qtype, torch.from_numpy(bad), (4, 256))
    with np.errstate(invalid="ignore"):
        assert w.nonfinite() and not bool(np.isfinite(gq.dequantize(bad, qtype)).all())


# ---------------------------------------------------------------------------------------------
# The MoE: Triton (interpreter) reading the blocks vs the torch twin dequantising per expert
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_type,down_type", [(T.Q4_K, T.Q6_K), (T.Q5_K, T.Q5_0), (T.Q8_0, T.Q5_1),
                                                 (T.Q4_0, T.Q4_1), (T.Q3_K, T.Q2_K), (T.IQ4_XS, T.IQ4_NL)],
                         ids=lambda t: t.name)
def test_triton_moe_reads_the_blocks(gate_type, down_type):
    from dgplug.kernels import moe, moe_triton

    if not moe.HAS_TRITON:
        pytest.skip("triton is not importable")
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels run in the interpreter on CPU)")
    E, D, I, Tn, K = 3, 256, 256, 9, 2
    gate_up = GGMLWeight(gate_type, torch.from_numpy(_random_blocks(gate_type, E * 2 * I, D, 5)).reshape(E, 2 * I, -1),
                         (E, 2 * I, D))
    down = GGMLWeight(down_type, torch.from_numpy(_random_blocks(down_type, E * D, I, 6)).reshape(E, D, -1), (E, D, I))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(Tn, D, generator=g) * 0.1
    idx = torch.randint(0, E, (Tn, K), generator=g)
    idx[0, 1] = E  # the "no expert" sentinel is dropped
    w = torch.rand(Tn, K, generator=g)
    ref = moe.moe_forward_torch(x, idx, w, gate_up, down)
    got = moe_triton.moe_forward_triton(x, idx, w, gate_up, down)
    dense = moe.moe_forward_torch(x, idx, w, gate_up.dequantize(), down.dequantize())
    assert torch.equal(ref, dense)  # the twin dequantises per expert: the same numbers
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    few = moe_triton._default_config(Tn, K, E, D, I, interp=False, ggml=True)  # the GPU's tiles: K 64 x N 32
    many = moe_triton._default_config(4096, K, E, D, I, interp=False, ggml=True)  # many rows per expert: 32 x 32
    assert (few["BLOCK_K1"], few["BLOCK_N1"], many["BLOCK_K1"], many["BLOCK_N1"]) == (64, 32, 32, 32)
    for gpu in (few, many, dict(few, GGML_RUNS=0), dict(few, BLOCK_K1=128, BLOCK_K2=128)):
        got = moe_triton.moe_forward_triton(x, idx, w, gate_up, down, config=gpu)
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("down_type", [T.Q8_0, T.Q5_0, T.Q4_1], ids=lambda t: t.name)
def test_triton_moe_down_with_a_short_last_tile(down_type):
    """I = 96 (3 blocks of 32): the down step's last K tile of 64 holds one run; the result stays right
    (the run past I reads the next row's bytes, masked; the activations there are zero as well, so
    a missing mask would show only as a NaN; the row decoder's K = 96 and 160 cases run the same masks)."""
    from dgplug.kernels import moe, moe_triton

    import os

    if not moe.HAS_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the Triton kernels run in the interpreter on CPU)")
    E, D, I, Tn, K = 2, 256, 96, 5, 2
    gate_up = GGMLWeight(T.Q4_K, torch.from_numpy(_random_blocks(T.Q4_K, E * 2 * I, D, 7)).reshape(E, 2 * I, -1),
                         (E, 2 * I, D))
    down = GGMLWeight(down_type, torch.from_numpy(_random_blocks(down_type, E * D, I, 8)).reshape(E, D, -1), (E, D, I))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(Tn, D, generator=g) * 0.1
    idx = torch.randint(0, E, (Tn, K), generator=g)
    w = torch.rand(Tn, K, generator=g)
    ref = moe.moe_forward_torch(x, idx, w, gate_up, down)
    few = moe_triton._default_config(Tn, K, E, D, I, interp=False, ggml=True)
    for cfg in (few, dict(few, GGML_RUNS=0)):
        got = moe_triton.moe_forward_triton(x, idx, w, gate_up, down, config=cfg)
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------
# A GGUF model loaded packed vs the same file dequantised at load (the path before packing)
# ---------------------------------------------------------------------------------------------
QUANTS = ["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.testing import make_checkpoint, tiny_text_config

    root = tmp_path_factory.mktemp("ggml")
    tc = tiny_text_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64,
                          global_head_dim=128, vocab_size=512)
    src = make_checkpoint(root / "src", text=tc, qk_norm_scale=0.25)
    files = {}
    for q in QUANTS:
        files[q] = root / f"m-{q}.gguf"
        export_gguf(src, files[q], quant=q, progress=False, workers=1)
    return files


def _dequantised(path):
    """dgplug.load of a GGUF as it was before packing: every tensor dequantised by gguf-py at load."""
    from dgplug.config import from_dict
    from dgplug.converters.gguf_import import gguf_to_config, iter_hf_tensors
    from dgplug.loader import build

    raw = gguf_to_config(path)
    gen = raw.pop("generation_config")
    raw.pop("mask_token_id", None)
    return build(from_dict(raw), iter_hf_tensors(path), None, None, gen)


def _inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (2, 12), generator=g)
    canvas = torch.randint(0, vocab, (2, 16), generator=g)
    sc = torch.randn(2, 16, vocab, generator=g) * 3
    return ids, canvas, sc


@pytest.mark.parametrize("quant", QUANTS)
def test_packed_model_matches_dequantised_load(gguf_files, quant):
    import dgplug
    from dgplug.converters.gguf_import import open_gguf
    from dgplug.loader import weight_bytes

    path = gguf_files[quant]
    packed, ref = dgplug.load(path), _dequantised(path)
    reader = open_gguf(path)
    kept = {t.name for t in reader.tensors if T(int(t.tensor_type)) in PACKED_TYPES and len(t.shape) >= 2}
    assert "token_embd.weight" in kept and "blk.0.ffn_gate_up_exps.weight" in kept
    table, experts = packed.embed_tokens.weight, packed.layers[0].experts
    assert isinstance(table, GGMLWeight) and isinstance(experts.gate_up_proj, GGMLWeight)
    assert isinstance(packed.layers[0].self_attn.q_proj.weight, GGMLWeight)
    assert packed.dtype == torch.float32 and table.device.type == "cpu"
    # resident weight bytes = the file's tensor bytes (the blocks as stored; F32 tensors as they are)
    pb, ob = weight_bytes(packed)
    file_tensors = sum(int(t.n_bytes) for t in reader.tensors)
    assert pb == sum(int(t.n_bytes) for t in reader.tensors if t.name in kept)
    assert abs(pb + ob - file_tensors) <= 0.02 * file_tensors  # + rope tables, - rope_freqs

    ids, canvas, sc = _inputs(packed.tc.vocab_size)
    assert torch.equal(packed.embed(canvas), ref.embed(canvas))  # the lookup decodes the same rows
    with torch.no_grad():
        a = packed(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc)
        b = ref(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc)
    # the same numbers up to summation order (MoE twin vs reference loop, head and soft embedding by chunks)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert (a.hidden - b.hidden).abs().max().item() <= 1e-4 * b.hidden.abs().max().item()


def test_packed_head_and_sampler(gguf_files, monkeypatch):
    """The tied head, the soft embedding and the fused sampler read the table a chunk of rows at a time."""
    import dgplug
    from dgplug import ops
    from dgplug.kernels.sampler import head_sample, head_sample_reference

    monkeypatch.setattr(ggml, "_CHUNK", 256 * 100)  # 100 rows per chunk: 6 chunks, the last one short
    model = dgplug.load(gguf_files["Q4_K_M"])
    table = model.embed_tokens.weight
    assert table.qtype == T.Q6_K
    dense = table.dequantize()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(24, 256, generator=g)
    assert (model.head(h) - ops.softcap(h @ dense.T, 30.0)).abs().max().item() <= 1e-5
    p = torch.randn(3, 512, generator=g)
    assert (ops.soft_embedding(p, table) - ops.soft_embedding(p, dense)).abs().max().item() <= 1e-5
    ref = head_sample_reference(h, dense, temperature=0.7, seed=3, step=1)
    got = head_sample(h, table, temperature=0.7, seed=3, step=1, impl="torch", vocab_tile=64)
    assert torch.equal(got.argmax, ref.argmax) and torch.equal(got.token, ref.token)
    assert (got.entropy - ref.entropy).abs().max().item() <= 1e-4
    assert (got.soft - ref.soft).abs().max().item() <= 1e-4
    tri = head_sample(h, table, temperature=0.7, seed=3, step=1, impl="triton")  # the GPU's chunk loop, packed
    assert torch.equal(tri.argmax, ref.argmax) and torch.equal(tri.token, ref.token)
    assert (tri.soft - ref.soft).abs().max().item() <= 1e-4
    with pytest.raises(TypeError, match="does not take a packed GGUF weight"):
        torch.add(table, 1)


def test_packed_generate_and_dtype(gguf_files):
    import dgplug

    path = gguf_files["Q8_0"]
    packed, ref = dgplug.load(path), _dequantised(path)
    ids = torch.randint(5, 500, (1, 8), generator=torch.Generator().manual_seed(4))
    a = packed.generate(ids, max_new_tokens=16, max_denoising_steps=3, seed=1)
    b = ref.generate(ids, max_new_tokens=16, max_denoising_steps=3, seed=1)
    assert torch.equal(a.sequences, b.sequences)
    bf = dgplug.load(path, dtype="bf16")
    assert bf.dtype == torch.bfloat16 and bf.embed_tokens.weight.rows(0, 2).dtype == torch.bfloat16
    assert torch.equal(bf.embed_tokens.weight.rows(0, 9), ref.embed_tokens.weight[:9].to(torch.bfloat16))


def test_nonfinite_gguf_is_refused(gguf_files, tmp_path):
    import shutil

    import dgplug
    from dgplug.converters.gguf_import import open_gguf
    from dgplug.errors import CheckpointError

    bad = tmp_path / "bad.gguf"
    shutil.copy(gguf_files["Q8_0"], bad)
    r = open_gguf(bad)
    t = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
    off = int(t.data_offset) + 34 * 5  # the fp16 scale of the sixth block
    del r
    with open(bad, "r+b") as f:
        f.seek(off)
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(CheckpointError, match="layers.1.self_attn.q_proj.weight holds NaN"):
        dgplug.load(bad)
