"""Kill-to-exit time of `dgplug convert ... -q Q4_K_M` (worker pool running) after SIGTERM to its
process group: the CLI's handler as it was before the CI hang fix (raise wherever the signal lands)
against the current one (a signal that lands in threading/multiprocessing code is raised at the
first line outside it). Runs alternate old/new; prints medians, the load average, and any run that
did not end with exit 143 and no file left behind (a hang counts after 60 s).

    python benchmarks/convert_signal_exit.py [--runs 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD = ("import signal, dgplug.cli.common as c\n"
       "def old(signum, frame):\n    if c._caught: return\n    c._caught.append(signum)\n"
       "    raise KeyboardInterrupt if signum == signal.SIGINT else c.Terminated()\n"
       "c._on_signal = old\n")
RUN = "from dgplug.cli import app; app()"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12, help="runs of each handler")
    args = ap.parse_args()
    from dgplug.testing import make_checkpoint, tiny_text_config

    base = Path(tempfile.mkdtemp())
    text = tiny_text_config(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_experts=16, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
    ck = make_checkpoint(base / "ckpt", text=text, qk_norm_scale=0.25)  # as tests/test_cli_convert.py
    res: dict[str, list[float]] = {"old": [], "new": []}
    bad = []
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for i in range(args.runs):
        order = (("old", OLD), ("new", "")) if i % 2 == 0 else (("new", ""), ("old", OLD))
        for name, pre in order:
            out = Path(tempfile.mkdtemp(dir=base))
            p = subprocess.Popen([sys.executable, "-c", pre + RUN, "convert", str(ck), str(out / "m.gguf"), "-q",
                                  "Q4_K_M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            while not [q for q in out.iterdir() if q.name.startswith(".")]:
                if p.poll() is not None:
                    raise SystemExit(f"conversion ended before the signal: {p.communicate()[1][-500:]}")
                time.sleep(0.02)
            time.sleep(0.2 + 0.1 * (i % 8))
            t = time.perf_counter()
            os.killpg(p.pid, signal.SIGTERM)
            try:
                _, err = p.communicate(timeout=60)
                res[name].append(time.perf_counter() - t)
                if p.returncode != 143 or list(out.iterdir()):
                    bad.append((name, p.returncode, err[-300:]))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                bad.append((name, "hang"))
            shutil.rmtree(out, ignore_errors=True)
    for k, v in res.items():
        print(f"{k}: median {statistics.median(v):.2f} s over {len(v)} runs (min {min(v):.2f}, max {max(v):.2f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("runs not ending cleanly:", bad or "none")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
