"""Learning-rate schedules: pure functions from the optimizer step to a multiplier.

Schedules multiply, never overwrite: group ``g`` uses ``lr · schedule(t) · lr_mult[g]`` at step ``t``,
so the μP ratios between groups survive every schedule, resume and DeepSpeed reload. Kinds: constant,
cosine, WSD (warmup-stable-decay), cyclic cosine and cyclic WSD, each times an optional piecewise
multiplier (a PBT schedule, replayed). ``t`` is the 0-based optimizer step; warmup follows nanoGPT
(``peak · (t+1)/(W+1)``) or, with ``warmup_from_zero``, torch's LinearLR (``peak · t/W``); decays reach their floor at ``t = total_steps``, and a WSD run resumed in
its stable phase with a larger ``total_steps`` simply trains longer. docs/mup.md ("Schedules, exactly")
gives every convention.

Use :func:`build_schedule` with a :class:`~mupfast.config.ScheduleConfig`; :class:`GroupLR`
applies the result to an optimizer's groups through their ``lr_mult``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from mupfast.config.schema import ScheduleConfig

KINDS = ("constant", "cosine", "wsd", "cyclic_cosine", "cyclic_wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


# ----------------------------------------------------------------------------------------------
# Building blocks (no validation; the public functions below check their arguments)


def _warmup(t: int, warmup_steps: int, peak: float, from_zero: bool = False) -> float:
    return peak * t / warmup_steps if from_zero else peak * (t + 1) / (warmup_steps + 1)


def _cosine_cycle(
    tau: int, n: int, warmup_steps: int, peak: float, floor: float, from_zero: bool = False
) -> float:
    """One warmup + cosine cycle of n steps at local step tau ∈ [0, n]."""
    if tau < warmup_steps:
        return _warmup(tau, warmup_steps, peak, from_zero)
    p = (tau - warmup_steps) / (n - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def decay_steps(n: int, decay_fraction: float) -> int:
    """Steps of the WSD decay in an n-step run or cycle: round(decay_fraction · n), halves up."""
    return int(math.floor(decay_fraction * n + 0.5))


def _wsd_cycle(
    tau: int,
    n: int,
    warmup_steps: int,
    decay_fraction: float,
    shape: str,
    peak: float,
    floor: float,
    from_zero: bool = False,
) -> float:
    """One warmup + stable + decay cycle of n steps at local step tau ∈ [0, n]."""
    if tau < warmup_steps:
        return _warmup(tau, warmup_steps, peak, from_zero)
    d = decay_steps(n, decay_fraction)
    start = n - d
    if tau <= start:
        return peak
    p = (tau - start) / d
    if shape == "linear":
        f = 1.0 - p
    elif shape == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    else:  # sqrt
        f = 1.0 - math.sqrt(p)
    return floor + (peak - floor) * f


def _cyclic(t: int, total_steps: int, cycle_steps: int, peak_decay: float, floor: float, cycle) -> float:
    n = cycle_steps or total_steps
    if t < total_steps:
        k, tau = divmod(t, n)
    else:  # hold the value at total_steps: the end (tau = n) of the last, possibly partial, cycle
        k = (total_steps - 1) // n
        tau = total_steps - k * n
    return cycle(tau, n, max(peak_decay**k, floor))


# ----------------------------------------------------------------------------------------------
# Validation


def _check(t: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
    if t < 0:
        raise ValueError(f"schedule step must be non-negative (got {t})")
    if total_steps < 1:
        raise ValueError(f"schedule total_steps must be positive (got {total_steps})")
    if warmup_steps < 0:
        raise ValueError(f"schedule warmup_steps must be non-negative (got {warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"schedule min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")


def _check_cycle(kind: str, n: int, warmup_steps: int, what: str) -> None:
    if warmup_steps >= n:
        raise ValueError(f"{kind}: warmup_steps ({warmup_steps}) must be smaller than {what} ({n})")


def _check_wsd(kind: str, n: int, warmup_steps: int, decay_fraction: float, shape: str, what: str) -> None:
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"{kind}: decay_fraction must be in [0, 1] (got {decay_fraction})")
    if shape not in DECAY_SHAPES:
        raise ValueError(f"{kind}: decay_shape must be one of {', '.join(DECAY_SHAPES)} (got {shape!r})")
    d = decay_steps(n, decay_fraction)
    if warmup_steps > n - d:
        raise ValueError(
            f"{kind}: warmup_steps ({warmup_steps}) overlaps the decay: {what} ({n}) × "
            f"decay_fraction ({decay_fraction}) = {d} decay steps leave only {n - d} before it"
        )


def _check_cycle_steps(kind: str, cycle_steps: int, peak_decay: float) -> None:
    if cycle_steps < 0:
        raise ValueError(f"{kind}: cycle_steps must be non-negative (got {cycle_steps})")
    if not 0.0 < peak_decay <= 1.0:
        raise ValueError(f"{kind}: cycle_peak_decay must be in (0, 1] (got {peak_decay})")


# ----------------------------------------------------------------------------------------------
# Public pure functions


def constant(t: int, *, total_steps: int, warmup_steps: int = 0, warmup_from_zero: bool = False) -> float:
    """Linear warmup to 1 (reached at t = warmup_steps), then 1."""
    _check(t, total_steps, warmup_steps)
    _check_cycle("constant", total_steps, warmup_steps, "total_steps")
    t = min(t, total_steps)
    return _warmup(t, warmup_steps, 1.0, warmup_from_zero) if t < warmup_steps else 1.0


def warmup_cosine(
    t: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    warmup_from_zero: bool = False,
) -> float:
    """Linear warmup to 1 at t = warmup_steps, then cosine down to min_lr_ratio at t = total_steps."""
    _check(t, total_steps, warmup_steps, min_lr_ratio)
    _check_cycle("cosine", total_steps, warmup_steps, "total_steps")
    return _cosine_cycle(min(t, total_steps), total_steps, warmup_steps, 1.0, min_lr_ratio, warmup_from_zero)


def wsd(
    t: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
    min_lr_ratio: float = 0.1,
    warmup_from_zero: bool = False,
) -> float:
    """Warmup, stable at 1, then decay over the last decay_fraction of total_steps to min_lr_ratio."""
    _check(t, total_steps, warmup_steps, min_lr_ratio)
    _check_cycle("wsd", total_steps, warmup_steps, "total_steps")
    _check_wsd("wsd", total_steps, warmup_steps, decay_fraction, decay_shape, "total_steps")
    t = min(t, total_steps)
    return _wsd_cycle(
        t, total_steps, warmup_steps, decay_fraction, decay_shape, 1.0, min_lr_ratio, warmup_from_zero
    )


def cyclic_cosine(
    t: int,
    *,
    total_steps: int,
    cycle_steps: int = 0,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    cycle_peak_decay: float = 1.0,
    warmup_from_zero: bool = False,
) -> float:
    """Cycles of cycle_steps steps (0: total_steps), each a warmup + cosine with peak cycle_peak_decay**k."""
    _check(t, total_steps, warmup_steps, min_lr_ratio)
    _check_cycle_steps("cyclic_cosine", cycle_steps, cycle_peak_decay)
    _check_cycle("cyclic_cosine", cycle_steps or total_steps, warmup_steps, "cycle_steps")
    return _cyclic(
        t,
        total_steps,
        cycle_steps,
        cycle_peak_decay,
        min_lr_ratio,
        lambda tau, n, peak: _cosine_cycle(tau, n, warmup_steps, peak, min_lr_ratio, warmup_from_zero),
    )


def cyclic_wsd(
    t: int,
    *,
    total_steps: int,
    cycle_steps: int = 0,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
    min_lr_ratio: float = 0.1,
    cycle_peak_decay: float = 1.0,
    warmup_from_zero: bool = False,
) -> float:
    """Cycles of cycle_steps steps (0: total_steps), each a WSD cycle with peak cycle_peak_decay**k."""
    _check(t, total_steps, warmup_steps, min_lr_ratio)
    _check_cycle_steps("cyclic_wsd", cycle_steps, cycle_peak_decay)
    n = cycle_steps or total_steps
    _check_cycle("cyclic_wsd", n, warmup_steps, "cycle_steps")
    _check_wsd("cyclic_wsd", n, warmup_steps, decay_fraction, decay_shape, "cycle_steps")
    return _cyclic(
        t,
        total_steps,
        cycle_steps,
        cycle_peak_decay,
        min_lr_ratio,
        lambda tau, n, peak: _wsd_cycle(
            tau, n, warmup_steps, decay_fraction, decay_shape, peak, min_lr_ratio, warmup_from_zero
        ),
    )


# ----------------------------------------------------------------------------------------------
# From the config


def piecewise_starts(pieces: list[list[float]], total_steps: int) -> list[tuple[int, float]]:
    """(first step, multiplier) of each piece in a run of ``total_steps`` steps; ValueError on bad pieces."""
    starts: list[tuple[int, float]] = []
    for i, piece in enumerate(pieces):
        if len(piece) != 2:
            raise ValueError(f"piecewise[{i}]: expected [fraction, multiplier] (got {piece!r})")
        fraction, mult = (float(v) for v in piece)
        if i == 0 and fraction != 0.0:
            raise ValueError(f"piecewise[0]: the first piece starts at fraction 0.0 (got {fraction:g})")
        if i > 0 and fraction <= pieces[i - 1][0]:
            raise ValueError(
                f"piecewise[{i}]: fractions must increase (got {fraction:g} after {pieces[i - 1][0]:g})"
            )
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"piecewise[{i}]: fraction must be in [0, 1) (got {fraction:g})")
        if not (math.isfinite(mult) and mult > 0):
            raise ValueError(f"piecewise[{i}]: multiplier must be positive (got {mult:g})")
        starts.append((int(math.floor(fraction * total_steps + 0.5)), mult))
    return starts


def _piecewise(fn: Callable[[int], float], starts: list[tuple[int, float]]) -> Callable[[int], float]:
    def schedule(t: int) -> float:
        mult = 1.0
        for start, m in starts:
            if t < start:
                break
            mult = m
        return fn(t) * mult

    return schedule


def build_schedule(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier at optimizer step t (0-based: the multiplier used for the update of step t).

    Arguments are checked here, once, with a ValueError naming the values. The returned object is
    a plain function (so a scheduler's state_dict does not save it and a resumed run may change
    ``total_steps``, e.g. to extend a WSD run from its stable phase).
    """
    fields = {"total_steps": total_steps, "warmup_steps": cfg.warmup_steps}
    if cfg.warmup_from_zero:
        fields["warmup_from_zero"] = True
    if cfg.kind == "constant":
        fn, kwargs = constant, fields
    elif cfg.kind == "cosine":
        fn, kwargs = warmup_cosine, {**fields, "min_lr_ratio": cfg.min_lr_ratio}
    elif cfg.kind in ("wsd", "cyclic_wsd"):
        fn = wsd if cfg.kind == "wsd" else cyclic_wsd
        kwargs = {
            **fields,
            "decay_fraction": cfg.decay_fraction,
            "decay_shape": cfg.decay_shape,
            "min_lr_ratio": cfg.min_lr_ratio,
        }
    elif cfg.kind == "cyclic_cosine":
        fn, kwargs = cyclic_cosine, {**fields, "min_lr_ratio": cfg.min_lr_ratio}
    else:
        raise ValueError(f"schedule kind must be one of {', '.join(KINDS)} (got {cfg.kind!r})")
    if cfg.kind.startswith("cyclic"):
        kwargs.update(cycle_steps=cfg.cycle_steps, cycle_peak_decay=cfg.cycle_peak_decay)
    fn(0, **kwargs)  # validate now rather than at the first step

    def shape(t: int) -> float:
        return fn(t, **kwargs)

    schedule = _piecewise(shape, piecewise_starts(cfg.piecewise, total_steps)) if cfg.piecewise else shape
    schedule.__name__ = schedule.__qualname__ = cfg.kind + ("+piecewise" if cfg.piecewise else "")
    pieces = f", piecewise={cfg.piecewise}" if cfg.piecewise else ""
    schedule.__doc__ = f"{cfg.kind}({', '.join(f'{k}={v}' for k, v in kwargs.items())}{pieces})"
    return schedule


class GroupLR:
    """Scheduler that sets every group's lr to ``base_lr · fn(t) · group["lr_mult"]`` each step.

    Only the step counter is state: the lrs are recomputed from the μP multipliers every time, so
    neither a reload of saved ``param_groups`` (DeepSpeed loads the optimizer state before or after
    the scheduler) nor a changed base lr or ``total_steps`` on resume can leave a stale lr behind.
    DeepSpeed calls ``step()`` at each accumulation boundary, so update ``t`` uses ``fn(t)``.
    """

    def __init__(self, optimizer: Optimizer, base_lr: float, fn: Callable[[int], float], last_step: int = 0):
        self.optimizer, self.base_lr, self.fn = optimizer, base_lr, fn
        self.last_step = last_step
        self.apply()

    def apply(self) -> None:
        factor = self.fn(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * factor * g["lr_mult"]

    def step(self) -> None:
        self.last_step += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.apply()
