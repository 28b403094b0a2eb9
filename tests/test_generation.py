"""Generation in the default (fused, counter-based RNG) mode: determinism, hooks, locked positions."""

import pytest
import torch

import dgplug
from dgplug.errors import InputError


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dgplug.load(tiny_ckpt)


def test_fused_mode_deterministic_in_seed(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    a = model.generate(ids, max_new_tokens=32, max_denoising_steps=3, seed=11)
    b = model.generate(ids, max_new_tokens=32, max_denoising_steps=3, seed=11)
    c = model.generate(ids, max_new_tokens=32, max_denoising_steps=3, seed=12)
    assert a.sequences.shape == (2, 4 + 32)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert torch.equal(a.sequences[:, :4], ids)
    assert a.steps == [3, 3] and bool((a.forwards == 6).all())


def test_on_step_hook(model):
    seen = []
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, max_denoising_steps=4, seed=0,
                   on_step=lambda s: seen.append((s.canvas_index, s.step, tuple(s.draft.shape), s.accepted.dtype)))
    assert [s[1] for s in seen] == [1, 2, 3, 4]
    assert all(s[2] == (1, 16) and s[3] == torch.bool for s in seen)


def test_locked_positions_survive_every_step(model):
    C = model.cfg.canvas_length
    start = torch.randint(5, 500, (1, C), generator=torch.Generator().manual_seed(0))
    locked = torch.zeros(1, C, dtype=torch.bool)
    locked[0, ::3] = True
    steps = []

    def check(s):
        steps.append(s.step)
        assert torch.equal(s.canvas[locked], start[locked])  # never re-noised
        assert torch.equal(s.draft[locked], start[locked])
        assert bool(s.accepted[locked].all())

    for rng in ("counter", "transformers"):
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=C, max_denoising_steps=4, rng=rng,
                             decoder_input_ids=start, locked=locked, on_step=check, eos_token_id=[9999])
        assert torch.equal(out.sequences[0, 3:][locked[0]], start[locked])
    assert len(steps) == 8


def test_edit_with_nothing_to_rewrite_returns_input(model):
    C = model.cfg.canvas_length
    start = torch.randint(5, 500, (1, C), generator=torch.Generator().manual_seed(1))
    out = model.generate(torch.tensor([[5, 6]]), max_new_tokens=C, max_denoising_steps=3,
                         decoder_input_ids=start, locked=torch.ones(1, C, dtype=torch.bool), eos_token_id=[9999])
    assert torch.equal(out.sequences[0, 2:], start[0])


def test_bad_inputs(model):
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate(torch.tensor([[5, 100000]]), max_new_tokens=4)
    with pytest.raises(InputError, match="rng='philox'"):
        model.generate(torch.tensor([[5]]), rng="philox")
    with pytest.raises(InputError, match="bad sampler settings"):
        model.generate(torch.tensor([[5]]), t_min=0.9, t_max=0.5)
    ids = torch.tensor([[10, 11, 12, 13]])
    C = model.cfg.canvas_length
    kw = dict(max_new_tokens=C, max_denoising_steps=1)
    bad = [(dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), "attention_mask has shape \\[1, 3\\]"),
           (dict(attention_mask=torch.ones(1, 1, 4)), "attention_mask has shape \\[1, 1, 4\\]"),
           (dict(locked=torch.ones(1, C, dtype=torch.bool)), "locked needs decoder_input_ids"),
           (dict(decoder_input_ids=torch.ones(1, C + 1, dtype=torch.long)), f"first canvas is .*\\[1, {C}\\]"),
           (dict(decoder_input_ids=torch.ones(1, C, dtype=torch.long), locked=torch.ones(1, 2, dtype=torch.bool)),
            "locked has shape \\[1, 2\\]")]
    for extra, msg in bad:  # each used to run (a mask of the wrong size, noise locked) or fail later
        with pytest.raises(InputError, match=msg):
            model.generate(ids, **extra, **kw)
    with pytest.raises(InputError, match="input_ids must be a torch tensor, got list"):
        model.generate([[10, 11]], **kw)
