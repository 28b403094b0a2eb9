"""The dgplug CLI: info, generate (ids and prompt), errors as one line."""

import json

from typer.testing import CliRunner

from dgplug.cli import app

runner = CliRunner()


def test_info(tiny_ckpt):
    r = runner.invoke(app, ["info", str(tiny_ckpt)])
    assert r.exit_code == 0, r.output
    assert "SSFF" in r.output.replace(" ", "") or "layer pattern" in r.output
    assert "active per token" in r.output and "float32" in r.output


def test_info_piped_is_one_line_a_fact(tiny_ckpt):
    """Piped (`| grep context`, `> info.txt`), a fact is one line with its name, without the table's
    wrapping at 80 columns (the architecture's `context 4096)` alone on a line) or trailing spaces."""
    lines = runner.invoke(app, ["info", str(tiny_ckpt)]).stdout.splitlines()
    keys = ["architecture", "layer pattern", "attention", "experts", "parameters", "format", "dtype", "vision tensors",
            "size"]
    assert [ln[:16].strip() for ln in lines] == keys, lines
    assert all(ln == ln.rstrip() and ln[16:].strip() for ln in lines), lines
    assert "canvas 16, context 4096)" in lines[0] and "embedding)" in lines[4], lines


def test_generate_ids_and_prompt(tiny_ckpt):
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6,7", "--steps", "2", "--max-new-tokens", "16"])
    assert r.exit_code == 0, r.output
    assert "tokens per forward" in r.output and "tokens/s" in r.output
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--prompt", "w5 w6 w7", "--steps", "2", "--live"])
    assert r.exit_code == 0, r.output
    assert "w" in r.output


def test_generate_prompt_as_argument(tiny_ckpt):
    """`dgplug generate PATH "TEXT"` (as llama-cli -p / ollama run): the same tokens as --prompt TEXT."""
    args = ["--steps", "2", "--max-new-tokens", "8", "--json"]
    a = runner.invoke(app, ["generate", str(tiny_ckpt), "w5 w6 w7", *args])
    b = runner.invoke(app, ["generate", str(tiny_ckpt), "--prompt", "w5 w6 w7", *args])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout)["ids"] == json.loads(b.stdout)["ids"]
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "w5", "--prompt", "w6"])
    assert r.exit_code == 1 and "not both" in r.output and "Traceback" not in r.output


def test_generate_transformers_rng_is_deterministic(tiny_ckpt):
    args = ["generate", str(tiny_ckpt), "--ids", "5,6,7", "--steps", "3", "--rng", "transformers", "--seed", "4"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0 and a.output.splitlines()[0] == b.output.splitlines()[0]


def test_errors_are_one_line(tiny_ckpt, tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and "Traceback" not in r.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = runner.invoke(app, ["generate", str(bad), "--ids", "1"])
    assert r.exit_code == 1 and "not a DiffusionGemma config" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "1,x"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_convert_info_inspect(tiny_ckpt_smooth, tmp_path):
    # the tiny model's rows (64) are not multiples of 256: K-quant tensors fall back as llama.cpp does
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "m.gguf"), "--quant", "Q8_0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0 and "token_embd.weight" in r.output and "matches" in r.output, r.output
    # piped (80 columns here): whole keys and tensor names, not cut with an ellipsis
    assert "diffusion-gemma.expert_feed_forward_length " in r.stdout and "…" not in r.stdout, r.stdout
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "q8"), "--quant", "int8"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(tmp_path / "q8")])
    assert r.exit_code == 0 and "int8 (dgplug)" in r.output and "packed" in r.output
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "x.gguf"), "--quant", "Q9"])
    assert r.exit_code == 1 and "Q9" in r.output and not (tmp_path / "x.gguf").exists()


def test_inspect_an_imatrix(tmp_path):
    """inspect reads any GGUF: an importance matrix gets its table and a line saying what it is, exit 0
    (it is not a model, so there is no model contract to fail)."""
    import numpy as np

    from dgplug.converters.imatrix import Entry, Imatrix

    path = Imatrix({"blk.0.ffn_up.weight": Entry(np.ones((1, 8)), np.ones(1, np.int64))}, ["calib.txt"], 1, 16) \
        .save(tmp_path / "im.gguf")
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 0 and "blk.0.ffn_up.weight.in_sum2" in r.stdout, r.output
    assert "an importance matrix (general.type imatrix), not a model" in r.stdout and "contract" not in r.stdout
