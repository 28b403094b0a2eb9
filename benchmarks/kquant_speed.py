"""K-quant encoder throughput at two revisions of dgplug/converters/kquants.py (issue 19, item 4).

The encoders are the limit of a K-quant conversion (benchmarks/convert.py measures the whole
pipeline); this times them alone, on the same rows, in one process, alternating the two
revisions, and prints the median per type and the ratio. Rows: a [704, 2816] slab (one expert's
down projection in the release's shapes, bf16-rounded Gaussian x 0.02).

    python benchmarks/kquant_speed.py [--old 6e760e3] [--reps 5] [--threads 1]
    python benchmarks/kquant_speed.py --types      # every block type of the working tree, without and
                                                   # with an importance vector (per-type conversion speed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str | None, name: str):
    """dgplug/converters/kquants.py as of git revision `rev` (None: the working tree; before 2026-12-03
    the file was converters/kquants.py), imported under `name`."""
    if rev is None:
        path = ROOT / "dgplug" / "converters" / "kquants.py"
    else:
        src = next((r.stdout for f in ("dgplug/converters/kquants.py", "converters/kquants.py")
                    if (r := subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{f}"], capture_output=True,
                                            text=True)).returncode == 0), None)
        if src is None:
            raise SystemExit(f"kquants.py not found at {rev}")
        path = Path(tempfile.mkdtemp()) / f"{name}.py"
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="6e760e3", help="the revision to compare against")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--types", action="store_true", help="each type of the working tree, without / with importance")
    args = ap.parse_args()
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    import numpy as np

    from gguf import GGMLQuantizationType as T

    x = np.random.default_rng(0).standard_normal((704, 2816), dtype=np.float32) * 0.02
    x = ((x.view(np.uint32) >> 16) << 16).view(np.float32)  # bf16 values, as a checkpoint holds
    mb = x.size * 2 / 1e6  # bf16 bytes of input
    if args.types:
        return per_type(x, mb, args.reps, args.threads)
    old, new = module_at(args.old, "kquants_old"), module_at(None, "kquants_new")
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} thread(s), rows {x.shape}, {args.reps} alternated reps")
    print(f"{'type':6} {'old ms':>9} {'new ms':>9} {'new/old':>8} {'old MB/s':>9} {'new MB/s':>9} {'old RMSE':>10} "
          f"{'new RMSE':>10}  same bytes")
    for qt in (T.Q4_K, T.Q5_K, T.Q6_K):
        times = {"old": [], "new": []}
        outs = {}
        for _ in range(args.reps):
            for key, mod in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                outs[key] = mod.quantize(x, qt, "bench")
                times[key].append(time.perf_counter() - t0)
        a, b = statistics.median(times["old"]), statistics.median(times["new"])
        same = np.mean(np.all(outs["old"].reshape(x.shape[0], -1) == outs["new"].reshape(x.shape[0], -1), axis=1))
        from gguf import quants as gq

        rmse = [float(np.sqrt(np.mean((gq.dequantize(outs[k].reshape(x.shape[0], -1), qt) - x) ** 2)))
                for k in ("old", "new")]  # decoded by gguf-py, against the input
        print(f"{qt.name:6} {a * 1e3:9.1f} {b * 1e3:9.1f} {b / a:8.2f} {mb / a:9.1f} {mb / b:9.1f} {rmse[0]:10.4e} "
              f"{rmse[1]:10.4e}  {same:.1%} of rows")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def per_type(x, mb: float, reps: int, threads: int) -> None:
    """Encoder throughput of every block type, without and with an importance vector, alternated."""
    import numpy as np

    from gguf import GGMLQuantizationType as T

    kq = module_at(None, "kquants_new")
    imp = (np.random.default_rng(1).random(x.shape[1], dtype=np.float32) * 2 + 0.01) ** 2
    types = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ4_NL]
    print(f"load average {os.getloadavg()[0]:.2f}, {threads} thread(s), rows {x.shape}, {reps} alternated reps; "
          f"MB/s of bf16 input")
    print(f"{'type':7} {'plain ms':>9} {'MB/s':>7} {'imatrix ms':>11} {'MB/s':>7}")
    for qt in types:
        t = {False: [], True: []}
        for _ in range(reps):
            for weighted in (False, True):
                t0 = time.perf_counter()
                kq.quantize(x, qt, "bench", importance=imp if weighted else None)
                t[weighted].append(time.perf_counter() - t0)
        a, b = statistics.median(t[False]), statistics.median(t[True])
        if qt in getattr(kq, "IMPORTANCE_TYPES", kq.ENCODED_TYPES):
            print(f"{qt.name:7} {a * 1e3:9.1f} {mb / a:7.1f} {b * 1e3:11.1f} {mb / b:7.1f}")
        else:  # Q8_0: gguf-py's encoder, which takes no importance (kquants.quantize ignores it)
            print(f"{qt.name:7} {a * 1e3:9.1f} {mb / a:7.1f} {'(no imatrix)':>11} {'':>7}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
