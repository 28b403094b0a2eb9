"""One rank of the tensor-parallel test (run as a script by test_tp.py; not a test module).

argv: rank world port ckpt inputs.pt out.pt. Builds the model under vLLM's config with
vLLM's model-parallel groups over gloo, loads it with vLLM's loader, runs the standalone
encode + denoise, and (rank 0) saves the gathered logits."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)


def main():
    rank, world, port, ckpt, inputs, out = sys.argv[1:7]
    rank, world = int(rank), int(world)
    from vllm_helpers import build_and_load, make_vllm_config
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from dgplug.integrations import vllm_plugin
    from dgplug.integrations.vllm_model import StandaloneCache

    vllm_plugin.register()
    vc = make_vllm_config(ckpt)
    # what vLLM's CPU worker sets before it joins the groups (the port of the init method): its CPU
    # communicator names the shared-memory group after it, and reads it unguarded when vLLM's _C ops load
    os.environ.setdefault("VLLM_DIST_IDENT", port)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=world)
    model, vc = build_and_load(ckpt)
    x = torch.load(inputs)
    with torch.no_grad(), set_current_vllm_config(vc):
        cache = StandaloneCache.empty(model.tc.num_hidden_layers)
        n = x["ids"].shape[0]
        model(x["ids"], torch.arange(n), dgplug_mode="encode", dgplug_cache=cache)
        h = model(x["canvas"], torch.arange(n, n + x["canvas"].shape[0]), dgplug_mode="denoise",
                  dgplug_cache=cache, dgplug_soft_embeds=x["soft"])
        logits = model.compute_logits(h)
    if rank == 0:
        torch.save({"logits": logits, "experts_local": model.model.layers[0].experts.num_local,
                    "heads_local": model.model.layers[0].self_attn.num_heads}, out)


if __name__ == "__main__":
    main()
