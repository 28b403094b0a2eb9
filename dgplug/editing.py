"""In-line editing and infilling: keep some tokens of the canvas, denoise only the rest.

A block-diffusion canvas is positional, so an edit is a first canvas plus a lock: the kept tokens
are placed on it and locked (never re-noised, never resampled), the spans to rewrite start as
random tokens like any canvas, and the EntropyBound sampler denoises only those. Sudoku givens
placed on the canvas are the same mechanism (examples/sudoku, `dgplug demo`).

Edit text syntax (CLI ``dgplug generate PATH --edit TEXT``, API ``model.edit(text=...)``):

    plain text       kept as it is
    [[old words]]    rewritten, keeping its number of tokens
    [[+N]]           N new tokens inserted here (infilling)

    "The capital of France is [[Berlin]]."     "def add(a, b):[[+12]]"

The edited text is followed by EOS and pad, locked, so the result has the text's length. With
token ids instead of text: ``model.edit(ids=[...], rewrite=[(start, end), ...])``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import special_token_id
from .errors import InputError

_SPAN = re.compile(r"\[\[(.*?)\]\]", re.S)
_INSERT = re.compile(r"\+(\d+)")
_COUNT = re.compile(r"\+\s*[-+]?\s*\d[\d.]*")  # what was meant as [[+N]], N not a positive whole number


def _stray(text: str, start: int, end: int) -> None:
    """A '[[' or ']]' in text[start:end] has no partner: one error giving its position (0-based)."""
    found = [i for i in (text.find("[[", start, end), text.find("]]", start, end)) if i >= 0]
    if found:
        i = min(found)
        raise InputError(f"edit text: '{text[i:i + 2]}' at character {i} has no matching "
                         f"'{']]' if text[i] == '[' else '[['}'")


def parse_edit(text: str) -> list[tuple[str, str | int]]:
    """Segments of an edit text: ("keep", str), ("rewrite", str) or ("insert", n)."""
    out: list[tuple[str, str | int]] = []
    pos = 0
    for m in _SPAN.finditer(text):
        _stray(text, pos, m.start())
        if "[[" in m.group(1):  # '[[a [[b]]': the ']]' closes the second, the first is never closed
            raise InputError(f"edit text: '[[' at character {m.start()} has no matching ']]'")
        if m.start() > pos:
            out.append(("keep", text[pos:m.start()]))
        body = m.group(1)
        ins = _INSERT.fullmatch(body.strip())
        if ins and int(ins.group(1)) > 0:
            out.append(("insert", int(ins.group(1))))
        elif ins or _COUNT.fullmatch(body.strip()):
            raise InputError(f"edit text: {m.group(0)} at character {m.start()}: [[+N]] inserts N new tokens, "
                             f"N a whole number >= 1 written right after the + (e.g. [[+3]])")
        elif body.strip():
            out.append(("rewrite", body))
        else:
            raise InputError(f"edit text: empty span {m.group(0)!r} at character {m.start()} (put the words to "
                             f"rewrite inside, or [[+N]] to insert N tokens)")
        pos = m.end()
    _stray(text, pos, len(text))
    if text[pos:]:
        out.append(("keep", text[pos:]))
    return out


@dataclass
class EditCanvas:
    ids: torch.Tensor  # [1, canvas_length]: kept tokens, random tokens where rewritten, EOS, pad
    locked: torch.Tensor  # [1, canvas_length] bool
    length: int  # tokens of the edited text on the canvas (kept + rewritten)


def edit_canvas(ids: list[int], rewrite: list[tuple[int, int]], *, canvas_length: int, vocab_size: int,
                eos: int | None, pad: int, generator: torch.Generator | None = None) -> EditCanvas:
    """Token-level edit: `ids` on the canvas, positions in the [start, end) spans of `rewrite` free."""
    n = len(ids)
    if n + (eos is not None) > canvas_length:
        raise InputError(f"edit of {n} tokens does not fit the canvas of {canvas_length} (with its EOS)")
    free = torch.zeros(canvas_length, dtype=torch.bool)
    for a, b in rewrite:
        if not 0 <= a <= b <= n:
            raise InputError(f"rewrite span ({a}, {b}) is outside the {n} tokens of the text")
        free[a:b] = True
    canvas = torch.full((canvas_length,), pad, dtype=torch.long)
    canvas[:n] = torch.tensor(ids, dtype=torch.long)
    if eos is not None:
        canvas[n] = eos
    noise = torch.randint(0, vocab_size, (canvas_length,), generator=generator)
    canvas = torch.where(free, noise, canvas)
    return EditCanvas(canvas[None], ~free[None], n)


def edit_canvas_from_text(tokenizer, text: str, **kw) -> EditCanvas:
    """Tokenise an edit text (segment by segment) and build its canvas (see module docstring)."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for kind, seg in parse_edit(text):
        if kind == "insert":
            piece = [0] * int(seg)
        else:
            piece = tokenizer.encode(seg, add_special_tokens=False)
        if kind != "keep":
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return edit_canvas(ids, spans, **kw)


