"""One DiffusionGemma sampler step on the CPU: dgplug's fused head + sampler vs transformers' path.

    python benchmarks/sampler.py            # V=262144, D=2816, canvas 256; dgplug batch 1 and 8,
                                            # transformers batch 1 and 4 (about 10 minutes
                                            # on an idle 2-core machine; longer when shared)
    python benchmarks/sampler.py --quick    # V=32768, batch 1 and 2 (about a minute)
    python benchmarks/sampler.py --sweep    # dgplug's CPU tiles: rows per task x columns per tile
    python benchmarks/sampler.py --thread-sweep   # where a second intra-op thread starts to pay

The GPU side (Triton path vs transformers at full size) is in benchmarks/gpu_check.py.

Both sides start from the same final hidden states h [B*256, D] (bf16) and a random bf16 tied
embedding E [V, D], and end with what the next step needs (sampled/accepted/renoised canvas,
argmax canvas, entropies, the soft embedding for self-conditioning):

  dgplug:        head_sample(h, E, temperature=T) (streams the vocabulary; no [N, V] tensor),
                 then entropy-bound acceptance (sort/cumsum of 256 entropies) and renoising.
  transformers:  logits = lm_head(h) in bf16 -> fp32, softcap, / T, softmax, multinomial, argmax,
                 Categorical entropy, sort/cumsum acceptance, renoise randint, then the next
                 step's soft embedding softmax(l.to(bf16), fp32).to(bf16) @ E.

Each side runs in a fresh subprocess; memory is the peak resident set during the step minus the
resident set just before it (the kernel's VmHWM is reset first), with glibc told to return freed
memory at once, so it counts every temporary and the outputs (transformers' logits included).
dgplug's memory does not depend on V (fixed tiles): --vocab 32768 gives the same figure faster. transformers' two bf16 matmuls over the vocabulary (lm_head and
the soft embedding) are timed on a vocabulary slice and scaled to V (their cost is linear in V;
on this AVX2 CPU they are very slow, the soft-embedding one especially); everything else runs at
full size. --tf-full-matmuls runs them whole instead. Times are medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CANVAS = 256
SOFTCAP = 30.0
TEMPERATURE = 0.4 + (0.8 - 0.4) * 47 / 48  # the schedule's value at the first step
ENTROPY_BOUND = 0.1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_inputs(batch: int, vocab: int, hidden: int):
    """bf16 E ~ N(0, 0.06^2) (logit std ~3) and h with one planted token per position (top
    logit ~20), so the step's distributions are peaked like a trained model's, not flat."""
    import torch

    g = torch.Generator().manual_seed(0)
    sigma = 0.06
    table = torch.empty(vocab, hidden, dtype=torch.bfloat16)
    for v0 in range(0, vocab, 2048):
        v1 = min(v0 + 2048, vocab)
        table[v0:v1] = torch.randn(v1 - v0, hidden, generator=g) * sigma
    n = batch * CANVAS
    target = torch.randint(0, vocab, (n,), generator=g)
    h = torch.randn(n, hidden, generator=g) + (20.0 / (hidden * sigma * sigma)) * table[target].float()
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS like the final normed output
    return h.to(torch.bfloat16), table


def _accept_and_renoise(canvas, sampled, entropy, vocab):
    import torch

    sorted_h, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= ENTROPY_BOUND
    accepted = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    canvas = torch.where(accepted, sampled, canvas)
    return torch.where(~accepted, torch.randint(0, vocab, canvas.shape), canvas)


def _step_dgplug(h, table, canvas, vocab):
    from dgplug.kernels.sampler import head_sample

    out = head_sample(h, table, softcap=SOFTCAP, temperature=TEMPERATURE, seed=0, step=1, impl="torch")
    b = canvas.shape[0]
    new_canvas = _accept_and_renoise(canvas, out.token.view(b, CANVAS), out.entropy.view(b, CANVAS), vocab)
    soft = out.soft.view(b, CANVAS, -1).mul_(h.shape[1] ** 0.5)  # the caller's sqrt(D) scale
    return {"canvas": new_canvas, "argmax": out.argmax, "soft": soft}


def _step_transformers(h, table, canvas, vocab, vslice, full_matmuls, timings):
    """transformers' order of operations (generation_diffusion_gemma._denoising_step and the
    decoder's self-conditioning input); the two bf16 vocabulary matmuls optionally on a slice."""
    import torch

    b = canvas.shape[0]
    hb = h.view(b, CANVAS, -1)
    t0 = time.perf_counter()
    if full_matmuls:
        logits = (hb @ table.T).float()
        timings["lm_head"] = time.perf_counter() - t0
    else:
        part = (hb @ table[:vslice].T).float()
        timings["lm_head"] = (time.perf_counter() - t0) * vocab / vslice
        logits = part.repeat(1, 1, vocab // vslice)  # same size and value spread as the real logits
        del part
    t0 = time.perf_counter()
    logits = logits / SOFTCAP
    logits = torch.tanh(logits)
    logits = logits * SOFTCAP
    processed = logits / TEMPERATURE
    del logits
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(b, CANVAS)
    del probs
    argmax = torch.argmax(processed, dim=-1)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    new_canvas = _accept_and_renoise(canvas, sampled, entropy, vocab)
    sc = processed.to(table.dtype)  # self_conditioning_logits for the next step
    del processed
    timings["sampler"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = sc.softmax(dim=-1, dtype=torch.float32).to(table.dtype)
    del sc
    t_softmax = time.perf_counter() - t0
    t0 = time.perf_counter()
    if full_matmuls:
        soft = p @ table
        t_mm = time.perf_counter() - t0
    else:
        soft = p[..., :vslice] @ table[:vslice]
        t_mm = (time.perf_counter() - t0) * vocab / vslice
    soft = soft * torch.tensor(h.shape[1] ** 0.5, dtype=table.dtype)
    del p
    timings["soft_embedding"] = t_softmax + t_mm
    return {"canvas": new_canvas, "argmax": argmax, "soft": soft}


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    h, table = _make_inputs(args.batch, args.vocab, args.hidden)
    canvas = torch.randint(0, args.vocab, (args.batch, CANVAS))
    # a tiny warm-up pages in library code and starts the thread pools without leaving big
    # freed buffers behind
    small = table[:256]
    if args.side == "dgplug":
        _step_dgplug(h[:CANVAS], small, canvas[:1], small.shape[0])
    else:
        _step_transformers(h[:CANVAS], small, canvas[:1], small.shape[0], small.shape[0], True, {})
    def run_once():
        timings: dict = {}
        t0 = time.perf_counter()
        if args.side == "dgplug":
            out = _step_dgplug(h, table, canvas, args.vocab)
            timings["total"] = time.perf_counter() - t0
        else:
            out = _step_transformers(h, table, canvas, args.vocab, args.vslice, args.tf_full_matmuls, timings)
            timings["total"] = timings["lm_head"] + timings["sampler"] + timings["soft_embedding"]
        del out
        return timings

    def measured(fn):
        base = _rss_bytes()
        _reset_peak()
        res = fn()
        return res, max(0, _peak_bytes() - base)

    times, parts, peaks = [], [], []
    for _ in range(args.repeats):
        timings, peak = measured(run_once)
        parts.append(timings), times.append(timings["total"]), peaks.append(peak)
    print(json.dumps({
        "side": args.side, "batch": args.batch, "seconds": statistics.median(times), "runs": times,
        "parts": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        "peak_mib": max(peaks) / 2**20, "peaks_mib": [p / 2**20 for p in peaks],
    }))


def _spawn(args, side, batch, repeats, vslice):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--batch", str(batch),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--repeats", str(repeats),
           "--vslice", str(vslice), "--threads", str(args.threads)]
    if args.tf_full_matmuls:
        cmd.append("--tf-full-matmuls")
    t0 = time.perf_counter()
    def launch(extra_args, env):
        res = subprocess.run(cmd + extra_args, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"{side} batch {batch} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    # memory runs: glibc mmaps every buffer over 128 KiB and returns freed memory at once, and
    # MKL keeps no buffer cache, so the resident set follows the live allocations
    mem_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
                   MKL_DISABLE_FAST_MM="1")
    if side == "dgplug":  # small tiles: time with the default allocator, memory in one more run
        out = launch([], dict(os.environ))
        mem = launch(["--repeats", "1"], mem_env)
        out["peak_mib"] = mem["peak_mib"]
    else:  # huge buffers, mmapped either way: time and memory from the same runs
        out = launch([], mem_env)
    out["wall"] = time.perf_counter() - t0
    print(f"  {side:12s} batch {batch}: {out['seconds']:8.2f} s  peak +{out['peak_mib']:9.1f} MiB  "
          f"parts {({k: round(v, 2) for k, v in out['parts'].items()})}  (process {out['wall']:.0f} s)",
          flush=True)
    return out


def _timed(fn):
    """(wall, CPU of the whole process) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def sweep(args):
    """dgplug's CPU head + sampler over a grid of (rows per task, columns per tile), the
    configurations alternated round by round in one process; medians of wall and CPU time."""
    import torch

    from dgplug.kernels.sampler import _head_sample_torch

    torch.set_num_threads(args.threads)
    h, table = _make_inputs(args.batches[0] if args.batches else 2, args.vocab, args.hidden)
    h = h.float()
    if args.fp32:
        table = table.float()
    grid = [(rc, vt) for rc in args.rows for vt in args.tiles]
    kw = dict(softcap=SOFTCAP, temperature=TEMPERATURE, seed=0, step=1, row_offset=0, want_soft=True)
    runs = {g: [] for g in grid}
    print(f"sweep: {h.shape[0]} rows, V={args.vocab}, D={args.hidden}, {table.dtype} table, "
          f"{args.threads} threads; {_load()}", flush=True)
    for _ in range(args.repeats):
        for rc, vt in grid:
            runs[(rc, vt)].append(_timed(lambda: _head_sample_torch(h, table, rows_chunk=rc, vocab_tile=vt, **kw)))
    print(f"{'rows/task':>9} {'cols/tile':>9} {'wall s':>8} {'CPU s':>8}")
    for (rc, vt), r in runs.items():
        print(f"{rc:>9} {vt:>9} {statistics.median(x[0] for x in r):>8.2f} {statistics.median(x[1] for x in r):>8.2f}")
    print(_load())


def thread_sweep(args):
    """One op at a time at 1 and 2 intra-op threads, alternated: fp32 matmuls [M, K] x [K, N]
    of growing size and an elementwise op of growing length; medians of wall time."""
    import torch

    sizes = [(64, 256, 256), (256, 256, 256), (512, 256, 512), (512, 256, 1024), (512, 1024, 1024),
             (256, 2816, 2816), (512, 2816, 2816), (2048, 2816, 2816)]
    lengths = [2**15, 2**17, 2**19, 2**21, 2**23]
    print(f"thread sweep: {_load()}", flush=True)
    cases = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        cases.append((f"mm {m}x{k}x{n} ({2 * m * k * n / 1e6:.0f} MFLOP)", lambda a=a, b=b: torch.mm(a, b)))
    for n in lengths:
        x = torch.randn(n)
        cases.append((f"tanh {n} elements", lambda x=x: torch.tanh(x)))
    inner = 5
    for name, fn in cases:
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for t in (1, 2):
                torch.set_num_threads(t)
                fn()
                times[t].append(min(_timed(fn)[0] for _ in range(inner)))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"  {name:<36} 1 thread {one * 1e3:9.3f} ms   2 threads {two * 1e3:9.3f} ms   {one / two:5.2f}x", flush=True)
    print(_load())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="V=32768, batches 1 and 2")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="dgplug batches (default 1 8)")
    ap.add_argument("--tf-batches", type=int, nargs="+", default=None, help="transformers batches (default 1 4)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats at batch 1 (larger batches run once)")
    ap.add_argument("--vslice", type=int, default=None, help="vocabulary slice for transformers' matmuls")
    ap.add_argument("--tf-full-matmuls", action="store_true")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--sweep", action="store_true", help="dgplug's CPU tile sizes (V=65536, D=256 unless given)")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512], help="sweep: rows per task")
    ap.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768],
                    help="sweep: columns per tile")
    ap.add_argument("--fp32", action="store_true", help="sweep: an fp32 table instead of bf16")
    ap.add_argument("--thread-sweep", action="store_true", help="1 vs 2 threads per op size")
    ap.add_argument("--worker", choices=["dgplug", "transformers"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.thread_sweep:
        return thread_sweep(args)
    if args.sweep:
        args.vocab = args.vocab or 65536
        args.hidden = args.hidden if "--hidden" in sys.argv else 256
        return sweep(args)
    if args.vocab is None:
        args.vocab = 32768 if args.quick else 262144
    if args.worker:
        args.side = args.worker
        args.vslice = args.vslice or 4096
        return worker(args)

    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    tf_batches = args.tf_batches or ([1, 2] if args.quick else [1, 4])
    print(f"sampler step: V={args.vocab} D={args.hidden} canvas {CANVAS}, bf16 embedding, "
          f"{args.threads} threads, T={TEMPERATURE:.4f}")
    results = {}
    for b in batches:
        results[("dgplug", b)] = _spawn(args, "dgplug", b, args.repeats if b == 1 else 1, 0)
    for b in tf_batches:
        # the bf16 soft-embedding matmul runs at ~0.4 GFLOP/s here: keep its slice small
        vslice = args.vslice or max(512, min(args.vocab, 4096 // b))
        results[("transformers", b)] = _spawn(args, "transformers", b, args.repeats if b == 1 else 1, vslice)

    print()
    print(f"{'batch':>5} | {'dgplug s':>9} | {'transformers s':>14} | {'speed-up':>8} | "
          f"{'dgplug MiB':>10} | {'transformers MiB':>16}")
    print("-" * 78)
    for b in sorted(set(batches) | set(tf_batches)):
        d, t = results.get(("dgplug", b)), results.get(("transformers", b))
        ds = f"{d['seconds']:9.2f}" if d else f"{'-':>9}"
        ts = f"{t['seconds']:14.2f}" if t else f"{'-':>14}"
        ratio = f"{t['seconds'] / d['seconds']:7.1f}x" if d and t else f"{'-':>8}"
        dm = f"{d['peak_mib']:10.1f}" if d else f"{'-':>10}"
        tm = f"{t['peak_mib']:16.1f}" if t else f"{'-':>16}"
        print(f"{b:>5} | {ds} | {ts} | {ratio} | {dm} | {tm}")
    if not args.tf_full_matmuls:
        print("transformers' lm_head and soft-embedding bf16 matmuls timed on a vocabulary slice and "
              "scaled to V; the rest at full size. Memory: peak RSS during the step minus RSS before it.")


if __name__ == "__main__":
    main()
