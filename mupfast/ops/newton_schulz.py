"""Newton–Schulz under ``optim.newton_schulz_backend: auto`` on CUDA: per matrix shape and dtype, the fastest of
our symmetric-matmul Triton iteration (``newton_schulz_triton``), the torch iteration compiled by
``torch.compile`` and the same in eager torch, among those that orthogonalise within the iteration dtype's
tolerance of the fp64 iteration (:mod:`mupfast.ops.dispatch`; cache ``newton_schulz_backends.json``).
Off CUDA ``auto`` stays the eager torch iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mupfast.kernels.newton_schulz import NS_STEPS, newton_schulz_reference, newton_schulz_triton
from mupfast.ops import dispatch
from mupfast.ops.dispatch import Dispatcher

log = logging.getLogger(__name__)

CANDIDATES = ("triton", "torch_compile", "torch")
#: bf16's five iterations are ~2.5% from fp64's on random matrices (fp16 ~0.3%); a wrong step is > 10%.
TOLERANCE = {"bfloat16": 6e-2, "float16": 1e-2, "float32": 1e-4, "float64": 1e-9}
_COMPILED = None  # torch.compile(newton_schulz_reference), made at its first use


@dataclass(frozen=True)
class NSKey:
    shape: tuple[int, ...]
    dtype: str  # the input's
    iteration: str  # the dtype the iteration runs in
    steps: int

    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{self.dtype}-in-{self.iteration}-s{self.steps}"


def run_newton_schulz(backend: str, g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None):
    global _COMPILED
    if backend == "triton":
        return newton_schulz_triton(g, steps, dtype)
    if backend == "torch":
        return newton_schulz_reference(g, steps, dtype)
    if backend == "torch_compile":
        if _COMPILED is None:
            _COMPILED = torch.compile(newton_schulz_reference, dynamic=False)
        return _COMPILED(g, steps, dtype)
    raise ValueError(f"unknown newton_schulz backend {backend!r}; expected one of {CANDIDATES}")


def newton_schulz_auto(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Newton–Schulz by the candidate decided for g's shape and dtype (eager torch off CUDA)."""
    if not g.is_cuda:
        return newton_schulz_reference(g, steps, dtype)
    it = dtype or torch.bfloat16
    fast = (g.shape, g.dtype, it, steps, g.device)

    def key() -> NSKey:
        return NSKey(tuple(g.shape), dispatch.dtype_name(g.dtype), dispatch.dtype_name(it), steps)

    choice = _DEFAULT.pick(fast, key, check_candidate, time_candidate, g.device)
    return run_newton_schulz(choice, g, steps, it)


def _input(key: NSKey, device: torch.device) -> torch.Tensor:
    g = torch.randn(key.shape, generator=dispatch.generator(device), device=device)
    return g.to(getattr(torch, key.dtype))


def check_candidate(name: str, key: NSKey, *, device: torch.device | None = None) -> str | None:
    """None when ``name``'s result is within the iteration dtype's tolerance of the fp64 iteration."""
    device = device or dispatch._current_device()
    g = _input(key, device)
    with dispatch.measuring(device):
        got = run_newton_schulz(name, g, key.steps, getattr(torch, key.iteration))
    ref = newton_schulz_reference(g.double(), key.steps, torch.float64)
    return dispatch.mismatch({"u": got}, {"u": ref}, TOLERANCE[key.iteration])


def time_candidate(name: str, key: NSKey, *, device: torch.device | None = None) -> float:
    device = device or dispatch._current_device()
    g = _input(key, device)
    with dispatch.measuring(device):
        return dispatch.cuda_ms(
            lambda: run_newton_schulz(name, g, key.steps, getattr(torch, key.iteration)), device
        )


def environment_versions() -> dict[str, str]:
    return {
        **dispatch.base_versions(),
        "mupfast_newton_schulz_kernel": dispatch.source_hash("mupfast.kernels.newton_schulz"),
    }


_DEFAULT = Dispatcher(
    "newton_schulz", CANDIDATES, fallback="torch", versions_fn=environment_versions, logger=log
)


def default_dispatcher() -> Dispatcher:
    """The dispatcher ``newton_schulz_auto`` uses (one per process)."""
    return _DEFAULT
