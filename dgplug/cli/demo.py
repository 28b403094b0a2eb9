"""`dgplug demo`: the embedded Sudoku model solving a batch of puzzles on the canvas.

The givens are placed on the canvas and locked (the in-line editing mechanism); every blank is
denoised in parallel. The whole batch is solved at once while the live view redraws the grids
with the fewest givens step by step, side by side, as many as fit the terminal; then those grids
and one summary line: solved, blanks without a clash, forwards per grid, blanks filled per
forward, and the batch's steps, seconds and blanks/s (the givens are locked, not generated; the
seconds are the model's: drawing the view and its pauses are not counted).
The bank's puzzles had cells removed at random, so many have several solutions: a grid counts as
solved when it is valid and keeps every given, and a blank as right when its digit
clashes with none in its row, column and box (the stored solution is only one of the answers).
Puzzles come from the bank shipped beside the model (dgplug/data/sudoku/puzzles.json, bands of
givens) or from --puzzle (81 characters).
"""

from __future__ import annotations

import json
import math
import time

from rich.columns import Columns
from rich.console import Group
from rich.text import Text

from .common import CLIError, STATE, LiveView, err, out, result_line, say

UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
         + [[(br + r) * 9 + bc + c for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)])
UNIT_NAMES = [f"row {r + 1}" for r in range(9)] + [f"column {c + 1}" for c in range(9)] + \
             [f"box {b + 1}" for b in range(9)]
DEFAULT_BAND = "36-45"
DEFAULT_N = 20


def parse_band(s: str) -> tuple[int, int]:
    """'25-29' or '30' -> (lo, hi)."""
    lo, sep, hi = s.partition("-")
    try:
        band = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise CLIError(f"--givens {s!r}: give a band such as 25-29 (or one number)") from None
    if not 0 <= band[0] <= band[1] <= 81:
        raise CLIError(f"--givens {s!r}: a band LO-HI with 0 <= LO <= HI <= 81")
    return band


def parse_puzzle(s: str) -> str:
    """An 81-character puzzle (digits 1-9; '.' or 0 for a blank) -> the '.'-blank form, checked.
    Whitespace is left out: a puzzle pasted as nine lines, or wrapped by a terminal, reads the same."""
    p = "".join(s.split())
    if len(p) != 81:
        raise CLIError(f"--puzzle: {len(p)} characters; a puzzle is 81 (row by row, digits 1-9, '.' or 0 for blanks; "
                       f"spaces and line breaks are left out)")
    for i, ch in enumerate(p):
        if ch not in "123456789.0":
            raise CLIError(f"--puzzle: character {i + 1} (r{i // 9 + 1}c{i % 9 + 1}) is {ch!r}; "
                           f"use digits 1-9, and '.' or 0 for blanks")
    p = p.replace("0", ".")
    for unit, name in zip(UNITS, UNIT_NAMES):
        seen = {}
        for i in unit:
            if p[i] == ".":
                continue
            if p[i] in seen:
                j = seen[p[i]]
                raise CLIError(f"--puzzle: r{j // 9 + 1}c{j % 9 + 1}={p[j]} and r{i // 9 + 1}c{i % 9 + 1}={p[i]} "
                               f"conflict ({name})")
            seen[p[i]] = i
    return p


