"""Every Triton kernel of a release-size step builds for an H100/H200 (sm_90a) with the real backend,
on a CPU (benchmarks/sm90_build.py --quick): the interpreter accepts code that the GPU compiler
rejects, and a GPU session is too short to find that out there. Also holds what the build showed:
the glue, router and align kernels and the GGUF MoE kernels do not spill (the router's fp32 FMA tile
spilled 16.7 KB a thread; the GGUF MoE's Q6_K tile 2.1 KB on Triton 3.7.1 and 21 KB on 3.6.0), and
the int4 MoE reads its weights in vectors, not one byte at a time, and in the fragments order
its K loop is shorter and its registers fewer than in the pairs order."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgplug.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_builds_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_build.py"), "--quick"], capture_output=True,
                       text=True, env=env, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "compile errors: 0" in out and "launch failures predicted: 0" in out, out[-3000:]
    assert "defined but not built" not in out, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.rstrip().endswith(("ok", "spills"))]
    built = {r[-10] for r in rows}  # the kernel column
    assert {"_moe_gate_up_int4t_kernel", "_moe_down_int4t_kernel", "_route_kernel", "_layer_out_kernel",
            "_rms_norm_kernel", "_attn_fwd_kernel", "_chunk_stats_kernel",
            "_post_attention_kernel", "_gelu_mul_kernel", "_qkv_heads_kernel"} <= built
    glue = ("_route_kernel", "_rms_norm_kernel", "_layer_out_kernel", "_align_scatter_kernel",
            "_post_attention_kernel", "_gelu_mul_kernel", "_qkv_heads_kernel")
    ggml_moe = [r for r in rows if r[0] == "ggml" and r[-10] in ("_moe_gate_up_kernel", "_moe_down_kernel")]
    assert {r[3] for r in ggml_moe} == {"Q4_K/Q5_0", "Q6_K/Q8_0"}, ggml_moe
    for r in rows:  # the int4 weights through cp.async: 72 byte loads a thread when a K bound hid the contiguity
        if r[-10] in ("_moe_gate_up_int4t_kernel", "_moe_down_int4t_kernel"):
            assert int(r[-4]) <= 16, f"{r[-10]} reads {r[-4]} single bytes: {' '.join(r)}"
    for r in rows:
        if r[-10] in glue or r in ggml_moe:
            assert int(r[-6]) == 0, f"{r[-10]} spills {r[-6]} bytes: {' '.join(r)}"
    # the int4 fragments order at ~16 pairs per expert (BLOCK_M 16): a shorter K loop than the pairs order, and registers for 3
    # programs of 4 warps per SM (<= 168 a thread; the pairs order's 215 allow 2)
    loop = {(" ".join(r[:-10]), r[-10]): (int(r[-3]), int(r[-7])) for r in rows if r[-10].endswith("int4t_kernel")}
    for k in ("_moe_gate_up_int4t_kernel", "_moe_down_int4t_kernel"):
        (frag_loop, frag_regs), (pairs_loop, _) = loop[("moe T=256 int4 fragments BM16", k)], loop[
            ("moe T=256 int4 default BM16", k)]
        assert 0 < frag_loop < pairs_loop and frag_regs <= 168, (k, loop)
