"""Tokens/s of `dgplug generate` at 1, 2 and the default number of threads, quiet and loaded.

Each run is a fresh `dgplug generate ... --json` process (what a user runs); the figure is the
CLI's own tokens/s over model.generate (loading excluded). Settings are alternated run by run
(1, 2, default, 1, 2, default, ...) and the median of each is printed with the machine's load
average. "Loaded": the script starts one busy-loop process per core (bounded in time) for the
duration of those runs, as on a shared machine.

Models: the tiny random model (dgplug.assets.tiny_random_model_path(): hidden 64, 6 layers,
canvas 32), the shipped Sudoku model (hidden 256, 6 layers since 2026-12-01, 3 when results/cli_threads.txt was run; canvas 82) and, with --medium, a
random model of ~60M parameters (hidden 512, vocab 32768) to see where threads start to pay.

    python benchmarks/cli_threads.py [--repeats 3] [--medium] [--only tiny,sudoku]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def busy(until: float) -> None:
    x = 0
    while time.time() < until:
        x += 1


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def models(args) -> dict[str, tuple[Path, list[str]]]:
    from dgplug.assets import sudoku_model_path, tiny_random_model_path

    out = {}
    out["tiny"] = (tiny_random_model_path(), ["--ids", "2,7,8,9,10,11", "--max-new-tokens", "64", "--steps", "8"])
    sud = sudoku_model_path()
    if sud is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(sud))
        puzzle = json.loads((sud / "puzzles.json").read_text())[0]["puzzle"]
        ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(
            [f"r{i // 9 + 1}c{i % 9 + 1}={ch}" for i, ch in enumerate(puzzle)])
        out["sudoku"] = (sud, ["--ids", ",".join(map(str, ids)), "--max-new-tokens", "82", "--steps", "8"])
    if args.medium:
        from dgplug.testing import make_checkpoint, tiny_text_config

        path = Path(tempfile.gettempdir()) / "dgplug-bench-medium"
        if not (path / "config.json").exists():
            text = tiny_text_config(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                    head_dim=64, global_head_dim=128, num_experts=8, top_k_experts=2,
                                    moe_intermediate_size=512, sliding_window=128)
            make_checkpoint(path, text=text, canvas_length=64, qk_norm_scale=0.25, tokenizer=False)
        out["medium"] = (path, ["--ids", "2,7,8,9,10,11", "--max-new-tokens", "64", "--steps", "4"])
    wanted = set(args.only.split(",")) if args.only else None
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def one_run(path: Path, extra: list[str], threads: str) -> dict:
    cmd = [sys.executable, "-c", "from dgplug.cli import app; app()", "generate", str(path), *extra, "--json",
           "--quiet", "--seed", "0"]
    if threads != "default":
        cmd += ["--threads", threads]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("DGPLUG_THREADS", None)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def measure(name, path, extra, repeats: int, load: bool) -> list[str]:
    procs = []
    if load:
        until = time.time() + 1800  # bounded even if this script dies
        procs = [mp.Process(target=busy, args=(until,), daemon=True) for _ in range(os.cpu_count() or 1)]
        for p in procs:
            p.start()
        time.sleep(1)
    settings = ["1", "2", "default"]
    res: dict[str, list[float]] = {s: [] for s in settings}
    chosen = {}
    loads = []
    try:
        for _ in range(repeats):
            for s in settings:
                d = one_run(path, extra, s)
                res[s].append(d["tokens_per_second"])
                chosen[s] = d["threads"]
                loads.append(os.getloadavg()[0])
    finally:
        for p in procs:
            p.terminate()
            p.join()
    lines = []
    base = statistics.median(res["1"])
    for s in settings:
        med = statistics.median(res[s])
        lines.append(f"| {name} | {'loaded' if load else 'quiet'} | {s} ({chosen[s]}) | {med:.1f} | "
                     f"{med / base:.2f} | {', '.join(f'{v:.1f}' for v in res[s])} | "
                     f"{min(loads):.2f}-{max(loads):.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--medium", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--conditions", default="quiet,loaded")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}; load average at start: {load_average()}")
    print("| model | machine | threads (used) | median tokens/s | vs 1 thread | runs | load avg (1 min) |")
    print("|---|---|---|---:|---:|---|---|")
    for name, (path, extra) in models(args).items():
        for cond in args.conditions.split(","):
            for line in measure(name, path, extra, args.repeats, cond == "loaded"):
                print(line, flush=True)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
