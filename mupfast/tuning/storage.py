"""Where a sweep lives: Optuna storage URLs, opening them, and the study that several workers share.

Storage is a real database through Optuna's ``RDBStorage``: a SQLite file by default
(``sqlite:///runs/sweeps/<study>.db``; fine for one worker, a few on one host), or a PostgreSQL URL
for workers on several nodes. Heartbeats are on for workers, so a trial whose worker died is marked
FAIL by the next worker that starts a trial, and queued again with its values (resumed from its
last checkpoint where it left one: mupfast.tuning.trial). The first worker of a study stores its
proxy config, space and seed as study attributes; a later worker must agree with them (paths and
cosmetics aside), so one study never mixes two different sweeps.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import Any

from mupfast.errors import ConfigError

#: Config keys that may differ between workers of one study (paths and cosmetics, not the run).
_WORKER_LOCAL_KEYS = {
    ("train", "run_dir"),
    ("train", "progress"),
    ("train", "resume"),
    ("train", "save_every"),
    ("train", "dist_timeout_s"),
    ("data", "dir"),
}
HEARTBEAT_S, GRACE_S = 30, 120
#: How many times a trial whose worker died is queued again (mupfast.tuning.trial resumes it).
MAX_RETRIES = 3


def retry_history(trial) -> list[int]:
    """The numbers of the trials ``trial`` (a frozen trial) retries, oldest first: Optuna's
    ``RetryHeartbeatStaleTrialCallback`` records them when it queues a dead worker's trial again."""
    return list(trial.system_attrs.get("retry_history", []))


def default_storage(study: str) -> str:
    return f"sqlite:///runs/sweeps/{study}.db"


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only used for messages
        return url.split("@")[-1]


def engine_url(url: str, *, must_exist: bool = False) -> tuple[str, dict[str, Any]]:
    """(SQLAlchemy URL, engine kwargs) for a storage URL: a bare path is a SQLite file (its folder is
    made), ``postgres(ql)://`` means psycopg2. Sweeps (through Optuna) and PBT open storage so."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            if must_exist and not Path(path).is_file():
                raise ConfigError(f"--storage: no database at {path}")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return url, {"connect_args": {"timeout": 60}}  # a few writers on one host
    if url.startswith(("postgresql", "postgres")):
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
        return url, {"pool_pre_ping": True}
    return url, {}


def open_storage(url: str, *, heartbeat: bool = False, must_exist: bool = False):
    """Optuna RDBStorage for a SQLite or PostgreSQL URL (a bare path means a SQLite file)."""
    import optuna

    url, engine_kwargs = engine_url(url, must_exist=must_exist)
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs} if engine_kwargs else {}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; used as documented
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat:  # a trial whose worker stopped beating: FAIL, and queued again with its values
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
                    kwargs.update(
                        heartbeat_interval=HEARTBEAT_S,
                        grace_period=GRACE_S,
                        heartbeat_stale_trial_callback=retry,
                    )
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: the user needs one line
            # Workers started together on a fresh database race to create Optuna's tables; the
            # losers see a unique-key violation and find the tables there on the next try.
            # SQLite says "table … already exists" (an OperationalError) for the same race.
            racing = type(e).__name__ in ("IntegrityError", "ProgrammingError") or "already exists" in str(e)
            if racing and attempt < 5:
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


def comparable_config(raw: dict) -> dict:
    return {s: {k: v for k, v in sec.items() if (s, k) not in _WORKER_LOCAL_KEYS} for s, sec in raw.items()}


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')} ({a!r} there, {b!r} here)"


def claim_study_attr(study, key: str, value: Any, what: str) -> Any:
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
        where = first_difference(_comparable_if(current, key), _comparable_if(value, key))
        raise ConfigError(
            f"--study {study.study_name}: the study was started with a different {what}; it differs at {where}"
        )
    return current


def _comparable_if(value: Any, key: str) -> Any:
    return comparable_config(value) if key == "proxy_config" else value