class Sudoku:
    """Puzzles <-> the model's prompt and canvas tokens (the format of examples/sudoku)."""

    def __init__(self, model, seed: int):
        self.model, self.seed = model, seed
        tok = model.tokenizer
        self.tok = tok
        self.digit = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
        self.to_digit = {t: d + 1 for d, t in enumerate(self.digit)}

    def encode(self, puzzles: list[str]):
        """Prompt ids (the puzzle in the prompt), the canvas with the givens placed, the lock mask."""
        import torch

        tok, m = self.tok, self.model
        texts = [[tok.bos_token] + [f"r{i // 9 + 1}c{i % 9 + 1}={ch}" for i, ch in enumerate(p)] for p in puzzles]
        prompt = torch.tensor([tok.convert_tokens_to_ids(t) for t in texts])
        g = torch.Generator().manual_seed(self.seed)
        canvas = torch.randint(0, m.tc.vocab_size, (len(puzzles), m.cfg.canvas_length), generator=g)
        lock = torch.zeros_like(canvas, dtype=torch.bool)
        for b, p in enumerate(puzzles):
            for i, ch in enumerate(p):
                if ch != ".":
                    canvas[b, i], lock[b, i] = self.digit[int(ch) - 1], True
            canvas[b, 81], lock[b, 81] = tok.eos_token_id, True
        return prompt, canvas, lock

    def grid(self, ids) -> list[int]:
        return [self.to_digit.get(int(t), 0) for t in ids[:81]]

    @staticmethod
    def solved(puzzle: str, g: list[int]) -> bool:
        if any(ch != "." and int(ch) != v for ch, v in zip(puzzle, g)):
            return False
        return all(sorted(g[i] for i in u) == list(range(1, 10)) for u in UNITS)

    @staticmethod
    def clashes(puzzle: str, g: list[int]) -> set[int]:
        """Filled-in cells whose digit repeats in their row, column or box (or is missing)."""
        bad = {i for i, v in enumerate(g) if puzzle[i] == "." and not v}
        for u in UNITS:
            for i in u:
                if puzzle[i] == "." and sum(g[j] == g[i] for j in u) > 1:
                    bad.add(i)
        return bad

    def render(self, puzzle: str, ids, accepted=None, title: str = "", wrong: set[int] = frozenset()) -> Text:
        text = Text()
        text.append(title + "\n", style="cyan")
        for r in range(9):
            if r and r % 3 == 0:
                text.append("------+-------+------\n", style="dim")
            for c in range(9):
                i = r * 9 + c
                if c and c % 3 == 0:
                    text.append("| ", style="dim")
                d = self.to_digit.get(int(ids[i]))
                if puzzle[i] != ".":
                    text.append(puzzle[i], style="bold")
                elif d is None:
                    text.append("?", style="red")
                elif i in wrong:
                    text.append(f"{d}", style="bold red")
                else:
                    text.append(f"{d}", style="bold green" if accepted is None or accepted[i] else "dim")
                text.append(" " if c < 8 else "\n" if r < 8 else "")  # 21 wide as the rules; 12 lines
        return text


def pick(bank: list[dict], band: tuple[int, int], n: int | None, n_flag: str = "-n") -> list[dict]:
    """The first n puzzles (default DEFAULT_N) of the bank in the band; n None: as many as there are
    when the band holds fewer than the default."""
    have = [p for p in bank if band[0] <= p["givens"] <= band[1]]
    if not have:
        lo, hi = min(p["givens"] for p in bank), max(p["givens"] for p in bank)
        raise CLIError(f"--givens {band[0]}-{band[1]}: the embedded bank has no puzzle in that band "
                       f"(it has {len(bank)} puzzles with {lo}-{hi} givens)")
    if n is not None and n > len(have):
        many = "puzzle" if len(have) == 1 else "puzzles"
        raise CLIError(f"{n_flag} {n}: the embedded bank has {len(have)} {many} with {band[0]}-{band[1]} givens")
    return have[:n or DEFAULT_N]


GRID_LINES = 12  # a drawn grid: its title, 9 rows and 2 rules
GRID_WIDTH = 24  # 21 characters and the gap of 3 to the next one (Columns' padding)


