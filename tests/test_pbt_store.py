"""The PBT study database: claims that two workers never share, stale and dead claims taken over,
decisions finished by the next worker, and a killed PBT that continues where it stopped."""

import os
import signal
import subprocess
import sys
import threading
import time

from mupfast.tuning.pbt.schema import worker_id
from mupfast.tuning.pbt.store import PbtStore
from tests.postgres import postgres_server
from tests.test_pbt import DRIVER, FAKE_TRAINER, PROXY, ROOT, SPACE, fake, run_pbt, seg, tiny  # noqa: F401


def new_store(tmp_path, population=4, study="s") -> PbtStore:
    store = PbtStore(f"sqlite:///{tmp_path}/pbt.db", study)
    settings = {"population": population, "interval": 2, "steps": 6, "generations": 3, "seed": 1}
    store.create({"model": {}}, {}, settings, [{"lr": 0.01}] * population)
    return store


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_concurrent_claims_give_every_member_to_exactly_one_worker(tmp_path):
    store = new_store(tmp_path, population=6)
    claims: dict[int, list[str]] = {}
    lock, start = threading.Lock(), threading.Barrier(8)

    def worker(j: int) -> None:
        me = f"w{j}"
        start.wait()
        while (m := store.claim_member(0, me, grace_s=60, order=[(j + i) % 6 for i in range(6)])) is not None:
            with lock:
                claims.setdefault(m.member, []).append(me)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == list(range(6))
    assert all(len(who) == 1 for who in claims.values()), claims


def test_a_fresh_claim_holds_a_stale_one_is_taken_over_and_its_worker_learns_it(tmp_path):
    store = new_store(tmp_path, population=2)
    a = store.claim_member(0, "host-a:1:0", grace_s=60, order=[0])
    assert a.member == 0
    assert store.claim_member(0, "host-b:2:0", grace_s=60, order=[0]) is None  # heartbeat is fresh
    assert store.heartbeat(0, "host-a:1:0")
    time.sleep(0.05)
    b = store.claim_member(0, "host-b:2:0", grace_s=0.01, order=[0])  # silent for longer than the grace
    assert b.member == 0 and b.taken_from == "host-a:1:0" and b.attempts == 2
    assert not store.heartbeat(0, "host-a:1:0")  # A's next heartbeat says the claim is gone
    assert not store.finish_segment(seg(0, 2.0), "host-a:1:0")  # and its result is not recorded
    assert store.finish_segment(seg(0, 2.5), "host-b:2:0")
    assert [s.val_loss for s in store.segments()] == [2.5]


def test_a_claim_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    store = new_store(tmp_path, population=2)
    dead = f"{worker_id().split(':')[0]}:{dead_pid()}:0"
    assert store.claim_member(0, dead, grace_s=3600, order=[1]).member == 1
    m = store.claim_member(0, worker_id(), grace_s=3600, order=[1])
    assert m is not None and m.taken_from == dead


def test_an_unfinished_decision_is_finished_with_its_own_plan(tmp_path):
    store = new_store(tmp_path, population=2)
    mv = {"member": 1, "source": 0, "old": {"lr": 0.02}, "source_hparams": {"lr": 0.01}}
    plan = {
        "generation": 0,
        "step": 2,
        "ranking": [0, 1],
        "moves": [{**mv, "new": {"lr": 0.012}, "explore": {}}],
    }
    assert store.claim_decision(0, plan, "remote:1:0", grace_s=3600) == plan  # then that worker goes silent
    other = {**plan, "moves": [{**mv, "new": {"lr": 0.5}, "explore": {}}]}
    assert store.claim_decision(0, other, worker_id(), grace_s=3600) is None  # its heartbeat is fresh
    time.sleep(0.05)
    taken = store.claim_decision(0, other, worker_id(), grace_s=0.01)
    assert taken == plan  # the recorded plan, not a new one
    assert not store.apply_decision(taken, "remote:1:0", final=False)  # the silent worker lost it
    assert store.apply_decision(taken, worker_id(), final=False)
    assert [m.hparams for m in store.members()] == [{"lr": 0.01}, {"lr": 0.012}]
    assert [m.weights_from for m in store.members()] == [0, 0] and store.generation() == 1
    assert [e["kind"] for e in store.events()] == ["exploit", "explore"]  # recorded once
    assert store.claim_decision(0, plan, worker_id(), grace_s=0.0) is None  # applied: nothing to do


def driver(tmp_path, *extra: str, storage: str | None = None) -> subprocess.Popen:
    script, fake_script = tmp_path / "driver.py", tmp_path / "fake_train.py"
    fake_script.write_text(FAKE_TRAINER)
    script.write_text(DRIVER.format(root=str(ROOT), fake=str(fake_script)))
    storage = storage or f"sqlite:///{tmp_path}/pbt.db"
    argv = ["pbt", "--config", str(PROXY), "--study", "s", "--storage", storage]
    argv += ["--population", "3", "--interval", "1", "--steps", "3", "--seed", "5", "--launcher", "python"]
    argv += ["--pbt-dir", str(tmp_path / "members"), "--space", str(tmp_path / "space.yaml"), *extra]
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**os.environ, "FAKE_SLEEP": "0.2"}
    return subprocess.Popen(
        [sys.executable, str(script), *argv, *tiny(tmp_path)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_a_killed_pbt_continues_where_it_stopped(tmp_path):
    proc = driver(tmp_path)
    store = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (tmp_path / "pbt.db").is_file():
            store = store or PbtStore(f"sqlite:///{tmp_path}/pbt.db", "s")
            running = [m for m in store.members() if m.status == "running"] if store.study_row() else []
            if len(store.segments()) >= 4 and running:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to give its claim back
    proc.wait()
    done_before = {(s.member, s.generation) for s in store.segments()}
    assert 4 <= len(done_before) < 9
    interrupted = next(m for m in store.members() if m.status == "running")

    again = driver(tmp_path)
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0, out.decode()[-3000:]
    segs = store.segments()
    assert sorted((s.member, s.generation) for s in segs) == sorted(
        (m, g) for m in range(3) for g in range(3)
    )
    assert all(s.status == "ok" for s in segs)  # never two runs of a member at once (the lock file)
    assert store.generation() == 3 and len(store.decisions()) == 3
    rerun = next(m for m in store.members() if m.member == interrupted.member)
    assert rerun.attempts >= 2  # the killed segment ran again, from the member's checkpoint
    assert b"report:" in out


def two_workers(tmp_path, storage: str) -> None:
    first, second = driver(tmp_path, storage=storage), driver(tmp_path, storage=storage)
    for p in (first, second):
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    store = PbtStore(storage, "s")
    segs = store.segments()
    assert len(segs) == 9 and all(s.status == "ok" for s in segs)  # never two runs of a member at once
    assert len({s.worker.rsplit(":", 1)[0] for s in segs}) == 2  # both processes trained members
    assert sum(e["kind"] == "exploit" for e in store.events()) == 2  # one decision per generation
    assert [d["generation"] for d in store.decisions()] == [0, 1, 2]
    store.engine.dispose()


def test_two_workers_share_one_study(tmp_path):
    two_workers(tmp_path, f"sqlite:///{tmp_path}/pbt.db")


def test_two_workers_share_one_study_on_postgresql(tmp_path):
    with postgres_server() as url:
        two_workers(tmp_path, url)
