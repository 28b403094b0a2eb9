"""The GPU check (one H100, under 5 minutes): every kernel against its twin, then one denoise step
at full DiffusionGemma shapes for dgplug and for transformers' own modules, in the same run.

    bash benchmarks/gpu_check.sh            # installs nothing from the network; PYTHONPATH only

Step timing: one sliding and one full layer at real sizes with random bf16 weights, cache of
`--context` tokens, canvas 256 x batch; ms per layer scaled to the 30-layer stack (25 sliding +
5 full), plus the head + sampler step (transformers: logits, softmax, multinomial, entropy,
acceptance, renoise, next soft embedding; dgplug: the fused streaming head_sample). dgplug runs
with bf16 weights and with int4 experts. Prints ms per step, implied tok/s at 16 tokens per
forward, and the fraction of the floor: max(bytes a step must read / HBM, its matmul FLOPs / 790 TFLOP/s).
--small runs the same code at toy sizes (CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

HBM_H100 = 3.35e12  # H100 SXM bytes/s: the floor
HBM = HBM_H100  # replaced by the device's nominal figure in main()
TENSOR_FLOPS = 790e12  # dense bf16 tensor-core FLOP/s the issue takes as reachable on H100/H200


def step_flops(kw, tokens: int, keys: int) -> float:
    """Matmul FLOPs of one denoise step over `tokens` canvas positions that attend to `keys` keys:
    30 layers (25 sliding + 5 full: q, k, v, o, scores and weighted sum, router, dense MLP, top-k
    experts; int4 experts run bf16 MMAs after dequantising) and the fused head's two passes over
    the tied table (logits, then P @ E). Per token at 768 keys: 6.6 GFLOP in the layers, 3.0 in the
    head; at 256 tokens 2.45 TFLOP, 3.1 ms at 790 TFLOP/s (under the bytes' 3.55 ms on an H200),
    at 2048 tokens 24.9 ms: batch 8 is bound by FLOPs, not bytes."""
    H, heads = kw["hidden_size"], kw["num_attention_heads"]
    mlp = 3 * H * (kw["intermediate_size"] + kw["top_k_experts"] * kw["moe_intermediate_size"]) + H * kw["num_experts"]

    def layer(d, kv):
        return H * heads * d * 2 + H * kv * d * 2 + heads * d * keys * 2 + mlp

    per_token = 25 * layer(kw["head_dim"], kw["num_key_value_heads"])
    per_token += 5 * layer(kw["global_head_dim"], kw["num_global_key_value_heads"])
    return 2.0 * tokens * (per_token + 2 * H * kw["vocab_size"])


SMOKE = False  # --small: one repetition of everything (a CPU smoke test of this script)


def timed(fn, reps=10, warm=3):
    if SMOKE:
        reps, warm = 1, 0
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def section(name):
    print(f"\n== {name}", flush=True)


def err(a, b):
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6)).item()


# -- 1. kernels vs twins ---------------------------------------------------------------------
def check_kernels(dev, small):
    from dgplug.converters.quant import quantize
    from dgplug.kernels import attention as ka, moe as km, moe_triton as kmt, sampler as ks
    from dgplug import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    bf = torch.bfloat16
    # attention: sliding decoder, full decoder, encoder causal+window
    for name, (hq, hkv, d, lq, lk, causal, window) in {
        "sliding decoder": (16, 8, 256 if not small else 32, 256 if not small else 16, 1279 if not small else 40, False, None),
        "full decoder": (16, 2, 512 if not small else 64, 256 if not small else 16, 2304 if not small else 40, False, None),
        "encoder causal+window": (16, 8, 256 if not small else 32, 1024 if not small else 32, 1024 if not small else 32, True, 512 if not small else 8),
    }.items():
        q, k, v = rnd(2, hq, lq, d).to(bf), rnd(2, hkv, lk, d).to(bf), rnd(2, hkv, lk, d).to(bf)
        qp = torch.arange(lk - lq, lk, device=dev)
        kp = torch.arange(lk, device=dev)
        a = ka.attention(q, k, v, q_pos=qp, k_pos=kp, causal=causal, window=window, impl="triton")
        r = ops.attention_reference(q.float(), k.float(), v.float(), q_pos=qp, k_pos=kp, causal=causal, window=window)
        print(f"attention {name:<22} rel err {err(a, r):.2e}")
    # MoE: bf16 and each quantized layout vs the torch twin on the same weights
    T, D, I, E, K = (256, 2816, 704, 128, 8) if not small else (32, 128, 64, 8, 2)  # K tiles of 128 / 64 fit
    x = rnd(T, D).to(bf)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    w = torch.softmax(rnd(T, K), -1)
    gu, dn = (rnd(E, 2 * I, D) * D**-0.5).to(bf), (rnd(E, D, I) * I**-0.5).to(bf)
    ref = km.moe_forward(x.float(), idx, w, gu.float(), dn.float(), impl="torch")
    print(f"moe bf16 (triton vs fp32 twin) rel err {err(km.moe_forward(x, idx, w, gu, dn, impl='triton'), ref):.2e}")
    for scheme in ("int4", "int8", "fp8"):
        qg = km.QuantizedWeight(scheme=scheme, **quantize(gu.float(), scheme))
        qd = km.QuantizedWeight(scheme=scheme, **quantize(dn.float(), scheme))
        a = km.moe_forward(x, idx, w, qg, qd, impl="triton")
        b = km.moe_forward(x.float(), idx, w, qg, qd, impl="torch")
        print(f"moe {scheme} (triton vs torch twin) rel err {err(a, b):.2e}")
        if scheme == "fp8":  # fp8 activations (A8): the kernel against its twin, and against 16-bit activations
            a8 = kmt.moe_forward_triton(x, idx, w, qg, qd, config=dict(A8=True))
            t8 = km.moe_forward_fp8_activations_torch(x, idx, w, qg, qd, km.A8_TILE)
            print(f"moe fp8 activations (triton vs its torch twin) rel err {err(a8, t8):.2e}; "
                  f"vs 16-bit activations {err(a8, b):.2e}")
        if scheme == "int4":
            runs = [(str(c), c, None) for c in (dict(MAGIC=False, SWAP_AB=False), dict(SWAP_AB=False),
                                                dict(SWAP_AB=True, MAGIC=False), dict(SWAP_AB=True, BLOCK_M=16))]
            runs.append(("swap halves (kpack 128 / 64)", dict(SWAP_AB=True), km.repack_int4_halves))
            runs.append(("fragments (kpack 128 / 64)", dict(SWAP_AB=True), km.repack_int4_fragments))
            runs.append(("fragments, sums in the loop", dict(SWAP_AB=True, XSUM=False), km.repack_int4_fragments))
            runs.append(("fragments, one dot", dict(SWAP_AB=True, ONE_DOT=True), km.repack_int4_fragments))
            for label, cfg, repack in runs:
                try:
                    wg, wd = (qg, qd) if repack is None else (repack(qg, 128), repack(qd, 64))
                    a = kmt.moe_forward_triton(x, idx, w, wg, wd, config=cfg)
                    print(f"moe int4 {label} rel err {err(a, b):.2e}")
                except Exception as ex:  # noqa: BLE001
                    print(f"moe int4 {label} failed: {type(ex).__name__}: {str(ex)[:300]}")
    # the layer glue (dgplug.kernels.norm) vs its twins, bf16 at the release's row sizes, and its time
    from dgplug.kernels import norm as kn
    rows, H = (256, 2816) if not small else (16, 96)
    gu = [(2 * rnd(rows, 2112 if not small else 64)).to(bf) for _ in range(2)]  # the dense MLP's gate, up
    xs = [rnd(rows, H).to(bf) for _ in range(3)]
    ws = [(1 + 0.1 * rnd(H)).to(bf) for _ in range(3)]
    sc = torch.tensor([0.8], dtype=bf, device=dev)
    for name, call in (
            ("rms_norm + residual", lambda i: kn.rms_norm(xs[0], ws[0], 1e-6, residual=xs[1], impl=i)),
            ("layer_out", lambda i: kn.layer_out(xs[0], xs[1], xs[2], *ws, sc, 1e-6, impl=i)),
            ("post_attention (3 outs)", lambda i: torch.cat(kn.post_attention(xs[0], xs[1], *ws, 1e-6, impl=i), -1)),
            ("gelu_mul (dense MLP)", lambda i: kn.gelu_mul(*gu, impl=i))):
        print(f"glue {name:<22} rel err {err(call('triton'), call('torch')):.2e}  "
              f"{timed(lambda: call('triton')) * 1e3:.1f} us vs twin {timed(lambda: call('torch')) * 1e3:.1f} us")
    from dgplug.kernels import router as kr
    rw, rs, pes = (rnd(128, H) * H ** -0.5).to(bf), (1 + 0.1 * rnd(H)).to(bf), (1 + 0.1 * rnd(128)).abs().to(bf)
    call = lambda i: kr.route(xs[0], rw, rs, pes, 8, 1e-6, impl=i)  # noqa: E731
    (tw, ti), (ow, oi) = call("triton"), call("torch")
    (ti, to), (oi, oo) = ti.sort(1), oi.sort(1)  # tied experts may come in either order
    print(f"glue router top-8 of 128   same experts {(ti == oi).all(1).float().mean().item():.4f} of tokens, "
          f"weights rel err {err(tw.gather(1, to), ow.gather(1, oo)):.2e}  "
          f"{timed(lambda: call('triton')) * 1e3:.1f} us vs twin {timed(lambda: call('torch')) * 1e3:.1f} us")
    for hd, hk in (((256, 8), (512, 2)) if not small else ((32, 2), (64, 1))):  # q/k/v, k and v into slots
        q, k, v = rnd(1, rows, 16, hd).to(bf), rnd(1, rows, hk, hd).to(bf), rnd(1, rows, hk, hd).to(bf)
        ang = torch.arange(rows, device=dev)[:, None].float() * torch.rand(hd // 2, device=dev)[None, :]
        cos, sin = torch.cat((ang, ang), -1).cos().to(bf), torch.cat((ang, ang), -1).sin().to(bf)
        wq, wk = (1 + 0.1 * rnd(hd)).to(bf), (1 + 0.1 * rnd(hd)).to(bf)
        slots = tuple(torch.zeros(1, hk, 512 + rows, hd, dtype=bf, device=dev)[:, :, 512:] for _ in range(2))
        call = lambda i: torch.cat([t.flatten() for t in kn.qkv_heads(  # noqa: E731
            q, k, v, wq, wk, 1e-6, cos, sin, out=slots, impl=i)])
        print(f"glue qkv_heads 16+{hk}+{hk} x {hd:<4} rel err {err(call('triton'), call('torch')):.2e}  "
              f"{timed(lambda: call('triton')) * 1e3:.1f} us vs twin {timed(lambda: call('torch')) * 1e3:.1f} us")
    # fused head + sampler vs the unfused reference
    N, V = (512, 262144) if not small else (32, 1000)
    h = rnd(N, D).to(bf)
    emb = (rnd(V, D) * 0.05).to(bf)
    t = ks.head_sample(h, emb, temperature=0.6, seed=3, step=1, impl="torch")
    try:
        a = ks.head_sample(h, emb, temperature=0.6, seed=3, step=1, impl="triton")
    except Exception as ex:  # noqa: BLE001
        print(f"head_sample default failed: {type(ex).__name__}: {str(ex)[:300]}")
        a = t
    r = ks.head_sample_reference(h, emb, temperature=0.6, seed=3, step=1)
    tf_soft = (torch.softmax((r_l := torch.tanh((h @ emb.T).float() / 30.0) * 30.0 / 0.6).to(torch.bfloat16), -1,
                             dtype=torch.float32).to(torch.bfloat16) @ emb)
    print(f"transformers' own soft embedding (bf16 logits and probabilities) vs the fp32 reference: rel err "
          f"{err(tf_soft, r.soft):.2e}")
    del tf_soft, r_l
    kw = dict(softcap=30.0, temperature=0.6, seed=3, step=1, row_offset=0, want_soft=True)
    for name, fn in (("triton", lambda: a), ("triton 8192-column chunks", lambda: ks._head_sample_triton(
            h, emb, chunk=8192, **kw))):
        try:
            o = fn()
        except Exception as ex:  # noqa: BLE001
            print(f"head_sample {name} failed: {type(ex).__name__}: {str(ex)[:300]}")
            continue
        print(f"head_sample {name}: argmax equal {(o.argmax == r.argmax).float().mean().item():.4f}, "
              f"tokens equal to torch twin {(o.token == t.token).float().mean().item():.4f}, "
              f"entropy max abs err {(o.entropy - r.entropy).abs().max().item():.2e}, "
              f"soft rel err {err(o.soft, r.soft):.2e}")
    key, st = torch.tensor([ks.seed_key(11)], device=dev), torch.tensor([2**31 + 3], device=dev)
    got, want = (ks.step_keys(key, st, 2048, V, impl=i) for i in ("triton", "torch"))
    print(f"step_keys (the step's RNG keys and re-noise tokens) equal to the torch twin: "
          f"{all(torch.equal(g, w) for g, w in zip(got, want))}  "
          f"{timed(lambda: ks.step_keys(key, st, 2048, V, impl='triton')) * 1e3:.1f} us vs twin "
          f"{timed(lambda: ks.step_keys(key, st, 2048, V, impl='torch')) * 1e3:.1f} us")


# -- 2. one denoise step at full shapes --------------------------------------------------------
def real_text_config(small):
    from transformers import DiffusionGemmaTextConfig

    if small:
        kw = dict(vocab_size=4096, hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, global_head_dim=64, num_global_key_value_heads=1, num_experts=16, top_k_experts=4,
                  moe_intermediate_size=64, sliding_window=64)
    else:
        kw = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                  num_experts=128, top_k_experts=8, moe_intermediate_size=704, sliding_window=1024)
    cfg = DiffusionGemmaTextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], **kw)
    cfg._attn_implementation = "sdpa"
    return cfg, kw


def hf_layers(cfg, dev):
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as M

    for impl in ("grouped_mm", "eager"):
        cfg._experts_implementation = impl
        try:
            with torch.device(dev):
                layers = [M.DiffusionGemmaDecoderTextLayer(cfg, i).to(torch.bfloat16).eval() for i in range(2)]
                rot = M.DiffusionGemmaTextRotaryEmbedding(cfg)
            g = torch.Generator(device=dev).manual_seed(0)
            with torch.no_grad():
                for lay in layers:
                    for n, p in lay.named_parameters():
                        if p.dim() >= 2:
                            p.copy_(torch.randn(p.shape, generator=g, device=dev) * p.shape[-1] ** -0.5)
                        elif "norm" in n:
                            p.fill_(1.0)
                        if "q_norm" in n or "k_norm" in n:
                            p.fill_(0.25)
            return layers, rot, impl
        except Exception:  # noqa: BLE001
            continue
    raise RuntimeError("could not build transformers layers")


def dg_layers(kw, hf, dev, int4):
    from dgplug.config import from_dict
    from dgplug.converters.quant import quantize
    from dgplug.kernels.quantized_weight import QuantizedWeight, for_gpu_kernels
    from dgplug.model import Layer

    tc = dict(kw, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    dcfg = from_dict({"model_type": "diffusion_gemma", "text_config": tc})
    out = []
    for i, h in enumerate(hf):
        with torch.device("meta"):
            lay = Layer(dcfg.text, i)
        lay.load_state_dict({k: v for k, v in h.state_dict().items() if k in dict(lay.named_parameters())},
                            strict=False, assign=True)
        lay.layer_scalar = torch.nn.Parameter(h.layer_scalar.clone(), requires_grad=False)
        if int4:
            for n in ("gate_up_proj", "down_proj"):
                w = getattr(lay.experts, n)
                parts = {k: [] for k in ("qweight", "scale", "zero")}
                for e in range(w.shape[0]):  # per expert, to bound memory
                    for k, v in quantize(w[e].float(), "int4").items():
                        parts[k].append(v)
                q = QuantizedWeight("int4", *(torch.stack(parts[k]) for k in ("qweight", "scale", "zero")))
                if q.device.type == "cuda":  # as dgplug.load leaves int4 experts on a GPU
                    q = for_gpu_kernels(q, n[:-5])
                delattr(lay.experts, n)
                setattr(lay.experts, n, q)
        out.append(lay.eval())
    return out, dcfg.text


def hf_sampler(h, E, B, C, T=0.6):
    """transformers' sampler step: logits, softmax, multinomial, argmax, entropy, acceptance,
    renoise and the next step's soft embedding, over full [B, C, V] fp32 logits."""
    from dgplug.sampler import accept

    V = E.shape[0]
    logits = torch.tanh((h @ E.T).float() / 30.0) * 30.0
    sl = (logits / T).view(B, C, V)
    probs = torch.softmax(sl, -1, dtype=torch.float32)
    y = torch.multinomial(probs.view(-1, V), 1).view(B, C)
    a = sl.argmax(-1)
    ent = torch.distributions.Categorical(logits=sl).entropy()
    acc = accept(ent, 0.1)
    x2 = torch.where(acc, y, torch.randint(0, V, (B, C), device=h.device))
    soft = torch.softmax(sl.to(torch.bfloat16), -1, dtype=torch.float32).to(torch.bfloat16) @ E
    return x2, a, soft


def dg_sampler(h, E, B, C, fn=None, T=0.6):
    """dgplug's step: the fused head + sampler, then acceptance and renoise on its small results."""
    from dgplug.kernels.sampler import head_sample
    from dgplug.sampler import accept

    r = (fn or head_sample)(h, E, temperature=T, seed=1, step=0)
    acc = accept(r.entropy.view(B, C), 0.1)
    return torch.where(acc, r.token.view(B, C), torch.randint(0, E.shape[0], (B, C), device=h.device)), r.soft


def alternated(fns: dict, rounds=5, reps=10, timer=None) -> dict:
    """Median ms of each fn, timed in turn A, B, ..., A, B, ... over `rounds` rounds of `reps` calls
    (the first round warms each): the comparisons quoted as RESULT lines, not one side after the other."""
    timer = timer or (lambda fn, warm: timed(fn, reps=reps, warm=warm))
    runs = {k: [] for k in fns}
    for r in range(rounds if not SMOKE else 1):
        for k, fn in fns.items():
            runs[k].append(timer(fn, 1 if r == 0 else 0))
    return {k: statistics.median(v) for k, v in runs.items()}


def graph_time(fn):
    """Median ms of fn replayed as one CUDA graph (no launch overhead); nan where capture fails."""
    if not torch.cuda.is_available():
        return float("nan")
    try:
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(st)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay)
    except Exception as ex:  # noqa: BLE001
        print(f"CUDA graph capture failed: {type(ex).__name__}: {str(ex)[:200]}")
        return float("nan")


