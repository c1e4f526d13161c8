"""``mupfast pbt``: population-based training on the proxy (exploit and explore between generations).

``mupfast pbt --config proxy.yaml --population N --interval K --steps S`` trains N members of the
proxy for S steps in synchronous generations of K steps; after each one the bottom ``--quantile``
(and every failed member) copies a top member's checkpoint and hyperparameters (exploit) and
perturbs them (explore). The result is the best member's lineage, a hyperparameter schedule that
``mupfast transfer --pbt`` carries to a target. Every ``mupfast pbt`` process on the same study is
a worker (:mod:`~mupfast.tuning.pbt.worker`), so a killed PBT continues when run again; the
algorithm and the study database are described in docs/pbt.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.tuning.pbt.plan import check_settings, initial_hparams
from mupfast.tuning.pbt.schema import GRACE_S, HEARTBEAT_S, default_pbt_storage
from mupfast.tuning.pbt.store import PbtStore
from mupfast.tuning.pbt.worker import Worker, run_workers
from mupfast.tuning.space import Range, load_space, parse_space, space_dict

#: Space names PBT cannot change mid-run (the init is drawn once, at step 0).
FIXED_MID_RUN = ("init_std",)


def pbt_space(path: str | None, cfg: Config, say=print) -> dict[str, Range]:
    """The sweep's space without init_std: an error in a space file, a note for the built-in one."""
    space = load_space(path, cfg)
    fixed = [n for n in FIXED_MID_RUN if n in space]
    if fixed and path is not None:
        raise ConfigError(
            f"{path}: {fixed[0]}: cannot change mid-run (the init is drawn once); PBT keeps the proxy's "
            f"model.{fixed[0]} — leave it out of the space"
        )
    for n in fixed:
        say(
            f"note: PBT leaves {n} out of the space (it cannot change mid-run); model.{n} stays {getattr(cfg.model, n):g}"
        )
        del space[n]
    if not space:
        raise ConfigError("--space: nothing left to explore")
    return space


def _comparable_settings(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k != "seed"}


def open_study(
    store: PbtStore, base: Config, space: dict[str, Range], settings: dict[str, Any]
) -> dict[str, Any]:
    """Create the study, or check that this worker agrees with the one there; the stored settings."""
    from mupfast.tuning.storage import comparable_config, first_difference
    from mupfast.tuning.sweep.sweep import hash_name

    given_seed = settings["seed"]
    seed = given_seed if given_seed is not None else hash_name(str(time.time_ns()))
    settings = {**settings, "seed": seed}
    if store.study_row() is None:
        store.create(
            base.to_dict(), space_dict(space), settings, initial_hparams(space, seed, settings["population"])
        )
    row = store.study_row()
    mine = {
        "proxy config": (comparable_config(base.to_dict()), comparable_config(row["proxy_config"])),
        "space": (space_dict(space), row["space"]),
        "settings": (_comparable_settings(settings), _comparable_settings(row["settings"])),
    }
    for what, (here, there) in mine.items():
        if here != there:
            raise ConfigError(
                f"--study {store.study}: the study was started with a different {what}; it differs at "
                f"{first_difference(there, here)}"
            )
    if given_seed is not None and given_seed != row["settings"]["seed"]:
        raise ConfigError(
            f"--seed: the study {store.study} was started with seed {row['settings']['seed']} (got {given_seed})"
        )
    return row["settings"]


@dataclass
class PbtSpec:
    """One PBT study as ``mupfast pbt``'s flags describe it."""

    base: Config  # the proxy config
    study: str
    population: int
    interval: int  # K: steps per generation
    storage: str | None = None  # default sqlite:///runs/pbt/<study>.db
    steps: int | None = None  # S: each member's steps (default train.steps)
    space: dict[str, Range] | None = None  # default the sweep's built-in ranges without init_std
    quantile: float = 0.25
    perturb: float = 1.2
    resample_p: float = 0.25
    seed: int | None = None  # default the study's (a new study: drawn)
    jobs: int | None = None  # default 1 on CPU, one per GPU with the deepspeed launcher
    pbt_dir: str | Path | None = None  # default runs/pbt/<study>
    launcher: str = "auto"
    threads: int | None = None
    timeout_s: float | None = None
    grace_s: float = GRACE_S
    say: Callable[[str], None] | None = None  # default: a line on stderr


def _settings(spec: PbtSpec, steps: int) -> dict[str, Any]:
    """The study's settings from the flags (checked), with the number of generations."""
    settings = {
        "population": spec.population,
        "interval": spec.interval,
        "steps": steps,
        "quantile": float(spec.quantile),
        "perturb": float(spec.perturb),
        "resample_p": float(spec.resample_p),
        "seed": spec.seed,
    }
    check_settings(settings)
    settings["generations"] = steps // spec.interval
    return settings


def _jobs(spec: PbtSpec, launcher: str) -> int:
    """Members trained at once here: ``--jobs``, else one on CPU and one per GPU with CUDA."""
    jobs = spec.jobs
    if jobs is None:
        jobs = 1
        if launcher == "deepspeed":
            import torch

            jobs = max(torch.cuda.device_count(), 1)
    if jobs < 1:
        raise ConfigError(f"--jobs: must be positive (got {jobs})")
    if not spec.grace_s > 0:
        raise ConfigError(f"--claim-grace: must be positive seconds (got {spec.grace_s:g})")
    if spec.timeout_s is not None and not spec.timeout_s > 0:
        raise ConfigError(f"--segment-timeout: must be positive seconds (got {spec.timeout_s:g})")
    return jobs


