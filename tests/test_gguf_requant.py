"""A GGUF as the source of a conversion (converters/gguf_requant.py, quant.gguf_source): llama-quantize's
requantization to any GGUF type, and GGUF -> int4 / int8 / fp8 safetensors.

The references are independent of the code under test where they can be: the GGUF and safetensors
converters run on the checkpoint the GGUF was made from (an F32 GGUF holds the checkpoint's values
exactly, so the two routes must agree byte for byte), gguf-py's decoder plus the block encoders for
a tensor that is requantized, and transformers' own tokenizer and model class for what is written
beside the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf import quants as gq

from dgplug.assets import sudoku_model_path
from dgplug.converters import kquants
from dgplug.converters.gguf_export import export_gguf, tensor_types
from dgplug.converters.imatrix import Entry, Imatrix
from dgplug.errors import InputError

SUDOKU = sudoku_model_path()


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """The embedded Sudoku model as an F32 GGUF, and as the same split in shards of 40 tensors."""
    d = tmp_path_factory.mktemp("requant")
    one = export_gguf(SUDOKU, d / "f32.gguf", quant="F32", progress=False, workers=1)
    first = export_gguf(SUDOKU, d / "split.gguf", quant="F32", progress=False, workers=1, split_max_tensors=40)
    assert first.name == "split-00001-of-00004.gguf"
    return one, first


def _imatrix(path) -> Imatrix:
    """Random importance for every quantized tensor of the Sudoku model (one row per expert)."""
    from dgplug.config import load_config

    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["calib.txt"], chunk_count=3, chunk_size=64)
    for spec, qt in tensor_types(load_config(SUDOKU).text, "Q4_K_M"):
        if qt != T.F32:
            m = spec.shape[0] if len(spec.shape) == 3 else 1
            im.entries[spec.gguf] = Entry(rng.gamma(0.5, 1.0, (m, spec.shape[-1])), np.full(m, 8))
    im.save(path)
    return path


def _kv(path) -> dict:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_requantized_f32_gguf_is_the_checkpoints_file(f32, tmp_path):
    # the checkpoint's values, read from the GGUF instead: the same file, byte for byte (metadata
    # copied in the source's order, file type set in place, tensors in the source's order)
    one, first = f32
    for q in ("Q4_K_M", "Q5_0", "IQ4_XS", "Q2_K", "BF16"):
        direct = export_gguf(SUDOKU, tmp_path / f"d-{q}.gguf", quant=q, progress=False, workers=1)
        via = export_gguf(one, tmp_path / f"r-{q}.gguf", quant=q, progress=False, workers=1)
        assert via.read_bytes() == direct.read_bytes(), q
    # with an imatrix (its keys written after the copied ones, as from a checkpoint), from a split GGUF
    im = _imatrix(tmp_path / "im.gguf")
    direct = export_gguf(SUDOKU, tmp_path / "d-im.gguf", quant="Q3_K_S", imatrix=im, progress=False, workers=1)
    via = export_gguf(first, tmp_path / "r-im.gguf", quant="Q3_K_S", imatrix=im, progress=False, workers=2)
    assert via.read_bytes() == direct.read_bytes()
    assert _kv(via)["quantize.imatrix.entries_count"] == len(Imatrix.load(im).entries)
    assert not any(k.startswith("split.") for k in _kv(via))  # the source's shards are not the output's


def test_a_quantized_gguf_is_requantized_only_when_allowed(tmp_path):
    q8 = export_gguf(SUDOKU, tmp_path / "q8.gguf", quant="Q8_0", progress=False, workers=1)
    # every tensor keeps its type: a copy, byte for byte, and no flag needed (llama-quantize copies such tensors)
    same = export_gguf(q8, tmp_path / "same.gguf", quant="Q8_0", progress=False, workers=1)
    assert same.read_bytes() == q8.read_bytes()
    with pytest.raises(InputError, match=r"q8.gguf: requantizing is disabled, as in llama-quantize: tensor "
                                         r"token_embd.weight is Q8_0, Q4_K_M makes it Q6_K \(and \d+ more\); pass "
                                         r"--allow-requantize"):
        export_gguf(q8, tmp_path / "q4.gguf", quant="Q4_K_M", progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf", "same.gguf"]  # nothing else written
    out = export_gguf(q8, tmp_path / "q4.gguf", quant="Q4_K_M", progress=False, workers=1, allow_requantize=True)
    direct = GGUFReader(export_gguf(SUDOKU, tmp_path / "d.gguf", quant="Q4_K_M", progress=False, workers=1))
    src = {t.name: t for t in GGUFReader(q8).tensors}
    got = GGUFReader(out)
    assert [(t.name, t.tensor_type) for t in got.tensors] == [(t.name, t.tensor_type) for t in direct.tensors]
    changed = 0
    for t in got.tensors:
        s = src[t.name]
        if t.tensor_type == s.tensor_type:
            assert np.asarray(t.data).tobytes() == np.asarray(s.data).tobytes(), t.name
            continue
        # gguf-py's decoding of the Q8_0 blocks, encoded as the new type
        x = gq.dequantize(np.asarray(s.data), s.tensor_type).reshape(-1, int(s.shape[0])).astype(np.float32)
        want = kquants.quantize(x, T(int(t.tensor_type)), t.name)
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(want).tobytes(), t.name
        changed += 1
    assert changed > 20
    a, b = _kv(q8), _kv(out)
    assert b.pop("general.file_type") == 15 and a.pop("general.file_type") == 7
    assert a == b  # every other key as the source has it


def test_metadata_of_the_source_kept_its_imatrix_record_not(tmp_path):
    im = _imatrix(tmp_path / "im.gguf")
    src = export_gguf(SUDOKU, tmp_path / "q4.gguf", quant="Q4_K_M", imatrix=im, progress=False, workers=1)
    assert "quantize.imatrix.file" in _kv(src)
    plain = _kv(export_gguf(src, tmp_path / "q8.gguf", quant="Q8_0", progress=False, workers=1, allow_requantize=True,
                            name="Sudoku requantized"))
    assert not any(k.startswith("quantize.") for k in plain)  # it described the source
    assert plain["general.name"] == "Sudoku requantized"
    kv = _kv(src)
    for k in ("general.name", "general.file_type") + tuple(k for k in kv if k.startswith("quantize.")):
        kv.pop(k)
    assert {k: v for k, v in plain.items() if k in kv} == kv and set(kv) <= set(plain)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_gguf_to_quantized_safetensors(f32, tmp_path, scheme):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import dgplug
    from dgplug.config import load_config, load_generation_defaults
    from dgplug.converters.quant import quantize_checkpoint

    direct = quantize_checkpoint(SUDOKU, tmp_path / "direct", scheme, progress=False)
    via = quantize_checkpoint(f32[1], tmp_path / "via", scheme, progress=False)  # from the split GGUF
    a = {k: v for f in sorted(direct.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(via.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(b) == {k for k in a if "vision" not in k}  # a GGUF holds no vision tower
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    assert load_config(via).text == load_config(direct).text
    ga, gb = load_generation_defaults(direct), load_generation_defaults(via)
    assert {k: v for k, v in gb.items() if k != "eos_token_id"} == {k: v for k, v in ga.items() if k != "eos_token_id"}
    assert json.loads((via / "config.json").read_text())["quantization_config"]["scheme"] == scheme
    # the tokenizer, rebuilt from the GGUF's vocabulary: transformers reads it as it reads the original
    puzzle = json.loads((SUDOKU / "puzzles.json").read_text())[0]["puzzle"]
    text = " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={c}" for i, c in enumerate(puzzle))
    ta, tb = AutoTokenizer.from_pretrained(direct), AutoTokenizer.from_pretrained(via)
    assert tb(text).input_ids == ta(text).input_ids and len(ta(text).input_ids) == 82
    ids = torch.tensor([ta(text).input_ids])
    ma, mb = dgplug.load(direct), dgplug.load(via)
    assert torch.equal(mb.generate(ids, seed=0).sequences, ma.generate(ids, seed=0).sequences)


def test_gguf_of_block_types_to_safetensors(tmp_path):
    from dgplug.converters.quant import quantize_checkpoint

    q8 = export_gguf(SUDOKU, tmp_path / "q8.gguf", quant="Q8_0", progress=False, workers=1)
    with pytest.raises(InputError, match=r"q8.gguf: tensor token_embd.weight is Q8_0 \(and \d+ more\): the GGUF is "
                                         r"already quantized.*--allow-requantize"):
        quantize_checkpoint(q8, tmp_path / "o", "int8", progress=False)
    assert not (tmp_path / "o").exists()
    out = quantize_checkpoint(q8, tmp_path / "o", "int8", progress=False, allow_requantize=True)
    from safetensors.torch import load_file

    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    emb = next(t for t in GGUFReader(q8).tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gq.dequantize(np.asarray(emb.data), T.Q8_0)).to(torch.bfloat16)
    assert torch.equal(got["model.decoder.embed_tokens.weight"], want)  # the embedding: bf16


def test_copy_and_keep_split_as_llama_quantize(f32, tmp_path):
    # COPY joins a split GGUF into the one-file export and re-shards one, byte for byte; --keep-split writes
    # the source's shards (the same partition as a direct export split by the same count)
    one, first = f32
    shards = sorted(first.parent.glob("split-*.gguf"))
    joined = export_gguf(first, tmp_path / "joined.gguf", quant="COPY", progress=False, workers=1)
    assert joined.read_bytes() == one.read_bytes()
    again = export_gguf(one, tmp_path / "split.gguf", quant="COPY", progress=False, workers=1, split_max_tensors=40)
    assert [p.read_bytes() for p in sorted(tmp_path.glob("split-*.gguf"))] == [p.read_bytes() for p in shards]
    assert again.name == shards[0].name
    kept = export_gguf(first, tmp_path / "q8.gguf", quant="Q8_0", progress=False, workers=1, keep_split=True)
    direct = export_gguf(SUDOKU, tmp_path / "d" / "q8.gguf", quant="Q8_0", progress=False, workers=1,
                         split_max_tensors=40)
    got, want = sorted(tmp_path.glob("q8-*.gguf")), sorted((tmp_path / "d").glob("q8-*.gguf"))
    assert kept == got[0] and len(got) == len(shards) and [p.read_bytes() for p in got] == [p.read_bytes() for p in want]
    q8 = export_gguf(one, tmp_path / "one-q8.gguf", quant="Q8_0", progress=False, workers=1, keep_split=True)
    assert q8 == tmp_path / "one-q8.gguf"  # a source in one file: one file (llama-quantize: OUT-00001-of-00001)
    for kw, msg in (({"quant": "COPY"}, "--quant COPY .* applies to a GGUF source"),
                    ({"quant": "Q8_0", "keep_split": True}, "--keep-split .* applies to a GGUF source")):
        with pytest.raises(InputError, match=msg):
            export_gguf(SUDOKU, tmp_path / "x.gguf", progress=False, workers=1, **kw)
    with pytest.raises(InputError, match="--keep-split writes the source's shards"):
        export_gguf(first, tmp_path / "x.gguf", quant="Q8_0", keep_split=True, split_max_tensors=10, progress=False)
    assert not (tmp_path / "x.gguf").exists()
