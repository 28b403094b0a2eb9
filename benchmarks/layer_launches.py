"""Kernel launches of one decoder layer: the glue on PyTorch ops vs on dgplug.kernels.norm/router.

    python benchmarks/layer_launches.py

Counts, on a CPU, the ATen operations a decoder layer's forward dispatches (the canvas pass of a
tiny bf16 model; the count does not depend on sizes), leaving out views and allocations, which
launch nothing on a GPU. Every other ATen operation is at least one kernel launch on a GPU, eager
or replayed in a CUDA graph. The layer's heavy operations (matmuls, attention, MoE, gelu) count once
per call on both sides; with the glue kernels (norms, RoPE, residuals, router) each fused call
counts as one launch.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dgplug
from dgplug import denoise_step, ops
from dgplug.model import KVCache
from dgplug.kernels import norm as N
from dgplug.kernels import router as R
from dgplug.testing import make_checkpoint, probe_inputs

NO_LAUNCH = {"view", "_unsafe_view", "reshape", "transpose", "t", "expand", "select", "slice", "unsqueeze",
             "squeeze", "permute", "alias", "detach", "as_strided", "split", "split_with_sizes", "chunk",
             "unbind", "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "unfold",
             "set"}  # set_: a tensor re-pointed at existing storage (the fused projections' view)


class Count(TorchDispatchMode):
    """ATen operations that launch a kernel on a GPU, while `active`; units count once."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if self.active and name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def unit(self, owner, name, label, **force):
        """Replace owner.name by a wrapper that counts one `label` and hides its ATen operations."""
        fn = getattr(owner, name)

        def one(*a, **k):
            was, self.active = self.active, False
            try:
                return fn(*a, **{**k, **force})
            finally:
                self.active = was
                if was:
                    self.ops[label] += 1

        setattr(owner, name, one)
        return lambda: setattr(owner, name, fn)


# the layer's heavy operations: one unit each (on a GPU: a matmul, the Triton attention, the Triton
# MoE with its small routing-alignment launches, gelu); the rest is glue, the router included
UNITS = {"linear": "matmul", "attention": "attention", "moe": "MoE", "gelu_tanh": "gelu"}


