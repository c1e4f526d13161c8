import math

import pytest
import torch

from mupfast.config import ScheduleConfig
from mupfast.optim.schedules import (
    KINDS,
    GroupLR,
    build_schedule,
    cyclic_cosine,
    cyclic_wsd,
    decay_steps,
    warmup_cosine,
    wsd,
)


def sched(kind, total=100, **kw):
    return build_schedule(ScheduleConfig(kind=kind, **kw), total)


# ---------------------------------------------------------------- warmup


@pytest.mark.parametrize("kind", KINDS)
def test_warmup_is_linear_from_near_zero_and_reaches_one_exactly_at_warmup_steps(kind):
    fn = sched(kind, total=100, warmup_steps=10, cycle_steps=50 if "cyclic" in kind else 0)
    assert fn(0) == pytest.approx(1 / 11)
    assert fn(0) > 0
    for t in range(10):
        assert fn(t) == pytest.approx((t + 1) / 11)
    assert fn(10) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_no_warmup_starts_at_peak(kind):
    assert sched(kind, warmup_steps=0)(0) == 1.0


def test_constant_holds_one_after_warmup_and_beyond_the_end():
    fn = sched("constant", total=50, warmup_steps=5)
    assert [fn(t) for t in (5, 20, 49, 50, 1000)] == [1.0] * 5


# ---------------------------------------------------------------- cosine


