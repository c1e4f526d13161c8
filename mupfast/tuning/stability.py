"""Stability of a training run: the numbers the sweep stores with each trial, and the verdict on them.

The Cerebras μP guide's advice for picking proxy configurations: take the top ones by validation
loss, but look at the training dynamics too — a configuration with the lowest loss and a few loss
spikes or an exploding gradient norm loses to the second or third best one that trains smoothly.

Per run, from its ``metrics.jsonl`` (train records every ``train.log_every`` steps, and the events
of skipped non-finite steps):

- **loss spikes**: logged losses above ``spike_factor`` × the median of the previous ``window``
  logged losses (the running median; judged once ``min_history`` records exist);
- **peak grad-norm ratio**: the largest total (pre-clip) gradient norm — √Σ of the per-component
  norms — divided by the running median of the same window;
- **peak |logit|**: the largest ``max_abs_logit`` (the readout's logits after the μP multiplier);
- **non-finite steps**: steps the trainer skipped because the loss was NaN/inf.

A run is *stable* when it has no non-finite step, no loss spike and a peak grad-norm ratio within
``max_grad_ratio`` (and, if ``max_abs_logit`` is set, a peak |logit| within it). The sweep stores
these numbers in each trial's user attributes, so the report (:mod:`mupfast.tuning.sweep.report`)
needs the run directories only to re-count spikes under a different ``spike_factor``; "stable" is
re-judged from the stored peaks.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    spike_factor: float = 1.2
    """A logged loss above this × its running median is a spike."""
    window: int = 10
    """Running median over this many previous logged values."""
    min_history: int = 3
    """Judge a value only once this many earlier ones exist."""
    max_grad_ratio: float = 10.0
    """Peak (total grad norm / its running median) above this is unstable."""
    max_abs_logit: float | None = None
    """Peak |logit| above this is unstable (None: reported, not judged)."""


#: The thresholds the sweep judges by unless its report is given others.
DEFAULT_THRESHOLDS = Thresholds()


def running_ratios(values: list[float], window: int, min_history: int) -> list[float | None]:
    """value_t / median(finite values in the previous ``window``); None before ``min_history``."""
    out: list[float | None] = []
    for i, v in enumerate(values):
        hist = [x for x in values[max(0, i - window) : i] if math.isfinite(x)]
        med = statistics.median(hist) if len(hist) >= min_history else 0.0
        out.append(v / med if med > 0 and math.isfinite(v) else None)
    return out


def _finite_max(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return max(vals) if vals else None


def run_stability(records: list[dict], th: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """The stability numbers of one run from its metrics records (any kinds, in step order)."""
    train = [r for r in records if r.get("kind") == "train"]
    losses = [float(r.get("loss", math.nan)) for r in train]
    loss_ratios = running_ratios(losses, th.window, th.min_history)
    grad = []
    for r in train:
        norms = [v for k, v in r.items() if k.startswith("grad_norm/")]
        grad.append(math.sqrt(sum(v * v for v in norms)) if norms else math.nan)
    grad_ratios = running_ratios(grad, th.window, th.min_history)
    events = sum(1 for r in records if r.get("kind") == "event" and r.get("nonfinite_loss"))
    stab = {
        "train_records": len(train),
        "loss_spikes": sum(1 for x in loss_ratios if x is not None and x > th.spike_factor),
        "peak_loss_ratio": _finite_max(loss_ratios),
        "peak_grad_ratio": _finite_max(grad_ratios),
        "peak_abs_logit": _finite_max([r.get("max_abs_logit") for r in train]),
        "nonfinite_steps": events + sum(1 for v in losses if not math.isfinite(v)),
        "spike_factor": th.spike_factor,
        "final_train_loss": losses[-1] if losses and math.isfinite(losses[-1]) else None,
    }
    stab["stable"], stab["why"] = judge(stab, th)
    return stab


def judge(stab: dict[str, Any], th: Thresholds = DEFAULT_THRESHOLDS) -> tuple[bool, str]:
    """(stable, the reasons it is not) from a run's stored stability numbers."""
    why = []
    if stab.get("nonfinite_steps"):
        why.append(f"{stab['nonfinite_steps']} non-finite steps")
    peak = stab.get("peak_loss_ratio")
    if peak is not None and peak > th.spike_factor:
        n = stab.get("loss_spikes") if stab.get("spike_factor") == th.spike_factor else None
        why.append(
            f"{n if n else 'some'} loss spike{'s' if n != 1 else ''} (peak {peak:.2f}× running median)"
        )
    g = stab.get("peak_grad_ratio")
    if g is not None and g > th.max_grad_ratio:
        why.append(f"grad norm {g:.1f}× its running median")
    lg = stab.get("peak_abs_logit")
    if th.max_abs_logit is not None and lg is not None and lg > th.max_abs_logit:
        why.append(f"max |logit| {lg:.0f}")
    return not why, "; ".join(why)
