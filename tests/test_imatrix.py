"""Importance matrices (dgplug/converters/imatrix.py): the collector against the inputs that
transformers' own modules see, and the file against llama.cpp's imatrix GGUF layout."""

import numpy as np
import pytest
import torch

import dgplug
from dgplug import names
from dgplug.converters.imatrix import Entry, Imatrix, calibration_chunks, collect, collecting
from dgplug.errors import FormatError, InputError


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    from transformers import DiffusionGemmaForBlockDiffusion

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_ckpt).eval()
    return hf, dgplug.load(tiny_ckpt)


def _hf_statistics(hf, run):
    """Sums of x^2 and row counts per GGUF weight name, from hooks on transformers' modules."""
    gguf_of = {s.hf: s.gguf for s in names.text_tensors(dgplug.config.from_dict(hf.config.to_dict()).text)}
    E = hf.config.text_config.num_experts
    stats = {}

    def add(name, x, which=None, n=1):
        x = x.reshape(-1, x.shape[-1]).double()
        s2, c = stats.setdefault(name, (torch.zeros(n, x.shape[1], dtype=torch.float64), torch.zeros(n, dtype=torch.long)))
        if which is None:
            s2[0] += (x * x).sum(0)
            c[0] += x.shape[0]
        else:
            s2.index_add_(0, which, x * x)
            c += torch.bincount(which, minlength=n)

    hooks = []
    for mod_name, mod in hf.named_modules():
        canon = mod_name.replace("model.encoder.language_model.", "model.decoder.")
        if isinstance(mod, torch.nn.Linear) and canon + ".weight" in gguf_of:
            name = gguf_of[canon + ".weight"]
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: add(name, a[0])))
        elif canon + ".gate_up_proj" in gguf_of:
            gu, dn = gguf_of[canon + ".gate_up_proj"], gguf_of[canon + ".down_proj"]

            def experts_hook(m, args, kwargs, gu=gu, dn=dn):
                x, idx = args[0] if args else kwargs["hidden_states"], args[1] if len(args) > 1 else kwargs["top_k_index"]
                for k in range(idx.shape[1]):
                    for e in idx[:, k].unique().tolist():
                        rows = x[idx[:, k] == e]
                        which = torch.full((rows.shape[0],), e)
                        add(gu, rows, which, E)
                        gate, up = torch.nn.functional.linear(rows, m.gate_up_proj[e]).chunk(2, -1)
                        add(dn, m.act_fn(gate) * up, which, E)

            hooks.append(mod.register_forward_pre_hook(experts_hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def test_collector_sees_what_transformers_modules_see(pair):
    """Encoder pass + one denoise pass with self-conditioning: every projection, the router, the
    self-conditioning MLP and each expert get the same rows in dgplug as in transformers."""
    hf, dg = pair
    g = torch.Generator().manual_seed(0)
    V, C = dg.tc.vocab_size, dg.cfg.canvas_length
    ids = torch.randint(5, V - 3, (2, 11), generator=g)
    canvas = torch.randint(0, V, (2, C), generator=g)
    sc = torch.randn(2, C, V, generator=g)
    with torch.no_grad():
        want = _hf_statistics(hf, lambda: hf(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc))
    with collecting(dg) as col:
        dg(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc)
    got = col.result()
    assert set(got.entries) == set(want)
    assert any("exps" in n for n in want) and any("self_cond" in n for n in want) and any("gate_inp" in n for n in want)
    for name, (s2, c) in want.items():
        e = got.entries[name]
        np.testing.assert_array_equal(e.counts, c.numpy(), err_msg=name)
        np.testing.assert_allclose(e.sum2, s2.numpy(), rtol=2e-5, atol=1e-6, err_msg=name)


def test_collect_runs_the_generation_path(pair):
    """collect(): prompts through generate (encoder + denoise steps): each dense weight of a
    layer counts prompt rows + canvas rows x steps; the file keeps the chunk bookkeeping."""
    _, dg = pair
    C, steps = dg.cfg.canvas_length, 3
    chunks = calibration_chunks(list(range(5, 5 + 40)), 13)
    assert [len(c) for c in chunks] == [13, 13, 13]  # the short tail is dropped
    seen = []
    im = collect(dg, chunks, steps=steps, datasets=["calib.txt"], on_chunk=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 13 + C, ["calib.txt"])
    q = im.entries["blk.0.attn_q.weight"]
    # per chunk: the prompt (13), at most `steps` denoise passes over the canvas; the committed
    # canvas is not encoded again after the last canvas
    assert 3 * (13 + C) <= int(q.counts[0]) <= 3 * (13 + steps * C)
    exps = im.entries["blk.0.ffn_gate_up_exps.weight"]
    assert exps.sum2.shape == (dg.tc.num_experts, dg.tc.hidden_size)
    assert int(exps.counts.sum()) == int(q.counts[0]) * dg.tc.top_k_experts
    with pytest.raises(InputError, match="no tokens"):
        calibration_chunks([], 8)


def test_file_round_trip_in_llama_cpp_layout(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=7, chunk_size=512)
    im.entries["blk.0.attn_q.weight"] = Entry(rng.random((1, 64)), np.array([300]), rng.random((1, 64)))
    im.entries["blk.0.ffn_gate_up_exps.weight"] = Entry(rng.random((8, 64)), np.array([5, 0, 9, 1, 1, 2, 3, 4]))
    path = im.save(tmp_path / "imatrix.gguf")
    assert not list(tmp_path.glob(".*tmp"))
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix" and "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 7 and r.fields["imatrix.chunk_size"].contents() == 512
    t = {x.name: x for x in r.tensors}
    # ggml shapes (ne0 first) as llama-imatrix writes them: in_sum2 [cols, matrices], counts [1, matrices]
    assert list(t["blk.0.ffn_gate_up_exps.weight.in_sum2"].shape) == [64, 8]
    assert list(t["blk.0.ffn_gate_up_exps.weight.counts"].shape) == [1, 8]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    back = Imatrix.load(path)
    for name, e in im.entries.items():
        np.testing.assert_allclose(back.entries[name].sum2, e.sum2, rtol=1e-6)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    w = back.importance("blk.0.ffn_gate_up_exps.weight")
    np.testing.assert_allclose(w[0], im.entries["blk.0.ffn_gate_up_exps.weight"].sum2[0] / 5, rtol=1e-6)
    assert (w[1] == 1).all()  # an expert never reached: unweighted
    assert back.importance("blk.3.attn_q.weight") is None


def test_reads_a_llama_imatrix_file(tmp_path):
    """A file laid out as llama-imatrix writes it (no architecture, no in_sum), via gguf-py."""
    import gguf

    w = gguf.GGUFWriter(tmp_path / "ll.gguf", "imatrix")
    w.kv_data[0].pop("general.architecture")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["wiki.txt"])
    w.add_uint32("imatrix.chunk_count", 2)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.1.ffn_down.weight.in_sum2", np.full((1, 32), 8.0, np.float32))
    w.add_tensor("blk.1.ffn_down.weight.counts", np.full((1, 1), 4.0, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    im = Imatrix.load(tmp_path / "ll.gguf")
    assert im.datasets == ["wiki.txt"] and (im.chunk_count, im.chunk_size) == (2, 512)
    np.testing.assert_allclose(im.importance("blk.1.ffn_down.weight"), np.full((1, 32), 2.0))


def test_bad_files_get_one_clear_error(tmp_path, tiny_ckpt):
    import gguf

    with pytest.raises(InputError, match="no such imatrix file"):
        Imatrix.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(FormatError, match="junk.gguf: not an imatrix \\(neither the GGUF magic nor llama.cpp's legacy"):
        Imatrix.load(tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic, then nothing
    with pytest.raises(FormatError, match="cut.gguf: not a GGUF imatrix \\("):
        Imatrix.load(tmp_path / "cut.gguf")
    model_gguf = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model_gguf, "diffusion-gemma")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FormatError, match="model.gguf: general.type is None, not 'imatrix'"):
        Imatrix.load(model_gguf)
    half = Imatrix(entries={"blk.0.attn_q.weight": Entry(np.ones((1, 4)), np.array([1]))})
    half.save(tmp_path / "half.gguf")
    r = gguf.GGUFReader(tmp_path / "half.gguf")
    w = gguf.GGUFWriter(tmp_path / "half2.gguf", "imatrix")
    w.kv_data[0].pop("general.architecture")
    w.add_type("imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array(r.tensors[0].data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FormatError, match="blk.0.attn_q.weight has no .counts tensor"):
        Imatrix.load(tmp_path / "half2.gguf")


def test_int4_importance_weighted_search():
    """Uniform importance = the plain clip search, byte for byte; skewed importance never does
    worse than it on the weighted error, and better overall."""
    from dgplug.converters.quant import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(1, 256, generator=g)
    w[:, 7] *= 6  # an outlier column
    plain = quantize_int4(w, 128, "asym", clip=True)
    for a, b in zip(quantize_int4(w, 128, "asym", importance=torch.ones(256)), plain):
        assert torch.equal(a, b)
    imp = torch.rand(256, generator=g) ** 4 * 50 + 0.01

    def werr(q):
        return float(((dequantize_int4(*q, group_size=128) - w) ** 2 * imp).sum())

    assert werr(quantize_int4(w, 128, "asym", importance=imp)) < 0.97 * werr(plain)
    # experts: one importance row per expert, broadcast over the expert's rows
    we = torch.randn(4, 32, 128, generator=g)
    ie = torch.rand(4, 1, 128, generator=g) ** 4
    qe = quantize_int4(we, 128, "asym", importance=ie)
    for e in range(4):
        one = quantize_int4(we[e], 128, "asym", importance=ie[e, 0])
        assert all(torch.equal(a[e], b) for a, b in zip(qe, one))


def test_int4_checkpoint_with_imatrix(pair, tiny_ckpt, tmp_path, capsys):
    from dgplug.converters.quant import quantize_checkpoint

    _, dg = pair
    im = collect(dg, calibration_chunks(list(range(5, 5 + 24)), 12), steps=2)
    some = "blk.1.attn_output.weight"
    del im.entries[some]
    path = im.save(tmp_path / "im.gguf")
    plain = quantize_checkpoint(tiny_ckpt, tmp_path / "plain", "int4", progress=False)
    weighted = quantize_checkpoint(tiny_ckpt, tmp_path / "weighted", "int4", progress=False, imatrix=path)
    err = capsys.readouterr().err
    assert "imatrix: no entry for 1 tensor(s): blk.1.attn_output.weight: quantized unweighted" in err, err
    import json
    from safetensors.torch import load_file

    assert json.loads((weighted / "config.json").read_text())["quantization_config"]["imatrix"] is True
    a = {k: v for f in sorted(plain.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(weighted.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert any("experts.gate_up_proj" in k for k in differ) and any("q_proj" in k for k in differ)
    assert not any("layers.1.self_attn.o_proj" in k for k in differ)  # no entry: as without an imatrix
    # the same statistics as a legacy .dat (ncall 1, so value * 1 / 1 is exact): the same int4 bytes
    im.chunk_size = 1 << 30
    from_dat = quantize_checkpoint(tiny_ckpt, tmp_path / "from_dat", "int4", progress=False,
                                   imatrix=im.save(tmp_path / "im.dat", "dat"))
    c = {k: v for f in sorted(from_dat.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in b)
    out = dgplug.load(weighted)(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(out).all()
    # an imatrix of another model: one error naming the tensor
    im.entries["blk.0.attn_q.weight"] = Entry(np.ones((1, 17)), np.array([3]))
    im.save(tmp_path / "other.gguf")
    with pytest.raises(InputError, match="imatrix entry blk.0.attn_q.weight has 1 x 17 values; tensor "
                                         "model.decoder.layers.0.self_attn.q_proj.weight needs 1 x 64"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "bad", "int4", progress=False, imatrix=tmp_path / "other.gguf")
    assert not (tmp_path / "bad").exists()


# -- the command line: `dgplug imatrix` and `convert --imatrix` -----------------------------------
def test_cli_imatrix_then_convert(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from dgplug.cli import app

    runner = CliRunner()
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    (calib / "b.txt").write_text("Block diffusion denoises a whole canvas at once. " * 8)
    out = tmp_path / "im.gguf"
    args = ["imatrix", str(tiny_ckpt), "--calib", str(calib), "-o", str(out), "--chunk-size", "16", "--chunks", "3",
            "--steps", "2", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"wrote {out}"
    im = Imatrix.load(out)
    assert im.datasets == ["a.txt", "b.txt"] and im.chunk_count == 3
    experts = [n for n in im.entries if "_exps" in n]
    assert experts and len(experts) < len(im.entries), sorted(im.entries)
    # every linear saw every prompt and canvas token; every expert table some routed tokens
    assert all(int(e.counts.min()) > 0 for n, e in im.entries.items() if n not in experts)
    assert all(int(im.entries[n].counts.sum()) > 0 for n in experts)
    # --output-format dat: llama.cpp's legacy layout, read back as the GGUF of the same run
    r = runner.invoke(app, args[:5] + [str(tmp_path / "im.dat"), "--output-format", "dat"] + args[6:])
    assert r.exit_code == 0 and "as an imatrix GGUF" not in r.stderr, r.output
    assert (tmp_path / "im.dat").read_bytes()[:4] != b"GGUF"
    dat = Imatrix.load(tmp_path / "im.dat")
    assert dat.entries.keys() == im.entries.keys() and dat.chunk_count == 3 and dat.datasets == ["a.txt"]
    for n, e in im.entries.items():
        m = e.sum2.shape[0]
        np.testing.assert_allclose(dat.importance(n, m), im.importance(n, m), rtol=2.4e-7, atol=0, err_msg=n)
    # a .dat name without --output-format: GGUF as llama-imatrix writes it, with a note saying so
    r = runner.invoke(app, args[:5] + [str(tmp_path / "x.dat"), "--chunk-size", "16", "--chunks", "1", "--steps", "1",
                                           "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "x.dat").read_bytes()[:4] == b"GGUF", r.output
    assert f"note: writing {tmp_path / 'x.dat'} as an imatrix GGUF (its name does not end in .gguf)" in r.stderr
    r = runner.invoke(app, args[:5] + [str(tmp_path / "y.txt"), "--output-format", "txt"])
    assert r.exit_code == 1 and "--output-format txt: one of gguf, dat" in r.stderr and not (tmp_path / "y.txt").exists()
    # the same output again: refused unless --overwrite, the file kept as it was
    before = out.read_bytes()
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and f"{out} exists: pass --overwrite" in r.stderr and out.read_bytes() == before
    # bad calibration input: one line naming it
    r = runner.invoke(app, ["imatrix", str(tiny_ckpt), "--calib", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "none.txt: no such file or directory" in r.stderr
    # text the tokenizer does not know: it runs (the statistics see <unk>) and a note says so
    (tmp_path / "free.txt").write_text("hello w5 there")
    r = runner.invoke(app, ["imatrix", str(tiny_ckpt), "--calib", str(tmp_path / "free.txt"), "-o",
                            str(tmp_path / "free.gguf"), "--steps", "1", "--quiet"])
    assert r.exit_code == 0 and "note: 2 of 3 calibration tokens are unknown to this model's tokenizer" in r.stderr
    # --chunks: the prompts used are said as a part of those the text gives (not all of its tokens)
    (tmp_path / "long.txt").write_text(" ".join(f"w{5 + i % 9}" for i in range(40)))
    r = runner.invoke(app, ["imatrix", str(tiny_ckpt), "--calib", str(tmp_path / "long.txt"), "-o",
                            str(tmp_path / "long.gguf"), "--steps", "1", "--chunk-size", "8", "--chunks", "2"])
    assert r.exit_code == 0 and "40 calibration tokens: 2 prompt(s) of 8 tokens (--chunks 2 of 5), one canvas" in r.stderr
    # convert --imatrix: int4 weighted, recorded in the quantization config
    q = tmp_path / "q4"
    r = runner.invoke(app, ["convert", str(tiny_ckpt), str(q), "-q", "int4", "--group-size", "16", "--imatrix", str(out),
                            "--quiet"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads((q / "config.json").read_text())["quantization_config"]["imatrix"] is True
    # GGUF K-quant mixes: weighted as llama-quantize --imatrix, recorded as it records it
    import gguf

    g = tmp_path / "m.gguf"
    r = runner.invoke(app, ["convert", str(tiny_ckpt), str(g), "-q", "q4_k_m", "--imatrix", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    f = gguf.GGUFReader(g).fields
    assert f["quantize.imatrix.file"].contents() == str(out) and f["quantize.imatrix.dataset"].contents() == "a.txt"
    assert f["quantize.imatrix.entries_count"].contents() == len(im.entries)
    assert f["quantize.imatrix.chunks_count"].contents() == 3
    # file types with no importance path here: refused before any work, one line saying why
    for qt, why in (("Q8_0", "llama.cpp's Q8_0 has no importance path"), ("F16", "not quantized"),
                    ("int8", "no search to weight")):
        r = runner.invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "x.gguf"), "-q", qt, "--imatrix", str(out)])
        assert r.exit_code == 1 and (f"--imatrix applies to --quant int4, Q2_K_S, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, "
                                     f"Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_XS, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1 "
                                     f"({qt}: {why})") in r.stderr
    # Q2_K_S without an imatrix: refused as llama-quantize refuses it, saying how to make one
    r = runner.invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "x.gguf"), "-q", "q2_k_s"])
    assert r.exit_code == 1 and "--quant Q2_K_S needs --imatrix" in r.stderr and "dgplug imatrix" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_cli_imatrix_checks_the_backend(tiny_ckpt, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dgplug.cli import app

    (tmp_path / "c.txt").write_text("some text " * 20)
    monkeypatch.setenv("DGPLUG_OPS", "bogus")
    r = CliRunner().invoke(app, ["imatrix", str(tiny_ckpt), "--calib", str(tmp_path / "c.txt"), "-o",
                                 str(tmp_path / "im.gguf")])
    assert r.exit_code == 1 and "DGPLUG_OPS='bogus'" in r.stderr and not (tmp_path / "im.gguf").exists()


# -- llama.cpp's legacy .dat layout ---------------------------------------------------------------
# As llama.cpp's IMatrixCollector::save_imatrix_legacy (tools/imatrix) writes it, little-endian:
# int32 entries; per entry int32 name length, name, int32 ncall, int32 nval, nval float32 where
# ncall = ceil(max(counts) / chunk_size) and value = (sum2 / count) * ncall in float32 (count 0:
# 1 * ncall), matrices (experts) one after another; then int32 chunk count, int32 length, dataset.
def _dat_by_hand(path, stats, chunk_size, chunk_count, dataset):
    """stats: name -> (sum2 [m, cols], counts [m]); written from the layout above, not by dgplug."""
    import struct

    buf = struct.pack("<i", len(stats))
    for name in sorted(stats):
        sum2, counts = stats[name]
        ncall = -(-int(max(counts)) // chunk_size)
        vals = []
        for m in range(len(counts)):
            for j in range(sum2.shape[1]):
                v, c = (np.float32(sum2[m, j]), np.float32(counts[m])) if counts[m] else (np.float32(1), np.float32(1))
                vals.append(np.float32(v / c) * np.float32(ncall))
        buf += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals))
        buf += struct.pack(f"<{len(vals)}f", *vals)
    buf += struct.pack("<ii", chunk_count, len(dataset)) + dataset.encode()
    path.write_bytes(buf)
    return path


def _parse_dat(data):
    """A .dat parsed with struct alone: ([(name, ncall, values)], chunk_count, dataset)."""
    import struct

    (n,), pos, entries = struct.unpack_from("<i", data), 4, []
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        pos += 12 + length
        entries.append((name, ncall, np.array(struct.unpack_from(f"<{nval}f", data, pos), np.float32)))
        pos += 4 * nval
    count, length = struct.unpack_from("<ii", data, pos)
    assert pos + 8 + length == len(data)
    return entries, count, data[pos + 8:].decode()


def _stats(seed=0):
    """Synthetic statistics: a linear (ncall 4 at chunk 16), experts with one never reached (ncall 4),
    a linear whose ncall is 3 (float32 rounding of value * 3 / 3)."""
    rng = np.random.default_rng(seed)
    ex_counts = np.array([60, 0, 17, 33, 1, 64, 9, 2])
    return {"blk.0.attn_q.weight": (rng.random((1, 64)) * 50, np.array([50])),
            "blk.0.ffn_gate_up_exps.weight": (rng.random((8, 32)) * ex_counts[:, None], ex_counts),
            "blk.1.ffn_down.weight": (rng.random((1, 48)) * 900, np.array([41]))}


TENSORS = [("blk.0.attn_q.weight", "q", (16, 64)), ("blk.0.ffn_gate_up_exps.weight", "experts", (8, 20, 32)),
           ("blk.1.ffn_down.weight", "down", (16, 48))]


def test_legacy_dat_weights_as_the_gguf(tmp_path, capsys):
    """A .dat written by hand from the layout and the GGUF of the same statistics: the same
    importance per weight (each expert its own row, one never reached 1), exactly where ncall is a
    power of two, to float32 rounding of value * ncall / ncall otherwise; told apart by content."""
    stats = _stats()
    im = Imatrix(datasets=["calib.txt"], chunk_count=7, chunk_size=16)
    for name, (s2, c) in stats.items():
        im.entries[name] = Entry(s2, c)
    g = im.save(tmp_path / "im.dat.gguf")
    d = _dat_by_hand(tmp_path / "im.gguf.dat", stats, 16, 7, "calib.txt")
    a, b = Imatrix.load(g).for_tensors(TENSORS), Imatrix.load(d).for_tensors(TENSORS)
    assert "no entry" not in capsys.readouterr().err
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert np.array_equal(a["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"])
    assert np.array_equal(a["blk.0.ffn_gate_up_exps.weight"], b["blk.0.ffn_gate_up_exps.weight"])
    assert (b["blk.0.ffn_gate_up_exps.weight"][1] == 1).all()
    np.testing.assert_allclose(b["blk.1.ffn_down.weight"], a["blk.1.ffn_down.weight"], rtol=2.4e-7, atol=0)
    back = Imatrix.load(d)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 7 and len(back.entries) == 3
    # an older .dat ends after the entries (no chunk count, no dataset)
    cut = _dat_by_hand(tmp_path / "old.dat", stats, 16, 7, "")
    cut.write_bytes(cut.read_bytes()[:-8])
    old = Imatrix.load(cut)
    assert old.chunk_count == 0 and old.datasets == [] and old.for_tensors(TENSORS).keys() == a.keys()


def test_writes_the_legacy_layout(tmp_path):
    """save(..., "dat"): the bytes parsed with struct follow the layout (the entry no row reached
    left out, as llama-imatrix does); dgplug reads it back as its GGUF."""
    stats = _stats(1)
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=5, chunk_size=16)
    for name, (s2, c) in stats.items():
        im.entries[name] = Entry(s2, c, s2 / 3)
    im.entries["blk.2.attn_k.weight"] = Entry(np.zeros((1, 8)), np.array([0]))
    path = im.save(tmp_path / "im.dat", "dat")
    assert not list(tmp_path.glob(".*tmp"))
    entries, count, dataset = _parse_dat(path.read_bytes())
    assert (count, dataset) == (5, "a.txt") and [e[0] for e in entries] == sorted(stats)
    for name, ncall, values in entries:
        s2, c = stats[name]
        assert ncall == -(-int(c.max()) // 16)
        want = [np.float32(np.float32(s2[m, j]) / np.float32(c[m])) * np.float32(ncall) if c[m] else np.float32(ncall)
                for m in range(len(c)) for j in range(s2.shape[1])]
        assert np.array_equal(values, np.array(want, np.float32)), name
    assert path.read_bytes() == _dat_by_hand(tmp_path / "hand.dat", stats, 16, 5, "a.txt").read_bytes()
    gguf_path = im.save(tmp_path / "im.gguf")
    a, b = Imatrix.load(gguf_path).for_tensors(TENSORS), Imatrix.load(path).for_tensors(TENSORS)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=2.4e-7, atol=0, err_msg=name)
    with pytest.raises(InputError, match="imatrix format 'txt': one of gguf, dat"):
        im.save(tmp_path / "x", "txt")


def test_bad_legacy_files_get_one_clear_error(tmp_path):
    import struct

    good = _dat_by_hand(tmp_path / "good.dat", _stats(), 16, 7, "calib.txt").read_bytes()
    head = struct.pack("<i", 1) + struct.pack("<i", 19) + b"blk.0.attn_q.weight"

    def load(data, name="bad.dat"):
        (tmp_path / name).write_bytes(data)
        return Imatrix.load(tmp_path / name)

    with pytest.raises(FormatError, match=r"bad.dat: truncated legacy imatrix: the 64 values of entry 1 \(blk.0."
                                          r"attn_q.weight\) needs 256 bytes at offset 35, the file has 100 left"):
        load(good[:135])
    with pytest.raises(FormatError, match=r"bad.dat: legacy imatrix of 5000 entries in \d+ bytes"):
        load(struct.pack("<i", 5000) + good[4:])
    with pytest.raises(FormatError, match=r"entry 1 \(blk.0.attn_q.weight\) has ncall -3 and 64 values"):
        load(head + struct.pack("<ii", -3, 64) + b"\0" * 256)
    with pytest.raises(FormatError, match=r"entry 1 \(blk.0.attn_q.weight\) has ncall 2 and 0 values"):
        load(head + struct.pack("<ii", 2, 0) + b"\0" * 16)
    twice = struct.pack("<i", 2) + (head + struct.pack("<ii", 1, 1) + b"\0" * 4)[4:] * 2
    with pytest.raises(FormatError, match=r"bad.dat: legacy imatrix entry 2 \(blk.0.attn_q.weight\) appears twice"):
        load(twice)
    with pytest.raises(FormatError, match="bad.dat: legacy imatrix ends in 20 bytes that are not a chunk count"):
        load(good + b"xyz")
    with pytest.raises(FormatError, match="entry 2 of 3 has a name of 99999 bytes"):
        i = good.index(b"blk.0.ffn_gate_up") - 4
        load(good[:i] + struct.pack("<i", 99999) + good[i + 4:])
    # a .dat whose sizes are not the model's: one error naming entry and tensor
    im = Imatrix.load(tmp_path / "good.dat")
    with pytest.raises(InputError, match=r"imatrix entry blk.0.ffn_gate_up_exps.weight has 256 values; tensor "
                                         r"experts needs 4 x 32 \(an imatrix of another model\?\)"):
        im.for_tensors([("blk.0.ffn_gate_up_exps.weight", "experts", (4, 20, 32))])
    with pytest.raises(InputError, match="blk.1.ffn_down.weight has 48 values; tensor down needs 1 x 64"):
        im.for_tensors([("blk.1.ffn_down.weight", "down", (16, 64))])
    # told apart by content, not by name: a GGUF named .dat and a .dat named .gguf both load
    gguf_named = tmp_path / "dat.gguf"
    gguf_named.write_bytes(good)
    assert Imatrix.load(gguf_named).entries.keys() == im.entries.keys()


def test_missing_entries_named_by_weight():
    """The note names the weights that matter, experts then attention then the rest, by layer;
    token_embd (no imatrix has it) is not named, and alone it gives no note."""
    from dgplug.converters.imatrix import missing_note

    assert missing_note(["token_embd.weight"]) is None
    line = missing_note(["token_embd.weight", "self_cond_up.weight", "blk.10.ffn_down.weight", "blk.2.attn_q.weight",
                         "blk.10.ffn_down_exps.weight", "blk.9.ffn_gate_up_exps.weight"])
    assert line == ("imatrix: no entry for 5 tensor(s): blk.9.ffn_gate_up_exps.weight, blk.10.ffn_down_exps.weight, "
                    "blk.2.attn_q.weight, blk.10.ffn_down.weight, self_cond_up.weight: quantized unweighted")
    many = missing_note([f"blk.{i}.attn_k.weight" for i in range(9)])
    assert many.endswith("blk.5.attn_k.weight (and 3 more): quantized unweighted") and "blk.6." not in many


def test_cli_imatrix_default_chunk_fits_the_embedded_model(tmp_path):
    # llama-imatrix's 512 tokens a prompt do not fit the Sudoku model's context (512) beside its canvas
    # (82): the default is what fits, 430; an explicit size that does not fit is still one error
    from typer.testing import CliRunner

    from dgplug.cli import app

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"r{r}c{c}=." for r in range(1, 10) for c in range(1, 10)) * 8)
    out = tmp_path / "im.gguf"
    r = CliRunner().invoke(app, ["imatrix", "sudoku", "--calib", str(calib), "-o", str(out), "--chunks", "1",
                                 "--steps", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert Imatrix.load(out).chunk_size == 430 + 82
    r = CliRunner().invoke(app, ["imatrix", "sudoku", "--calib", str(calib), "-o", str(tmp_path / "x.gguf"),
                                 "--chunk-size", "512", "--chunks", "1"])
    assert r.exit_code == 1 and "--chunk-size 512: a prompt of 512 tokens + a canvas of 82" in r.stderr, r.output
