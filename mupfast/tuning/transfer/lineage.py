"""``mupfast transfer --pbt STUDY --target CONFIG``: a target config that replays a PBT lineage.

The best member's lineage (:func:`~mupfast.tuning.pbt.report.lineage`) gives the target its first
lr (carried as a sweep's lr is, :func:`~mupfast.tuning.transfer.values.transfer_to`), a
``schedule.piecewise`` of its lr per generation relative to the first, from the same fraction of
training, and the final values of the other explored hyperparameters (forward multipliers are not
replayed as schedules); the written config says so in its header. docs/pbt.md has the details.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import config_from_dict, read_raw_config
from mupfast.config.validate import validate
from mupfast.errors import ConfigError


def pbt_target_config(
    store,
    target: str | Path,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    fits: tuple[str | None, str | None] = (None, None),
) -> tuple[Path, Any, dict[str, Any], dict[str, Any]]:
    """Write the target config; return (path, config, the transferred values, the lineage).

    ``fits``: a horizon-test and a batch-test result whose exponents the AdamW rule uses."""
    from mupfast.tuning.pbt.report import lineage
    from mupfast.tuning.transfer.fits import exponents_from
    from mupfast.tuning.transfer.values import (
        NOT_TRANSFERRED,
        short_value,
        transfer_to,
        wrap_items,
        write_values,
    )

    row = store.study_row()
    if row is None:
        raise ConfigError(f"--pbt: no PBT study {store.study!r} in {store.url}")
    proxy = config_from_dict(row["proxy_config"])
    lin = lineage(store)
    if not lin["complete"]:
        raise ConfigError(
            f"--pbt {store.study}: the study is at generation {row['generation']} of {lin['generations']}; "
            "finish it (run the same mupfast pbt again) before transferring its schedule"
        )
    if proxy.schedule.piecewise:
        raise ConfigError(
            f"--pbt {store.study}: the proxy already had a schedule.piecewise; there is no one lineage lr to replay"
        )
    first, final = lin["lineage"][0]["hparams"], lin["final_hparams"]
    params = {**final, **({"lr": first["lr"]} if "lr" in first else {})}
    target_raw = read_raw_config(target, list(overrides or []), what="--target: config file")
    target_cfg = config_from_dict(target_raw)
    validate(target_cfg)
    exponents, used = exponents_from(*fits, proxy)
    t = transfer_to(proxy, params, target_cfg, exponents=exponents)
    values, rule = t.values, [*used, *t.lines()]
    values["schedule.piecewise"] = [[float(f), float(m)] for f, m in lin.get("piecewise", [])]
    raw = write_values(copy.deepcopy(target_raw), values, target_cfg)
    raw.setdefault("train", {})["run_dir"] = f"{target_cfg.train.run_dir.rstrip('/')}-pbt-{store.study}"
    cfg = config_from_dict(raw)
    validate(cfg)

    stem = Path(target).stem
    out = Path(out) if out is not None else Path("runs/transfer") / store.study
    path = out if out.suffix in (".yaml", ".yml") else out / f"{stem}-pbt-{store.study}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    members = [e["member"] for e in lin["lineage"]]
    later = sorted(k for k in final if k != "lr")
    header = [
        f"# PBT-transferred from study {store.study!r}: best member {lin['best_member']} (proxy val loss "
        f"{lin['best_val']:.4f} at step {lin['best_step']}), lineage of members {members};",
        f"# proxy d={proxy.model.hidden_size} d_ff={proxy.model.filter_size} → target d={cfg.model.hidden_size}"
        f" d_ff={cfg.model.filter_size}, {lin['steps']} proxy steps → {cfg.train.steps} target steps.",
        "# optim.lr is the lineage's first lr (μP's width rules apply to it through lr_mult); schedule.piecewise",
        "# replays the lineage's lr per generation divided by it, from the same fraction of training.",
    ]
    if later:
        header.append(
            f"# {', '.join(later)}: the lineage's FINAL values (they are not replayed as schedules)."
        )
    header += [
        "# Transferred:",
        *wrap_items([f"{k}={short_value(v)}" for k, v in values.items() if k != "schedule.piecewise"]),
        *("# " + line for line in rule),
        f"# Kept from the target: {NOT_TRANSFERRED}.",
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
    return path, cfg, values, lin


def run_pbt_transfer(args, target: str) -> int:
    """``transfer --pbt``: write the config and say what it holds."""
    from mupfast.explain import format_table, rules_table
    from mupfast.tuning.pbt.schema import default_pbt_storage
    from mupfast.tuning.pbt.store import PbtStore

    store = PbtStore(args.storage or default_pbt_storage(args.pbt), args.pbt, must_exist=True)
    fits = (args.horizon_fit, args.batch_fit)
    path, cfg, values, lin = pbt_target_config(store, target, args.out, args.overrides, fits)
    pieces = (
        "  ".join(f"{f:.3g}:×{m:.3g}" for f, m in values["schedule.piecewise"]) or "none (lr not explored)"
    )
    print(f"wrote {path}")
    print(f"lr {cfg.optim.lr:.4g} (the lineage's first), piecewise multipliers {pieces}")
    print(f"target rules table ({path.name}):")
    print(format_table(cfg.model, rules_table(cfg.model), cfg))
    print(f"next: mupfast train --config {path}")
    return 0
