"""Quantized safetensors: round trips, packing order, quantize_checkpoint output and bad input."""

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dgplug.converters import quant as Q
from dgplug.errors import CheckpointError, DGPlugError, InputError
from dgplug.names import is_vision


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    m = torch.rand(shape, generator=g) < 2e-3
    w = torch.where(m, w * 12, w)  # outliers
    w[..., :128] = w[..., :128].abs()  # an all-positive group: the range must still include 0
    w[..., 128:256] = 0.0  # an all-zero group
    return w


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["asym", "sym"])
def test_int4_round_trip_bound(mode):
    w = _weights((3, 64, 512))  # experts-shaped
    q, s, z = Q.quantize_int4(w, 128, mode)
    assert q.dtype == torch.uint8 and q.shape == (3, 64, 256)
    assert s.dtype == torch.float16 and s.shape == (3, 64, 4)
    assert z.dtype == torch.uint8 and z.shape == (3, 64, 4) and int(z.max()) <= 15
    if mode == "sym":
        assert bool((z == 8).all())
    deq = Q.dequantize_int4(q, s, z)
    bound = s.float().abs().repeat_interleave(128, -1) / 2
    assert bool(((deq - w).abs() <= bound * (1 + 1e-6) + w.abs() * 4e-7).all())
    assert bool((deq[..., 128:256] == 0).all())


def test_int4_asym_beats_sym_and_clip_helps():
    w = _weights((256, 1024), seed=1)
    err = {}
    for mode, clip in (("sym", False), ("sym8", False), ("asym", False), ("asym", True)):
        deq = Q.dequantize_int4(*Q.quantize_int4(w, 128, mode, clip))
        err[(mode, clip)] = float((deq - w).square().sum())
    assert err[("asym", False)] < err[("sym8", False)] < err[("sym", False)]
    assert err[("asym", True)] < err[("asym", False)]


def test_int8_round_trip_bound():
    w = _weights((5, 32, 256))
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (5, 32)
    deq = Q.dequantize_int8(q, s)
    assert bool(((deq - w).abs() <= s.unsqueeze(-1) / 2 * (1 + 1e-6) + w.abs() * 4e-7).all())
    assert bool((q.abs() <= 127).all())


def test_fp8_round_trip_bound():
    w = _weights((5, 32, 256))
    q, s = Q.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (5, 32)
    deq = Q.dequantize_fp8(q, s)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 * scale
    bound = torch.maximum(w.abs() / 16, s.unsqueeze(-1) * 2.0**-10) * (1 + 1e-6)
    assert bool(((deq - w).abs() <= bound + w.abs() * 4e-7).all())
    assert torch.allclose(deq.abs().amax(-1), w.abs().amax(-1), rtol=1e-6)


def test_int4_packing_order_hand_built():
    q = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    p = Q.pack_int4(q)
    assert p.tolist() == [[0x21, 0x43, 0x0F]]  # element 2j low nibble, 2j+1 high nibble
    assert Q.unpack_int4(p).tolist() == q.tolist()
    # a hand-built group: min -1, max 2 -> scale 0.2, zero 5; w = (q - zero) * scale
    w = torch.tensor([[-1.0, 2.0, 0.0, 0.2] * 2])
    qw, s, z = Q.quantize_int4(w, 8)
    assert float(s[0, 0]) == pytest.approx(0.2, rel=1e-3) and int(z[0, 0]) == 5
    assert qw[0, 0].item() == (0 | (15 << 4)) and qw[0, 1].item() == (5 | (6 << 4))


def test_int4_short_last_group_and_kernel_contract():
    # the released checkpoint has K = 704 (expert down) and 2112 (dense down): 128 does not divide
    # them, so the last group of a row is short (ceil(K/g) groups), as dgplug/kernels/moe.py reads it
    w = _weights((2, 16, 704))
    q, s, z = Q.quantize_int4(w, 128)
    assert q.shape == (2, 16, 352) and s.shape == (2, 16, 6) and z.shape == (2, 16, 6)
    deq = Q.dequantize_int4(q, s, z, 128)
    bound = s.float().repeat_interleave(128, -1)[..., :704] / 2
    assert bool(((deq - w).abs() <= bound * (1 + 1e-6) + w.abs() * 4e-7).all())
    with pytest.raises(InputError, match="pass group_size"):
        Q.dequantize_int4(q, s, z)
    with pytest.raises(InputError, match="positive even"):
        Q.quantize_int4(w, 33)
    try:
        from dgplug.kernels.moe import QuantizedWeight
    except ImportError:
        return
    for scheme in ("int4", "int8", "fp8"):
        parts = Q.quantize(w, scheme, 128)
        qw = QuantizedWeight(scheme, parts["qweight"], parts["scale"], parts.get("zero"), 128)
        assert torch.equal(qw.dequantize(), Q.dequantize(dict(parts, group_size=128)))


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def src_ckpt(tmp_path_factory):
    from dgplug.testing import make_checkpoint, tiny_text_config

    # head_dim 32 / global 64 so that o_proj's K (heads * head_dim) is a multiple of 128 too
    text = tiny_text_config(hidden_size=128, intermediate_size=128, moe_intermediate_size=128,
                            head_dim=32, global_head_dim=64)
    return make_checkpoint(tmp_path_factory.mktemp("qsrc") / "ckpt", text=text, qk_norm_scale=0.25,
                           max_shard_size="1MB")


