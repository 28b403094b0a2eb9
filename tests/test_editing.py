"""In-line editing and infilling (dgplug.editing): syntax, locked tokens, the CLI."""

import pytest
import torch
from typer.testing import CliRunner

import dgplug
from dgplug.cli import app
from dgplug.editing import edit_canvas, parse_edit
from dgplug.errors import InputError


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dgplug.load(tiny_ckpt)


def test_parse_edit():
    assert parse_edit("a [[b c]] d[[+3]]") == [("keep", "a "), ("rewrite", "b c"), ("keep", " d"), ("insert", 3)]
    assert parse_edit("no spans") == [("keep", "no spans")]
    with pytest.raises(InputError, match="empty span"):
        parse_edit("a [[]] b")
    assert parse_edit("[[c++]] and [[+2]]") == [("rewrite", "c++"), ("keep", " and "), ("insert", 2)]
    for text, msg in [("a [[b", "'[[' at character 2 has no matching ']]'"),
                      ("a ]] b [[c]]", "']]' at character 2 has no matching '[['"),
                      ("a [[b [[c]] d", "'[[' at character 2 has no matching ']]'"),
                      ("a [[b]] c]]", "']]' at character 9 has no matching '[['"),
                      ("a [[ ]] b", "empty span '[[ ]]' at character 2"),
                      ("a [[+0]] b", "[[+0]] at character 2: [[+N]] inserts N new tokens, N a whole number >= 1"),
                      ("a [[+-3]] b", "[[+-3]] at character 2: [[+N]] inserts N new"),
                      ("a [[+ 3]] b", "written right after the + (e.g. [[+3]])"),
                      ("a [[+2.5]] b", "[[+2.5]] at character 2")]:
        with pytest.raises(InputError) as e:
            parse_edit(text)
        assert msg in str(e.value), (text, str(e.value))


def test_canvas_layout():
    ec = edit_canvas([7, 8, 9, 10], [(1, 3)], canvas_length=8, vocab_size=50, eos=1, pad=0,
                     generator=torch.Generator().manual_seed(0))
    assert ec.locked[0].tolist() == [True, False, False, True, True, True, True, True]
    assert ec.ids[0, [0, 3]].tolist() == [7, 10] and ec.ids[0, 4].item() == 1 and (ec.ids[0, 5:] == 0).all()
    with pytest.raises(InputError, match="does not fit"):
        edit_canvas(list(range(8)), [], canvas_length=8, vocab_size=50, eos=1, pad=0)
    with pytest.raises(InputError, match="outside"):
        edit_canvas([7, 8], [(1, 5)], canvas_length=8, vocab_size=50, eos=1, pad=0)


@pytest.mark.parametrize("rng", ["counter", "transformers"])
def test_nothing_to_rewrite_returns_the_input(model, rng):
    prompt = torch.tensor([[2, 5, 6]])
    r = model.edit(prompt, text="w11 w12 w13 w14", rng=rng, seed=3)
    assert r.text == "w11 w12 w13 w14" and all(r.locked)
    r = model.edit(prompt, ids=[20, 21, 22], rewrite=[], rng=rng, seed=3)
    assert r.ids == [20, 21, 22]


def test_locked_tokens_survive_every_step(model):
    prompt = torch.tensor([[2, 5, 6, 7]])
    seen = []
    r = model.edit(prompt, text="w30 w31 [[w32 w33 w34]] w35 [[+3]] w36", seed=1, max_denoising_steps=6,
                   on_step=lambda s: seen.append((s.draft[0].clone(), s.canvas[0].clone())))
    keep = torch.tensor(r.locked)
    n = len(r.ids)
    assert n == 10 and keep.tolist() == [True, True, False, False, False, True, False, False, False, True]
    kept = torch.tensor([30, 31, 0, 0, 0, 35, 0, 0, 0, 36])
    assert len(seen) >= 1
    for draft, canvas in seen:  # on the canvas and in the argmax draft, at every step
        assert torch.equal(draft[:n][keep], kept[keep]) and torch.equal(canvas[:n][keep], kept[keep])
        assert draft[n].item() == 1  # the locked EOS after the text
    assert torch.equal(torch.tensor(r.ids)[keep], kept[keep])


def test_edit_errors(model):
    with pytest.raises(InputError, match="either text"):
        model.edit(torch.tensor([[2]]))
    with pytest.raises(InputError, match="does not fit"):
        model.edit(torch.tensor([[2]]), text=" ".join(f"w{i}" for i in range(10, 40)))


def test_cli_edit(tiny_ckpt):
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w40 w41 [[w42]] w43", "--steps", "3"])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0].split()  # the text on stdout; loading and summary lines on stderr
    assert first[:2] == ["w40", "w41"] and first[3] == "w43" and "1 of 4 tokens rewritten" in r.output
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w40 [[w41", "--steps", "3"])
    assert r.exit_code == 1 and r.output == "error: edit text: '[[' at character 4 has no matching ']]'\n"
    # insertions past the canvas: refused before loading; a kept text past it: no progress line
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "w5 [[+100]]"])
    assert r.exit_code == 1 and r.output == ("error: --edit: its [[+N]] insertions add 100 tokens; the canvas holds "
                                             "16 with its EOS\n")
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", " ".join(f"w{i}" for i in range(11)) + " [[+6]]"])
    assert r.exit_code == 1 and "does not fit the canvas of 16" in r.stderr and "canvas 1 of 1" not in r.stderr
    # kept words the tokenizer does not know: said, as for a prompt
    r = runner.invoke(app, ["generate", str(tiny_ckpt), "--edit", "hello [[w5]] there", "--steps", "2"])
    assert r.exit_code == 0 and r.stdout.split()[::2] == ["<unk>", "<unk>"], r.output
    assert ("note: 2 of 2 kept tokens of the edit are unknown to this model's tokenizer (<unk>): they are kept as "
            "that token") in r.stderr


def test_fill_left_to_right(model):
    """The left-to-right baseline (dgplug demo --compare, examples/sudoku): one cell per forward,
    leftmost unlocked first, locked cells untouched, the first pick the argmax of one plain forward."""
    from dgplug.editing import fill_left_to_right
    from dgplug.model import KVCache

    C, V = model.cfg.canvas_length, model.tc.vocab_size
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(5, V, (2, 6), generator=g)
    canvas = torch.randint(5, V, (2, C), generator=g)
    locked = torch.rand(2, C, generator=g) < 0.6
    locked[1] = True  # a row with nothing to fill uses no forward
    locked[0, :3] = False
    seen = []
    out, fw = fill_left_to_right(model, prompt, canvas, locked, temperature=0.5, seed=1,
                                 on_forward=lambda n, left: seen.append((n, left)))
    assert fw.tolist() == [int((~locked[0]).sum()), 0]
    n = int((~locked[0]).sum())  # the hook: after every forward, the forwards so far and the rows left
    assert seen == [(k, 1) for k in range(1, n)] + [(n, 0)]
    assert torch.equal(out[locked], canvas[locked])
    cache = KVCache.empty(model.tc.num_hidden_layers)
    model.encode(prompt[:1], cache)
    first = model.head(model.denoise(canvas[:1], cache))[0, 0].argmax().item()
    assert out[0, 0].item() == first
    with pytest.raises(InputError, match="must agree"):
        fill_left_to_right(model, prompt, canvas[:1], locked[:1])
    for t in (0.0, -1.0, float("nan")):  # logits / 0 were inf and NaN in the self-conditioning
        with pytest.raises(InputError, match=f"temperature {t} must be positive"):
            fill_left_to_right(model, prompt, canvas, locked, temperature=t)
