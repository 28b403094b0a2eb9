"""The layer glue kernels (dgplug.kernels.norm; the router's in test_kernel_router): Triton (interpreter on CPU, or CUDA) against their
twins, the references in dgplug.ops; and the model's layers through the kernels against the model
on the references."""

import warnings

import pytest
import torch

from dgplug import ops
from dgplug.kernels import norm as N
from dgplug.kernels import router as R
from dgplug.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def rnd(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def assert_close(a, b, dtype):
    """fp32: within a few ulps (the sum-of-squares order moves the per-row scale). 16-bit: the same
    fp32 scale moves an output rounding now and then, by one step: most elements are equal and
    none is off by more than a step (a kernel that skipped one of the twin's roundings to the
    activation dtype would differ in most elements)."""
    a, b = a.float().cpu(), b.float().cpu()
    if dtype == torch.float32:
        err = ((a - b).abs() / (b.abs() + 1.0)).max().item()
        assert err <= 2e-6, f"max relative err {err:.3e}"
        return
    step = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    diff = (a - b).abs()
    assert (diff <= step * 2.01 * (b.abs() + 2 ** -14)).all(), f"max abs diff {diff.max().item():.3e}"
    share = (diff > 0).float().mean().item()
    assert share <= (0.02 if DEV == "cpu" else 0.1), f"{share:.1%} of the elements differ"


DTYPES = [torch.float32, torch.float16]  # bf16 arithmetic is wrong in the interpreter; the GPU check runs it
if DEV == "cuda":
    DTYPES.append(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [96, 2816])  # a ragged block and the release's hidden size
@pytest.mark.parametrize("weight,residual", [(True, False), (False, False), (True, True)])
def test_rms_norm_matches_twin(dtype, n, weight, residual):
    x = rnd(3, 5, n, seed=1, scale=3.0, dtype=dtype)
    w = rnd(n, seed=2, dtype=dtype) if weight else None
    r = rnd(3, 5, n, seed=3, dtype=dtype) if residual else None
    got = N.rms_norm(x, w, EPS, residual=r, impl="triton")
    want = ops.rms_norm_reference(x, w, EPS) if r is None else r + ops.rms_norm_reference(x, w, EPS)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert_close(got, want, dtype)


def test_rms_norm_reads_strided_rows():
    """Rows of a wider buffer (a split of a fused projection): no copy needed, same result."""
    buf = rnd(7, 3 * 64, seed=4)
    x = buf[:, 64:128]
    assert_close(N.rms_norm(x, None, EPS, impl="triton"), ops.rms_norm_reference(x, None, EPS), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 256])  # a small head and the release's sliding head