def test_cosine_values_at_warmup_end_midpoint_end_and_beyond():
    fn = sched("cosine", total=110, warmup_steps=10, min_lr_ratio=0.1)
    assert fn(10) == 1.0
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert fn(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert fn(110) == pytest.approx(0.1)
    assert fn(111) == fn(10_000) == fn(110)


def test_cosine_decreases_monotonically_after_warmup_and_never_below_floor():
    fn = sched("cosine", total=200, warmup_steps=20, min_lr_ratio=0.05)
    values = [fn(t) for t in range(20, 400)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(0.05)
    assert min(values) >= 0.05 - 1e-12
    warm = [fn(t) for t in range(21)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


# ---------------------------------------------------------------- WSD


def test_wsd_stable_until_decay_start_then_reaches_floor_at_the_end():
    fn = sched("wsd", total=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert decay_steps(100, 0.2) == 20
    assert all(fn(t) == 1.0 for t in range(10, 81))  # decay starts at 80
    assert fn(81) < 1.0
    assert fn(100) == pytest.approx(0.1)
    assert fn(150) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "shape, mid",
    [
        ("linear", 0.5),
        ("cosine", 0.5 * (1 + math.cos(math.pi / 2))),  # 0.5
        ("sqrt", 1 - math.sqrt(0.5)),  # ≈ 0.2929
    ],
)
def test_wsd_decay_shapes_at_midpoint_and_quarter(shape, mid):
    fn = sched("wsd", total=100, decay_fraction=0.4, decay_shape=shape, min_lr_ratio=0.2)
    # decay: 40 steps from 60 to 100; midpoint 80, quarter 70
    assert fn(80) == pytest.approx(0.2 + 0.8 * mid)
    quarter = {"linear": 0.75, "cosine": 0.5 * (1 + math.cos(math.pi / 4)), "sqrt": 0.5}[shape]
    assert fn(70) == pytest.approx(0.2 + 0.8 * quarter)
    values = [fn(t) for t in range(60, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_wsd_sqrt_decays_faster_early_than_linear_and_cosine():
    f = {
        s: sched("wsd", total=100, decay_fraction=0.5, decay_shape=s, min_lr_ratio=0.0)
        for s in ("linear", "cosine", "sqrt")
    }
    t = 60  # 20% into the decay
    assert f["sqrt"](t) < f["linear"](t) < f["cosine"](t)


def test_wsd_min_lr_ratio_zero_reaches_zero():
    assert sched("wsd", total=50, min_lr_ratio=0.0)(50) == 0.0


def test_wsd_without_decay_stays_at_one():
    fn = sched("wsd", total=40, decay_fraction=0.0, warmup_steps=4)
    assert [fn(t) for t in (4, 39, 40, 99)] == [1.0] * 4


def test_wsd_extension_identical_during_the_stable_phase_of_both():
    cfg = ScheduleConfig(
        kind="wsd", warmup_steps=50, decay_fraction=0.2, decay_shape="sqrt", min_lr_ratio=0.0
    )
    short, long = build_schedule(cfg, 1000), build_schedule(cfg, 2000)
    # short decays from 800, long from 1600: identical up to 800 (incl. warmup)
    assert [short(t) for t in range(801)] == [long(t) for t in range(801)]
    assert short(900) < 1.0 and long(900) == 1.0
    assert long(2000) == 0.0


def test_wsd_scheduler_resumed_with_a_larger_total_follows_the_new_total():
    """The schedule function is not checkpointed, so a resumed run may extend total_steps."""
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.5)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_mult": 1.0}], lr=1.0)
    s = GroupLR(opt, 1.0, build_schedule(cfg, 100))
    for _ in range(40):
        opt.step()
        s.step()
    state = s.state_dict()
    opt2 = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_mult": 1.0}], lr=1.0)
    s2 = GroupLR(opt2, 1.0, build_schedule(cfg, 400))
    s2.load_state_dict(state)
    for _ in range(100):  # to step 140: past the short run's end, inside the long one's stable phase
        opt2.step()
        s2.step()
    assert opt2.param_groups[0]["lr"] == 1.0


# ---------------------------------------------------------------- cycles


def test_cyclic_cosine_cycle_boundaries_and_peak_decay():
    fn = sched(
        "cyclic_cosine", total=300, cycle_steps=100, warmup_steps=10, min_lr_ratio=0.1, cycle_peak_decay=0.5
    )
    for k, peak in enumerate([1.0, 0.5, 0.25]):
        start = 100 * k
        assert fn(start) == pytest.approx(peak / 11)  # each cycle restarts its warmup
        assert fn(start + 10) == pytest.approx(peak)
        assert fn(start + 55) == pytest.approx(0.1 + (peak - 0.1) * 0.5)
        assert fn(start + 99) == pytest.approx(0.1 + (peak - 0.1) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert fn(300) == pytest.approx(0.1)  # end of the last cycle, held
    assert fn(1000) == pytest.approx(0.1)


def test_cyclic_peaks_never_fall_below_the_floor():
    fn = sched("cyclic_cosine", total=1000, cycle_steps=100, min_lr_ratio=0.2, cycle_peak_decay=0.5)
    assert fn(300) == pytest.approx(0.2)  # 0.5**3 = 0.125 < 0.2
    assert min(fn(t) for t in range(1001)) >= 0.2 - 1e-12


def test_cyclic_with_zero_cycle_steps_equals_the_single_schedule():
    cos = sched("cyclic_cosine", total=120, warmup_steps=7, cycle_peak_decay=0.3)
    ref = sched("cosine", total=120, warmup_steps=7)
    assert [cos(t) for t in range(200)] == [ref(t) for t in range(200)]
    cw = sched("cyclic_wsd", total=120, warmup_steps=7, decay_shape="cosine")
    ref = sched("wsd", total=120, warmup_steps=7, decay_shape="cosine")
    assert [cw(t) for t in range(200)] == [ref(t) for t in range(200)]


def test_cyclic_wsd_cycles_are_stable_then_decay_with_decaying_peaks():
    fn = sched(
        "cyclic_wsd",
        total=200,
        cycle_steps=50,
        warmup_steps=5,
        decay_fraction=0.2,
        min_lr_ratio=0.0,
        cycle_peak_decay=0.8,
    )
    for k in range(4):
        peak, start = 0.8**k, 50 * k
        assert fn(start) == pytest.approx(peak / 6)
        assert all(fn(t) == pytest.approx(peak) for t in range(start + 5, start + 41))
        assert fn(start + 45) == pytest.approx(peak * 0.5)  # linear decay over 10 steps from 40
    assert fn(200) == 0.0


def test_partial_last_cycle_holds_its_value_at_total_steps():
    fn = sched("cyclic_cosine", total=150, cycle_steps=100, min_lr_ratio=0.0)
    assert fn(150) == pytest.approx(0.5)  # halfway through the second cycle's cosine
    assert fn(500) == fn(150)
    direct = cyclic_cosine(149, total_steps=150, cycle_steps=100, min_lr_ratio=0.0)
    assert direct == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 100)))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kind, total, kw, match",
    [
        ("cosine", 100, {"warmup_steps": 100}, r"warmup_steps \(100\).*total_steps \(100\)"),
        ("cosine", 100, {"warmup_steps": 150}, r"warmup_steps \(150\)"),
        ("constant", 10, {"warmup_steps": 10}, r"warmup_steps \(10\)"),
        ("cosine", 0, {}, r"total_steps must be positive \(got 0\)"),
        ("wsd", 100, {"warmup_steps": 90, "decay_fraction": 0.2}, r"warmup_steps \(90\) overlaps the decay"),
        (
            "cyclic_cosine",
            100,
            {"cycle_steps": 10, "warmup_steps": 10},
            r"warmup_steps \(10\).*cycle_steps \(10\)",
        ),
        ("cyclic_wsd", 100, {"cycle_steps": 20, "warmup_steps": 18}, r"overlaps the decay"),
        ("cyclic_cosine", 100, {"cycle_peak_decay": 0.0}, r"cycle_peak_decay"),
        ("cyclic_wsd", 100, {"cycle_steps": -1}, r"cycle_steps must be non-negative"),
        ("wsd", 100, {"decay_fraction": 1.5}, r"decay_fraction"),
        ("wsd", 100, {"decay_shape": "exp"}, r"decay_shape"),
        ("cosine", 100, {"min_lr_ratio": -0.1}, r"min_lr_ratio"),
        ("linear", 100, {}, r"kind must be one of"),
    ],
)
def test_invalid_arguments_raise_value_errors_naming_the_values(kind, total, kw, match):
    with pytest.raises(ValueError, match=match):
        sched(kind, total=total, **kw)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="non-negative"):
        sched("cosine")(-1)
    with pytest.raises(ValueError, match="non-negative"):
        wsd(-3, total_steps=10)


