"""CLI input checks (issue 14, items 2, 3, 8 and 10): path kinds before any read, hub ids passed
on, brackets printed as they are, `info` on every format, options that used to be ignored."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dgplug.cli import app

runner = CliRunner()


def _one_error_line(r, *needles):
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    assert r.exit_code == 1 and lines[-1] in r.stderr, r.output  # on stderr, exit status 1
    return lines[-1]


# -- item 2: a file where a directory is expected ----------------------------------------------
def test_file_given_for_a_directory(tiny_ckpt, tmp_path):
    st = tiny_ckpt / "model.safetensors"
    _one_error_line(runner.invoke(app, ["info", str(st)]), "is a safetensors file", str(tiny_ckpt))
    _one_error_line(runner.invoke(app, ["generate", str(st), "--ids", "1"]), "is a safetensors file")
    junk = tmp_path / "notes.bin"
    junk.write_bytes(os.urandom(4096))
    _one_error_line(runner.invoke(app, ["info", str(junk)]), str(junk), "neither GGUF nor safetensors")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\x00" * 64)
    _one_error_line(runner.invoke(app, ["inspect", str(fake)]), str(fake), "not a GGUF file")


def test_gguf_given_to_convert(tiny_ckpt_smooth, tmp_path):
    """A GGUF source is converted (llama-quantize's rules); what it cannot be is one line, nothing written."""
    g = tmp_path / "m.gguf"
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(g), "-q", "F16"]).exit_code == 0
    r = runner.invoke(app, ["convert", str(g), str(tmp_path / "o"), "-q", "int8", "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "o" / "config.json").exists(), r.output
    q8 = tmp_path / "q8.gguf"
    assert runner.invoke(app, ["convert", str(g), str(q8), "-q", "Q8_0", "--quiet"]).exit_code == 0
    _one_error_line(runner.invoke(app, ["convert", str(q8), str(tmp_path / "q4.gguf"), "-q", "Q4_K_M"]),
                    "requantizing is disabled, as in llama-quantize", "--allow-requantize")
    _one_error_line(runner.invoke(app, ["convert", str(q8), str(tmp_path / "q4"), "-q", "int4"]),
                    "the GGUF is already quantized", "--allow-requantize")
    _one_error_line(runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "x.gguf"), "-q", "Q8_0",
                                        "--allow-requantize"]), "--allow-requantize applies to a GGUF source")
    _one_error_line(runner.invoke(app, ["convert", str(q8), str(q8), "-q", "Q8_0", "--overwrite"]), "is the source")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "o", "q8.gguf"]
    r = runner.invoke(app, ["convert", str(q8), str(tmp_path / "q4.gguf"), "-q", "Q4_K_M", "--allow-requantize",
                            "--quiet"])
    assert r.exit_code == 0 and r.stdout.strip() == f"wrote {tmp_path / 'q4.gguf'}", r.output
    # a shard of a split source is not an output either
    assert runner.invoke(app, ["convert", str(g), str(tmp_path / "s.gguf"), "-q", "F16", "--split-max-tensors", "20",
                               "--quiet"]).exit_code == 0
    shards = sorted(tmp_path.glob("s-*.gguf"))
    _one_error_line(runner.invoke(app, ["convert", str(shards[0]), str(shards[-1]), "-q", "Q8_0", "--overwrite"]),
                    "is a shard of the source")
    # llama-quantize's COPY joins the shards (the one-file F16, byte for byte), --keep-split keeps them
    r = runner.invoke(app, ["convert", str(shards[0]), str(tmp_path / "j.gguf"), "-q", "copy", "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "j.gguf").read_bytes() == g.read_bytes(), r.output
    r = runner.invoke(app, ["convert", str(shards[0]), str(tmp_path / "k.gguf"), "-q", "q8_0", "--keep-split", "--quiet"])
    assert r.exit_code == 0 and len(list(tmp_path.glob("k-*-of-*.gguf"))) == len(shards) > 1, r.output
    _one_error_line(runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "c.gguf"), "-q", "COPY"]),
                    "--quant COPY (llama-quantize's) applies to a GGUF source")


