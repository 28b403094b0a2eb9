"""Eager CPU forwards of dgplug code at two git revisions: does a change slow the eager path?

Both revisions are exported (`git archive`) and laid out as the installed package (dgplug,
dgplug.kernels, dgplug.converters, dgplug.integrations), so each side imports its own code ahead
of the editable install. Each run is a fresh subprocess; the sides alternate and the medians of
the runs are printed with their ratio. Two forwards are timed on a tiny model (tiny_text_config,
batch 2, prompt 64 with left padding, canvas 16):
  patched   transformers' DiffusionGemmaForBlockDiffusion after dgplug.patch (dgplug's attention / MoE)
  dgplug    dgplug's own model (dgplug.load), the same checkpoint

    python benchmarks/eager_forward.py --before 6e760e3 [--after WORKTREE] [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# before 2026-12-03 the kernels, converters and integrations folders sat beside dgplug/ (mapped into
# the package by pyproject's package-dir); since then they are dgplug's own subfolders
OLD_LAYOUT = {"dgplug": "dgplug", "kernels": "dgplug/kernels", "converters": "dgplug/converters",
              "integrations": "dgplug/integrations"}


def export(rev: str, dest: Path) -> Path:
    """The package at git revision `rev` ("WORKTREE": the files as they are now) under dest/."""
    src = dest / "src"
    src.mkdir(parents=True)
    if rev == "WORKTREE":
        shutil.copytree(ROOT / "dgplug", src / "dgplug", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    pkg = dest / "pkg"
    old = (src / "kernels").is_dir()
    for d, where in (OLD_LAYOUT if old else {"dgplug": "dgplug"}).items():
        shutil.copytree(src / d, pkg / where)
    return pkg


def child(ckpt: str, threads: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import dgplug
    from transformers import DiffusionGemmaForBlockDiffusion

    assert Path(dgplug.__file__).resolve().is_relative_to(Path(os.environ["PYTHONPATH"]).resolve()), dgplug.__file__
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 64), generator=g)
    canvas = torch.randint(5, 500, (2, 16), generator=g)
    am = torch.ones(2, 64, dtype=torch.long)
    am[1, :7] = 0
    dam = torch.cat([am, torch.ones(2, 16, dtype=torch.long)], 1)
    hf = dgplug.patch(DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt).eval())
    dg = dgplug.load(ckpt)
    out = {}
    for name, fn in (("patched", lambda: hf(input_ids=ids, attention_mask=am, decoder_input_ids=canvas,
                                            decoder_attention_mask=dam)),
                     ("dgplug", lambda: dg(input_ids=ids, attention_mask=am, decoder_input_ids=canvas,
                                           decoder_attention_mask=dam))):
        with torch.no_grad():
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="git revision of the 'before' side")
    ap.add_argument("--after", default="WORKTREE", help="git revision of the 'after' side (default: the worktree)")
    ap.add_argument("--runs", type=int, default=5, help="alternated subprocess runs per side")
    ap.add_argument("--reps", type=int, default=20, help="timed forwards per run (median taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.threads, args.reps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from dgplug.testing import make_checkpoint

        ckpt = make_checkpoint(tmp / "ckpt")
        sides = {"before": export(args.before, tmp / "before"), "after": export(args.after, tmp / "after")}
        res = {s: [] for s in sides}
        for _ in range(args.runs):
            for side, pkg in sides.items():
                env = dict(os.environ, PYTHONPATH=str(pkg), HF_HUB_OFFLINE="1")
                cmd = [sys.executable, __file__, "--before", args.before, "--threads", str(args.threads),
                       "--reps", str(args.reps), "--child", str(ckpt)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                res[side].append(json.loads(out.strip().splitlines()[-1]))
    print(f"threads {args.threads}, {args.runs} alternated runs x median of {args.reps} forwards; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    for name in ("patched", "dgplug"):
        bs, as_ = [r[name] for r in res["before"]], [r[name] for r in res["after"]]
        b, a = statistics.median(bs), statistics.median(as_)
        print(f"{name:8s} before ({args.before}) {b:7.2f} ms   after ({args.after}) {a:7.2f} ms   after/before {a / b:.3f}"
              f"   (runs: before {min(bs):.2f}-{max(bs):.2f}, after {min(as_):.2f}-{max(as_):.2f} ms: a ratio inside "
              f"that spread is noise)")


if __name__ == "__main__":
    main()
