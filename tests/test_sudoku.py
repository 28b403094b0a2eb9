"""The embedded Sudoku model (examples/sudoku, dgplug/data/sudoku): generator, checker, locked givens,
a quick solve-rate floor, and `dgplug demo --no-live`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "sudoku"))
import sudoku as S  # noqa: E402

from dgplug.assets import default_model_path, sudoku_model_path  # noqa: E402

# Measured with the shipped checkpoint and generation config (examples/sudoku/README.md): 95% of 100
# held-out puzzles solved with 36-45 givens, 18 of the 20 this test draws (the 3-layer model before it:
# 90% and 19 of 20). The floor, 16 of 20, leaves two grids for what the thread count's summation order
# can flip; raise it when a better checkpoint ships.
SOLVE_RATE_FLOOR_36 = 0.80


@pytest.fixture(scope="module")
def model():
    import dgplug

    path = sudoku_model_path()
    if path is None:
        pytest.skip("dgplug/data/sudoku is not shipped in this checkout")
    torch.set_num_threads(2)
    return dgplug.load(path, dtype="fp32")


def test_generator_makes_valid_grids_and_puzzles():
    gen = S.Generator(123, pool=8)
    for _ in range(50):
        assert S.is_valid_grid(gen.grid())
    puz, sol = gen.batch(20, 25, 40)
    givens = (puz > 0).sum(1)
    assert givens.min() >= 25 and givens.max() <= 40
    for p, s in zip(puz, sol):
        assert S.is_valid_grid(s)
        assert np.all((p == 0) | (p == s))
        assert S.is_solution(p, s)


def test_checker():
    gen = S.Generator(5, pool=4)
    p, s = gen.puzzle(30)
    bad = s.copy()
    bad[0, 0], bad[0, 1] = bad[0, 1], bad[0, 0]  # two cells swapped in a row: columns break
    assert not S.is_valid_grid(bad) and not S.is_solution(p, bad)
    other = S.Generator(6, pool=4).grid()  # a valid grid that ignores the givens
    assert S.is_valid_grid(other) and not S.is_solution(p, other)
    # uniqueness is not required: with no givens, any valid grid solves it
    assert S.is_solution(np.zeros((9, 9), int), other)
    holes = s.copy()
    holes[4, 4] = 0
    assert not S.is_solution(p, holes)


def test_prompt_and_canvas_format(tmp_path):
    S.save_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    p, s = S.Generator(1, pool=2).puzzle(36)
    text = "<bos> " + " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={x if x else '.'}" for i, x in enumerate(p.reshape(-1)))
    assert tok.convert_tokens_to_ids(text.split()) == S.prompt_ids(p)[0].tolist()
    canvas = S.canvas_ids(s)[0]
    assert len(canvas) == S.CANVAS_LEN and canvas[-1] == S.EOS
    assert tok.decode(canvas[:81].tolist()) == "".join(str(x) for x in s.reshape(-1))
    assert np.array_equal(S.canvas_to_grid(canvas), s.reshape(-1))


def test_default_model_is_the_sudoku_checkpoint(model):
    assert default_model_path() == sudoku_model_path()
    assert model.cfg.canvas_length == S.CANVAS_LEN and model.tc.hidden_size == 256
    assert model.tc.vocab_size == S.VOCAB_SIZE
    assert {"sliding_attention", "full_attention"} <= set(model.tc.layer_types)
    assert model.tokenizer is not None


def test_locked_givens_survive_every_step(model):
    import evaluate as E

    puz, _ = E.puzzles(6, 25, 45)
    start, lock = E.start_canvas(puz, seed=0)
    seen = []

    def hook(s):
        seen.append(s.step)
        assert torch.equal(s.canvas[lock], start[lock])  # the next input canvas: never re-noised
        assert torch.equal(s.draft[lock], start[lock])  # the argmax draft keeps them too

    grids, forwards, _, out = E.solve_entropy(model, puz, seed=0, on_step=hook, max_denoising_steps=8)
    assert seen and max(seen) >= 1
    final = out.sequences[:, -S.CANVAS_LEN:]
    assert torch.equal(final[lock], start[lock])
    assert np.all((puz == 0) | (grids == puz))


def test_solve_rate_floor_quick(model):
    import evaluate as E

    r = E.evaluate(model, 20, 36, 45, "entropy", batch=20)
    assert r["solve_rate"] >= SOLVE_RATE_FLOOR_36, r
    # measured on 100 held-out puzzles: 95% solved, 90.3% of blank cells right (guessing: 11%); on these
    # 20: 90% and 94.2%, in 9.2 forwards per grid. The floors sit below
    assert r["blank_cell_acc"] > 0.90, r
    assert r["forwards_per_grid"] <= 16, r  # the 3-layer model needed 24.1 a grid (100 puzzles)
    assert r["forwards_per_grid"] <= model.generation_defaults["max_denoising_steps"]


def test_left_to_right_uses_one_forward_per_blank(model):
    import evaluate as E

    puz, _ = E.puzzles(3, 40, 45)
    grids, forwards, _ = E.solve_l2r(model, puz)
    assert forwards.tolist() == (puz == 0).sum(1).tolist()
    assert np.all((puz == 0) | (grids == puz))


def test_demo_no_live_runs(model):
    from typer.testing import CliRunner

    from dgplug.cli import app

    res = CliRunner().invoke(app, ["demo", "--no-live", "--puzzles", "1", "--sample", "4", "--steps", "8"])
    assert res.exit_code == 0, res.output
    assert "solve rate" in res.output and "blanks per forward" in res.output and "blanks/s" in res.output


def test_grow_keeps_what_the_model_computes():
    """train.py --grow: the deepened model (copies of the layers, their post-norm gains at 0) computes what the
    checkpoint computes, through transformers' own model; its new layers are copies of the right type."""
    from transformers import DiffusionGemmaForBlockDiffusion

    import train as T

    path = sudoku_model_path()
    if path is None:
        pytest.skip("dgplug/data/sudoku is not shipped in this checkout")
    old = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    n_old = old.config.text_config.num_hidden_layers
    new = T.grow(DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32), n_old + 2).eval()
    types = new.config.text_config.layer_types
    assert len(new.model.decoder.layers) == n_old + 2 and types[n_old:] == types[:2]
    prompt, clean, noisy = T.make_batch(S.Generator(3, pool=4), 4, 25, 45, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = old(input_ids=prompt, decoder_input_ids=noisy).logits
        b = new(input_ids=prompt, decoder_input_ids=noisy).logits
        assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
        new.model.decoder.layers[n_old].post_attention_layernorm.weight.fill_(1.0)  # open one: it must matter
        c = new(input_ids=prompt, decoder_input_ids=noisy).logits
    assert (a - c).abs().max().item() > 1e-2
    with pytest.raises(SystemExit, match="already has"):
        T.grow(old, n_old)


def test_gguf_tokenizer_decodes_as_the_original(tmp_path):
    """The Sudoku vocabulary has no merges (WordLevel, pieces joined on decode): its GGUF's rebuilt
    tokenizer decodes a solved grid to the same text as tokenizer.json (it once put a space between
    every digit), encodes the prompt to the same ids, and keeps the special tokens."""
    from transformers import AutoTokenizer

    from dgplug.converters import gguf_import as gi
    from dgplug.converters.gguf_export import export_gguf

    path = sudoku_model_path()
    if not (path / "model.safetensors").exists():
        pytest.skip("dgplug/data/sudoku is not shipped in this checkout")
    want = AutoTokenizer.from_pretrained(str(path))
    got = gi.tokenizer_from_gguf(export_gguf(path, tmp_path / "s.gguf", quant="Q8_0", progress=False))
    p, s = S.Generator(3, pool=2).puzzle(36)
    text = " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={x if x else '.'}" for i, x in enumerate(p.reshape(-1)))
    assert got.encode(text, add_special_tokens=False) == want.encode(text, add_special_tokens=False)
    # a prompt starts with <bos>, as in training (S.prompt_ids), from the directory and from the GGUF
    # (add_bos_token): without it `dgplug generate sudoku "r1c1=5 ..."` ran all 48 steps to a wrong grid
    assert want(text).input_ids == got(text).input_ids == S.prompt_ids(p)[0].tolist()
    canvas = S.canvas_ids(s)[0].tolist()
    assert got.decode(canvas, skip_special_tokens=True) == want.decode(canvas, skip_special_tokens=True)
    assert got.decode(canvas[:81]) == "".join(str(x) for x in s.reshape(-1))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "unk_token_id"):
        assert getattr(got, name) == getattr(want, name), name
