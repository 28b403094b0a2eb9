"""transformers loading of dgplug-quantized checkpoints: packed in memory, logits within the scheme's bound."""

import json

import pytest
import torch

from dgplug.testing import probe_inputs as _inputs, probe_logits

from dgplug.converters import quant as Q
from dgplug.integrations.hf_quantizer import PackedExperts, PackedLinear, packed_bytes, register


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from dgplug.testing import make_checkpoint, tiny_text_config

    root = tmp_path_factory.mktemp("hfq")
    text = tiny_text_config(hidden_size=128, intermediate_size=128, moe_intermediate_size=128,
                            head_dim=32, global_head_dim=64)
    src = make_checkpoint(root / "src", text=text, qk_norm_scale=0.25)
    outs = {s: Q.quantize_checkpoint(src, root / s, s, progress=False) for s in ("int4", "int8", "fp8")}
    return src, outs


def _logits(model):
    return probe_logits(model)


@pytest.fixture(scope="module")
def ref_model(ckpts):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(ckpts[0]))


def _dequantized_reference(ref, out):
    """The fp32 model with the dequantised weights put into its state dict (the exact target)."""
    import copy

    m = copy.deepcopy(ref)
    with torch.no_grad():
        for name, v in Q.load_quantized_tensors(out, as_quantized_weight=False).items():
            if isinstance(v, dict):
                m.get_parameter(name).copy_(Q.dequantize(v))
    return m


@pytest.mark.parametrize("scheme,min_cos", [("int4", 0.9), ("int8", 0.98), ("fp8", 0.95)])
def test_from_pretrained_packed(ckpts, ref_model, scheme, min_cos):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert register()
    src, outs = ckpts
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(outs[scheme]))
    dec, enc = m.model.decoder.layers[0], m.model.encoder.language_model.layers[0]
    assert isinstance(dec.mlp.gate_proj, PackedLinear) and isinstance(dec.experts, PackedExperts)
    assert isinstance(enc.self_attn.q_proj, PackedLinear)
    # tied encoder/decoder: one copy of the packed tensors
    assert enc.mlp.down_proj.weight.qweight.data_ptr() == dec.mlp.down_proj.weight.qweight.data_ptr()
    assert enc.experts.gate_up_proj.scale.data_ptr() == dec.experts.gate_up_proj.scale.data_ptr()
    qdt = {"int4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
    assert dec.experts.down_proj.qweight.dtype == qdt
    packed, other = packed_bytes(m)
    ref = ref_model
    dense = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert packed + other < dense * (0.45 if scheme == "int4" else 0.6)
    got = _logits(m)
    exact = _logits(_dequantized_reference(ref, outs[scheme]))
    assert torch.allclose(got, exact, atol=1e-4, rtol=1e-4)  # packed path == dequantised weights
    cos = torch.nn.functional.cosine_similarity(got.flatten(), _logits(ref).flatten(), 0)
    assert cos > min_cos, float(cos)


def test_auto_classes_and_save_reload(ckpts, tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText

    assert register()
    _, outs = ckpts
    m = AutoModelForImageTextToText.from_pretrained(str(outs["int8"]))
    before = _logits(m)
    m.save_pretrained(tmp_path / "again")
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dgplug" and qc["scheme"] == "int8"
    m2 = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "again"))
    assert isinstance(m2.model.decoder.layers[1].mlp.up_proj, PackedLinear)
    assert torch.equal(_logits(m2), before)
    base = AutoModel.from_pretrained(str(outs["int4"]))
    assert isinstance(base.decoder.layers[0].experts, PackedExperts)


def test_generate_runs(ckpts):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert register()
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(ckpts[1]["int4"]))
    ids, _ = _inputs()
    out = m.generate(ids[:1], max_new_tokens=16, max_denoising_steps=2)
    seq = out.sequences if hasattr(out, "sequences") else out
    assert seq.shape[-1] >= ids.shape[1] + 16


def test_embedding_int8_refused(ckpts, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert register()
    src, _ = ckpts
    out = Q.quantize_checkpoint(src, tmp_path / "e", "int8", quantize_embedding=True, progress=False)
    with pytest.raises(ValueError, match="int8 embedding"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(str(out))


def test_dense_weight_kept_on_cuda(ckpts, monkeypatch):
    """On CUDA (forced here) a packed linear keeps its dequantised weight after the first call: one
    copy for the tied encoder/decoder pair, the same logits, and a new copy when the packed tensor
    changes in place."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug.integrations import hf_quantizer as H

    assert register()
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(ckpts[1]["int4"]))
    per_call = _logits(m)
    monkeypatch.setattr(H, "_keep_dense", lambda x: True)
    kept = _logits(m)
    assert torch.equal(kept, per_call)
    dec, enc = m.model.decoder.layers[0], m.model.encoder.language_model.layers[0]
    kept_of = lambda lin: H.dense_copies(lin.weight.qweight)[torch.float32]  # noqa: E731
    assert dec.self_attn.q_proj.weight.qweight is enc.self_attn.q_proj.weight.qweight  # tied: one copy
    assert torch.equal(kept_of(dec.mlp.up_proj), dec.mlp.up_proj.weight.dequantize(torch.float32))
    with torch.no_grad():
        dec.mlp.up_proj.weight.qweight.zero_()  # in place (as load_state_dict copies): not the kept copy
    assert not torch.equal(_logits(m), kept)
    assert torch.equal(kept_of(dec.mlp.up_proj), dec.mlp.up_proj.weight.dequantize(torch.float32))
    # the copy belongs to its tensor, not to an address: another tensor over the same memory (as a
    # new model's weights can land where a freed one's were) makes its own
    q = dec.self_attn.q_proj.weight.qweight
    other = torch.nn.Parameter(q.detach(), requires_grad=False)
    made = H.kept_dense(other, torch.float32, lambda dt: torch.zeros(1))
    assert other.data_ptr() == q.data_ptr() and made is not kept_of(dec.self_attn.q_proj)
    monkeypatch.setattr(H, "_keep_dense", lambda x: False)  # off CUDA again: the kept copies go
    _logits(m)
    assert H.dense_copies(q) == {}
