"""Settled rows leave the batch: `generate` with them leaving (DGPLUG_COMPACT=1, the default) and
with every row in every step (DGPLUG_COMPACT=0), on the embedded Sudoku model, CPU.

    python benchmarks/settled_rows.py [--bands 36-45,25-29] [--n 20] [--reps 3] [--threads 1]

What `dgplug demo` runs: the first n puzzles of a band of the shipped bank, givens placed on the
canvas and locked, seed 0. Per band, after one untimed warm-up run of each side, the two settings
and the left-to-right baseline (one cell per forward; its filled rows leave its batch) alternate
run after run, each run in a rotated order (no side always first); the figures are medians.
Prints per side: seconds, row-forwards computed (decoder batch rows summed over steps), solved
grids; whether the two generate settings gave the same grids; the load average before each band.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bands", default="36-45,25-29")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dgplug import load
    from dgplug.assets import default_model_path
    from dgplug.cli.demo import Sudoku, parse_band, pick
    from dgplug.editing import fill_left_to_right

    path = default_model_path()
    model = load(path, dtype="fp32")
    bank = json.loads((path / "puzzles.json").read_text())
    print(f"embedded Sudoku model, {args.n} puzzles per band, {args.threads} thread(s), torch {torch.__version__}, "
          f"{args.reps} alternated runs per side, medians")
    for band in args.bands.split(","):
        items = pick(bank, parse_band(band), args.n)
        puzzles = [it["puzzle"] for it in items]
        S = Sudoku(model, 0)
        prompt, canvas, lock = S.encode(puzzles)
        L0 = prompt.shape[1]
        secs = {"rows leave": [], "every row": [], "left to right": []}
        rows, grids = {}, {}
        denoise = model.denoise

        def counting(canvas_, *a, **k):
            rows[side] += canvas_.shape[0]
            return denoise(canvas_, *a, **k)

        model.denoise = counting
        print(f"\nband {band} givens: load average {os.getloadavg()[0]:.2f}")
        sides = list(secs)
        try:
            for r in range(-1, args.reps):  # r == -1: the warm-up, not timed
                for side in sides[r % 3:] + sides[:r % 3]:
                    rows[side] = 0
                    t0 = time.perf_counter()
                    if side == "left to right":
                        filled, _ = fill_left_to_right(model, prompt, canvas, lock, seed=0)
                        grids[side] = [S.grid(filled[b].tolist()) for b in range(len(items))]
                    else:
                        os.environ["DGPLUG_COMPACT"] = "1" if side == "rows leave" else "0"
                        res = model.generate(prompt, decoder_input_ids=canvas, locked=lock, seed=0)
                        grids[side] = [S.grid(res.sequences[b, L0:].tolist()) for b in range(len(items))]
                        steps = res.steps[0]
                    if r >= 0:
                        secs[side].append(time.perf_counter() - t0)
        finally:
            del model.denoise
            os.environ.pop("DGPLUG_COMPACT", None)
        med = {k: statistics.median(v) for k, v in secs.items()}
        for side, s in secs.items():
            ok = sum(S.solved(p, g) for p, g in zip(puzzles, grids[side]))
            print(f"  {side:14s} {med[side]:6.2f} s (runs {', '.join(f'{x:.2f}' for x in s)}); "
                  f"{rows[side]} row-forwards; solved {ok}/{len(items)}")
        same = grids["rows leave"] == grids["every row"]
        print(f"  generate: {steps} steps; every row / rows leave = {med['every row'] / med['rows leave']:.2f}x; "
              f"left to right / rows leave = {med['left to right'] / med['rows leave']:.2f}x; same grids: {same}")
        print(f"RESULT settled_rows_cpu band={band} n={len(items)} threads={args.threads} "
              f"rows_leave_s={med['rows leave']:.2f} every_row_s={med['every row']:.2f} "
              f"left_to_right_s={med['left to right']:.2f} rows_leave_row_forwards={rows['rows leave']} "
              f"every_row_row_forwards={rows['every row']} same_grids={same}", flush=True)


if __name__ == "__main__":
    main()
