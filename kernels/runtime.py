"""Facts about where the kernels run, shared by every kernel module.

``TRITON_INTERPRET=1`` must be set before Triton is imported (the flag is read when ``@triton.jit``
decorates); tests set it in ``tests/conftest.py`` when no GPU is present.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# FMA contraction (a·b + c with one rounding) on every launch, passed explicitly: Triton 3.9 contracts by
# default but warns that 3.10 will not. On is what every GPU tolerance in the kernel tests was measured with
# (and the interpreter, numpy, ignores the flag); it also rounds once where mul + add round twice, e.g. in the
# attention's exp2(s·scale − m) and the online-softmax rescaling. Under torch.compile, inductor drops launch
# options of user-defined kernels, so kernels it launches get Triton's default.
FP_FUSION = True
LAUNCH = {"enable_fp_fusion": FP_FUSION}


def autotune_configs(configs: list) -> list:
    """The interpreter cannot benchmark, so it gets exactly one configuration."""
    return configs[:1] if INTERPRET else configs


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True when Triton can run on these tensors: CUDA tensors, or CPU ones under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return all(t.is_cuda for t in tensors) or (INTERPRET and all(t.device.type == "cpu" for t in tensors))


# ------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """What the pruners need to know of a GPU: compute capability and dynamic shared memory per block."""

    capability: int
    smem: int  # bytes a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)


# The two the compile-target test builds for: A100 (sm_80) and H100/H200 (arch 90 compiles as sm_90a).
TARGETS = {"sm_80": Target(80, 166_912), "sm_90a": Target(90, 232_448)}
NO_LIMIT = Target(0, 1 << 30)  # the interpreter: any block fits


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major * 10 + props.minor, int(props.shared_memory_per_block_optin))


def device_target(t: torch.Tensor) -> Target:
    """The target a tensor's kernels run on (meta and CPU tensors: no limits)."""
    if t.device.type != "cuda":
        return NO_LIMIT
    return _cuda_target(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------- custom ops
def kernel_op(name: str):
    """Register a function of Triton launches as a PyTorch operator (``torch.library``), so torch.compile
    and non-reentrant activation checkpointing trace a call to it as one node, without a graph break.

    Where Triton compiles, this is ``torch.library.triton_op``: inductor sees the kernels (launched through
    ``torch.library.wrap_triton``) and schedules them itself. Under the interpreter it is an opaque
    ``torch.library.custom_op`` instead: ``triton_op`` traces its body with fake tensors, which interpreted
    kernels cannot take. Either way the caller registers a fake (meta) implementation and the autograd
    formula, and the op is called as ``torch.ops.<namespace>.<name>``.
    """
    if INTERPRET or not hasattr(torch.library, "triton_op"):  # triton_op: torch >= 2.6
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


# Inside a kernel_op, launch kernels as wrap_triton(kernel)[grid](...): traceable under triton_op, the plain
# kernel in eager mode and under the interpreter (and before torch 2.6, where custom_op is used anyway).
# Under the interpreter the ops are opaque custom_ops, never traced, so the kernel is returned as is: torch
# before 2.13 (e.g. the GPU image's 2.11) wraps an autotuned interpreted kernel in its tracing wrapper, which
# then fails for want of JIT metadata ('function' object has no attribute 'fn'), and refuses a plain one.
wrap_triton = (
    (lambda kernel: kernel) if INTERPRET else getattr(torch.library, "wrap_triton", lambda kernel: kernel)
)