def test_inspect_of_the_embedded_model_says_what_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_error_line(runner.invoke(app, ["inspect", "sudoku"]), "sudoku is the embedded model, a safetensors checkpoint",
                    "dgplug convert sudoku sudoku.gguf -q Q8_0")


def test_big_file_is_not_read(tmp_path):
    """A 1 GiB (sparse) file given to generate: one line, and the process never holds it in memory."""
    big = tmp_path / "weights.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    code = ("from dgplug.cli import app\n"
            f"try:\n    app(['generate', {str(big)!r}, '--ids', '1'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            "print('RC', rc, 'RSS_KB', hwm)\n")  # VmHWM: this process's peak (ru_maxrss survives exec)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    rc, rss = r.stdout.split()[1], int(r.stdout.split()[3])
    assert rc == "1" and "neither GGUF nor safetensors" in r.stderr and "codec" not in r.stderr, r.stderr
    assert rss < 400 * 1024, f"peak RSS {rss / 1024:.0f} MiB: the file was read"


def test_missing_paths_and_hub_ids(monkeypatch, tmp_path):
    """'owner/name' that does not exist locally goes to the library unchanged; anything else that
    does not exist is one line."""
    seen = []

    def fake_load(path, **kw):
        seen.append(path)
        raise RuntimeError(f"library got {path!r}")

    monkeypatch.setattr("dgplug.loader.load", fake_load)
    monkeypatch.chdir(tmp_path)
    _one_error_line(runner.invoke(app, ["generate", "google/diffusiongemma-26B-A4B-it", "--ids", "1"]),
                    "library got 'google/diffusiongemma-26B-A4B-it'")
    assert seen == ["google/diffusiongemma-26B-A4B-it"]
    for bad in ("./owner/name", "a/b/c", "x.gguf", "owner/model.safetensors", "/owner/name", "~/owner"):
        _one_error_line(runner.invoke(app, ["generate", bad, "--ids", "1"]), f"no such file or directory: {bad}")
    assert seen == ["google/diffusiongemma-26B-A4B-it"]


# -- item 3: no markup in messages, paths or help ------------------------------------------------
def test_brackets_survive(tiny_ckpt, tiny_ckpt_smooth, tmp_path, monkeypatch):
    _one_error_line(runner.invoke(app, ["info", str(tmp_path / "ck[v2]")]), "ck[v2]")
    ck = tmp_path / "ck[v2]"
    shutil.copytree(tiny_ckpt, ck)
    r = runner.invoke(app, ["info", str(ck)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out[q8].gguf"
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(out), "-q", "Q8_0"])
    assert r.exit_code == 0 and f"wrote {out}" in r.stdout and out.exists(), r.output
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "out[q8].gguf" in r.stdout

    def fake_load(path, **kw):
        raise ValueError("input_ids must be [batch, length>0], got [1, 0] ([bold]x[/bold])")

    monkeypatch.setattr("dgplug.loader.load", fake_load)
    _one_error_line(runner.invoke(app, ["generate", str(ck), "--ids", "1"]),
                    "input_ids must be [batch, length>0], got [1, 0] ([bold]x[/bold])")
    r = runner.invoke(app, ["generate", "--help"])
    flat = " ".join(r.output.replace("│", " ").split())  # the help box wraps lines
    assert "[[spans to rewrite]] and [[+N]] insertions" in flat