def timed_mem(fn, reps=5, warm=1):
    """(median ms, peak MiB allocated above the start) of fn."""
    sync()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    try:
        t = timed(fn, reps=reps, warm=warm)
    except torch.OutOfMemoryError:
        return float("nan"), float("nan")
    return t, ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0)


def profile(title, fn, rows=8):
    """The GPU kernels behind fn, by self device time (torch.profiler)."""
    if not torch.cuda.is_available():
        return
    from torch.profiler import ProfilerActivity, profile as prof

    fn()
    sync()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            fn()
        sync()
    print(f"-- profile: {title} (3 calls)")
    for key in ("self_cuda_time_total", "self_device_time_total", "cuda_time_total"):
        try:
            print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
            return
        except Exception:  # noqa: BLE001 - the sort key's name differs between torch versions
            continue


def sampler_variants(dev, small):
    """Head + sampler alone at the real vocabulary: transformers' path and dgplug's (tensor-core
    matmuls + one Triton kernel per vocabulary chunk) at its default and other chunk sizes."""
    from functools import partial

    from dgplug.kernels import sampler as ks

    D, V, C = (2816, 262144, 256) if not small else (64, 4096, 32)
    E = (torch.randn(V, D, device=dev) * 0.03).to(torch.bfloat16)
    kw = dict(softcap=30.0, row_offset=0, want_soft=True)
    for B in ((1, 8) if not small else (1,)):
        h = torch.randn(B * C, D, device=dev).to(torch.bfloat16)
        rows = [("transformers", lambda: hf_sampler(h, E, B, C)),
                ("dgplug (default chunk)", lambda: dg_sampler(h, E, B, C, partial(ks._head_sample_triton, **kw)))]
        for one in (True, False):
            rows.append((f"dgplug {'one sweep' if one else 'two sweeps'} per chunk", lambda one=one: dg_sampler(
                h, E, B, C, partial(ks._head_sample_triton, one_sweep=one, **kw))))
        a, b = (ks._head_sample_triton(h, E, temperature=0.6, seed=5, step=2, one_sweep=o, **kw) for o in (True, False))
        same = all(torch.equal(x, y) for x, y in zip((a.token, a.argmax, a.entropy, a.soft),
                                                     (b.token, b.argmax, b.entropy, b.soft)))
        print(f"RESULT head_sample_sweeps batch={B} one_sweep_same_bits_as_two={same}", flush=True)
        for ch, bv, nw in (((16384, 1024, 4), (32768, 2048, 8)) if B == 1 and not small else
                           ((4096, 1024, 4), (8192, 1024, 8)) if not small else ((1024, 256, 4),)):
            rows.append((f"dgplug chunk {ch} tile {bv} warps {nw}", lambda ch=ch, bv=bv, nw=nw: dg_sampler(
                h, E, B, C, partial(ks._head_sample_triton, chunk=ch, block_v=bv, num_warps=nw, **kw))))
        base = None
        for name, fn in rows:
            t, mib = timed_mem(fn)
            base = base or t
            print(f"B={B} {name:<30} {t:8.2f} ms  {mib:8.0f} MiB  (transformers / this {base / t:5.2f}x)", flush=True)
        if B == 1:
            profile("chunked head + sampler, B=1", lambda: dg_sampler(h, E, B, C))
        del h


