"""Helpers shared by the vLLM tests and tp_worker.py (nothing here imports vLLM at import time)."""

from __future__ import annotations

import socket

ARCH = "DGPlugDiffusionGemmaForBlockDiffusion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_vllm_config(path, dtype="float32", load_format=None, **model_kw):
    """VllmConfig for a local checkpoint, built offline by vLLM's own classes.

    vLLM's CPU build refuses to build a VllmConfig for a diffusion model (its V1 runner does not
    support them and V2 needs Triton), so the diffusion flag is masked while VllmConfig validates
    and restored after; nothing here starts a runner."""
    from vllm.config import LoadConfig, ModelConfig, VllmConfig

    mc = ModelConfig(model=str(path), dtype=dtype, max_model_len=512, enforce_eager=True,
                     hf_overrides={"architectures": [ARCH]}, **model_kw)
    assert mc.is_diffusion
    mc.__dict__["is_diffusion"] = False
    try:
        vc = VllmConfig(model_config=mc, **({"load_config": LoadConfig(load_format=load_format)} if load_format else {}))
    finally:
        mc.__dict__["is_diffusion"] = True
    return vc


def build_and_load(path, dtype="float32"):
    """Construct dgplug's model class under vLLM's config and load it with vLLM's DefaultModelLoader
    (which checks every parameter got a tensor), then vLLM's post-load processing."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from dgplug.integrations.vllm_model import DGPlugDiffusionGemmaForBlockDiffusion

    from vllm.utils.torch_utils import set_default_torch_dtype

    vc = make_vllm_config(path, dtype=dtype)
    # as vLLM's loader: parameters are created in the model dtype
    with set_current_vllm_config(vc), set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
        model = DGPlugDiffusionGemmaForBlockDiffusion(vllm_config=vc)
        loaded = {}
        inner = model.load_weights
        model.load_weights = lambda weights: loaded.setdefault("names", inner(weights))
        loader = DefaultModelLoader(vc.load_config)
        loader.load_weights(model, vc.model_config)
        del model.load_weights
        model.loaded_names = loaded["names"]
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return model.eval(), vc


def run_standalone(model, vc, ids, canvas, soft=None):
    """The standalone path: causal encode of the prompt, then one denoise step of the canvas."""
    import torch
    from vllm.config import set_current_vllm_config

    from dgplug.integrations.vllm_model import StandaloneCache

    with torch.no_grad(), set_current_vllm_config(vc):
        cache = StandaloneCache.empty(model.tc.num_hidden_layers)
        n = ids.shape[0]
        model(ids, torch.arange(n), dgplug_mode="encode", dgplug_cache=cache)
        h = model(canvas, torch.arange(n, n + canvas.shape[0]), dgplug_mode="denoise", dgplug_cache=cache,
                  dgplug_soft_embeds=soft)
        return model.compute_logits(h)


def build_from_gguf(path, config_dir, packed=True):
    """dgplug's model class under vLLM's config (read from the checkpoint `config_dir`), given a GGUF's
    tensors through load_weights: with packed=True the expert stacks stay in their ggml blocks
    (kernels.ggml.GGMLWeight), the rest is dequantised; packed=False dequantises all (gguf-py)."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    from dgplug.converters.gguf_import import iter_hf_tensors
    from dgplug.integrations.vllm_model import DGPlugDiffusionGemmaForBlockDiffusion

    vc = make_vllm_config(config_dir)  # one config per model: vLLM registers each layer by name
    with set_current_vllm_config(vc), set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
        model = DGPlugDiffusionGemmaForBlockDiffusion(vllm_config=vc)
        model.loaded_names = model.load_weights(iter_hf_tensors(path, packed=packed))
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return model.eval(), vc