def count_layer(model, fused: bool, static: bool = False, index: int = 0) -> collections.Counter:
    """Launches of decoder layer 0 on the canvas pass (the encoder pass is not counted). static: the
    pass `generate` runs (and captures as a CUDA graph on a GPU): a denoise step on the static cache,
    where k and v are written into the cache's canvas slots instead of concatenated."""
    counter = Count()
    undo = [counter.unit(ops, name, label) for name, label in UNITS.items()]
    if fused:  # one launch per fused call, its twin's ATen operations hidden
        undo += [counter.unit(N, n, f"kernels.norm.{n}", impl="torch") for n in ("rms_norm", "qkv_heads", "post_attention", "gelu_mul", "layer_out")]
        undo.append(counter.unit(R, "route", "kernels.router.route", impl="torch"))
        undo.append(lambda g=ops._glue_kernels: setattr(ops, "_glue_kernels", g))
        ops._glue_kernels = lambda x: True
    layer = model.layers[index]
    orig = layer.forward

    def counted(x, cos, sin, pos, cache, mode, *a, **k):
        counter.active = mode == "denoise"
        try:
            return orig(x, cos, sin, pos, cache, mode, *a, **k)
        finally:
            counter.active = False

    layer.forward = counted
    try:
        ids, canvas = probe_inputs(batch=1)
        with counter, torch.no_grad():
            if static:
                cache = KVCache.empty(model.tc.num_hidden_layers)
                model.encode(ids, cache, None)
                step = denoise_step.for_generation(model, 1, ids.shape[1], 4, 1)
                step.start(seed=0, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
                step.start_canvas(0, cache, None)
                step.run()
            else:
                model(input_ids=ids, decoder_input_ids=canvas)
    finally:
        layer.forward = orig
        for u in undo:
            u()
    return counter.ops


def count_step(model) -> collections.Counter:
    """Launches of one whole denoise step as `generate` runs it (static cache, glue kernels; the
    head + sampler and the step's RNG counted as their one or few launches each)."""
    from dgplug.kernels import sampler as S

    counter = Count()
    undo = [counter.unit(ops, name, label) for name, label in UNITS.items()]
    undo += [counter.unit(N, n, f"kernels.norm.{n}", impl="torch") for n in ("rms_norm", "qkv_heads", "post_attention",
                                                                          "gelu_mul", "layer_out")]
    undo += [counter.unit(R, "route", "kernels.router.route", impl="torch"),
             counter.unit(S, "head_sample", "head_sample"), counter.unit(S, "step_keys", "kernels.sampler.step_keys",
                                                                         impl="torch")]
    undo.append(lambda g=ops._glue_kernels: setattr(ops, "_glue_kernels", g))
    ops._glue_kernels = lambda x: True
    try:
        ids, _ = probe_inputs(batch=1)
        cache = KVCache.empty(model.tc.num_hidden_layers)
        model.encode(ids, cache, None)
        step = denoise_step.for_generation(model, 1, ids.shape[1], 4, 1)
        step.start(seed=0, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
        step.start_canvas(0, cache, None)
        counter.active = True
        with counter, torch.no_grad():
            step.run()
    finally:
        counter.active = False
        for u in undo:
            u()
    return counter.ops


def main():
    with tempfile.TemporaryDirectory() as d:
        model = dgplug.load(make_checkpoint(Path(d) / "ck"), dtype=torch.bfloat16)
    units = set(UNITS.values())
    res = {}
    for fused in (False, True):
        c = count_layer(model, fused)
        glue = {k: v for k, v in c.items() if k not in units}
        res[fused] = (sum(c.values()), sum(glue.values()), c)
    print("launches of one decoder layer on the canvas pass, bf16 (views and allocations left out;")
    print("matmul, attention, MoE and gelu counted once per call on both sides)")
    print(f"{'the glue on':<30}{'whole layer':>12}{'glue':>8}")
    for fused in (False, True):
        label = "norm/router kernels (after)" if fused else "PyTorch ops (before)"
        print(f"{label:<30}{res[fused][0]:>12}{res[fused][1]:>8}")
    b, a = res[False], res[True]
    print(f"RESULT launches part=glue before={b[1]} after={a[1]} layer_before={b[0]} layer_after={a[0]}")
    for fused in (False, True):
        print(("after:  " if fused else "before: ") + ", ".join(f"{k} {v}" for k, v in sorted(res[fused][2].items())))
    from dgplug import model as dm

    for proj in ("0", "1"):  # one matmul per projection (a CPU) / q|k|v and gate|up fused (CUDA's default)
        dm.FUSED_PROJECTIONS = proj
        tag = "fused projections" if proj == "1" else "separate projections"
        c = count_layer(model, True, static=True)  # layer 0: sliding (q, k, v)
        full = count_layer(model, True, static=True, index=model.tc.layer_types.index("full_attention"))  # no v
        print(f"the denoise step generate runs (static cache, glue kernels, {tag}): sliding layer {sum(c.values())} "
              f"launches: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
              + f"; full layer {sum(full.values())}")
        print(f"RESULT launches part=layer path=generate_step projections={tag.split()[0]} launches={sum(c.values())} "
              f"full_layer={sum(full.values())}")
        whole = count_step(model)
        kinds = model.tc.layer_types
        in_layers = collections.Counter()
        for t in kinds:
            in_layers.update(full if t == "full_attention" else c)
        outside = sum(whole.values()) - sum(in_layers.values())
        print(f"the whole step ({len(kinds)} layers here, {kinds.count('full_attention')} full; {tag}): "
              f"{sum(whole.values())} launches, {outside} outside the layers (head + sampler counted once): "
              + ", ".join(f"{k} {v}" for k, v in sorted(((k, v - in_layers.get(k, 0)) for k, v in whole.items()),
                                                         key=lambda kv: -kv[1]) if v))
        print(f"RESULT launches part=step path=generate_step projections={tag.split()[0]} outside_layers={outside} "
              f"per_30_layer_step={outside + 25 * sum(c.values()) + 5 * sum(full.values())} (25 sliding + 5 full)")

if __name__ == "__main__":
    main()