MOE_BIG_TILES = (("BM128 BN128 BK64 w8 s3", dict(BLOCK_M=128, BLOCK_N1=128, BLOCK_K1=64, BLOCK_N2=128, BLOCK_K2=64,
                                                 num_warps=8, num_stages=3)),
                 ("BM64 BN128 BK64 w8 s4", dict(BLOCK_M=64, BLOCK_N1=128, BLOCK_K1=64, BLOCK_N2=128, BLOCK_K2=64,
                                                num_warps=8, num_stages=4)))


def moe_sweep(dev, small):
    """One layer's experts at real sizes: bf16/int8/fp8 defaults, then int4 variants (nibble
    pairing mode, magic-number conversion, tiles, warps, the halves nibble order, and the K bound
    kept in the byte mask: the weight read a byte at a time, as before EVEN_K). Bytes = weights of
    the experts touched."""
    from dgplug.converters.quant import quantize
    from dgplug.kernels import moe as km, moe_triton as kmt

    D, I, E, K = (2816, 704, 128, 8) if not small else (128, 64, 8, 2)  # K tiles of 128 / 64 fit
    g = torch.Generator(device="cpu").manual_seed(0)
    gu = (torch.randn(E, 2 * I, D, generator=g) * D**-0.5).to(dev, torch.bfloat16)
    dn = (torch.randn(E, D, I, generator=g) * I**-0.5).to(dev, torch.bfloat16)

    def q(w, scheme):
        parts = [quantize(w[e].float(), scheme) for e in range(w.shape[0])]
        return km.QuantizedWeight(scheme=scheme, **{k: torch.stack([p[k] for p in parts]) for k in parts[0]})

    weights = {"bf16": (gu, dn)}
    for scheme in ("int8", "fp8", "int4"):
        weights[scheme] = (q(gu, scheme), q(dn, scheme))
    # the halves nibble order, repacked once for the GPU default K tiles (gate_up 128, down 64)
    weights["int4 halves"] = tuple(km.repack_int4_halves(w, bk) for w, bk in zip(weights["int4"], (128, 64)))
    # the fragments order (what dgplug.load makes of int4 experts on a GPU), for the same K tiles
    weights["int4 fragments"] = tuple(km.repack_int4_fragments(w, bk) for w, bk in zip(weights["int4"], (128, 64)))
    sw = dict(SWAP_AB=True)
    frag = [("fragments", {}, "int4 fragments"), ("fragments, sums in the loop", dict(XSUM=False), "int4 fragments"),
            ("pairs, sums in the loop (before)", dict(XSUM=False)), ("fragments BM32", dict(BLOCK_M=32), "int4 fragments"),
            ("fragments w8", dict(num_warps=8), "int4 fragments"), ("fragments s3", dict(num_stages=3), "int4 fragments"),
            ("fragments, one dot", dict(ONE_DOT=True), "int4 fragments"),
            ("fragments w8, one dot", dict(num_warps=8, ONE_DOT=True), "int4 fragments"),
            # registers capped at 128: 4 programs of 4 warps per SM where 155 registers allow 3; no spill
            # at T=256 (sm90_build; 96 spills, and at T=2048 both do)
            ("fragments r128", dict(maxnreg=128), "int4 fragments")]
    halves = ("swap halves", dict(sw, BLOCK_K1=128, BLOCK_K2=64), "int4 halves")
    # (the variants the 28dc59a run timed slower than its default are left out: converted nibbles,
    # the K bound, BLOCK_M 64, BLOCK_N 128 / 32, 8 warps in the pairs order)
    int4_cfgs = [("plain, magic", dict(SWAP_AB=False)), ("default (swapped, magic)", {}),
                 ("swap BM32 (default before)", dict(sw, BLOCK_M=32)), ("swap stages3", dict(sw, num_stages=3)),
                 halves] + frag
    best = {}
    for T in ((256, 2048) if not small else (32,)):
        x = torch.randn(T, D, device=dev).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
        w = torch.softmax(torch.randn(T, K, device=dev), -1)
        # T=2048: the default BLOCK_M 64 spills 144 B since the weights stream through cp.async
        # (sm90_build); BLOCK_M 32 and 8 warps do not
        big = int4_cfgs[:2] + [("swap BM32", dict(sw, BLOCK_M=32)), ("swap w8", dict(sw, num_warps=8)), halves,
                               ("swap BN128 w8", dict(sw, BLOCK_N1=128, BLOCK_N2=128, num_warps=8))] + frag[:3] + [
                                   frag[4], ("fragments BM32", dict(BLOCK_M=32), "int4 fragments"), frag[6], frag[7]]
        runs = [(s, ("default", {})) for s in ("bf16", "int8", "fp8")] + [("int4", c) for c in
                                                                          (int4_cfgs if T == 256 else big)]
        if T == (256 if not small else 32):  # batch 1's step
            # the 16-bit / 8-bit kernels with their dots swapped: wgmma (sm90_build) where BLOCK_M 16 gets mma.sync
            runs += [(s, ("swapped", dict(SWAP_AB=True))) for s in ("bf16", "int8", "fp8")]
            runs.append(("bf16", ("swapped s2", dict(SWAP_AB=True, num_stages=2))))  # 147 KB of smem at 4 stages: 1 program per SM
            if small:  # the smoke run builds the T=256 list's register-capped variant too
                runs.append(("int4", frag[-1]))
        runs.append(("fp8", ("fp8 activations (A8)", dict(A8=True))))
        if T > 256:  # compute-bound at 16 rows per expert: bigger tiles, 8 warps (MOE_BIG_TILES, ptxas-checked)
            runs += [(s, c) for s in ("bf16", "fp8") for c in MOE_BIG_TILES]
        times = {}
        for scheme, (label, cfg, *wkey) in runs:
            fastest = best.get(T)
            a, b = weights[wkey[0] if wkey else scheme]
            try:
                t = times[(scheme, label)] = timed(lambda: kmt.moe_forward_triton(x, idx, w, a, b, config=cfg),
                                                   reps=20, warm=3)
            except Exception as ex:  # noqa: BLE001
                print(f"T={T} {scheme} {label}: failed {type(ex).__name__}: {str(ex)[:200]}")
                continue
            _, nbytes = km.moe_flops_bytes(T, D, I, E, K, scheme)
            print(f"T={T} {scheme:<5} {label:<28} {t:7.3f} ms  {nbytes / t / 1e9:6.2f} TB/s", flush=True)
            if wkey == ["int4 fragments"] and (fastest is None or t < fastest[2]):
                best[T] = (label, cfg, t)  # the order dgplug.load gives int4 experts on a GPU
        # the comparisons quoted: timed again, alternated
        call = lambda wkey, cfg: (lambda: kmt.moe_forward_triton(x, idx, w, *weights[wkey], config=cfg))  # noqa: E731
        try:
            m = alternated({"fragments": call("int4 fragments", {}), "pairs": call("int4", {}),
                            "before": call("int4", dict(XSUM=False)), "a8": call("fp8", dict(A8=True)),
                            "fp8": call("fp8", {})})
        except Exception as ex:  # noqa: BLE001
            print(f"T={T} alternated timing failed: {type(ex).__name__}: {str(ex)[:200]}")
            continue
        _, nbytes = km.moe_flops_bytes(T, D, I, E, K, "int4")
        print(f"RESULT moe quant=fp8 T={T} a8_ms={m['a8']:.3f} weight_only_ms={m['fp8']:.3f} alternated=5x10", flush=True)
        print(f"RESULT moe quant=int4 T={T} fragments_ms={m['fragments']:.3f} pairs_ms={m['pairs']:.3f} "
              f"before_ms={m['before']:.3f} fragments_TB_s={nbytes / m['fragments'] / 1e9:.2f} alternated=5x10",
              flush=True)
        if T == 256:
            for label, cfg, wkey in (("int4 default", {}, "int4"), ("int4 fragments", {}, "int4 fragments")):
                a, b = weights[wkey]
                profile(f"MoE {label}, T=256", lambda: kmt.moe_forward_triton(x, idx, w, a, b, config=cfg), rows=6)
    for T, (label, cfg, t) in best.items():
        print(f"fastest int4 fragments variant at T={T}: {label} ({t:.3f} ms) {cfg}")
    return best


