"""The dispatch layer (mupfast.ops.dispatch): every candidate is checked against a reference before it is
timed; a wrong or non-finite one is rejected and never cached, a device fault is raised naming its candidate,
an unavailable one is skipped with its reason, and every decision reaches the run directory.

The mechanism runs on CPU with injected timings; the checks compare real candidates (readout and attention,
our Triton kernels under the interpreter) with the fp64 reference on fresh random inputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from mupfast import rundir
from mupfast.ops import attention_select, clip_adamw, dispatch, newton_schulz, readout
from mupfast.ops.dispatch import CandidateFault, Dispatcher, Unavailable

VERSIONS = {"torch": "9.9", "kernel": "abc"}


@dataclass(frozen=True)
class Key:
    n: int

    def label(self) -> str:
        return f"n{self.n}"


def scaled_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum(dim=-1)


#: A small op with one right candidate, one returning NaN and one off by 1e-1 (relative).
WRONG = {"good": lambda y: y, "nan": lambda y: y * float("nan"), "off": lambda y: y * 1.1}


def check_by_running(name: str, key: Key) -> str | None:
    """A real check: the candidate against the fp64 reference on fresh random inputs."""
    if name == "absent":
        raise Unavailable("its package is not installed")
    x, w = torch.randn(key.n, 8), torch.randn(8)
    got = {"y": WRONG[name](scaled_sum(x, w))}
    return dispatch.mismatch(
        got, {"y": scaled_sum(x.double(), w.double())}, dispatch.tolerance(torch.float32)
    )


class Timer:
    def __init__(self, ms: dict[str, float]):
        self.ms, self.calls = ms, []

    def __call__(self, name: str, key) -> float:
        self.calls.append(name)
        return self.ms[name]


def make(tmp_path, candidates, timer, check=check_by_running) -> Dispatcher:
    return Dispatcher("toy", candidates, fallback=candidates[0], cache_path=tmp_path / "toy_backends.json",
                      check=check, timer=timer, device_name="Fake GPU", versions=VERSIONS)  # fmt: skip


@pytest.mark.parametrize("wrong", ["nan", "off"])
def test_a_wrong_candidate_is_never_chosen_even_when_fastest_and_never_cached(tmp_path, caplog, wrong):
    timer = Timer({"good": 2.0, wrong: 0.5})
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        assert make(tmp_path, (wrong, "good"), timer).choose(Key(64)) == "good"
    assert timer.calls == ["good"]  # the wrong one is not even timed
    text = (tmp_path / "toy_backends.json").read_text()
    assert wrong not in text and "good" in text
    (line,) = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert "chose good" in line and f"rejected {wrong}: " in line
    assert ("non-finite y" if wrong == "nan" else "y off: relative error 1.00e-01") in line
    # A new process reads the cached choice and never runs the wrong one.
    again = Timer({})
    assert make(tmp_path, (wrong, "good"), again, check=None).choose(Key(64)) == "good"
    assert again.calls == []


def test_when_every_candidate_is_wrong_the_fallback_is_used_and_nothing_cached(tmp_path, caplog):
    d = Dispatcher("toy", ("nan", "off"), fallback="good", cache_path=tmp_path / "t.json",
                   check=check_by_running, timer=Timer({}), device_name="F", versions=VERSIONS)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        assert d.choose(Key(8)) == "good"
    assert "no candidate ran" in caplog.text and "rejected nan: non-finite y" in caplog.text
    assert not (tmp_path / "t.json").exists()
    # A fallback found wrong itself is not taken: the op's plain torch path is.
    d = Dispatcher("toy", ("nan", "off"), fallback="nan", cache_path=tmp_path / "t.json",
                   check=check_by_running, timer=Timer({}), device_name="F", versions=VERSIONS)  # fmt: skip
    assert d.choose(Key(8)) == "torch" and dispatch.decisions()[-1]["choice"] == "torch"


def _cuda_error(msg: str) -> torch.cuda.CudaError:
    """torch.cuda.CudaError without a CUDA runtime (its constructor asks the runtime for the message)."""
    e = torch.cuda.CudaError.__new__(torch.cuda.CudaError)
    RuntimeError.__init__(e, msg)
    return e


FAULTS = [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"),
    _cuda_error("an illegal instruction was encountered"),
]
if hasattr(torch, "AcceleratorError"):
    FAULTS.append(torch.AcceleratorError("unspecified launch failure"))


@pytest.mark.parametrize("where", ["check", "timer"])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda e: type(e).__name__ + str(e)[:12])
def test_a_device_fault_is_raised_naming_the_candidate(tmp_path, fault, where):
    def check(name, key):
        if where == "check" and name == "faulty":
            raise fault

    def timer(name, key):
        if where == "timer" and name == "faulty":
            raise fault
        return 1.0

    d = make(tmp_path, ("good", "faulty"), timer, check=check)
    with pytest.raises(CandidateFault, match="toy candidate 'faulty' faulted the device at n16") as err:
        d.choose(Key(16))
    assert err.value.candidate == "faulty" and err.value.__cause__ is fault
    assert not (tmp_path / "toy_backends.json").exists()
    assert dispatch.decisions()[-1]["fault"] == "faulty"


@pytest.mark.parametrize(
    "error, fault",
    [
        (RuntimeError("CUDA error: misaligned address"), True),
        (RuntimeError("No available kernel. Aborting execution."), False),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), False),
        (ValueError("head dim 320 is not supported"), False),
    ],
)
def test_what_counts_as_a_device_fault(error, fault):
    assert dispatch.is_device_fault(error) is fault


def test_an_unavailable_or_refusing_candidate_is_skipped_with_its_reason(tmp_path, caplog):
    def check(name, key):
        if name == "refuses":
            raise RuntimeError("No available kernel. Aborting execution.")
        return check_by_running(name, key)

    timer = Timer({"good": 3.0, "absent": 0.1, "refuses": 0.1})
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        assert make(tmp_path, ("absent", "refuses", "good"), timer, check=check).choose(Key(4)) == "good"
    assert (
        "skipped absent: its package is not installed; refuses: RuntimeError: No available kernel"
        in caplog.text
    )
    record = dispatch.decisions()[-1]
    assert record["skipped"]["absent"] == "its package is not installed" and record["choice"] == "good"


@pytest.fixture
def run_dir(tmp_path):
    """A run directory every decision is written to, as the trainer registers it."""
    run = tmp_path / "run"
    dispatch.on_decision(lambda decisions: rundir.write_dispatch(run, decisions))
    yield run
    dispatch.on_decision(None)


def _written(run) -> list[dict]:
    return json.loads((run / rundir.DISPATCH).read_text())["decisions"]


def test_the_decisions_are_written_to_the_run_directory_as_they_are_made(tmp_path, run_dir):
    make(tmp_path, ("nan", "good"), Timer({"good": 1.5, "nan": 0.1})).choose(Key(32))
    mine = _written(run_dir)[-1]
    assert mine["op"] == "toy" and mine["key"] == "n32" and mine["choice"] == "good"
    assert mine["ms"] == {"good": 1.5} and "non-finite" in mine["rejected"]["nan"]
    assert mine["source"] == "measured"

    def faulting(name, key):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(CandidateFault):
        make(tmp_path, ("good",), Timer({}), check=faulting).choose(Key(33))
    assert _written(run_dir)[-1] == {
        "op": "toy", "key": "n33", "choice": None, "fault": "good",
        "error": "CUDA error: an illegal memory access was encountered",
    }  # fmt: skip


def test_the_trainer_records_its_decisions_in_its_run_directory(tmp_path):
    import mupfast.train as trainer
    from tests.helpers import tiny_config

    cfg = tiny_config("train.steps=1", "train.eval_every=0", tmp_path=tmp_path)
    result = trainer.train(cfg)
    try:
        make(tmp_path, ("good",), Timer({"good": 1.0})).choose(Key(34))  # CPU decides nothing: one made here
    finally:
        dispatch.on_decision(None)
    assert _written(result.run_dir)[-1]["key"] == "n34"


def test_each_hot_op_lists_its_peers():
    assert set(attention_select.CANDIDATES) == {"triton", "sdpa_cudnn", "sdpa_flash", "flash_attn"}
    assert set(attention_select.DOC_CANDIDATES) == {"triton", "flex", "flash_attn_varlen"}
    assert set(readout.CANDIDATES) == {"triton", "liger", "torch"}
    assert set(newton_schulz.CANDIDATES) == {"triton", "torch_compile", "torch"}
    assert set(clip_adamw.STEP_CANDIDATES) == {"triton", "torch_fused", "torch"}
    assert set(clip_adamw.NORM_CANDIDATES) == {"triton", "torch_foreach", "torch"}


# ------------------------------------------------------------------ the real checks, on CPU ----------------
READOUT_KEY = readout.ReadoutKey(rows=24, hidden=32, vocab=70, dtype="float32", stats=True)


def test_the_readout_check_runs_our_kernel_and_torch_against_the_fp64_reference():
    cpu = torch.device("cpu")
    assert readout.check_candidate("triton", READOUT_KEY, device=cpu) is None  # under the interpreter
    assert readout.check_candidate("torch", READOUT_KEY, device=cpu) is None
    with pytest.raises(Unavailable):
        readout.check_candidate("liger", readout.ReadoutKey(24, 32, 70, "float32", stats=False), device=cpu)


@pytest.mark.parametrize("wrong", ["nan", "off", "unscaled"])
def test_a_readout_kernel_gone_wrong_is_rejected_and_torch_chosen(tmp_path, monkeypatch, wrong):
    real = readout.run_readout

    def broken(name, *args, **kw):
        if name == "triton" and wrong == "unscaled":  # a peer that drops the μP logit multiplier
            return real(name, *args, **{**kw, "logit_scale": 1.0})
        loss, stats = real(name, *args, **kw)
        return (WRONG[wrong](loss) if name == "triton" else loss), stats

    monkeypatch.setattr(readout, "run_readout", broken)
    cpu = torch.device("cpu")
    assert "loss" in readout.check_candidate("triton", READOUT_KEY, device=cpu)
    d = readout.ReadoutDispatcher(cache_path=tmp_path / "r.json", timer=Timer({"triton": 0.1, "torch": 9.0}),
                                  device_name="F", versions=VERSIONS)  # fmt: skip
    assert d.choose(READOUT_KEY, check=partial(readout.check_candidate, device=cpu), device=cpu) == "torch"
    assert "triton" not in (tmp_path / "r.json").read_text()


def test_liger_is_a_readout_candidate_only_where_statistics_are_not_needed():
    d = readout.ReadoutDispatcher()
    assert "liger" not in d.candidates_for(READOUT_KEY)
    assert "liger" in d.candidates_for(readout.ReadoutKey(24, 32, 70, "bfloat16", stats=False))


def test_off_cuda_auto_stays_torch_and_gives_the_statistics():
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    assert readout.readout_backend("auto", h, w, stats=False) == "torch"
    loss, stats = readout.linear_cross_entropy(h, w, torch.randint(0, 11, (6,)), logit_scale=0.5, stats=False)
    assert torch.isfinite(loss) and set(stats) == {"max_abs_logit", "lse_sq_mean"}


@pytest.mark.parametrize("docs", [False, True])
def test_the_attention_check_runs_our_kernel_against_the_fp64_reference(docs):
    key = attention_select.ShapeKey(head_dim=16, seq_len=32, causal=True, group=2, dtype="float32", docs=docs)
    doc_ids = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [0] * 32]) if docs else None
    check = partial(attention_select.check_candidate, device=torch.device("cpu"), doc_ids=doc_ids)
    assert check("triton", key) is None
    with pytest.raises(Unavailable):
        check("flex" if docs else "flash_attn", key)


NS_KEY = newton_schulz.NSKey(shape=(2, 24, 40), dtype="float32", iteration="float32", steps=5)


def test_the_newton_schulz_check_runs_our_kernel_and_torch_against_the_fp64_iteration():
    cpu = torch.device("cpu")
    assert newton_schulz.check_candidate("torch", NS_KEY, device=cpu) is None
    assert newton_schulz.check_candidate("triton", NS_KEY, device=cpu) is None  # under the interpreter


def test_a_newton_schulz_kernel_gone_wrong_is_rejected(tmp_path, monkeypatch):
    real = newton_schulz.run_newton_schulz
    monkeypatch.setattr(
        newton_schulz, "run_newton_schulz", lambda name, *a: real(name, *a) * (1.1 if name == "triton" else 1)
    )
    cpu = torch.device("cpu")
    d = Dispatcher("newton_schulz", ("triton", "torch"), fallback="torch", cache_path=tmp_path / "n.json",
                   timer=Timer({"triton": 0.1, "torch": 5.0}), device_name="F", versions=VERSIONS)  # fmt: skip
    assert d.choose(NS_KEY, check=partial(newton_schulz.check_candidate, device=cpu), device=cpu) == "torch"
    assert "u off: relative error 1.00e-01" in dispatch.decisions()[-1]["rejected"]["triton"]


def test_newton_schulz_auto_off_cuda_is_the_torch_iteration():
    g = torch.randn(16, 8)
    assert torch.equal(newton_schulz.newton_schulz_auto(g), newton_schulz.newton_schulz_reference(g))


def _optimizer_tensors(dtype=torch.float32):
    """Parameters (two groups, one tensor larger than the sample), their gradients and fresh moments."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).to(dtype) for n in (300, 17, 64)]
    grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    return params, grads, [0, 1, 1]


