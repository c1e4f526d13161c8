"""Autotuning of the attention kernels: candidate configs per GPU family and head dim, and the pruner that keeps
the ones that fit the launch's device.

Configs are (outer, inner, num_warps, num_stages): outer is the block a program owns (queries in the forward and
dQ, keys in dK/dV), inner the block its loop streams. Per GPU family for 16-bit inputs (80: A100 and other
pre-Hopper parts; 90: Hopper and later), one set for fp32 inputs, and per head-dim bucket (BLOCK_D up to 64,
128, 256). They come from compiling every candidate for sm_80 and sm_90a (``python -m mupfast.kernels.targets
--all-configs``) and keeping the ones that do not spill registers in 16-bit at the worst case (GQA 4 with
document masking): which tiles spill differs by target (sm_80 holds Q and the MMA operands in registers, sm_90a's
wgmma reads them from shared memory) and is not a simple function of the tile sizes. fp32 (IEEE dots on FMA
units, fp32 operands in registers, for checks rather than speed) gets small tiles per thread only.
tests/test_kernel_targets.py recompiles every kept config for both targets.
"""

from __future__ import annotations

import triton

from mupfast.kernels.runtime import autotune_configs, device_target

# What the interpreter runs (it gets one config): small enough to exercise several blocks at T ≤ 160.
_INTERPRETER_CONFIG = (64, 32, 4, 2)
FWD = {
    "fp32": {  # IEEE fp32 dots run on FMA units with fp32 operands in registers: only small tiles per thread
        64: [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2)],
        128: [(64, 32, 8, 2), (64, 16, 8, 2)],
        256: [(64, 16, 8, 2), (32, 16, 4, 2)],
    },
    90: {
        64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (64, 16, 8, 2)],
    },
    80: {
        # 128×64 at 4 warps left out: Triton 3.6 (the GPU image's) spills 16 B of it in 16-bit (3.8 does not)
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (64, 16, 8, 2)],
    },
}
DKDV = {
    "fp32": {
        64: [(64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2)],
        128: [(32, 32, 8, 2), (32, 16, 8, 2)],
        256: [(32, 16, 8, 2), (32, 16, 4, 2)],
    },
    90: {
        64: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
        128: [(64, 16, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],  # 32×16 at 4 warps: 16 B spilled at GQA 1
        256: [(32, 32, 8, 2), (32, 16, 8, 2)],
    },
    80: {
        64: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        128: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)],
        256: [(32, 32, 8, 2), (32, 16, 8, 2)],
    },
}
DQ = {
    "fp32": {
        64: [(64, 32, 8, 2), (64, 16, 8, 2)],
        128: [(64, 32, 8, 2), (64, 16, 8, 2)],
        256: [(64, 16, 8, 2), (32, 16, 4, 2)],
    },
    90: {
        64: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
        128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
        256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)],
    },
    80: {
        64: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
        # 128×32 at 8 warps left out: 28–36 B spilled with document masking (Triton 3.6 and 3.8)
        128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
        256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)],
    },
}


def _key(c: triton.Config, outer: str, inner: str) -> tuple:
    return c.kwargs[outer], c.kwargs[inner], c.num_warps, c.num_stages


def configs(outer: str, inner: str, tuned: dict) -> list[triton.Config]:
    """The interpreter's config, then every tuned one once (the pruner picks per target and head dim)."""
    seen = [_INTERPRETER_CONFIG]
    for c in (c for buckets in tuned.values() for lst in buckets.values() for c in lst):
        seen += [] if c in seen else [c]
    return autotune_configs(
        [triton.Config({outer: o, inner: i}, num_warps=w, num_stages=s) for o, i, w, s in seen]
    )


def shared_memory(elem: int, block_d: int, resident: int, outer: int, inner: int, stages: int) -> int:
    """Upper bound of a config's shared memory: ``resident`` outer×D tiles, num_stages pairs of streamed inner×D
    tiles and 16 bytes per streamed row and stage (lse, δ, document starts). Exact for sm_90a's forward, high by
    up to a quarter on sm_80, which keeps some operands in registers (compiled sizes, tests/test_kernel_targets)."""
    return elem * block_d * (resident * outer + 2 * stages * inner) + 16 * inner * stages


def pruner(outer: str, inner: str, resident: int, tuned: dict) -> dict:
    """Keep the configs that can run on the launch's target: on a GPU the ones tuned for its family and head-dim
    bucket whose shared memory fits the device (every variant keeps at least one); everywhere, the outer block a
    multiple of the inner one (the causal split relies on it) and not beyond T. ``target`` and ``strict`` (no
    fallback when nothing fits) are passed only by the compile-target tool; a launch reads Q's device."""

    def prune(configs, named_args, target=None, strict=False, **kwargs):
        args = {**named_args, **kwargs}
        target = target or device_target(args["Q"])
        bd, elem, t = args["BLOCK_D"], args["Q"].element_size(), triton.next_power_of_2(args["T"])
        listed = None
        if target.capability:
            family = tuned["fp32" if elem == 4 else 90 if target.capability >= 90 else 80]
            listed = family[min(b for b in family if b >= bd)]

        def smem(c):
            return shared_memory(elem, bd, resident, c.kwargs[outer], c.kwargs[inner], c.num_stages)

        def fits(c):
            o, i = c.kwargs[outer], c.kwargs[inner]
            tuned_here = listed is None or _key(c, outer, inner) in listed
            return tuned_here and o % i == 0 and o <= max(64, t) and smem(c) <= target.smem

        kept = [c for c in configs if fits(c)]
        return kept or ([] if strict else [min(configs, key=smem)])  # strict: the compile-target tool

    return {"early_config_prune": prune}
