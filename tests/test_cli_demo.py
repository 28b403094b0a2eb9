"""`dgplug demo` (issue 14 item 7, issue 13 item 3): progress while the batch is solved, a
one-line summary, --givens / -n / --puzzle / --show with one-line errors, a live view that fits
the terminal."""

import io
import re

import pytest
from typer.testing import CliRunner

from dgplug.assets import sudoku_model_path
from dgplug.cli import app

pytestmark = pytest.mark.skipif(sudoku_model_path() is None, reason="the Sudoku package data is missing")
runner = CliRunner()
WIKI = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SUMMARY = re.compile(r"solve rate (\d+)/(\d+) = \d+% \((.*?)\); blanks without a clash (\d+)/(\d+) = \d+%; ([\d.]+) forwards per grid "
                     r"\(([\d.]+) blanks per forward\); the batch: (\d+) steps in [\d.]+ s, (\d+) blanks/s "
                     r"on \d+ threads?")


def test_demo_band_and_progress():
    r = runner.invoke(app, ["demo", "--no-live", "--givens", "25-29", "-n", "2", "--steps", "4"])
    assert r.exit_code == 0, r.output
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert steps and steps[0].startswith("step 1 of 4: ") and "grids settled" in steps[0]  # no silent batch
    m = SUMMARY.search(r.stdout.splitlines()[-1])
    assert m and m.group(2) == "2" and m.group(3) == "25-29 givens", r.stdout
    assert 2 * (81 - 29) <= int(m.group(5)) <= 2 * (81 - 25) and int(m.group(4)) <= int(m.group(5))
    assert "puzzle 1 (2" in r.stdout and "puzzle 2 (2" in r.stdout  # both grids, drawn once, givens 25-29
    # the blanks are what the model fills: per forward, at most all of them (givens and EOS are locked)
    assert float(m.group(7)) == pytest.approx(int(m.group(5)) / (2 * float(m.group(6))), abs=0.06)


def test_demo_compare_left_to_right():
    r = runner.invoke(app, ["demo", "--no-live", "-n", "3", "--steps", "4", "--compare", "--quiet"])
    assert r.exit_code == 0, r.output
    last = r.stdout.splitlines()[-2:]
    assert SUMMARY.search(last[0]), r.stdout
    m = re.fullmatch(r"left to right, same model: (\d)/3 = \d+%; blanks without a clash (\d+)/(\d+) = \d+%; "
                     r"([\d.]+) forwards per grid \(([\d.]+) blanks per forward\); the batch: (\d+) steps in "
                     r"[\d.]+ s, \d+ blanks/s", last[1])
    assert m, r.stdout
    assert abs(float(m.group(4)) - int(m.group(3)) / 3) < 0.051 and m.group(5) == "1.0"  # one forward per blank
    assert int(m.group(6)) >= float(m.group(4))  # the batch runs as long as its slowest row
    assert int(SUMMARY.search(last[0]).group(8)) <= 4  # --steps 4