def int4_linears(dev, small):
    """A dgplug int4 checkpoint's linears (q_proj of a sliding layer, group 128): dequantised in every
    call (the packed path; DGPLUG_PACKED_LINEARS=1) against dequantised once at load (what
    dgplug.load does on CUDA: then cuBLAS on bf16), 256 and 2048 rows, as CUDA graphs."""
    from dgplug.kernels.moe import QuantizedWeight
    from dgplug.model import linear

    N, K = (4096, 2816) if not small else (256, 128)
    qw = QuantizedWeight.quantize(torch.randn(N, K, device=dev) * K ** -0.5, "int4", group_size=128)
    w16 = qw.dequantize(torch.bfloat16)
    for rows in ((256, 2048) if not small else (16,)):
        x = torch.randn(rows, K, device=dev).to(torch.bfloat16)
        t = alternated({"per_call": lambda: linear(x, qw), "at_load": lambda: linear(x, w16)},
                       timer=(lambda fn, warm: graph_time(fn)) if dev == "cuda" else None)
        print(f"int4 linear {N}x{K}, {rows} rows: dequantised per call {t['per_call']:.3f} ms, at load "
              f"{t['at_load']:.3f} ms ({t['per_call'] / t['at_load']:.1f}x)")
        print(f"RESULT linear quant=int4 rows={rows} per_call_ms={t['per_call']:.4f} at_load_ms={t['at_load']:.4f}",
              flush=True)


def attention_timing(dev, small, context=512):
    """The decoder's attention over [cache; canvas] at the step's shapes (bf16, one layer, replayed as
    a CUDA graph), against its floor max(bytes / HBM, FLOPs / 790 TFLOP/s) (bytes: q, k, v read
    once, out written; a full layer's V is its K). Default tiles, and for the sliding layer at batch
    1 (64 programs; the default spills 392 B a thread in the sm_90 build) two tilings that do not
    spill, one of them with twice the programs."""
    from dgplug.kernels import attention as ka

    C = 256 if not small else 16
    for B in ((1, 8) if not small else (1,)):
        for kind, (hkv, d, window) in (("sliding", (8, 256, 1024)), ("full", (2, 512, None))):
            d = d if not small else 32
            lk = (min(context, window - 1) if window else context) + C
            q = torch.randn(B, 16, C, d, device=dev).to(torch.bfloat16)
            k = torch.randn(B, hkv, lk, d, device=dev).to(torch.bfloat16)
            v = k if kind == "full" else torch.randn_like(k)
            qp, kp = torch.arange(lk - C, lk, device=dev), torch.arange(lk, device=dev)
            nbytes = 2 * (2 * q.numel() + k.numel() * (1 if kind == "full" else 2))
            flops = 4 * B * 16 * C * lk * d
            floor = max(nbytes / HBM, flops / 790e12) * 1e3
            variants = [("default", None)]
            if B == 1 and kind == "sliding":  # 64 programs by default; these spill nothing (sm90_build)
                variants += [("BN32 w8 s2", dict(BLOCK_N=32, num_warps=8, num_stages=2)),
                             ("BM32 BN32 w8 s2", dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2))]
            ref = ka.attention_triton(q, k, v, q_pos=qp, k_pos=kp, causal=False, window=None)
            for label, cfg in variants:
                run = lambda cfg=cfg: ka.attention_triton(q, k, v, q_pos=qp, k_pos=kp, causal=False, window=None,  # noqa: E731
                                                          config=cfg)
                ms = graph_time(run) if dev == "cuda" else timed(run)
                out = run()
                print(f"attention {kind:<7} B={B} keys {lk} {label:<16} {ms * 1e3:8.1f} us  floor {floor * 1e3:6.1f} us "
                      f"({100 * floor / ms:.0f}% of floor), rel err vs default {err(out, ref):.1e}")
                print(f"RESULT attention kind={kind} batch={B} keys={lk} tiles={label.replace(' ', '')} ms={ms:.4f} "
                      f"floor_ms={floor:.4f} floor_pct={100 * floor / ms:.0f}", flush=True)