def pbt(spec: PbtSpec) -> PbtStore:
    """Run (or continue, or help) the study until its last generation is decided; return its store."""
    from mupfast.tuning.launch import Launch, job_gpus, resolve_launcher
    from mupfast.tuning.storage import redact

    say = spec.say or (lambda s: print(s, file=sys.stderr, flush=True))
    steps = spec.steps if spec.steps is not None else spec.base.train.steps
    settings = _settings(spec, steps)
    base = with_overrides(spec.base, {"train.steps": steps})
    space = spec.space if spec.space is not None else pbt_space(None, base, say)
    launcher = resolve_launcher(spec.launcher)
    jobs = _jobs(spec, launcher)
    storage = spec.storage or default_pbt_storage(spec.study)
    store = PbtStore(storage, spec.study)
    settings = open_study(store, base, space, settings)
    space = parse_space(store.study_row()["space"])
    pbt_dir = Path(spec.pbt_dir) if spec.pbt_dir is not None else Path("runs/pbt") / spec.study
    g = store.generation()
    say(
        f"pbt {spec.study} in {redact(storage)}: {settings['population']} members, {settings['generations']} "
        f"generations of {spec.interval} steps (at generation {min(g, settings['generations'])}); {jobs} job(s), "
        f"{launcher} launcher, members under {pbt_dir}/"
    )
    workers = [
        Worker(
            store,
            base,
            space,
            settings,
            pbt_dir,
            launch=Launch(launcher, job_gpus(j, jobs), spec.threads),
            job=j,
            grace_s=spec.grace_s,
            heartbeat_s=min(HEARTBEAT_S, spec.grace_s / 4),
            timeout_s=spec.timeout_s,
            say=say,
        )
        for j in range(jobs)
    ]
    run_workers(workers)
    return store


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="study name (default: the --config file's stem)")
    parser.add_argument(
        "--storage", help="sqlite:///path.db or postgresql://… (default sqlite:///runs/pbt/<study>.db)"
    )
    parser.add_argument("--population", type=int, default=8, help="members (default %(default)s)")
    parser.add_argument("--interval", type=int, default=None, help="steps per generation (K; required)")
    parser.add_argument("--steps", type=int, default=None, help="steps of each member (default: train.steps)")
    parser.add_argument(
        "--space", help="YAML space file (default: the sweep's built-in ranges without init_std)"
    )
    parser.add_argument(
        "--quantile", type=float, default=0.25, help="bottom/top fraction (default %(default)s)"
    )
    parser.add_argument(
        "--perturb", type=float, default=1.2, help="explore: × or ÷ this (default %(default)s)"
    )
    parser.add_argument(
        "--resample-p",
        type=float,
        default=0.25,
        help="explore: chance to redraw from the space (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the study's)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="members at once (default: 1 on CPU, one per GPU)"
    )
    parser.add_argument("--pbt-dir", help="member run directories (default runs/pbt/<study>)")
    parser.add_argument("--launcher", default="auto", help="python, deepspeed, or auto (deepspeed with CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each member's run")
    parser.add_argument(
        "--segment-timeout", type=float, default=None, help="seconds before a segment is failed"
    )
    parser.add_argument(
        "--claim-grace", type=float, default=GRACE_S, help="seconds of silence before a claim is taken over"
    )
    parser.add_argument("--report", action="store_true", help="report the study: table, pictures, lineage")
    parser.add_argument("--report-dir", help="where the report goes (default <pbt-dir>/report)")


def run(args: argparse.Namespace) -> int:
    """The ``pbt`` verb: run (or continue) the study, or with ``--report`` draw what it holds."""
    from mupfast.tuning.pbt.report import write_report

    study = args.study or (Path(args.config).stem if args.config else None)
    if not study:
        raise ConfigError("pbt: --study NAME is required")
    storage = args.storage or default_pbt_storage(study)
    pbt_dir = Path(args.pbt_dir) if args.pbt_dir else Path("runs/pbt") / study
    report_dir = Path(args.report_dir) if args.report_dir else pbt_dir / "report"
    if args.report:
        store = PbtStore(storage, study, must_exist=True)
        if store.study_row() is None:
            there = ", ".join(store.list_studies()) or "none"
            raise ConfigError(f"--study: no PBT study {study!r} in {storage} (studies there: {there})")
        print(write_report(store, report_dir))
        return 0
    if not args.config:
        raise ConfigError("pbt: --config FILE (the proxy model's config) is required")
    if args.interval is None:
        raise ConfigError("pbt: --interval K (steps per generation) is required")
    cfg = load_config(args.config, args.overrides)
    spec = PbtSpec(
        cfg,
        study=study,
        storage=storage,
        population=args.population,
        interval=args.interval,
        steps=args.steps,
        space=pbt_space(args.space, cfg, lambda s: print(s, file=sys.stderr)),
        quantile=args.quantile,
        perturb=args.perturb,
        resample_p=args.resample_p,
        seed=args.seed,
        jobs=args.jobs,
        pbt_dir=pbt_dir,
        launcher=args.launcher,
        threads=args.threads,
        timeout_s=args.segment_timeout,
        grace_s=args.claim_grace,
    )
    store = pbt(spec)
    print(write_report(store, report_dir))
    from mupfast.tuning.storage import redact

    print(f"next: mupfast transfer --pbt {study} --storage {redact(storage)} --target TARGET.yaml")
    return 0
