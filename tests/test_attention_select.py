"""The per-shape attention backend selector: measured choice, disk cache, fallbacks, logging.

CPU tests inject a timer (made-up milliseconds, calls counted) and the device name / versions; the GPU test
runs the real measurement and checks the chosen backend against the float64 reference.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import mupfast.ops.attention_select as sel
from mupfast.ops.attention_select import (
    CANDIDATES,
    DOC_CANDIDATES,
    BackendSelector,
    ShapeKey,
    run_attention,
    select_backend,
)
from tests.helpers import ROOT

VERSIONS = {"torch": "9.9", "triton": "3.9", "flash_attn": "absent", "mupfast_attention_kernel": "abc"}
KEY_A = ShapeKey(head_dim=64, seq_len=1024, causal=True, group=1, dtype="bfloat16")
KEY_B = ShapeKey(head_dim=128, seq_len=4096, causal=True, group=4, dtype="bfloat16")


class FakeTimer:
    """Returns the table's milliseconds per (key, candidate); raises for names in ``fail``; counts calls."""

    def __init__(self, table: dict[ShapeKey, dict[str, float]], fail: tuple[str, ...] = ()):
        self.table, self.fail, self.calls = table, fail, []

    def __call__(self, name: str, key: ShapeKey) -> float:
        self.calls.append((name, key))
        if name in self.fail:
            raise RuntimeError(f"No available kernel for {name}")
        return self.table[key][name]


def passing(name: str, key: ShapeKey) -> None:
    """A check every candidate passes (tests/test_dispatch.py checks the checking)."""
    return None


def random_table(rng: random.Random, keys, winners: dict) -> dict:
    """Random timings where ``winners[key]`` is the fastest by a clear margin."""
    table = {}
    for key in keys:
        ms = {n: rng.uniform(2.0, 5.0) for n in CANDIDATES}
        ms[winners[key]] = rng.uniform(0.5, 1.5)
        table[key] = ms
    return table


def fastest(ms: dict[str, float], among=CANDIDATES) -> str:
    return min(among, key=lambda n: ms[n])


def make(tmp_path, timer, **kw) -> BackendSelector:
    kw.setdefault("device_name", "Fake GPU 80GB")
    kw.setdefault("versions", VERSIONS)
    kw.setdefault("check", passing)
    return BackendSelector(cache_path=tmp_path / "attention_backends.json", timer=timer, **kw)


@pytest.fixture
def rng(request):
    return random.Random(request.node.name)


def test_picks_the_fastest_measured_candidate_per_shape_key(tmp_path, rng):
    # Different winners per key, so a selector that ignored the key (or the timings) would fail one.
    a, b = rng.sample(CANDIDATES, 2)
    table = random_table(rng, [KEY_A, KEY_B], {KEY_A: a, KEY_B: b})
    timer = FakeTimer(table)
    s = make(tmp_path, timer)
    assert s.choose(KEY_A) == fastest(table[KEY_A]) == a
    assert s.choose(KEY_B) == fastest(table[KEY_B]) == b
    assert set(timer.calls) == {(n, k) for k in (KEY_A, KEY_B) for n in CANDIDATES}  # no document candidate
    assert len(timer.calls) == 2 * len(CANDIDATES)
    # A second ask is answered from memory.
    assert s.choose(KEY_A) == a and len(timer.calls) == 2 * len(CANDIDATES)


def test_a_new_selector_reads_the_choice_from_the_cache_file(tmp_path, rng):
    winner = rng.choice(CANDIDATES)
    table = random_table(rng, [KEY_A], {KEY_A: winner})
    make(tmp_path, FakeTimer(table)).choose(KEY_A)
    on_disk = json.loads((tmp_path / "attention_backends.json").read_text())
    (env,) = on_disk["environments"].values()
    assert env[KEY_A.label()]["ms"] == pytest.approx(table[KEY_A])

    second = FakeTimer(table)
    assert make(tmp_path, second).choose(KEY_A) == winner
    assert second.calls == []


