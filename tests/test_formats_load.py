"""dgplug.load on GGUF files and dgplug-quantized directories: logits within each type's bound of
the safetensors checkpoint they came from (F32 GGUF: exact); quantized weights stay packed."""

import pytest
import torch

import dgplug
from dgplug.converters.gguf_export import export_gguf
from dgplug.converters.quant import quantize_checkpoint
from dgplug.kernels.moe import QuantizedWeight
from dgplug.testing import make_checkpoint, tiny_text_config

# mean KL(reference || loaded) of the next-step distribution bounds, measured x ~2.5 (smooth tiny model)
BOUNDS = {"F32": 1e-6, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_K_M": 6e-2, "Q6_K": 3e-2,
          "int8": 5e-3, "fp8": 3e-2, "int4": 0.15}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tc = tiny_text_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64,
                          global_head_dim=128, vocab_size=512)
    return make_checkpoint(tmp_path_factory.mktemp("fmt") / "src", text=tc, qk_norm_scale=0.25)


@pytest.fixture(scope="module")
def reference(src):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 12), generator=g)
    canvas = torch.randint(0, 512, (2, 16), generator=g)
    return ids, canvas, dgplug.load(src)(input_ids=ids, decoder_input_ids=canvas).logits


def _realign(model):
    for p in model.parameters():
        p.data = p.data.clone()  # fresh, 64-byte aligned storage


def _compare(model, reference):
    ids, canvas, ref = reference
    got = model(input_ids=ids, decoder_input_ids=canvas).logits
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return got, kl, agree


@pytest.mark.parametrize("quant", ["F32", "BF16", "Q8_0", "Q4_K_M", "Q6_K"])
def test_gguf_load(src, reference, tmp_path, quant):
    out = tmp_path / f"m-{quant}.gguf"
    export_gguf(src, out, quant=quant, progress=False)
    model = dgplug.load(out)
    assert dgplug.load(tmp_path).cfg.text == model.cfg.text  # a directory holding one .gguf
    got, kl, agree = _compare(model, reference)
    if quant == "F32":
        # the weights are bit-identical; logits too once both sit at the same memory alignment
        # (CPU BLAS rounding depends on operand alignment, and each file has its own layout)
        ref_model = dgplug.load(src)
        for m in (model, ref_model):
            _realign(m)
        for (na, pa), (nb, pb) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
        ids, canvas, _ = reference
        assert torch.equal(model(input_ids=ids, decoder_input_ids=canvas).logits,
                           ref_model(input_ids=ids, decoder_input_ids=canvas).logits)
    assert kl <= BOUNDS[quant] and agree >= 0.95
    assert model.tokenizer is not None and model.tokenizer.decode([5]).strip() == "w5"


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4"])
def test_quantized_load(src, reference, tmp_path, scheme):
    out = tmp_path / scheme
    quantize_checkpoint(src, out, scheme, progress=False)
    model = dgplug.load(out)
    _, kl, agree = _compare(model, reference)
    assert kl <= BOUNDS[scheme] and agree >= 0.95
    layer = model.layers[0]
    for w in (layer.experts.gate_up_proj, layer.experts.down_proj, layer.mlp.gate_proj.weight,
              layer.self_attn.q_proj.weight):
        assert isinstance(w, QuantizedWeight) and w.scheme == scheme  # packed in memory
    assert isinstance(model.embed_tokens.weight, torch.Tensor)  # the tied table stays in its dtype
    packed = sum(w.nbytes for m in model.layers for w in (m.experts.gate_up_proj, m.experts.down_proj))
    dense = sum(w.qweight.numel() * (2 if scheme == "int4" else 1) * 4 for m in model.layers
                for w in (m.experts.gate_up_proj, m.experts.down_proj))
    assert packed < dense / (3.5 if scheme != "int4" else 7)  # vs fp32 experts
    out2 = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, max_denoising_steps=2, seed=0)
    assert out2.sequences.shape == (1, 19)