def random_blocks(qtype, shape, dev, seed=0):
    """A GGMLWeight of `shape` made of random ggml blocks on `dev`, its fp16 scale fields small and
    finite (times do not depend on the values), served in bf16."""
    from gguf import GGML_QUANT_SIZES

    from dgplug.kernels import ggml

    qk, nb = GGML_QUANT_SIZES[qtype]
    n = int(torch.tensor(shape[:-1]).prod()) * (shape[-1] // qk)
    g = torch.Generator(device=dev).manual_seed(seed)
    raw = torch.randint(0, 256, (n, nb), dtype=torch.uint8, generator=g, device=dev)
    for at in ggml._F16_FIELDS[qtype]:
        raw[:, at:at + 2] = (torch.randn(n, 1, generator=g, device=dev) * 2e-3).half().view(torch.uint8)
    return ggml.GGMLWeight(qtype, raw.reshape(*shape[:-1], -1), shape, torch.bfloat16)


def gguf_packed(dev, small):
    """A Q4_K_M GGUF kept packed (kernels.ggml): one layer's experts (gate_up Q4_K, down Q5_0: 704 is
    not a multiple of 256, llama.cpp's fallback), a Q4_K attention projection and the Q6_K tied table
    through the head + sampler, against the same weights dequantised to bf16. Random blocks with
    finite scales (the timing does not depend on the values); RESULT lines carry quant=Q4_K_M."""
    from gguf import GGMLQuantizationType as GT

    from dgplug.kernels import moe as km, moe_triton as kmt
    from dgplug.kernels.sampler import head_sample

    D, I, E, K, V = (2816, 704, 128, 8, 262144) if not small else (256, 256, 8, 2, 4096)
    g = torch.Generator(device="cpu").manual_seed(0)
    seeds = iter(range(1, 100))
    blocks = lambda qtype, shape: random_blocks(qtype, shape, dev, next(seeds))  # noqa: E731

    gu, dn = blocks(GT.Q4_K, (E, 2 * I, D)), blocks(GT.Q5_0 if not small else GT.Q6_K, (E, D, I))
    gu16, dn16 = gu.dequantize(torch.bfloat16), dn.dequantize(torch.bfloat16)
    impl = "triton" if dev == "cuda" else "torch"
    for T in ((256, 2048) if not small else (32,)):
        x = torch.randn(T, D, generator=g).to(dev, torch.bfloat16)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
        w = torch.softmax(torch.randn(T, K, generator=g), -1).to(dev)
        ref = km.moe_forward_torch(x, idx, w, gu, dn)
        got = km.moe_forward(x, idx, w, gu, dn, impl=impl)
        touched = idx.unique().numel()
        nbytes = (gu.nbytes + dn.nbytes) * touched / E
        t_q = timed(lambda: km.moe_forward(x, idx, w, gu, dn, impl=impl), reps=20, warm=3)
        t_16 = timed(lambda: km.moe_forward(x, idx, w, gu16, dn16, impl=impl), reps=20, warm=3)
        print(f"RESULT quant=Q4_K_M part=moe T={T} impl={impl} ms={t_q:.3f} bf16_ms={t_16:.3f} "
              f"TB/s={nbytes / t_q / 1e9:.3f} err_vs_twin={err(got, ref):.2e}", flush=True)
        if impl == "triton" and T == 256:  # the default (K 64 x N 32, 3 stages) vs the int4 tiles and the 32 x 32 of before
            for name, cfg in (("BK128_BN64_s4", dict(BLOCK_K1=128, BLOCK_N1=64, BLOCK_K2=64, BLOCK_N2=64, num_stages=4)),
                              ("BK32_BN32_s2 (default before)", dict(BLOCK_K1=32, BLOCK_K2=32, num_stages=2)),
                              ("element_by_element (GGML_RUNS=0)", dict(GGML_RUNS=0))):
                t_c = timed(lambda: kmt.moe_forward_triton(x, idx, w, gu, dn, config=cfg), reps=20, warm=3)
                print(f"RESULT quant=Q4_K_M part=moe_tiles T={T} tiles={name} ms={t_c:.3f} default_ms={t_q:.3f}",
                      flush=True)
    wq = blocks(GT.Q4_K, (16 * (256 if not small else 16), D))
    xq = torch.randn(256, D, generator=g).to(dev, torch.bfloat16)
    wq16 = wq.dequantize()
    t_q = timed(lambda: torch.nn.functional.linear(xq, wq))
    t_16 = timed(lambda: torch.nn.functional.linear(xq, wq16))
    print(f"RESULT quant=Q4_K_M part=q_proj rows=256 ms={t_q:.3f} bf16_ms={t_16:.3f} (dequantised per call)", flush=True)
    table = blocks(GT.Q6_K, (V, D))
    table16 = table.dequantize()
    h = torch.randn(256, D, generator=g).to(dev, torch.bfloat16)
    a = head_sample(h, table, temperature=0.6, seed=1, step=0)
    b = head_sample(h, table16, temperature=0.6, seed=1, step=0)
    agree = (a.argmax == b.argmax).float().mean().item()
    for tag, tb in (("packed", table), ("bf16", table16)):
        ms, mib = timed_mem(lambda: head_sample(h, tb, temperature=0.6, seed=1, step=0))
        print(f"RESULT quant=Q4_K_M part=head_sample table={tag} rows=256 ms={ms:.3f} transient_mib={mib:.0f} "
              f"table_mib={(tb.nbytes if tag == 'packed' else tb.numel() * 2) / 2**20:.0f} argmax_agree={agree:.4f}",
              flush=True)


def step_timing(dev, small, batches, context):
    from dgplug import model as dm
    from dgplug import ops
    from dgplug.model import LayerCache, inv_freq
    from transformers import DynamicCache

    ops.set_backend("kernels")
    cfg, kw = real_text_config(small)
    hf, rot, impl = hf_layers(cfg, dev)
    dg16, tc = dg_layers(kw, hf, dev, int4=False)
    dg4, _ = dg_layers(kw, hf, dev, int4=True)
    H, V, C = cfg.hidden_size, cfg.vocab_size, 256 if not small else 32
    E = (torch.randn(V, H, device=dev) * 0.03).to(torch.bfloat16)
    print(f"transformers experts implementation: {impl}; context {context} tokens; canvas {C}")
    nbytes = lambda mods: sum(p.numel() * p.element_size() for m in mods for p in m.parameters())  # noqa: E731
    exp_bytes16 = sum(p.numel() * 2 for m in dg16 for n, p in m.named_parameters() if "experts" in n)
    exp_bytes4 = sum(getattr(m.experts, n).nbytes for m in dg4 for n in ("gate_up_proj", "down_proj"))
    other = nbytes(dg16) - exp_bytes16
    # per-step bytes for 30 layers (25 sliding + 5 full) + the tied embedding (read once by the fused head)
    scale30 = lambda s, f: 25 * s + 5 * f  # noqa: E731
    rows = []
    for B in batches:
        ctx_ids = context
        x = (torch.randn(B, C, H, device=dev)).to(torch.bfloat16)
        pos = torch.arange(ctx_ids, ctx_ids + C, device=dev)
        ms = {}
        # transformers: its decoder layer modules over a DynamicCache holding `context` keys
        cache = DynamicCache(config=cfg)
        for i, (hd, kvh) in enumerate([(kw["head_dim"], kw["num_key_value_heads"]),
                                       (kw["global_head_dim"], kw["num_global_key_value_heads"])]):
            k = torch.randn(B, kvh, ctx_ids, hd, device=dev, dtype=torch.bfloat16)
            cache.update(k, k.clone(), i)
        pe = {t: rot(x, pos[None], t) for t in ("sliding_attention", "full_attention")}
        with torch.no_grad():
            for i, t in enumerate(("sliding_attention", "full_attention")):
                ms[f"hf_{t}"] = timed(lambda: hf[i](x, pe[t], None, pos[None], cache))
        # dgplug: same weights, kernels backend; bf16 experts and int4 experts
        caches = []
        for i in range(2):
            c = cache.layers[i]
            caches.append(LayerCache(c.keys, c.values, torch.arange(ctx_ids - c.keys.shape[2], ctx_ids, device=dev)))
        with torch.no_grad():
            for tag, lays in (("dg16", dg16), ("dg4", dg4)):
                for i, t in enumerate(("sliding", "full")):
                    inv = inv_freq(tc, t == "sliding").to(dev)
                    f = pos[:, None].float() * inv[None]
                    emb = torch.cat((f, f), -1)
                    cs, sn = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
                    fn = lambda: lays[i](x, cs, sn, pos, caches[i], "denoise", lays[i].layer_scalar)  # noqa: E731
                    ms[f"{tag}_{t}"] = timed(fn)
                    if tag == "dg4":  # launch overhead: the same under a CUDA graph, glue kernels on and off
                        ms[f"g4_{t}"] = graph_time(fn)
                        ops.GLUE_KERNELS = False
                        try:
                            ms[f"g4_{t}_noglue"] = graph_time(fn)
                        finally:
                            ops.GLUE_KERNELS = True
                        was, dm.FUSED_PROJECTIONS = dm.FUSED_PROJECTIONS, "0"  # q|k|v, gate|up: separate matmuls
                        try:
                            ms[f"g4_{t}_separate"] = graph_time(fn)
                        finally:
                            dm.FUSED_PROJECTIONS = was
                        print(f"RESULT layer part=glue quant=int4 batch={B} kind={t} graphs_ms={ms[f'g4_{t}']:.3f} "
                              f"graphs_ms_glue_on_references={ms[f'g4_{t}_noglue']:.3f} "
                              f"graphs_ms_projections_separate={ms[f'g4_{t}_separate']:.3f}", flush=True)
        # head + sampler
        h = torch.randn(B * C, H, device=dev).to(torch.bfloat16)

        for tag, fn in (("hf_head", lambda: hf_sampler(h, E, B, C)), ("dg_head", lambda: dg_sampler(h, E, B, C))):
            ms[tag], ms[tag + "_mib"] = timed_mem(fn)
        ms["g_head"] = graph_time(lambda: dg_sampler(h, E, B, C))
        head_b, head_f = V * H * 2 / HBM * 1e3, 2 * 2 * B * C * H * V / TENSOR_FLOPS * 1e3  # one table read; logits + P @ E
        print(f"RESULT head_sample batch={B} graphs_ms={ms['g_head']:.3f} eager_ms={ms['dg_head']:.3f} "
              f"transformers_ms={ms['hf_head']:.3f} floor_pct={100 * max(head_b, head_f) / ms['g_head']:.0f} "
              f"bytes_floor_ms={head_b:.3f} flops_floor_ms={head_f:.3f}", flush=True)
        hf_step = scale30(ms["hf_sliding_attention"], ms["hf_full_attention"]) + ms["hf_head"]
        dg16_step = scale30(ms["dg16_sliding"], ms["dg16_full"]) + ms["dg_head"]
        dg4_step = scale30(ms["dg4_sliding"], ms["dg4_full"]) + ms["dg_head"]
        per_layer_other = other / 2
        flop_floor = step_flops(kw, B * C, context + C) / TENSOR_FLOPS * 1e3
        floor16 = max((30 * per_layer_other + 30 * exp_bytes16 / 2 + V * H * 2) / HBM * 1e3, flop_floor)
        floor4 = max((30 * per_layer_other + 30 * exp_bytes4 / 2 + V * H * 2) / HBM * 1e3, flop_floor)
        ms["g4_step"] = scale30(ms["g4_sliding"], ms["g4_full"]) + ms["g_head"]
        rows.append((B, hf_step, dg16_step, dg4_step, floor16, floor4, ms))
        print(f"B={B}: layer ms (sliding/full) transformers {ms['hf_sliding_attention']:.2f}/{ms['hf_full_attention']:.2f}, "
              f"dgplug bf16 {ms['dg16_sliding']:.2f}/{ms['dg16_full']:.2f}, dgplug int4 {ms['dg4_sliding']:.2f}/{ms['dg4_full']:.2f}; "
              f"head+sampler ms transformers {ms['hf_head']:.2f} ({ms['hf_head_mib']:.0f} MiB) vs dgplug {ms['dg_head']:.2f} "
              f"({ms['dg_head_mib']:.0f} MiB); under CUDA graphs: int4 layers {ms['g4_sliding']:.2f}/{ms['g4_full']:.2f}, "
              f"head+sampler {ms['g_head']:.2f}", flush=True)
    print(f"\nper denoise step, 30 layers + head + sampler (ms); tok/s at 16 tokens per forward; "
          f"floor = max(bytes / {HBM / 1e12:.2f} TB/s (this device; the H100's floor is x{HBM / HBM_H100:.2f}), "
          f"matmul FLOPs / {TENSOR_FLOPS / 1e12:.0f} TFLOP/s)")
    print("(eager: launched op by op, as transformers runs; graphs: dgplug int4 layers and head replayed as CUDA graphs)")
    print(f"{'batch':>5} {'transformers':>13} {'dgplug bf16':>12} {'dgplug int4':>12} {'ratio bf16':>10} "
          f"{'int4 graphs':>11} {'tok/s graphs':>12} {'int4 floor':>10} {'% of floor':>10}")
    for B, a, b, c, f16, f4, ms in rows:
        g = ms["g4_step"]
        print(f"{B:>5} {a:>13.2f} {b:>12.2f} {c:>12.2f} {a / b:>10.2f} {g:>11.2f} {16 * B * 1000 / g:>12.0f} "
              f"{f4:>10.2f} {100 * f4 / g:>9.0f}%")


# -- 3. end to end: model.generate at full shapes -----------------------------------------------
def full_models(dev, small, quant="int4"):
    """transformers' DiffusionGemmaForBlockDiffusion at the release's text shapes (30 layers: 25
    sliding + 5 full) with random bf16 weights made on the device, and dgplug's model built from
    the same tensors (shared, not copied) with its experts quantized (`quant`: int4 group 128, fp8,
    int8; "Q4_K_M": random GGUF blocks of its expert types, gate_up Q4_K and down Q5_0, the rest
    bf16 as dgplug.load leaves a GGUF on CUDA; None: bf16)."""
    from gguf import GGMLQuantizationType
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dgplug import names
    from dgplug.config import from_dict
    from dgplug.converters.quant import quantize
    from dgplug.kernels.moe import QuantizedWeight
    from dgplug.loader import build
    from dgplug.testing import TINY_VISION

    _, kw = real_text_config(small)
    n = 6 if small else 30
    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)]
    V = kw["vocab_size"]
    cfg = DiffusionGemmaConfig(text_config=dict(kw, num_hidden_layers=n, layer_types=types),
                               vision_config=dict(TINY_VISION), canvas_length=256 if not small else 32,
                               boi_token_id=V - 3, eoi_token_id=V - 2, image_token_id=V - 1)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            hf = DiffusionGemmaForBlockDiffusion(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=p.dtype) * p.shape[-1] ** -0.5)
            elif name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.fill_(0.25)
            elif "norm" in name or name.endswith("scale"):
                p.fill_(1.0)

    dcfg = from_dict(cfg.to_dict())
    state = hf.state_dict()

    seeds = iter(range(1, 1 << 20))

    def tensors():  # the checkpoint's names (the state dict also holds tied copies)
        for spec in names.text_tensors(dcfg.text):
            name, t = spec.hf, state[spec.hf]
            if quant == "Q4_K_M" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                Q = GGMLQuantizationType  # the smoke test's hidden size (128) is no multiple of 256: Q4_0
                qt = (Q.Q4_K if t.shape[-1] % 256 == 0 else Q.Q4_0) if name.endswith("gate_up_proj") else Q.Q5_0
                t = random_blocks(qt, tuple(t.shape), dev, seed=next(seeds))
            elif quant and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                q = quantize(t.float(), quant)
                t = QuantizedWeight(quant, q["qweight"], q["scale"], q.get("zero"))
            yield name, t

    dg = build(dcfg, tensors(), device=dev, check_finite=False)
    gu = dg.layers[0].experts.gate_up_proj
    if quant == "int4":  # dgplug.load's repack on CUDA (kernels.quantized_weight.for_gpu_kernels)
        print(f"dgplug int4 experts as loaded: {gu.order} order, K tiles {gu.kpack or '-'}")
    return hf, dg


