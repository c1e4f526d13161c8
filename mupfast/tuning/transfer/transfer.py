"""``mupfast transfer``: carry the best stable proxy configurations of a sweep to a target config.

``mupfast transfer --storage URL --study NAME --top-k K --target target.yaml --out DIR`` writes one
target config per selected trial (the top K stable trials by val loss, as ``mupfast sweep
--report`` ranks them), each with a header saying what it carries, and prints the target's μP rules
table; ``--pbt STUDY`` replays a PBT lineage instead (:mod:`~mupfast.tuning.transfer.lineage`). What is
carried and how is decided in one place, :func:`~mupfast.tuning.transfer.values.transfer_to`;
docs/mutransfer.md says what and why (the Cerebras guide's table of what is μTransferable, and
HyperP's rule, under which the target is rebased on the proxy).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import Config, config_from_dict, read_raw_config
from mupfast.config.validate import validate
from mupfast.errors import ConfigError
from mupfast.flags import parse_positive_int
from mupfast.tuning.stability import DEFAULT_THRESHOLDS, Thresholds
from mupfast.tuning.sweep.report import (
    TrialRow,
    add_study_arguments,
    collect,
    rank,
    space_names,
    thresholds_from,
)
from mupfast.tuning.transfer.fits import exponents_from
from mupfast.tuning.transfer.values import (
    NOT_TRANSFERRED,
    short_value,
    transfer_to,
    wrap_items,
    write_values,
)


@dataclass
class Transferred:
    path: Path
    trial: TrialRow
    config: Config
    values: dict[str, Any]
    rule: list[str]  # how the lr got to the target's batch and horizon (HyperP's rule, or AdamW's)


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
    horizon_fit: str | None = None,
    batch_fit: str | None = None,
) -> list[Transferred]:
    """Write one target config per selected trial under ``out``; return what was written.

    The world sizes give B, every rank's tokens per step; ``horizon_fit`` / ``batch_fit`` are
    horizon-test / batch-test result files whose fitted α / β the AdamW parametrizations' rule uses.
    """
    if top_k <= 0:
        raise ConfigError(f"--top-k: must be positive (got {top_k})")
    proxy_raw = study.user_attrs.get("proxy_config")
    if not proxy_raw:
        raise ConfigError(f"--study {study.study_name}: no proxy config stored (not a mupfast sweep?)")
    proxy = config_from_dict(proxy_raw)
    exponents, used = exponents_from(horizon_fit, batch_fit, proxy)
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
        t = transfer_to(
            proxy,
            row.params,
            target_cfg,
            proxy_world_size=proxy_world_size,
            target_world_size=target_world_size,
            exponents=exponents,
        )
        values, rule = t.values, [*used, *t.lines()]
        raw = write_values(copy.deepcopy(target_raw), values, target_cfg)
        raw.setdefault("train", {})["run_dir"] = f"{base_run_dir}-trial{row.number:04d}"
        cfg = config_from_dict(raw)
        validate(cfg)
        path = out / f"{stem}-top{i}-trial{row.number:04d}.yaml"
        header = [
            f"# μTransferred from study {study.study_name!r}, trial {row.number} (rank {i} of the stable trials,",
            f"# proxy val loss {row.value:.4f}; proxy d={proxy.model.hidden_size} d_ff={proxy.model.filter_size}"
            f" → target d={cfg.model.hidden_size} d_ff={cfg.model.filter_size}).",
            "# Transferred:",
            *wrap_items([f"{k}={short_value(v)}" for k, v in values.items()]),
            *("# " + line for line in rule),
            f"# Kept from the target: {NOT_TRANSFERRED}.",
        ]
        path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
        written.append(Transferred(path, row, cfg, values, rule))
    return written


def summary(study, written: list[Transferred]) -> str:
    """What ``mupfast transfer`` prints: the configs, the best one's rules table, the next step."""
    from mupfast.explain import format_table, rules_table
    from mupfast.tuning.sweep.report import SHORT

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
    if written[0].rule:
        lines += ["", *written[0].rule]
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
    parser.add_argument(
        "--out",
        help="directory of the written configs (default runs/transfer/<study>); with --pbt also a .yaml file",
    )
    parser.add_argument(
        "--pbt",
        metavar="STUDY",
        help="replay a PBT study's best lineage instead (lr schedule; --storage: its database)",
    )
    parser.add_argument(
        "--proxy-world-size",
        default="1",
        help="ranks of each proxy trial: B counts theirs (default %(default)s)",
    )
    parser.add_argument(
        "--target-world-size",
        default="1",
        help="ranks the target trains on, for the printed lr (default %(default)s)",
    )
    parser.add_argument(
        "--horizon-fit",
        metavar="RESULT.json",
        help="a `horizon-test` result: its fitted α carries the lr to T",
    )
    parser.add_argument(
        "--batch-fit", metavar="RESULT.json", help="a `batch-test` result: its fitted β carries the lr to B"
    )


def run(args: argparse.Namespace) -> int:
    """The ``transfer`` verb: write the target configs of the study's best stable trials, and say so."""
    from mupfast.tuning.storage import default_storage, load_study

    target = args.target or args.config
    if args.pbt:
        from mupfast.tuning.transfer.lineage import run_pbt_transfer

        if args.study:
            raise ConfigError("transfer: --pbt STUDY and --study NAME exclude each other (a PBT or a sweep)")
        if not target:
            raise ConfigError("transfer: --target FILE (the target model's config) is required")
        return run_pbt_transfer(args, target)
    if not args.study:
        raise ConfigError("transfer: --study NAME is required")
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
        horizon_fit=args.horizon_fit,
        batch_fit=args.batch_fit,
    )
    print(summary(study, written))
    return 0
