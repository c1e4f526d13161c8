"""Proxy hyperparameter sweep: an Optuna study in which every trial is a real training run.

``mupfast sweep --config proxy.yaml --trials N --space space.yaml --storage URL --study NAME``
samples the μTransferable hyperparameters (lr, init std, embeddings_scale, output_logits_alpha,
attention_logits_alpha — log-uniform ranges from a space file, or the built-in defaults), trains the
proxy once per trial and minimises the final validation loss.

**Each trial is a child process, on CPU too.** The driver writes the trial's resolved config to
``<sweep_dir>/trial-NNNN/trial.yaml``, starts ``python -m mupfast.cli train --config trial.yaml``
(on GPUs: ``deepspeed --include localhost:<gpus> --master_port <free port> --module mupfast.train
--config trial.yaml``) in its own process group, and tails the run's ``metrics.jsonl``: every eval
record's val loss goes to ``trial.report``, and when ``trial.should_prune()`` the whole process
group is stopped. Running ``train(cfg)`` in the sweep process instead would save the ~5 s
interpreter start of each trial, but: a pruned trial must be *stopped*, and a thread cannot be;
a hard crash (segfault, the OOM killer, a gloo abort) would end the study instead of one trial;
DeepSpeed keeps one process group and global state per process; and the GPU path needs the
launcher's subprocess anyway. One code path for CPU and GPU, and the one the research recommends.

A trial that exits non-zero (a Python error, a signal), times out, or ends without a finite final
val loss is marked FAIL with the reason in its ``error`` user attribute; the study goes on
(``optimize(catch=TrialFailed)``). Each trial stores its ``run_dir``, ``worker`` and the
stability metrics of :mod:`mupfast.stability` as user attributes, and the study stores the proxy
config and the space, so ``--report`` and ``mupfast transfer`` work from the storage alone (and
read the run directories where they exist).

Storage is a real database through Optuna's ``RDBStorage``: a SQLite file by default
(``sqlite:///runs/sweeps/<study>.db``; fine for one worker, a few on one host), or a PostgreSQL URL
for workers on several nodes. Heartbeats are on, so a trial whose worker died is marked FAIL by
the next worker that starts a trial. ``--trials N`` is the study's budget, not one worker's:
every worker takes trials until the study holds N (running ones included), so a killed sweep is
continued by running the same command again and several workers split the budget (two workers
starting a trial at the same instant can overshoot it by one each).

Sampling: ``random`` draws trial k's values from a seed derived from (study seed, k), so the
points do not depend on which worker ran them and two workers never draw the same sequence;
``tpe`` is Optuna's multivariate TPE with the constant liar (its startup trials use the same
per-trial random draws).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import Config, ConfigError, config_from_dict, validate

#: Space names → the config keys they set (the Cerebras μP names live in the model section).
SPACE_KEYS = {
    "lr": "optim.lr",
    "init_std": "model.init_std",
    "embeddings_scale": "model.embeddings_scale",
    "output_logits_alpha": "model.output_logits_alpha",
    "attention_logits_alpha": "model.attention_logits_alpha",
}

#: The built-in space (configs/sweep-space.yaml holds the same ranges).
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "init_std": {"low": 0.01, "high": 0.2, "log": True},
    "embeddings_scale": {"low": 1.0, "high": 30.0, "log": True},
    "output_logits_alpha": {"low": 0.1, "high": 10.0, "log": True},
    "attention_logits_alpha": {"low": 0.1, "high": 10.0, "log": True},
}

#: Config keys that may differ between workers of one study (paths and cosmetics, not the run).
_WORKER_LOCAL_KEYS = {
    ("train", "run_dir"),
    ("train", "progress"),
    ("train", "resume"),
    ("train", "save_every"),
    ("train", "dist_timeout_s"),
    ("data", "dir"),
}
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HEARTBEAT_S, GRACE_S = 30, 120


class TrialFailed(RuntimeError):
    """A trial that crashed, timed out or ended without a finite val loss (the study goes on)."""


# ----------------------------------------------------------------------------------------------
# The space


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = True


def parse_space(raw: Any, where: str = "space") -> dict[str, Range]:
    """``{name: {low, high, log}}`` → ranges; a ConfigError naming the bad key otherwise."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of hyperparameters, e.g. lr: {{low: 1e-4, high: 1e-1}}"
        )
    space = {}
    for name, spec in raw.items():
        key = f"{where}: {name}"
        if name not in SPACE_KEYS:
            import difflib

            close = difflib.get_close_matches(str(name), SPACE_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(SPACE_KEYS)}"
            raise ConfigError(f"{key}: unknown hyperparameter ({hint})")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected {{low: …, high: …, log: true}} (got {spec!r})")
        unknown = set(spec) - {"low", "high", "log"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown field (valid: low, high, log)")
        values = {}
        for field in ("low", "high"):
            v = spec.get(field)
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{key}.{field}: expected a number (got {v!r})")
            values[field] = float(v)
        log = spec.get("log", True)
        if not isinstance(log, bool):
            raise ConfigError(f"{key}.log: expected true or false (got {log!r})")
        if values["low"] >= values["high"]:
            raise ConfigError(f"{key}: low ({values['low']:g}) must be below high ({values['high']:g})")
        if values["low"] <= 0:
            raise ConfigError(f"{key}.low: must be positive (got {values['low']:g})")
        space[name] = Range(values["low"], values["high"], log)
    return space


def load_space(path: str | Path | None) -> dict[str, Range]:
    """The space file's ranges, or the built-in ones when ``path`` is None."""
    if path is None:
        return parse_space(DEFAULT_SPACE)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(raw, str(path))


def space_dict(space: dict[str, Range]) -> dict[str, dict[str, Any]]:
    return {k: {"low": r.low, "high": r.high, "log": r.log} for k, r in space.items()}


# ----------------------------------------------------------------------------------------------
# Storage


def default_storage(study: str) -> str:
    return f"sqlite:///runs/sweeps/{study}.db"


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only used for messages
        return url.split("@")[-1]


def open_storage(url: str, *, heartbeat: bool = False, must_exist: bool = False):
    """Optuna RDBStorage for a SQLite or PostgreSQL URL (a bare path means a SQLite file)."""
    import optuna

    if "://" not in url:
        url = f"sqlite:///{url}"
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            if must_exist and not Path(path).is_file():
                raise ConfigError(f"--storage: no sweep database at {path}")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # a few writers on one host
    elif url.startswith(("postgresql", "postgres")):
        scheme, rest = url.split("://", 1)
        if scheme in (
            "postgres",
            "postgresql",
        ):  # SQLAlchemy 2.1's default driver is psycopg 3; ours is psycopg2
            scheme = "postgresql+psycopg2"
            url = f"{scheme}://{rest}"
        if scheme == "postgresql+psycopg2":
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--storage: PostgreSQL needs psycopg2 (pip install psycopg2-binary, or mupfast[hpo])"
                ) from None
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat:
        kwargs.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; used as documented
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: the user needs one line
            # Workers started together on a fresh database race to create Optuna's tables; the
            # losers see a unique-key violation and find the tables there on the next try.
            if type(e).__name__ in ("IntegrityError", "ProgrammingError") and attempt < 5:
                time.sleep(0.5 + random.random() * 2**attempt)
                continue
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--storage {redact(url)}: cannot open ({msg})") from None
    raise AssertionError("unreachable")