def generate_e2e(dev, small, batches, prompt=512, canvases=2, steps=32, quant="int4", hf_ms=None, a8=False,
                 eager=True, moe=None):
    """model.generate end to end: prompt, `canvases` canvases of `steps` steps each (the stop test
    off), dgplug with CUDA graphs and eagerly (DGPLUG_CUDA_GRAPHS=0; the tokens must agree), and
    transformers' own generate (eager) on the same bf16 weights, in one run. quant: dgplug's
    experts (int4 group 128, fp8, int8). hf_ms {batch: ms}: transformers' time measured earlier in
    the run on the same weights (not timed again). eager=False: the graphs only. moe {batch: (label,
    config)}: the MoE tiles for that batch (DGPLUG_MOE_CONFIG), named in the RESULT line.
    Returns {batch: transformers ms}."""
    import os

    from dgplug import ops

    ops.set_backend("kernels")
    os.environ["DGPLUG_FP8_ACTIVATIONS"] = "1" if a8 else "0"  # fp8 experts: fp8 activations too (kernels.moe)
    t0 = time.perf_counter()
    hf, dg = full_models(dev, small, quant)
    C, V = dg.cfg.canvas_length, dg.tc.vocab_size
    _, kw = real_text_config(small)
    if small:  # the CPU smoke test: same code, a few steps, batch 1
        prompt, steps, batches = 40, 3, batches[:1]
    print(f"built the full-shape models in {time.perf_counter() - t0:.0f}s; prompt {prompt}, {canvases} canvases "
          f"of {C}, {steps} steps each; dgplug experts {quant}, transformers bf16", flush=True)
    settings = dict(max_new_tokens=canvases * C, max_denoising_steps=steps, confidence_threshold=1e-30,
                    stability_threshold=1)
    n_steps = canvases * steps
    hf_seen = {}
    floor_bytes = sum(p.numel() * p.element_size() for n, p in dg.named_parameters())
    floor_bytes += sum(w.nbytes for lay in dg.layers for w in (lay.experts.gate_up_proj, lay.experts.down_proj))
    for B in batches:
        ids = torch.randint(5, V - 3, (B, prompt), device=dev, generator=torch.Generator(device=dev).manual_seed(B))
        ms, toks = {}, {}
        label, cfg = (moe or {}).get(B, ("default", {}))
        os.environ["DGPLUG_MOE_CONFIG"] = ",".join(f"{k}={int(v)}" for k, v in cfg.items())
        for tag, graphs in (("graphs", "1"), ("eager", "0"))[:2 if eager else 1]:
            os.environ["DGPLUG_CUDA_GRAPHS"] = graphs
            last = {}
            run = lambda: last.update(seq=dg.generate(ids, seed=5, **settings).sequences)  # noqa: E731
            run()  # warm: compiles kernels, captures the step's graph (the commit's: in the next call)
            ms[tag] = timed(run, reps=3, warm=0)
            toks[tag] = last["seq"]  # from the last timed call: both graphs replayed
        os.environ["DGPLUG_CUDA_GRAPHS"] = "1"
        same = torch.equal(toks["graphs"], toks["eager"]) if eager else "not_run"
        if dev != "cuda":  # the smoke run: DGPLUG_CUDA_GRAPHS has nothing to capture on a CPU
            print("(CPU: no CUDA graphs; both runs below are eager)")
        try:
            if hf_ms and B in hf_ms:
                raise LookupError
            torch.manual_seed(0)
            run_hf = lambda: hf.generate(input_ids=ids, **settings)  # noqa: E731
            ms["transformers"] = timed(run_hf, reps=2 if not small else 1, warm=1 if not small else 0)
        except LookupError:
            ms["transformers"] = hf_ms[B]
        except torch.OutOfMemoryError:
            ms["transformers"] = float("nan")
            torch.cuda.empty_cache()
        hf_seen[B] = ms["transformers"]
        floor_b, floor_f = floor_bytes / HBM * 1e3, step_flops(kw, B * C, prompt + C) / TENSOR_FLOPS * 1e3
        floor = max(floor_b, floor_f)
        print(f"B={B}: generate ms: dgplug graphs {ms['graphs']:.0f}, eager {ms.get('eager', float('nan')):.0f}, "
              f"transformers {ms['transformers']:.0f}; tokens graphs == eager: {same}; MoE tiles: {label} {cfg}", flush=True)
        for tag in ("graphs", "eager")[:2 if eager else 1]:
            step = ms[tag] / n_steps
            print(f"RESULT step path=generate quant={quant}{'a8' if a8 else ''} batch={B} graphs={int(tag == 'graphs' and dev == 'cuda')} "
                  f"moe={label.replace(' ', '_').replace(',', '')} ms={step:.2f} "
                  f"tok_s={16 * B * 1000 / step:.0f} floor_pct={100 * floor / step:.0f} "
                  f"bytes_floor_ms={floor_b:.2f} flops_floor_ms={floor_f:.2f} "
                  f"transformers_ms={ms['transformers'] / n_steps:.2f} generate_tok_s={B * canvases * C * 1000 / ms[tag]:.0f} "
                  f"transformers_generate_tok_s={B * canvases * C * 1000 / ms['transformers']:.0f} "
                  f"tokens_equal={same}", flush=True)
        pass_times(dg, ids, B, quant + ("a8" if a8 else ""))
    del hf, dg
    os.environ["DGPLUG_FP8_ACTIVATIONS"] = "0"
    os.environ["DGPLUG_MOE_CONFIG"] = ""
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return hf_seen