@dataclass
class EditResult:
    ids: list[int]  # the edited canvas up to (not including) EOS
    text: str | None  # decoded, when the model has a tokenizer
    locked: list[bool]  # per token of `ids`: kept (True) or rewritten
    output: object  # the GenerateOutput


def edit(model, prompt_ids: torch.Tensor, *, text: str | None = None, ids: list[int] | None = None,
         rewrite: list[tuple[int, int]] | None = None, generator: torch.Generator | None = None,
         **generate_kw) -> EditResult:
    """Rewrite spans of a text (or of token ids) in place, conditioned on `prompt_ids` [1, L]."""
    d = model.generation_defaults
    eos = special_token_id(d, "eos_token_id")  # what generate stops on; else the text config's (one to lock)
    eos = eos[0] if isinstance(eos, (list, tuple)) else (model.tc.eos_token_id if eos is None else eos)
    pad = special_token_id(d, "pad_token_id")
    kw = dict(canvas_length=model.cfg.canvas_length, vocab_size=model.tc.vocab_size, eos=eos,
              pad=pad if pad is not None else 0, generator=generator)
    if (text is None) == (ids is None):
        raise InputError("edit: give either text (with [[spans]]) or ids (with rewrite spans)")
    if text is not None:
        if model.tokenizer is None:
            raise InputError(f"{model.source} has no tokenizer: edit token ids instead")
        ec = edit_canvas_from_text(model.tokenizer, text, **kw)
    else:
        ec = edit_canvas(list(ids), list(rewrite or []), **kw)
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise InputError(f"edit: prompt_ids must be [1, length], got {list(prompt_ids.shape)}")
    generate_kw.setdefault("max_new_tokens", model.cfg.canvas_length)
    out = model.generate(prompt_ids, decoder_input_ids=ec.ids, locked=ec.locked, **generate_kw)
    new = out.sequences[0, prompt_ids.shape[1]:prompt_ids.shape[1] + ec.length].tolist()
    text_out = model.tokenizer.decode(new) if model.tokenizer is not None else None
    return EditResult(new, text_out, ec.locked[0, :ec.length].tolist(), out)


@torch.no_grad()
def fill_left_to_right(model, prompt_ids: torch.Tensor, canvas: torch.Tensor, locked: torch.Tensor, *,
                       temperature: float = 0.4, seed: int = 0, on_forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-to-right baseline on a locked canvas, for comparison with EntropyBound: one cell
    per decoder forward, the leftmost unlocked one, set to its argmax and locked; the other
    unlocked cells are re-noised every forward (generator seeded with `seed`), the logits / T feed
    self-conditioning. prompt_ids [B, P] (no padding), canvas / locked [B, L]. Returns the filled
    canvas [B, L] and the forwards each row used [B]; a filled row leaves the batch (as a settled
    row leaves generate's). on_forward(forwards, rows_left): after each forward (a progress hook)."""
    from .model import KVCache

    canvas, lock = canvas.clone(), locked.clone().bool()
    if canvas.shape != lock.shape or canvas.shape[0] != prompt_ids.shape[0]:
        raise InputError(f"fill_left_to_right: canvas {list(canvas.shape)}, locked {list(lock.shape)} and "
                         f"prompt {list(prompt_ids.shape)} must agree in batch and length")
    if not temperature > 0:  # the logits / T feed self-conditioning: 0 would make them inf and NaN
        raise InputError(f"fill_left_to_right: temperature {temperature} must be positive (the pick is the argmax "
                         f"whatever it is; it scales the self-conditioning logits)")
    g = torch.Generator().manual_seed(seed)
    cache = KVCache.empty(model.tc.num_hidden_layers)
    model.encode(prompt_ids, cache)
    dev = canvas.device
    forwards = torch.zeros(canvas.shape[0], dtype=torch.long, device=dev)
    sc, rows, sub = None, None, None
    while not bool(lock.all()):
        todo = (~lock.all(-1)).nonzero()[:, 0]  # rows with blanks left: a filled row leaves the batch
        if rows is None or todo.numel() < rows.numel():
            rows, sub = todo, cache.select(todo)
        forwards[rows] += 1
        logits = model.head(model.denoise(canvas[rows], sub, sc_logits=None if sc is None else sc[rows])) / temperature
        if sc is None:
            sc = torch.zeros(*canvas.shape, logits.shape[-1], dtype=logits.dtype, device=dev)
        sc[rows] = logits
        first = torch.argmax((~lock[rows]).int(), dim=-1)  # leftmost unlocked
        pick = logits[torch.arange(rows.numel(), device=dev), first].argmax(-1)
        canvas[rows, first] = pick
        lock[rows, first] = True
        noise = torch.randint(0, model.tc.vocab_size, tuple(canvas.shape), generator=g)  # on the CPU: same on any device
        canvas = torch.where(lock, canvas, noise.to(dev))
        if on_forward is not None:
            on_forward(int(forwards.max()), int((~lock.all(-1)).sum()))
    return canvas, forwards