# -- item 8: info on every format, inspect on a directory -----------------------------------------
def test_info_every_format(tiny_ckpt_smooth, tmp_path):
    g = tmp_path / "one" / "m.gguf"
    g.parent.mkdir()
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(g), "-q", "Q8_0"]).exit_code == 0
    q = tmp_path / "q8"
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(q), "-q", "int8"]).exit_code == 0
    paths = {"hf": tiny_ckpt_smooth, "gguf": g, "gguf dir": g.parent, "int8": q}
    for name, p in paths.items():
        r = runner.invoke(app, ["info", str(p)])
        assert r.exit_code == 0 and "parameters" in r.stdout, (name, r.output)
    facts = {}
    for name, p in paths.items():
        r = runner.invoke(app, ["info", str(p), "--json"])
        assert r.exit_code == 0, (name, r.output)
        facts[name] = json.loads(r.stdout)
    assert facts["gguf"]["format"] == "GGUF Q8_0" and facts["gguf dir"]["format"] == "GGUF Q8_0"
    assert facts["int8"]["format"] == "int8 (dgplug)" and facts["hf"]["format"] == "safetensors"
    counts = {k: (v["params_total"], v["params_active"], v["layer_pattern"]) for k, v in facts.items()}
    assert len(set(counts.values())) == 1, counts  # one architecture, whatever the format
    r = runner.invoke(app, ["inspect", str(g.parent), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["contract_problems"] == []
    _one_error_line(runner.invoke(app, ["inspect", str(tiny_ckpt_smooth)]), "directory without a .gguf file")


def test_damaged_quantized_checkpoint_is_named(tiny_ckpt_smooth, tmp_path):
    """A dgplug-quantized directory whose shard is missing or cut short: info, generate and convert
    give one line naming the file (info used to print 0 B and exit 0; generate gave safetensors'
    own message, which names no file); a whole one reads per output channel and folds the layers."""
    q = tmp_path / "q8"
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(q), "-q", "int8"]).exit_code == 0
    r = runner.invoke(app, ["info", str(q)])
    flat = " ".join(r.stdout.split())
    assert r.exit_code == 0 and "one scale per output channel" in flat and "group size None" not in flat
    assert "model.decoder.layers.*.router (4 layers)" in flat and "layers.0.router" not in flat, flat
    shard = next(q.glob("*.safetensors"))
    cut = tmp_path / "cut"
    shutil.copytree(q, cut)
    (cut / shard.name).write_bytes(shard.read_bytes()[:4096])
    gone = tmp_path / "gone"
    shutil.copytree(q, gone)
    (gone / shard.name).unlink()
    for cmd in (["info"], ["generate", "--ids", "5"]):
        _one_error_line(runner.invoke(app, [cmd[0], str(cut), *cmd[1:]]), str(cut / shard.name))
        _one_error_line(runner.invoke(app, [cmd[0], str(gone), *cmd[1:]]), shard.name, "missing")
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt_smooth, src)
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[:4096])
    for quant in ("int4", "Q8_0"):
        out = tmp_path / f"out-{quant}"
        _one_error_line(runner.invoke(app, ["convert", str(src), str(out) + (".gguf" if quant == "Q8_0" else ""),
                                            "-q", quant]), str(st))
        assert not list(tmp_path.glob(f"*out-{quant}*")), quant  # nothing left behind


