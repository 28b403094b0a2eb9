"""transformers loading diffusion-gemma GGUF files after `import dgplug`:
`from_pretrained(dir, gguf_file=...)` gives the safetensors model (F32: bit-exact weights) or the
Q8_0-dequantised one, through transformers' own GGUF path."""

import numpy as np
import pytest
import torch

from dgplug.testing import probe_inputs as _inputs, probe_logits

import dgplug  # noqa: F401 - registers the GGUF hook
from dgplug.integrations import gguf_transformers as gt

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not gt.register(),
                                reason=f"transformers {transformers.__version__} cannot take the GGUF hook")
pytest.importorskip("accelerate")  # transformers refuses gguf_file= without it

# Q8_0 vs the safetensors model: mean KL of the next-token distributions (measured 2.1e-3; the same
# bound dgplug.load has for Q8_0 in test_formats_load), argmax agreement, logit cosine (0.9975)
Q8_0_KL, Q8_0_AGREE, Q8_0_COS = 3e-2, 0.95, 0.99


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.testing import make_checkpoint, tiny_text_config

    root = tmp_path_factory.mktemp("gguf_tf")
    text = tiny_text_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64,
                            global_head_dim=128)
    src = make_checkpoint(root / "src", text=text, qk_norm_scale=0.25)
    out = root / "gguf"
    out.mkdir()
    for q in ("F32", "Q8_0", "Q4_K_M", "Q2_K", "IQ4_XS"):
        export_gguf(src, out / f"model-{q}.gguf", quant=q, progress=False, workers=1)
    return src, out


@pytest.fixture(scope="module")
def reference(files):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[0]))


def _logits(model):
    return probe_logits(model)


def _text_state(model):
    return {k: v for k, v in model.state_dict().items() if "vision" not in k}


def test_registered_and_version_guard():
    from transformers import modeling_gguf_pytorch_utils as mg

    assert gt.register() and gt.register()  # idempotent
    assert mg.load_gguf_checkpoint is gt.load_gguf_checkpoint
    assert gt.supported_version("5.19.0") and gt.supported_version("5.25.0") and gt.supported_version("5.25.1.dev0")
    assert not gt.supported_version("5.18.2") and not gt.supported_version("5.26.0")


def test_newer_transformers_hooked_with_one_warning(files, reference, monkeypatch):
    """A release newer than the last checked one still loads a diffusion-gemma GGUF (it went to
    transformers' own loader, which does not know the architecture), warning once; one whose
    `load_gguf_checkpoint` no longer takes `model_to_load` is left alone."""
    import sys
    import warnings

    from transformers import DiffusionGemmaForBlockDiffusion, modeling_gguf_pytorch_utils as mg

    src, out = files
    tf = sys.modules["transformers"]  # importing the model classes can leave a new module object there
    monkeypatch.setattr(tf, "__version__", "5.99.0")
    monkeypatch.setattr(mg, "load_gguf_checkpoint", gt._ORIGINAL)
    assert gt.register() and mg.load_gguf_checkpoint is gt.load_gguf_checkpoint
    with pytest.warns(UserWarning, match="transformers 5.99.0 is newer"):
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out), gguf_file="model-F32.gguf")
    ref, got = _text_state(reference), _text_state(model)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffusionGemmaForBlockDiffusion.from_pretrained(str(out), gguf_file="model-F32.gguf")

    def changed(path, return_tensors=False):  # a future signature without model_to_load
        return {}

    monkeypatch.setattr(mg, "load_gguf_checkpoint", changed)
    assert not gt.register() and mg.load_gguf_checkpoint is changed
    monkeypatch.setattr(tf, "__version__", "5.18.0")
    assert not gt.register()


def test_config_from_gguf(files, reference):
    from transformers import AutoConfig

    src, out = files
    cfg = AutoConfig.from_pretrained(str(out), gguf_file="model-F32.gguf")
    assert type(cfg).__name__ == "DiffusionGemmaConfig"
    assert cfg.canvas_length == reference.config.canvas_length
    a, b = reference.config.text_config, cfg.text_config
    assert a.final_logit_softcapping == b.final_logit_softcapping  # a class default: absent from to_dict
    skip = ("final_logit_softcapping", "dtype")  # dtype: set on the loaded reference model only
    assert {k: v for k, v in a.to_dict().items() if k not in skip} == {k: v for k, v in b.to_dict().items()
                                                                        if k not in skip}


