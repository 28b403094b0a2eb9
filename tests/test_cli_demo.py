"""`dgplug demo` (issue 14 item 7, issue 13 item 3): progress while the batch is solved, a
one-line summary, --givens / --n / --puzzle with one-line errors."""

import re

import pytest
from typer.testing import CliRunner

from dgplug.assets import sudoku_model_path
from dgplug.cli import app

pytestmark = pytest.mark.skipif(sudoku_model_path() is None, reason="the Sudoku package data is missing")
runner = CliRunner()
WIKI = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SUMMARY = re.compile(r"solve rate (\d+)/(\d+) = \d+% \((.*?)\); blanks without a clash (\d+)/(\d+) = \d+%; ([\d.]+) forwards per grid "
                     r"\(([\d.]+) tokens per forward\); (\d+) tokens/s on \d+ threads?")


def test_demo_band_and_progress():
    r = runner.invoke(app, ["demo", "--no-live", "--givens", "25-29", "-n", "2", "--steps", "4"])  # -n: --n
    assert r.exit_code == 0, r.output
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert steps and steps[0].startswith("step 1 of 4: ") and "grids settled" in steps[0]  # no silent batch
    m = SUMMARY.search(r.stdout.splitlines()[-1])
    assert m and m.group(2) == "2" and m.group(3) == "25-29 givens", r.stdout
    assert 2 * (81 - 29) <= int(m.group(5)) <= 2 * (81 - 25) and int(m.group(4)) <= int(m.group(5))
    assert "puzzle 1 (2" in r.stdout  # the first grid, drawn once, with its givens (25-29)


def test_demo_compare_left_to_right():
    r = runner.invoke(app, ["demo", "--no-live", "-n", "3", "--steps", "4", "--compare", "--quiet"])
    assert r.exit_code == 0, r.output
    last = r.stdout.splitlines()[-2:]
    assert SUMMARY.search(last[0]), r.stdout
    m = re.fullmatch(r"left to right, same model: (\d)/3 = \d+%; blanks without a clash (\d+)/(\d+) = \d+%; "
                     r"([\d.]+) forwards per grid; [\d.]+ s", last[1])
    assert m, r.stdout
    assert abs(float(m.group(4)) - int(m.group(3)) / 3) < 0.051  # one forward per blank cell


def test_demo_own_puzzle():
    r = runner.invoke(app, ["demo", "--no-live", "--puzzle", WIKI, "--steps", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    m = SUMMARY.search(r.stdout.splitlines()[-1])
    assert m and m.group(2) == "1" and m.group(3) == "your puzzle" and m.group(5) == str(WIKI.count("."))
    assert (m.group(1) == "1") <= (m.group(4) == m.group(5))  # solved: every blank without a clash
    assert r.stderr == ""


@pytest.mark.parametrize("args,needle", [
    (["--puzzle", WIKI[:80]], "--puzzle: 80 characters; a puzzle is 81"),
    (["--puzzle", WIKI[:10] + "x" + WIKI[11:]], "character 11 (r2c2) is 'x'"),
    (["--puzzle", "55" + WIKI[2:]], "r1c1=5 and r1c2=5 conflict (row 1)"),
    (["--puzzle", WIKI, "--givens", "30-35"], "leave out --givens and --n"),
    (["--givens", "50-60"], "no puzzle in that band"),
    (["--givens", "x"], "--givens 'x'"),
    (["--n", "0"], "--n 0"),
    (["--n", "1000"], "--n 1000: the embedded bank has"),
    (["--n", "2", "--sample", "3"], "not both"),
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