def test_demo_own_puzzle():
    r = runner.invoke(app, ["demo", "--no-live", "--puzzle", WIKI, "--steps", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    m = SUMMARY.search(r.stdout.splitlines()[-1])
    assert m and m.group(2) == "1" and m.group(3) == "your puzzle" and m.group(5) == str(WIKI.count("."))
    assert (m.group(1) == "1") <= (m.group(4) == m.group(5))  # solved: every blank without a clash
    assert r.stderr == ""
    # the same puzzle pasted as nine lines, or wrapped by a terminal: whitespace is left out
    from dgplug.cli.demo import parse_puzzle

    assert parse_puzzle("\n".join(WIKI[i:i + 9] for i in range(0, 81, 9))) == parse_puzzle(WIKI[:40] + " \n " + WIKI[40:])
    assert parse_puzzle(" ".join(WIKI)) == WIKI.replace("0", ".")


@pytest.mark.parametrize("args,needle", [
    (["--puzzle", WIKI[:80]], "--puzzle: 80 characters; a puzzle is 81"),
    (["--puzzle", WIKI[:10] + "x" + WIKI[11:]], "character 11 (r2c2) is 'x'"),
    (["--puzzle", "55" + WIKI[2:]], "r1c1=5 and r1c2=5 conflict (row 1)"),
    (["--puzzle", WIKI, "--givens", "30-35"], "leave out --givens and -n"),
    (["--givens", "50-60"], "no puzzle in that band"),
    (["--givens", "x"], "--givens 'x'"),
    (["-n", "0"], "-n/--count 0"),
    (["--count", "1000"], "-n/--count 1000: the embedded bank has"),
    (["--n", "0"], "--n 0"),  # the older names are still understood, and named when at fault
    (["--n", "2", "--sample", "3"], "not both"),
    (["-n", "2", "--n", "3"], "give -n or --n"),
    (["--show", "-1"], "--show -1"),
    (["--puzzles", "-1"], "--puzzles -1"),
    (["--show", "1", "--puzzles", "2"], "not both"),
])
def test_demo_errors_are_one_line(args, needle):
    r = runner.invoke(app, ["demo", "--no-live"] + args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output


def test_unsolved_grid_marks_the_cells_that_clash():
    from dgplug.cli.demo import Sudoku

    solution = [int(ch) for ch in
                "534678912672195348198342567859761423426853791713924856961537284287419635345286179"]
    assert Sudoku.solved(WIKI, solution) and Sudoku.clashes(WIKI, solution) == set()
    g = list(solution)
    g[2], g[3] = 8, 8  # r1c3 (blank) 4 -> 8: now twice in row 1 with r1c4 (a blank set to 8 too)
    assert not Sudoku.solved(WIKI, g)
    bad = Sudoku.clashes(WIKI, g)
    assert {2, 3} <= bad and all(WIKI[i] == "." for i in bad)  # givens are never marked
    g[2] = 0  # a cell left without a digit counts too
    assert 2 in Sudoku.clashes(WIKI, g)
    # piped, where the red marks are gone, each unsolved grid names its clashing cells
    r = runner.invoke(app, ["demo", "--no-live", "--givens", "25-29", "-n", "4", "--show", "4", "--steps", "2"])
    assert r.exit_code == 0, r.output
    verdicts = [re.fullmatch(r"(\d+) of \d+ blanks clash: ((?:r\dc\d ?)+)", ln) for ln in r.stdout.splitlines()
                if "blanks clash" in ln]
    assert verdicts and all(m and int(m.group(1)) == len(m.group(2).split()) for m in verdicts), r.stdout


def test_blanks_are_judged_by_clashes_not_by_one_stored_solution():
    """The bank's puzzles can have several solutions: a solved grid has every blank right."""
    from dgplug.cli.demo import Sudoku, _blanks_ok

    solution = [int(ch) for ch in
                "534678912672195348198342567859761423426853791713924856961537284287419635345286179"]
    n = WIKI.count(".")
    assert _blanks_ok([WIKI], [solution]) == f"blanks without a clash {n}/{n} = 100%"
    g = list(solution)
    g[2], g[3] = 8, 8
    assert _blanks_ok([WIKI, WIKI], [solution, g]) == f"blanks without a clash {2 * n - len(Sudoku.clashes(WIKI, g))}/{2 * n} = " \
        f"{round(100 * (2 * n - len(Sudoku.clashes(WIKI, g))) / (2 * n))}%"


def test_a_band_smaller_than_the_default_count_is_not_an_error():
    """--givens alone asks for a band: with fewer puzzles in it than the default 20, all of them are
    solved (an error once named --n, which the user never gave)."""
    import json

    bank = json.loads((sudoku_model_path() / "puzzles.json").read_text())
    counts = {}
    for p in bank:
        counts[p["givens"]] = counts.get(p["givens"], 0) + 1
    g, k = min(counts.items(), key=lambda kv: kv[1])
    assert k < 20
    r = runner.invoke(app, ["demo", "--no-live", "--givens", str(g), "--steps", "1", "--quiet", "--show", "0"])
    assert r.exit_code == 0, r.output
    m = SUMMARY.search(r.stdout.splitlines()[-1])
    assert m and m.group(2) == str(k) and "puzzle" not in r.stdout.splitlines()[0]


@pytest.mark.parametrize("width,height,want", [(80, 40, 3), (80, 24, 3), (60, 12, 0), (60, 15, 2), (24, 40, 3),
                                               (200, 15, 3), (45, 15, 2), (44, 15, 1)])
def test_live_grids_fit_the_terminal(width, height, want):
    """The live view never grows taller than the terminal (rich leaves such a frame behind)."""
    from dgplug.cli.demo import fitting

    got = fitting(3, width, height)
    assert got == want
    assert 2 + _drawn_height(got, width) <= height - 1 or got == 0
    # on a narrow terminal the status and legend wrap: fewer rows of grids fit
    assert fitting(3, 50, 15, header=3) == 0 and fitting(3, 50, 16, header=3) == 2


def _drawn_height(n: int, width: int) -> int:
    """Lines n grids take when rich lays them out as the demo does (Columns, padding 3) at `width`."""
    from rich.columns import Columns
    from rich.console import Console

    from dgplug.cli.demo import Sudoku

    s = Sudoku.__new__(Sudoku)
    s.to_digit = {d: d for d in range(1, 10)}
    puzzle = "5" * 40 + "." * 41
    grids = [s.render(puzzle, [7] * 81, title=f"puzzle {i} (40 givens)") for i in range(n)]
    console = Console(width=width, file=io.StringIO(), color_system=None)
    with console.capture() as cap:
        console.print(Columns(grids, padding=(0, 3)))
    lines = cap.get().splitlines()
    assert all(len(line.rstrip()) <= width for line in lines)
    return len(lines)


@pytest.mark.parametrize("width", range(24, 161))
def test_grids_per_row_is_what_rich_draws(width):
    """fitting() puts as many grids side by side as rich's Columns does at that width: one more
    would wrap to a new row and the frame would outgrow the terminal (stale frames in the scrollback)."""
    from dgplug.cli.demo import GRID_LINES, fitting

    per_row = fitting(9, width, GRID_LINES + 3)  # room for one row of grids below the two header lines
    assert _drawn_height(per_row, width) == GRID_LINES, (width, per_row)  # one row of grids
    if per_row < 9:
        assert _drawn_height(per_row + 1, width) > GRID_LINES, (width, per_row)  # and no room for one more


@pytest.mark.parametrize("compare", [False, True])
def test_live_view_is_drawn_by_the_model_thread_and_not_timed(monkeypatch, compare):
    """On a terminal the view is drawn only from the thread that runs the model (rich's refresh
    thread would redraw 20 times a second and take the GIL from it), and the seconds the summary
    reports are the model's: a terminal that draws slowly (0.5 s a frame here) is not counted."""
    import threading
    import time

    from rich.live import Live

    from dgplug.cli import common

    monkeypatch.setattr(common.err, "_force_terminal", True)
    draws, refresh = [], Live.refresh

    def slow_refresh(self):
        draws.append((threading.get_ident(), threading.active_count()))
        time.sleep(0.5)
        refresh(self)

    monkeypatch.setattr(Live, "refresh", slow_refresh)
    before = threading.active_count()
    solved = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
    puzzle = "".join("." if i in (3, 30, 57, 80) else c for i, c in enumerate(solved))  # 4 blanks: 4 forwards
    r = runner.invoke(app, ["demo", "--puzzle", puzzle, "--steps", "4"] + (["--compare"] if compare else []))
    assert r.exit_code == 0, r.output
    assert len(draws) >= 3 and set(draws) == {(threading.get_ident(), before)}, draws
    seconds = [float(s) for s in re.findall(r"steps in ([\d.]+) s", r.stdout)]
    assert len(seconds) == 1 + compare and max(seconds) < 1.0 < 0.5 * len(draws), (seconds, len(draws))
