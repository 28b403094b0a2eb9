"""dgplug's vLLM model class under vLLM's own config objects, layers and weight loader (CPU)."""

import pytest
import torch

from vllm_helpers import build_and_load, build_from_gguf, run_standalone as _run


@pytest.fixture(scope="module")
def dense(vllm_dist):
    return build_and_load(vllm_dist["ckpt"])


def test_constructs_from_vllm_config_and_loads_every_tensor(dense, vllm_dist):
    from safetensors import safe_open
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    model, vc = dense
    assert vc.model_config.architectures == ["DGPlugDiffusionGemmaForBlockDiffusion"]
    assert vc.diffusion_config is not None and vc.diffusion_config.canvas_length == 16  # vLLM's hook ran
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QKVParallelLinear)
    assert isinstance(layer.self_attn.o_proj, RowParallelLinear)
    assert isinstance(layer.mlp.gate_up_proj, MergedColumnParallelLinear)
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding)
    assert type(layer.self_attn.attn).__name__ == "Attention"  # vLLM's attention layer, for the engine
    with safe_open(str(vllm_dist["ckpt"] / "model.safetensors"), "pt") as f:
        ckpt = set(f.keys())
    params = {n for n, _ in model.named_parameters()}
    # load_weights reports every parameter (none missing; vLLM's loader adds the tied lm_head name)
    assert params - model.loaded_names == set()
    assert model.consumed | model.skipped == ckpt  # and every checkpoint tensor was used or skipped
    assert all(n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")) for n in model.skipped)
    # (full-attention layers load k_proj into both the K and V slots; vLLM's CPU linear repacks
    # the weights after loading, so that is checked through the logits below.)


def test_logits_match_transformers(dense, vllm_dist):
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug import ops

    model, vc = dense
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(vllm_dist["ckpt"], dtype=torch.float32,
                                                         experts_implementation="eager").eval()
    V, C = model.tc.vocab_size, model.canvas_length
    g = torch.Generator().manual_seed(1)
    for L in (5, 20):  # shorter and longer than the sliding window (8)
        ids = torch.randint(5, 500, (1, L), generator=g)
        canvas = torch.randint(0, V, (1, C), generator=g)
        sc = torch.randn(1, C, V, generator=g) * 3
        with torch.no_grad():
            ref = hf(input_ids=ids, decoder_input_ids=canvas).logits[0]
            ref_sc = hf(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc).logits[0]
        got = _run(model, vc, ids[0], canvas[0])
        soft = ops.soft_embedding(sc[0], model.model.embed_tokens.weight[:V]) * model.model.normalizer
        got_sc = _run(model, vc, ids[0], canvas[0], soft)
        assert got.dtype == torch.float32 and got.shape == (C, V)
        assert (got - ref).abs().max().item() < 1e-4
        assert (got_sc - ref_sc).abs().max().item() < 1e-4
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_embedded_sudoku_model_loads_and_matches_transformers(vllm_dist):
    """The shipped Sudoku model under vLLM: its full layers keep head_dim 32 (the config vLLM hands
    the plugin has an empty per_layer_config, which was read as 512: "load weight [32] into
    parameter [512]" for every format); logits as transformers' own model on a puzzle prompt."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from dgplug.assets import sudoku_model_path

    path = sudoku_model_path()
    model, vc = build_and_load(path)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32,
                                                         experts_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    puzzle = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    ids = torch.tensor(tok(" ".join(f"r{i // 9 + 1}c{i % 9 + 1}={c}" for i, c in enumerate(puzzle))).input_ids)
    canvas = torch.randint(0, model.tc.vocab_size, (model.canvas_length,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids[None], decoder_input_ids=canvas[None]).logits[0]
    got = _run(model, vc, ids, canvas)
    assert (got - ref).abs().max().item() < 1e-4 and torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_quantized_checkpoint(vllm_dist, scheme):
    """A dgplug-converted checkpoint (int4 / int8 / fp8): experts stay packed (dgplug's MoE dequantises inside),
    linears are dequantised at load; logits equal the dense model built from the dequantised
    weights."""
    import importlib.util

    if importlib.util.find_spec("dgplug.converters.quant") is None:
        pytest.skip("dgplug.converters.quant (the quantized converter) is not in this checkout")
    from dgplug.converters import quant
    from safetensors import safe_open

    src = vllm_dist["ckpt"]
    out = quant.quantize_checkpoint(src, vllm_dist["tmp"] / scheme, scheme, group_size=32, progress=False)
    model, vc = build_and_load(out)
    assert vc.quant_config is not None and vc.quant_config.get_name() == "dgplug"
    files = sorted(out.glob("*.safetensors"))
    ckpt = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            ckpt |= set(h.keys())
    assert any(n.endswith("experts.gate_up_proj.qweight") for n in ckpt)
    assert {n for n, _ in model.named_parameters()} - model.loaded_names == set()
    assert model.consumed | model.skipped == ckpt
    experts = model.model.layers[0].experts
    want = {"int4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
    assert experts.scheme == scheme and experts.gate_up_proj.qweight.dtype == want

    # the reference: the same class, dense, from the dequantised tensors
    dense_dir = vllm_dist["tmp"] / f"{scheme}_dequant"
    _write_dequantised(out, dense_dir, quant)
    ref_model, ref_vc = build_and_load(dense_dir)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 500, (12,), generator=g)
    canvas = torch.randint(0, model.tc.vocab_size, (model.canvas_length,), generator=g)
    a = _run(model, vc, ids, canvas)
    b = _run(ref_model, ref_vc, ids, canvas)
    assert (a - b).abs().max().item() < 1e-4
    if scheme == "int4":  # what load_weights does on CUDA: the fragments nibble order, same logits
        K = experts.gate_up_proj.logical_shape[-1]
        model.int4_experts_for_kernels(any_device=True, block_k=32)
        assert (experts.gate_up_proj.order, experts.gate_up_proj.kpack) == ("fragments", 32), K
        assert torch.equal(_run(model, vc, ids, canvas), a)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_gguf_experts_stay_packed(vllm_dist, quant):
    """GGUF weights through load_weights: the expert stacks stay in their ggml blocks (dgplug's MoE
    decodes them), the rest is dequantised; logits equal the same class loaded with every tensor
    dequantised by gguf-py, up to summation order."""
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.kernels.ggml import GGMLWeight

    path = vllm_dist["tmp"] / f"m-{quant}.gguf"
    if not path.exists():
        export_gguf(vllm_dist["ckpt"], path, quant=quant, progress=False, workers=1)
    models, configs = [], []
    for packed in (True, False):
        model, vc = build_from_gguf(path, vllm_dist["ckpt"], packed=packed)
        assert {n for n, _ in model.named_parameters()} - model.loaded_names - {"lm_head.weight"} == set()
        models.append(model)
        configs.append(vc)
    experts = models[0].model.layers[0].experts
    assert isinstance(experts.gate_up_proj, GGMLWeight) and isinstance(experts.down_proj, GGMLWeight)
    assert torch.equal(experts.gate_up_proj.dequantize(), models[1].model.layers[0].experts.gate_up_proj)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 500, (12,), generator=g)
    canvas = torch.randint(0, models[0].tc.vocab_size, (models[0].canvas_length,), generator=g)
    a, b = (_run(m, c, ids, canvas) for m, c in zip(models, configs))
    assert (a - b).abs().max().item() < 1e-4


def _write_dequantised(qdir, out, quant):
    import json
    import shutil

    from safetensors.torch import save_file

    out.mkdir()
    tensors = {}
    groups = {}
    for f in sorted(qdir.glob("*.safetensors")):
        from safetensors.torch import load_file

        for k, v in load_file(str(f)).items():
            base, _, part = k.rpartition(".")
            if part in ("qweight", "scale", "zero") and base.endswith(("weight", "gate_up_proj", "down_proj")):
                groups.setdefault(base, {})[part] = v
            else:
                tensors[k] = v
    cfg = json.loads((qdir / "config.json").read_text())
    gs = cfg["quantization_config"].get("group_size") or 128
    for base, parts in groups.items():
        tensors[base] = quant.dequantize(dict(parts, group_size=gs)).contiguous()
    del cfg["quantization_config"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (qdir / name).exists():
            shutil.copy(qdir / name, out / name)


def test_fused_sampler_stats_match_vllm_reference(dense):
    """dgplug's fused head + sampler gives vLLM's row statistics (argmax, entropy, the
    self-conditioning soft embedding) from the hidden states, without the logits."""
    sampler_mod = pytest.importorskip("vllm.model_executor.models.diffusion_gemma_sampler")
    from dgplug.integrations.vllm_model import fused_row_stats

    model, vc = dense
    V = model.tc.vocab_size
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2 * 16, model.tc.hidden_size, generator=g)
    E = model.model.embed_tokens.weight[:V]
    temps = torch.tensor([0.8, 0.5])
    logits = model.compute_logits(h)
    am_ref, _, ent_ref, probs = sampler_mod.sample_row_stats_reference(logits, temps, 16, torch.float32)
    am, tok, ent, soft = fused_row_stats(h, E, temps.repeat_interleave(16), softcap=model.final_logit_softcapping,
                                         seed=1, step=1, want_soft=True)
    assert torch.equal(am, am_ref.long())
    assert torch.allclose(ent, ent_ref.float(), atol=1e-4)
    assert torch.allclose(soft, probs.float() @ E.float(), atol=1e-4)
    assert tok.shape == (32,) and int(tok.min()) >= 0 and int(tok.max()) < V


def test_model_state_hook(dense, vllm_diffusion_gemma):
    """get_model_state_cls() gives vLLM's DiffusionGemmaModelState subclass with dgplug's sampler.

    vLLM's module imports its Gemma 4 multimodal stack, which needs torchvision (uninstalled in the
    CPU venv): the vllm_diffusion_gemma fixture stands a placeholder in for transformers'
    Gemma4Processor so the module imports; only the text path is used."""
    model, _ = dense
    dg = vllm_diffusion_gemma
    cls = model.get_model_state_cls()
    assert issubclass(cls, dg.DiffusionGemmaModelState)
    assert cls.prepare_inputs is not dg.DiffusionGemmaModelState.prepare_inputs  # plans the fused step