@pytest.mark.parametrize(
    "change",
    [
        {"device_name": "Other GPU 141GB"},
        {"versions": {**VERSIONS, "torch": "10.0"}},
        {"versions": {**VERSIONS, "mupfast_attention_kernel": "def"}},
    ],  # fmt: skip
    ids=["device", "torch", "kernel"],
)
def test_another_device_or_version_measures_again_and_keeps_the_first(tmp_path, rng, change):
    table = random_table(rng, [KEY_A], {KEY_A: rng.choice(CANDIDATES)})
    make(tmp_path, FakeTimer(table)).choose(KEY_A)
    other = FakeTimer(table)
    make(tmp_path, other, **change).choose(KEY_A)
    assert len(other.calls) == len(CANDIDATES)
    # Both environments' choices are on disk: the first is still answered without measuring.
    again = FakeTimer(table)
    make(tmp_path, again).choose(KEY_A)
    assert again.calls == []
    assert len(json.loads((tmp_path / "attention_backends.json").read_text())["environments"]) == 2


def test_a_candidate_that_raises_is_skipped_and_logged(tmp_path, rng, caplog):
    winner = rng.choice(CANDIDATES)
    table = random_table(rng, [KEY_A], {KEY_A: winner})
    timer = FakeTimer(table, fail=(winner,))
    with caplog.at_level(logging.INFO, logger=sel.__name__):
        choice = make(tmp_path, timer).choose(KEY_A)
    assert choice == fastest(table[KEY_A], [n for n in CANDIDATES if n != winner])
    assert choice != winner
    assert f"{winner}: RuntimeError" in caplog.text


@pytest.fixture
def cli_logging(monkeypatch):
    """The ``mupfast`` logger as the CLI sets it up; put back as it was afterwards."""
    from mupfast.cli import configure_logging

    logger = logging.getLogger("mupfast")
    level, handlers = logger.level, list(logger.handlers)
    monkeypatch.delenv("MUPFAST_LOG_LEVEL", raising=False)
    yield configure_logging
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_the_cli_shows_the_choice_on_stderr(tmp_path, rng, capsys, cli_logging):
    winner = rng.choice(CANDIDATES)
    table = random_table(rng, [KEY_A], {KEY_A: winner})
    cli_logging()
    cli_logging()  # twice (main is called again in one process): still one line per message
    make(tmp_path, FakeTimer(table)).choose(KEY_A)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "chose" in ln]
    assert len(lines) == 1 and lines[0].startswith(
        f"{sel.__name__}: attention {KEY_A.label()}: chose {winner}"
    )


def test_a_bad_log_level_is_a_config_error(monkeypatch, cli_logging):
    from mupfast.errors import ConfigError

    monkeypatch.setenv("MUPFAST_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match="MUPFAST_LOG_LEVEL"):
        cli_logging()


def test_when_no_candidate_runs_it_uses_triton_and_caches_nothing(tmp_path, caplog):
    timer = FakeTimer({}, fail=CANDIDATES)
    with caplog.at_level(logging.WARNING, logger=sel.__name__):
        assert make(tmp_path, timer).choose(KEY_A) == "triton"
    assert "no candidate ran" in caplog.text
    assert not (tmp_path / "attention_backends.json").exists()


def _qk(key: ShapeKey, batch=2, kv_heads=2):
    dtype = getattr(torch, key.dtype)
    q = torch.randn(batch, kv_heads * key.group, key.seq_len, key.head_dim, dtype=dtype)
    return q, torch.randn(batch, kv_heads, key.seq_len, key.head_dim, dtype=dtype)


@pytest.mark.parametrize("need", ["needs_lse", "has_doc_ids", "deterministic"])  # has_doc_ids: ids not given
def test_needs_only_our_kernel_gives_return_triton_without_measuring(tmp_path, rng, need):
    key = ShapeKey(16, 8, True, 2, "float32")
    # Someone else is fastest, so a measured answer would not be "triton".
    table = random_table(rng, [key], {key: rng.choice([n for n in CANDIDATES if n != "triton"])})
    timer = FakeTimer(table)
    s = make(tmp_path, timer)
    q, k = _qk(key)
    assert s.select(q, k, causal=True, **{need: True}) == "triton"
    assert timer.calls == []
    assert s.select(q, k, causal=True) == fastest(table[key]) != "triton"


def test_torch_deterministic_mode_also_returns_triton(tmp_path, rng):
    key = ShapeKey(16, 8, True, 2, "float32")
    table = random_table(rng, [key], {key: "sdpa_flash"})
    timer = FakeTimer(table)
    q, k = _qk(key)
    torch.use_deterministic_algorithms(True)
    try:
        assert make(tmp_path, timer).select(q, k, causal=True) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)
    assert timer.calls == []