def test_packed_tensors_in_their_gpu_form(src, reference, tmp_path, monkeypatch):
    """What dgplug.load does to a dgplug int4 checkpoint's packed tensors on CUDA (here forced on the
    CPU): experts in the fragments nibble order, linears dequantised once; the same logits as
    packed, and DGPLUG_INT4_ORDER=pairs / DGPLUG_PACKED_LINEARS=1 keep the file's forms."""
    from dgplug import loader

    out = tmp_path / "int4"
    quantize_checkpoint(src, out, "int4", progress=False)
    as_file = dgplug.load(out)
    monkeypatch.setattr(loader, "_gpu_form_wanted", lambda t: True)
    gpu_form = dgplug.load(out)
    layer = gpu_form.layers[0]
    assert (layer.experts.gate_up_proj.order, layer.experts.gate_up_proj.kpack) == ("fragments", 128)
    assert (layer.experts.down_proj.order, layer.experts.down_proj.kpack) == ("fragments", 64)
    for w in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight, gpu_form.self_conditioning.up_proj.weight):
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert torch.equal(layer.self_attn.q_proj.weight, as_file.layers[0].self_attn.q_proj.weight.dequantize())
    ids, canvas, _ = reference
    a = as_file(input_ids=ids, decoder_input_ids=canvas).logits
    b = gpu_form(input_ids=ids, decoder_input_ids=canvas).logits
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    monkeypatch.setenv("DGPLUG_INT4_ORDER", "pairs")
    monkeypatch.setenv("DGPLUG_PACKED_LINEARS", "1")
    kept = dgplug.load(out).layers[0]
    assert kept.experts.gate_up_proj.order == "pairs" and isinstance(kept.self_attn.q_proj.weight, QuantizedWeight)


def test_gguf_in_its_gpu_form(src, reference, tmp_path, monkeypatch):
    """What dgplug.load does to a GGUF's packed tensors on CUDA (forced here on the CPU): linears and
    the tied table dequantised once, in the dtype they serve; experts keep their ggml blocks; the
    same logits as packed (same decode, a matmul instead of chunked ones); DGPLUG_PACKED_LINEARS=1
    keeps the file's forms."""
    from dgplug import loader
    from dgplug.kernels.ggml import GGMLWeight

    out = tmp_path / "m-Q4_K_M.gguf"
    export_gguf(src, out, quant="Q4_K_M", progress=False)
    packed = dgplug.load(out)
    monkeypatch.setattr(loader, "_gpu_form_wanted", lambda t: True)
    gpu_form = dgplug.load(out)
    layer, kept_layer = gpu_form.layers[0], packed.layers[0]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        w, p = layer.get_submodule(name).weight, kept_layer.get_submodule(name).weight
        assert isinstance(p, GGMLWeight) and isinstance(w, torch.Tensor) and w.dtype == torch.float32
        assert torch.equal(w, p.dequantize())
    assert isinstance(gpu_form.self_conditioning.gate_proj.weight, torch.Tensor)
    table = gpu_form.embed_tokens.weight
    assert isinstance(table, torch.Tensor) and torch.equal(table, packed.embed_tokens.weight.dequantize())
    assert isinstance(layer.experts.gate_up_proj, GGMLWeight) and isinstance(layer.experts.down_proj, GGMLWeight)
    ids, canvas, _ = reference
    a = packed(input_ids=ids, decoder_input_ids=canvas).logits
    b = gpu_form(input_ids=ids, decoder_input_ids=canvas).logits
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
    monkeypatch.setenv("DGPLUG_PACKED_LINEARS", "1")
    kept = dgplug.load(out)
    assert isinstance(kept.layers[0].self_attn.q_proj.weight, GGMLWeight) and isinstance(kept.embed_tokens.weight, GGMLWeight)


def test_gguf_dtype_by_device():
    """A GGUF has no dtype of its own: fp32 on the CPU, bf16 on a GPU unless asked (no GPU needed to
    name one)."""
    from dgplug.loader import gguf_dtype

    assert gguf_dtype(None) is None and gguf_dtype("cpu") is None
    assert gguf_dtype("cuda") == torch.bfloat16 and gguf_dtype(torch.device("cuda", 0)) == torch.bfloat16