def test_pure_functions_match_the_builder():
    fn = sched("cyclic_wsd", total=90, cycle_steps=30, warmup_steps=3, decay_fraction=0.5, decay_shape="sqrt")
    for t in range(0, 120, 7):
        assert fn(t) == cyclic_wsd(
            t, total_steps=90, cycle_steps=30, warmup_steps=3, decay_fraction=0.5, decay_shape="sqrt"
        )
    assert sched("cosine", total=20)(5) == warmup_cosine(5, total_steps=20)


# ---------------------------------------------------------------- GroupLR


def _optimizer():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    return torch.optim.AdamW([{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 0.25}])


SCHEDULE_CONFIGS = [
    ScheduleConfig(kind="constant", warmup_steps=3),
    ScheduleConfig(kind="cosine", warmup_steps=3),
    ScheduleConfig(kind="wsd", warmup_steps=3, decay_shape="sqrt"),
    ScheduleConfig(kind="cyclic_cosine", warmup_steps=2, cycle_steps=10, cycle_peak_decay=0.7),
    ScheduleConfig(kind="cyclic_wsd", warmup_steps=2, cycle_steps=10, cycle_peak_decay=0.7),
]


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS, ids=lambda c: c.kind)
def test_group_lr_keeps_group_ratios_and_resumes_identically(cfg):
    total = 30
    fn = build_schedule(cfg, total)
    opt = _optimizer()
    s = GroupLR(opt, 1e-3, fn)
    lrs = []
    for t in range(total + 5):
        g0, g1 = (g["lr"] for g in opt.param_groups)
        assert g0 == pytest.approx(1e-3 * fn(t), rel=1e-12)
        assert g0 / g1 == pytest.approx(4.0, rel=1e-12)
        lrs.append((g0, g1))
        opt.step()
        s.step()
        if t == 12:
            state, opt_state = s.state_dict(), opt.state_dict()

    for optimizer_first in (True, False):  # DeepSpeed builds the scheduler, then loads both
        opt2 = _optimizer()
        if optimizer_first:
            opt2.load_state_dict(opt_state)
        s2 = GroupLR(opt2, 1e-3, build_schedule(cfg, total))
        if not optimizer_first:
            opt2.load_state_dict(opt_state)
        s2.load_state_dict(state)
        for t in range(13, total + 5):
            assert tuple(g["lr"] for g in opt2.param_groups) == pytest.approx(lrs[t], rel=1e-12)
            assert s2.get_last_lr() == pytest.approx(list(lrs[t]), rel=1e-12)
            opt2.step()
            s2.step()


# ---------------------------------------------------------------- piecewise (PBT replay)


@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd"])
def test_piecewise_replays_its_multipliers_on_top_of_the_shape(kind):
    pieces = [[0.0, 1.0], [0.25, 1.2], [0.5, 1.44], [0.75, 0.8]]
    total = 40
    fn, shape = sched(kind, total, warmup_steps=5, piecewise=pieces), sched(kind, total, warmup_steps=5)
    expected = [1.0] * 10 + [1.2] * 10 + [1.44] * 10 + [0.8] * 11  # 41: the held value at total_steps
    assert [fn(t) / shape(t) for t in range(total + 1)] == pytest.approx(expected, rel=1e-12)


def test_piecewise_pieces_start_at_their_fraction_of_any_run_length():
    pieces = [[0.0, 2.0], [0.3, 0.5]]
    for total in (10, 17, 1000):  # a schedule found on a 10-step proxy, replayed over longer targets
        fn = sched("constant", total, piecewise=pieces)
        start = math.floor(0.3 * total + 0.5)
        assert fn(start - 1) == 2.0 and fn(start) == 0.5


@pytest.mark.parametrize(
    "pieces, match",
    [
        ([[0.1, 1.0]], "starts at fraction 0.0"),
        ([[0.0, 1.0], [0.5, 2.0], [0.4, 1.0]], "fractions must increase"),
        ([[0.0, 1.0], [1.0, 2.0]], r"in \[0, 1\)"),
        ([[0.0, 0.0]], "multiplier must be positive"),
        ([[0.0, 1.0, 2.0]], r"expected \[fraction, multiplier\]"),
    ],
)
def test_bad_piecewise_pieces_are_errors(pieces, match):
    with pytest.raises(ValueError, match=match):
        sched("constant", 10, piecewise=pieces)
