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
