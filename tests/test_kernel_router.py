"""The MoE router kernel (dgplug.kernels.router): Triton (interpreter on CPU, or CUDA) against its
twin dgplug.ops.route_reference."""

import pytest
import torch

from dgplug import ops
from dgplug.kernels import router as R
from dgplug.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(T, D, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(T, D, generator=g) * 4.0
    w = torch.randn(E, D, generator=g) * 2.0
    scale = 1 + 0.2 * torch.randn(D, generator=g)
    pes = 0.5 + torch.rand(E, generator=g)
    return r.to(DEV, dtype), w.to(DEV, dtype), scale.to(DEV, dtype), pes.to(DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,E,K", [(37, 96, 8, 2), (20, 2816, 128, 8)])
def test_route_matches_twin(dtype, T, D, E, K):
    r, w, scale, pes = inputs(T, D, E, dtype)
    gw, gi = R.route(r, w, scale, pes, K, 1e-6, impl="triton")
    ww, wi = ops.route_reference(r, w, scale, pes, K, 1e-6)
    assert gw.dtype == ww.dtype == torch.float32 and gi.dtype == wi.dtype and gi.shape == wi.shape == (T, K)
    gi, wi, gw, ww = gi.cpu(), wi.cpu(), gw.cpu(), ww.cpu()
    if dtype == torch.float32:  # the same experts in the same (descending) order
        assert torch.equal(gi, wi)
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    else:  # the logits are rounded to 16 bits, as the reference's matmul output: another summation
        # order can move one by an ulp (bf16: 1/128 relative, a weight by up to ~6% at logits ~4) and
        # tied experts come in either order; the same experts per token, each with its weight
        (gi, go), (wi, wo) = gi.sort(1), wi.sort(1)
        assert torch.equal(gi, wi)
        tol = 1e-2 if dtype == torch.float16 else 8e-2
        torch.testing.assert_close(gw.gather(1, go), ww.gather(1, wo), rtol=tol, atol=1e-4)


def test_route_strided_rows_and_fallbacks():
    """Rows of a wider buffer and a strided weight are read right; a [B, L, D] input takes the twin."""
    r, w, scale, pes = inputs(12, 192, 8, torch.float32, seed=1)
    view = torch.cat((r, r), dim=1)[:, :192]
    assert view.stride(0) == 384
    got = R.route(view, w, scale, pes, 2, 1e-6, impl="triton")
    want = ops.route_reference(r, w, scale, pes, 2, 1e-6)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    wide = torch.stack((w, w), dim=1).reshape(-1, w.shape[1])[::2]  # a row-strided router weight
    assert not wide.is_contiguous() and torch.equal(wide, w)
    got = R.route(r, wide, scale, pes, 2, 1e-6, impl="triton")
    assert torch.equal(got[1], want[1])
    r3 = r.view(3, 4, 192)  # not [T, D]: the twin, bit for bit
    for a, b in zip(R.route(r3, w, scale, pes, 2, 1e-6, impl="triton"), ops.route_reference(r3, w, scale, pes, 2, 1e-6)):
        assert torch.equal(a, b)


def test_nan_logits_still_give_valid_experts():
    r, w, scale, pes = inputs(16, 64, 8, torch.float32, seed=2)
    r[3] = float("nan")
    _, idx = R.route(r, w, scale, pes, 2, 1e-6, impl="triton")
    assert int(idx.min()) >= 0 and int(idx.max()) < 8  # the MoE reads expert idx: never out of range


def test_top_k_beyond_the_experts_is_refused_and_zero_is_empty():
    """top_k > E: one clear error (the kernel repeated expert E - 1 with weight 0, torch.topk raised its
    own); top_k = 0: the twin's empty results (the kernel could not build a 0-wide tile)."""
    r, pw = torch.randn(3, 32), torch.randn(5, 32)
    sc, pes = torch.ones(32), torch.ones(5)
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="top_k=6 is more than the 5 experts"):
            R.route(r.to(DEV), pw.to(DEV), sc.to(DEV), pes.to(DEV), 6, 1e-6, impl=impl)
        w, idx = R.route(r.to(DEV), pw.to(DEV), sc.to(DEV), pes.to(DEV), 0, 1e-6, impl=impl)
        assert w.shape == idx.shape == (3, 0)
