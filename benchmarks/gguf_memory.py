"""Resident memory, logits and CPU speed of a GGUF loaded packed vs dequantised at load (issue 18).

The issue's mid-size model (hidden 1024, 6 layers (5 sliding + 1 full), 16 experts top-4 x 512, dense
MLP 2048, vocabulary 262144, canvas 256; random weights, built by dgplug.testing) is converted by
`dgplug convert` to each GGUF type under --workdir (default /tmp/dgplug_gguf_memory, never the repo;
the checkpoint and the GGUFs, about 2.3 GB a type, stay there for the next run: delete it when done).
Each measurement runs in a fresh subprocess, packed and dequantised alternating round by round:

  packed       dgplug.load(file): the ggml blocks stay as they are (kernels.ggml.GGMLWeight)
  dequantised  the same file with every tensor dequantised by gguf-py at load (the path before #18)

Per side: bytes of the loaded model's tensors (dgplug.loader.weight_bytes) vs the file size; RSS
after imports, after the load, and the peak (VmHWM) after the load plus the timed denoise steps
(one step = the decoder over a 256-token canvas against a 32-token prompt's cache + the tied head's
fp32 logits [256, 262144]; the fused sampler's Gumbel hashing is left out: it costs the same on
both sides, on a random model's flat logits it dominates the step, and #17 is rewriting it); ms per denoise step (median of --steps
steps after --warmup warm-up steps, over the rounds); and the logits of one forward (the 32-token prompt + a 32-token
canvas, self-conditioning logits given), compared between the sides: max abs and max relative
difference, argmax agreement.

    python benchmarks/gguf_memory.py [--quant Q8_0 Q4_K_M Q5_K_M Q6_K] [--threads 2] [--rounds 1] [--steps 2] [--warmup 1]
        [--no-logits]     (--steps 0 --warmup 0 --no-logits: bytes and RSS of the load alone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
PROMPT, CANVAS, LOGITS_CANVAS = 32, 256, 32


def text_config() -> dict:
    from dgplug.testing import tiny_text_config

    return tiny_text_config(vocab_size=262144, hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
                            num_global_key_value_heads=1, sliding_window=1024, num_experts=16, top_k_experts=4,
                            moe_intermediate_size=512, layer_types=["sliding_attention"] * 5 + ["full_attention"])


def build(work: Path, quants) -> dict:
    """The safetensors checkpoint once, then one GGUF per type through the CLI."""
    src = work / "src"
    if not (src / "config.json").exists():
        from dgplug.testing import make_checkpoint

        make_checkpoint(src, text=text_config(), canvas_length=256, seed=0, qk_norm_scale=0.25)
    files = {}
    for q in quants:
        files[q] = work / f"mid-{q}.gguf"
        if not files[q].exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dgplug.cli", "convert", str(src), str(files[q]), "--quant", q],
                           check=True, stdout=subprocess.DEVNULL)
            print(f"converted {q} in {time.perf_counter() - t0:.0f} s", flush=True)
    return files


def rss_now(key: str = "VmRSS") -> int:
    """Resident bytes now (VmRSS) or at their peak (VmHWM). The peak is read here, not from
    getrusage's ru_maxrss: Linux carries that across exec, so a child of a parent that held the
    source checkpoint in memory reported the parent's peak (4.2 GB for every child of one run)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_dequantised(path):
    """dgplug.load of a GGUF before #18: every tensor dequantised by gguf-py at load."""
    from dgplug.config import from_dict
    from dgplug.converters.gguf_import import gguf_to_config, iter_hf_tensors
    from dgplug.loader import build as build_model

    raw = gguf_to_config(path)
    gen = raw.pop("generation_config")
    raw.pop("mask_token_id", None)
    return build_model(from_dict(raw), iter_hf_tensors(path), None, None, gen)


