"""PBT's decisions as pure functions: the first hyperparameters, exploit's ranking, explore's moves.

Everything random here is seeded by (study seed, what, member or generation), so any worker that
computes a plan computes the same one, and a killed PBT re-run with the same study repeats it.

* :func:`initial_hparams`: member i's first values, drawn from the space (log-uniform where
  ``log``).
* :func:`make_plan`: after generation g, rank the members by the val loss at step (g+1)·K (failed
  ones — crashed, non-finite, no val loss — last); the bottom ``quantile`` and every failed member
  copy a random member of the top ``quantile`` (Ray Tune's ``quantile_fraction``), and
  :func:`explore` the copied values: each one is, with probability ``resample_p``, drawn afresh
  from the space, else multiplied or divided by ``perturb`` (clipped to the space's range).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

from mupfast.errors import ConfigError, TrainingError
from mupfast.tuning.pbt.schema import Segment
from mupfast.tuning.space import Range


def _seed(*parts: Any) -> int:
    from mupfast.tuning.sweep.sweep import hash_name

    return hash_name(":".join(map(str, parts)))


def draw(r: Range, rng: random.Random) -> float:
    if r.log:
        return math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
    return rng.uniform(r.low, r.high)


def initial_hparams(space: dict[str, Range], seed: int, population: int) -> list[dict[str, float]]:
    out = []
    for m in range(population):
        rng = random.Random(_seed(seed, "pbt-init", m))
        out.append({name: draw(space[name], rng) for name in sorted(space)})
    return out


def explore(
    values: dict[str, float],
    space: dict[str, Range],
    rng: random.Random,
    *,
    perturb: float,
    resample_p: float,
) -> tuple[dict[str, float], dict[str, str]]:
    """The perturbed copy of ``values`` and, per name, what was done (``×1.2``, ``÷1.2``, ``resample``)."""
    new, how = dict(values), {}
    for name in sorted(space):
        r = space[name]
        resample, up = rng.random() < resample_p, rng.random() < 0.5  # both drawn: the stream stays aligned
        if name not in values:
            continue
        if resample:
            new[name], how[name] = draw(r, rng), "resample"
        elif perturb == 1.0:
            how[name] = "kept"
        else:
            v = values[name] * perturb if up else values[name] / perturb
            new[name], how[name] = min(max(v, r.low), r.high), f"{'×' if up else '÷'}{perturb:g}"
    return new, how


def quantile_size(population: int, quantile: float) -> int:
    """Members in the top (and bottom) quantile: ⌈N·q⌉, at most N/2, at least 1 (as Ray Tune)."""
    return max(1, min(math.ceil(population * quantile - 1e-9), population // 2))


def make_plan(segs: list[Segment], settings: dict[str, Any], space: dict[str, Range]) -> dict[str, Any]:
    """The decision after one generation: the ranking and, unless it was the last, the moves."""
    g = segs[0].generation
    ok = sorted((s for s in segs if s.status == "ok"), key=lambda s: (s.val_loss, s.member))
    failed = sorted((s for s in segs if s.status != "ok"), key=lambda s: s.member)
    ranking = [s.member for s in ok] + [s.member for s in failed]
    vals = [s.val_loss for s in ok]
    plan: dict[str, Any] = {
        "generation": g,
        "step": (g + 1) * settings["interval"],
        "ranking": ranking,
        "val": {str(s.member): s.val_loss for s in ok},
        "failed": {str(s.member): s.status for s in failed},
        "best": ok[0].member if ok else None,
        "best_val": vals[0] if vals else None,
        "median_val": statistics.median(vals) if vals else None,
        "final": g + 1 >= settings["generations"],
        "moves": [],
    }
    if plan["final"]:
        return plan
    if not ok:
        raise TrainingError(
            f"pbt: every member failed in generation {g} (step {plan['step']}); nothing to exploit "
            "(see logs/ of the members; lower the space's lr range?)"
        )
    n = quantile_size(settings["population"], settings["quantile"])
    top = [s.member for s in ok[:n]]
    targets = sorted((set(ranking[-n:]) | {s.member for s in failed}) - set(top))
    by_member = {s.member: s for s in segs}
    rng = random.Random(_seed(settings["seed"], "pbt-explore", g))
    for t in targets:
        src = rng.choice(top)
        new, how = explore(
            by_member[src].hparams,
            space,
            rng,
            perturb=settings["perturb"],
            resample_p=settings["resample_p"],
        )
        plan["moves"].append(
            {
                "member": t,
                "source": src,
                "old": by_member[t].hparams,
                "source_hparams": by_member[src].hparams,
                "new": new,
                "explore": how,
                "why": by_member[t].status if by_member[t].status != "ok" else "bottom",
            }
        )
    return plan


def check_settings(s: dict[str, Any]) -> None:
    """One-line ConfigErrors for flags PBT cannot run with."""
    n, k, steps = s["population"], s["interval"], s["steps"]
    if n < 2:
        raise ConfigError(f"--population: must be at least 2 to exploit anything (got {n})")
    if steps <= 0:
        raise ConfigError(f"--steps: must be positive (got {steps})")
    if k <= 0:
        raise ConfigError(f"--interval: must be positive (got {k})")
    if k > steps:
        raise ConfigError(f"--interval: {k} is larger than --steps {steps}")
    if steps % k:
        raise ConfigError(
            f"--interval: {k} does not divide --steps {steps} (generations must end on the same step)"
        )
    if not 0.0 < s["quantile"] <= 0.5:
        raise ConfigError(f"--quantile: must be in (0, 0.5] (got {s['quantile']:g})")
    if not (math.isfinite(s["perturb"]) and s["perturb"] >= 1.0):
        raise ConfigError(
            f"--perturb: must be at least 1 (× or ÷ by it; 1 turns it off; got {s['perturb']:g})"
        )
    if not 0.0 <= s["resample_p"] <= 1.0:
        raise ConfigError(f"--resample-p: must be in [0, 1] (got {s['resample_p']:g})")


def ranked_lines(plan: dict[str, Any], names: list[str]) -> list[str]:
    """What a worker prints after a decision: the generation's best and median, then each move."""
    head = f"generation {plan['generation']} (step {plan['step']}): "
    if plan["best"] is None:
        head += "every member failed"
    else:
        head += f"best member {plan['best']} val {plan['best_val']:.4f}, median {plan['median_val']:.4f}"
    if plan["failed"]:
        head += f"; failed: {', '.join(f'{m} ({w})' for m, w in plan['failed'].items())}"
    lines = [head]
    for mv in plan["moves"]:
        how = ", ".join(f"{n} {mv['explore'][n]}" for n in names if n in mv["explore"])
        lines.append(f"  member {mv['member']} ← member {mv['source']} ({mv['why']}): exploit, then {how}")
    return lines