def fitting(wanted: int, width: int, height: int, header: int = 2) -> int:
    """How many of `wanted` grids a live view of width x height shows: side by side, in as many
    rows as fit below the `header` lines (status and legend, as wrapped at this width) and one
    spare (a view taller than the terminal would leave its last frame behind)."""
    per_row = max(1, (width + 3) // GRID_WIDTH)
    rows = max(0, (height - header - 1) // GRID_LINES)
    return min(wanted, per_row * rows)


def run(n: int | None, givens: str | None, puzzle: str | None, shown: int, steps: int | None, seed: int,
        live: bool, threads: int | None, device: str | None, n_flag: str = "-n", compare: bool = False,
        show_flag: str = "--show") -> None:
    from . import common

    if n is not None and n < 1:
        raise CLIError(f"{n_flag} {n}: give a number of puzzles >= 1")
    common.at_least(show_flag, shown, 0, "a number of grids to show")
    common.steps_arg(steps)
    if puzzle is not None and (givens is not None or (n is not None and n != 1)):
        raise CLIError("--puzzle solves one given puzzle: leave out --givens and -n")
    band = parse_band(givens or DEFAULT_BAND)
    mine = parse_puzzle(puzzle) if puzzle is not None else None
    user_threads = common.threads_arg(threads)
    device = common.device_arg(device)

    from dgplug.assets import default_model_path

    path = default_model_path()
    if not (path / "puzzles.json").exists():
        return _tiny_fallback(path, steps, seed, user_threads, device)
    bank = json.loads((path / "puzzles.json").read_text())
    items = [dict(puzzle=mine, givens=81 - mine.count("."), solution=None)] if mine else \
        pick(bank, band, n, n_flag)

    from dgplug import load

    from .info import architecture

    common.set_threads(user_threads)
    say(f"loading the embedded model {path}")
    model = load(path, dtype="fp32", device=device)
    nthreads = common.set_threads(user_threads, architecture(model.cfg)["params_total"])
    tc = model.tc
    say(f"Sudoku DiffusionGemma ({tc.num_hidden_layers} layers, hidden {tc.hidden_size}, {tc.num_experts} experts "
        f"top-{tc.top_k_experts}, canvas {model.cfg.canvas_length}): givens placed on the canvas and locked, "
        f"every blank denoised in parallel; {len(items)} puzzle{'s' if len(items) > 1 else ''} in one batch")
    S = Sudoku(model, seed)
    puzzles = [it["puzzle"] for it in items]
    prompt, canvas, lock = S.encode(puzzles)
    start = canvas.clone()  # the left-to-right comparison starts from the same canvas
    N = steps or int(model.generation_defaults["max_denoising_steps"])
    # the grids drawn: those with the fewest givens (the last to settle), in batch order
    drawn = sorted(sorted(range(len(items)), key=lambda k: items[k]["givens"])[:min(shown, len(items))])
    view = None
    animate = live and err.is_terminal and not STATE["quiet"]
    if err.is_terminal and not STATE["quiet"]:
        view = LiveView(20)
    legend = Text.assemble(("given", "bold"), "  ", ("accepted", "bold green"), "  ",
                           ("draft (not yet accepted)", "dim"), "  ", ("? not a digit", "red"),
                           ("  (drawing not timed)" if animate else "", "dim"))
    W = max(err.size.width, 1)
    widest_status = f"step {N} of {N}: {len(items)} of {len(items)} grids settled, 999.9s"
    header = math.ceil(len(widest_status) / W) + math.ceil(len(legend.plain) / W)  # as wrapped at this width
    watched = drawn[:fitting(len(drawn), W, err.size.height, header)] if animate else []
    t0, drawing = time.perf_counter(), 0.0  # seconds in the hook after the step's own wait: not the model's

    def hook(s):
        nonlocal drawing
        if STATE["quiet"]:
            return
        settled = int(s.finished.sum())  # waits for the step (on a GPU): the model's time
        t = time.perf_counter()
        status = Text(f"step {s.step} of {N}: {settled} of {len(items)} grids settled, "
                      f"{t - t0 - drawing:.1f}s", style="cyan")
        if view is None:  # not a terminal: plain lines
            err.print(status)
        else:
            frames = [S.render(puzzles[k], s.draft[k].tolist(), s.accepted[k].tolist(),
                               f"puzzle {k + 1} ({items[k]['givens']} givens)") for k in watched]
            view.update(Group(status, legend, Columns(frames, padding=(0, 3))) if frames else status, now=animate)
            if animate:
                time.sleep(0.08)  # slow enough to watch
        drawing += time.perf_counter() - t

    try:
        res = model.generate(prompt, decoder_input_ids=canvas.to(model.device), locked=lock.to(model.device),
                             max_denoising_steps=steps, seed=seed, on_step=hook)
        dt = time.perf_counter() - t0 - drawing
    finally:
        if view is not None:
            view.stop()
    L0 = prompt.shape[1]
    grids = [S.grid(res.sequences[b, L0:].tolist()) for b in range(len(items))]
    ok = [S.solved(p, g) for p, g in zip(puzzles, grids)]
    finals = []
    for k in drawn:
        bad = set() if ok[k] else S.clashes(puzzles[k], grids[k])
        verdict = "solved" if ok[k] else f"{len(bad)} of {puzzles[k].count('.')} blanks clash"  # in red
        if bad and not out.is_terminal:  # piped, the red is gone: name the cells
            verdict += ": " + " ".join(f"r{i // 9 + 1}c{i % 9 + 1}" for i in sorted(bad))
        finals.append(S.render(puzzles[k], res.sequences[k, L0:].tolist(), wrong=bad,
                               title=f"puzzle {k + 1} ({items[k]['givens']} givens)\n{verdict}"))
    if out.is_terminal:  # side by side; piped, one grid after another
        out.print(Columns(finals, padding=(0, 3)), soft_wrap=False)
    else:
        for grid in finals:
            out.print(grid)
    # the model fills the blanks; the givens and EOS are locked, not generated, so they count nowhere
    blanks = sum(p.count(".") for p in puzzles)
    forwards = int(res.forwards.sum())
    where = "your puzzle" if mine else f"{band[0]}-{band[1]} givens"
    # a settled grid leaves the batch; the batch runs until its last grid settles (or the step limit)
    result_line(f"solve rate {sum(ok)}/{len(items)} = {100 * sum(ok) / len(items):.0f}% ({where}); "
                f"{_blanks_ok(puzzles, grids)}; {forwards / len(items):.1f} forwards per grid "
                f"({blanks / max(forwards, 1):.1f} blanks per forward); {_batch(res.forwards, blanks, dt)} on "
                f"{nthreads} thread{'s' if nthreads > 1 else ''}")
    if compare:
        from dgplug.editing import fill_left_to_right

        say("left to right: the same puzzles from the same canvas, one cell per forward, leftmost blank first")
        ltr_view = LiveView(10) if err.is_terminal and not STATE["quiet"] else None
        t0, drawing = time.perf_counter(), 0.0

        def progress(forwards, left):  # its arguments were read before the call: the model's time
            nonlocal drawing
            t = time.perf_counter()
            ltr_view.update(Text(f"left to right: forward {forwards}, {left} of {len(items)} grids with blanks left, "
                                 f"{t - t0 - drawing:.1f}s", style="cyan"))
            drawing += time.perf_counter() - t

        try:
            filled, fw = fill_left_to_right(model, prompt.to(model.device), start.to(model.device),
                                            lock.to(model.device), seed=seed,
                                            on_forward=progress if ltr_view is not None else None)
            dt = time.perf_counter() - t0 - drawing
        finally:
            if ltr_view is not None:
                ltr_view.stop()
        grids = [S.grid(filled[b].tolist()) for b in range(len(items))]
        ok = [S.solved(p, g) for p, g in zip(puzzles, grids)]
        result_line(f"left to right, same model: {sum(ok)}/{len(items)} = {100 * sum(ok) / len(items):.0f}%; "
                    f"{_blanks_ok(puzzles, grids)}; {float(fw.float().mean()):.1f} forwards per grid "
                    f"({blanks / max(int(fw.sum()), 1):.1f} blanks per forward); {_batch(fw, blanks, dt)}")


def _batch(forwards, blanks: int, seconds: float) -> str:
    """'the batch: 48 steps in 2.8 s, 297 blanks/s': as many steps as its slowest row's forwards."""
    return f"the batch: {int(forwards.max())} steps in {seconds:.1f} s, {blanks / seconds:.0f} blanks/s"


def _blanks_ok(puzzles: list[str], grids: list[list[int]]) -> str:
    """'blanks without a clash 685/816 = 84%': blank cells holding a digit that repeats nowhere in
    their row, column or box (all of a solved grid's; the stored solution is not the yardstick,
    since a puzzle of the bank can have several)."""
    blanks = sum(p.count(".") for p in puzzles)
    good = blanks - sum(len(Sudoku.clashes(p, g)) for p, g in zip(puzzles, grids))
    return f"blanks without a clash {good}/{blanks} = {100 * good / max(blanks, 1):.0f}%"


def _tiny_fallback(path, steps, seed, user_threads, device) -> None:
    """No Sudoku model shipped (package data missing): plain generation with the tiny random model."""
    import torch

    from dgplug import load

    from . import common

    common.set_threads(user_threads, 0)
    model = load(path, device=device)
    res = model.generate(torch.tensor([[2, 7, 8, 9, 10, 11]]), max_new_tokens=model.cfg.canvas_length,
                         max_denoising_steps=steps or 16, seed=seed)
    out.print(f"no Sudoku model shipped; tiny random default at {path}: "
              f"{float(res.tokens_per_forward[0]):.2f} tokens per forward, denoising steps {res.steps}")