def child(side: str, path: str, args) -> dict:
    import torch

    import dgplug
    from dgplug.loader import weight_bytes
    from dgplug.model import KVCache

    torch.set_num_threads(args.threads)
    base = rss_now()
    t0 = time.perf_counter()
    model = dgplug.load(path) if side == "packed" else load_dequantised(path)
    load_s = time.perf_counter() - t0
    packed_b, other_b = weight_bytes(model)
    after_load = rss_now()
    tc = model.tc
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, PROMPT), generator=g)
    canvas = torch.randint(0, tc.vocab_size, (1, CANVAS), generator=g)
    cache = KVCache.empty(tc.num_hidden_layers)
    with torch.no_grad():
        model.encode(ids, cache)
        soft, times = None, []
        for step in range(args.steps + args.warmup):
            t1 = time.perf_counter()
            h = model.denoise(canvas, cache, sc_soft=soft)
            logits = model.head(h)  # the tied head: the packed table read one chunk of rows at a time
            times.append(time.perf_counter() - t1)
            canvas, soft = logits.argmax(-1), None
            del logits
        peak = rss_now("VmHWM")
        if args.logits:  # a shorter canvas: the comparison is of numbers, not of speed
            ids2 = torch.randint(10, 1000, (1, PROMPT), generator=g)
            canvas2 = torch.randint(0, tc.vocab_size, (1, LOGITS_CANVAS), generator=g)
            sc = torch.randn(1, LOGITS_CANVAS, tc.vocab_size, generator=g) * 3
            out = model(input_ids=ids2, decoder_input_ids=canvas2, self_conditioning_logits=sc)
            torch.save(out.logits[0].clone(), args.logits)
    return dict(side=side, load_s=load_s, packed_bytes=packed_b, other_bytes=other_b, base_rss=base,
                load_rss=after_load, peak_rss=peak, step_ms=[t * 1e3 for t in times[args.warmup:]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
    ap.add_argument("--workdir", default="/tmp/dgplug_gguf_memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"))
    ap.add_argument("--logits", default=None)
    ap.add_argument("--no-logits", action="store_true", help="skip the logits comparison (memory and speed only)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = build(work, args.quant)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for q in args.quant:
        runs = {"packed": [], "dequantised": []}
        for rnd in range(args.rounds):  # alternate the sides (by round and type), one fresh process per run
            first = (rnd + args.quant.index(q)) % 2
            for side in (("packed", "dequantised") if first == 0 else ("dequantised", "packed")):
                cmd = [sys.executable, __file__, "--child", side, str(files[q]), f"--threads={args.threads}",
                       f"--steps={args.steps}", f"--warmup={args.warmup}"]
                if rnd == 0 and not args.no_logits:
                    cmd.append(f"--logits={work / f'logits-{q}-{side}.pt'}")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(q, json.dumps(runs[side][-1]), flush=True)
        nan = float("nan")
        max_abs = max_rel = agree = nan
        if not args.no_logits:
            a = torch.load(work / f"logits-{q}-packed.pt")
            b = torch.load(work / f"logits-{q}-dequantised.pt")
            diff = (a - b).abs()
            max_abs, max_rel = diff.max().item(), (diff / b.abs().clamp_min(1e-6)).max().item()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            for side in ("packed", "dequantised"):
                (work / f"logits-{q}-{side}.pt").unlink()
        size = files[q].stat().st_size
        for side, rs in runs.items():
            first = rs[0]
            rows.append(dict(quant=q, side=side, file=size, tensors=first["packed_bytes"] + first["other_bytes"],
                             packed=first["packed_bytes"], base=first["base_rss"], load=first["load_rss"],
                             peak=max(r["peak_rss"] for r in rs), load_s=statistics.median(r["load_s"] for r in rs),
                             step_ms=statistics.median([t for r in rs for t in r["step_ms"]] or [nan]),
                             max_abs=max_abs, max_rel=max_rel, agree=agree))
        print(f"{q}: done", flush=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"\nmid-size model (hidden 1024, 6 layers, 16 experts top-4, vocab 262144, canvas 256), {args.threads} threads, "
          f"{args.rounds} alternated rounds x {args.steps} steps after {args.warmup} warm-up, load average at the end {load}")
    print(f"{'type':<8}{'side':<13}{'file MiB':>9}{'tensors MiB':>12}{'ratio':>7}{'RSS load':>10}{'peak RSS':>10}"
          f"{'load s':>8}{'ms/step':>9}")
    for r in rows:
        print(f"{r['quant']:<8}{r['side']:<13}{r['file'] / 2**20:>9.0f}{r['tensors'] / 2**20:>12.0f}"
              f"{r['tensors'] / r['file']:>7.3f}{(r['load'] - r['base']) / GIB:>9.2f}G{r['peak'] / GIB:>9.2f}G"
              f"{r['load_s']:>8.1f}{r['step_ms']:>9.0f}")
    print(f"\n{'type':<8}{'logits max abs diff':>20}{'max rel diff':>14}{'argmax agree':>14}{'step packed/deq':>17}")
    for q in args.quant:
        p, d = [r for r in rows if r["quant"] == q]
        print(f"{q:<8}{p['max_abs']:>20.2e}{p['max_rel']:>14.2e}{p['agree']:>14.4f}{p['step_ms'] / d['step_ms']:>17.2f}")


if __name__ == "__main__":
    main()
