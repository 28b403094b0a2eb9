"""Generation on CPU: dgplug vs transformers, same model, same prompt, one run.

A small DiffusionGemma with the real vocabulary (262,144) and canvas (256), a few layers, built
by transformers with random weights. Each side runs in a fresh subprocess (so peak RSS is its
own); a fixed number of denoising steps (the stop test never fires on a random model). Prints
tokens/s, seconds per denoise step and peak memory of each side, and the ratios.

    python benchmarks/generate_cpu.py [--layers 2] [--hidden 256] [--steps 8] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(path: Path, args) -> None:
    from dgplug.testing import make_checkpoint, tiny_text_config

    text = tiny_text_config(vocab_size=262144, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=1024,
                            num_experts=16, top_k_experts=4, moe_intermediate_size=args.hidden // 2,
                            layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"])
    make_checkpoint(path, text=text, canvas_length=256, seed=0, qk_norm_scale=0.25, tokenizer=False)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, path: str, args) -> dict:
    """Runs in a fresh process: load, warm up, time `repeats` generations."""
    import torch

    torch.set_num_threads(args.threads)
    ids = torch.randint(10, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=256, max_denoising_steps=args.steps)
    if side == "transformers":
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()

        def gen():
            return model.generate(input_ids=ids, **kw)
    else:
        import dgplug

        model = dgplug.load(path)
        rng = "transformers" if side == "dgplug-unfused" else "counter"

        def gen():
            return model.generate(ids, rng=rng, seed=0, **kw)
    base = rss_mib()  # peak so far: the loaded model
    gen()  # warm-up (first-call allocations, lazy imports)
    times = []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = gen()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    new = int((out.sequences[:, args.prompt:] != 0).sum())
    return dict(side=side, median_s=med, tok_s=new / med, s_per_step=med / args.steps, peak_mib=rss_mib(),
                loaded_mib=base, times=times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        build(path, args)
        sides = ("transformers", "dgplug-unfused", "dgplug")
        runs = {s: [] for s in sides}
        # the machine is noisy: alternate the sides round by round, one fresh process per run
        for _ in range(args.repeats):
            for side in sides:
                cmd = [sys.executable, __file__, "--child", side, str(path), "--repeats=1"] + [
                    f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "steps", "batch", "prompt", "threads")]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows = []
        for side in sides:
            rs = sorted(runs[side], key=lambda r: r["median_s"])
            mid = rs[len(rs) // 2]
            rows.append(dict(mid, peak_mib=max(r["peak_mib"] for r in rs)))
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab 262144, canvas 256, batch {args.batch}, "
          f"{args.steps} denoise steps, {args.threads} threads, median of {args.repeats}")
    print(f"{'side':<16}{'tok/s':>10}{'s/step':>10}{'peak RSS MiB':>14}{'after load':>12}")
    for r in rows:
        print(f"{r['side']:<16}{r['tok_s']:>10.1f}{r['s_per_step']:>10.3f}{r['peak_mib']:>14.0f}{r['loaded_mib']:>12.0f}")
    hf, fused = rows[0], rows[2]
    print(f"dgplug (fused) vs transformers: {fused['tok_s'] / hf['tok_s']:.2f}x tokens/s, "
          f"peak RSS {fused['peak_mib']:.0f} vs {hf['peak_mib']:.0f} MiB "
          f"(transient {fused['peak_mib'] - fused['loaded_mib']:.0f} vs {hf['peak_mib'] - hf['loaded_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
