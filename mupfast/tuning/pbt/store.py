"""Where a PBT study lives: SQL tables of its own beside the sweep's, shared by every worker.

The same kind of database as a sweep (:func:`~mupfast.tuning.storage.open_storage` resolves
the URL: a SQLite file by default, PostgreSQL for workers on several nodes); five tables, all keyed
by the study name:

* ``pbt_studies``: the proxy config, the space and the settings (a later worker must agree with
  them) and the generation the population is training (``settings.generations`` when finished);
* ``pbt_members``: each member's generation, hyperparameters, status (``ready``, ``running``,
  ``done``, ``finished``), the member its weights came from, and the claim (``claimed_by``,
  ``heartbeat``, the child's pid);
* ``pbt_segments``: the history, one row per (member, generation): the step it ended at, the
  hyperparameters it trained with, its val loss, ``ok``/``crash``/``nonfinite`` and ``weights_from``;
* ``pbt_decisions``: the exploit/explore plan of each generation, written before any checkpoint is
  copied, with its own claim, so a worker killed mid-decision is finished by the next one;
* ``pbt_events``: ``exploit``, ``explore``, ``crash`` and ``nonfinite``, with old and new values.

Every claim is one conditional UPDATE whose row count says who won, so two workers never run one
member (or one decision) at once. A claim is stale when its heartbeat is older than the grace
period, or at once when its worker was a process on this host that no longer exists.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import fields
from typing import Any

from sqlalchemy import and_, exc, insert, select, update

from mupfast.errors import ConfigError
from mupfast.tuning.pbt.schema import (
    Member,
    Segment,
    claim_is_dead,
    decisions,
    events,
    finite_or_none,
    members,
    metadata,
    open_engine,
    segments,
    studies,
)
from mupfast.tuning.storage import redact


def _row(cls, r) -> Any:
    """A Member or Segment from a result row (hparams stored as JSON)."""
    names = {f.name for f in fields(cls)} & set(r.keys())
    return cls(**{n: json.loads(r[n]) if n == "hparams" else r[n] for n in names})


class PbtStore:
    """One study's rows; every method is one short transaction."""

    def __init__(self, url: str, study: str, *, must_exist: bool = False):
        url = url if "://" in url else f"sqlite:///{url}"
        if must_exist and url.startswith("sqlite:///"):
            path = url.split(":///", 1)[1]
            if path != ":memory:" and not os.path.isfile(path):
                raise ConfigError(f"--storage: no PBT database at {path}")
        self.url, self.study = url, study
        self.engine = open_engine(url)
        for attempt in range(6):  # workers started together race to create the tables
            try:
                metadata.create_all(self.engine, checkfirst=True)
                break
            except exc.SQLAlchemyError as e:
                if attempt == 5:
                    msg = str(e).strip().splitlines()[0]
                    raise ConfigError(
                        f"--storage {redact(url)}: cannot create the PBT tables ({msg})"
                    ) from None
                time.sleep(0.3 + random.random() * 2**attempt)

    # ---- the study ----------------------------------------------------------------------------

    def study_row(self) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(studies).where(studies.c.name == self.study)).mappings().first()
        if r is None:
            return None
        return {
            "proxy_config": json.loads(r["proxy_config"]),
            "space": json.loads(r["space"]),
            "settings": json.loads(r["settings"]),
            "generation": r["generation"],
        }

    def create(
        self, proxy_config: dict, space: dict, settings: dict, initial: list[dict[str, float]]
    ) -> bool:
        """Insert the study and its members at generation 0; False when it already exists."""
        try:
            with self.engine.begin() as c:
                c.execute(
                    insert(studies).values(
                        name=self.study,
                        proxy_config=json.dumps(proxy_config),
                        space=json.dumps(space),
                        settings=json.dumps(settings),
                        generation=0,
                        created=time.time(),
                    )
                )
                for i, hp in enumerate(initial):
                    c.execute(
                        insert(members).values(
                            study=self.study,
                            member=i,
                            generation=0,
                            hparams=json.dumps(hp),
                            status="ready",
                            weights_from=i,
                            attempts=0,
                        )
                    )
            return True
        except exc.IntegrityError:
            return False

    def list_studies(self) -> list[str]:
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(select(studies.c.name).order_by(studies.c.name))]

    def generation(self) -> int:
        with self.engine.connect() as c:
            g = c.execute(select(studies.c.generation).where(studies.c.name == self.study)).scalar()
        if g is None:
            raise ConfigError(f"--study {self.study}: not in {self.url}")
        return int(g)

    # ---- members ------------------------------------------------------------------------------

    def members(self) -> list[Member]:
        with self.engine.connect() as c:
            rows = c.execute(
                select(members).where(members.c.study == self.study).order_by(members.c.member)
            ).mappings()
            return [_row(Member, r) for r in rows]

    def claim_member(self, generation: int, me: str, *, grace_s: float, order: list[int]) -> Member | None:
        """Claim one member that has generation ``generation`` to train (free or stale); None if none."""
        now = time.time()
        by_id = {m.member: m for m in self.members()}
        for i in order:
            m = by_id.get(i)
            if m is None or m.generation != generation or m.status not in ("ready", "running"):
                continue
            stale = m.claimed_by is None or (m.heartbeat or 0) < now - grace_s or claim_is_dead(m.claimed_by)
            if not stale:
                continue
            cond = [
                members.c.study == self.study,
                members.c.member == i,
                members.c.generation == generation,
                members.c.status.in_(("ready", "running")),
            ]
            # Conditional on what was read: the claim read stale (or dead) is the one replaced.
            if m.claimed_by is None:
                cond.append(members.c.claimed_by.is_(None))
            else:
                cond += [members.c.claimed_by == m.claimed_by, members.c.heartbeat == m.heartbeat]
            with self.engine.begin() as c:
                n = c.execute(
                    update(members)
                    .where(and_(*cond))
                    .values(
                        claimed_by=me,
                        heartbeat=now,
                        status="running",
                        child_pid=None,
                        attempts=members.c.attempts + 1,
                    )
                ).rowcount
            if n == 1:
                m.taken_from = m.claimed_by
                m.claimed_by, m.heartbeat, m.status, m.attempts = me, now, "running", m.attempts + 1
                return m
        return None

    def heartbeat(self, member: int, me: str, child_pid: int | None = None) -> bool:
        """Refresh this worker's claim; False when it was lost (taken over)."""
        values: dict[str, Any] = {"heartbeat": time.time()}
        if child_pid is not None:
            values["child_pid"] = child_pid
        with self.engine.begin() as c:
            n = c.execute(
                update(members)
                .where(members.c.study == self.study, members.c.member == member, members.c.claimed_by == me)
                .values(**values)
            ).rowcount
        return n == 1

    def finish_segment(self, seg: Segment, me: str) -> bool:
        """Record a finished segment (and its failure event) if this worker still holds the claim."""
        with self.engine.begin() as c:
            n = c.execute(
                update(members)
                .where(
                    members.c.study == self.study,
                    members.c.member == seg.member,
                    members.c.generation == seg.generation,
                    members.c.claimed_by == me,
                    members.c.status == "running",
                )
                .values(status="done", claimed_by=None, heartbeat=None, child_pid=None)
            ).rowcount
            if n != 1:
                return False
            c.execute(
                insert(segments).values(
                    study=self.study,
                    member=seg.member,
                    generation=seg.generation,
                    step=seg.step,
                    hparams=json.dumps(seg.hparams),
                    val_loss=finite_or_none(seg.val_loss),
                    status=seg.status,
                    reason=seg.reason,
                    weights_from=seg.weights_from,
                    worker=me,
                    elapsed_s=seg.elapsed_s,
                    finished=time.time(),
                )
            )
            if seg.status != "ok":
                self._event(c, seg.generation, seg.step, seg.member, seg.status, detail=seg.reason)
        return True

    def release(self, member: int, me: str) -> None:
        """Give a claim back unfinished (the worker is stopping); the next worker re-runs the segment."""
        with self.engine.begin() as c:
            c.execute(
                update(members)
                .where(
                    members.c.study == self.study,
                    members.c.member == member,
                    members.c.claimed_by == me,
                    members.c.status == "running",
                )
                .values(status="ready", claimed_by=None, heartbeat=None, child_pid=None)
            )

    # ---- history and events -------------------------------------------------------------------

    def segments(self, generation: int | None = None) -> list[Segment]:
        q = select(segments).where(segments.c.study == self.study)
        if generation is not None:
            q = q.where(segments.c.generation == generation)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(segments.c.generation, segments.c.member)).mappings()
            return [_row(Segment, r) for r in rows]

    def events(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(
                select(events).where(events.c.study == self.study).order_by(events.c.id)
            ).mappings()
            out = []
            for r in rows:
                e = dict(r)
                e.pop("study")
                for k in ("old", "new", "detail"):
                    if e[k] and e[k][:1] in "{[":
                        e[k] = json.loads(e[k])
                out.append(e)
            return out

    def _event(self, c, generation, step, member, kind, source=None, old=None, new=None, detail=None):
        c.execute(
            insert(events).values(
                study=self.study,
                generation=generation,
                step=step,
                member=member,
                kind=kind,
                source=source,
                old=None if old is None else json.dumps(old),
                new=None if new is None else json.dumps(new),
                detail=detail if detail is None or isinstance(detail, str) else json.dumps(detail),
            )
        )

    # ---- decisions ----------------------------------------------------------------------------

    def claim_decision(self, generation: int, plan: dict, me: str, *, grace_s: float) -> dict | None:
        """The plan of ``generation`` to apply, claimed by this worker; None if another holds it.

        The first worker inserts its plan and the plan's exploit/explore events in one transaction;
        a later one takes over an unapplied plan whose worker went silent (and applies *that* plan).
        """
        now = time.time()
        try:
            with self.engine.begin() as c:
                c.execute(
                    insert(decisions).values(
                        study=self.study,
                        generation=generation,
                        plan=json.dumps(plan),
                        claimed_by=me,
                        heartbeat=now,
                        applied=False,
                    )
                )
                for mv in plan["moves"]:
                    at = (generation, plan["step"], mv["member"])
                    self._event(c, *at, "exploit", mv["source"], mv["old"], mv["source_hparams"])
                    self._event(c, *at, "explore", None, mv["source_hparams"], mv["new"], mv["explore"])
            return plan
        except exc.IntegrityError:
            pass
        with self.engine.connect() as c:
            r = (
                c.execute(
                    select(decisions).where(
                        decisions.c.study == self.study, decisions.c.generation == generation
                    )
                )
                .mappings()
                .first()
            )
        if r is None or r["applied"]:
            return None
        if (
            r["claimed_by"] != me
            and (r["heartbeat"] or 0) >= now - grace_s
            and not claim_is_dead(r["claimed_by"])
        ):
            return None
        with self.engine.begin() as c:
            n = c.execute(
                update(decisions)
                .where(
                    decisions.c.study == self.study,
                    decisions.c.generation == generation,
                    decisions.c.applied.is_(False),
                    decisions.c.claimed_by == r["claimed_by"],
                    decisions.c.heartbeat == r["heartbeat"],
                )
                .values(claimed_by=me, heartbeat=now)
            ).rowcount
        return json.loads(r["plan"]) if n == 1 else None

    def decision_heartbeat(self, generation: int, me: str) -> bool:
        with self.engine.begin() as c:
            return (
                c.execute(
                    update(decisions)
                    .where(
                        decisions.c.study == self.study,
                        decisions.c.generation == generation,
                        decisions.c.claimed_by == me,
                    )
                    .values(heartbeat=time.time())
                ).rowcount
                == 1
            )

    def apply_decision(self, plan: dict, me: str, final: bool) -> bool:
        """Move the population to the next generation with the plan's hyperparameters (one transaction)."""
        g = plan["generation"]
        moved = {mv["member"]: mv for mv in plan["moves"]}
        with self.engine.begin() as c:
            n = c.execute(
                update(decisions)
                .where(
                    decisions.c.study == self.study,
                    decisions.c.generation == g,
                    decisions.c.claimed_by == me,
                    decisions.c.applied.is_(False),
                )
                .values(applied=True, claimed_by=None)
            ).rowcount
            if n != 1:
                return False
            for m in plan["ranking"]:
                values: dict[str, Any] = {
                    "generation": g + 1,
                    "status": "finished" if final else "ready",
                    "claimed_by": None,
                    "heartbeat": None,
                    "weights_from": moved[m]["source"] if m in moved else m,
                }
                if m in moved:
                    values["hparams"] = json.dumps(moved[m]["new"])
                c.execute(
                    update(members)
                    .where(members.c.study == self.study, members.c.member == m)
                    .values(**values)
                )
            c.execute(update(studies).where(studies.c.name == self.study).values(generation=g + 1))
        return True

    def decisions(self) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(
                select(decisions.c.plan, decisions.c.applied)
                .where(decisions.c.study == self.study)
                .order_by(decisions.c.generation)
            )
            return [{**json.loads(p), "applied": bool(a)} for p, a in rows]
