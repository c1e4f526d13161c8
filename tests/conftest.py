"""Test-wide setup. Runs before any test module imports Triton."""

import os

import torch  # imports no Triton kernel

# Without a GPU, Triton kernels run under the interpreter (the flag is read at @triton.jit time, so it
# must be set before any kernel module is imported) and DeepSpeed runs on its CPU accelerator. With
# one, both stay on the GPU: a device node without a usable CUDA (a driver mismatch) counts as none.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny models and matmuls: one intra-op thread is several times faster than two on a shared
    2-core machine (no OpenMP threads spinning against other jobs)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
