"""The GPU check (one H100, under 5 minutes): every kernel against its twin, then one denoise step
at full DiffusionGemma shapes for dgplug and for transformers' own modules, in the same run.

    bash benchmarks/gpu_check.sh            # installs nothing from the network; PYTHONPATH only

Step timing: one sliding and one full layer at real sizes with random bf16 weights, cache of
`--context` tokens, canvas 256 x batch; ms per layer scaled to the 30-layer stack (25 sliding +
5 full), plus the head + sampler step (transformers: logits, softmax, multinomial, entropy,
acceptance, renoise, next soft embedding; dgplug: the fused streaming head_sample). dgplug runs
with bf16 weights and with int4 experts. Prints ms per step, implied tok/s at 16 tokens per
forward, and the fraction of the memory-bandwidth floor (bytes a step must read / 3.35 TB/s).
--small runs the same code at toy sizes (CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch

HBM = 3.35e12  # H100 SXM bytes/s


def timed(fn, reps=10, warm=3):
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
    from dgplug.kernels import attention as ka, moe as km, sampler as ks
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
    T, D, I, E, K = (256, 2816, 704, 128, 8) if not small else (32, 64, 48, 8, 2)
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
    # fused head + sampler vs the unfused reference
    N, V = (512, 262144) if not small else (32, 1000)
    h = rnd(N, D).to(bf)
    emb = (rnd(V, D) * 0.05).to(bf)
    a = ks.head_sample(h, emb, temperature=0.6, seed=3, step=1, impl="triton")
    t = ks.head_sample(h, emb, temperature=0.6, seed=3, step=1, impl="torch")
    r = ks.head_sample_reference(h, emb, temperature=0.6, seed=3, step=1)
    print(f"head_sample triton: argmax equal {(a.argmax == r.argmax).float().mean().item():.4f}, "
          f"tokens equal to torch twin {(a.token == t.token).float().mean().item():.4f}, "
          f"entropy max abs err {(a.entropy - r.entropy).abs().max().item():.2e}, "
          f"soft rel err {err(a.soft, r.soft):.2e}")


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
    from dgplug.kernels.moe import QuantizedWeight
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
                delattr(lay.experts, n)
                setattr(lay.experts, n, q)
        out.append(lay.eval())
    return out, dcfg.text


def step_timing(dev, small, batches, context):
    from dgplug import ops
    from dgplug.kernels.sampler import head_sample
    from dgplug.model import LayerCache, inv_freq
    from dgplug.sampler import accept
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
                    ms[f"{tag}_{t}"] = timed(lambda: lays[i](x, cs, sn, pos, caches[i], "denoise", lays[i].layer_scalar))
        # head + sampler
        h = torch.randn(B * C, H, device=dev).to(torch.bfloat16)
        T = torch.tensor(0.6, device=dev)

        def hf_sampler():
            logits = torch.tanh((h @ E.T).float() / 30.0) * 30.0
            sl = (logits / T).view(B, C, V)
            probs = torch.softmax(sl, -1, dtype=torch.float32)
            y = torch.multinomial(probs.view(-1, V), 1).view(B, C)
            a = sl.argmax(-1)
            ent = torch.distributions.Categorical(logits=sl).entropy()
            acc = accept(ent, 0.1)
            x2 = torch.where(acc, y, torch.randint(0, V, (B, C), device=dev))
            soft = torch.softmax(sl.to(torch.bfloat16), -1, dtype=torch.float32).to(torch.bfloat16) @ E
            return x2, a, soft

        def dg_sampler():
            r = head_sample(h, E, temperature=0.6, seed=1, step=0)
            acc = accept(r.entropy.view(B, C), 0.1)
            return torch.where(acc, r.token.view(B, C), torch.randint(0, V, (B, C), device=dev)), r.soft

        for tag, fn in (("hf_head", hf_sampler), ("dg_head", dg_sampler)):
            sync()
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
            base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            try:
                ms[tag] = timed(fn, reps=5, warm=1)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if torch.cuda.is_available() else 0
            except torch.OutOfMemoryError:
                ms[tag], peak = float("nan"), float("nan")
            ms[tag + "_mib"] = peak
        hf_step = scale30(ms["hf_sliding_attention"], ms["hf_full_attention"]) + ms["hf_head"]
        dg16_step = scale30(ms["dg16_sliding"], ms["dg16_full"]) + ms["dg_head"]
        dg4_step = scale30(ms["dg4_sliding"], ms["dg4_full"]) + ms["dg_head"]
        per_layer_other = other / 2
        floor16 = (30 * per_layer_other + 30 * exp_bytes16 / 2 + V * H * 2) / HBM * 1e3
        floor4 = (30 * per_layer_other + 30 * exp_bytes4 / 2 + V * H * 2) / HBM * 1e3
        rows.append((B, hf_step, dg16_step, dg4_step, floor16, floor4, ms))
        print(f"B={B}: layer ms (sliding/full) transformers {ms['hf_sliding_attention']:.2f}/{ms['hf_full_attention']:.2f}, "
              f"dgplug bf16 {ms['dg16_sliding']:.2f}/{ms['dg16_full']:.2f}, dgplug int4 {ms['dg4_sliding']:.2f}/{ms['dg4_full']:.2f}; "
              f"head+sampler ms transformers {ms['hf_head']:.2f} ({ms['hf_head_mib']:.0f} MiB) vs dgplug {ms['dg_head']:.2f} "
              f"({ms['dg_head_mib']:.0f} MiB)", flush=True)
    print("\nper denoise step, 30 layers + head + sampler (ms); tok/s at 16 tokens per forward; floor = bytes / 3.35 TB/s")
    print(f"{'batch':>5} {'transformers':>13} {'dgplug bf16':>12} {'dgplug int4':>12} {'ratio bf16':>10} "
          f"{'tok/s int4':>10} {'int4 floor':>10} {'% of floor':>10}")
    for B, a, b, c, f16, f4, _ in rows:
        print(f"{B:>5} {a:>13.2f} {b:>12.2f} {c:>12.2f} {a / b:>10.2f} {16 * B * 1000 / c:>10.0f} {f4:>10.2f} "
              f"{100 * f4 / c:>9.0f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    import triton
    import transformers

    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"triton {triton.__version__}, transformers {transformers.__version__}", flush=True)
    t0 = time.time()
    for name, fn in (("kernels vs twins", lambda: check_kernels(dev, args.small)),
                     ("one denoise step at full shapes",
                      lambda: step_timing(dev, args.small, [int(b) for b in args.batches.split(",")], args.context))):
        section(name)
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on to the next section
            traceback.print_exc()
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
