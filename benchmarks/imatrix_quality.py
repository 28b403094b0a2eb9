"""What an importance matrix buys: each quantized type with and without `--imatrix`.

Formats (`--formats`, default int4,Q4_K_M): int4 (round to nearest, clip search, clip search
weighted by the imatrix; dgplug/converters/quant.py) and any GGUF mix that takes one (Q4_K_M, Q3_K_M,
Q2_K, IQ4_XS, Q4_0, ...: export_gguf with and without the imatrix, Q2_K_S with it only; read back
dequantized by gguf-py through dgplug/converters/gguf_import.iter_hf_tensors). In the tiny model (16
experts) the expert down projections have rows of 128, so they take llama.cpp's fallbacks (Q4_K_M
and Q3_K_M: Q5_0; Q2_K and Q3_K_S: Q4_0; IQ4_XS: IQ4_NL), weighted as the rest of the mix.

The model and the measure are benchmarks/quant_quality.py's (a tiny random DiffusionGemma with
the real layer pattern, bf16; mean KL of the next-step distribution against bf16 and argmax
agreement over 8 prompts x 2 canvas steps). The imatrix is collected by `dgplug imatrix`'s
collector (dgplug/converters/imatrix.collect: generate over calibration prompts) on prompts drawn with
another seed than the evaluation prompts. `--outliers F` multiplies a few channels of every
pre-projection norm by F, the activation outliers real LLMs have (a random model has none, so
there is little for an imatrix to find without them).

Run: `.venv/bin/python benchmarks/imatrix_quality.py [--outliers 8] [--formats int4,Q4_K_M,Q3_K_M,Q2_K]`.
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
from dgplug.converters.gguf_export import IMATRIX_FILE_TYPES, RECIPES, export_gguf  # noqa: E402
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
    ap.add_argument("--formats", default="int4,Q4_K_M",
                    help=f"comma-separated: int4 and GGUF types ({', '.join(IMATRIX_FILE_TYPES)})")
    args = ap.parse_args(argv)
    formats = [f.strip().upper() for f in args.formats.split(",")]
    bad = [f for f in formats if f != "INT4" and f not in IMATRIX_FILE_TYPES]
    if bad:
        ap.error(f"--formats {','.join(bad)}: choose int4 or {', '.join(IMATRIX_FILE_TYPES)}")
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
        for q in (f for f in formats if f in IMATRIX_FILE_TYPES):
            runs += [] if RECIPES[q]["imatrix"] else [(q, q, {})]  # Q2_K_S: with an imatrix only
            runs += [(f"{q} + imatrix", q, {"imatrix": im_path})]
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
             "| format | mean KL vs bf16 (nats) | argmax agreement | convert s | 26B release: GB (bits/weight) |",
             "|---|---:|---:|---:|---:|"]
    for label, kl, ag, dt in rows:
        q = label.split()[0]
        proj = None if q == "int4" else QQ.gguf_projected_bytes(q, "imatrix" in label)
        size = "" if proj is None else f"{proj[0] / 1e9:.2f} ({proj[1]:.2f})"
        lines.append(f"| {label} | {kl:.3e} | {ag * 100:.2f}% | {dt:.1f} | {size} |")
    lines += ["", f"({time.time() - t0:.0f} s)"]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