def settled_rows(dev, small, B=8, settled=6, prompt=128, steps=12):
    """Settled rows leave the batch (dgplug.denoise_step.settle): batch 8, int4 experts, 2 canvases
    of `steps` steps. The first canvas of rows 0-5 is given and locked whole, so they settle after
    step 2 (stop test: stable draft, any entropy) and the rest of that canvas runs as a batch of 2
    (a graph of its own); the second canvas brings them back. Times generate with the rows leaving
    (DGPLUG_COMPACT=1) and with every row in every step (=0), alternated, medians; checks that
    graphs and eager passes (same batch sizes) give the same tokens."""
    import os

    from dgplug import ops

    ops.set_backend("kernels")
    hf, dg = full_models(dev, small, "int4")
    del hf
    C, V = dg.cfg.canvas_length, dg.tc.vocab_size
    if small:
        prompt, steps, B, settled = 40, 4, 3, 2
    g = torch.Generator(device=dev).manual_seed(3)
    ids = torch.randint(5, V - 3, (B, prompt), device=dev, generator=g)
    canvas = torch.randint(5, V - 3, (B, C), device=dev, generator=g)
    lock = torch.zeros(B, C, dtype=torch.bool, device=dev)
    lock[:settled] = True
    settings = dict(max_new_tokens=2 * C, max_denoising_steps=steps, confidence_threshold=1e30, stability_threshold=1,
                    decoder_input_ids=canvas, locked=lock, seed=5)
    out, ms = {}, {"1": [], "0": []}
    before = {k: os.environ.get(k) for k in ("DGPLUG_COMPACT", "DGPLUG_CUDA_GRAPHS")}
    cold = {}  # the first two calls of each: kernels compiled for each new batch size, then captured
    for compact in ("1", "0"):  # warm: kernels for each batch size, then the graphs' capture
        os.environ["DGPLUG_COMPACT"] = compact
        for _ in range(2):
            t = time.perf_counter()
            out[compact] = dg.generate(ids, **settings)
            sync()
            cold.setdefault(compact, []).append(1e3 * (time.perf_counter() - t))
    for _ in range(1 if small else 3):
        for compact in ("1", "0"):
            os.environ["DGPLUG_COMPACT"] = compact
            ms[compact].append(timed(lambda: dg.generate(ids, **settings), reps=1, warm=0))
    os.environ["DGPLUG_COMPACT"] = "1"
    os.environ["DGPLUG_CUDA_GRAPHS"] = "0"
    eager = dg.generate(ids, **settings)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    a, b = out["1"], out["0"]
    on, off = statistics.median(ms["1"]), statistics.median(ms["0"])
    same_ge = torch.equal(eager.sequences, a.sequences)
    print(f"B={B}, {settled} rows settled after step 2 of canvas 1: steps {a.steps}, row-forwards {int(a.forwards.sum())} "
          f"of {B * sum(a.steps)}; generate ms: rows leave {on:.0f}, every row {off:.0f} ({off / on:.2f}x); "
          f"tokens graphs == eager: {same_ge}; tokens == every-row run: {torch.equal(a.sequences, b.sequences)} "
          f"(matrix products are not batch-invariant: last bits may differ)")
    print(f"first calls in this process (compile, capture), ms: rows leave {cold['1'][0]:.0f} then {cold['1'][1]:.0f}; "
          f"every row, after them, {cold['0'][0]:.0f} then {cold['0'][1]:.0f}")
    print(f"RESULT settled_rows batch={B} settled={settled} steps={'+'.join(map(str, a.steps))} "
          f"row_forwards={int(a.forwards.sum())} ms_compact={on:.1f} ms_every_row={off:.1f} speedup={off / on:.2f} "
          f"tokens_graphs_eager_equal={same_ge} forwards_equal={torch.equal(a.forwards, b.forwards)} "
          f"ms_first_call_compact={cold['1'][0]:.0f}", flush=True)
    del dg
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def pass_times(dg, ids, B, quant):
    """What generate's time is made of: one denoise step and one committed canvas's encoder pass
    (dgplug.denoise_step: graph replays, and the commit run eagerly on the same buffers), the
    prompt's encoder pass (eager), timed alternated; then the graphed step's kernels by device time."""
    from dgplug.model import KVCache

    step = next((s for s in dg.__dict__.get("_denoise_steps", {}).values() if s.B == B), None)
    if step is None:
        print("no static step kept by generate")
        return
    graphs = {k: g for k, g in step.graphs.items() if g is not None}
    fns = {"step": graphs["step"].replay if "step" in graphs else step._step,
           "commit": graphs["commit"].replay if "commit" in graphs else step._commit,
           "commit_eager": step._commit,
           "prompt_eager": lambda: dg.encode(ids, KVCache.empty(dg.tc.num_hidden_layers))}
    t = alternated(fns, rounds=3, reps=5)
    print(f"RESULT passes quant={quant} batch={B} graphs={int('step' in graphs)}/{int('commit' in graphs)} "
          f"step_ms={t['step']:.2f} commit_ms={t['commit']:.2f} commit_eager_ms={t['commit_eager']:.2f} "
          f"prompt_{ids.shape[1]}_eager_ms={t['prompt_eager']:.2f}", flush=True)
    if B == 1 and quant == "int4":
        profile(f"one denoise step, B={B}, {quant}, {'graph replay' if 'step' in graphs else 'eager'}",
                fns["step"], rows=30)


