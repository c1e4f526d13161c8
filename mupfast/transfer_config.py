"""μTransfer: carry the best stable proxy configurations of a sweep to a target model's config.

``mupfast transfer --storage URL --study NAME --top-k K --target target.yaml --out DIR`` writes one
target config per selected trial (the top K stable trials by val loss, as ``mupfast sweep
--report`` ranks them) and prints the target's μP rules table.

What each written config gets (the Cerebras guide's table of what is μTransferable):

- ``model.mup_base_hidden_size`` / ``mup_base_filter_size`` ← the proxy's *base* dimensions
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

Not transferred — the target keeps its own: regularisation (``optim.weight_decay``,
``model.weight_decay_scaling``), clipping thresholds, and everything that defines the scale
(width, depth, heads, batch, steps, sequence length, data).

With K > 1 the K configs are the guide's intermediate-scale validation step: train each at a mid
size, and carry the best (again looking at its stability, not only its loss) to the full target.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import Config, ConfigError, config_from_dict, read_raw_config, validate
from mupfast.stability import Thresholds, TrialRow, collect, rank, space_names

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


def transferred_values(proxy: Config, params: dict[str, float], target: Config) -> dict[str, Any]:
    """Dotted key → value for the target: the trial's values, the proxy's base dims and settings."""
    from mupfast.sweep import SPACE_KEYS

    pm, tm = proxy.model, target.model
    if pm.parametrization == "sp":
        raise ConfigError("the proxy of this study is sp: μTransfer needs a mup or completep proxy")
    if tm.parametrization == "sp":
        raise ConfigError("--target: model.parametrization is sp; μTransfer needs mup or completep")
    values: dict[str, Any] = {
        "model.mup_base_hidden_size": pm.mup_base_hidden_size or pm.hidden_size,
        "model.mup_base_filter_size": pm.mup_base_filter_size or pm.filter_size,
    }
    if tm.parametrization == "completep" and pm.parametrization == "completep":
        values["model.mup_base_num_layers"] = pm.mup_base_num_layers or pm.num_layers
        values["model.depth_alpha"] = pm.depth_alpha
    values.update({f"model.{k}": getattr(pm, k) for k in MODEL_KEYS})
    values.update({f"optim.{k}": getattr(proxy.optim, k) for k in OPTIM_KEYS})
    values.update({f"schedule.{k}": getattr(proxy.schedule, k) for k in SCHEDULE_KEYS})
    ratio = target.train.steps / proxy.train.steps
    for k in SCHEDULE_STEP_KEYS:
        values[f"schedule.{k}"] = round(getattr(proxy.schedule, k) * ratio)
    for name, value in params.items():
        values[SPACE_KEYS[name]] = float(value)
    return values


def write_target_configs(
    study,
    *,
    top_k: int,
    target: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    th: Thresholds | None = None,
) -> list[Transferred]:
    """Write one target config per selected trial under ``out``; return what was written."""
    if top_k <= 0:
        raise ConfigError(f"--top-k: must be positive (got {top_k})")
    proxy_raw = study.user_attrs.get("proxy_config")
    if not proxy_raw:
        raise ConfigError(f"--study {study.study_name}: no proxy config stored (not a mupfast sweep?)")
    proxy = config_from_dict(proxy_raw)
    target_raw = read_raw_config(target, list(overrides or []), what="--target: config file")
    target_cfg = config_from_dict(target_raw)
    validate(target_cfg)

    top, _ = rank(collect(study, th or Thresholds()), top_k)
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
        values = transferred_values(proxy, row.params, target_cfg)
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
            f"# Kept from the target: {NOT_TRANSFERRED}.",
        ]
        path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
        written.append(Transferred(path, row, cfg, values))
    return written


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
    from mupfast.parametrization import format_table, rules_table
    from mupfast.stability import SHORT

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
    lines += [
        "",
        f"target rules table ({written[0].path.name}):",
        format_table(best.model, rules_table(best.model)),
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