def load_study(storage_url: str, study_name: str):
    """An existing study (for --report and transfer); ConfigError naming what is there otherwise."""
    import optuna

    storage = open_storage(storage_url, must_exist=True)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        there = ", ".join(names) if names else "none"
        raise ConfigError(
            f"--study: no study {study_name!r} in {redact(storage_url)} (studies there: {there})"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def _comparable(raw: dict) -> dict:
    return {s: {k: v for k, v in sec.items() if (s, k) not in _WORKER_LOCAL_KEYS} for s, sec in raw.items()}


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')} ({a!r} there, {b!r} here)"


def _claim_study_attr(study, key: str, value: Any, what: str) -> Any:
    """Set a study attribute once; a later worker must agree with the first one."""
    current = study.user_attrs.get(key)
    if current is None:
        try:
            study.set_user_attr(key, value)
        except Exception:  # noqa: BLE001 - another worker set it at the same moment
            pass
        import optuna

        current = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get(key)
    if what and current is not None and _comparable_if(current, key) != _comparable_if(value, key):
        where = _first_difference(_comparable_if(current, key), _comparable_if(value, key))
        raise ConfigError(
            f"--study {study.study_name}: the study was started with a different {what}; it differs at {where}"
        )
    return current


def _comparable_if(value: Any, key: str) -> Any:
    return _comparable(value) if key == "proxy_config" else value


# ----------------------------------------------------------------------------------------------
# Trials


def trial_config(base: Config, params: dict[str, float], run_dir: str | Path) -> Config:
    """The proxy config with the trial's values, writing to ``run_dir``, starting fresh."""
    raw = base.to_dict()
    for name, value in params.items():
        section, key = SPACE_KEYS[name].split(".")
        raw[section][key] = float(value)
    raw["train"].update(run_dir=str(run_dir), progress=False, resume=False)
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def hash_name(text: str) -> int:
    """A stable 32-bit seed from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def make_sampler(kind: str, seed: int):
    import optuna

    class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
        """Random search whose draw for trial k depends only on (seed, k, parameter)."""

        def sample_independent(self, study, trial, param_name, param_distribution):
            sub = optuna.samplers.RandomSampler(seed=hash_name(f"{seed}:{trial.number}:{param_name}"))
            return sub.sample_independent(study, trial, param_name, param_distribution)

    if kind == "random":
        return TrialSeededRandomSampler(seed=seed)
    if kind == "tpe":
        tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if hasattr(tpe, "_random_sampler"):  # startup trials: the same per-trial draws as random
            tpe._random_sampler = TrialSeededRandomSampler(seed=seed)
        return tpe
    raise ConfigError(f"--sampler: must be random or tpe (got {kind!r})")


def make_pruner(kind: str):
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner: must be median, hyperband or none (got {kind!r})")


def resolve_launcher(launcher: str) -> str:
    if launcher not in ("auto", "python", "deepspeed"):
        raise ConfigError(f"--launcher: must be auto, python or deepspeed (got {launcher!r})")
    if launcher == "auto":
        import torch

        return "deepspeed" if torch.cuda.is_available() else "python"
    return launcher


def trial_command(config_path: Path, launcher: str, gpus: str | None) -> list[str]:
    """The command line that trains one trial (its config file already written)."""
    if launcher == "python":
        return [sys.executable, "-m", "mupfast.cli", "train", "--config", str(config_path)]
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(exe).exists():
        raise ConfigError("--launcher deepspeed: the deepspeed launcher is not on PATH")
    if gpus is None:
        import torch

        gpus = ",".join(map(str, range(max(torch.cuda.device_count(), 1))))
    from mupfast.engine import free_port

    return [
        exe,
        "--include",
        f"localhost:{gpus}",
        "--master_port",
        str(free_port()),
        "--module",
        "mupfast.train",
        "--config",
        str(config_path),
    ]


def _child_env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}  # a world of its own
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the trial's whole process group (the deepspeed launcher and its ranks too)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class MetricsTail:
    """New complete lines of a growing metrics.jsonl."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        import json

        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn or foreign line must not end the study
                continue
        return out


def _failure_reason(returncode: int, log: Path) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = f"killed by {name}"
    else:
        why = f"exit code {returncode}"
    lines = (
        [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if log.is_file()
        else []
    )
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"{why}: {last[:300]}" if last else why


@dataclass
class Worker:
    """How this process runs trials (the same for all of its trials)."""

    base: Config
    space: dict[str, Range]
    sweep_dir: Path
    launcher: str = "python"
    gpus: str | None = None
    threads: int | None = None
    trial_timeout_s: float | None = None
    keep_checkpoints: bool = False
    poll_s: float = 0.5
    on_progress: Callable[[str], None] | None = None

    def objective(self, trial) -> float:
        import optuna

        from mupfast.stability import run_stability

        params = {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in self.space.items()}
        run_dir = (self.sweep_dir / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            cfg = trial_config(self.base, params, run_dir)
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            raise TrialFailed(str(e)) from None
        if run_dir.exists():  # left over from a deleted study of the same name
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        config_path = run_dir / "trial.yaml"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = run_dir / "train.log"
        cmd = trial_command(config_path, self.launcher, self.gpus)
        steps = cfg.train.steps

        t0 = time.monotonic()
        tail = MetricsTail(run_dir / "metrics.jsonl")
        pruned_at = timed_out = None
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_child_env(self.threads),
                start_new_session=True,
            )
            try:
                while pruned_at is None and timed_out is None:
                    done = proc.poll() is not None  # read after the poll: nothing written is missed
                    for rec in tail.read():
                        if rec.get("kind") == "train" and self.on_progress:
                            self.on_progress(f"trial {trial.number} step {rec['step']}/{steps}")
                        if rec.get("kind") != "eval" or not math.isfinite(rec.get("val_loss", math.nan)):
                            continue
                        trial.report(rec["val_loss"], rec["step"])
                        if self.on_progress:
                            self.on_progress(
                                f"trial {trial.number} step {rec['step']}/{steps} val {rec['val_loss']:.4f}"
                            )
                        if rec["step"] < steps and trial.should_prune():
                            pruned_at = (rec["step"], rec["val_loss"])
                            break
                    if done:
                        break
                    if self.trial_timeout_s and time.monotonic() - t0 > self.trial_timeout_s:
                        timed_out = time.monotonic() - t0
                        break
                    time.sleep(self.poll_s)
            finally:  # pruned, timed out, or the driver interrupted: never leave a run behind
                _stop(proc)
        returncode = proc.returncode

        from mupfast.metrics import read_metrics

        try:
            records = read_metrics(run_dir)
        except ValueError:  # an unreadable metrics file: judged below as a run without a final val loss
            records = []
        stability = run_stability(records)
        trial.set_user_attr("stability", stability)
        trial.set_user_attr("elapsed_s", round(time.monotonic() - t0, 1))
        trial.set_user_attr("returncode", returncode)
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_at[0]} (val loss {pruned_at[1]:.4f})")
        if timed_out is not None:
            reason = f"timed out after {timed_out:.0f} s (--trial-timeout)"
        elif returncode != 0:
            reason = _failure_reason(returncode, log)
        else:
            finals = [r["val_loss"] for r in records if r.get("kind") == "eval" and r.get("step") == steps]
            if not finals:
                reason = f"no val loss at the final step {steps}"
            elif not math.isfinite(finals[-1]):
                reason = "non-finite final val loss"
            else:
                return float(finals[-1])
        trial.set_user_attr("error", reason)
        raise TrialFailed(reason)


# ----------------------------------------------------------------------------------------------
# The study driver


def study_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _started(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))


