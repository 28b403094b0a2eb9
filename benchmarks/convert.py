"""GGUF conversion throughput and memory (issue 3, "Measured").

A synthetic DiffusionGemma checkpoint with the released per-layer shapes (hidden 2816, 128
experts x 704, dense MLP 2112, vocabulary 262144) and 2 layers (one sliding, one full), about
4.6 GB of bf16 in several shards, is written to --workdir (default /tmp/dgplug_convert_bench,
never the repo; removed at the end unless --keep) and converted to each --quant in a FRESH subprocess. Reported per run: wall
time, input MB/s (bf16 bytes read / wall), output size, and peak RSS (ru_maxrss) of the converting
process and of its largest worker process. Baseline: gguf-py's own Q8_0 encoder
(gguf.quants.quantize) on the same tensors, single process, same row chunks.

    python benchmarks/convert.py [--quant Q8_0 Q4_K_M] [--workdir DIR] [--keep]
    python benchmarks/convert.py --from-gguf [--quant Q8_0 int8] [--rounds 2]

Goals: >= 150 MB/s on 2 cores, peak RSS <= 1.5 GiB.

--from-gguf: the checkpoint is also converted once to a BF16 GGUF (the same values), and each --quant
(a GGUF type or int4/int8/fp8) is made from both sources in alternated fresh processes, --rounds
times: wall time, MB/s, peak RSS of each side and their ratio, and whether the outputs are the same
(a GGUF's bytes; a directory's tensor values, as the GGUF's F32 norms stay F32): they must be, a BF16
GGUF holds the checkpoint's bf16 values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144,
    layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    rope_parameters={"full_attention": {"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "proportional"},
                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
    pad_token_id=0, eos_token_id=1, bos_token_id=2, model_type="diffusion_gemma_text",
)
SHARD_BYTES = 1 << 30


def _bf16_pool(n=1 << 24, seed=0):
    x = (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.02)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16 is fine for a benchmark


def build_checkpoint(d: Path) -> int:
    """Write the synthetic checkpoint (streamed, a few MB of RAM); returns its tensor bytes."""
    from dgplug.config import from_dict
    from dgplug.names import text_tensors
    from dgplug.testing import save_tokenizer

    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
           "canvas_length": 256, "text_config": TEXT, "tie_word_embeddings": True}
    specs = text_tensors(from_dict(cfg).text)
    done = d / ".complete"
    total = sum(int(np.prod(s.shape)) * 2 for s in specs)
    if done.exists():
        return total
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "generation_config.json").write_text(json.dumps({"max_denoising_steps": None, "t_min": None}))
    save_tokenizer(d, TEXT["vocab_size"])
    shards, cur, size = [], [], 0
    for s in specs:
        nb = int(np.prod(s.shape)) * 2
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nb
    shards.append(cur)
    pool = _bf16_pool()
    weight_map = {}
    pos = 0
    for i, group in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for s in group:
            nb = int(np.prod(s.shape)) * 2
            header[s.hf] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[s.hf] = fn
        hb = json.dumps(header).encode()
        hb += b" " * ((-len(hb)) % 8)
        with open(d / fn, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for s in group:
                n = int(np.prod(s.shape))
                if s.kind in ("norm", "scalar") or s.hf.endswith(("router.scale", "per_expert_scale")):
                    f.write(np.full(n, 0x3F80, np.uint16).tobytes())  # 1.0
                    continue
                while n:
                    k = min(n, pool.size - 1024)
                    start = pos % 1024
                    f.write(pool[start:start + k].tobytes())
                    pos += 7
                    n -= k
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    done.write_text("ok")
    return total


SCHEMES = ("int4", "int8", "fp8")


def worker(src: str, out: str, quant: str) -> None:
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.converters.quant import quantize_checkpoint
    t0 = time.perf_counter()
    if quant in SCHEMES:
        quantize_checkpoint(src, out, quant, progress=False)
    else:
        export_gguf(src, out, quant=quant, progress=False)
    wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall": wall, "rss_main_kb": me, "rss_max_worker_kb": kids, "out_bytes": _size(Path(out))}))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def _digest(p: Path) -> str:
    """One hash over the output: a GGUF's bytes; a directory's tensors by name and value (their shards may
    be cut elsewhere: a checkpoint is converted shard by shard, a GGUF in its own order)."""
    import hashlib

    h = hashlib.sha256()
    if not p.is_dir():
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()[:16]
    from safetensors import safe_open

    where = {k: f for f in sorted(p.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as f:
            t = f.get_tensor(name)
        # values, not dtypes: a GGUF holds norms, router and scalars in F32, a bf16 checkpoint in bf16
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.double().numpy().tobytes())
    return h.hexdigest()[:16]


def _run(src: Path, out: Path, quant: str) -> dict:
    if out.is_dir():
        shutil.rmtree(out)
    r = subprocess.run([sys.executable, __file__, "--worker", str(src), str(out), quant], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode:
        print(r.stdout, r.stderr)
        raise SystemExit(f"{quant} from {src}: conversion failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def from_gguf(src: Path, wd: Path, total: int, quants: list[str], rounds: int, keep: bool) -> None:
    """Each quant from the checkpoint and from its BF16 GGUF, alternated (see the module docstring)."""
    import statistics

    gg = wd / "source-BF16.gguf"
    if not gg.exists():
        m = _run(src, gg, "BF16")
        print(f"BF16 GGUF source: {m['out_bytes'] / 1e9:.2f} GB in {m['wall']:.0f} s")
    for q in quants:
        runs = {"checkpoint": [], "gguf": []}
        digests = {}
        for i in range(rounds):
            order = ("checkpoint", "gguf") if i % 2 == 0 else ("gguf", "checkpoint")
            for side in order:
                out = wd / f"out-{q}-{side}" if q in SCHEMES else wd / f"out-{q}-{side}.gguf"
                la = os.getloadavg()[0]
                m = _run(src if side == "checkpoint" else gg, out, q)
                runs[side].append(m)
                digests[side] = _digest(out)
                print(f"{q:7s} round {i + 1} from {side:10s}: {m['wall']:6.1f} s  {total / m['wall'] / 1e6:6.0f} MB/s in  "
                      f"peak RSS main {m['rss_main_kb'] / 2**20:.2f} GiB, largest worker "
                      f"{m['rss_max_worker_kb'] / 2**20:.2f} GiB  (load average {la:.1f} before)", flush=True)
        med = {s: statistics.median(m["wall"] for m in r) for s, r in runs.items()}
        rss = {s: max(m["rss_main_kb"] for m in r) / 2**20 for s, r in runs.items()}
        print(f"{q:7s} medians: checkpoint {med['checkpoint']:.1f} s ({total / med['checkpoint'] / 1e6:.0f} MB/s), "
              f"gguf {med['gguf']:.1f} s ({total / med['gguf'] / 1e6:.0f} MB/s), gguf / checkpoint "
              f"{med['gguf'] / med['checkpoint']:.2f}x; peak RSS main {rss['checkpoint']:.2f} / {rss['gguf']:.2f} GiB; "
              f"same output (GGUF: bytes; safetensors: tensor values): {digests['checkpoint'] == digests['gguf']}")
        if not keep:
            for side in runs:
                out = wd / f"out-{q}-{side}" if q in SCHEMES else wd / f"out-{q}-{side}.gguf"
                shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
    if not keep:
        gg.unlink(missing_ok=True)


def gguf_q8_baseline(src: Path, limit_bytes: int | None = None) -> tuple[float, int]:
    """gguf-py's Q8_0 encoder on the same tensors (single process, same chunks): seconds, bytes."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    from dgplug.checkpoint import read_index
    from dgplug.converters.gguf_export import CHUNK_ELEMS, _read_rows, _to_f32

    st = read_index(src)
    t_enc, nbytes = 0.0, 0
    for name in sorted(st):
        t = st[name]
        if len(t.shape) < 2:
            continue
        cols = t.shape[-1]
        rows = int(np.prod(t.shape[:-1]))
        step = max(1, CHUNK_ELEMS // cols)
        for r0 in range(0, rows, step):
            x = _to_f32(_read_rows(t, r0, min(rows, r0 + step), cols), t.dtype)
            t0 = time.perf_counter()
            quants.quantize(x, T.Q8_0)
            t_enc += time.perf_counter() - t0
            nbytes += x.size * 2
            if limit_bytes and nbytes >= limit_bytes:
                return t_enc, nbytes
    return t_enc, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--workdir", default="/tmp/dgplug_convert_bench")
    ap.add_argument("--keep", action="store_true",
                    help="keep the output GGUFs and the 4.8 GB checkpoint (a later run reuses it); by default "
                         "both are removed at the end")
    ap.add_argument("--baseline-gb", type=float, default=1.0, help="bf16 GB fed to the gguf Q8_0 baseline")
    ap.add_argument("--worker", nargs=3, metavar=("SRC", "OUT", "QUANT"))
    ap.add_argument("--from-gguf", action="store_true", help="each --quant from the checkpoint and from its BF16 GGUF")
    ap.add_argument("--rounds", type=int, default=2, help="--from-gguf: alternated rounds")
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    wd = Path(a.workdir)
    src = wd / "ckpt"
    t0 = time.perf_counter()
    total = build_checkpoint(src)
    print(f"checkpoint: {total / 1e9:.2f} GB bf16 at {src} (ready in {time.perf_counter() - t0:.0f} s)")
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    if a.from_gguf:
        from_gguf(src, wd, total, a.quant, a.rounds, a.keep)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
        return
    t_enc, nb = gguf_q8_baseline(src, int(a.baseline_gb * 1e9))
    base = nb / t_enc / 1e6
    print(f"gguf-py Q8_0 encoder alone (1 process, encode time only, {nb / 1e9:.2f} GB): {base:.0f} MB/s of bf16 input")
    results = {}
    for q in a.quant:
        out = wd / f"out-{q}.gguf"
        r = subprocess.run([sys.executable, __file__, "--worker", str(src), str(out), q], capture_output=True,
                           text=True, cwd=ROOT)
        if r.returncode:
            print(r.stdout, r.stderr)
            raise SystemExit(f"{q}: conversion failed")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        mbs = total / m["wall"] / 1e6
        results[q] = m
        print(f"{q:7s}: {m['wall']:6.1f} s  {mbs:6.0f} MB/s in  (x{mbs / base:.2f} of gguf-py Q8_0)  "
              f"out {m['out_bytes'] / 1e9:.2f} GB  peak RSS main {m['rss_main_kb'] / 2**20:.2f} GiB, "
              f"largest worker {m['rss_max_worker_kb'] / 2**20:.2f} GiB")
        if not a.keep:
            out.unlink(missing_ok=True)
    print(json.dumps(results))
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
