"""Which implementation a kernel call runs: its Triton kernel or its PyTorch twin.

Every kernel module (attention, moe, norm, router, sampler, ggml) dispatches through `pick_impl`:

    impl="torch" | "triton"      that one (an explicit argument wins)
    DGPLUG_KERNELS=torch|triton  else that one, for every call
    otherwise                    Triton for CUDA tensors when it imports (and the call is one its
                                 kernel takes: `supported`), the twin for everything else

Triton is optional: without it everything runs on the twins. Under TRITON_INTERPRET=1 the Triton
kernels run on the CPU (`interpreting()`), which is how the tests check them against their twins.
"""

from __future__ import annotations

import os

import torch

from dgplug import settings

try:  # triton is optional: the twins need nothing but torch (a broken install counts as none)
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

ENV_FORCE = "DGPLUG_KERNELS"

COMPILE_ONLY = False  # set by benchmarks/sm90_build.py: launches only compile, so CPU tensors pass


def interpreting() -> bool:
    """TRITON_INTERPRET is on: the Triton kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_impl(x: torch.Tensor, impl: str | None, supported: bool = True) -> str:
    """"torch" or "triton" for a call on `x` (rules in the module docstring); a bad value of `impl` or
    of DGPLUG_KERNELS is an error naming it."""
    if impl is None:
        env = settings.switch(ENV_FORCE)
        if env != "auto":
            return env
        return "triton" if (x.is_cuda and HAS_TRITON and supported) else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be None, 'torch' or 'triton', got {impl!r}")
    return impl
