"""Generation on CPU: dgplug vs transformers at 1 and 2 threads, idle and under load, fp32 and bf16.

    python benchmarks/generate_cpu.py        # the whole table (about 15 minutes on 2 cores)

A DiffusionGemma with the real vocabulary (262,144) and canvas (256), hidden 256, 2 layers,
built by transformers with random weights and saved in bf16. Each run is a fresh process that
loads the checkpoint, times one generation (batch 2, one canvas, 2 denoise steps: the stop
test never fires on a random model) and reports its time and memory. Sides:

  transformers   DiffusionGemmaForBlockDiffusion.generate, weights loaded as fp32 (its bf16
                 matmuls run at ~5 GFLOP/s on a CPU without native bf16: far slower)
  dgplug fp32    dgplug.load(dtype="fp32"): fp32 copies of the bf16 weights
  dgplug bf16    dgplug.load(): the weights stay bf16 and are upcast at use (dgplug.ops.linear)

Cells: threads 1 and 2 (transformers: torch.set_num_threads; dgplug: DGPLUG_THREADS), each on
the machine as it is ("idle": nothing started by this script) and under a reproducible
background load the script starts itself: one busy process per core, each stopping on its own
after --load-seconds at most. Within a cell the sides alternate, run after run; figures are
medians. The load average is read before each cell and printed: on a shared machine "idle"
is whatever else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("transformers", "dgplug fp32", "dgplug bf16")
BUSY = "import time\nend = time.time() + {secs}\nwhile time.time() < end:\n    pass\n"


def build(path: Path, args) -> None:
    import torch

    from dgplug.testing import make_checkpoint, tiny_text_config

    text = tiny_text_config(vocab_size=262144, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=1024,
                            num_experts=16, top_k_experts=4, moe_intermediate_size=args.hidden // 2,
                            layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"])
    make_checkpoint(path, text=text, canvas_length=256, seed=0, qk_norm_scale=0.25, tokenizer=False,
                    dtype=torch.bfloat16)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Start the kernel's peak-RSS count (VmHWM) afresh: the run's peak, not the load's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, path: str, args) -> dict:
    """Runs in a fresh process: load, time one generation."""
    import torch

    ids = torch.randint(10, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=256, max_denoising_steps=args.steps)
    if side == "transformers":
        torch.set_num_threads(args.threads[0])
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()

        def gen():
            torch.manual_seed(0)
            return model.generate(input_ids=ids, **kw)
    else:
        import dgplug
        from dgplug import threads

        threads.configure()  # DGPLUG_THREADS, as the CLI's --threads
        model = dgplug.load(path, dtype="fp32" if side == "dgplug fp32" else None)

        def gen():
            return model.generate(ids, seed=0, **kw)
    loaded = rss_mib()
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    gen()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(side=side, seconds=seconds, cpu_s=cpu, tok_s=args.batch * 256 / seconds, loaded_mib=loaded,
                peak_mib=peak_mib(), threads=torch.get_num_threads())


def run_child(side: str, path: Path, threads: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, str(path), f"--threads={threads}"] + [
        f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "prompt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DGPLUG_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_processes(n: int, seconds: float) -> list[subprocess.Popen]:
    """n processes spinning on a core each; each stops by itself after `seconds`."""
    return [subprocess.Popen([sys.executable, "-c", BUSY.format(secs=seconds)]) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternated runs per side and cell")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes under load")
    ap.add_argument("--load-seconds", type=float, default=900, help="longest life of a busy process")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # run the clean-ups below
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab 262144, canvas 256, batch {args.batch}, "
          f"{args.steps} denoise steps; bf16 checkpoint; {os.cpu_count()} CPUs; median of {args.repeats} "
          f"alternated runs per cell", flush=True)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        build(path, args)
        for load in args.loads:
            for threads in args.threads:
                busy = busy_processes(args.busy, args.load_seconds) if load == "busy" else []
                try:
                    if busy:
                        time.sleep(5)
                    before = os.getloadavg()[0]
                    runs = {s: [] for s in args.sides}
                    for _ in range(args.repeats):
                        for side in args.sides:
                            runs[side].append(run_child(side, path, threads, args))
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
                cell = dict(load=load, threads=threads, loadavg=before, after=os.getloadavg()[0])
                for side, rs in runs.items():
                    cell[side] = dict(seconds=statistics.median(r["seconds"] for r in rs),
                                      runs=[round(r["seconds"], 1) for r in rs],
                                      cpu_s=statistics.median(r["cpu_s"] for r in rs),
                                      loaded_mib=max(r["loaded_mib"] for r in rs),
                                      peak_mib=max(r["peak_mib"] for r in rs))
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    print()
    head = f"| threads | background | load avg | {' | '.join(s + ' tok/s' for s in args.sides)} |"
    ratios = [s for s in args.sides if s != "transformers"] if "transformers" in args.sides else []
    head += "".join(f" {s} / transformers |" for s in ratios)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in cells:
        bg = "none" if c["load"] == "idle" else f"{args.busy} busy processes"
        row = f"| {c['threads']} | {bg} | {c['loadavg']:.1f} | "
        row += " | ".join(f"{args.batch * 256 / c[s]['seconds']:.1f}" for s in args.sides) + " |"
        row += "".join(f" {c['transformers']['seconds'] / c[s]['seconds']:.2f}x |" for s in ratios)
        print(row)
    print()
    print("memory (MiB, worst over runs): resident after load / peak resident during the run; "
          "median CPU seconds of the process per run")
    for s in args.sides:
        print(f"  {s:<14} " + ", ".join(f"{c[s]['loaded_mib']:.0f} / {c[s]['peak_mib']:.0f} MiB, {c[s]['cpu_s']:.1f} CPU s"
                                       for c in cells))
    print("runs (s): " + "; ".join(f"{c['threads']}t {c['load']}: " + ", ".join(f"{s} {c[s]['runs']}" for s in args.sides)
                                   for c in cells))


if __name__ == "__main__":
    main()
