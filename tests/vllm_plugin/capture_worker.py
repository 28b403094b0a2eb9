"""The capture-readiness run of test_vllm_capture.py (a script, not a test module).

argv: port out.pt config_dir, then (label, path) pairs: checkpoint directories (dense, int4), or a
.gguf file (its model config is config_dir's).
Run with TRITON_INTERPRET=1 (Triton decides at import whether it interprets, so the test starts a
process of its own; the other vLLM tests run without it) and DGPLUG_KERNELS=triton: every hot
operation of the plugin's layers and of its fused sampler is then one of dgplug's Triton kernels,
as on a GPU. For each model it runs, on the kernels and then on the reference ops, the denoise
forward of two canvases and dgplug's head + sampler (``fused_row_stats``, what the plugin's
sampler calls) under dgplug.testing.OpProbe, and saves what the probe saw and the outputs."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)


def load(label, path, config_dir):
    from vllm_helpers import build_and_load, build_from_gguf

    if path.endswith(".gguf"):
        return build_from_gguf(path, config_dir)
    model, vc = build_and_load(path)
    if label == "int4":  # what load_weights does on CUDA: the fragments nibble order (K tiles of 32 here)
        model.int4_experts_for_kernels(any_device=True, block_k=32)
    return model, vc


def run(model, vc, ids, canvases, softs):
    """Per canvas: (probe, hidden, argmax, sample, entropy, soft) of the denoise forward + fused sampler."""
    from vllm.config import set_current_vllm_config

    from dgplug.integrations.vllm_model import StandaloneCache, fused_row_stats
    from dgplug.kernels.sampler import head_sample_reference
    from dgplug.testing import OpProbe

    W, V = model.canvas_length, model.tc.vocab_size
    out = []
    with torch.no_grad(), set_current_vllm_config(vc):
        cache = StandaloneCache.empty(model.tc.num_hidden_layers)
        n = ids.shape[0]
        model(ids, torch.arange(n), dgplug_mode="encode", dgplug_cache=cache)
        pos = torch.arange(n, n + W)
        temp = torch.full((W,), 0.8)
        for step, (canvas, soft) in enumerate(zip(canvases, softs)):
            probe = OpProbe()
            with probe:
                h = model(canvas, pos, dgplug_mode="denoise", dgplug_cache=cache, dgplug_soft_embeds=soft)
                stats = fused_row_stats(h, model.model.embed_tokens.weight[:V], temp,
                                        softcap=model.final_logit_softcapping, seed=5, step=step, want_soft=True)
            # the sampler's definition on the same hidden states: full logits, then each statistic
            ref = head_sample_reference(h, model.model.embed_tokens.weight[:V], softcap=model.final_logit_softcapping,
                                        temperature=temp, seed=5, step=step, want_soft=True)
            out.append({"synced": probe.synced(), "ops": sum(probe.seen.values()), "trace": probe.trace,
                        "hidden": h, "stats": stats, "stats_reference": (ref.argmax, ref.token, ref.entropy, ref.soft)})
    return out


def main():
    port, dest, config_dir, *pairs = sys.argv[1:]
    from vllm_helpers import make_vllm_config
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from dgplug import ops
    from dgplug.integrations import vllm_plugin

    vllm_plugin.register()
    os.environ.setdefault("VLLM_DIST_IDENT", port)
    with set_current_vllm_config(make_vllm_config(config_dir)):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1)
    results = {}
    for label, path in zip(pairs[::2], pairs[1::2]):
        model, vc = load(label, path, config_dir)
        V, W, H = model.tc.vocab_size, model.canvas_length, model.tc.hidden_size
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(5, V, (10,), generator=g)
        canvases = [torch.randint(0, V, (W,), generator=g) for _ in range(2)]
        softs = [torch.randn(W, H, generator=g) for _ in range(2)]
        for backend in ("kernels", "reference"):
            ops.set_backend(backend)
            results[(label, backend)] = run(model, vc, ids, canvases, softs)
    torch.save(results, dest)


if __name__ == "__main__":
    main()
