"""Test-wide setup. Runs before any test module imports Triton."""

import os

# Without a GPU, Triton kernels run under the interpreter; the flag is read at @triton.jit time,
# so it must be set before any kernel module is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
