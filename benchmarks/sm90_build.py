"""Build every Triton kernel of a release-size denoise step for an H100/H200 (sm_90a), on a CPU.

The GPU check runs in a 15-minute lease drawn by chance; a kernel that does not compile for the
real backend (the interpreter accepts more), or that needs more shared memory or registers than
the chip has, would spend that lease on debugging. This script finds those beforehand, without a
GPU: Triton's driver is replaced by one that reports an sm_90 device and launches nothing, so each
`kernel[grid](...)` of dgplug's Triton paths compiles (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the bundled ptxas) and returns. The calls are the ones `benchmarks/gpu_check.py` makes, at the
release's shapes (hidden 2816, 128 experts x 704, top-8, vocabulary 262144, head dims 256/512) for
batch 1 and 8, bf16 compute, plus the MoE sweep's int4 variants and a Q4_K_M GGUF's packed experts.

Per compiled kernel: registers per thread, spill bytes and shared memory (ptxas --verbose), the
single-byte global loads in its SASS (nvdisasm; the int4 MoE once read its weights that way), the
instructions of its longest loop (SASS, static: the K loop of a GEMM; a dequantising kernel that
issues more per weight byte than the memory delivers is bound by issue, not bandwidth), which
matrix instructions it issues (mma: wgmma, the older mma.sync, or none), and a verdict: FAIL where
the launch would fail on an H100/H200 (shared memory over 227 KiB per block, registers x threads
over 64 Ki); "spills" where ptxas spilled. Kernels defined in dgplug but never
compiled here are listed too. Exit status 1 on a compile error or a FAIL.

    python benchmarks/sm90_build.py [--only moe,attention,glue,sampler,ggml] [--arch 90] [--quick]

tests/test_sm90_build.py runs it with --quick (about a minute) so that CI catches a kernel that
the interpreter runs but the sm_90 backend cannot build.

Outputs nothing but the table; nothing runs, so no figure here says anything about speed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)
REG_FILE = 65536  # 32-bit registers per SM (and per block)


class CompileOnlyDriver:
    """Reports one sm_90 device; kernels are compiled, never loaded or launched."""

    compile_only = True

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


BUILT: list[dict] = []
FAILED: list[tuple[str, str]] = []
_run = JITFunction.run


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    try:
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as e:
        raise RuntimeError(f"{self.fn.__name__}: {type(e).__name__}: {str(e).strip()[-300:]}") from e
    consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages", "maxnreg")}
    BUILT.append(dict(name=self.fn.__name__, consts=consts, kernel=kernel))
    return kernel


def _ptxas() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def resources(kernel, arch: int) -> dict:
    """Registers, spill bytes (stores + loads), shared memory and single-byte global loads (LDG.E.U8 /
    S8 in the SASS: a weight stream read a byte at a time, where 16-byte vectors were meant) of one
    compiled kernel."""
    ptx = kernel.asm["ptx"]
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        out = subprocess.run([_ptxas(), f"-arch={sm}", "--verbose", str(p), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
        sass = subprocess.run([str(Path(_ptxas()).parent / "nvdisasm"), "-c", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True).stdout
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    md = kernel.metadata
    return dict(regs=int(regs.group(1)) if regs else -1,
                spill=(int(spill.group(1)) + int(spill.group(2))) if spill else -1,
                smem=int(getattr(md, "shared", 0)), warps=int(getattr(md, "num_warps", 4)),
                byte_loads=len(re.findall(r"\bLDG\.E\.[US]8\b", sass)), loop=loop_instructions(sass),
                mma=tensor_core_path(sass),
                loops=loop_sizes(sass),
                stages=int(getattr(md, "num_stages", 0)))


def loop_sizes(sass: str) -> list[int]:
    """Instructions between each backward branch and its target (one entry per loop, innermost
    and outermost alike), largest first."""
    addr, label, sizes = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        a = int(m.group(1), 16)
        if label:
            addr[label], label = a, None
        b = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", m.group(2))
        if b and addr.get(b.group(1), a + 1) < a:
            sizes.append((a - addr[b.group(1)]) // 16 + 1)
    return sorted(sizes, reverse=True)


def tensor_core_path(sass: str) -> str:
    """Which matrix instructions the kernel issues: 'wgmma' (HGMMA / QGMMA: Hopper's warpgroup MMA,
    sm_90a), 'mma' (HMMA / IMMA: the older per-warp mma.sync, a slower path on Hopper), '-' (none)."""
    if re.search(r"\b[HQ]GMMA\b", sass):
        return "wgmma"
    return "mma" if re.search(r"\b[HI]MMA\b", sass) else "-"


def loop_instructions(sass: str) -> int:
    """Instructions of the longest loop (0: none)."""
    return max(loop_sizes(sass), default=0)


# -- the calls ---------------------------------------------------------------------------------
D, I, EXPERTS, TOPK, V = 2816, 704, 128, 8, 262144
DENSE = 2112  # the dense MLP's width (gelu_mul)
BF = torch.bfloat16


def _call(label, fn):
    n0 = len(BUILT)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every compile error is reported, then the exit status is 1
        FAILED.append((label, str(e) or type(e).__name__))
    for b in BUILT[n0:]:
        b["call"] = label


QUICK = [False]  # --quick (the test): 16 experts, the default tiles, the halves order, two GGUF pairs


def moe_calls():
    from dgplug.converters.quant import quantize
    from dgplug.kernels import moe_triton as kmt, quantized_weight as km

    E = 16 if QUICK[0] else EXPERTS
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).to(BF)
    dn = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(BF)

    def q(w, scheme):
        parts = [quantize(w[e].float(), scheme) for e in range(w.shape[0])]
        return km.QuantizedWeight(scheme=scheme, **{k: torch.stack([p[k] for p in parts]) for k in parts[0]})

    weights = {"bf16": (gu, dn), **{s: (q(gu, s), q(dn, s)) for s in ("int8", "fp8", "int4")}}
    weights["int4 halves"] = tuple(km.repack_int4_halves(w, bk) for w, bk in zip(weights["int4"], (128, 64)))
    weights["int4 fragments"] = tuple(km.repack_int4_fragments(w, bk) for w, bk in zip(weights["int4"], (128, 64)))
    sw = dict(SWAP_AB=True)
    int4 = [("plain, magic", dict(SWAP_AB=False)), ("default", {}), ("swap convert", dict(sw, MAGIC=False)),
            ("swap BM16", dict(sw, BLOCK_M=16)), ("swap BM64", dict(sw, BLOCK_M=64)),
            ("swap BN128", dict(sw, BLOCK_N1=128, BLOCK_N2=128)), ("swap stages3", dict(sw, num_stages=3)),
            ("swap w8", dict(sw, num_warps=8)), ("swap BN32", dict(sw, BLOCK_N1=32, BLOCK_N2=32)),
            ("sums in the loop", dict(XSUM=False))]
    if QUICK[0]:  # 16 experts: BLOCK_M 16 by hand, as the release's T=256 gets by default
        int4 = [int4[1], ("default BM16", dict(BLOCK_M=16))]
    for T in (256, 2048):
        x = torch.randn(T, D, generator=g).to(BF)
        idx = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)])
        idx128 = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(T)])
        _call(f"moe align T={T} E={EXPERTS}", lambda: kmt._align(idx128, EXPERTS, 16 if T == 256 else 64))
        w = torch.softmax(torch.randn(T, TOPK, generator=g), -1)
        for s in ("bf16", "int8", "fp8"):
            _call(f"moe T={T} {s}", lambda s=s: kmt.moe_forward_triton(x, idx, w, *weights[s]))
            if T == 256:  # the dots swapped (W @ x^T): wgmma where a 16-pair tile gets mma.sync
                _call(f"moe T={T} {s} swapped", lambda s=s: kmt.moe_forward_triton(x, idx, w, *weights[s],
                                                                                  config=dict(SWAP_AB=True)))
        _call(f"moe T={T} fp8 activations", lambda: kmt.moe_forward_triton(x, idx, w, *weights["fp8"],
                                                                          config=dict(A8=True)))
        for label, cfg in int4:
            _call(f"moe T={T} int4 {label}", lambda cfg=cfg: kmt.moe_forward_triton(x, idx, w, *weights["int4"],
                                                                                   config=cfg))
        if T > 256 and not QUICK[0]:  # the GPU check's big tiles (bf16 / fp8) and int4 BN128 with 8 warps
            from gpu_check import MOE_BIG_TILES

            for label, cfg in MOE_BIG_TILES:
                for s in ("bf16", "fp8"):
                    _call(f"moe T={T} {s} {label}", lambda s=s, cfg=cfg: kmt.moe_forward_triton(
                        x, idx, w, *weights[s], config=cfg))
            _call(f"moe T={T} int4 swap BN128 w8", lambda: kmt.moe_forward_triton(
                x, idx, w, *weights["int4"], config=dict(sw, BLOCK_N1=128, BLOCK_N2=128, num_warps=8)))
        _call(f"moe T={T} int4 swap halves", lambda: kmt.moe_forward_triton(
            x, idx, w, *weights["int4 halves"], config=dict(sw, BLOCK_K1=128, BLOCK_K2=64)))
        for label, cfg in FRAGMENT_CFGS if not QUICK[0] else (FRAGMENT_CFGS[0], (" BM16", dict(BLOCK_M=16))):
            _call(f"moe T={T} int4 fragments{label}", lambda cfg=cfg: kmt.moe_forward_triton(
                x, idx, w, *weights["int4 fragments"], config=dict(sw, **cfg)))


def ggml_calls():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GT

    from dgplug.kernels import ggml, moe_triton as kmt

    E = 16 if QUICK[0] else EXPERTS
    g = torch.Generator().manual_seed(0)

    def blocks(qtype, shape):
        qk, nb = GGML_QUANT_SIZES[qtype]
        n = int(torch.tensor(shape[:-1]).prod()) * (shape[-1] // qk)
        return ggml.GGMLWeight(qtype, torch.zeros(n, nb, dtype=torch.uint8).reshape(*shape[:-1], -1), shape, BF)

    pairs = ((GT.Q4_K, GT.Q5_0), (GT.Q6_K, GT.Q8_0), (GT.Q5_K, GT.Q4_0), (GT.IQ4_XS, GT.IQ4_NL))
    for gq, dq in pairs[:2] if QUICK[0] else pairs:
        gu, dn = blocks(gq, (E, 2 * I, D)), blocks(dq, (E, D, I))
        for T in (256, 2048):
            x = torch.randn(T, D, generator=g).to(BF)
            idx = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)])
            w = torch.softmax(torch.randn(T, TOPK, generator=g), -1)
            _call(f"ggml moe T={T} {gq.name}/{dq.name}", lambda: kmt.moe_forward_triton(x, idx, w, gu, dn))
            if not QUICK[0]:
                for name, cfg in GGML_TILES:
                    _call(f"ggml moe T={T} {gq.name}/{dq.name} {name}",
                          lambda cfg=cfg: kmt.moe_forward_triton(x, idx, w, gu, dn, config=cfg))
    for qt in (GT.Q4_K, GT.Q6_K) if QUICK[0] else ggml.PACKED_TYPES:  # the row decoder (tables, linears)
        rows = blocks(qt, (64, D))
        _call(f"ggml decode rows {qt.name}", lambda rows=rows: ggml.dequantize_blocks(rows.blocks, qt, BF, impl="triton"))


# the int4 fragments order (K tiles 128 / 64) beside the default: as the GPU check sweeps it
FRAGMENT_CFGS = (("", {}), (" BM32", dict(BLOCK_M=32)), (" w8", dict(num_warps=8)), (" s3", dict(num_stages=3)),
                 (" BN128", dict(BLOCK_N1=128, BLOCK_N2=128)), (" one dot", dict(ONE_DOT=True)),
                 (" w8 one dot", dict(num_warps=8, ONE_DOT=True)),
                 # registers capped (ptxas .maxnreg): 4 or 5 programs of 4 warps per SM where 155 registers allow 3
                 # (T=256: 128 builds without a spill, 96 spills 328 B; at T=2048 both spill)
                 (" r128", dict(maxnreg=128)), (" r96", dict(maxnreg=96)))


# GGUF MoE tiles beside the default (32 x 32, 2 stages), as the GPU check times them
GGML_TILES = (("BK64_BN32_s3", dict(BLOCK_K1=64, BLOCK_N1=32, BLOCK_K2=64, BLOCK_N2=32, num_stages=3)),
              ("BK128_BN64_s4", dict(BLOCK_K1=128, BLOCK_N1=64, BLOCK_K2=64, BLOCK_N2=64, num_stages=4)))


def attention_calls():
    from dgplug.kernels import attention as ka

    for batch in (1, 8):
        for name, (hq, hkv, d, lq, lk, causal, window) in {
                "sliding decoder": (16, 8, 256, 256, 1279, False, None),
                "full decoder": (16, 2, 512, 256, 2304, False, None),
                "encoder causal+window": (16, 8, 256, 1024, 1024, True, 512)}.items():
            q = torch.empty(batch, hq, lq, d, dtype=BF)
            k = torch.empty(batch, hkv, lk, d, dtype=BF)
            qp, kp = torch.arange(lk - lq, lk), torch.arange(lk)
            _call(f"attention B={batch} {name}", lambda: ka.attention_triton(q, k, k, q_pos=qp, k_pos=kp,
                                                                             causal=causal, window=window))
            if batch == 1 and name == "sliding decoder":  # the GPU check's variant (the default spills)
                _call(f"attention B=1 {name} BN32", lambda: ka.attention_triton(
                    q, k, k, q_pos=qp, k_pos=kp, causal=causal, window=window, config=dict(BLOCK_N=32)))
                _call(f"attention B=1 {name} BN32 w8 s2", lambda: ka.attention_triton(
                    q, k, k, q_pos=qp, k_pos=kp, causal=causal, window=window,
                    config=dict(BLOCK_N=32, num_warps=8, num_stages=2)))
                _call(f"attention B=1 {name} BM32 BN32 w8 s2", lambda: ka.attention_triton(
                    q, k, k, q_pos=qp, k_pos=kp, causal=causal, window=window, config=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)))


def glue_calls():
    from dgplug.kernels import norm as kn, router as kr

    for rows in (256, 2048):
        x = [torch.empty(rows, D, dtype=BF) for _ in range(3)]
        w = [torch.ones(D, dtype=BF) for _ in range(3)]
        sc = torch.ones(1, dtype=BF)
        _call(f"rms_norm rows={rows}", lambda: kn.rms_norm(x[0], w[0], 1e-6, impl="triton"))
        _call(f"rms_norm + residual rows={rows}", lambda: kn.rms_norm(x[0], w[0], 1e-6, residual=x[1], impl="triton"))
        _call(f"layer_out rows={rows}", lambda: kn.layer_out(x[0], x[1], x[2], *w, sc, 1e-6, impl="triton"))
        _call(f"post_attention rows={rows}", lambda: kn.post_attention(x[0], x[1], *w, 1e-6, impl="triton"))
        _call(f"gelu_mul rows={rows}", lambda: kn.gelu_mul(torch.empty(rows, DENSE, dtype=BF),
                                                           torch.empty(rows, DENSE, dtype=BF), impl="triton"))
        _call(f"router rows={rows}", lambda: kr.route(x[0], torch.empty(EXPERTS, D, dtype=BF), w[0],
                                                      torch.ones(EXPERTS, dtype=BF), TOPK, 1e-6, impl="triton"))
        _call(f"router fp32 rows={rows}", lambda: kr.route(x[0].float(), torch.empty(EXPERTS, D), w[0].float(),
                                                           torch.ones(EXPERTS), TOPK, 1e-6, impl="triton"))
        for hd, hk in ((256, 8), (512, 2)):  # the sliding and the full layers' q/k/v heads, k and v into slots
            q, k = torch.empty(1, rows, 16, hd, dtype=BF), torch.empty(1, rows, hk, hd, dtype=BF)
            slots = tuple(torch.empty(1, hk, 1024 + rows, hd, dtype=BF)[:, :, 1024:] for _ in range(2))
            cos = torch.empty(rows, hd, dtype=BF)
            _call(f"qkv_heads rows={rows} 16+{hk}+{hk}x{hd}", lambda: kn.qkv_heads(
                q, k, k, torch.ones(hd, dtype=BF), torch.ones(hd, dtype=BF), 1e-6, cos, cos, out=slots, impl="triton"))


def sampler_calls():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GT

    from dgplug.kernels import ggml, sampler as ks

    ks._mm_f32 = lambda a, b, out, add=False: out  # the matmuls are cuBLAS on the GPU: nothing to build
    emb = torch.empty(V, D, dtype=BF)
    qk, nb = GGML_QUANT_SIZES[GT.Q6_K]
    table = ggml.GGMLWeight(GT.Q6_K, torch.zeros(V * D // qk, nb, dtype=torch.uint8).reshape(V, -1), (V, D), BF)
    for rows in (256, 2048):
        h = torch.empty(rows, D, dtype=BF)
        _call(f"head_sample rows={rows}", lambda: ks.head_sample(h, emb, temperature=0.6, seed=1, step=0,
                                                                 impl="triton"))
        _call(f"head_sample rows={rows} {'two sweeps' if rows <= 512 else 'one sweep'}", lambda: ks._head_sample_triton(
            h, emb, softcap=30.0, temperature=0.6, seed=1, step=0, row_offset=0, want_soft=True, one_sweep=rows > 512))
        _call(f"head_sample rows={rows} Q6_K table", lambda: ks.head_sample(h, table, temperature=0.6, seed=1,
                                                                            step=0, impl="triton"))
        _call(f"step_keys rows={rows}", lambda: ks.step_keys(torch.zeros(1, dtype=torch.int64),
                                                             torch.zeros(1, dtype=torch.int64), rows, V, impl="triton"))


GROUPS = {"moe": moe_calls, "ggml": ggml_calls, "attention": attention_calls, "glue": glue_calls,
          "sampler": sampler_calls}


TEST_ONLY = {"_uniform_kernel"}  # kernels.sampler's hash, launched only by the torch/Triton agreement test


def defined_kernels() -> set[str]:
    """Every @triton.jit function with a grid launch in dgplug's kernel modules (name[...](...))."""
    root = Path(__file__).resolve().parents[1]
    names = set()
    for f in list((root / "dgplug" / "kernels").glob("*.py")) + list((root / "dgplug").glob("*.py")):
        text = f.read_text()
        names |= set(re.findall(r"\b(_\w+_kernel)\[", text))
    return names - TEST_ONLY


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(GROUPS), help="comma list of " + ", ".join(GROUPS))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--loops", action="store_true", help="also list every loop's SASS instructions (largest first)")
    ap.add_argument("--quick", action="store_true", help="16 experts; the MoE's default tiles, the halves order "
                    "and two GGUF pairs only (the test)")
    args = ap.parse_args()
    QUICK[0] = args.quick
    torch.set_num_threads(2)
    from dgplug.kernels import backend

    driver.set_active(CompileOnlyDriver(args.arch))
    JITFunction.run = _compile_only_run
    backend.COMPILE_ONLY = True
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}; "
          f"shared memory limit {SMEM_LIMIT} B per block")
    t0 = time.perf_counter()
    for g in args.only.split(","):
        GROUPS[g]()
    seen, bad = {}, 0
    print(f"{'call':<44} {'kernel':<28} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} "
          f"{'smem B':>7} {'ldg u8':>6} {'loop':>5} {'mma':>5}  verdict" + ("  loops" if args.loops else ""))
    for b in BUILT:
        key = (b["name"], repr(sorted(b["consts"].items())))
        if key in seen:
            continue
        r = seen[key] = resources(b["kernel"], args.arch)
        fail = []
        if r["smem"] > SMEM_LIMIT:
            fail.append("shared memory")
        if r["regs"] * 32 * r["warps"] > REG_FILE:
            fail.append("registers")
        verdict = ("FAIL: " + ", ".join(fail)) if fail else ("spills" if r["spill"] > 0 else "ok")
        bad += bool(fail)
        print(f"{b.get('call', '?'):<44} {b['name']:<28} {r['warps']:>5} {r['stages']:>6} {r['regs']:>5} "
              f"{r['spill']:>7} {r['smem']:>7} {r['byte_loads']:>6} {r['loop']:>5} {r['mma']:>5}  {verdict}"
              + (f"  {'+'.join(map(str, r['loops'])) or '-'}" if args.loops else ""))
    built = {b["name"] for b in BUILT}
    missing = sorted(defined_kernels() - built)
    print(f"{len(seen)} distinct builds of {len(built)} kernels in {time.perf_counter() - t0:.0f} s; "
          f"launch failures predicted: {bad}; compile errors: {len(FAILED)}")
    for name, msg in FAILED:
        print(f"ERROR {name}: {msg}")
    if missing:
        print("defined but not built by these calls:", ", ".join(missing))
    return 1 if (FAILED or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
