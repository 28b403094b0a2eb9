"""Fused MoE (dgplug.kernels.moe): Triton (interpreter on CPU, or CUDA) and torch twin vs the
transformers-order reference dgplug.ops.moe, plus the quantized layouts and edge cases."""

import os

import pytest
import torch

from dgplug import ops
from dgplug.kernels import moe as M, moe_triton as MT, quantized_weight as QW
from dgplug.kernels.moe import QuantizedWeight, moe_forward, moe_forward_torch

needs_triton = pytest.mark.skipif(not M.HAS_TRITON, reason="triton not importable")
CUDA = torch.cuda.is_available()
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]

# small shapes with ragged tails: D=96 is 1.5 K-tiles / N-tiles of 64, I=48 is 0.75 of 64
T, D, I, E, K = 24, 96, 48, 8, 2


def _device():
    return "cuda" if CUDA else "cpu"


def make_weights(e=E, d=D, i=I, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, d, generator=g) * d ** -0.5
    down = torch.randn(e, d, i, generator=g) * i ** -0.5
    return gate_up.to(device, dtype), down.to(device, dtype)


def make_routing(t=T, e=E, k=K, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=g), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True) * (0.5 + torch.rand(t, k, generator=g))
    return w.to(device), idx.to(device)


def make_x(t=T, d=D, dtype=torch.float32, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g).to(device, dtype)


def reference(x, idx, w, gate_up, down):
    """ops.moe on fp32 copies (dequantised weights), on CPU."""
    deq = lambda t: t.dequantize() if isinstance(t, QuantizedWeight) else t.float()  # noqa: E731
    return ops.moe(x.float().cpu(), idx.cpu(), w.float().cpu(), deq(gate_up).cpu(), deq(down).cpu())


def close(a, b, tol):
    a, b = a.float().cpu(), b.float().cpu()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max err {err:.3e} vs scale {scale:.3e} (tol {tol})"


