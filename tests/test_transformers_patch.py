"""dgplug.patch on a native transformers DiffusionGemma: unchanged outputs, fused sampler."""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

import dgplug
from dgplug.testing import make_checkpoint


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_ckpt).eval()


def _logits(m, ids, canvas, **kw):
    with torch.no_grad():
        return m(input_ids=ids, decoder_input_ids=canvas, **kw).logits


def test_patch_keeps_logits(hf):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 20), generator=g)
    canvas = torch.randint(0, 512, (2, 16), generator=g)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :6] = 0
    dam = torch.cat([am, torch.ones(2, 16, dtype=torch.long)], 1)
    before = [_logits(hf, ids, canvas), _logits(hf, ids, canvas, attention_mask=am, decoder_attention_mask=dam)]
    calls = {"attn": 0, "moe": 0}
    import dgplug.kernels.attention as ka
    import dgplug.kernels.moe as km

    orig_a, orig_m = ka.attention, km.moe_forward

    def count_a(*a, **k):
        calls["attn"] += 1
        return orig_a(*a, **k)

    def count_m(*a, **k):
        calls["moe"] += 1
        return orig_m(*a, **k)

    ka.attention, km.moe_forward = count_a, count_m
    try:
        with dgplug.patched(hf):
            after = [_logits(hf, ids, canvas), _logits(hf, ids, canvas, attention_mask=am, decoder_attention_mask=dam)]
    finally:
        ka.attention, km.moe_forward = orig_a, orig_m
    assert calls["attn"] > 0 and calls["moe"] > 0  # the kernels really ran
    for a, b in zip(before, after):
        assert (a - b).abs().max().item() < 1e-5
    assert hf.config.text_config._attn_implementation != "dgplug"  # restored


def test_patch_seeded_generate_identical(hf):
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    a = hf.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4)
    dgplug.patch(hf)
    try:
        torch.manual_seed(5)
        b = hf.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4)
    finally:
        dgplug.unpatch(hf)
    assert torch.equal(a.sequences, b.sequences)


def test_patch_fused_sampler(tmp_path_factory):
    # a confident model: the fused sampler must drive the stop test as transformers' does
    path = make_checkpoint(tmp_path_factory.mktemp("peaked") / "ckpt", peaked=2.0, damp=0.02)
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    ref = m.generate(input_ids=ids, max_new_tokens=16, max_denoising_steps=20)
    with dgplug.patched(m, sampler="fused"):
        torch.manual_seed(7)
        out = m.generate(input_ids=ids, max_new_tokens=16, max_denoising_steps=20)
    assert out.sequences.shape == ref.sequences.shape
    # the identity-like model copies its canvas: both samplers stop early with high tokens per forward
    assert float(out.tokens_per_forward.min()) > 16 / 20
    assert "_denoising_step" not in m.__dict__


@pytest.fixture
def fresh_hf(tiny_ckpt):
    """A model of its own: transformers keeps compiled functions on the model."""
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_ckpt).eval()
    yield m
    torch._dynamo.reset()


def test_patch_static_cache_generate_compiles_fullgraph(fresh_hf, monkeypatch):
    """generate(cache_implementation="static") compiles the encoder, the decoder forward, the
    sampler and the stop test with fullgraph=True: patched, every one traces without a graph break
    (dynamo's "eager" backend: the traced graphs run the eager kernels, so the tokens must equal
    the unpatched model's, run without compiling)."""
    m = fresh_hf
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=32, max_denoising_steps=3, cache_implementation="static")
    real_compile, compiled = torch.compile, []

    def compile_eager(fn, **opts):  # what transformers asks for, on dynamo's "eager" backend
        compiled.append((getattr(fn, "__name__", ""), opts.get("fullgraph")))
        return real_compile(fn, backend="eager", fullgraph=opts.get("fullgraph", False))

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # the reference: static cache, nothing compiled
    torch.manual_seed(5)
    ref = m.generate(**kw)
    for k in [k for k in vars(m) if k.startswith("_compiled")]:
        delattr(m, k)
    monkeypatch.setattr(torch, "compile", compile_eager)
    with dgplug.patched(m):
        torch.manual_seed(5)
        out = m.generate(**kw)
    assert ("forward", True) in compiled and len(compiled) >= 4  # transformers really compiled, full-graph
    assert torch.equal(out.sequences, ref.sequences)


def test_patch_decoder_forward_inductor(fresh_hf, monkeypatch):
    """The patched decoder forward as transformers compiles it for a static cache (fullgraph,
    inductor on CPU, one compile), called with the very arguments transformers' static-cache
    generate passes (its 4D masks, left padding included): logits within 1e-4 of the unpatched
    eager model, for the decoder's key-padding mask (dgplug's attention) and for a mask that is not
    one (SDPA, picked at run time by torch.cond inside the same graph)."""
    m = fresh_hf
    C = m.config.canvas_length
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    calls, forward = [], m.forward
    monkeypatch.setattr(m, "forward", lambda **kw: calls.append(kw) or forward(**kw), raising=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    m.generate(input_ids=ids, attention_mask=am, max_new_tokens=C, max_denoising_steps=1,
               cache_implementation="static")  # one canvas, one step: the cache stays as that call saw it
    monkeypatch.undo()
    (kw,) = calls
    masks = kw.pop("decoder_attention_mask")
    assert masks["full_attention"].dim() == 4 and not bool(masks["full_attention"].all())  # static slots, padding
    causal = {k: v.clone() for k, v in masks.items()}  # the canvas made causal: rows differ
    for v in causal.values():
        v[..., -C:] &= torch.ones(C, C, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = [m(decoder_attention_mask=mm, **kw).logits for mm in (masks, causal)]
        with dgplug.patched(m):
            f = torch.compile(m.forward, fullgraph=True)
            out = [f(decoder_attention_mask=mm, **kw).logits for mm in (masks, causal)]
    for a, b in zip(ref, out):
        assert (a - b).abs().max().item() < 1e-4
    assert (ref[0] - ref[1]).abs().max().item() > 0.1  # the two masks do differ
