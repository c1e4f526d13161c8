"""The tables of a PBT study (SQLAlchemy Core), the rows read from them, and who holds a claim.

:mod:`~mupfast.tuning.pbt.store` reads and writes them; the layout is described there.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()
studies = Table(
    "pbt_studies",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("proxy_config", Text, nullable=False),
    Column("space", Text, nullable=False),
    Column("settings", Text, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("created", Float, nullable=False),
)
members = Table(
    "pbt_members",
    metadata,
    Column("study", String(255), primary_key=True),
    Column("member", Integer, primary_key=True),
    Column("generation", Integer, nullable=False),
    Column("hparams", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("weights_from", Integer, nullable=False),
    Column("claimed_by", String(255)),
    Column("heartbeat", Float),
    Column("child_pid", Integer),
    Column("attempts", Integer, nullable=False, default=0),
)
segments = Table(
    "pbt_segments",
    metadata,
    Column("study", String(255), primary_key=True),
    Column("member", Integer, primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("step", Integer, nullable=False),
    Column("hparams", Text, nullable=False),
    Column("val_loss", Float),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("weights_from", Integer, nullable=False),
    Column("worker", String(255)),
    Column("elapsed_s", Float),
    Column("finished", Float),
)
decisions = Table(
    "pbt_decisions",
    metadata,
    Column("study", String(255), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("plan", Text, nullable=False),
    Column("claimed_by", String(255)),
    Column("heartbeat", Float),
    Column("applied", Boolean, nullable=False, default=False),
)
events = Table(
    "pbt_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study", String(255), nullable=False, index=True),
    Column("generation", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("member", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("source", Integer),
    Column("old", Text),
    Column("new", Text),
    Column("detail", Text),
)

HEARTBEAT_S, GRACE_S = 30.0, 120.0


def default_pbt_storage(study: str) -> str:
    return f"sqlite:///runs/pbt/{study}.db"


def open_engine(url: str):
    """A SQLAlchemy engine for a storage URL, read as :func:`~mupfast.tuning.storage.open_storage`
    reads it (a bare path is a SQLite file, whose folder is made; ``postgresql://`` means psycopg2),
    without Optuna's tables (PBT has its own, and Optuna's creation races between fresh workers)."""
    from sqlalchemy import create_engine

    from mupfast.errors import ConfigError
    from mupfast.tuning.storage import engine_url, redact

    url, kwargs = engine_url(url)
    try:
        return create_engine(url, **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad URL or driver: the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {redact(url)}: cannot open ({msg})") from None


def worker_id(job: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{job}"


def claim_is_dead(claimed_by: str | None) -> bool:
    """Whether a claim belongs to a process on this host that no longer exists."""
    if not claimed_by:
        return False
    host, _, rest = claimed_by.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    return not pid_alive(int(pid_text))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finite_or_none(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass
class Member:
    member: int
    generation: int
    hparams: dict[str, float]
    status: str
    weights_from: int
    claimed_by: str | None
    heartbeat: float | None
    child_pid: int | None
    attempts: int
    taken_from: str | None = None  # set by claim_member: the stale claim it replaced


@dataclass
class Segment:
    member: int
    generation: int
    step: int
    hparams: dict[str, float]
    val_loss: float | None
    status: str
    reason: str | None
    weights_from: int
    worker: str | None
    elapsed_s: float | None