# ------------------------------------------------------------------------------------------
# plain weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_reference(impl):
    dev = _device()
    gu, dn = make_weights(device=dev)
    w, idx = make_routing(device=dev)
    x = make_x(device=dev)
    out = moe_forward(x, idx, w, gu, dn, impl=impl)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    close(out, reference(x, idx, w, gu, dn), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_matches_reference(impl, dtype):
    dev = _device()
    gu, dn = make_weights(dtype=dtype, device=dev)
    w, idx = make_routing(device=dev)
    x = make_x(dtype=dtype, device=dev)
    out = moe_forward(x, idx, w, gu, dn, impl=impl)
    assert out.dtype == dtype
    close(out, reference(x, idx, w, gu, dn), 1e-2 if dtype == torch.float16 else 3e-2)


@needs_triton
def test_triton_equals_torch_twin():
    gu, dn = make_weights()
    w, idx = make_routing()
    x = make_x()
    a = moe_forward(x, idx, w, gu, dn, impl="triton")
    b = moe_forward(x, idx, w, gu, dn, impl="torch")
    close(a, b, 1e-5)


def test_transformers_experts_module():
    """Directly against transformers' DiffusionGemmaTextExperts (eager) with the same weights."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import (
        DiffusionGemmaTextConfig,
    )
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
        DiffusionGemmaTextExperts,
    )

    cfg = DiffusionGemmaTextConfig(
        hidden_size=D, moe_intermediate_size=I, num_experts=E, top_k_experts=K,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        global_head_dim=16, intermediate_size=64, vocab_size=128,
    )
    cfg._experts_implementation = "eager"
    mod = DiffusionGemmaTextExperts(cfg).eval()
    gu, dn = make_weights()
    with torch.no_grad():
        mod.gate_up_proj.copy_(gu)
        mod.down_proj.copy_(dn)
        w, idx = make_routing()
        x = make_x()
        want = mod(x, idx, w)
    close(moe_forward(x, idx, w, gu, dn, impl="torch"), want, 1e-5)
    if M.HAS_TRITON:
        close(moe_forward(x, idx, w, gu, dn, impl="triton"), want, 1e-5)


# ------------------------------------------------------------------------------------------
# quantized weights
# ------------------------------------------------------------------------------------------


def _quantized(scheme, group_size=32, symmetric=False, device="cpu"):
    gu, dn = make_weights()
    q1 = QuantizedWeight.quantize(gu, scheme, group_size=group_size, symmetric=symmetric)
    # I=48 with group 32: two groups per down row, the last one short (ceil groups)
    q2 = QuantizedWeight.quantize(dn, scheme, group_size=group_size, symmetric=symmetric)
    return gu, dn, q1.to(device), q2.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme,sym,group", [
    ("int4", False, 32),  # group < BLOCK_K: per-element scales
    ("int4", True, 64),  # group == BLOCK_K (interpreter tiles): one scale per row and tile
    ("int8", False, 0), ("fp8", False, 0)])
def test_quantized_matches_dequantised_reference(impl, scheme, sym, group):
    dev = _device()
    gu, dn, q1, q2 = _quantized(scheme, group_size=group or 128, symmetric=sym, device=dev)
    w, idx = make_routing(device=dev)
    x = make_x(device=dev)
    out = moe_forward(x, idx, w, q1, q2, impl=impl)
    close(out, reference(x, idx, w, q1, q2), 1e-5)
    # and the quantization error itself stays small against the unquantised experts
    bound = {"int4": 0.25, "int8": 0.02, "fp8": 0.1}[scheme]
    close(out, reference(x, idx, w, gu, dn), bound)


@needs_triton
@pytest.mark.parametrize("scheme", [None, "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_plain_kernels(scheme, dtype):
    """The 16-bit, int8 and fp8 kernels with their dots swapped (W @ x^T: SWAP_AB, the GPU check's
    wgmma variant at ~16 pairs per expert) against the reference and the unswapped kernels, at
    ragged tails (D and I not multiples of the tiles) and a short expert block (BLOCK_M 16)."""
    dev = _device()
    if scheme is None:
        q1, q2 = make_weights(device=dev)
    else:
        _, _, q1, q2 = _quantized(scheme, device=dev)
    w, idx = make_routing(device=dev)
    x = make_x(dtype=dtype, device=dev)
    cfg = dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=32, BLOCK_N2=32, BLOCK_K2=32)
    swapped = MT.moe_forward_triton(x, idx, w, q1, q2, config=dict(cfg, SWAP_AB=True))
    plain = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    close(swapped, plain, 1e-5)
    close(swapped, reference(x, idx, w, q1, q2), 1e-5 if dtype == torch.float32 else 2e-2)


@needs_triton
@pytest.mark.parametrize("group,bk,swap", [(64, 32, False), (64, 64, False), (16, 64, False), (64, 32, True),
                                           (64, 64, True)])
def test_int4_scale_paths(group, bk, swap):
    """int4 groups spanning K tiles (one scale per row, folded into the accumulator), by the
    plain kernels and the swapped ones (W @ x^T, the GPU default), and several groups per tile
    (dequantised per element)."""
    _, _, q1, q2 = _quantized("int4", group_size=group, device=_device())
    w, idx = make_routing(device=_device())
    x = make_x(device=_device())
    cfg = dict(BLOCK_K1=bk, BLOCK_K2=bk, SWAP_AB=swap)
    out = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    close(out, reference(x, idx, w, q1, q2), 1e-5)


@needs_triton
@pytest.mark.parametrize("swap", [False, True])
def test_int4_even_k_drops_the_k_bound(swap):
    """K a whole number of K tiles (the release: 2816 = 22 x 128, 704 = 11 x 64): the int4 kernels
    load the weight bytes without the K bound (which hid their contiguity from the GPU compiler);
    the same numbers as with the bound (EVEN_K=False), and as the dequantised reference."""
    _, _, q1, q2 = _quantized("int4", group_size=16, device=_device())
    w, idx = make_routing(device=_device())
    x = make_x(device=_device())
    cfg = dict(BLOCK_K1=16, BLOCK_K2=16, SWAP_AB=swap)
    assert D % 16 == 0 and I % 16 == 0
    even = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    bound = MT.moe_forward_triton(x, idx, w, q1, q2, config=dict(cfg, EVEN_K=False))
    assert torch.equal(even, bound)
    close(even, reference(x, idx, w, q1, q2), 1e-5)


@needs_triton
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("magic", [True, False])
def test_int4_fp16_nibbles_built_from_bits(swap, magic):
    """fp16 activations on the folded int4 path: nibbles made as 0x6400 | q (= 1024 + q, the
    offset removed with the zero point) or converted; both equal the dequantised reference."""
    _, _, q1, q2 = _quantized("int4", group_size=64, device=_device())
    w, idx = make_routing(device=_device())
    x = make_x(dtype=torch.float16, device=_device())
    cfg = dict(BLOCK_K1=64, BLOCK_K2=64, MAGIC=magic, SWAP_AB=swap)
    out = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    close(out, reference(x, idx, w, q1, q2), 1e-2)


@needs_triton
@pytest.mark.parametrize("cfg,dtype", [(dict(BLOCK_N1=64, BLOCK_K1=32, BLOCK_K2=64), torch.float32),
                                       (dict(BLOCK_N1=32, BLOCK_K1=64, BLOCK_K2=64), torch.float32),
                                       (dict(BLOCK_N1=16, BLOCK_K1=32, BLOCK_K2=16), torch.float16)])
def test_int4_tile_sums_summed_once(cfg, dtype):
    """The swapped int4 kernels fold the zero point with sums of the activations' K tiles: summed
    once before the gate_up step (tile_sums), and by the gate_up step's epilogue for the down step
    when its h tile is a down K tile (BLOCK_N1 == BLOCK_K2; the second case sums in the loop).
    Ragged tails: D = 96 is 3 tiles of 32 or 1.5 of 64, I = 48 is 0.75 of 64. The same output as
    the sums taken in every program (XSUM=False) and as the dequantised reference. Group 64: whole
    K tiles (the folded, swapped path), a short last group in the down step (K = 48)."""
    _, _, q1, q2 = _quantized("int4", group_size=64, device=_device())
    w, idx = make_routing(device=_device())
    x = make_x(dtype=dtype, device=_device())
    cfg = dict(cfg, SWAP_AB=True)
    once = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    loop = MT.moe_forward_triton(x, idx, w, q1, q2, config=dict(cfg, XSUM=False))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    close(once, loop, tol)
    close(once, reference(x, idx, w, q1, q2), tol)
    sums = MT.tile_sums(x, 64, torch.float16)  # each element rounded to the compute dtype first
    want = torch.nn.functional.pad(x.half().float(), (0, 32)).view(T, 2, 64).sum(-1)
    close(sums, want, 1e-6)


def test_int4_halves_repack_is_exact():
    """The halves nibble order holds the same weight: dequantised bit for bit, per expert too."""
    _, _, q1, q2 = _quantized("int4", group_size=16)
    for q, bk in ((q1, 32), (q2, 16), (q2, 48)):
        h = M.repack_int4_halves(q, bk)
        assert h.kpack == bk and h.qweight.shape == q.qweight.shape
        assert not torch.equal(h.qweight, q.qweight)
        assert torch.equal(h.dequantize(), q.dequantize())
        assert h[3].kpack == bk and torch.equal(h[3].dequantize(), q[3].dequantize())
        assert h.to("cpu").kpack == bk
        # tile 0, byte 0 holds elements 0 (low) and bk/2 (high)
        codes = q.codes()
        assert h.qweight[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, bk // 2] << 4)
    with pytest.raises(ValueError):  # not a divisor of K = 48
        M.repack_int4_halves(q2, 32)
    with pytest.raises(ValueError):
        QuantizedWeight("int4", q2.qweight, q2.scale, q2.zero, 16, None, kpack=20)
    with pytest.raises(ValueError):
        QuantizedWeight("int8", torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), kpack=4)


def _halves_case(which, group, dtype):
    """Ragged rows (192 of BLOCK_N 128) and pairs per expert; K = 192, 3 tiles of 64."""
    gu, dn = make_weights(d=192, i=192)
    q1 = QuantizedWeight.quantize(gu, "int4", group_size=group).to(_device())
    q2 = QuantizedWeight.quantize(dn, "int4", group_size=group).to(_device())
    h1 = M.repack_int4_halves(q1, 64) if which in ("gate_up", "both") else q1
    h2 = M.repack_int4_halves(q2, 64) if which in ("down", "both") else q2
    w, idx = make_routing(device=_device())
    x = make_x(d=192, dtype=dtype, device=_device())
    return x, idx, w, q1, q2, h1, h2


@needs_triton
@pytest.mark.parametrize("which,group,dtype", [("gate_up", 64, torch.float32), ("down", 128, torch.float32),
                                               ("both", 64, torch.float16)])
def test_int4_halves_matches_twin(which, group, dtype):
    """The swapped kernels on weights in the halves order (two dots per K tile) vs the torch twin
    on the original pairs-order weights; group 128 of K = 192 has a short last group."""
    x, idx, w, q1, q2, h1, h2 = _halves_case(which, group, dtype)
    cfg = dict(BLOCK_N1=128, BLOCK_N2=128, BLOCK_K1=64, BLOCK_K2=64, SWAP_AB=True)
    out = MT.moe_forward_triton(x, idx, w, h1, h2, config=cfg)
    close(out, moe_forward_torch(x, idx, w, q1, q2), 1e-5 if dtype == torch.float32 else 1e-2)
    close(moe_forward_torch(x, idx, w, h1, h2), moe_forward_torch(x, idx, w, q1, q2), 1e-6)


@needs_triton
@pytest.mark.parametrize("cfg,name", [(dict(BLOCK_K1=32, SWAP_AB=True), "gate_up"),
                                      (dict(SWAP_AB=False), "gate_up"), (dict(INT4_FOLD=False), "gate_up")])
def test_int4_halves_kpack_mismatch_raises(cfg, name):
    x, idx, w, _, _, h1, h2 = _halves_case("both", 64, torch.float32)
    with pytest.raises(ValueError, match=f"{name}: .*halves.*kpack"):
        MT.moe_forward_triton(x, idx, w, h1, h2, config=cfg)
    x, idx, w, _, _, h1, h2 = _halves_case("down", 64, torch.float32)
    with pytest.raises(ValueError, match="down: .*halves.*kpack"):
        MT.moe_forward_triton(x, idx, w, h1, h2, config=dict(BLOCK_K2=32, SWAP_AB=True))


def test_int4_fragments_repack_is_exact():
    """The fragments order holds the same weight (dequantised bit for bit, per expert too); its
    first word holds the K pairs (0,1), (8,9), (16,17), (24,25) of the tile in nibbles j, j + 4."""
    _, _, q1, q2 = _quantized("int4", group_size=16)
    for q, bk in ((q1, 32), (q1, 96)):
        f = M.repack_int4_fragments(q, bk)
        assert (f.kpack, f.order) == (bk, "fragments") and f.qweight.shape == q.qweight.shape
        assert not torch.equal(f.qweight, q.qweight)
        assert torch.equal(f.dequantize(), q.dequantize())
        assert torch.equal(f[3].dequantize(), q[3].dequantize()) and f[3].order == "fragments"
        assert f.to("cpu").order == "fragments"
    f, codes = M.repack_int4_fragments(q1, 32), q1.codes()
    word = sum(int(f.qweight[0, 0, b]) << (8 * b) for b in range(4))
    for j, k in enumerate((0, 8, 16, 24)):
        assert (word >> 4 * j) & 15 == codes[0, 0, k] and (word >> 4 * (j + 4)) & 15 == codes[0, 0, k + 1]
    assert sorted(QW.nibble_perm("fragments", 64).tolist()) == list(range(64))
    with pytest.raises(ValueError, match="multiple of 32"):
        M.repack_int4_fragments(q1, 48)
    with pytest.raises(ValueError, match="fragments"):
        QuantizedWeight("int4", q1.qweight, q1.scale, q1.zero, 16, None, kpack=16, order="fragments")
    with pytest.raises(ValueError, match="nibble order"):
        QuantizedWeight("int4", q1.qweight, q1.scale, q1.zero, 16, None, kpack=0, order="fragments")


@needs_triton
def test_sum_slots_skips_dropped_rows():
    """The last step of the Triton path: per token, the fp32 rows of its routed slots summed in slot
    order and cast once; a dropped slot's row (index outside [0, E): never written, here NaN) is
    not read."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[0, 1], idx[5, 0], idx[7, :] = E, -1, E
    pairs = torch.randn(T * K, D, generator=g).to(_device())
    routed = ((idx >= 0) & (idx < E)).reshape(-1).to(_device())
    pairs[~routed] = float("nan")
    want = torch.where(routed[:, None], pairs, 0.0).view(T, K, D).sum(1)
    got = MT.sum_slots(pairs, idx.to(_device()), E, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and not got.isnan().any() and not got[7].any()
    close(got, want.bfloat16(), 1e-2)
    close(MT.sum_slots(pairs, idx.to(_device()), E, torch.float32), want, 1e-6)


def test_fp8_rows_round_to_nearest_even():
    """Per-token fp8 activations: the Triton rows (rounded in fp32 arithmetic, then converted) equal
    torch's float8_e4m3fn conversion, also where the mantissa rounds up into the next binade (the
    interpreter's own conversion gave 64 for 127.97)."""
    x = torch.tensor([[127.97, -126.58, 31.38, 0.0, 1e-3, -3e-3, 448.0, 5.1],
                      [0.0] * 8, [2.0 ** -7 * 1.3, 0.0137, -0.5, 0.25, 0.126, 3.0, -447.0, 1.0]])
    x8, s = M.fp8_rows(x)
    assert s[1] == 1.0 and x8.float().abs().max() <= 448
    if M.HAS_TRITON:
        t8, ts = MT.fp8_rows_triton(x.to(_device()))
        assert torch.equal(t8.float().cpu(), x8.float()) and torch.equal(ts.cpu(), s)


@needs_triton
@pytest.mark.parametrize("tile,dtype", [(32, torch.float32), (16, torch.bfloat16)])
def test_fp8_activations_match_twin(tile, dtype):
    """fp8 weights with fp8 activations (config A8, vLLM's fp8 MoE arithmetic): x per token, h per
    row and K tile of the down step, fp8 x fp8 products summed in fp32; the Triton path equals its
    torch twin (ragged: I = 48 is 1.5 tiles of 32; a dropped slot), and stays within a few percent
    of the fp8-weight path with 16-bit activations."""
    _, _, q1, q2 = _quantized("fp8", device=_device())
    w, idx = make_routing(device=_device())
    idx[3, 1] = E
    x = make_x(dtype=dtype, device=_device())
    cfg = dict(A8=True, BLOCK_N1=tile, BLOCK_K2=tile, BLOCK_K1=32)
    got = MT.moe_forward_triton(x, idx, w, q1, q2, config=cfg)
    twin = M.moe_forward_fp8_activations_torch(x, idx, w, q1, q2, tile)
    close(got, twin, 1e-5 if dtype == torch.float32 else 1e-2)
    close(twin, moe_forward_torch(x, idx, w, q1, q2), 0.1)
    with pytest.raises(ValueError, match="BLOCK_N1"):
        MT.moe_forward_triton(x, idx, w, q1, q2, config=dict(cfg, BLOCK_K2=2 * tile))
    _, _, i1, i2 = _quantized("int4", device=_device())
    with pytest.raises(ValueError, match="fp8 expert weights"):
        MT.moe_forward_triton(x, idx, w, i1, i2, config=cfg)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_activations_switch(impl, monkeypatch):
    """DGPLUG_FP8_ACTIVATIONS=1 turns fp8 experts to fp8 activations (Triton path and twin alike);
    other weights are left alone."""
    _, _, q1, q2 = _quantized("fp8", device=_device())
    w, idx = make_routing(device=_device())
    x = make_x(device=_device())
    off = moe_forward(x, idx, w, q1, q2, impl=impl)
    monkeypatch.setenv("DGPLUG_FP8_ACTIVATIONS", "1")
    on = moe_forward(x, idx, w, q1, q2, impl=impl)
    close(on, M.moe_forward_fp8_activations_torch(x, idx, w, q1, q2, M.A8_TILE), 1e-5)
    assert not torch.allclose(on, off)
    gu, dn = make_weights(device=_device())
    close(moe_forward(x, idx, w, gu, dn, impl=impl), moe_forward_torch(x, idx, w, gu, dn), 1e-5)


def test_int4_experts_for_the_gpu_kernels(monkeypatch):
    """What dgplug.load does to expert weights on CUDA: int4 with whole K tiles of 128 (gate_up) /
    64 (down) and groups of whole tiles -> the fragments order; anything else is left as it is."""
    gu, dn = make_weights(d=256, i=128)
    q1, q2 = (QuantizedWeight.quantize(w, "int4", group_size=128) for w in (gu, dn))
    f1, f2 = QW.for_gpu_kernels(q1, "gate_up"), QW.for_gpu_kernels(q2, "down")
    assert (f1.order, f1.kpack, f2.order, f2.kpack) == ("fragments", 128, "fragments", 64)
    assert torch.equal(f1.dequantize(), q1.dequantize()) and torch.equal(f2.dequantize(), q2.dequantize())
    assert QW.for_gpu_kernels(f1, "gate_up") is f1
    assert QW.for_gpu_kernels(QuantizedWeight.quantize(gu, "int4", group_size=64), "gate_up").order == "pairs"
    assert QW.for_gpu_kernels(QuantizedWeight.quantize(gu, "int8"), "gate_up").scheme == "int8"
    assert QW.for_gpu_kernels(gu, "gate_up") is gu
    monkeypatch.setenv("DGPLUG_INT4_ORDER", "pairs")
    assert QW.for_gpu_kernels(q1, "gate_up") is q1


@needs_triton
def test_env_config_reaches_the_kernels(monkeypatch):
    """DGPLUG_MOE_CONFIG sets tiles for moe_forward's Triton path (the GPU check runs generate with
    its sweep's fastest): ONE_DOT and BLOCK_N over the fragments order still match the twin; a bad
    setting is one error naming it, a wrong tile is the kernels' own error."""
    x, idx, w, q1, q2, _, _ = _halves_case("both", 64, torch.float32)
    f1, f2 = M.repack_int4_fragments(q1, 64), M.repack_int4_fragments(q2, 64)
    monkeypatch.setenv("DGPLUG_MOE_CONFIG", " ONE_DOT=1, BLOCK_N1=128 ,SWAP_AB=1")
    assert M.env_config() == dict(ONE_DOT=1, BLOCK_N1=128, SWAP_AB=1)
    close(moe_forward(x, idx, w, f1, f2, impl="triton"), moe_forward_torch(x, idx, w, q1, q2), 1e-5)
    monkeypatch.setenv("DGPLUG_MOE_CONFIG", "BLOCK_K1=32")
    with pytest.raises(ValueError, match="gate_up: .*fragments.*kpack"):
        moe_forward(x, idx, w, f1, f2, impl="triton")
    monkeypatch.setenv("DGPLUG_MOE_CONFIG", "num_warps=eight")
    with pytest.raises(ValueError, match="DGPLUG_MOE_CONFIG=.*'num_warps=eight' is not KEY=integer"):
        moe_forward(x, idx, w, f1, f2, impl="triton")


@needs_triton
@pytest.mark.parametrize("group,dtype,n,one_dot", [(64, torch.float32, 64, False), (128, torch.float32, 128, False),
                                                   (64, torch.float16, 32, False), (64, torch.float32, 128, True),
                                                   (128, torch.float16, 64, True)])
def test_int4_fragments_matches_twin(group, dtype, n, one_dot):
    """The swapped kernels reading the fragments order (32-bit words, nibble pairs by shift and
    mask; fp16: the magic bits) vs the torch twin on the original weights: ragged rows (192 of
    BLOCK_N 128), K = 192 in 3 tiles of 64 (group 128: a short last group), tile sums on;
    ONE_DOT: the gate and up rows of a program as one operand, split after the K loop."""
    x, idx, w, q1, q2, _, _ = _halves_case("both", group, dtype)
    f1, f2 = M.repack_int4_fragments(q1, 64), M.repack_int4_fragments(q2, 64)
    cfg = dict(BLOCK_N1=n, BLOCK_N2=n, SWAP_AB=True, ONE_DOT=one_dot)  # BLOCK_K follows the weights' kpack
    out = MT.moe_forward_triton(x, idx, w, f1, f2, config=cfg)
    close(out, moe_forward_torch(x, idx, w, q1, q2), 1e-5 if dtype == torch.float32 else 1e-2)
    close(moe_forward_torch(x, idx, w, f1, f2), moe_forward_torch(x, idx, w, q1, q2), 1e-6)
    with pytest.raises(ValueError, match="gate_up: .*fragments.*kpack"):
        MT.moe_forward_triton(x, idx, w, f1, f2, config=dict(cfg, BLOCK_K1=32))


@pytest.mark.parametrize("impl", IMPLS)
def test_quantized_with_half_activations(impl):
    dev = _device()
    _, _, q1, q2 = _quantized("int4", group_size=16, device=dev)
    w, idx = make_routing(device=dev)
    x = make_x(dtype=torch.float16, device=dev)
    out = moe_forward(x, idx, w, q1, q2, impl=impl)
    assert out.dtype == torch.float16
    close(out, reference(x, idx, w, q1, q2), 1e-2)


def _overflowing_fp16_case(scheme, device):
    """fp16 activations whose gelu_tanh(gate) * up reaches ~1e6 (fp16 ends at 65504) while the
    output stays near 300: big gate/up rows, a small down projection."""
    gu, dn = make_weights()
    gu, dn = gu * 400, dn * 1e-3
    if scheme is not None:
        gu = QuantizedWeight.quantize(gu, scheme, group_size=64).to(device)
        dn = QuantizedWeight.quantize(dn, scheme, group_size=64).to(device)
    else:
        gu, dn = gu.to(device, torch.float16), dn.to(device, torch.float16)
    w, idx = make_routing(device=device)
    x = make_x(dtype=torch.float16, device=device)
    deq = lambda t: t.dequantize() if isinstance(t, QuantizedWeight) else t  # noqa: E731
    g = torch.einsum("td,end->ten", x.float().cpu(), deq(gu).float().cpu())
    act = torch.nn.functional.gelu(g[..., :I], approximate="tanh") * g[..., I:]
    assert act.abs().max() > 4 * 65504  # the intermediate does overflow fp16
    return x, idx, w, gu, dn


@pytest.mark.parametrize("scheme,cfg", [(None, {}), (None, dict(SWAP_AB=True)), ("int8", {}), ("fp8", {}),
                                        ("int4", dict(SWAP_AB=False)), ("int4", dict(SWAP_AB=True))])
def test_fp16_intermediate_does_not_overflow(scheme, cfg):
    """fp16 activations: h = gelu_tanh(gate) * up above 65504 stays finite on every kernel path
    (plain, swapped, int8, fp8, int4 folded unswapped / swapped with the h tile sums) as in the
    twin: the Triton path keeps h in fp32 (it was fp16 there: inf, then NaN in all 2304 outputs)."""
    dev = _device()
    x, idx, w, gu, dn = _overflowing_fp16_case(scheme, dev)
    twin = moe_forward_torch(x, idx, w, gu, dn)
    assert twin.isfinite().all()
    close(twin, reference(x, idx, w, gu, dn), 1e-2)
    if M.HAS_TRITON:
        out = MT.moe_forward_triton(x, idx, w, gu, dn, config=cfg)
        assert out.dtype == torch.float16 and out.isfinite().all()
        close(out, twin, 1e-2)


def test_quantized_layout_and_roundtrip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 8, 64, generator=g)
    q = QuantizedWeight.quantize(w, "int4", group_size=16)
    assert q.qweight.shape == (3, 8, 32) and q.qweight.dtype == torch.uint8
    assert q.scale.shape == (3, 8, 4) and q.scale.dtype == torch.float16
    assert q.zero.shape == (3, 8, 4) and q.zero.dtype == torch.uint8
    assert q.shape == (3, 8, 64) and q[1].shape == (8, 64)
    # nibble order: element 2j low, 2j+1 high
    lo = (q.qweight[0, 0, 0] & 15).float()
    hi = (q.qweight[0, 0, 0] >> 4).float()
    s, z = q.scale[0, 0, 0].float(), q.zero[0, 0, 0].float()
    deq = q.dequantize()
    assert torch.allclose(deq[0, 0, 0], (lo - z) * s) and torch.allclose(deq[0, 0, 1], (hi - z) * s)
    # per-expert view dequantises to the slice of the whole
    assert torch.equal(q[2].dequantize(), deq[2])
    # error within half a step per group
    step = q.scale.float().repeat_interleave(16, -1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()
    for scheme, bits in (("int8", 127.0), ("fp8", None)):
        qq = QuantizedWeight.quantize(w, scheme)
        assert qq.scale.shape == (3, 8) and qq.scale.dtype == torch.float32
        err = (qq.dequantize() - w).abs()
        amax = w.abs().amax(-1, keepdim=True)
        assert (err <= (amax / bits * 0.5 + 1e-6 if bits else amax * 2 ** -4)).all()
        assert torch.equal(qq[0].dequantize(), qq.dequantize()[0])


def test_quantized_weight_validation():
    q = torch.zeros(2, 4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError):
        QuantizedWeight("int3", q, torch.ones(2, 4, 1))
    with pytest.raises(ValueError):  # int4 without zero
        QuantizedWeight("int4", q, torch.ones(2, 4, 1, dtype=torch.float16), group_size=16)
    with pytest.raises(ValueError):  # wrong number of groups
        QuantizedWeight("int4", q, torch.ones(2, 4, 3, dtype=torch.float16),
                        torch.zeros(2, 4, 3, dtype=torch.uint8), group_size=16)
    with pytest.raises(TypeError):
        QuantizedWeight("int8", q, torch.ones(2, 4))
    ok = QuantizedWeight("int4", q, torch.ones(2, 4, 1, dtype=torch.float16),
                         torch.zeros(2, 4, 1, dtype=torch.uint8), group_size=16)
    assert ok.shape == (2, 4, 16) and ok.nbytes == 64 + 16 + 8


# ------------------------------------------------------------------------------------------
# routing edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_slot_empty_expert_and_dropped_index(impl):
    dev = _device()
    gu, dn = make_weights(device=dev)
    w, idx = make_routing(device=dev)
    idx = idx.clone()
    idx[idx == 5] = 6  # expert 5 gets no token
    idx[0] = torch.tensor([3, 3])  # token 0 routed to expert 3 in both slots
    idx[1, 1] = idx[1, 0]
    idx[2, 1] = E  # transformers' "no expert" sentinel: dropped
    x = make_x(device=dev)
    out = moe_forward(x, idx, w, gu, dn, impl=impl)
    assert not (idx == 5).any()
    close(out, reference(x, idx, w, gu, dn), 1e-5)


def test_negative_index_is_dropped_by_the_reference_too():
    """The contract drops any index outside [0, E); the plain reference (ops.moe_reference, the CPU path
    of DGPLUG_OPS=reference) read -1 as expert E - 1 (Python's negative indexing)."""
    gu, dn = make_weights()
    w, idx = make_routing()
    idx = idx.clone()
    idx[3, 1] = -1
    x = make_x()
    want = moe_forward_torch(x, idx, w, gu, dn)
    kept = idx.clone()
    kept[3, 1] = E  # the sentinel every path drops
    assert torch.equal(want, moe_forward_torch(x, kept, w, gu, dn))
    close(ops.moe_reference(x, idx, w, gu, dn), want, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_is_independent_rows(impl):
    """T = canvas x batch: a batch of 3 canvases equals each canvas alone (batch 1)."""
    dev = _device()
    canvas, batch = 8, 3
    gu, dn = make_weights(device=dev)
    w, idx = make_routing(t=canvas * batch, device=dev)
    x = make_x(t=canvas * batch, device=dev)
    full = moe_forward(x, idx, w, gu, dn, impl=impl)
    for b in range(batch):
        s = slice(b * canvas, (b + 1) * canvas)
        one = moe_forward(x[s], idx[s], w[s], gu, dn, impl=impl)
        close(one, full[s], 1e-6)
    close(full, reference(x, idx, w, gu, dn), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_all_to_one_expert(impl):
    dev = _device()
    gu, dn = make_weights(device=dev)
    x = make_x(t=1, device=dev)
    w = torch.tensor([[0.7, 0.3]], device=dev)
    idx = torch.tensor([[4, 1]], device=dev)
    close(moe_forward(x, idx, w, gu, dn, impl=impl), reference(x, idx, w, gu, dn), 1e-5)
    # every pair on one expert: several BLOCK_M blocks for that expert
    t = 40
    x = make_x(t=t, device=dev)
    idx = torch.full((t, K), 2, device=dev)
    w = torch.rand(t, K, device=dev)
    close(moe_forward(x, idx, w, gu, dn, impl=impl), reference(x, idx, w, gu, dn), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_top8_of_16_noncontiguous_x(impl):
    dev = _device()
    e, k, t = 16, 8, 12
    gu, dn = make_weights(e=e, d=64, i=40, device=dev)
    w, idx = make_routing(t=t, e=e, k=k, device=dev)
    x = make_x(t=t, d=128, device=dev)[:, ::2]  # stride 2 along D
    close(moe_forward(x, idx, w, gu, dn, impl=impl), reference(x, idx, w, gu, dn), 1e-5)


def test_empty_input():
    gu, dn = make_weights()
    x = torch.zeros(0, D)
    idx = torch.zeros(0, K, dtype=torch.long)
    w = torch.zeros(0, K)
    assert moe_forward(x, idx, w, gu, dn, impl="torch").shape == (0, D)
    if M.HAS_TRITON:
        assert moe_forward(x, idx, w, gu, dn, impl="triton").shape == (0, D)


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=needs_triton)])
def test_align_schedule(kind):
    _, idx = make_routing(t=30, e=E, k=3)
    idx = idx.clone()
    idx[idx == 0] = 1
    bm = 4
    if kind == "torch":
        sorted_ids, block_expert, nb = MT._align_torch(idx, E, bm)
    else:  # several chunks; identical to the torch version (stable order)
        sorted_ids, block_expert, nb = MT._align(idx, E, bm, chunk=32)
        ref = MT._align_torch(idx, E, bm)
        assert torch.equal(sorted_ids, ref[0]) and torch.equal(block_expert, ref[1])
    tk = idx.numel()
    assert sorted_ids.shape == (nb * bm,) and block_expert.shape == (nb,)
    real = sorted_ids[sorted_ids < tk]
    assert torch.equal(torch.sort(real.long()).values, torch.arange(tk))  # each pair once
    flat = idx.reshape(-1)
    for b in range(nb):
        ids = sorted_ids[b * bm:(b + 1) * bm].long()
        ids = ids[ids < tk]
        if block_expert[b] < 0:
            assert ids.numel() == 0
        else:
            assert ids.numel() > 0 and (flat[ids] == block_expert[b]).all()
    assert not (block_expert == 0).any()


# ------------------------------------------------------------------------------------------
# dispatch and the cost model
# ------------------------------------------------------------------------------------------


def test_bad_shapes():
    gu, dn = make_weights()
    w, idx = make_routing()
    with pytest.raises(ValueError):
        moe_forward(make_x(d=D + 1), idx, w, gu, dn, impl="torch")
    with pytest.raises(ValueError):
        moe_forward(make_x(), idx, w, gu, dn[:, :, :-1], impl="torch")


def test_flops_bytes():
    f, b = M.moe_flops_bytes(256, 2816, 704, 128, 8, "bf16")
    assert f == 2 * 256 * 8 * 3 * 704 * 2816
    bf16_weights = 128 * 3 * 704 * 2816 * 2
    assert bf16_weights < b < bf16_weights * 1.1  # all 128 experts touched at T=256
    _, b4 = M.moe_flops_bytes(256, 2816, 704, 128, 8, "int4")
    _, b8 = M.moe_flops_bytes(256, 2816, 704, 128, 8, "fp8")
    assert b4 < b8 < b
    _, b1 = M.moe_flops_bytes(1, 2816, 704, 128, 8, "bf16")
    assert b1 < bf16_weights / 10  # one token touches 8 experts


# ------------------------------------------------------------------------------------------
# real shapes on a GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA or not M.HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton")
@pytest.mark.parametrize("scheme", ["bf16", "int4", "int8", "fp8"])
def test_gpu_real_shapes(scheme):
    t, d, i, e, k = 256, 2816, 704, 128, 8
    gu, dn = make_weights(e=e, d=d, i=i, device="cuda", dtype=torch.bfloat16)
    if scheme != "bf16":
        gs = 64 if scheme == "int4" else 128
        gu = QuantizedWeight.quantize(gu, scheme, group_size=gs)
        dn = QuantizedWeight.quantize(dn, scheme, group_size=gs)
    w, idx = make_routing(t=t, e=e, k=k, device="cuda")
    x = make_x(t=t, d=d, dtype=torch.bfloat16, device="cuda")
    a = moe_forward(x, idx, w, gu, dn, impl="triton")
    b = moe_forward(x, idx, w, gu, dn, impl="torch")
    close(a, b, 2e-2)
