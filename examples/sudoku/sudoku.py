"""Sudoku for DiffusionGemma: puzzle generator, checker, tokenizer and prompt/canvas format.

Format (chat-free):
    prompt = <bos> + 81 cell tokens "r{row}c{col}={digit or .}"   (82 tokens, row-major)
    canvas = 81 digit tokens "1".."9" + <eos>                       (82 tokens = canvas_length)

The prompt's cell tokens carry their coordinates: DiffusionGemma has no absolute position
embedding (RoPE only), so a plain digit string would leave each cell guessing which row, column
and box it is in. The canvas cell i sits at a fixed offset (82) from its prompt cell, which RoPE
finds easily, and the canvas itself stays plain digits. Givens can also be placed on the canvas
and locked (dgplug.generate(..., decoder_input_ids=canvas, locked=mask)): in-line editing.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

# -- vocabulary ---------------------------------------------------------------------------------
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PAD, EOS, BOS = 0, 1, 2
DIGIT0 = 5  # token of digit d (1..9) is DIGIT0 + d - 1
BLANK = 14  # "." (not used on the canvas; kept for text display)
CELL0 = 15  # token of cell i holding v (0 = blank, 1..9) is CELL0 + 10 * i + v
VISION = ["<boi>", "<eoi>", "<image>"]
VOCAB_SIZE = CELL0 + 810 + len(VISION)  # 828
BOI, EOI, IMAGE = VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1
PROMPT_LEN = 82
CANVAS_LEN = 82


def vocab() -> dict[str, int]:
    v = {t: i for i, t in enumerate(SPECIALS)}
    for d in range(1, 10):
        v[str(d)] = DIGIT0 + d - 1
    v["."] = BLANK
    for i in range(81):
        r, c = divmod(i, 9)
        for x in range(10):
            v[f"r{r + 1}c{c + 1}={x if x else '.'}"] = CELL0 + 10 * i + x
    for j, t in enumerate(VISION):
        v[t] = BOI + j
    assert len(v) == VOCAB_SIZE
    return v


def save_tokenizer(path: str | Path) -> None:
    """A WordLevel tokenizer (whitespace-split) over the vocabulary above; adds <bos>; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocab()
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # a prompt starts with <bos>, as in training (and as Gemma's tokenizer and the GGUF's add_bos_token do)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", v["<bos>"])])
    tok.decoder = decoders.Fuse()  # canvas digits decode to "534678912..." with no spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(str(path))