def test_select_builds_the_key_from_the_tensors(tmp_path, rng):
    key = ShapeKey(head_dim=16, seq_len=12, causal=False, group=3, dtype="float16")
    table = random_table(rng, [key], {key: rng.choice(CANDIDATES)})
    timer = FakeTimer(table)  # a KeyError here would mean a wrong key
    q, k = _qk(key, batch=3, kv_heads=2)
    assert make(tmp_path, timer).select(q, k, causal=False) == fastest(table[key])
    assert {c[1] for c in timer.calls} == {key}


def test_select_backend_on_cpu_never_measures(monkeypatch, tmp_path, rng):
    key = ShapeKey(16, 8, True, 1, "float32")
    timer = FakeTimer(random_table(rng, [key], {key: "sdpa_cudnn"}))
    monkeypatch.setattr(sel, "_DEFAULT", make(tmp_path, timer))
    assert select_backend(*_qk(key), causal=True) == "triton"
    assert timer.calls == []


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b'{"format": 999, "environments": {}}', b"\xff\xfe\x00"]
)
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_replaced(tmp_path, rng, caplog, content):
    (tmp_path / "attention_backends.json").write_bytes(content)
    table = random_table(rng, [KEY_A], {KEY_A: rng.choice(CANDIDATES)})
    timer = FakeTimer(table)
    with caplog.at_level(logging.WARNING, logger=sel.__name__):
        assert make(tmp_path, timer).choose(KEY_A) == fastest(table[KEY_A])
    assert "ignoring" in caplog.text and len(timer.calls) == len(CANDIDATES)
    # Rewritten whole: the next selector reads it without measuring.
    again = FakeTimer(table)
    make(tmp_path, again).choose(KEY_A)
    assert again.calls == []


def test_a_cached_choice_outside_the_candidates_picks_the_best_allowed(tmp_path, rng):
    winner = rng.choice(CANDIDATES)
    table = random_table(rng, [KEY_A], {KEY_A: winner})
    make(tmp_path, FakeTimer(table)).choose(KEY_A)
    allowed = tuple(n for n in CANDIDATES if n != winner)
    timer = FakeTimer(table)
    assert make(tmp_path, timer, candidates=allowed).choose(KEY_A) == fastest(table[KEY_A], allowed)
    assert timer.calls == []


def test_the_log_names_the_choice_and_the_timings_once_per_key(tmp_path, rng, caplog):
    winner = rng.choice(CANDIDATES)
    table = random_table(rng, [KEY_A], {KEY_A: winner})
    s = make(tmp_path, FakeTimer(table))
    with caplog.at_level(logging.INFO, logger=sel.__name__):
        s.choose(KEY_A)
        s.choose(KEY_A)
    lines = [r.getMessage() for r in caplog.records if KEY_A.label() in r.getMessage()]
    assert len(lines) == 1
    assert f"chose {winner}" in lines[0]
    assert all(f"{n} {table[KEY_A][n]:.3f} ms" in lines[0] for n in CANDIDATES)


