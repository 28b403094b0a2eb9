"""The fused head + sampler (dgplug.kernels.sampler): torch path and Triton (interpreter) path
against the unfused reference, RNG agreement, tile invariance, and a chi-square test that the
Gumbel-max draws follow softmax(l).

Tolerances (fp32 accumulation everywhere; only the summation order differs from the reference):
entropy within 2e-5 nats + 1e-5 relative, soft embedding within 2e-5 absolute (values ~1);
against transformers' bf16 soft embedding (probabilities and output rounded to bf16): 1e-2 of
the largest entry. argmax and sampled tokens must be equal.
"""

import os

import pytest
import torch

from dgplug.kernels import sampler as S
from dgplug.kernels.sampler import (
    HeadSample,
    canvas_row_keys,
    counter_uniform,
    head_sample,
    head_sample_reference,
)

needs_triton = pytest.mark.skipif(S.triton is None, reason="triton not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(n=37, vocab=333, d=80, dtype=torch.float32, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    table = (torch.randn(vocab, d, generator=g) * scale).to(dtype)
    temp = 0.4 + 0.6 * torch.rand(n, generator=g)  # per-row temperature
    return h, table, temp


def _run(impl, h, table, **kw):
    if impl == "triton":  # the GPU path (chunks of matmuls + the chunk kernel), interpreted
        for k, v in dict(softcap=30.0, temperature=1.0, seed=0, step=0, row_offset=0, want_soft=True).items():
            kw.setdefault(k, v)
        return S._head_sample_triton(h, table, **kw)
    return head_sample(h, table, impl="torch", **kw)


def _assert_close_to(out: HeadSample, ref: HeadSample, table_dtype=torch.float32, mean_soft=2e-5, max_soft=3e-3):
    assert torch.equal(out.argmax, ref.argmax)
    assert torch.equal(out.token, ref.token)
    assert out.entropy.dtype == torch.float32
    torch.testing.assert_close(out.entropy, ref.entropy, atol=2e-5, rtol=1e-5)
    if ref.soft is not None:
        assert out.soft.dtype == torch.float32 and out.soft.shape == ref.soft.shape
        if table_dtype == torch.float32:
            torch.testing.assert_close(out.soft, ref.soft, atol=2e-5, rtol=1e-5)
        else:
            # l is rounded to the 16-bit table dtype first: a last-bit difference in a logit can
            # move l' by one 16-bit step (0.4 % of p_v for bf16), so allow rare larger errors
            torch.testing.assert_close(out.soft, ref.soft, atol=max_soft, rtol=0)
            assert float((out.soft - ref.soft).abs().mean()) < mean_soft


# ------------------------------------------------------------------------------ RNG


@needs_triton
def test_counter_rng_torch_and_triton_bit_identical():
    keys = canvas_row_keys(seed=1234, step=7, rows=5, row_offset=3)
    u_torch = counter_uniform(keys[:, None], torch.arange(1000)[None, :])
    u_triton = S._triton_uniform(keys, 1000)
    assert torch.equal(u_torch, u_triton)
    assert float(u_torch.min()) > 0.0 and float(u_torch.max()) < 1.0
    assert abs(float(u_torch.mean()) - 0.5) < 0.02


@needs_triton
@pytest.mark.parametrize("seed,step,rows,row_offset,vocab", [(0, 0, 256, 0, 262144), (2**40 + 7, 2**31 + 5, 300, 17, 1000),
                                                            (123, 47, 2048, 0, 262143)])
def test_step_keys_torch_and_triton_bit_identical(seed, step, rows, row_offset, vocab):
    """The denoise step's keys and re-noise tokens in one Triton launch = the torch twin, bit for bit
    (device-held seed key and step, rows past a block, a vocabulary not a power of two)."""
    key, st = torch.tensor([S.seed_key(seed)]), torch.tensor([step])
    want = S.step_keys(key, st, rows, vocab, row_offset, impl="torch")
    got = S.step_keys(key, st, rows, vocab, row_offset, impl="triton")
    assert torch.equal(want[0], S.canvas_row_keys(seed, step, rows, row_offset))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, w)
    assert int(got[1].min()) >= 0 and int(got[1].max()) < vocab and len(set(got[1].tolist())) > rows * 0.8


