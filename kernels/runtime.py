"""Facts about where the kernels run, shared by every kernel module.

``TRITON_INTERPRET=1`` must be set before Triton is imported (the flag is read when ``@triton.jit``
decorates); tests set it in ``tests/conftest.py`` when no GPU is present.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
