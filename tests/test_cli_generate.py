"""`dgplug generate` as people use it (issue 14, items 6, 7 and 9): exact lengths, the context
limit, loading and progress lines, the live view off a terminal, JSON."""

import json
import re

import pytest

from typer.testing import CliRunner

from dgplug.cli import app

runner = CliRunner()
WORDS = re.compile(r"(w\d+ )*w\d+")


def test_max_new_tokens_is_exact(tiny_ckpt):
    """The canvas (16) is generated whole; the output is cut to 5 tokens and stderr says so."""
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "--steps", "2", "--max-new-tokens", "5",
                            "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["max_new_tokens"] == 5 and d["canvas_length"] == 16
    from dgplug.loader import load_tokenizer

    assert len(d["ids"]) <= 5  # the text is those ids, decoded as the CLI decodes (special tokens left out)
    assert d["text"] == load_tokenizer(tiny_ckpt).decode(d["ids"], skip_special_tokens=True)
    if d["generated_tokens"] > 5:  # no EOS inside the first 5 tokens: exactly 5, and a note
        assert len(d["ids"]) == 5
        assert "note: the canvas is 16 tokens: generated 16, printing the first 5" in r.stderr
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "--steps", "2", "-n", "32"])
    assert r.exit_code == 0 and "note:" not in r.stderr  # a whole number of canvases: no rounding


def test_lengths_past_the_context_are_refused(tiny_ckpt):
    for n in ("1000000000", "4096"):  # tiny model: max_position_embeddings 4096, canvas 16, prompt 2
        r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "-n", n])
        assert r.exit_code == 1 and "max_position_embeddings" in r.stderr and "context is 4096" in r.stderr, r.output
        assert "canvas 1 of" not in r.output and "loading" not in r.stderr  # refused before the weights are read
    n = 10**23 + 1  # its canvases and positions counted exactly (in floats: 6250000000000000524288 canvases)
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "-n", str(n)])
    assert f"+ {-(-n // 16)} canvas(es) of 16 need {2 + -(-n // 16) * 16} positions;" in r.stderr, r.stderr
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,600000"])
    assert r.exit_code == 1 and "token id 600000 is outside the vocabulary [0, 512)" in r.stderr
    assert "loading" not in r.stderr
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "-n", "0"])
    assert r.exit_code == 1 and "--max-new-tokens 0" in r.stderr


def test_loading_and_progress_lines(tiny_ckpt):
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "--steps", "2", "-n", "48"])
    assert r.exit_code == 0, r.output
    err = r.stderr.splitlines()
    assert err[0] == f"loading {tiny_ckpt}" and err[1].startswith("loaded in ")
    progress = [ln for ln in err if ln.startswith("canvas ")]
    assert [p.split(":")[0] for p in progress] == ["canvas 1 of 3", "canvas 2 of 3", "canvas 3 of 3"]
    assert all("tokens/s" in p for p in progress)
    assert r.stdout.count("\n") == 1 and WORDS.fullmatch(r.stdout.strip())  # only the text on stdout
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6", "--steps", "2", "--quiet"])
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.strip()


def test_live_off_a_terminal(tiny_ckpt):
    """Plain lines on stderr, the canvas detokenised as a whole (tokens separated as the tokenizer
    joins them, not run together), the text once on stdout on a line of its own."""
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--prompt", "w5 w6 w7", "--steps", "3", "-n", "32", "--live"])
    assert r.exit_code == 0, r.output
    frames = [ln for ln in r.stderr.splitlines() if ln.startswith("canvas ")]
    assert len(frames) >= 2 and frames[0].startswith("canvas 1 of 2, step 1 of 3: ")
    for f in frames:
        assert WORDS.fullmatch(f.split(": ", 1)[1]), f
    text = r.stdout.strip()
    assert r.stdout.count("\n") == 1 and WORDS.fullmatch(text) and 16 < len(text.split()) <= 32
    assert r.output.count(text) == 1  # the final text is printed once


def test_json_generate(tiny_ckpt):
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5,6,7", "--steps", "2", "-n", "16", "--json",
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["prompt_tokens"] == 3 and d["threads"] == 1 and d["steps"] == [2] and d["device"] == "cpu"
    assert d["tokens_per_second"] > 0 and len(d["ids"]) == d["new_tokens"]


def test_empty_prompt_and_unknown_words(tiny_ckpt):
    """An empty prompt is one line before loading; words the tokenizer does not know get a note
    (the tiny model's WordLevel vocabulary is w0, w1, ...: "hello" is <unk>), and a failed run
    prints no progress line."""
    for empty in ("", "   "):
        r = runner.invoke(app, ["generate", str(tiny_ckpt), empty])
        assert r.exit_code == 1 and r.stderr == "error: the prompt is empty: give some text (or --ids 1,2,3)\n"
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "w5 hello w6 there", "--no-chat", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "note: 2 of 4 prompt tokens are unknown to this model's tokenizer (<unk>)" in r.stderr
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "w5 w6", "--no-chat", "--steps", "2"])
    assert r.exit_code == 0 and "note:" not in r.stderr