def test_counter_rng_keys_depend_on_everything():
    base = canvas_row_keys(0, 0, 8)
    assert len(set(base.tolist())) == 8
    assert not torch.equal(base, canvas_row_keys(1, 0, 8))
    assert not torch.equal(base, canvas_row_keys(0, 1, 8))
    assert torch.equal(base[3:], canvas_row_keys(0, 0, 5, row_offset=3))
    extreme = counter_uniform(torch.tensor([0, 0xFFFFFFFF]), torch.tensor([0, 262143]))
    assert bool(((extreme > 0) & (extreme < 1)).all())


# ------------------------------------------------------------------------------ vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_torch_path_matches_reference(dtype):
    h, table, temp = _case(dtype=dtype)
    kw = dict(temperature=temp, seed=11, step=3)
    ref = head_sample_reference(h, table, **kw)
    # ragged: 333 % 64 != 0, 37 % 16 != 0
    out = _run("torch", h, table, vocab_tile=64, **kw)
    _assert_close_to(out, ref, dtype)
    out = S._head_sample_torch(h, table, softcap=30.0, want_soft=True, row_offset=0, vocab_tile=50,
                               rows_chunk=16, **kw)
    _assert_close_to(out, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_triton_path_matches_reference(dtype):
    """The GPU path: per-chunk matmuls + the chunk kernel; one chunk or several, a ragged last
    chunk, kernel tiles smaller than the chunk; h in fp32 or in the table's dtype.
    Its soft-embedding weights are stored in the table's dtype before P @ E (as transformers
    rounds its probabilities to bf16): on bf16 tables a relative error of 2^-9 per weight, which
    measured here 4.4e-4 mean and 4.4e-3 max absolute on entries up to 0.74 (fp16: 2.4e-5 and
    2.1e-4); fp32 tables stay exact."""
    h, table, temp = _case(dtype=dtype)
    kw = dict(temperature=temp, seed=11, step=3)
    ref = head_sample_reference(h, table, **kw)
    tol = dict(mean_soft=1e-3, max_soft=1e-2) if dtype == torch.bfloat16 else dict(mean_soft=5e-5, max_soft=1e-3)
    for chunk, bv in [(333, 128), (100, 32), (64, 64)]:
        _assert_close_to(_run("triton", h, table, chunk=chunk, block_v=bv, **kw), ref, dtype, **tol)
    _assert_close_to(_run("triton", h.to(dtype), table, chunk=128, block_v=32, **kw),
                     head_sample_reference(h.to(dtype), table, **kw), dtype, **tol)


@needs_triton
def test_triton_lazy_rescale_across_chunks():
    """Logits rising chunk after chunk by more than the lazy margin move the reference max."""
    h, table, _ = _case(n=5, vocab=256, d=16)
    ramp = torch.linspace(0.0, 6.0, 256)[:, None]
    table = table * 0.05 + ramp * torch.sign(h[0])[None, :] / 16  # row 0's logits grow along v
    ref = head_sample_reference(h, table, temperature=0.2)
    _assert_close_to(_run("triton", h, table, temperature=0.2, chunk=32, block_v=16), ref)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_triton_one_sweep_same_bits_as_two(dtype):
    """After a row's first chunk the kernel takes the sums in the sweep that finds the maxima,
    against the reference max it has, and redoes them only when the chunk moved that max: the
    same bits as two sweeps per chunk, on plain rows and on rows whose logits climb past the
    lazy margin chunk after chunk (row 0 here moves it in several chunks, the others do not)."""
    h, table, temp = _case(n=9, vocab=256, d=16, dtype=dtype)
    ramp = torch.linspace(0.0, 6.0, 256)[:, None]
    climbing = (table.float() * 0.05 + ramp * torch.sign(h[0])[None, :] / 16).to(dtype)
    for tb, t in ((table, temp), (climbing, 0.2)):
        for want_soft in (True, False):
            a, b = (_run("triton", h, tb, temperature=t, chunk=32, block_v=16, want_soft=want_soft, one_sweep=o)
                    for o in (True, False))
            assert torch.equal(a.token, b.token) and torch.equal(a.argmax, b.argmax)
            assert torch.equal(a.entropy, b.entropy)
            assert (a.soft is None and b.soft is None) or torch.equal(a.soft, b.soft)


@needs_triton
def test_triton_rows_and_chunks_ragged():
    h, table, temp = _case(n=21, vocab=100, d=64)
    ref = head_sample_reference(h, table, temperature=temp)
    _assert_close_to(_run("triton", h, table, temperature=temp, chunk=48, block_v=16), ref)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_scalar_temperature_no_soft_and_softcap(impl):
    h, table, _ = _case(n=9, vocab=130, scale=3.0)  # large logits: the softcap saturates
    ref = head_sample_reference(h, table, temperature=0.5, want_soft=False, softcap=30.0)
    out = _run(impl, h, table, temperature=0.5, want_soft=False)
    assert out.soft is None
    _assert_close_to(out, ref)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_argmax_ties_take_the_first_index(impl):
    h, table, _ = _case(n=6, vocab=200, d=32)
    first = head_sample_reference(h, table).argmax
    # copy each row's winning embedding to a later slot in another tile: the first must still win
    table2 = table.clone()
    table2[190] = table[int(first[0])]
    ref = head_sample_reference(h, table2)
    assert int(ref.argmax[0]) == int(first[0])
    out = _run(impl, h, table2, vocab_tile=32)
    assert torch.equal(out.argmax, ref.argmax)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_peaked_distribution(impl):
    h, table, _ = _case(n=8, vocab=64, scale=2.0)
    out = _run(impl, h, table, temperature=0.01)
    assert torch.equal(out.token, out.argmax)
    assert float(out.entropy.max()) < 1e-3


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_tiny_temperature_keeps_the_bf16_soft_embedding_finite(impl):
    """At T = 1e-4, l = softcap * tanh(.) / T reaches ~1e5, where a bf16 step of l' is 512: the soft
    weights exp(l' - m) taken against the fp32 max m overflowed (inf, then a NaN soft embedding).
    The reference, softmax(l') @ E, is finite; the weights are now taken against m rounded as l'."""
    h, table, _ = _case(n=3, vocab=100, d=16, dtype=torch.bfloat16, scale=1.0)
    ref = head_sample_reference(h, table, temperature=1e-4)
    assert torch.isfinite(ref.soft).all()
    out = _run(impl, h, table, temperature=1e-4, vocab_tile=32, **({"chunk": 64} if impl == "triton" else {}))
    assert torch.isfinite(out.soft).all()
    torch.testing.assert_close(out.soft, ref.soft, atol=1e-2, rtol=0)
    assert torch.equal(out.argmax, ref.argmax)


@needs_triton
def test_triton_vocab_tile_must_be_a_power_of_two():
    """A vocab_tile the kernel cannot take (tl.arange needs a power of two) is one clear error naming
    it, not an error from inside the kernel; 0 means the default, as on the torch path."""
    h, table, _ = _case(n=2, vocab=70, d=16)
    with pytest.raises(ValueError, match="vocab_tile must be a power of two, got 48"):
        head_sample(h, table, impl="triton", vocab_tile=48)
    ref = head_sample_reference(h, table)
    _assert_close_to(head_sample(h, table, impl="triton", vocab_tile=0), ref)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_rows(impl):
    """h [0, D] (a batch with no rows left): empty results, as the reference (was a ZeroDivisionError)."""
    h, table, _ = _case(n=0, vocab=50, d=16)
    ref = head_sample_reference(h, table)
    for want_soft in (True, False):
        out = _run(impl, h, table, want_soft=want_soft)
        assert out.token.shape == out.argmax.shape == out.entropy.shape == (0,)
        assert out.token.dtype == ref.token.dtype and out.entropy.dtype == ref.entropy.dtype
        assert (out.soft is None) if not want_soft else out.soft.shape == ref.soft.shape


# ------------------------------------------------------------------------------ invariances


def test_torch_tokens_invariant_to_tiling():
    h, table, temp = _case(n=40, vocab=500, dtype=torch.bfloat16)
    outs = [S._head_sample_torch(h, table, softcap=30.0, temperature=temp, seed=5, step=1, row_offset=0,
                                 want_soft=True, vocab_tile=vt, rows_chunk=rc)
            for vt, rc in [(37, 16), (64, 40), (512, 512)]]
    for o in outs[1:]:
        assert torch.equal(o.token, outs[0].token) and torch.equal(o.argmax, outs[0].argmax)
        torch.testing.assert_close(o.entropy, outs[0].entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o.soft, outs[0].soft, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_tokens_invariant_to_tiling_and_same_as_torch():
    h, table, temp = _case(n=64, vocab=700, d=64, dtype=torch.bfloat16, scale=0.1)
    kw = dict(temperature=temp, seed=99, step=4)
    a = _run("triton", h, table, vocab_tile=128, **kw)
    b = _run("triton", h, table, chunk=96, block_v=32, **kw)
    c = head_sample(h, table, impl="torch", **kw)
    assert torch.equal(a.token, b.token) and torch.equal(a.argmax, b.argmax)
    assert torch.equal(a.token, c.token) and torch.equal(a.argmax, c.argmax)
    assert not torch.equal(a.token, a.argmax)  # flat enough that sampling differs from argmax
    other = head_sample(h, table, impl="torch", temperature=temp, seed=100, step=4)
    assert not torch.equal(other.token, c.token)


def test_row_offset_makes_chunks_agree():
    h, table, temp = _case(n=30, vocab=200, scale=0.1)
    full = head_sample(h, table, impl="torch", temperature=temp, seed=3, step=2)
    lo = head_sample(h[:12], table, impl="torch", temperature=temp[:12], seed=3, step=2)
    hi = head_sample(h[12:], table, impl="torch", temperature=temp[12:], seed=3, step=2, row_offset=12)
    assert torch.equal(torch.cat([lo.token, hi.token]), full.token)


# ------------------------------------------------------------------------------ statistics


def test_sampled_tokens_follow_softmax_chi_square():
    stats = pytest.importorskip("scipy.stats")
    vocab, rows = 16, 8000
    g = torch.Generator().manual_seed(1)
    table = torch.randn(vocab, 8, generator=g)
    h = torch.randn(1, 8, generator=g).expand(rows, 8).contiguous()
    out = S._head_sample_torch(h, table, softcap=30.0, temperature=1.3, seed=2024, step=5, row_offset=0,
                               want_soft=False, rows_chunk=rows)
    ref = head_sample_reference(h[:1], table, temperature=1.3, want_soft=False)
    l = torch.tanh((h[:1] @ table.T) / 30.0) * 30.0 / 1.3
    p = torch.softmax(l.double(), -1)[0]
    counts = torch.bincount(out.token, minlength=vocab).double()
    assert float(p.min()) * rows > 5, "every expected count must be large enough for chi-square"
    res = stats.chisquare(counts.numpy(), (p * rows).numpy())
    assert res.pvalue > 1e-3, (res, counts, p * rows)
    # entropy of the same distribution
    assert abs(float(ref.entropy[0]) + float((p * p.log()).sum())) < 1e-5


# ------------------------------------------------------------------------------ transformers' semantics


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_soft_embedding_matches_transformers_bf16(impl):
    h, table, _ = _case(n=24, vocab=300, d=64, dtype=torch.bfloat16, scale=0.5)
    temp = 0.6
    logits = torch.tanh((h.to(torch.bfloat16).float() @ table.float().T) / 30.0) * 30.0
    scaled = logits / temp
    # transformers: sc = scaled.to(bf16); softmax(sc, fp32).to(bf16) @ E   (then * sqrt(D))
    tf_soft = (torch.softmax(scaled.to(torch.bfloat16), -1, dtype=torch.float32).to(torch.bfloat16) @ table).float()
    tf_entropy = torch.distributions.Categorical(logits=scaled).entropy()
    out = _run(impl, h.to(torch.bfloat16), table, temperature=temp)
    err = (out.soft - tf_soft).abs().max() / tf_soft.abs().max()
    assert float(err) < 1e-2
    assert torch.equal(out.argmax, torch.argmax(scaled, -1))
    torch.testing.assert_close(out.entropy, tf_entropy, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ dispatch


def test_dispatch(monkeypatch):
    h, table, _ = _case(n=4, vocab=40, d=16)
    monkeypatch.delenv("DGPLUG_KERNELS", raising=False)
    with pytest.raises(ValueError):
        head_sample(h, table, impl="cuda")
    with pytest.raises(ValueError):
        head_sample(h, table[:, :8])
    with pytest.raises(ValueError):
        head_sample(h, table, temperature=torch.ones(3))
    assert os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------ the CPU twin's pieces


def test_int32_hash_equals_counter_uniform():
    """The CPU path's in-place int32 hash (wrapping multiplies, masked arithmetic shifts, the
    uniform built from its fp32 bits) against the int64 reference `counter_uniform`."""
    keys = torch.cat([torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                      canvas_row_keys(seed=2**40 + 7, step=31, rows=11, row_offset=2**31 - 3)])
    cols = torch.cat([torch.arange(0, 300), torch.arange(262144 - 300, 262144), torch.tensor([2**31 - 1, 2**31, 2**32 - 1])])
    x = torch.empty(keys.numel(), cols.numel(), dtype=torch.int32)
    u = S._uniform_(x, torch.empty_like(x), S._as_int32(keys), S._as_int32(S._mul32(cols, S._GOLDEN)))
    assert torch.equal(u, counter_uniform(keys[:, None], cols[None, :]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_torch_path_same_for_any_workers_chunks_and_tiles(dtype):
    """Rows are independent: worker count, row chunks and vocabulary tiles change no token, and
    every split stays within the reference's tolerances."""
    h, table, temp = _case(n=70, vocab=1000, d=48, dtype=dtype, scale=0.2)
    kw = dict(softcap=30.0, temperature=temp, seed=8, step=6, row_offset=5, want_soft=True)
    ref = head_sample_reference(h, table, **{k: v for k, v in kw.items() if k != "softcap"})
    base = None
    for workers, rc, vt in [(1, None, None), (2, 16, 256), (3, 7, 333), (2, 70, 1000)]:
        out = S._head_sample_torch(h, table, workers=workers, rows_chunk=rc, vocab_tile=vt, **kw)
        _assert_close_to(out, ref, dtype)
        base = base or out
        assert torch.equal(out.token, base.token) and torch.equal(out.argmax, base.argmax)


def test_torch_path_budget_bounds_the_tile():
    """Tile widths from the cache-sized tile and the buffer budget: wide 16-bit tables get
    narrow tiles (their fp32 copy counts); every choice within both."""
    for rows, d, dtype, workers in [(128, 2816, torch.bfloat16, 2), (128, 256, torch.float32, 2),
                                    (128, 256, torch.bfloat16, 1), (16, 5376, torch.float16, 4)]:
        vt = S._torch_tile(rows, d, dtype, True, workers)
        wide = dtype != torch.float32
        per_worker = vt * (rows * (15 if wide else 13) + (4 * d if wide else 0))
        assert vt >= 256 and vt & (vt - 1) == 0 and (rows * vt <= S._TORCH_TILE or vt == 256)
        assert workers * per_worker <= S._TORCH_BUDGET or vt == 256
    assert S._torch_tile(128, 5376, torch.bfloat16, True, 2) < S._torch_tile(128, 5376, torch.float32, True, 2)


def test_hash_floor_keeps_every_entry_that_can_reach_the_gap():
    """_hash_floor never drops an entry whose Gumbel noise reaches the gap: for gaps from -inf
    to beyond the largest noise, every hash whose uniform gives g >= gap passes the floor."""
    gaps = torch.tensor([float("-inf"), -30.0, -2.5, 0.0, 0.3, 2.0, 7.5, 12.0, 15.9, 16.7, 40.0])
    floor = S._hash_floor(gaps).view(-1).long()
    k = torch.arange(0, 1 << 23, dtype=torch.int64)
    u = (k.double() + 0.5) / 2**23
    g = -torch.log(-torch.log(u))
    lowest = ((k << 9) - (1 << 31))  # the smallest hash with this k, in the flipped (signed) order
    for gap, fl in zip(gaps.tolist(), floor.tolist()):
        reach = g >= gap
        assert bool((lowest[reach] >= fl).all()), gap
        assert int(((lowest >= fl) & ~reach).sum()) <= 8  # and tight: a few k below the line pass


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0], ids=["flat", "medium", "peaked"])
def test_torch_path_many_tiles_matches_reference(scale):
    """Many tiles after the first, where only entries whose hash can reach the row's best get
    their Gumbel noise computed: flat rows (every entry a candidate by logits alone), medium
    and peaked ones; tokens equal to the reference's, which scores every entry."""
    h, table, temp = _case(n=64, vocab=6000, d=32, scale=scale, seed=4)
    kw = dict(temperature=temp, seed=21, step=9)
    ref = head_sample_reference(h, table, **kw)
    out = S._head_sample_torch(h, table, softcap=30.0, row_offset=0, want_soft=True, vocab_tile=256, **kw)
    _assert_close_to(out, ref)
    if scale == 0.01:
        assert not torch.equal(ref.token, ref.argmax)


@pytest.mark.parametrize("impl", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_temperature_is_the_greedy_limit(impl, dtype):
    """T = 0 (or any T below softcap * 2^-90) gives the T -> 0 limit on every path: the argmax as
    token, zero entropy, the argmax's table row as soft embedding; two tied maxima: entropy log 2 and
    their mean. It divided by 0 before: l = +-inf, NaN entropy and soft, and the first positive logit
    as argmax and token. Rows at ordinary temperatures in the same call are unchanged."""
    h, table, temp = _case(n=6, vocab=200, d=16, dtype=dtype, scale=1.0)
    table[150] = table[int(torch.argmax(h[0] @ table.float().T))]  # row 0: two tied maxima
    logits = torch.tanh((h @ table.float().T) / 30.0) * 30.0
    greedy = torch.argmax(logits, dim=-1)
    temp[3:] = torch.tensor([0.0, 1e-40, 1e-30])  # rows 3..5: 0, below the floor, near it
    temp[1] = 0.0
    run = (lambda **kw: head_sample_reference(h, table, **kw)) if impl == "reference" else \
        (lambda **kw: _run(impl, h, table, vocab_tile=32, **({"chunk": 64} if impl == "triton" else {}), **kw))
    for t in (0.0, temp):
        out = run(temperature=t, seed=4, step=2)
        cold = torch.ones(6, dtype=torch.bool) if isinstance(t, float) else temp < 1e-3
        assert torch.isfinite(out.entropy).all() and torch.isfinite(out.soft).all()
        assert torch.equal(out.argmax[cold], greedy[cold])
        assert torch.equal(out.token[cold & (torch.arange(6) > 0)], greedy[cold & (torch.arange(6) > 0)])
        tie = torch.tensor([float(torch.log(torch.tensor(2.0)))] + [0.0] * 5)
        torch.testing.assert_close(out.entropy[cold], tie[cold], atol=1e-6, rtol=0)
        want = table.float()[greedy]
        want[0] = table.float()[greedy[0]]  # the tied rows are equal: their mean is that row
        torch.testing.assert_close(out.soft[cold], want[cold], atol=1e-6, rtol=0)
        assert int(out.token[0]) in (int(greedy[0]), 150)
        if not isinstance(t, float):  # the warm rows as before: the reference at their own temperature
            _assert_close_to(out, head_sample_reference(h, table, temperature=temp.clamp_min(1e-20), seed=4, step=2),
                             table_dtype=dtype, max_soft=1e-2, mean_soft=1e-3)


def test_zero_temperature_matches_transformers_limit():
    """transformers' own sampler arithmetic (LinearTemperatureScheduleLogitsProcessor, Categorical
    entropy, argmax) at the smallest temperature its generate can apply with t_min = 0, t_max = 1e-20
    (one step: 1e-20 / N) equals dgplug at T = 0: the limit. At T = 0 itself (cur_step 0, which its
    generate never runs: steps go N..1) transformers' logits are +-inf and its entropy NaN."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

    h, table, _ = _case(n=5, vocab=120, d=16, scale=1.0)
    logits = (torch.tanh((h @ table.T) / 30.0) * 30.0)[None]  # [1, N, V], the model's head output
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.0, t_max=1e-20, max_denoising_steps=48)
    scaled = proc(None, logits, cur_step=torch.tensor(1, dtype=torch.int32))
    hf_entropy = torch.distributions.Categorical(logits=scaled).entropy()[0]
    ours = head_sample_reference(h, table, temperature=0.0)
    for out in (ours, head_sample(h, table, temperature=0.0, impl="torch")):
        assert torch.equal(out.argmax, torch.argmax(scaled, dim=-1)[0])
        assert torch.equal(out.token, out.argmax)
        torch.testing.assert_close(out.entropy, hf_entropy.float(), atol=1e-6, rtol=0)
        probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)[0]  # what its multinomial draws from
        assert torch.equal(probs.argmax(-1), out.token) and bool((probs.max(-1).values == 1).all())
    at_zero = proc(None, logits, cur_step=torch.tensor(0, dtype=torch.int32))
    assert torch.isinf(at_zero).any() and torch.softmax(at_zero, dim=-1, dtype=torch.float32).isnan().all()


@pytest.mark.parametrize("impl", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_low_temperature_keeps_the_fp16_soft_embedding_finite(impl):
    """fp16 table: l' = l rounded to fp16 overflowed to inf once l = logit / T passed 65504 (T = 1e-4
    here; a generate with t_min = 0 and t_max = 0.02 gets there): soft NaN on every path, as in
    transformers (softmax of its fp16 logits). Now l itself stands where fp16 overflows: finite, equal
    to transformers' softmax(l.half()) @ E wherever that is finite, the argmax's row at T = 0."""
    h, table, _ = _case(n=4, vocab=100, d=16, dtype=torch.float16, scale=1.0)
    logits = torch.tanh((h @ table.float().T) / 30.0) * 30.0
    run = (lambda **kw: head_sample_reference(h, table, **kw)) if impl == "reference" else \
        (lambda **kw: _run(impl, h, table, vocab_tile=32, **({"chunk": 64} if impl == "triton" else {}), **kw))
    for t in (1e-4, 0.0, 1e-3):
        out = run(temperature=t)
        assert torch.isfinite(out.soft).all()
        l = logits / max(t, 30.0 * 2.0 ** -90)
        hf = torch.softmax(l.half(), dim=-1, dtype=torch.float32).to(table.dtype).float() @ table.float()
        fine = torch.isfinite(hf).all(-1)
        if t == 1e-4:
            assert not fine.all()  # transformers' NaN rows exist here
        torch.testing.assert_close(out.soft[fine], hf[fine], atol=2e-3, rtol=0)
        if t == 0.0:
            torch.testing.assert_close(out.soft, table.float()[logits.argmax(-1)], atol=1e-6, rtol=0)
