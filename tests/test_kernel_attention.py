"""kernels.attention: the Triton kernel (interpreter) and the torch twin vs dgplug.ops.attention."""

import pytest
import torch

from dgplug import ops
from dgplug.kernels import attention as A

pytestmark = pytest.mark.skipif(not A.HAS_TRITON, reason="triton not installed")

# fp32: the interpreter's dots are fp32 numpy; fp16/bf16: P is rounded to the input dtype
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(batch, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # unit-ish logits: q.k with scale 1.0 would be N(0, d) for randn; q_norm keeps them moderate
    q = torch.randn(batch, hq, lq, d, generator=g) * d ** -0.5 * 2.0
    k = torch.randn(batch, hkv, lk, d, generator=g)
    v = torch.randn(batch, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(q, k, v, config=None, **kw):
    """Triton and the twin vs the reference run in fp32 on the same (rounded) inputs."""
    ref = ops.attention_reference(q.float(), k.float(), v.float(), **kw)
    tri = A.attention_triton(q, k, v, config=config, **kw)
    twin = A.attention(q, k, v, impl="torch", **kw)
    assert tri.dtype == q.dtype and tri.shape == q.shape
    assert torch.isfinite(tri).all()
    tol = TOL[q.dtype]
    torch.testing.assert_close(tri.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(twin.float(), ref, atol=tol, rtol=tol)
    return tri, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,hq,hkv,d", [(1, 4, 2, 16), (2, 8, 2, 32)])
def test_decoder_no_mask(dtype, batch, hq, hkv, d):
    cache, canvas = 13, 16  # ragged key count: 29
    q, k, v = _inputs(batch, hq, hkv, canvas, cache + canvas, d, dtype)
    _check(q, k, v, q_pos=torch.arange(cache, cache + canvas), k_pos=torch.arange(cache + canvas))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoder_key_valid_left_padded(dtype):
    batch, hq, hkv, d, cache, canvas = 2, 8, 2, 32, 21, 16  # GQA 4
    q, k, v = _inputs(batch, hq, hkv, canvas, cache + canvas, d, dtype, seed=1)
    key_valid = torch.ones(batch, cache + canvas, dtype=torch.bool)
    key_valid[1, :7] = False  # the second prompt is 7 tokens shorter, left-padded
    _check(q, k, v, q_pos=torch.arange(cache, cache + canvas), k_pos=torch.arange(cache + canvas),
           key_valid=key_valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (8, 2, 32)])
def test_encoder_causal_sliding_window_with_cache(dtype, hq, hkv, d):
    batch, cache, new, window = 2, 9, 40, 12  # window < Lq; positions continue from the cache
    q, k, v = _inputs(batch, hq, hkv, new, cache + new, d, dtype, seed=2)
    key_valid = torch.ones(batch, cache + new, dtype=torch.bool)
    key_valid[0, :3] = False
    _check(q, k, v, q_pos=torch.arange(cache, cache + new), k_pos=torch.arange(cache + new),
           key_valid=key_valid, causal=True, window=window)


def test_encoder_plain_causal_d64():
    batch, hq, hkv, d, cache, new = 1, 4, 1, 64, 5, 24  # full-layer style: causal, no window
    q, k, v = _inputs(batch, hq, hkv, new, cache + new, d, torch.float32, seed=3)
    _check(q, k, v, q_pos=torch.arange(cache, cache + new), k_pos=torch.arange(cache + new),
           causal=True)


def test_sliding_cache_keeps_last_positions():
    # sliding layers keep only the last window-1 cache positions: k_pos does not start at 0
    batch, hq, hkv, d, window = 1, 4, 2, 16, 8
    k_pos = torch.cat([torch.arange(30 - (window - 1), 30), torch.arange(30, 46)])
    q_pos = torch.arange(30, 46)
    q, k, v = _inputs(batch, hq, hkv, len(q_pos), len(k_pos), d, torch.float32, seed=4)
    _check(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=True, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_tiles_skip_and_multi_block(dtype):
    # many query blocks and key tiles: exercises the tile skipping (lo > 0, hi < Lk), the online
    # softmax across tiles, ragged tails, and the head-dim slicing of Q.K^T and of the output
    batch, hq, hkv, d, cache, new, window = 2, 8, 2, 32, 11, 45, 10
    q, k, v = _inputs(batch, hq, hkv, new, cache + new, d, dtype, seed=5)
    key_valid = torch.ones(batch, cache + new, dtype=torch.bool)
    key_valid[1, :20] = False
    kw = dict(q_pos=torch.arange(cache, cache + new), k_pos=torch.arange(cache + new),
              key_valid=key_valid, causal=True, window=window)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DK=16, BLOCK_DV=16)
    tri, _ = _check(q, k, v, config=small, **kw)
    big = A.attention_triton(q, k, v, **kw)
    torch.testing.assert_close(tri.float(), big.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_bf16_interpreter_upcast():
    batch, hq, hkv, d, cache, canvas = 1, 4, 2, 32, 7, 16
    q, k, v = _inputs(batch, hq, hkv, canvas, cache + canvas, d, torch.bfloat16, seed=6)
    _check(q, k, v, q_pos=torch.arange(cache, cache + canvas), k_pos=torch.arange(cache + canvas),
           causal=True, window=9)


def test_fully_masked_rows_are_zero_like_sdpa():
    batch, hq, hkv, d, lk, lq = 2, 4, 2, 16, 12, 6
    q, k, v = _inputs(batch, hq, hkv, lq, lk, d, torch.float32, seed=7)
    key_valid = torch.ones(batch, lk, dtype=torch.bool)
    key_valid[1] = False  # batch row 1 sees nothing at all
    # and query positions 0, 1 lie before every key (k_pos starts at 2): causal hides all keys
    kw = dict(q_pos=torch.arange(lq), k_pos=torch.arange(2, 2 + lk), key_valid=key_valid,
              causal=True)
    ref = ops.attention_reference(q, k, v, **kw)
    # the behaviour we match: torch's SDPA gives zeros (not NaN) for a fully masked bool row
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert torch.equal(ref[0, :, :2], torch.zeros_like(ref[0, :, :2]))
    tri, _ = _check(q, k, v, **kw)
    assert torch.equal(tri[1], torch.zeros_like(tri[1]))
    assert torch.equal(tri[0, :, :2], torch.zeros_like(tri[0, :, :2]))


def test_non_contiguous_inputs():
    # q/k/v as transposed views of [B, L, H, D] projections, as a model produces them
    batch, hq, hkv, d, cache, canvas = 2, 4, 2, 16, 5, 16
    g = torch.Generator().manual_seed(8)
    q = (torch.randn(batch, canvas, hq, d, generator=g) * 0.5).transpose(1, 2)
    k = torch.randn(batch, cache + canvas, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(batch, cache + canvas, hkv, d, generator=g).transpose(1, 2)
    _check(q, k, v, q_pos=torch.arange(cache, cache + canvas), k_pos=torch.arange(cache + canvas))


def test_twin_unchunked_is_the_reference_and_chunked_matches():
    batch, hq, hkv, d, cache, new = 2, 4, 2, 16, 6, 33
    q, k, v = _inputs(batch, hq, hkv, new, cache + new, d, torch.float32, seed=9)
    key_valid = torch.ones(batch, cache + new, dtype=torch.bool)
    key_valid[0, :4] = False
    kw = dict(q_pos=torch.arange(cache, cache + new), k_pos=torch.arange(cache + new),
              key_valid=key_valid, causal=True, window=7)
    ref = ops.attention_reference(q, k, v, **kw)
    assert torch.equal(A.attention_torch(q, k, v, **kw), ref)
    torch.testing.assert_close(A.attention_torch(q, k, v, chunk=8, **kw), ref,
                               atol=1e-6, rtol=1e-6)


def test_int32_positions_with_a_window_beyond_int32():
    """A window >= 2^31 sees every earlier key (the kernel compares in int64); the twin's mask compared
    int32 positions with the window cast to int32, which wrapped to 0 and masked every key."""
    q, k, v = _inputs(1, 2, 1, 3, 9, 16, torch.float32, seed=7)
    pos = dict(q_pos=torch.arange(6, 9, dtype=torch.int32), k_pos=torch.arange(9, dtype=torch.int32), causal=True)
    tri, ref = _check(q, k, v, window=2 ** 40, **pos)
    torch.testing.assert_close(ref, ops.attention_reference(q, k, v, **pos), atol=0, rtol=0)


def test_dispatch(monkeypatch):
    """The twin on CPU tensors, the Triton kernel when forced (rules: tests/test_kernel_backend.py)."""
    batch, hq, hkv, d, lk, lq = 1, 4, 2, 16, 20, 8
    q, k, v = _inputs(batch, hq, hkv, lq, lk, d, torch.float32, seed=10)
    kw = dict(q_pos=torch.arange(lk - lq, lk), k_pos=torch.arange(lk))
    ref = ops.attention_reference(q, k, v, **kw)
    monkeypatch.delenv("DGPLUG_KERNELS", raising=False)
    assert torch.equal(A.attention(q, k, v, **kw), ref)
    monkeypatch.setenv("DGPLUG_KERNELS", "triton")
    torch.testing.assert_close(A.attention(q, k, v, **kw), ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError):  # head dim 12 is not a power of two
        A.attention_triton(q[..., :12], k[..., :12], v[..., :12], **kw)


def test_key_valid_one_row_for_the_batch_and_bad_shapes():
    """key_valid [1, Lk] (transformers' 4-d mask with a batch of 1, through the patch's mask[:, 0, 0, :])
    holds for every row on both paths: the Triton path asserted [B, Lk] (and without asserts read past
    the mask). Any other shape is one ValueError naming it on every path ([B, 1, Lk] reached SDPA as a
    5-d mask, [B, 1] broadcast over the keys); a 0/1 integer mask is a bool one (SDPA refused it)."""
    batch, hq, hkv, d, lk, lq = 3, 4, 2, 16, 12, 5
    q, k, v = _inputs(batch, hq, hkv, lq, lk, d, torch.float32, seed=9)
    row = torch.ones(1, lk, dtype=torch.bool)
    row[0, :4] = False
    kw = dict(q_pos=torch.arange(lk - lq, lk), k_pos=torch.arange(lk), causal=True)
    want = ops.attention_reference(q, k, v, key_valid=row.expand(batch, lk), **kw)
    for impl in ("triton", "torch"):
        got = A.attention(q, k, v, key_valid=row, impl=impl, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        got = A.attention(q, k, v, key_valid=row.expand(batch, lk).int(), impl=impl, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(A.attention_torch(q, k, v, key_valid=row, chunk=2, **kw), want, atol=2e-5, rtol=2e-5)
    bad = [torch.ones(batch, 1, lk, dtype=torch.bool), torch.ones(batch, 1, dtype=torch.bool),
           torch.ones(lk, dtype=torch.bool), torch.ones(2, lk, dtype=torch.bool), torch.ones(batch, lk + 1, dtype=torch.bool)]
    for kv in bad:
        name = str(list(kv.shape)).replace("[", r"\[").replace("]", r"\]")
        for call in (lambda: A.attention(q, k, v, key_valid=kv, impl="triton", **kw),
                     lambda: A.attention(q, k, v, key_valid=kv, impl="torch", **kw),
                     lambda: A.attention_torch(q, k, v, key_valid=kv, chunk=2, **kw),
                     lambda: ops.attention_reference(q, k, v, key_valid=kv, **kw)):
            with pytest.raises(ValueError, match=rf"key_valid must be \[B, Lk\] = \[{batch}, {lk}\].*got {name}"):
                call()
