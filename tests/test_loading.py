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


def test_not_diffusiongemma(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a DiffusionGemma config.*llama"):
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


def test_image_tokens_rejected(tiny_ckpt):
    m = dgplug.load(tiny_ckpt)
    ids = torch.tensor([[5, 6, m.cfg.image_token_id]])
    with pytest.raises(InputError, match="image tokens"):
        m.generate(ids, max_new_tokens=4, max_denoising_steps=1)


def test_generation_defaults_from_checkpoint(tiny_ckpt):
    m = dgplug.load(tiny_ckpt)
    assert m.generation_defaults["max_denoising_steps"] == 8  # from generation_config.json
    assert m.generation_defaults["entropy_bound"] == 0.1