def test_sudoku_names_the_embedded_model(tmp_path, monkeypatch):
    """`sudoku` is the shipped model wherever dgplug is installed, unless a file of that name is here."""
    from dgplug.assets import sudoku_model_path

    if sudoku_model_path() is None:
        pytest.skip("the Sudoku package data is missing")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["info", "sudoku", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["path"] == str(sudoku_model_path()), r.output
    (tmp_path / "sudoku").mkdir()  # a directory of that name here wins
    _one_error_line(runner.invoke(app, ["info", "sudoku"]), "sudoku")


# -- item 10: options that were ignored without a word --------------------------------------------
def test_conflicting_and_bad_options(tiny_ckpt, tiny_ckpt_smooth, tmp_path, monkeypatch):
    _one_error_line(runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5", "--prompt", "w5"]), "not both")
    for q in ("Q8_0", "int8"):
        _one_error_line(runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / f"g-{q}"), "-q", q,
                                            "--group-size", "64"]), "--group-size applies to int4 only")
    line = _one_error_line(runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "x.gguf"), "-q",
                                               "Q9"]), "Q9")
    assert "Q4_K_M" in line and "int4" in line and "fp8" in line
    assert not (tmp_path / "x.gguf").exists()
    monkeypatch.setenv("DGPLUG_OPS", "bogus")
    _one_error_line(runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5"]), "DGPLUG_OPS='bogus'")
    monkeypatch.delenv("DGPLUG_OPS")
    monkeypatch.setenv("DGPLUG_THREADS", "zero")
    _one_error_line(runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5"]), "DGPLUG_THREADS='zero'")
    monkeypatch.delenv("DGPLUG_THREADS")
    _one_error_line(runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5", "--threads", "0"]), "--threads")
    for v in ("-3", "100000"):
        _one_error_line(runner.invoke(app, ["demo", "--sample", v, "--no-live"]), v)
    # --debug after the subcommand: the traceback is raised instead of the one line
    r = runner.invoke(app, ["info", str(tmp_path / "nope"), "--debug"])
    assert r.exit_code == 1 and r.exception is not None and "no such file or directory" in str(r.exception)


def test_directories_that_are_not_checkpoints(tiny_ckpt_smooth, tmp_path):
    """An empty directory, one of GGUF files given to convert, one with neither: each says what it is."""
    (tmp_path / "empty").mkdir()
    for cmd in (["info"], ["generate", "--ids", "5"], ["convert", "-q", "Q8_0"]):
        args = [cmd[0], str(tmp_path / "empty"), *([str(tmp_path / "o.gguf")] if cmd[0] == "convert" else []), *cmd[1:]]
        _one_error_line(runner.invoke(app, args), "is an empty directory: not a checkpoint")
    g = tmp_path / "ggufs"
    g.mkdir()
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(g / "m.gguf"), "-q", "Q8_0"]).exit_code == 0
    r = runner.invoke(app, ["convert", str(g), str(tmp_path / "o.gguf"), "-q", "Q8_0", "--quiet"])
    assert r.exit_code == 0, r.output  # convert, info and generate read a directory holding one
    assert runner.invoke(app, ["info", str(g)]).exit_code == 0
    (g / "n.gguf").write_bytes((g / "m.gguf").read_bytes())
    _one_error_line(runner.invoke(app, ["convert", str(g), str(tmp_path / "o2"), "-q", "int8"]),
                    "holds several .gguf files (m.gguf, n.gguf): name one")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    _one_error_line(runner.invoke(app, ["info", str(tmp_path / "notes")]), "has no config.json and no .gguf file")
    (tmp_path / "notes" / "model.safetensors").write_bytes(b"")
    _one_error_line(runner.invoke(app, ["info", str(tmp_path / "notes")]), "holds safetensors but no config.json")
    (tmp_path / "notes" / "config.json").symlink_to(tmp_path / "blobs" / "abc")
    _one_error_line(runner.invoke(app, ["info", str(tmp_path / "notes")]), "config.json is a broken link")
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "q.safetensors"), "-q", "int8"])
    assert r.exit_code == 0 and "note: int8 writes a directory" in r.stderr and (tmp_path / "q.safetensors").is_dir()


def test_inspect_prints_values_as_written(tiny_ckpt_smooth, tmp_path):
    g = tmp_path / "m.gguf"
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(g), "-q", "Q4_K_M"]).exit_code == 0
    r = runner.invoke(app, ["inspect", str(g), "--json"])
    meta = json.loads(r.stdout)["metadata"]
    assert meta["diffusion-gemma.attention.layer_norm_rms_epsilon"] == 1e-06  # not 9.999999974752427e-07
    assert meta["general.file_type"] == 15
    rows = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in runner.invoke(app, ["inspect", str(g)]).stdout
            .splitlines() if ln.count("│") >= 3}
    assert rows["general.file_type"] == "15 (Q4_K_M)" and rows["diffusion.eb_t_min"] == "0.4", rows


def test_q4_0_on_a_64_wide_model(tiny_ckpt_smooth, tmp_path):
    """The tied embedding's Q6_K falls back to Q8_0 on 64-wide rows, as llama.cpp does."""
    g = tmp_path / "q40.gguf"
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(g), "-q", "Q4_0"])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["inspect", str(g), "--json"]).stdout)
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["token_embd.weight"] == "Q8_0" and info["contract_problems"] == []
    r = runner.invoke(app, ["generate", str(g), "--ids", "5,6", "--steps", "2"])
    assert r.exit_code == 0, r.output


