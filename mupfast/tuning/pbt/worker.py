"""A PBT worker: the loop that claims members of the current generation, trains them, decides.

Every ``mupfast pbt`` process runs ``--jobs`` of these (threads, each with its own worker id and, with
CUDA, its own GPU; one job runs in the main thread). A worker repeats: if the study is finished,
stop; else claim a member of the current generation that is free (or whose claim is stale) and
train its segment; else, if every member has finished the generation, claim its decision, copy the
checkpoints the plan says and move the population on; else wait.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mupfast.config import Config
from mupfast.tuning.launch import Launch
from mupfast.tuning.pbt import member as pbt_member
from mupfast.tuning.pbt.plan import make_plan, ranked_lines
from mupfast.tuning.pbt.schema import GRACE_S, HEARTBEAT_S, pid_alive, worker_id
from mupfast.tuning.pbt.store import PbtStore
from mupfast.tuning.space import Range
from mupfast.tuning.sweep.report import SHORT


@dataclass
class Worker:
    """One worker: claims members of the current generation, trains them, makes decisions."""

    store: PbtStore
    base: Config
    space: dict[str, Range]
    settings: dict[str, Any]
    pbt_dir: Path
    launch: Launch = field(default_factory=Launch)
    job: int = 0
    grace_s: float = GRACE_S
    heartbeat_s: float = HEARTBEAT_S
    timeout_s: float | None = None
    poll_s: float = 0.5
    say: Any = print
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def me(self) -> str:
        return worker_id(self.job)

    def work(self) -> None:
        n, gens = self.settings["population"], self.settings["generations"]
        order = [(self.job + i) % n for i in range(n)]
        while not self.stop.is_set():
            g = self.store.generation()
            if g >= gens:
                return
            m = self.store.claim_member(g, self.me, grace_s=self.grace_s, order=order)
            if m is not None:
                self._segment(m, g)
                continue
            ms = self.store.members()
            if all(x.generation == g and x.status == "done" for x in ms) and self._decide(g):
                continue
            time.sleep(self.poll_s)

    def _segment(self, m, g: int) -> None:
        here = m.taken_from and m.taken_from.split(":", 1)[0] == socket.gethostname()
        if here and m.child_pid:  # a dead worker's child on this host: let it finish dying
            deadline = time.monotonic() + self.grace_s
            while pid_alive(m.child_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        run_dir = pbt_member.member_dir(self.pbt_dir, m.member).resolve()
        try:
            cfg = pbt_member.segment_config(
                self.base,
                m.hparams,
                run_dir,
                generation=g,
                interval=self.settings["interval"],
                steps=self.settings["steps"],
            )
            seg = pbt_member.run_segment(
                cfg,
                run_dir,
                member=m.member,
                generation=g,
                hparams=m.hparams,
                weights_from=m.weights_from,
                launch=self.launch,
                heartbeat=lambda pid: self.store.heartbeat(m.member, self.me, pid),
                stop_event=self.stop,
                heartbeat_s=self.heartbeat_s,
                timeout_s=self.timeout_s,
            )
        except BaseException:
            self.store.release(m.member, self.me)
            raise
        if seg is None:
            if self.stop.is_set():
                self.store.release(m.member, self.me)
            else:
                self.say(f"member {m.member} gen {g}: claim taken over by another worker; its result dropped")
            return
        if self.store.finish_segment(seg, self.me):
            if seg.status == "ok":
                pbt_member.keep_latest(run_dir)
            self.say(segment_line(seg, self.settings["steps"]))

    def _decide(self, g: int) -> bool:
        segs = self.store.segments(g)
        if len(segs) < self.settings["population"]:
            return False
        plan = self.store.claim_decision(
            g, make_plan(segs, self.settings, self.space), self.me, grace_s=self.grace_s
        )
        if plan is None:
            return False
        for mv in plan["moves"]:
            pbt_member.copy_checkpoint(
                pbt_member.member_dir(self.pbt_dir, mv["source"]),
                pbt_member.member_dir(self.pbt_dir, mv["member"]),
                plan["step"],
            )
            self.store.decision_heartbeat(g, self.me)
        if self.store.apply_decision(plan, self.me, plan["final"]):
            for line in ranked_lines(plan, sorted(self.space)):
                self.say(line)
        return True


def segment_line(seg, steps: int) -> str:
    hp = "  ".join(f"{SHORT.get(k, k)}={v:.3g}" for k, v in sorted(seg.hparams.items()))
    head = f"val {seg.val_loss:.4f}" if seg.status == "ok" else f"{seg.status.upper()}: {seg.reason}"
    src = f"  (weights of member {seg.weights_from})" if seg.weights_from != seg.member else ""
    return f"member {seg.member:>2} gen {seg.generation:>3} step {seg.step}/{steps}: {head}  [{hp}]{src}"


def run_workers(workers: list[Worker]) -> None:
    def on_sigterm(signum, frame):  # a batch system's SIGTERM: stop the segments, give claims back
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if len(workers) == 1:
            workers[0].work()
            return
        errors: list[BaseException] = []

        def body(w: Worker) -> None:
            try:
                w.work()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                for other in workers:
                    other.stop.set()

        threads = [threading.Thread(target=body, args=(w,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            for w in workers:
                w.stop.set()
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
