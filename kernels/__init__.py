"""Triton kernels of mupfast, imported as ``mupfast.kernels``.

This package imports nothing from the rest of mupfast. Each module holds its Triton kernels,
the launcher, the ``torch.autograd.Function`` and a plain-PyTorch reference of the same function.
"""
