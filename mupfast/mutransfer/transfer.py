"""μTransfer: carry the best stable proxy configurations of a sweep to a target model's config.

``mupfast transfer --storage URL --study NAME --top-k K --target target.yaml --out DIR`` writes one
target config per selected trial (the top K stable trials by val loss, as ``mupfast sweep
--report`` ranks them) and prints the target's μP rules table.

What each written config gets (the Cerebras guide's table of what is μTransferable):

- ``model.mup_base_hidden_size`` / ``mup_base_filter_size`` (/ ``mup_base_num_kv_heads`` with
  grouped-query attention) ← the proxy's *base* dimensions
  (its ``mup_base_*``, which default to its own hidden/filter size). The proxy was tuned at
  m = d_proxy / base; keeping the base makes every μP multiplier continue from there, so the
  target's hidden lr multiplier is the proxy's × d_proxy / d_target exactly. With ``completep``
  in both, ``mup_base_num_layers`` ← the proxy's base depth likewise.
- the swept hyperparameters — ``optim.lr``, ``model.init_std``, ``embeddings_scale``,
  ``output_logits_alpha``, ``attention_logits_alpha`` — at the trial's values, and the proxy's
  other optimisation and init settings they were tuned with: Adam β1, β2, ε, the constant init
  stds (``embedding_init_std``, ``output_init_std``, ``readout_zero_init``) and the μP conventions
  that give the alphas their meaning (``scale_qk_dot_by_d``, ``scale_output_logits_by_d``);
- the schedule's shape: its kind, floor and decay settings, with ``warmup_steps`` and
  ``cycle_steps`` rescaled to the same fraction of the target's ``train.steps``.

HyperP (``parametrization: hyperp`` in proxy and target): its one lr comes from the transfer rule
η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32, so the target is *rebased on the proxy*:
``optim.hyperp_base_lr`` ← the η the proxy trained with, ``hyperp_base_batch_tokens`` ← the proxy's
tokens per step, ``model.hyperp_base_depth`` ← its depth and ``hyperp_base_tokens`` ← its training
tokens. The target's η then follows from the rule at its own B, L and T:
η_target = η_proxy·√(B_t/B_p)·√(L_p/L_t)·(T_t/T_p)^-0.32. The sweep's ``lr`` is hyperp's tuned η0
(``optim.hyperp_base_lr``; optim.lr is unused under hyperp), which the proxy's own base values turn
into η_proxy; because the rule is a product of powers, rebasing gives the target the same η as
keeping the proxy's base values would, and its base values now name the scale η0 was tuned at.
``optim.muon_momentum`` travels with the other optimizer settings. B counts every rank's tokens:
``proxy_world_size`` / ``target_world_size`` (1: a CPU sweep trial is one process) say how many.

Not transferred — the target keeps its own: regularisation (``optim.weight_decay``,
``model.weight_decay_scaling``), clipping thresholds, and everything that defines the scale
(width, depth, heads, batch, steps, sequence length, data).

With K > 1 the K configs are the guide's intermediate-scale validation step: train each at a mid
size, and carry the best (again looking at its stability, not only its loss) to the full target.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import Config, config_from_dict, read_raw_config, with_overrides
from mupfast.config_validate import validate
from mupfast.errors import ConfigError
from mupfast.flags import parse_positive_int
from mupfast.mutransfer.report import (
    TrialRow,
    add_study_arguments,
    collect,
    rank,
    space_names,
    thresholds_from,
)
from mupfast.mutransfer.space import space_key
from mupfast.mutransfer.stability import DEFAULT_THRESHOLDS, Thresholds

MODEL_KEYS = (
    "init_std",
    "embeddings_scale",
    "output_logits_alpha",
    "attention_logits_alpha",
    "embedding_init_std",
    "output_init_std",
    "readout_zero_init",
    "scale_qk_dot_by_d",
    "scale_output_logits_by_d",
)
OPTIM_KEYS = ("lr", "beta1", "beta2", "eps")
HYPERP_OPTIM_KEYS = ("muon_momentum",)
SCHEDULE_KEYS = ("kind", "min_lr_ratio", "decay_fraction", "decay_shape", "cycle_peak_decay")
SCHEDULE_STEP_KEYS = ("warmup_steps", "cycle_steps")
NOT_TRANSFERRED = (
    "optim.weight_decay, model.weight_decay_scaling, clip.*, and the scale (width, depth, batch, steps, data)"
)


@dataclass
class Transferred:
    path: Path
    trial: TrialRow
    config: Config
    values: dict[str, Any]
    hyperp: dict[str, Any] | None = None  # hyperp: proxy η, target η and the rule's factors


def hyperp_rebase(
    proxy: Config, target: Config, *, proxy_world_size: int = 1, target_world_size: int = 1
) -> dict[str, Any]:
    """HyperP's transfer from a (trial-valued) proxy to a target: the target's base values, both ηs.

    Returns ``values`` (the dotted keys the target gets), ``proxy`` and ``target`` (each
    :func:`~mupfast.parametrization.hyperp_transfer` of the run, the target's after rebasing) and
    ``factors``: √(B/B0), √(d0/L), (T/T0)^-0.32 and their product, the target over the proxy.
    """
    from mupfast.parametrization import HYPERP_TOKEN_EXPONENT, hyperp_transfer

    p = hyperp_transfer(proxy, proxy_world_size)
    values = {
        "optim.hyperp_base_lr": p["lr"],
        "optim.hyperp_base_batch_tokens": int(p["batch_tokens"]),
        "optim.hyperp_base_tokens": float(p["tokens"]),
        "model.hyperp_base_depth": int(p["num_layers"]),
    }
    t = hyperp_transfer(with_overrides(target, values, check=False), target_world_size)
    factors = {
        "batch": math.sqrt(t["batch_tokens"] / p["batch_tokens"]),
        "depth": math.sqrt(p["num_layers"] / t["num_layers"]),
        "tokens": (t["tokens"] / p["tokens"]) ** HYPERP_TOKEN_EXPONENT,
    }
    factors["total"] = factors["batch"] * factors["depth"] * factors["tokens"]
    return {"values": values, "proxy": p, "target": t, "factors": factors}


def transferred_values(
    proxy: Config,
    params: dict[str, float],
    target: Config,
    *,
    proxy_world_size: int = 1,
    target_world_size: int = 1,
) -> dict[str, Any]:
    """Dotted key → value for the target: the trial's values, the proxy's base dims and settings.

    Under hyperp also ``"hyperp"`` → :func:`hyperp_rebase`'s report (not a config key).
    """
    pm, tm = proxy.model, target.model
    if (pm.parametrization == "hyperp") != (tm.parametrization == "hyperp"):
        raise ConfigError(
            f"--target: model.parametrization is {tm.parametrization} and the proxy's {pm.parametrization}; "
            "a hyperp lr (Muon on the sphere, η from its transfer rule) only transfers to hyperp"
        )
    if pm.parametrization == "sp":
        raise ConfigError("the proxy of this study is sp: μTransfer needs a mup or completep proxy")
    if tm.parametrization == "sp":
        raise ConfigError("--target: model.parametrization is sp; μTransfer needs mup, completep or hyperp")
    values: dict[str, Any] = {
        "model.mup_base_hidden_size": pm.mup_base_hidden_size or pm.hidden_size,
        "model.mup_base_filter_size": pm.mup_base_filter_size or pm.filter_size,
    }
    if pm.num_kv_heads is not None or tm.num_kv_heads is not None:  # GQA: whether k, v's fan-out grows
        values["model.mup_base_num_kv_heads"] = pm.mup_base_num_kv_heads or pm.kv_heads
    if tm.parametrization == "completep" and pm.parametrization == "completep":
        values["model.mup_base_num_layers"] = pm.mup_base_num_layers or pm.num_layers
        values["model.depth_alpha"] = pm.depth_alpha
    values.update({f"model.{k}": getattr(pm, k) for k in MODEL_KEYS})
    values.update({f"optim.{k}": getattr(proxy.optim, k) for k in OPTIM_KEYS})
    values.update({f"schedule.{k}": getattr(proxy.schedule, k) for k in SCHEDULE_KEYS})
    ratio = target.train.steps / proxy.train.steps
    for k in SCHEDULE_STEP_KEYS:
        values[f"schedule.{k}"] = round(getattr(proxy.schedule, k) * ratio)
    tuned = {space_key(name, proxy): float(value) for name, value in params.items()}
    if pm.parametrization == "hyperp":
        values.update({f"optim.{k}": getattr(proxy.optim, k) for k in HYPERP_OPTIM_KEYS})
        values.update(tuned)
        rebase = hyperp_rebase(
            with_overrides(proxy, tuned, check=False),
            target,
            proxy_world_size=proxy_world_size,
            target_world_size=target_world_size,
        )
        values.update(rebase["values"])
        values["hyperp"] = rebase
        return values
    values.update(tuned)
    return values


def write_target_configs(
    study,
    *,
    top_k: int,
    target: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    th: Thresholds | None = None,
    proxy_world_size: int = 1,
    target_world_size: int = 1,
) -> list[Transferred]:
    """Write one target config per selected trial under ``out``; return what was written.

    The world sizes matter under hyperp only (its B counts every rank's tokens).
    """
    if top_k <= 0:
        raise ConfigError(f"--top-k: must be positive (got {top_k})")
    proxy_raw = study.user_attrs.get("proxy_config")
    if not proxy_raw:
        raise ConfigError(f"--study {study.study_name}: no proxy config stored (not a mupfast sweep?)")
    proxy = config_from_dict(proxy_raw)
    target_raw = read_raw_config(target, list(overrides or []), what="--target: config file")
    target_cfg = config_from_dict(target_raw)
    validate(target_cfg)

    top, _ = rank(collect(study, th or DEFAULT_THRESHOLDS), top_k)
    if not top:
        raise ConfigError(
            f"--study {study.study_name}: no complete stable trial to transfer (see sweep --report)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(target).stem
    base_run_dir = target_cfg.train.run_dir.rstrip("/")
    written = []
    for i, row in enumerate(top, 1):
        values = transferred_values(
            proxy,
            row.params,
            target_cfg,
            proxy_world_size=proxy_world_size,
            target_world_size=target_world_size,
        )
        hyperp = values.pop("hyperp", None)
        raw = copy.deepcopy(target_raw)
        for key, value in values.items():
            section, field = key.split(".")
            if value is None and getattr(getattr(target_cfg, section), field) is None:
                continue  # both at the default: nothing to write
            raw.setdefault(section, {})[field] = value
        raw.setdefault("train", {})["run_dir"] = f"{base_run_dir}-trial{row.number:04d}"
        cfg = config_from_dict(raw)
        validate(cfg)
        path = out / f"{stem}-top{i}-trial{row.number:04d}.yaml"
        header = [
            f"# μTransferred from study {study.study_name!r}, trial {row.number} (rank {i} of the stable trials,",
            f"# proxy val loss {row.value:.4f}; proxy d={proxy.model.hidden_size} d_ff={proxy.model.filter_size}"
            f" → target d={cfg.model.hidden_size} d_ff={cfg.model.filter_size}).",
            "# Transferred:",
            *_wrap([f"{k}={_short(v)}" for k, v in values.items()]),
            *(["# " + line for line in hyperp_lines(hyperp)] if hyperp else []),
            f"# Kept from the target: {NOT_TRANSFERRED}.",
        ]
        path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
        written.append(Transferred(path, row, cfg, values, hyperp))
    return written


def hyperp_lines(h: dict[str, Any]) -> list[str]:
    """HyperP's transfer in three lines: proxy η, the factors, target η."""
    p, t, f = h["proxy"], h["target"], h["factors"]
    return [
        f"HyperP rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^{t['token_exponent']:g}, rebased on the proxy"
        f" (B0={t['base_batch_tokens']:g}, d0={t['base_depth']}, T0={t['base_tokens']:g}):",
        f"  proxy  η = {p['lr']:.6g}  (η0={p['base_lr']:.6g} at B={p['batch_tokens']:g}, L={p['num_layers']},"
        f" T={p['tokens']:g}, world size {p['world_size']})",
        f"  target η = {t['lr']:.6g} = proxy η × √(B/B0) {f['batch']:.4g} × √(d0/L) {f['depth']:.4g}"
        f" × (T/T0)^-0.32 {f['tokens']:.4g} = × {f['total']:.4g}"
        f"  (B={t['batch_tokens']:g}, L={t['num_layers']}, T={t['tokens']:g}, world size {t['world_size']})",
    ]


def _wrap(items: list[str], width: int = 96) -> list[str]:
    lines, line = [], "#  "
    for item in items:
        if len(line) + len(item) + 1 > width and line.strip("# "):
            lines.append(line.rstrip())
            line = "#  "
        line += " " + item
    return [*lines, line.rstrip()]


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary(study, written: list[Transferred]) -> str:
    """What ``mupfast transfer`` prints: the configs, the best one's rules table, the next step."""
    from mupfast.explain import format_table, rules_table
    from mupfast.mutransfer.report import SHORT

    names = space_names(study)
    lines = [
        f"{'rank':>4} {'trial':>5} {'proxy val':>9}"
        + "".join(f" {SHORT.get(n, n):>10}" for n in names)
        + "  config"
    ]
    for i, w in enumerate(written, 1):
        lines.append(
            f"{i:>4} {w.trial.number:>5} {w.trial.value:>9.4f}"
            + "".join(f" {w.trial.params.get(n, float('nan')):>10.3g}" for n in names)
            + f"  {w.path}"
        )
    best = written[0].config
    if written[0].hyperp:
        lines += ["", *hyperp_lines(written[0].hyperp)]
    lines += [
        "",
        f"target rules table ({written[0].path.name}):",
        format_table(best.model, rules_table(best.model), best),
    ]
    lines.append("")
    if len(written) > 1:
        lines.append(
            f"next: train the {len(written)} configs at this (intermediate) size and keep the best stable one:"
        )
        lines += [f"  mupfast train --config {w.path}" for w in written]
    else:
        lines.append(f"next: mupfast train --config {written[0].path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_study_arguments(parser)
    parser.add_argument("--target", help="the target model's YAML config (or --config)")
    parser.add_argument("--out", help="directory of the written configs (default runs/transfer/<study>)")
    parser.add_argument(
        "--proxy-world-size", default="1", help="hyperp: ranks of each proxy trial (default %(default)s)"
    )
    parser.add_argument(
        "--target-world-size", default="1", help="hyperp: ranks the target trains on (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """The ``transfer`` verb: write the target configs of the study's best stable trials, and say so."""
    from mupfast.mutransfer.storage import default_storage, load_study

    if not args.study:
        raise ConfigError("transfer: --study NAME is required")
    target = args.target or args.config
    if not target:
        raise ConfigError("transfer: --target FILE (the target model's config) is required")
    study = load_study(args.storage or default_storage(args.study), args.study)
    written = write_target_configs(
        study,
        top_k=1 if args.top_k is None else args.top_k,
        target=target,
        out=args.out or f"runs/transfer/{args.study}",
        overrides=args.overrides,
        th=thresholds_from(args),
        proxy_world_size=parse_positive_int(args.proxy_world_size, "--proxy-world-size"),
        target_world_size=parse_positive_int(args.target_world_size, "--target-world-size"),
    )
    print(summary(study, written))
    return 0