def hf_compiled_generate(dev, small, prompt=512, canvases=2, steps=32):
    """transformers' own compiled generate (cache_implementation="static": its encoder, decoder forward
    and sampler through torch.compile, mode reduce-overhead), batch 1, the e2e section's settings; the
    first call compiles. Last in the run: it may take minutes, and runs only within the budget."""
    if small or dev != "cuda":
        print("skipped: needs a GPU (inductor on a CPU would compile for minutes)")
        return
    hf, dg = full_models(dev, small, None)
    C, V = dg.cfg.canvas_length, dg.tc.vocab_size
    del dg
    settings = dict(max_new_tokens=canvases * C, max_denoising_steps=steps, confidence_threshold=1e-30,
                    stability_threshold=1, cache_implementation="static")
    ids = torch.randint(5, V - 3, (1, prompt), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    try:
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, **settings)
        sync()
        first = time.perf_counter() - t0
        ms = timed(lambda: hf.generate(input_ids=ids, **settings), reps=2, warm=0)
    except Exception as ex:  # noqa: BLE001 - "if it works": say why it did not
        print(f"transformers compiled generate failed: {type(ex).__name__}: {str(ex)[:300]}")
        return
    n = canvases * steps
    print(f"transformers generate, compiled: first call {first:.0f} s, then {ms:.0f} ms ({ms / n:.2f} ms per step)")
    print(f"RESULT transformers_compiled batch=1 ms={ms / n:.2f} generate_ms={ms:.0f} compile_s={first:.0f}", flush=True)


def fastest_by_batch(best: dict, small: bool) -> dict:
    """{batch: (label, config)} from the MoE sweep's fastest int4 fragments variant per T (256 x batch)."""
    if not best:
        raise RuntimeError("the MoE sweep found no fastest variant (it failed or was skipped)")
    return {B: best[T][:2] for B, T in ((1, 256), (8, 2048), (1, 32)) if T in best and (T == 32) == small}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--budget", type=float, default=230, help="seconds after which later sections are skipped")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.small
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.small:
        sys.exit("gpu_check: no CUDA device; the full check builds release-size models (~50 GB) for a GPU. "
                 "On a CPU run the smoke version: TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh --small")
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("gpu_check: --small on a CPU runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    global HBM  # noqa: PLW0603
    if dev == "cuda" and "H200" in torch.cuda.get_device_name():
        HBM = 4.8e12
    import triton
    import transformers

    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"triton {triton.__version__}, transformers {transformers.__version__}", flush=True)
    t0 = time.time()
    if dev == "cuda":
        a = torch.empty(2**30, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        t = timed(lambda: b.copy_(a))
        print(f"device-to-device copy: {2 * 2**30 / t / 1e9:.2f} TB/s (read + write); nominal HBM {HBM / 1e12:.2f} TB/s")
        del a, b
    batches = [int(b) for b in args.batches.split(",")]
    hf_ms, best, failed = {}, {}, []
    for name, fn in (("end to end: model.generate, full shapes, int4 experts",
                      lambda: hf_ms.update(generate_e2e(dev, args.small, [b for b in (1, 8) if b in batches]
                                                        or batches[:1]))),
                     ("settled rows leave the batch: model.generate, batch 8, int4 experts",
                      lambda: settled_rows(dev, args.small)),
                     ("kernels vs twins", lambda: check_kernels(dev, args.small)),
                     ("MoE variants (one layer)", lambda: best.update(moe_sweep(dev, args.small))),
                     ("end to end: model.generate, int4 experts, the sweep's fastest fragments tiles (graphs only)",
                      lambda: generate_e2e(dev, args.small, [b for b in (1, 8) if b in batches] or batches[:1],
                                           hf_ms=hf_ms, eager=False, moe=fastest_by_batch(best, args.small))),
                     ("attention over [cache; canvas] (one layer)", lambda: attention_timing(dev, args.small, args.context)),
                     ("int4 linears: dequantised per call or at load", lambda: int4_linears(dev, args.small)),
                     ("one denoise step at full shapes",
                      lambda: step_timing(dev, args.small, batches, args.context)),
                     ("end to end: model.generate, fp8 experts, batch 1 (transformers' time from above)",
                      lambda: generate_e2e(dev, args.small, [1], quant="fp8", hf_ms=hf_ms)),
                     ("end to end: model.generate, fp8 experts and fp8 activations (DGPLUG_FP8_ACTIVATIONS=1), batch 1",
                      lambda: generate_e2e(dev, args.small, [1], quant="fp8", hf_ms=hf_ms, a8=True)),
                     ("end to end: model.generate, GGUF Q4_K_M experts (gate_up Q4_K, down Q5_0, decoded by runs), batch 1",
                      lambda: generate_e2e(dev, args.small, [1], quant="Q4_K_M", hf_ms=hf_ms)),
                     ("GGUF Q4_K_M kept packed", lambda: gguf_packed(dev, args.small)),
                     ("head + sampler variants", lambda: sampler_variants(dev, args.small)),
                     ("transformers generate, compiled (static cache), batch 1",
                      lambda: hf_compiled_generate(dev, args.small, args.context))):
        if time.time() - t0 > args.budget:
            print(f"\n== {name}: skipped (past the {args.budget}s budget)")
            continue
        section(name)
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on to the next section
            traceback.print_exc()
            failed.append(name)
    print(f"\ntotal {time.time() - t0:.0f}s")
    if failed:
        print(f"sections that failed ({len(failed)}): " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