def test_f32_bit_exact(files, reference):
    from transformers import DiffusionGemmaForBlockDiffusion

    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), gguf_file="model-F32.gguf")
    assert m.dtype == torch.float32
    ref, got = _text_state(reference), _text_state(m)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # decoder, tied encoder, encoder layer scalars
    dec, enc = m.model.decoder.layers[0], m.model.encoder.language_model.layers[0]
    assert enc.mlp.down_proj.weight.data_ptr() == dec.mlp.down_proj.weight.data_ptr()  # tied, one copy
    # bit-identical weights; the last ulps of CPU matmuls still depend on buffer alignment
    assert torch.allclose(_logits(m), _logits(reference), atol=1e-5, rtol=0)


def test_q8_0_auto_class_and_generate(files, reference):
    from transformers import AutoModelForImageTextToText, DiffusionGemmaForBlockDiffusion

    from dgplug.converters.gguf_import import iter_hf_tensors

    path = files[1] / "model-Q8_0.gguf"
    m = AutoModelForImageTextToText.from_pretrained(str(files[1]), gguf_file=path.name)
    assert isinstance(m, DiffusionGemmaForBlockDiffusion)
    # no vision weights in a GGUF: a one-layer placeholder tower, not transformers' default (168M random parameters)
    assert sum(p.numel() for n, p in m.named_parameters() if "vision" in n) < 10**6
    got = _text_state(m)
    deq = dict(iter_hf_tensors(path))
    packed = {k for k, v in deq.items() if k.replace(".weight", "") + ".blocks" in got or k + ".blocks" in got}
    assert len(packed) > 10  # the Q8_0 weights stayed packed; every other tensor = gguf-py's dequantisation
    assert all(torch.equal(got[k], v) for k, v in deq.items() if k not in packed)

    a, b = _logits(reference), _logits(m)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    assert kl <= Q8_0_KL, kl
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= Q8_0_AGREE
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)) > Q8_0_COS

    # the sampler defaults stored under diffusion.* (make_checkpoint: 8 steps, canvas 16)
    assert m.generation_config.max_denoising_steps == 8 and m.generation_config.max_new_tokens == 16
    ids, _ = _inputs()
    out = m.generate(input_ids=ids[:1], max_new_tokens=16, max_denoising_steps=2)
    seq = out.sequences if hasattr(out, "sequences") else out
    assert seq.shape == (1, 12 + 16) and torch.equal(seq[:, :12], ids[:1])
    assert int(seq.max()) < m.config.text_config.vocab_size


