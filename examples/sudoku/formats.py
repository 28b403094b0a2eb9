"""The quality cost of quantization on a real task: solve rate of the Sudoku model per format.

Converts the checkpoint with `dgplug convert` (GGUF Q8_0 and Q4_K_M; int8 and int4 safetensors)
into a temporary directory, loads each with `dgplug.load` (the normal path: GGUF dequantised on
load, int8/int4 kept packed), and runs evaluate.py's EntropyBound solve on the same held-out puzzles.

    python examples/sudoku/formats.py dgplug/data/sudoku --n 100 --bands 36-45,30-35
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

FORMATS = [("original", None), ("GGUF Q8_0", "Q8_0"), ("GGUF Q4_K_M", "Q4_K_M"), ("int8", "int8"), ("int4", "int4")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--bands", default="36-45,30-35,25-29")
    ap.add_argument("--formats", default=",".join(q or "original" for _, q in FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dgplug

    want = args.formats.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, q in FORMATS:
            if (q or "original") not in want:
                continue
            if q is None:
                path = args.path
            else:
                path = str(Path(tmp) / (f"sudoku-{q}.gguf" if q.startswith("Q") else f"sudoku-{q}"))
                subprocess.run([sys.executable, "-m", "dgplug.cli", "convert", args.path, path, "--quant", q],
                               check=True, capture_output=True)
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
