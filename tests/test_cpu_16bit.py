"""16-bit weights on CPUs without native 16-bit matmuls (dgplug.ops.linear / soft_embedding):
fp32 matmuls on upcast copies, compared with torch's own 16-bit matmul (what transformers runs)."""

import pytest
import torch
import torch.nn.functional as F

from dgplug import ops


@pytest.fixture
def upcast(monkeypatch):
    monkeypatch.setattr(ops, "_UPCAST_16BIT", "1")
    monkeypatch.setattr(ops, "_UPCAST_BLOCK", 4096)  # small blocks: the blocked paths run too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("out_features", [48, 300])  # one block / several blocks of rows
def test_linear_upcast_matches_16bit_matmul(upcast, dtype, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g).to(dtype)
    w = (torch.randn(out_features, 64, generator=g) * 0.1).to(dtype)
    assert ops.upcast_16bit(w)
    out = ops.linear(x, w)
    ref = F.linear(x, w)  # torch's 16-bit CPU matmul (fp32 accumulation, rounded once)
    exact = F.linear(x.double(), w.double())
    assert out.dtype == dtype and out.shape == ref.shape
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    # both round the same fp32 sum: at most one 16-bit step apart, and as close to the exact sum
    assert float(((out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-3)).max()) <= 2 * ulp
    assert float((out.double() - exact).abs().max()) <= float((ref.double() - exact).abs().max()) * 1.5 + 1e-6


def test_linear_leaves_fp32_and_native_alone(monkeypatch):
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    assert not ops.upcast_16bit(w)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    monkeypatch.setattr(ops, "_UPCAST_16BIT", "0")
    xb, wb = x.bfloat16(), w.bfloat16()
    assert not ops.upcast_16bit(wb)
    assert torch.equal(ops.linear(xb, wb), F.linear(xb, wb))


def test_soft_embedding_upcast_matches_16bit_matmul(upcast):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 1000, generator=g) * 3
    table = (torch.randn(1000, 32, generator=g) * 0.05).bfloat16()
    out = ops.soft_embedding(logits, table)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ref = torch.matmul(probs.to(torch.bfloat16), table)  # transformers' expression
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2 ** -7)