def _dequantised_reference(files, path):
    """transformers' own model (eager experts) holding gguf-py's dequantisation of the file at `path`."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug.converters.gguf_import import iter_hf_tensors

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[0]), experts_implementation="eager")
    missing, unexpected = ref.load_state_dict(dict(iter_hf_tensors(path)), strict=False)
    assert not unexpected and all("vision" in k or "encoder" in k or k == "lm_head.weight" for k in missing)
    assert ref.model.encoder.language_model.layers[0].mlp.up_proj.weight is ref.model.decoder.layers[0].mlp.up_proj.weight
    return ref.eval()


@pytest.mark.parametrize("quant,base,down", [("Q4_K_M", "Q4_K", "Q6_K"), ("Q2_K", "Q2_K", "Q3_K"),
                                            ("IQ4_XS", "IQ4_XS", "IQ4_XS")])
def test_k_quants_stay_packed(files, reference, quant, base, down):
    """Q4_K_M, Q2_K and IQ4_XS through from_pretrained: linears, experts and the tied embedding / head keep their
    ggml blocks (one copy, shared by the encoder and lm_head); logits equal transformers' own model
    holding the same file dequantised (gguf-py), up to summation order."""
    from gguf import GGMLQuantizationType as T
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug.kernels.ggml import GGMLWeight

    path = files[1] / f"model-{quant}.gguf"
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), gguf_file=path.name)
    dec, enc = m.model.decoder, m.model.encoder.language_model
    assert isinstance(dec.embed_tokens.weight, GGMLWeight) and dec.embed_tokens.weight.qtype == T.Q6_K
    assert enc.embed_tokens.blocks is dec.embed_tokens.blocks and m.lm_head.blocks is dec.embed_tokens.blocks
    assert enc.layers[1].self_attn.q_proj.blocks is dec.layers[1].self_attn.q_proj.blocks
    assert dec.layers[0].experts.gate_up_proj.weight.qtype == T[base]
    assert dec.layers[3].experts.down_proj.weight.qtype == T[down]  # a use_more_bits layer (Q4_K_M)
    assert dec.self_conditioning.gate_proj.weight.qtype == T[base]
    assert dec.embed_tokens.blocks.dtype == torch.uint8 and dec.embed_tokens.blocks.device.type == "cpu"

    ref = _dequantised_reference(files, path)
    ids, canvas = _inputs()
    sc = torch.randn(ids.shape[0], canvas.shape[1], 512, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        a = m(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        b = ref(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    assert (a - b).abs().max().item() <= 1e-4
    out = m.generate(input_ids=ids[:1], max_new_tokens=16, max_denoising_steps=2)
    seq = out.sequences if hasattr(out, "sequences") else out
    assert seq.shape == (1, 12 + 16) and torch.equal(seq[:, :12], ids[:1])


def test_bare_auto_model_from_packed_gguf(files):
    """AutoModel (DiffusionGemmaModel, no `model.` prefix, no lm_head) on a Q4_K_M file: the weights
    stay packed and tied as in the full model (the swap used the checkpoint's `model.` names and
    failed with "DiffusionGemmaModel has no attribute `model`"); its hidden states equal the full
    model's inner `.model` on the same file, and transformers' own model holding gguf-py's
    dequantisation of it up to summation order."""
    from transformers import AutoModel, DiffusionGemmaForBlockDiffusion, DiffusionGemmaModel

    from dgplug.kernels.ggml import GGMLWeight

    bare = AutoModel.from_pretrained(str(files[1]), gguf_file="model-Q4_K_M.gguf")
    full = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), gguf_file="model-Q4_K_M.gguf")
    assert type(bare) is DiffusionGemmaModel
    dec, enc = bare.decoder, bare.encoder.language_model
    assert isinstance(dec.layers[0].experts.gate_up_proj.weight, GGMLWeight)
    assert enc.embed_tokens.blocks is dec.embed_tokens.blocks
    assert enc.layers[1].self_attn.q_proj.blocks is dec.layers[1].self_attn.q_proj.blocks
    ids, canvas = _inputs()
    with torch.no_grad():
        a = bare(input_ids=ids, decoder_input_ids=canvas).last_hidden_state
        b = full.model(input_ids=ids, decoder_input_ids=canvas).last_hidden_state
        ref = _dequantised_reference(files, files[1] / "model-Q4_K_M.gguf").model(
            input_ids=ids, decoder_input_ids=canvas).last_hidden_state
    assert torch.equal(a, b)
    assert (a - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_packed_gguf_model_follows_to_dtype(files):
    """`.to(torch.bfloat16)` on a model with packed GGUF weights: the blocks stay uint8 and serve
    bf16, as a float weight would move (they kept serving fp32, and the router's bf16 matmul met
    an fp32 activation: "expected m1 and m2 to have the same dtype"); its logits are as near those
    of transformers' own fp32 model holding gguf-py's dequantisation as the logits of the same file
    loaded with dtype=torch.bfloat16 are."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = dict(gguf_file="model-Q8_0.gguf")
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), **path)
    ids, canvas = _inputs()
    with torch.no_grad():
        ref = _dequantised_reference(files, files[1] / path["gguf_file"])(input_ids=ids, decoder_input_ids=canvas).logits
        m = m.to(torch.bfloat16)
        direct = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), dtype=torch.bfloat16, **path)
        a = m(input_ids=ids, decoder_input_ids=canvas).logits.float()
        b = direct(input_ids=ids, decoder_input_ids=canvas).logits.float()
    q = m.model.decoder.layers[0].self_attn.q_proj
    assert q.blocks.dtype == torch.uint8 and q.weight.dtype == torch.bfloat16
    assert m.model.decoder.embed_tokens(ids).dtype == torch.bfloat16
    ea, eb = (a - ref).abs().max().item(), (b - ref).abs().max().item()
    assert ea <= 2 * eb + 1e-3, (ea, eb)
    out = m.generate(input_ids=ids[:1], max_new_tokens=16, max_denoising_steps=2)
    assert (out.sequences if hasattr(out, "sequences") else out).shape == (1, 12 + 16)


