"""One dispatch rule for every kernel (dgplug/kernels/backend.py): an explicit `impl` wins, then
DGPLUG_KERNELS, then Triton for CUDA tensors. Checked through each module's public entry point, with
its Triton path replaced by a marker, so the test says which path a call took, not what it computed."""

import pytest
import torch

from dgplug.kernels import attention, ggml, moe, moe_triton, sampler
from dgplug.errors import InputError
from dgplug.kernels.backend import pick_impl

TRITON = object()


def _calls():
    """(name, module, Triton function the public call reaches, the public call on CPU tensors)."""
    q = torch.randn(1, 2, 4, 16)
    pos = torch.arange(4)
    x, idx, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    gu, dn = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    h, table = torch.randn(2, 16), torch.randn(40, 16)
    raw = torch.zeros(2, 18, dtype=torch.uint8)  # two Q4_0 blocks
    return [
        ("attention", attention, "attention_triton",
         lambda impl: attention.attention(q, q, q, q_pos=pos, k_pos=pos, impl=impl)),
        ("moe", moe_triton, "moe_forward_triton", lambda impl: moe.moe_forward(x, idx, w, gu, dn, impl=impl)),
        ("sampler", sampler, "_head_sample_triton", lambda impl: sampler.head_sample(h, table, impl=impl)),
        ("ggml", ggml, "_decode_rows", lambda impl: ggml.dequantize_blocks(raw, 2, impl=impl)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_every_kernel_dispatches_by_one_rule(monkeypatch, case):
    name, module, target, call = _calls()[case]

    def marker(*args, **kwargs):
        raise LookupError(TRITON)

    monkeypatch.setattr(module, target, marker)
    monkeypatch.setattr(module, "HAS_TRITON", True, raising=False)  # the rule, with or without triton installed
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may take Triton (ggml's CPU rows need this)

    def path(impl=None, env=None):
        if env is None:
            monkeypatch.delenv("DGPLUG_KERNELS", raising=False)
        else:
            monkeypatch.setenv("DGPLUG_KERNELS", env)
        try:
            call(impl)
        except LookupError as e:
            assert e.args == (TRITON,)
            return "triton"
        return "torch"

    assert path() == "torch", name  # CPU tensors: the twin
    assert path(env="triton") == "triton", name
    assert path(env=" Torch ") == "torch", name
    assert path("torch", env="triton") == "torch", name  # an explicit argument wins
    assert path("triton", env="torch") == "triton", name
    with pytest.raises(InputError, match="DGPLUG_KERNELS='cuda': use auto, torch or triton"):
        path(env="cuda")
    with pytest.raises(ValueError, match="impl must be None, 'torch' or 'triton', got 'numpy'"):
        path("numpy")


def test_unsupported_calls_stay_on_the_twin_unless_forced(monkeypatch):
    monkeypatch.delenv("DGPLUG_KERNELS", raising=False)
    x = torch.empty(1, device="meta")  # not CUDA: the twin whatever `supported` says
    assert pick_impl(x, None, supported=True) == "torch"
    monkeypatch.setenv("DGPLUG_KERNELS", "triton")
    assert pick_impl(x, None, supported=False) == "triton"  # forcing wins over the kernel's own limits


def test_ggml_cpu_rows_stay_on_torch_outside_the_interpreter(monkeypatch):
    """A GGUF's blocks decoded on the CPU (at load, or a CPU run) take the torch decoder even with
    DGPLUG_KERNELS=triton, which means the model's kernels: Triton has no CPU driver there."""
    def marker(*args, **kwargs):
        raise LookupError(TRITON)

    monkeypatch.setattr(ggml, "_decode_rows", marker)
    monkeypatch.setenv("DGPLUG_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    raw = torch.zeros(2, 18, dtype=torch.uint8)
    assert ggml.dequantize_blocks(raw, 2).shape == (2, 32)  # the torch path: no marker raised
    with pytest.raises(LookupError):
        ggml.dequantize_blocks(raw, 2, impl="triton")  # an explicit choice is still obeyed