def test_threads_option(tiny_ckpt, monkeypatch):
    args = ["generate", str(tiny_ckpt), "--ids", "5,6", "--steps", "1", "--json", "--quiet"]
    assert json.loads(runner.invoke(app, args + ["--threads", "2"]).stdout)["threads"] == 2
    monkeypatch.setenv("DGPLUG_THREADS", "1")
    assert json.loads(runner.invoke(app, args).stdout)["threads"] == 1
    assert json.loads(runner.invoke(app, args + ["--threads", "2"]).stdout)["threads"] == 2  # the option wins


def test_threads_past_any_machine_are_one_line(tiny_ckpt, tmp_path):
    """--threads 100000 segfaulted (torch's OpenMP pool; convert: a process per thread), 10**20 was
    "Overflow when unpacking long long": one line naming the value, before any work (a subprocess:
    before the fix this crashed the interpreter)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("w5 w6 w7")
    for args in (["generate", str(tiny_ckpt), "--ids", "5"], ["demo", "--no-live"],
                 ["convert", str(tiny_ckpt), str(tmp_path / "x.gguf"), "-q", "Q8_0"],
                 ["imatrix", str(tiny_ckpt), "--calib", str(calib), "-o", str(tmp_path / "im.gguf")]):
        for n in ("100000", str(10**20)):
            r = subprocess.run([sys.executable, "-m", "dgplug.cli", *args, "--threads", n], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("error: "), (args, n, r.stderr)
            assert len(r.stderr.splitlines()) == 1 and f"--threads={n}: give a whole number of threads from 1 to" \
                in r.stderr, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_steps_past_a_million_are_one_line(tiny_ckpt, tmp_path):
    """generate, demo, imatrix: --steps 2**31 - 1 was ended by the OOM killer (22 GB), 10**11 an
    allocator failure of 400 GB naming no option, 10**20 torch's "Overflow when unpacking long long"
    with 60 lines of C++ frames."""
    calib = tmp_path / "calib.txt"
    calib.write_text("w5 w6 w7")
    for args in (["generate", str(tiny_ckpt), "--ids", "5"], ["demo", "--no-live", "-n", "1"],
                 ["imatrix", str(tiny_ckpt), "--calib", str(calib), "-o", str(tmp_path / "im.gguf")]):
        for n in (10**7, 2**31 - 1, 10**11, 10**20):
            line = _one_error_line(runner.invoke(app, [*args, "--steps", str(n)]), f"--steps {n}: give a number from 1 to")
            assert "loading" not in runner.invoke(app, [*args, "--steps", str(n)]).stderr, line  # before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_a_library_error_with_a_cpp_trace_is_one_line(monkeypatch, tiny_ckpt):
    """torch's errors can carry "Exception raised from ..." and its C++ frames: the line before them is the error."""

    def fake_load(path, **kw):
        raise RuntimeError('zeros(): argument \'size\' failed to unpack the object at pos 1 with error "Overflow when '
                           'unpacking long long\nException raised from THPUtils_unpackLong at python_numbers.h:79 '
                           '(most recent call first):\nframe #0: c10::Error::Error() + 0x1\nframe #1: _start + 0x21\n"')

    monkeypatch.setattr("dgplug.loader.load", fake_load)
    line = _one_error_line(runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5"]), "Overflow when unpacking")
    assert "frame #" not in runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5"]).stderr, line


def test_usage_errors_are_one_line_naming_the_value(tiny_ckpt):
    """Through the `dgplug` entry point (click's own usage errors: unknown command or option, missing
    or mistyped value): one line on stderr naming the value and the help to read, exit status 2 (as
    click and argparse); a bare `dgplug` prints the help. Boolean flags show no value placeholder."""

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "dgplug.cli", *args], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200"))
        return r.returncode, r.stdout, r.stderr

    for args, line in [
        # (click's own wording varies between releases: what dgplug adds is checked)
        (["generate", str(tiny_ckpt), "w5", "-n", "abc"], "'abc'"),
        (["generate", str(tiny_ckpt), "w5", "--steps=x1"], "'x1'"),
        (["foo"], "'foo'"),
        (["convert", str(tiny_ckpt), "x.gguf"], "'--quant'"),
        (["generate", str(tiny_ckpt), "w5", "--debug", "true"], "unexpected extra argument"),
    ]:
        code, out, err = cli(*args)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert line in err and err.rstrip().endswith(f"; see: dgplug {args[0] if args[0] != 'foo' else ''}".rstrip()
                                                      + " --help"), (line, err)
    code, out, err = cli()
    assert code == 2 and "Usage: dgplug" in out + err and "Commands" in out + err
    for command in ((), ("generate",), ("demo",), ("convert",), ("imatrix",), ("info",), ("inspect",)):
        code, out, _ = cli(*command, "--help")  # flags, --help included, show no value placeholder
        assert code == 0 and "--help" in out and "<bool>" not in out, (command, out)
    assert "--json" in cli("generate", "--help")[1]