def test_tokenizer_from_gguf(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files[1]), gguf_file="model-F32.gguf")
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.convert_tokens_to_ids(["<mask>", "w7"]) == [4, 7]


def test_word_level_tokenizer_from_gguf(tmp_path):
    """AutoTokenizer from the embedded Sudoku model's GGUF (a WordLevel vocabulary, no merges) gives
    the ids of the model's own directory, <bos> included; transformers' gemma4 builder had read
    its tokens as sentencepiece pieces (486 ids of <unk> and digits for one puzzle, not 82)."""
    from transformers import AutoTokenizer

    from dgplug.assets import sudoku_model_path
    from dgplug.converters.gguf_export import export_gguf

    src = sudoku_model_path()
    export_gguf(src, tmp_path / "sudoku.gguf", quant="Q8_0", progress=False, workers=1)
    want, got = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(tmp_path),
                                                                                      gguf_file="sudoku.gguf")
    text = " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={'5' if i % 7 else '.'}" for i in range(81))
    ids = got(text).input_ids
    assert ids == want(text).input_ids and len(ids) == 82 and ids[0] == want.bos_token_id
    assert got.decode(ids[1:4]) == want.decode(ids[1:4])


def test_other_architectures_go_to_transformers(tmp_path):
    from gguf import GGUFWriter
    from transformers import modeling_gguf_pytorch_utils as mg

    path = tmp_path / "llama.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_vocab_size(4)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = mg.load_gguf_checkpoint(str(path))["config"]
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 8


def test_dense_weights_kept_on_cuda(files, monkeypatch):
    """On CUDA (forced here) the GGUF linears and the tied table keep their dequantised weight after
    the first use: one copy for the encoder, decoder and lm_head; experts keep their blocks; the
    logits and tokens as decoded per call."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug.integrations import hf_quantizer as H
    from dgplug.kernels.ggml import GGMLWeight

    path = files[1] / "model-Q4_K_M.gguf"
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(files[1]), gguf_file=path.name)
    ids, _ = _inputs()
    per_call = _logits(m)
    torch.manual_seed(3)  # transformers' sampler draws from the global generator
    seq = m.generate(input_ids=ids[:1], max_new_tokens=16, max_denoising_steps=2)
    monkeypatch.setattr(H, "_keep_dense", lambda x: True)
    kept = _logits(m)
    torch.testing.assert_close(kept, per_call, rtol=1e-5, atol=1e-5)
    dec, enc = m.model.decoder, m.model.encoder.language_model
    table = dec.embed_tokens.weight
    assert isinstance(table, torch.Tensor) and table is enc.embed_tokens.weight and table is m.lm_head.weight
    assert torch.equal(table, dec.embed_tokens.packed.dequantize())
    assert list(H.dense_copies(dec.embed_tokens.blocks)) == [torch.float32]  # one copy for all three
    q = dec.layers[1].self_attn.q_proj
    assert q.blocks is enc.layers[1].self_attn.q_proj.blocks
    assert torch.equal(H.dense_copies(q.blocks)[torch.float32], q.packed.dequantize(torch.float32))
    assert isinstance(dec.layers[0].experts.gate_up_proj.weight, GGMLWeight)
    torch.manual_seed(3)
    again = m.generate(input_ids=ids[:1], max_new_tokens=16, max_denoising_steps=2)
    assert torch.equal(getattr(again, "sequences", again), getattr(seq, "sequences", seq))
