"""Solve rate of the Sudoku DiffusionGemma on held-out puzzles, through dgplug's generation path.

    python examples/sudoku/evaluate.py dgplug/data/sudoku --n 100
    python examples/sudoku/evaluate.py CKPT --modes entropy,l2r --bands 36-45,30-35,25-29

Modes:
  entropy  the default EntropyBound sampler (checkpoint's generation_config), givens placed on the
           canvas and locked: generate(prompt, decoder_input_ids=givens+noise, locked=givens|eos).
  free     EntropyBound with the givens only in the prompt (nothing placed or locked).
  l2r      left to right, one token per forward (the autoregressive extreme of the same model):
           givens locked, every other blank noise; each forward commits the argmax of the
           leftmost unfilled cell only and locks it; the rest is re-noised; self-conditioning on.
A grid counts as solved when it is a valid Sudoku that agrees with every given (uniqueness not
required). *blank cells right: agreement with the generator's solution (a lower bound where
the puzzle has several). Held-out: the puzzles come from a generator seeded apart from training's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import sudoku as S  # noqa: E402

HELD_OUT_SEED = 777  # the evaluation set (README tables)
VALIDATION_SEED = 555  # a second held-out set, for choosing sampler settings without touching the first


def puzzles(n: int, lo: int, hi: int, seed: int = HELD_OUT_SEED):
    gen = S.Generator(seed + 1000 * lo + hi, pool=64)
    return gen.batch(n, lo, hi)


def start_canvas(puz: np.ndarray, seed: int):
    """Givens (and <eos>) on the canvas, uniform noise elsewhere; the lock mask."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.from_numpy(S.canvas_ids(puz))  # blanks -> pad, replaced by noise below
    lock = torch.from_numpy(np.concatenate([puz > 0, np.ones((len(puz), 1), bool)], axis=1))
    noise = torch.randint(0, S.VOCAB_SIZE, clean.shape, generator=g)
    return torch.where(lock, clean, noise), lock


def solve_entropy(model, puz, seed=0, lock=True, on_step=None, **kw):
    prompt = torch.from_numpy(S.prompt_ids(puz))
    t0 = time.perf_counter()
    if lock:
        canvas, mask = start_canvas(puz, seed)
        out = model.generate(prompt, decoder_input_ids=canvas, locked=mask, seed=seed, on_step=on_step, **kw)
    else:
        out = model.generate(prompt, seed=seed, on_step=on_step, **kw)
    dt = time.perf_counter() - t0
    grids = S.canvas_to_grid(out.sequences[:, prompt.shape[1]:].numpy())
    return grids, out.forwards.numpy(), dt, out


def solve_l2r(model, puz, seed=0, temperature=0.4):
    """One cell per forward, leftmost unfilled first (givens locked and skipped): dgplug.editing's baseline."""
    from dgplug.editing import fill_left_to_right

    prompt = torch.from_numpy(S.prompt_ids(puz))
    canvas, lock = start_canvas(puz, seed)
    t0 = time.perf_counter()
    canvas, forwards = fill_left_to_right(model, prompt, canvas, lock, temperature=temperature, seed=seed + 1)
    dt = time.perf_counter() - t0
    return S.canvas_to_grid(canvas.numpy()), forwards.numpy(), dt


def evaluate(model, n: int, lo: int, hi: int, mode: str, batch: int = 50, seed: int = 0,
             puzzle_seed: int = HELD_OUT_SEED) -> dict:
    puz_all, sol_all = puzzles(n, lo, hi, puzzle_seed)
    solved, fwd, secs, cells, right = [], [], 0.0, 0, 0
    for i in range(0, n, batch):
        puz = puz_all[i:i + batch]
        if mode == "l2r":
            grids, f, dt = solve_l2r(model, puz, seed + i)
        else:
            grids, f, dt, _ = solve_entropy(model, puz, seed + i, lock=(mode == "entropy"))
        solved += [S.is_solution(p, g) for p, g in zip(puz, grids)]
        fwd += list(f)
        secs += dt
        cells += int((puz == 0).sum())
        right += int(((puz == 0) & (grids == sol_all[i:i + batch])).sum())
    return dict(mode=mode, band=f"{lo}-{hi}", n=n, solve_rate=float(np.mean(solved)),
                forwards_per_grid=float(np.mean(fwd)), blanks_per_grid=cells / n,
                blank_cell_acc=round(right / cells, 4),
                seconds=round(secs, 2), blank_cells_per_s=round(cells / secs, 1))


def export_puzzles(path, per_band: int = 20, bands=((36, 45), (30, 35), (25, 29))):
    """The demo's held-out puzzle bank (dgplug/data/sudoku/puzzles.json)."""
    bank = []
    for lo, hi in bands:
        puz, sol = puzzles(per_band, lo, hi, seed=HELD_OUT_SEED + 1)
        for p, q in zip(puz, sol):
            bank.append(dict(givens=int((p > 0).sum()), puzzle="".join(str(x) if x else "." for x in p),
                             solution="".join(str(x) for x in q)))
    Path(path).write_text(json.dumps(bank, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", help="the checkpoint to evaluate (not needed with --export-puzzles)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--bands", default="36-45,30-35,25-29")
    ap.add_argument("--modes", default="entropy,l2r")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--steps", type=int, default=None, help="override max_denoising_steps")
    ap.add_argument("--entropy-bound", type=float, default=None, help="override the sampler's entropy bound")
    ap.add_argument("--t-min", type=float, default=None, help="override the last step's temperature")
    ap.add_argument("--t-max", type=float, default=None, help="override the first step's temperature")
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="test: the held-out evaluation set; val: the set for tuning sampler settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--export-puzzles", default=None, help="write the demo's puzzle bank here and exit")
    args = ap.parse_args()
    if args.export_puzzles:
        export_puzzles(args.export_puzzles)
        return
    if args.path is None:
        ap.error("give the checkpoint to evaluate (PATH)")
    torch.set_num_threads(args.threads)
    import dgplug

    model = dgplug.load(args.path, dtype="fp32")
    if args.steps:
        model.generation_defaults["max_denoising_steps"] = args.steps
    for key in ("entropy_bound", "t_min", "t_max"):
        if getattr(args, key) is not None:
            model.generation_defaults[key] = getattr(args, key)
    rows = []
    for band in args.bands.split(","):
        lo, hi = (int(x) for x in band.split("-"))
        for mode in args.modes.split(","):
            r = evaluate(model, args.n, lo, hi, mode, args.batch,
                         puzzle_seed=HELD_OUT_SEED if args.split == "test" else VALIDATION_SEED)
            rows.append(r)
            print(json.dumps(r), flush=True)
    report(rows, ["band", "mode"], args.json)


def report(rows: list[dict], keys: list[str], json_path: str | None = None) -> None:
    """Print evaluate() results as a markdown table (label columns `keys`); optionally save them."""
    print("\n| " + " | ".join(keys) + " | solved | blank cells right* | forwards / grid | blanks / grid |")
    print("|---" * (len(keys) + 4) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + f" | {100 * r['solve_rate']:.1f}% ({r['n']}) "
              f"| {100 * r['blank_cell_acc']:.1f}% | {r['forwards_per_grid']:.1f} | {r['blanks_per_grid']:.1f} |")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
