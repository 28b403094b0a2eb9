"""Fused projections (dgplug.model.stacked): q|k(|v) and gate|up as one matmul over one buffer whose
row blocks are the parameters themselves. Forced on the CPU here (DGPLUG_FUSED_PROJECTIONS=1 is what
a CUDA device gets by default); references: transformers' own model for the logits (with and
without self-conditioning), the unfused model for generate's tokens."""

import pytest
import torch

import dgplug
from dgplug import model as dm
from dgplug.testing import probe_logits


def _groups(m):
    """The weight groups that fuse: per decoder/encoder layer q|k(|v) and gate|up, and the
    self-conditioning gate|up."""
    out = []
    for mod in m.modules():
        if isinstance(mod, dm.Attention):
            out.append([mod.q_proj.weight, mod.k_proj.weight] + ([mod.v_proj.weight] if mod.v_proj is not None else []))
        if hasattr(mod, "gate_proj") and hasattr(mod, "up_proj"):
            out.append([mod.gate_proj.weight, mod.up_proj.weight])
    return out


@pytest.fixture()
def fused(monkeypatch):
    monkeypatch.setattr(dm, "FUSED_PROJECTIONS", "1")


def _run(m):
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]])
    return m.generate(ids, max_new_tokens=32, max_denoising_steps=3, seed=11, rng="counter")


def test_fused_outputs_match_unfused(tiny_ckpt, monkeypatch):
    ref_model = dgplug.load(tiny_ckpt, dtype="fp32")
    ref_logits = probe_logits(ref_model)
    ref = _run(ref_model)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    assert not any(dm._adjacent(ws) for ws in _groups(ref_model))  # unfused on a CPU by default

    monkeypatch.setattr(dm, "FUSED_PROJECTIONS", "1")
    m = dgplug.load(tiny_ckpt, dtype="fp32")
    got = _run(m)
    groups = _groups(m)
    assert len(groups) >= 2 * m.tc.num_hidden_layers + 1  # attention + MLP per layer, self-conditioning
    for ws in groups:  # every group was stacked into one buffer, the parameters are its row blocks
        assert dm._adjacent(ws), [tuple(w.shape) for w in ws]
    for k, v in m.state_dict().items():  # nothing changed value or shape
        assert torch.equal(v, state[k]), k
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.forwards.float(), ref.forwards.float())
    torch.testing.assert_close(probe_logits(m), ref_logits, rtol=1e-5, atol=1e-5)


def test_fused_logits_match_transformers(tiny_ckpt, fused):
    """The oracle: transformers' DiffusionGemmaForBlockDiffusion on the same checkpoint, fp32 logits
    within 1e-5 of the largest (test_parity's bound), the self-conditioning MLP included."""
    from transformers import DiffusionGemmaForBlockDiffusion

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_ckpt, dtype=torch.float32,
                                                         experts_implementation="eager").eval()
    m = dgplug.load(tiny_ckpt, dtype="fp32")
    C, V = m.cfg.canvas_length, m.tc.vocab_size
    g = torch.Generator().manual_seed(2)
    ids, canvas = torch.randint(5, 500, (2, 20), generator=g), torch.randint(0, V, (2, C), generator=g)
    sc = torch.randn(2, C, V, generator=g) * 3
    with torch.no_grad():
        for kw in ({}, {"self_conditioning_logits": sc}):
            a = hf(input_ids=ids, decoder_input_ids=canvas, **kw).logits
            b = m(input_ids=ids, decoder_input_ids=canvas, **kw).logits
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    assert all(dm._adjacent(ws) for ws in _groups(m))  # the fused path is what ran


def test_projections_equal_separate_matmuls(fused):
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(n, 24), requires_grad=False) for n in (32, 16, 16)]
    h = torch.randn(2, 7, 24)
    want = [h @ w.T for w in ws]
    got = dm.projections(h, ws)
    assert dm._adjacent(ws)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a stacked group is not stacked again: the same storage serves the next call
    ptr = ws[0].data_ptr()
    dm.projections(h, ws)
    assert ws[0].data_ptr() == ptr


def test_restacks_after_dtype_move_and_load(tiny_ckpt, fused):
    m = dgplug.load(tiny_ckpt, dtype="fp32")
    _run(m)
    m.to(torch.bfloat16)  # .to() gives every parameter its own storage again
    attn = next(mod for mod in m.modules() if isinstance(mod, dm.Attention))
    ws = [attn.q_proj.weight, attn.k_proj.weight]
    assert not dm._adjacent(ws)
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, max_denoising_steps=2, seed=0)
    assert dm._adjacent(ws) and ws[0].dtype == torch.bfloat16
    # a state dict loaded with assign=True replaces the parameters: stacked again on first use
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    ws = [attn.q_proj.weight, attn.k_proj.weight]
    assert not dm._adjacent(ws)
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, max_denoising_steps=2, seed=0)
    assert dm._adjacent(ws)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_not_applied_where_it_does_not_fit(monkeypatch):
    ws = [torch.randn(8, 4), torch.randn(8, 4)]
    monkeypatch.setattr(dm, "FUSED_PROJECTIONS", "auto")
    assert dm.stacked(ws) is None  # a CPU by default: one matmul per projection
    monkeypatch.setattr(dm, "FUSED_PROJECTIONS", "1")
    assert dm.stacked([ws[0], ws[1].double()]) is None  # mixed dtypes
    assert dm.stacked([ws[0], torch.randn(8, 5)]) is None  # different K
    assert dm.stacked([ws[0], object()]) is None  # a packed weight (not a tensor)
    monkeypatch.setattr(dm, "FUSED_PROJECTIONS", "0")
    assert dm.stacked(ws) is None


def test_stacked_under_inference_mode_stays_a_plain_tensor(fused):
    ws = [torch.nn.Parameter(torch.randn(8, 4), requires_grad=False) for _ in range(2)]
    with torch.inference_mode():
        dm.projections(torch.randn(3, 4), ws)
    assert dm._adjacent(ws) and not ws[0].is_inference()  # usable outside inference_mode afterwards
    with torch.inference_mode():  # parameters made under inference_mode (a model loaded there)
        inf = [torch.nn.Parameter(torch.randn(n, 4), requires_grad=False) for n in (8, 6)]
    x = torch.randn(3, 4)
    want = [x @ w.T for w in inf]
    for mode in (torch.inference_mode, torch.no_grad, torch.no_grad):
        with mode():
            got = dm.projections(x, inf)
        assert dm._adjacent(inf) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_autograd_and_repeated_tensors_keep_separate_matmuls(fused):
    ws = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    x = torch.randn(3, 4)
    assert dm.stacked(ws) is None  # gradients wanted: separate matmuls keep them
    sum(p.sum() for p in dm.projections(x, ws)).backward()
    assert all(w.grad is not None for w in ws)
    with torch.no_grad():
        assert dm.stacked(ws) is not None
    k = torch.randn(8, 4)
    assert dm.stacked([torch.randn(8, 4), k, k]) is None  # one tensor twice: it cannot be two row blocks