# -- a scripting user's audit ----------------------------------------------------------------------
def test_overwrite_replaces_an_earlier_output_only(tiny_ckpt_smooth, tmp_path):
    """--overwrite replaces an earlier GGUF or imatrix, never a file of the checkpoint or the
    calibration text given as the output (they were silently destroyed)."""
    import filecmp

    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt_smooth, src)
    keep = tmp_path / "keep"
    shutil.copytree(src, keep)
    for name in ("config.json", next(p.name for p in src.glob("*.safetensors"))):
        _one_error_line(runner.invoke(app, ["convert", str(src), str(src / name), "-q", "Q8_0", "--overwrite"]),
                        f"{src / name} is not a GGUF file: --overwrite replaces an earlier GGUF")
    calib = tmp_path / "calib.txt"
    calib.write_text("w5 w6 w7 w8 " * 20)
    for out in (calib, src / "config.json"):
        _one_error_line(runner.invoke(app, ["imatrix", str(src), "--calib", str(calib), "-o", str(out),
                                            "--overwrite", "--chunk-size", "8"]), f"-o {out} is not an imatrix")
    assert not filecmp.dircmp(src, keep).diff_files and calib.read_text() == "w5 w6 w7 w8 " * 20
    g = tmp_path / "m.gguf"  # an earlier output is replaced
    assert runner.invoke(app, ["convert", str(src), str(g), "-q", "Q8_0"]).exit_code == 0
    assert runner.invoke(app, ["convert", str(src), str(g), "-q", "F16", "--overwrite"]).exit_code == 0


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    """Without overwrite, the finished output never replaces one another process put there while it
    ran (two conversions into one name: both reported success and one result was lost)."""
    from dgplug.converters.output import publish_dir, publish_file
    from dgplug.errors import InputError

    out, tmp = tmp_path / "m.gguf", tmp_path / ".m.gguf.tmp"
    out.write_bytes(b"first")
    tmp.write_bytes(b"second")
    with pytest.raises(InputError, match="created by another process while this one ran; not replaced"):
        publish_file(tmp, out, overwrite=False)
    assert out.read_bytes() == b"first" and not tmp.exists()
    tmp.write_bytes(b"second")
    publish_file(tmp, out, overwrite=True)
    assert out.read_bytes() == b"second" and not tmp.exists()
    d, t = tmp_path / "q", tmp_path / ".q.tmp"
    for x, what in ((d, "first"), (t, "second")):
        x.mkdir()
        (x / "f").write_text(what)
    with pytest.raises(InputError, match="created by another process"):
        publish_dir(t, d, overwrite=False)
    assert (d / "f").read_text() == "first" and not t.exists()
    t.mkdir()
    (t / "f").write_text("second")
    publish_dir(t, d, overwrite=True)
    assert (d / "f").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "q"]
    out.unlink()  # a file where the directory goes: replaced only with overwrite
    out.write_bytes(b"a file")
    t.mkdir()
    with pytest.raises(InputError, match="created by another process"):
        publish_dir(t, out, overwrite=False)
    t.mkdir()
    (t / "f").write_text("dir")
    publish_dir(t, out, overwrite=True)
    assert (out / "f").read_text() == "dir" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "q"]