def test_prompt_and_edit_from_standard_input(tiny_ckpt):
    """`dgplug generate PATH - < file`: the prompt (or --edit TEXT) read from standard input gives the
    tokens of the same text given as an argument; text that is not UTF-8 is one error line."""
    args = ["--steps", "2", "-n", "8", "--json", "--no-chat"]
    a = runner.invoke(app, ["generate", str(tiny_ckpt), "-", *args], input=b"\xef\xbb\xbfw5 w6 w7\r\n")  # BOM, CRLF
    b = runner.invoke(app, ["generate", str(tiny_ckpt), "w5 w6 w7", *args])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout)["prompt_tokens"] == 3 and json.loads(a.stdout)["ids"] == json.loads(b.stdout)["ids"]
    edit = ["--steps", "2", "--json", "--ids", "5"]
    a = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "-", *edit], input=b"w5 [[w6]] w7")
    b = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w5 [[w6]] w7", *edit])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout) | {"seconds": 0} == json.loads(b.stdout) | {"seconds": 0}
    bad = runner.invoke(app, ["generate", str(tiny_ckpt), "-"], input=b"w5 \xff w6")
    assert bad.exit_code == 1 and bad.stderr == "error: standard input is not UTF-8 text (invalid start byte at byte 3)\n"
    both = runner.invoke(app, ["generate", str(tiny_ckpt), "-", "--edit", "-"], input=b"w5")
    assert both.exit_code == 1 and "cannot both be read from standard input" in both.stderr
    empty = runner.invoke(app, ["generate", str(tiny_ckpt), "-"], input=b"\n")
    assert empty.exit_code == 1 and "the prompt is empty" in empty.stderr
    # `cat q.txt | dgplug generate PATH`: the text piped in is not read without -, and the error says so
    piped = runner.invoke(app, ["generate", str(tiny_ckpt)], input=b"w5 w6 w7\n")
    assert piped.exit_code == 1 and piped.stderr.count("\n") == 1, piped.stderr
    assert "standard input is read when the prompt is - (dgplug generate PATH - < file.txt)" in piped.stderr
    empty = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5", "--edit", "-"], input=b"\n")
    assert empty.exit_code == 1 and "the --edit text is empty" in empty.stderr
    # bytes a shell passes through undecoded arrive as surrogates: refused before loading
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "w5 \udcff"])
    assert r.exit_code == 1 and r.stderr == "error: the prompt is not UTF-8 text (byte 0xff at character 3)\n"


def test_edit_span_that_looks_like_an_insertion_gets_a_note(tiny_ckpt):
    """[[+x]] is a rewrite of the text "+x" (code may hold it), but it reads like a mistyped [[+N]]:
    the edit runs and a note says how an insertion is written; a plain rewrite gets no note."""
    edit = ["--steps", "2", "--json", "--ids", "5"]
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w5 [[+w6]] w7", *edit])
    assert r.exit_code == 0, r.output
    assert "note: [[+w6]] rewrites the text '+w6'; to insert N new tokens write [[+N]]" in r.stderr
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w5 [[w6]] w7", *edit])
    assert r.exit_code == 0 and "note:" not in r.stderr, r.output
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w5 w6 w7", *edit])  # no span: refused at once
    assert r.exit_code == 1 and r.stderr.startswith("error: --edit: nothing to rewrite") and "loading" not in r.stderr


def test_live_with_quiet_says_it_shows_nothing(tiny_ckpt):
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--ids", "5", "--steps", "1", "--live", "--quiet"])
    assert r.exit_code == 0 and "note: --live shows nothing with --quiet" in r.stderr, r.output


def test_a_typed_bos_is_noted():
    """The Sudoku tokenizer adds <bos>; typed into the prompt as well, it would be there twice."""
    from dgplug.assets import sudoku_model_path

    if sudoku_model_path() is None:
        pytest.skip("the Sudoku package data is missing")
    cells = " ".join(f"r{i // 9 + 1}c{i % 9 + 1}=." for i in range(81))
    r = runner.invoke(app, ["generate", "sudoku", f"<bos> {cells}", "--steps", "1", "--json"])
    assert r.exit_code == 0 and "note: the prompt starts with <bos> twice" in r.stderr, r.output
    assert json.loads(r.stdout)["prompt_tokens"] == 83
    r = runner.invoke(app, ["generate", "sudoku", cells, "--steps", "1", "--json"])
    assert r.exit_code == 0 and "note:" not in r.stderr and json.loads(r.stdout)["prompt_tokens"] == 82
