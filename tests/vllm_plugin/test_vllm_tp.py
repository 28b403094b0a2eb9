"""Tensor parallel 2 over gloo (two CPU processes, vLLM's own model-parallel groups): the
sharded model (heads, KV heads, MLP columns, vocabulary split; experts split by expert) gives the
single-rank logits."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from vllm_helpers import build_and_load, free_port, run_standalone as _run

HERE = Path(__file__).parent


def test_tensor_parallel_2_equals_single_rank(vllm_dist, tmp_path):
    from dgplug import ops

    model, vc = build_and_load(vllm_dist["ckpt"])
    V, C = model.tc.vocab_size, model.canvas_length
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 500, (20,), generator=g)
    canvas = torch.randint(0, V, (C,), generator=g)
    sc = torch.randn(C, V, generator=g) * 3
    soft = ops.soft_embedding(sc, model.model.embed_tokens.weight[:V]) * model.model.normalizer
    single = _run(model, vc, ids, canvas, soft)
    torch.save({"ids": ids, "canvas": canvas, "soft": soft}, tmp_path / "in.pt")

    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING")
    procs = [subprocess.Popen([sys.executable, str(HERE / "tp_worker.py"), str(r), "2", port,
                               str(vllm_dist["ckpt"]), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["experts_local"] == model.tc.num_experts // 2 and got["heads_local"] == model.tc.num_attention_heads // 2
    assert got["logits"].shape == single.shape
    assert (got["logits"] - single).abs().max().item() < 1e-4
    assert torch.equal(got["logits"].argmax(-1), single.argmax(-1))