@pytest.mark.parametrize("case", ["sliding", "k_is_v", "fused_projection", "into_slots"])
def test_qkv_heads_matches_twin(dtype, d, case):
    """q, k, v in one launch = the three head_norm_rope twins: separate q/k/v, the full layers' v = k,
    heads sliced out of one fused projection (the vLLM layer), and k/v written into a static cache's
    canvas slots ([B, Hk, cap + L, d] buffers), leaving the other slots alone."""
    B, L, HQ, HK = 2, 5, 3, 2
    q, k, v = (rnd(B, L, h, d, seed=s, scale=2.0, dtype=dtype) for s, h in ((40, HQ), (41, HK), (42, HK)))
    if case == "k_is_v":
        v = k
    if case == "fused_projection":
        qkv = rnd(B, L, (HQ + 2 * HK) * d, seed=43, dtype=dtype)
        q, k, v = (t.view(B, L, -1, d) for t in qkv.split([HQ * d, HK * d, HK * d], -1))
    freqs = torch.arange(L, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None, :]
    cos, sin = (f(torch.cat((freqs, freqs), -1)).to(DEV, dtype) for f in (torch.cos, torch.sin))
    wq, wk = rnd(d, seed=44, dtype=dtype), rnd(d, seed=45, dtype=dtype)
    out = None
    if case == "into_slots":
        bufs = [rnd(B, HK, 7 + L, d, seed=s, dtype=dtype) for s in (46, 47)]
        before = [b.clone() for b in bufs]
        out = tuple(b[:, :, 7:] for b in bufs)
    got = N.qkv_heads(q, k, v, wq, wk, EPS, cos, sin, out=out, impl="triton")
    want = ops.qkv_heads_reference(q, k, v, wq, wk, EPS, cos, sin)
    for g, w, h in zip(got, want, (HQ, HK, HK), strict=True):
        assert g.shape == (B, h, L, d) and g.dtype == dtype
        assert_close(g, w, dtype)
    if out is not None:
        assert got[1].data_ptr() == out[0].data_ptr() and got[2].data_ptr() == out[1].data_ptr()
        for b, b0 in zip(bufs, before, strict=True):
            assert torch.equal(b[:, :, :7], b0[:, :, :7])
    assert not torch.equal(want[1], want[2])  # v is not rotated nor scaled


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [96, 2816])
def test_layer_out_matches_twin(dtype, n):
    x, dense, moe = (rnd(2, 4, n, seed=s, scale=c, dtype=dtype) for s, c in ((8, 5.0), (9, 0.3), (10, 2.0)))
    w1, w2, w = (rnd(n, seed=s, dtype=dtype) for s in (11, 12, 13))
    scalar = torch.tensor([0.75], dtype=dtype, device=DEV)
    got = N.layer_out(x, dense, moe, w1, w2, w, scalar, EPS, impl="triton")
    assert_close(got, ops.layer_out_reference(x, dense, moe, w1, w2, w, scalar, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [96, 2816])
def test_post_attention_matches_twin(dtype, n):
    attn, x = rnd(2, 4, n, seed=14, scale=0.4, dtype=dtype), rnd(2, 4, n, seed=15, scale=4.0, dtype=dtype)
    w, w1, w2 = (rnd(n, seed=s, dtype=dtype) for s in (16, 17, 18))
    got = N.post_attention(attn, x, w, w1, w2, EPS, impl="triton")
    want = ops.post_attention_reference(attn, x, w, w1, w2, EPS)
    for g, r in zip(got, want, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close(g, r, dtype)
    assert not torch.equal(got[1], got[2])  # each norm with its own weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2112), (2, 5, 37), (2, 3, 1100)])  # the dense MLP's width; ragged tails
@pytest.mark.parametrize("halves", [False, True], ids=["separate", "halves"])
def test_gelu_mul_matches_twin(dtype, shape, halves):
    gate, up = rnd(*shape, seed=19, scale=3.0, dtype=dtype), rnd(*shape, seed=20, dtype=dtype)
    if halves:  # gate and up as the column halves of one fused gate|up projection output (strided rows)
        both = torch.cat([gate, up], dim=-1)
        gate, up = both.split(shape[-1], dim=-1)
        assert not gate.is_contiguous()
    got = N.gelu_mul(gate, up, impl="triton")
    want = ops.gelu_mul_reference(gate, up)
    assert got.shape == gate.shape and got.dtype == gate.dtype
    # gelu's far negative tail is 0.5 g (1 + tanh(z)) with tanh near -1: fp32 cancellation, whose last
    # bits even torch's own CPU result changes with vectorisation; there, a bound on the absolute error
    tail = (ops.gelu_tanh(gate.float()).abs() < 2 ** -13).cpu()
    assert 0 < tail.sum() < tail.numel() // 4
    got, want = got.float().cpu(), want.float().cpu()
    assert (got - want)[tail].abs().max() <= 2 ** -20
    assert_close(got[~tail], want[~tail], dtype)


def test_inputs_the_kernels_do_not_take_go_to_the_twins():
    """A residual that broadcasts, or cos/sin in another dtype: the twin's result, not a wrong read."""
    x, w = rnd(4, 6, 64, seed=20), rnd(64, seed=21)
    r = rnd(6, 64, seed=22)  # broadcasts over the first dim
    assert torch.equal(N.rms_norm(x, w, EPS, residual=r, impl="triton"), r + ops.rms_norm_reference(x, w, EPS))
    q, k = rnd(1, 5, 2, 32, seed=23, dtype=torch.float16), rnd(1, 5, 1, 32, seed=26, dtype=torch.float16)
    cos, sin = rnd(5, 32, seed=24), rnd(5, 32, seed=25)  # fp32 tables with fp16 heads: the twin promotes
    wq, wk = rnd(32, seed=27, dtype=torch.float16), rnd(32, seed=28, dtype=torch.float16)
    got = N.qkv_heads(q, k, k, wq, wk, EPS, cos, sin, impl="triton")
    want = ops.qkv_heads_reference(q, k, k, wq, wk, EPS, cos, sin)
    assert got[0].dtype == torch.float32 and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_strided_norm_weights_and_a_per_channel_scalar():
    """A norm weight that is a strided view (a column of a [N, 2] tensor) is read element by element as
    the twin reads it, not at w_ptr + i; a layer scalar of more than one element broadcasts (the twin)."""
    x, a, d, m = (rnd(3, 40, seed=s) for s in (30, 31, 32, 33))
    w, w1, w2 = (rnd(40, 2, seed=s)[:, 1] for s in (34, 35, 36))
    assert not w.is_contiguous()
    assert_close(N.rms_norm(x, w, EPS, impl="triton"), ops.rms_norm_reference(x, w, EPS), torch.float32)
    for got, want in zip(N.post_attention(a, x, w, w1, w2, EPS, impl="triton"),
                         ops.post_attention_reference(a, x, w, w1, w2, EPS), strict=True):
        assert_close(got, want, torch.float32)
    s1 = rnd(1, seed=37)
    assert_close(N.layer_out(x, d, m, w1, w2, w, s1, EPS, impl="triton"),
                 ops.layer_out_reference(x, d, m, w1, w2, w, s1, EPS), torch.float32)
    s40 = rnd(40, seed=38)  # per channel: the twin's broadcast, not s40[0] everywhere
    assert torch.equal(N.layer_out(x, d, m, w1, w2, w, s40, EPS, impl="triton"),
                       ops.layer_out_reference(x, d, m, w1, w2, w, s40, EPS))
    q, k = rnd(1, 3, 2, 32, seed=39), rnd(1, 3, 1, 32, seed=40)
    wq, wk = rnd(32, 3, seed=41)[:, 0], rnd(32, 3, seed=42)[:, 2]
    cos, sin = rnd(3, 32, seed=43), rnd(3, 32, seed=44)
    got = N.qkv_heads(q, k, k, wq, wk, EPS, cos, sin, impl="triton")
    for g, want in zip(got, ops.qkv_heads_reference(q, k, k, wq, wk, EPS, cos, sin), strict=True):
        assert_close(g, want, torch.float32)


def test_model_through_the_glue_kernels(monkeypatch, tmp_path):
    """A tiny model with its glue on the Triton kernels (the interpreter on a CPU) gives the logits
    of the same model on the references, and every layer went through the kernels."""
    import dgplug
    from dgplug.testing import make_checkpoint, probe_logits

    model = dgplug.load(make_checkpoint(tmp_path / "ck"))
    want = probe_logits(model)
    calls = {}
    for mod, name in ((N, "rms_norm"), (N, "qkv_heads"), (N, "post_attention"), (N, "gelu_mul"),
                      (N, "layer_out"), (R, "route")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _fn(*a, **{**k, "impl": "triton"}))
    monkeypatch.setattr(ops, "_glue_kernels", lambda x: True)
    got = probe_logits(model)
    layers = 2 * model.tc.num_hidden_layers  # the encoder pass and the canvas pass
    # per layer: the input norm; the q, k, v heads; the post-attention residual + both pre-ff norms; the
    # dense MLP's gelu * up; the layer end; plus the final norm and the self-conditioning MLP per pass
    assert calls["layer_out"] == calls["route"] == calls["post_attention"] == layers, calls
    assert calls["qkv_heads"] == layers and calls["gelu_mul"] >= layers, calls
    assert calls["rms_norm"] >= layers, calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 sums in another order, 4 layers deep
    assert ops.GLUE_KERNELS  # no kernel fell back to the references


def test_a_kernel_that_cannot_be_built_falls_back_once(monkeypatch):
    """A Triton build error (an older Triton, another GPU) warns once, and the glue runs on the
    references from then on: the result is the reference's."""
    from triton.compiler.errors import CompilationError

    def broken(*a, **k):
        raise CompilationError(None, None, "no such intrinsic")

    monkeypatch.setattr(N, "rms_norm", broken)
    monkeypatch.setattr(ops, "_glue_kernels", lambda x: ops.GLUE_KERNELS)
    monkeypatch.setattr(ops, "GLUE_KERNELS", True)
    x, w, r = rnd(3, 64, seed=30), rnd(64, seed=31), rnd(3, 64, seed=32)
    with pytest.warns(RuntimeWarning, match="norm.rms_norm kernel cannot be built"):
        got = ops.rms_norm(x, w, EPS, residual=r)
    assert torch.equal(got, r + ops.rms_norm_reference(x, w, EPS)) and ops.GLUE_KERNELS is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ops.rms_norm(x, w, EPS), ops.rms_norm_reference(x, w, EPS))  # no second warning