# -- grids --------------------------------------------------------------------------------------
def _backtrack(rng: random.Random) -> np.ndarray:
    """A uniformly-ish random valid grid by randomised backtracking."""
    g = np.zeros(81, dtype=np.int64)
    rows = [set() for _ in range(9)]
    cols = [set() for _ in range(9)]
    boxes = [set() for _ in range(9)]

    def fill(i):
        if i == 81:
            return True
        r, c = divmod(i, 9)
        b = (r // 3) * 3 + c // 3
        ds = list(range(1, 10))
        rng.shuffle(ds)
        for d in ds:
            if d in rows[r] or d in cols[c] or d in boxes[b]:
                continue
            g[i] = d
            rows[r].add(d), cols[c].add(d), boxes[b].add(d)
            if fill(i + 1):
                return True
            rows[r].discard(d), cols[c].discard(d), boxes[b].discard(d)
        g[i] = 0
        return False

    assert fill(0)
    return g.reshape(9, 9)


def _lines(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 9] row (or column) orders that keep the bands: a permutation of the 3 bands, and of the 3 lines in each."""
    bands = rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1)
    within = rng.permuted(np.tile(np.arange(3), (n, 3, 1)), axis=2)
    return (3 * bands[:, :, None] + within).reshape(n, 9)


class Generator:
    """Random valid grids (a pool made by randomised backtracking; each draw re-shuffled by validity-preserving
    transforms: digit relabelling, rows within bands, bands, columns within stacks, stacks, transposition) and
    puzzles (cells kept at random), vectorised over the batch."""

    def __init__(self, seed: int, pool: int = 256):
        self.rng = np.random.default_rng(seed)
        prng = random.Random(seed)
        self.pool = np.stack([_backtrack(prng) for _ in range(pool)])

    def grids(self, n: int) -> np.ndarray:
        """[n, 9, 9] valid grids."""
        rng = self.rng
        g = self.pool[rng.integers(len(self.pool), size=n)]
        digits = np.concatenate([np.zeros((n, 1), np.int64), rng.permuted(np.tile(np.arange(1, 10), (n, 1)), axis=1)], 1)
        g = np.take_along_axis(digits, g.reshape(n, 81), 1).reshape(n, 9, 9)
        g = np.take_along_axis(g, _lines(rng, n)[:, :, None], 1)
        g = np.take_along_axis(g, _lines(rng, n)[:, None, :], 2)
        t = rng.random(n) < 0.5
        g[t] = g[t].transpose(0, 2, 1)
        return g

    def grid(self) -> np.ndarray:
        return self.grids(1)[0]

    def batch(self, n: int, lo: int, hi: int):
        """n puzzles with givens uniform in [lo, hi]: (puzzles [n, 81] with 0 = blank, solutions [n, 81])."""
        sol = self.grids(n).reshape(n, 81)
        givens = self.rng.integers(lo, hi + 1, size=(n, 1))
        rank = np.argsort(np.argsort(self.rng.random((n, 81)), axis=1), axis=1)
        return np.where(rank < givens, sol, 0), sol

    def puzzle(self, givens: int) -> tuple[np.ndarray, np.ndarray]:
        """(puzzle with 0 = blank, solution), both [9, 9]; `givens` cells kept at random."""
        p, s = self.batch(1, givens, givens)
        return p.reshape(9, 9), s.reshape(9, 9)


def is_valid_grid(g) -> bool:
    g = np.asarray(g).reshape(9, 9)
    want = set(range(1, 10))
    for k in range(9):
        if set(g[k].tolist()) != want or set(g[:, k].tolist()) != want:
            return False
        r, c = divmod(k, 3)
        if set(g[3 * r:3 * r + 3, 3 * c:3 * c + 3].reshape(-1).tolist()) != want:
            return False
    return True


def is_solution(puzzle, grid) -> bool:
    """A valid grid that agrees with every given (uniqueness not required)."""
    p, g = np.asarray(puzzle).reshape(-1), np.asarray(grid).reshape(-1)
    return bool(is_valid_grid(g) and np.all((p == 0) | (p == g)))


# -- tokens -------------------------------------------------------------------------------------
def prompt_ids(puzzles: np.ndarray) -> np.ndarray:
    """[n, 81] puzzles (0 = blank) -> [n, 82] prompt ids."""
    puzzles = np.asarray(puzzles).reshape(-1, 81)
    cells = CELL0 + 10 * np.arange(81)[None, :] + puzzles
    return np.concatenate([np.full((len(puzzles), 1), BOS), cells], axis=1)


def canvas_ids(grids: np.ndarray) -> np.ndarray:
    """[n, 81] digits (1..9) -> [n, 82] canvas ids (digits + <eos>); a 0 maps to <pad>."""
    grids = np.asarray(grids).reshape(-1, 81)
    d = np.where(grids > 0, DIGIT0 + grids - 1, PAD)
    return np.concatenate([d, np.full((len(grids), 1), EOS)], axis=1)


def canvas_to_grid(ids) -> np.ndarray:
    """[.., 82+] canvas ids -> [.., 81] digits (0 where the token is not a digit)."""
    ids = np.asarray(ids)[..., :81]
    ok = (ids >= DIGIT0) & (ids < DIGIT0 + 9)
    return np.where(ok, ids - DIGIT0 + 1, 0)


def format_grid(g, givens=None) -> str:
    g = np.asarray(g).reshape(9, 9)
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = []
        for c in range(9):
            if c and c % 3 == 0:
                row.append("|")
            row.append(str(g[r, c]) if g[r, c] else ".")
        lines.append(" ".join(row))
    return "\n".join(lines)