def test_publishing_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """vfat, SMB and some FUSE mounts refuse os.link: an exclusive create then a rename instead, still
    refusing an output that appeared meanwhile; errors name the output, not its temporary name."""
    import errno

    from dgplug.converters import output
    from dgplug.errors import InputError

    def no_link(a, b):
        raise OSError(errno.EPERM, "Operation not permitted", str(a), None, str(b))

    monkeypatch.setattr(output.os, "link", no_link)
    out, tmp = tmp_path / "im.gguf", tmp_path / ".im.gguf.tmp"
    tmp.write_bytes(b"mine")
    output.publish_file(tmp, out, overwrite=False)
    assert out.read_bytes() == b"mine" and not tmp.exists()
    tmp.write_bytes(b"second")
    with pytest.raises(InputError, match="created by another process"):
        output.publish_file(tmp, out, overwrite=False)
    assert out.read_bytes() == b"mine" and not tmp.exists()
    tmp.write_bytes(b"x")
    monkeypatch.setattr(output.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space "
                                                                                        "left on device", str(a))))
    with pytest.raises(OSError) as e:
        output.publish_file(tmp, tmp_path / "new.gguf", overwrite=True)
    assert e.value.filename == str(tmp_path / "new.gguf") and not tmp.exists()


def test_generated_text_printed_as_it_is(tiny_ckpt, monkeypatch):
    """stdout carries the decoded text byte for byte: rich expanded tabs and dropped control characters."""
    import importlib

    generate = importlib.import_module("dgplug.cli.generate")  # the module (dgplug.cli.generate is the command)
    monkeypatch.setattr(generate, "decode", lambda model, ids: "a\tb\x07c\rd")
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5", "--steps", "1", "-n", "4", "--quiet"])
    assert r.exit_code == 0 and r.stdout == "a\tb\x07c\rd\n", repr(r.stdout)


def test_more_errors_that_name_their_target(tmp_path, monkeypatch):
    """A config that is not UTF-8, a file that is no model, a seed out of range, a full disk under
    the imatrix: each one line naming the file, option or output."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes(b'{"a": "\xff"}')
    _one_error_line(runner.invoke(app, ["info", str(bad)]), f"{bad / 'config.json'}: not UTF-8 text (byte 0xff")
    txt = tmp_path / "p.txt"
    txt.write_text("hello")
    _one_error_line(runner.invoke(app, ["convert", str(txt), str(tmp_path / "o.gguf"), "-q", "Q8_0"]),
                    f"{txt} is a file that is neither GGUF nor safetensors: convert reads a Hugging Face checkpoint")
    for cmd in (["generate", "sudoku", "--ids", "5"], ["demo"]):
        r = runner.invoke(app, cmd + ["--seed", str(2**64)])
        assert r.exit_code == 2 and "--seed': a seed is a 64-bit number" in r.stderr, r.output
    import errno

    from dgplug.converters.imatrix import Imatrix

    def full(self, path, fmt="gguf", overwrite=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Imatrix, "save", full)
    calib = tmp_path / "calib.txt"
    calib.write_text("r1c1=5 r1c2=3 " * 10)
    out = tmp_path / "im.gguf"
    _one_error_line(runner.invoke(app, ["imatrix", "sudoku", "--calib", str(calib), "-o", str(out), "--chunks", "1",
                                        "--steps", "1"]), f"{out}: no space left on device")


def test_closed_stdout_is_an_error():
    """Started with stdout closed (>&-), a command would print its result into nothing and exit 0."""
    r = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'from dgplug.cli import entry; entry()' info sudoku >&-"],
                       capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.strip() == "error: stdout is closed: dgplug prints its results there", r.stderr
