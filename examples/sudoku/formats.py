"""The quality cost of quantization on a real task: solve rate of the Sudoku model per format.

Converts the checkpoint with `dgplug convert` (GGUF Q8_0, Q4_K_M, Q3_K_M, Q2_K; int8 and int4
safetensors) into a temporary directory, loads each with `dgplug.load` (weights kept packed), and
runs evaluate.py's EntropyBound solve on the same held-out puzzles. A format named `TYPE+imatrix`
is converted with `--imatrix`: an importance matrix collected by dgplug.converters.imatrix over
--calib puzzles from the training distribution (training's generator seed 0, givens 28-62; never
the held-out puzzles), prompts through the model's own generate.

    python examples/sudoku/formats.py dgplug/data/sudoku --n 100 --bands 36-45,30-35
    python examples/sudoku/formats.py dgplug/data/sudoku --formats Q2_K,Q2_K+imatrix,Q3_K_M,Q3_K_M+imatrix
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import evaluate as E  # noqa: E402

FORMATS = [("original", None), ("GGUF Q8_0", "Q8_0"), ("GGUF Q4_K_M", "Q4_K_M"), ("int8", "int8"), ("int4", "int4"),
           ("GGUF Q3_K_M", "Q3_K_M"), ("GGUF Q2_K", "Q2_K"), ("GGUF Q4_K_M + imatrix", "Q4_K_M+imatrix"),
           ("GGUF Q3_K_M + imatrix", "Q3_K_M+imatrix"), ("GGUF Q2_K + imatrix", "Q2_K+imatrix"),
           ("int4 + imatrix", "int4+imatrix")]
DEFAULT = "original,Q8_0,Q4_K_M,int8,int4"


def sudoku_imatrix(model_path: str, out: Path, n: int, threads: int) -> Path:
    """An imatrix over n training-distribution puzzle prompts (training's generator, seed 0)."""
    import dgplug
    from dgplug.converters.imatrix import collect

    import sudoku as S

    puz, _ = S.Generator(0).batch(n, 28, 62)
    chunks = [list(map(int, r)) for r in S.prompt_ids(puz)]
    model = dgplug.load(model_path, dtype="fp32")
    torch.set_num_threads(threads)
    return collect(model, chunks, batch=16, datasets=[f"sudoku training distribution, {n} puzzles"]).save(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--bands", default="36-45,30-35,25-29")
    ap.add_argument("--formats", default=DEFAULT, help="comma list from: " + ",".join(q or "original" for _, q in FORMATS))
    ap.add_argument("--calib", type=int, default=64, help="puzzles for the imatrix of the +imatrix formats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dgplug

    known = {(q or "original").upper(): q or "original" for _, q in FORMATS}
    want = []
    for f in filter(None, (f.strip() for f in args.formats.split(","))):
        if f.upper() not in known:
            ap.error(f"--formats: unknown format {f!r} (known: {', '.join(known.values())})")
        want.append(known[f.upper()])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, q in FORMATS:
            if (q or "original") not in want:
                continue
            if q is None:
                path = args.path
            else:
                base, _, im = q.partition("+")
                path = str(Path(tmp) / (f"sudoku-{q}.gguf" if base.startswith("Q") else f"sudoku-{q}"))
                cmd = [sys.executable, "-m", "dgplug.cli", "convert", args.path, path, "--quant", base]
                if im:
                    imatrix = Path(tmp) / "imatrix.gguf"
                    if not imatrix.exists():
                        sudoku_imatrix(args.path, imatrix, args.calib, args.threads)
                    cmd += ["--imatrix", str(imatrix)]
                subprocess.run(cmd, check=True, capture_output=True)
            model = dgplug.load(path, dtype="fp32")
            for band in args.bands.split(","):
                lo, hi = (int(x) for x in band.split("-"))
                r = E.evaluate(model, args.n, lo, hi, "entropy")
                r["format"] = label
                rows.append(r)
                print(json.dumps(r), flush=True)
    E.report(rows, ["format", "band"], args.json)


if __name__ == "__main__":
    main()
