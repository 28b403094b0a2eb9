"""Time to load a DiffusionGemma GGUF with the release's vocabulary (262,144 tokens): this code against
another commit's, in fresh processes, alternated.

A tiny model (hidden 64, 4 layers) with the release's vocabulary is converted to Q8_0 under --workdir
(default /tmp/dgplug_gguf_load, never the repo); the weights are a few MB, so the time is what a load
spends on the metadata (config, tokenizer) and the tensor table, the part that does not grow with the
weights. Each round runs `dgplug.load(FILE)` once per side in a new Python process (1 thread):
wall time of the load, and the process's peak RSS. --old is a checkout of the other commit (e.g. a
`git worktree add /tmp/old c545d6f`).

    python benchmarks/gguf_load.py --old /tmp/old [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 262144
CHILD = ("import os, resource, time\n"
         "t = time.perf_counter()\n"
         "import dgplug\n"
         "m = dgplug.load({path!r})\n"
         "wall = time.perf_counter() - t\n"
         "print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def build(wd: Path) -> Path:
    out = wd / "vocab262k-Q8_0.gguf"
    if out.exists():
        return out
    sys.path.insert(0, str(ROOT))
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.testing import make_checkpoint, save_tokenizer, tiny_text_config

    ck = make_checkpoint(wd / "ckpt", text=tiny_text_config(vocab_size=VOCAB), tokenizer=False)
    save_tokenizer(ck, VOCAB)
    return export_gguf(ck, out, quant="Q8_0", progress=False, workers=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a checkout of the commit to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/dgplug_gguf_load")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    path = build(wd)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB; cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    sides = {"old": Path(a.old).resolve(), "new": ROOT}
    runs: dict[str, list[tuple[float, int]]] = {s: [] for s in sides}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DGPLUG_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for i in range(a.rounds):
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            la = os.getloadavg()[0]
            r = subprocess.run([sys.executable, "-c", CHILD.format(path=str(path))], capture_output=True, text=True,
                               env={**env, "PYTHONPATH": str(sides[side])}, cwd=str(sides[side]))
            if r.returncode:
                raise SystemExit(f"{side}: {r.stderr}")
            wall, rss = r.stdout.split()
            runs[side].append((float(wall), int(rss)))
            print(f"round {i + 1} {side}: load {float(wall):6.2f} s, peak RSS {int(rss) / 2**20:.2f} GiB "
                  f"(load average {la:.1f} before)", flush=True)
    med = {s: statistics.median(w for w, _ in r) for s, r in runs.items()}
    rss = {s: statistics.median(m for _, m in r) / 2**20 for s, r in runs.items()}
    print(f"medians: old {med['old']:.2f} s, new {med['new']:.2f} s ({med['old'] / med['new']:.1f}x); "
          f"peak RSS old {rss['old']:.2f} GiB, new {rss['new']:.2f} GiB")
    print(json.dumps({"old": runs["old"], "new": runs["new"]}))


if __name__ == "__main__":
    main()