def _all_tensors(d: Path) -> dict:
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        with safe_open(str(d / f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    assert set(out) == set(idx["weight_map"])
    return out


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_quantize_checkpoint(src_ckpt, tmp_path, scheme):
    from dgplug.names import text_tensors
    from dgplug.config import load_config

    assert len(json.loads((src_ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    out = Q.quantize_checkpoint(src_ckpt, tmp_path / "out", scheme, progress=False, max_shard_bytes=400_000)
    names = sorted(p.name for p in out.iterdir())
    assert "generation_config.json" in names and "tokenizer.json" in names and "chat_template.jinja" in names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.startswith("model-") for n in shards)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left beside it
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "dgplug" and qc["scheme"] == scheme and qc["format_version"] == 1
    assert qc["group_size"] == (128 if scheme == "int4" else None)
    assert "model.decoder.embed_tokens" in qc["modules_to_not_convert"]
    assert "model.encoder.vision_tower" in qc["modules_to_not_convert"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == set(shards)

    src = _all_tensors(src_ckpt)
    got = _all_tensors(out)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    specs = {s.hf: s for s in text_tensors(load_config(src_ckpt).text)}
    grouped = Q.load_quantized_tensors(out, as_quantized_weight=False)
    n_quant = 0
    for name, t in src.items():
        kind = specs[name].kind if name in specs else None
        if kind in ("linear", "experts"):
            n_quant += 1
            assert name not in got and name + ".qweight" in got
            assert (name + ".zero" in got) == (scheme == "int4")
            parts = grouped[name]
            assert parts["scheme"] == scheme
            deq = Q.dequantize(parts)
            assert deq.shape == t.shape
            if scheme == "int4":
                assert got[name + ".scale"].shape == t.shape[:-1] + (t.shape[-1] // 128,)
                bound = got[name + ".scale"].float().repeat_interleave(128, -1) / 2 * 1.000001
            elif scheme == "int8":
                bound = got[name + ".scale"].unsqueeze(-1) / 2 * 1.000001
            else:
                bound = torch.maximum(t.abs() / 16, got[name + ".scale"].unsqueeze(-1) * 2.0**-10) * 1.000001
            assert bool(((deq - t).abs() <= bound + t.abs() * 4e-7).all()), name  # + fp32 rounding of deq
            if name.endswith("gate_up_proj"):  # per expert and per row: gate and up never share a scale
                assert got[name + ".scale"].shape[:2] == t.shape[:2]
        else:  # norms, router, scalars, embedding, vision: untouched, original dtype
            assert torch.equal(got[name], t) and got[name].dtype == t.dtype, name
            assert isinstance(grouped[name], torch.Tensor)
    assert n_quant > 20
    assert any(is_vision(n) for n in got)
    # deterministic bytes
    out2 = Q.quantize_checkpoint(src_ckpt, tmp_path / "out2", scheme, progress=False, max_shard_bytes=400_000)
    assert _digest(out) == _digest(out2)


def test_quantize_embedding_int8(src_ckpt, tmp_path):
    out = Q.quantize_checkpoint(src_ckpt, tmp_path / "o", "fp8", quantize_embedding=True, progress=False)
    got = _all_tensors(out)
    e = "model.decoder.embed_tokens.weight"
    assert got[e + ".qweight"].dtype == torch.int8 and got[e + ".scale"].shape == (512,)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["embedding_scheme"] == "int8" and "model.decoder.embed_tokens" not in qc["modules_to_not_convert"]


def _no_partial(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_inputs(src_ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unknown quantization scheme 'int3'"):
        Q.quantize_checkpoint(src_ckpt, out, "int3", progress=False)
    _no_partial(tmp_path, out)
    with pytest.raises(InputError, match="group size 33 must be a positive even integer"):
        Q.quantize_checkpoint(src_ckpt, out, "int4", group_size=33, progress=False)
    _no_partial(tmp_path, out)
    done = Q.quantize_checkpoint(src_ckpt, tmp_path / "q", "int8", progress=False)
    with pytest.raises(CheckpointError, match="already quantized.*dgplug"):
        Q.quantize_checkpoint(done, out, "int4", progress=False)
    _no_partial(tmp_path, out)


def test_disk_full_leaves_nothing(src_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = Q._write_all

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_all(f, data, where):
        if ".safetensors" in where:
            calls["n"] += 1
            if calls["n"] > 3:  # header and two tensors go through, then the disk is full
                return real(Full(f), data, where)
        return real(f, data, where)

    monkeypatch.setattr(Q, "_write_all", write_all)
    with pytest.raises(DGPlugError, match=r"no space left on device") as ei:
        Q.quantize_checkpoint(src_ckpt, out, "int4", progress=False)
    assert "model-00001-of-00001.safetensors" in str(ei.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_group_not_dividing_k_gives_short_last_group(src_ckpt, tmp_path):
    out = Q.quantize_checkpoint(src_ckpt, tmp_path / "g96", "int4", group_size=96, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 96
    grouped = Q.load_quantized_tensors(out)
    name = "model.decoder.layers.0.experts.down_proj"  # K = 128 -> groups of 96 and 32
    qw = grouped[name]
    scale = qw.scale if not isinstance(qw, dict) else qw["scale"]
    assert scale.shape == (8, 128, 2)
    src = _all_tensors(src_ckpt)[name]
    deq = Q.dequantize(qw)
    bound = scale.float().repeat_interleave(96, -1)[..., :128] / 2
    assert bool(((deq - src).abs() <= bound * (1 + 1e-6) + src.abs() * 4e-7).all())
