"""Loading: lazy sharded safetensors, name mapping, and one clear error per bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgplug
from dgplug.errors import CheckpointError, InputError
from dgplug.testing import make_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint written by transformers in several shards with an index."""
    return make_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", max_shard_size="200KB")


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_loads_and_matches_single_file(sharded, tiny_ckpt):
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = dgplug.load(sharded), dgplug.load(tiny_ckpt)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    # the encoder's own layer scalars are read from their own tensors
    assert a.encoder_layer_scalar.shape == (a.tc.num_hidden_layers,)


def test_dtype_argument(tiny_ckpt):
    m = dgplug.load(tiny_ckpt, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    with pytest.raises(CheckpointError, match="dtype 'int3'"):
        dgplug.load(tiny_ckpt, dtype="int3")
    # transformers' spellings; None and "auto" keep the checkpoint's own (fp32 here)
    for name, want in (("torch.float16", torch.float16), ("BF16", torch.bfloat16), ("auto", torch.float32)):
        assert next(dgplug.load(tiny_ckpt, dtype=name).parameters()).dtype == want, name
    for bad in (torch.int8, torch.float64, "float64"):  # accepted before, then failed inside generate
        with pytest.raises(CheckpointError, match="computes in float32, bfloat16 or float16"):
            dgplug.load(tiny_ckpt, dtype=bad)
    with pytest.raises(CheckpointError, match="device 'gpu0'"):
        dgplug.load(tiny_ckpt, device="gpu0")
    if not torch.cuda.is_available():  # was a bare AssertionError from torch
        with pytest.raises(CheckpointError, match="device 'cuda': .* sees no CUDA device"):
            dgplug.load(tiny_ckpt, device="cuda")


def test_not_diffusiongemma(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a DiffusionGemma config.*llama"):
        dgplug.load(d)


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_last_layer_is_full_as_in_transformers(tiny_ckpt, tmp_path):
    """A config.json whose last layer says sliding: transformers makes it full (with a warning) and
    loads the checkpoint; dgplug did not ("missing tensor ...layers.3.self_attn.v_proj.weight")."""
    from transformers import DiffusionGemmaForBlockDiffusion

    d = _copy(tiny_ckpt, tmp_path)
    _edit_config(d, lambda c: c["text_config"]["layer_types"].__setitem__(-1, "sliding_attention"))
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(d, experts_implementation="eager").eval()
    dg = dgplug.load(d)
    assert dg.tc.layer_types == hf.config.text_config.layer_types
    ids, canvas = torch.randint(5, 500, (1, 12)), torch.randint(0, 512, (1, dg.cfg.canvas_length))
    with torch.no_grad():
        a = hf(input_ids=ids, decoder_input_ids=canvas).logits
        b = dg(input_ids=ids, decoder_input_ids=canvas).logits
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("key, where, value", [("tie_word_embeddings", None, False),
                                               ("attention_bias", "text_config", True)])
def test_unsupported_config_options_named(tiny_ckpt, tmp_path, key, where, value):
    """Options that change the weights dgplug would not read (untied encoder/decoder/lm_head, biases):
    one error naming the option, not a model that ignores it or a complaint about tensors."""
    d = _copy(tiny_ckpt, tmp_path)
    _edit_config(d, lambda c: (c[where] if where else c).__setitem__(key, value))
    with pytest.raises(CheckpointError, match=f"{key}=.* is not supported"):
        dgplug.load(d)


def _rewrite(d, fn):
    f = d / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    _rewrite(d, lambda t: t.pop("model.decoder.layers.1.router.scale"))
    with pytest.raises(CheckpointError, match="missing tensor model.decoder.layers.1.router.scale"):
        dgplug.load(d)


def test_extra_tensor(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    _rewrite(d, lambda t: t.update({"model.decoder.layers.0.bogus.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.decoder.layers.0.bogus.weight"):
        dgplug.load(d)


def test_misshaped_tensor(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    name = "model.decoder.layers.2.self_attn.q_proj.weight"
    _rewrite(d, lambda t: t.update({name: torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match=f"{name} has shape \\[5, 64\\], expected"):
        dgplug.load(d)


def test_nan_weight(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    name = "model.decoder.layers.3.mlp.up_proj.weight"

    def poison(t):
        t[name][0, 0] = float("nan")

    _rewrite(d, poison)
    with pytest.raises(CheckpointError, match=f"{name} holds NaN"):
        dgplug.load(d)


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dgplug.load(d)


def test_shard_missing_from_index(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is listed but missing"):
        dgplug.load(d)


def test_tensor_missing_from_listed_shard(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.decoder.norm.weight"
    other = next(s for s in sorted(set(idx["weight_map"].values())) if s != idx["weight_map"][name])
    idx["weight_map"][name] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"{name} listed in the index is not in the shard"):
        dgplug.load(d)


def test_one_reading_of_a_checkpoint_directory(sharded, tiny_ckpt, tmp_path):
    """load, both converters and `info` find a directory's tensors through one reader
    (dgplug.checkpoint.read_index), so they agree on what a checkpoint is: shards without their
    index are refused by all four (load used to take them, convert did not), and a tensor whose
    bytes disagree with its header's shape is named by all four."""
    from typer.testing import CliRunner

    from dgplug.cli import app
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.converters.quant import quantize_checkpoint

    def refusals(d, out):
        errs = []
        for name, call in (("load", lambda: dgplug.load(d)),
                           ("int4", lambda: quantize_checkpoint(d, out / "q", "int4")),
                           ("gguf", lambda: export_gguf(d, out / "m.gguf", quant="Q8_0", progress=False))):
            with pytest.raises(CheckpointError) as e:
                call()
            errs.append((name, str(e.value)))
        r = CliRunner().invoke(app, ["info", str(d)])
        assert r.exit_code == 1, r.output
        errs.append(("info", " ".join(r.output.split())))
        assert not list(out.iterdir()), list(out.iterdir())  # nothing written
        return errs

    d = _copy(sharded, tmp_path)
    (d / "model.safetensors.index.json").unlink()
    (tmp_path / "o1").mkdir()
    for name, msg in refusals(d, tmp_path / "o1"):
        assert "no model.safetensors or model.safetensors.index.json" in msg and "without an index" in msg, (name, msg)

    d2 = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, d2)
    f = d2 / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    victim = "model.decoder.norm.weight"
    header[victim]["shape"] = [header[victim]["shape"][0] // 2]  # half the elements its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    f.write_bytes(raw[:8] + text + raw[8 + n:])
    (tmp_path / "o2").mkdir()
    for name, msg in refusals(d2, tmp_path / "o2"):
        assert str(f) in msg and victim in msg and "bytes for shape" in msg, (name, msg)


def test_image_tokens_rejected(tiny_ckpt):
    m = dgplug.load(tiny_ckpt)
    ids = torch.tensor([[5, 6, m.cfg.image_token_id]])
    with pytest.raises(InputError, match="image tokens"):
        m.generate(ids, max_new_tokens=4, max_denoising_steps=1)


def test_generation_defaults_from_checkpoint(tiny_ckpt):
    m = dgplug.load(tiny_ckpt)
    assert m.generation_defaults["max_denoising_steps"] == 8  # from generation_config.json
    assert m.generation_defaults["entropy_bound"] == 0.1


def test_config_as_transformers_hands_it():
    """transformers' own parse of a config (what vLLM hands the plugin) gives dgplug the layer
    shapes that transformers' model builds: the Sudoku model's full layers keep head_dim 32, where
    to_dict() leaves an empty per_layer_config and no global_head_dim (512 was read, and vLLM's
    load of the embedded model failed on every format: "load weight [32] into parameter [512]")."""
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion

    from dgplug.assets import sudoku_model_path
    from dgplug.config import from_dict

    path = sudoku_model_path()
    parsed = AutoConfig.from_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    dims = [from_dict(parsed.to_dict()).text.layer_dims(i) for i in range(parsed.text_config.num_hidden_layers)]
    assert dims == [from_dict(raw).text.layer_dims(i) for i in range(len(dims))]
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(parsed)
    assert [(a.self_attn.head_dim, a.self_attn.k_proj.out_features // a.self_attn.head_dim)
            for a in ref.model.decoder.layers] == dims
