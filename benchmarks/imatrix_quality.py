"""What an importance matrix buys: each quantized type with and without `--imatrix`.

Formats (`--formats`, default both): int4 (round to nearest, clip search, clip search weighted
by the imatrix; converters/quant.py) and the GGUF Q4_K_M mix (export_gguf with and without the
imatrix; read back dequantized by gguf-py through converters/gguf_import.iter_hf_tensors). In
the tiny model the Q4_K_M mix has Q4_K, Q5_K, Q6_K tensors (rows of 256) and Q5_0 expert down
projections (rows of 128, not weighted).

The model and the measure are benchmarks/quant_quality.py's (a tiny random DiffusionGemma with
the real layer pattern, bf16; mean KL of the next-step distribution against bf16 and argmax
agreement over 8 prompts x 2 canvas steps). The imatrix is collected by `dgplug imatrix`'s
collector (converters/imatrix.collect: generate over calibration prompts) on prompts drawn with
another seed than the evaluation prompts. `--outliers F` multiplies a few channels of every
pre-projection norm by F, the activation outliers real LLMs have (a random model has none, so
there is little for an imatrix to find without them).

Run: `.venv/bin/python benchmarks/imatrix_quality.py [--outliers 8] [--formats int4,Q4_K_M]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quant_quality as QQ  # noqa: E402

import dgplug  # noqa: E402
from dgplug.converters import gguf_import as GI  # noqa: E402
from dgplug.converters import quant as Q  # noqa: E402
from dgplug.converters.gguf_export import export_gguf  # noqa: E402
from dgplug.converters.imatrix import calibration_chunks, collect  # noqa: E402
from dgplug.testing import make_checkpoint  # noqa: E402

NORMS = ("input_layernorm", "pre_feedforward_layernorm", "pre_feedforward_layernorm_2")


def add_outliers(src: Path, factor: float, channels: int = 4, seed: int = 7) -> None:
    """Scale `channels` fixed channels of the pre-projection norms by `factor`, in place."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(str(f))
        for k, v in sd.items():
            if any(f".{n}.weight" in k for n in NORMS) and "vision" not in k:
                idx = torch.randperm(v.shape[0], generator=g)[:channels]
                v[idx] = (v[idx].float() * factor).to(v.dtype)
        save_file(sd, str(f), metadata={"format": "pt"})


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outliers", type=float, default=8.0, help="factor on a few norm channels (1: none)")
    ap.add_argument("--calib", type=int, default=16, help="calibration prompts (24 tokens each)")
    ap.add_argument("--formats", default="int4,Q4_K_M", help="comma-separated: int4, Q4_K_M")
    args = ap.parse_args(argv)
    formats = {f.strip().upper() for f in args.formats.split(",")}
    torch.set_num_threads(int(os.environ.get("DGPLUG_THREADS", 2)))
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_checkpoint(tmp / "bf16", text=QQ.tiny_text(), dtype=torch.bfloat16, qk_norm_scale=0.25,
                              canvas_length=32)
        if args.outliers != 1:
            add_outliers(src, args.outliers)
        model = QQ.load_model(src)
        V = model.config.text_config.vocab_size
        prompts, canvases, half = QQ.inputs(V, 32)  # evaluation: seed 1234
        ref = QQ.logits_two_steps(model, prompts, canvases, half)
        g = torch.Generator().manual_seed(99)  # calibration: another seed
        calib = torch.randint(5, V - 3, (args.calib * 24,), generator=g).tolist()
        t1 = time.time()
        im = collect(dgplug.load(src, dtype="fp32"), calibration_chunks(calib, 24), steps=4)
        t_collect = time.time() - t1
        print(f"imatrix collected in {t_collect:.0f} s", file=sys.stderr, flush=True)
        im_path = im.save(tmp / "imatrix.gguf")
        runs = []
        if "INT4" in formats:
            runs += [("int4 g128", "int4", {}), ("int4 g128 + clip search", "int4", {"clip": True}),
                     ("int4 g128 + imatrix", "int4", {"imatrix": im_path})]
        if "Q4_K_M" in formats:
            runs += [("Q4_K_M", "Q4_K_M", {}), ("Q4_K_M + imatrix", "Q4_K_M", {"imatrix": im_path})]
        for label, scheme, kw in runs:
            t1 = time.time()
            dst = tmp / label.replace(" ", "_")
            if scheme == "int4":
                out = Q.quantize_checkpoint(src, dst, scheme, progress=False, **kw)
                weights = Q.load_quantized_tensors(out, as_quantized_weight=False)
            else:
                out = export_gguf(src, dst.with_suffix(".gguf"), quant=scheme, progress=False, workers=1, **kw)
                weights = dict(GI.iter_hf_tensors(out))
            dt = time.time() - t1
            QQ.set_weights(model, weights)
            kl, ag = QQ.compare(ref, QQ.logits_two_steps(model, prompts, canvases, half, ref_step1=ref[0]))
            rows.append((label, kl, ag, dt))
            print(f"{label}: KL {kl:.3e}, convert {dt:.0f} s", file=sys.stderr, flush=True)
    lines = [f"Tiny DiffusionGemma (quant_quality.py's), outlier channels x{args.outliers:g}; imatrix from "
             f"{args.calib} calibration prompts (collection {t_collect:.1f} s); {torch.get_num_threads()} threads, "
             f"load average {os.getloadavg()[0]:.1f}.", "",
             "| format | mean KL vs bf16 (nats) | argmax agreement | convert s |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {kl:.3e} | {ag * 100:.2f}% | {dt:.1f} |" for label, kl, ag, dt in rows]
    lines += ["", f"({time.time() - t0:.0f} s)"]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