@pytest.mark.parametrize("name", clip_adamw.NORM_CANDIDATES)
def test_the_grad_norm_check_runs_each_candidate_against_the_fp64_sum(name):
    params, grads, groups = _optimizer_tensors()
    key, layout = clip_adamw._key([grads], groups, 2)
    assert clip_adamw.check_norms(name, key, layout=layout, device=torch.device("cpu")) is None


@pytest.mark.parametrize("name", clip_adamw.STEP_CANDIDATES)
def test_the_clip_adamw_check_runs_each_candidate_against_the_reference(name, monkeypatch):
    monkeypatch.setattr(clip_adamw, "SAMPLE_ELEMENTS", 200)  # the first tensor cut short: still checked
    params, grads, groups = _optimizer_tensors()
    moments = [torch.zeros_like(p) for p in params]
    key, layout = clip_adamw._key([params, grads, moments, moments], groups, 2)
    assert key.label() == "n3-E381-float32/float32/float32/float32-G2"
    assert clip_adamw.check_step(name, key, layout=layout, device=torch.device("cpu")) is None


def test_an_adamw_that_ignores_the_skip_flag_or_the_clip_is_rejected_and_the_fused_kernel_used(
    tmp_path, monkeypatch
):
    def no_skip(*args, skip=None, **kw):
        fused_step(*args, **kw)

    def no_clip(*args, coef, **kw):
        fused_step(*args, coef=torch.ones_like(coef), **kw)

    fused_step = clip_adamw.STEPS["triton"]
    monkeypatch.setitem(clip_adamw.STEPS, "torch_fused", no_skip)
    monkeypatch.setitem(clip_adamw.STEPS, "torch", no_clip)
    timer = Timer({"triton": 5.0, "torch_fused": 0.1, "torch": 0.2})
    d = Dispatcher("clip_adamw", clip_adamw.STEP_CANDIDATES, fallback="triton", cache_path=tmp_path / "c.json",
                   timer=timer, device_name="F", versions=VERSIONS)  # fmt: skip
    monkeypatch.setattr(clip_adamw, "_STEPS", d)
    params, grads, groups = _optimizer_tensors()
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    kw = dict(coef=torch.tensor([0.5, 1.0]), lrs=torch.tensor([1e-3, 2e-3]), weight_decays=torch.zeros(2),
              beta1=0.9, beta2=0.95, eps=1e-8, step=torch.tensor(1.0))  # fmt: skip
    clip_adamw.clip_adamw_auto(params, grads, m, v, groups, **kw)
    record = dispatch.decisions()[-1]
    assert record["op"] == "clip_adamw" and record["choice"] == "triton" and timer.calls == ["triton"]
    assert "skipped step changed" in record["rejected"]["torch_fused"]
    assert "dp off" in record["rejected"]["torch"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_every_hot_op_decides_among_checked_candidates(tmp_path, monkeypatch):
    """The real checks and timings on CUDA: each op decides, records why, and its choice computes right."""
    monkeypatch.setenv("MUPFAST_CACHE_DIR", str(tmp_path))
    for module, name in ((attention_select, "_DEFAULT"), (readout, "_DEFAULT"), (newton_schulz, "_DEFAULT"),
                         (clip_adamw, "_NORMS"), (clip_adamw, "_STEPS")):  # fmt: skip
        old = getattr(module, name)
        fresh = (
            type(old)()
            if type(old) is not Dispatcher
            else Dispatcher(old.op, old.candidates, fallback=old.fallback, versions_fn=old.versions_fn)
        )
        monkeypatch.setattr(module, name, fresh)
    before = len(dispatch.decisions())
    cuda = torch.device("cuda")
    q = torch.randn(2, 4, 256, 64, device=cuda, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 256, 64, device=cuda, dtype=torch.bfloat16)
    docs = torch.arange(256, device=cuda).div(100, rounding_mode="floor").expand(2, 256).contiguous()
    for doc_ids in (None, docs):
        assert (
            attention_select.select_backend(q, k, causal=True, doc_ids=doc_ids)
            in attention_select.ALL_CANDIDATES
        )
    h, w = torch.randn(512, 128, device=cuda, dtype=torch.bfloat16), torch.randn(1000, 128, device=cuda)
    for stats in (True, False):
        assert readout.readout_backend("auto", h, w.bfloat16(), stats) in readout.CANDIDATES
    newton_schulz.newton_schulz_auto(torch.randn(256, 512, device=cuda))
    params = [torch.randn(n, device=cuda) for n in (4096, 100)]
    norms_fn = clip_adamw.dispatched_kernels()[0]
    norms_fn([torch.randn_like(p) for p in params], [0, 1], 2, device=cuda)
    made = dispatch.decisions()[before:]
    assert {d["op"] for d in made} == {"attention", "readout", "newton_schulz", "grad_norms"}
    assert all(d.get("fault") is None and d["ms"] for d in made), made