def test_cache_path_follows_mupfast_cache_dir(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("MUPFAST_CACHE_DIR", str(tmp_path / "elsewhere"))
    table = random_table(rng, [KEY_A], {KEY_A: rng.choice(CANDIDATES)})
    BackendSelector(timer=FakeTimer(table), check=passing, device_name="Fake", versions=VERSIONS).choose(
        KEY_A
    )
    assert (tmp_path / "elsewhere" / "attention_backends.json").exists()


def test_a_hit_under_torch_compile_does_not_break_the_graph(tmp_path, rng):
    key = ShapeKey(16, 8, True, 2, "float32")
    table = random_table(rng, [key], {key: "sdpa_flash"})
    timer = FakeTimer(table)
    s = make(tmp_path, timer)
    q, k = _qk(key)

    def f(q, k):
        return q * 2 if s.select(q, k, causal=True) == "sdpa_flash" else q

    torch._dynamo.reset()
    # The miss measures outside the graph (a graph break, once)...
    assert torch.equal(torch.compile(f, backend="eager")(q, k), q * 2)
    assert len(timer.calls) == len(CANDIDATES)
    # ...and a hit is plain Python dynamo traces: fullgraph would raise on a break.
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(q, k), q * 2)
    assert len(timer.calls) == len(CANDIDATES)


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mupfast.ops.attention_select import BackendSelector, ShapeKey
    calls = []
    def timer(name, key):
        calls.append(name)
        time.sleep(0.01)
        return float(hash((name, key.seq_len)) % 1000)
    s = BackendSelector(Path(sys.argv[1]), timer=timer, check=lambda n, k: None, device_name="Fake",
                        versions={"v": "1"})
    for t in range(8):
        s.choose(ShapeKey(64, 128 * (t + 1), True, 1, "bfloat16"))
    print(len(calls))
    """
)


def test_concurrent_ranks_measure_each_key_once_and_keep_the_file_whole(tmp_path):
    path = tmp_path / "attention_backends.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # The lock makes ranks take turns: whoever is first measures a key, the others read its choice.
    assert sum(int(o) for o in outs) == 8 * len(CANDIDATES)
    (entries,) = json.loads(path.read_text())["environments"].values()
    assert len(entries) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", [1, 2])
def test_gpu_the_chosen_backend_matches_the_reference(tmp_path, caplog, group):
    from mupfast.kernels.attention import attention_reference, mup_attention

    B, Hkv, T, D = 2, 2, 384, 64
    g = torch.Generator(device="cuda").manual_seed(group)
    q = torch.randn(B, Hkv * group, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    scale = 4.0 / D  # μP α/d with α = 4
    s = BackendSelector(cache_path=tmp_path / "attention_backends.json")
    with caplog.at_level(logging.INFO, logger=sel.__name__):
        choice = s.select(q, k, causal=True)
    assert choice in CANDIDATES and f"chose {choice}" in caplog.text
    ref = attention_reference(q.double(), k.double(), v.double(), scale=scale, causal=True)
    (record,) = next(iter(s._read().values())).values()
    # Every candidate that ran (the chosen one included) must compute the same attention.
    for name in record["ms"]:
        if name == "triton":
            y = mup_attention(q, k, v, scale=scale, causal=True)
        else:
            y = run_attention(name, q, k, v, scale=scale, causal=True)
        assert y.shape == q.shape and y.dtype == q.dtype
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, err)  # bf16 rounding of o is ~4e-3 relative; a wrong mask/scale is > 0.1


def test_packed_documents_are_decided_among_the_document_candidates(tmp_path, rng):
    key = ShapeKey(16, 8, True, 2, "float32", docs=True)
    table = {key: {"triton": 3.0, "flex": 1.0, "flash_attn_varlen": 2.0}}
    timer = FakeTimer(table)
    q, k = _qk(key)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * q.shape[0])
    s = make(tmp_path, timer)
    assert s.select(q, k, causal=True, doc_ids=doc_ids) == "flex"
    assert sorted(timer.calls) == sorted((n, key) for n in DOC_CANDIDATES)
    # The same shape without documents is another key, decided among the others.
    plain = ShapeKey(16, 8, True, 2, "float32")
    timer.table[plain] = {n: 1.0 + i for i, n in enumerate(CANDIDATES)}
    assert s.select(q, k, causal=True) == "triton"
    assert key.label() == plain.label() + "-docs"