def _finished(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))


def trial_line(t) -> str:
    """One line about a finished trial."""
    params = "  ".join(f"{k}={v:.3g}" for k, v in t.params.items())
    if t.state.name == "COMPLETE":
        stab = t.user_attrs.get("stability") or {}
        flag = "stable" if stab.get("stable") else f"UNSTABLE ({stab.get('why', '?')})"
        head = f"val {t.value:.4f}  {flag}"
    elif t.state.name == "PRUNED":
        last = max(t.intermediate_values) if t.intermediate_values else None
        head = f"pruned at step {last}" if last is not None else "pruned"
    else:
        head = f"FAILED: {t.user_attrs.get('error', 'unknown error')}"
    return f"trial {t.number:>4} {t.state.name:<8} {head}  [{params}]"


def sweep(
    base: Config,
    *,
    study_name: str,
    storage: str | None = None,
    n_trials: int,
    space: dict[str, Range] | None = None,
    sampler: str = "random",
    seed: int | None = None,
    pruner: str | Any = "median",
    sweep_dir: str | Path | None = None,
    launcher: str = "auto",
    gpus: str | None = None,
    threads: int | None = None,
    trial_timeout_s: float | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    top: int = 5,
):
    """Run trials until the study holds ``n_trials``; return the study."""
    import optuna

    from mupfast.stability import format_best

    if n_trials <= 0:
        raise ConfigError(f"--trials: must be positive (got {n_trials})")
    space = space if space is not None else load_space(None)
    storage = storage or default_storage(study_name)
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else Path("runs/sweeps") / study_name
    launcher = resolve_launcher(launcher)
    pruner_obj = make_pruner(pruner) if isinstance(pruner, str) else pruner

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines, under the progress bar
    rdb = open_storage(storage, heartbeat=True)
    study = optuna.create_study(
        study_name=study_name, storage=rdb, direction="minimize", load_if_exists=True, pruner=pruner_obj
    )
    _claim_study_attr(study, "proxy_config", base.to_dict(), "proxy config")
    _claim_study_attr(study, "space", space_dict(space), "space")
    study_seed = _claim_study_attr(
        study, "seed", seed if seed is not None else hash_name(str(time.time_ns())), ""
    )
    study.sampler = make_sampler(sampler, int(seed if seed is not None else study_seed))

    worker = Worker(
        base=base,
        space=space,
        sweep_dir=sweep_dir,
        launcher=launcher,
        gpus=gpus,
        threads=threads,
        trial_timeout_s=trial_timeout_s,
        keep_checkpoints=keep_checkpoints,
    )
    bar = None
    counts = study_counts(study)
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n_trials, initial=min(_finished(counts), n_trials), desc=f"sweep {study_name}", unit="trial"
        )
        worker.on_progress = lambda text: bar.set_postfix_str(text)

    def say(text: str) -> None:
        (bar.write if bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(text)

    say(
        f"study {study_name} in {redact(storage)}: {_finished(counts)} of {n_trials} trials done; "
        f"{sampler} sampler, {launcher} launcher, runs under {sweep_dir}/"
    )
    if not base.train.eval_every:
        say("note: train.eval_every is 0, so only the final val loss is reported and nothing is pruned")

    def after_trial(study, frozen) -> None:
        say(trial_line(frozen))
        say(format_best(study, top))
        if bar is not None:
            bar.n = min(_finished(study_counts(study)), n_trials)
            bar.set_postfix_str("")
            bar.refresh()

    def on_sigterm(signum, frame):  # a batch system's SIGTERM: stop the trial's run, mark it FAIL
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while _started(study_counts(study)) < n_trials:
            study.optimize(worker.objective, n_trials=1, catch=(TrialFailed,), callbacks=[after_trial])
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    return study
