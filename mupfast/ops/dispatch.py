"""Per-op dispatch under ``auto`` on CUDA: check every candidate, time the ones that are right, keep the fastest.

An op (attention, readout, clip+AdamW, Newton–Schulz) names its candidates; a :class:`Dispatcher` decides per
shape key. Each candidate is first *checked*: run on random inputs of the real shapes and compared with an fp32
reference (outputs and gradients, a relative tolerance per dtype, :func:`mismatch`). A candidate that gives
non-finite or wrong values is rejected and logged, never timed or cached. The ones that pass are *timed* (CUDA
events, :func:`cuda_ms`) and the fastest is kept: in memory, and on disk in ``$MUPFAST_CACHE_DIR/<op>_backends.json``
(default ``~/.cache/mupfast/``) under a fingerprint of the device and the versions of the libraries and kernels
involved, so new hardware, a new library or an edited kernel decides again. Ranks share the file under a lock.

A candidate that cannot run here (a missing package, a shape it does not take) raises :class:`Unavailable` or
any other ordinary error and is skipped with its reason. A device fault (a CUDA error: it poisons the context,
so training could not go on) is raised as :class:`CandidateFault` naming the candidate, never swallowed.

Every decision is one log line and one entry of :func:`decisions`, which the trainer has written to the run
directory as it is made (``dispatch.json``; :func:`on_decision`, :func:`mupfast.rundir.write_dispatch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from mupfast.atomic import write_text_atomically

__all__ = [
    "Dispatcher",
    "Unavailable",
    "CandidateFault",
    "is_device_fault",
    "mismatch",
    "cuda_ms",
    "decisions",
]

log = logging.getLogger(__name__)

# Bump when what a decision means changes (what is checked or timed), so old cached choices are dropped.
DISPATCH_VERSION = 2
FILE_FORMAT = 1
WARMUP, REPS = 3, 10
LOCK_TIMEOUT_S = 300.0  # a rank waits this long for another deciding one, then goes on without the lock
#: The largest relative (Frobenius) error a candidate may have against the fp32 reference, by input dtype:
#: bf16 rounding alone is ~4e-3 on attention's output and ~1e-2 on its gradients; a wrong mask, scale or
#: reduction is > 1e-1.
TOLERANCE = {"float64": 1e-6, "float32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}
#: Messages of errors that leave the CUDA context unusable.
FAULT_MARKERS = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "cublas_status_execution_failed",
    "cudaerrorlaunchfailure",
)

Check = Callable[[str, object], "str | None"]
Timer = Callable[[str, object], float]


class Unavailable(RuntimeError):
    """A candidate that cannot run here at all (its package is missing, the device or the shape)."""


class CandidateFault(RuntimeError):
    """A candidate faulted the device: the CUDA context is lost, so this stops the run, naming who did it."""

    def __init__(self, op: str, candidate: str, key: str, error: BaseException):
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        super().__init__(f"{op} candidate {candidate!r} faulted the device at {key}: {first}")
        self.op, self.candidate, self.key = op, candidate, key


def is_device_fault(e: BaseException) -> bool:
    """Whether ``e`` is a CUDA fault (which poisons the context), not an ordinary refusal or out-of-memory."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    kinds = tuple(k for k in (getattr(torch, "AcceleratorError", None), torch.cuda.CudaError) if k)
    if isinstance(e, kinds):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in FAULT_MARKERS)


def mismatch(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> str | None:
    """None when every tensor of ``got`` is finite and within ``tol`` (relative Frobenius error) of ``ref``'s;
    else why not, naming the first tensor that is off."""
    for name, r in ref.items():
        g = got[name]
        if g is None or g.shape != r.shape:
            return f"{name} has shape {None if g is None else tuple(g.shape)}, expected {tuple(r.shape)}"
        g, r = g.detach().double(), r.detach().double()
        if not torch.isfinite(g).all():
            return f"non-finite {name}"
        err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
        if not err <= tol:
            return f"{name} off: relative error {err:.2e} > {tol:.0e}"
    return None


def tolerance(dtype: torch.dtype | str) -> float:
    return TOLERANCE[dtype if isinstance(dtype, str) else dtype_name(dtype)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cuda_ms(step: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``step`` on ``device`` (CUDA events; warm-up first, which also autotunes)."""
    if device.type != "cuda":
        raise Unavailable(f"timing needs a CUDA device, got {device}")
    for _ in range(WARMUP):
        step()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)
    ]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


@contextlib.contextmanager
def measuring(device: torch.device) -> Iterator[None]:
    """Check and time as if in plain eager training, whatever the caller is inside of (no_grad, inference
    mode, autocast), and without warnings from candidates that do not fit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(torch.cuda.device(device))
        yield


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    """A private generator: deciding must not move the training RNG (a run with a warm cache would
    otherwise draw different dropout/noise than one that decided)."""
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------ environment fingerprint ----------------
def package_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def source_hash(module: str) -> str:
    """A module's version: a hash of its source, so an edited kernel decides again without anyone
    remembering to bump a constant."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "absent"
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]


def base_versions() -> dict[str, str]:
    """What every op's decision depends on; each op adds its kernel's source hash and its peers' packages."""
    return {
        "torch": torch.__version__,
        "triton": package_version("triton", "pytorch-triton"),
        "dispatch": str(DISPATCH_VERSION),
    }


def default_cache_path(op: str) -> Path:
    root = os.environ.get("MUPFAST_CACHE_DIR") or Path.home() / ".cache" / "mupfast"
    return Path(root) / f"{op}_backends.json"


# ------------------------------------------------------------------ the run's record ----------------------
_DECISIONS: list[dict] = []
_ON_DECISION: list[Callable[[list[dict]], None]] = []


def decisions() -> list[dict]:
    """Every decision this process made (op, key, choice, source, timings, skipped, rejected, fault)."""
    return [dict(d) for d in _DECISIONS]


def on_decision(callback: Callable[[list[dict]], None] | None) -> None:
    """Have ``callback(decisions())`` called after every decision, a fault's included (the trainer writes the
    run directory's ``dispatch.json`` so); it replaces the one before, None removes it."""
    _ON_DECISION[:] = [callback] if callback is not None else []


def _remember(op: str, key_label: str, **fields) -> None:
    _DECISIONS.append({"op": op, "key": key_label, **fields})
    for callback in _ON_DECISION:
        try:
            callback(decisions())
        except OSError as e:  # a full disk must not stop training: the decision is still logged
            log.warning("could not record the %s decision for %s (%s)", op, key_label, e)


# ------------------------------------------------------------------ the dispatcher --------------------------
class Dispatcher:
    """Decides one op's candidate per shape key (any hashable with a ``label()``): from memory, else from the
    cache file, else checked and timed now.

    ``check(name, key)`` returns None when the candidate computes the op right, else why not; ``timer(name,
    key)`` returns its milliseconds. Both may raise :class:`Unavailable`. The op passes them to :meth:`choose`
    (they need the caller's tensors); tests inject them here. ``versions`` replaces ``versions_fn()`` and
    ``device_name`` the device's name in the fingerprint; ``fallback`` is taken when no candidate passes, and
    ``safe`` (the op's plain torch path) instead where ``fallback`` itself was found wrong.
    """

    def __init__(self, op: str, candidates: tuple[str, ...], *, fallback: str,
                 versions_fn: Callable[[], dict] = base_versions, cache_path: Path | None = None,
                 check: Check | None = None, timer: Timer | None = None, device_name: str | None = None,
                 versions: dict | None = None, logger: logging.Logger | None = None,
                 safe: str = "torch"):  # fmt: skip
        if not candidates:
            raise ValueError(f"{op}: no candidates")
        self.op, self.candidates, self.fallback, self.safe = op, tuple(candidates), fallback, safe
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.check, self.timer = check, timer
        self.device_name = device_name
        self.versions_fn = versions_fn
        self.versions = dict(versions) if versions is not None else None
        self.log = logger or log  # the op's own logger: its lines are named after the op's module
        self._decisions: dict[tuple[str, object], str] = {}  # (fingerprint, key) -> candidate
        #: The ops' hit path: their own fast keys (plain Python on shapes, which torch.compile traces into
        #: guards without a graph break) -> candidate.
        self.hits: dict[tuple, str] = {}

    def pick(
        self, fast: tuple, key_of: Callable[[], object], check, timer, device: torch.device, **ctx
    ) -> str:
        """An op's call: the candidate remembered under its fast key ``fast`` (plain Python on shapes, which
        torch.compile traces into guards without a graph break), else :meth:`decide` for ``key_of()`` with the
        op's ``check(name, key, device=, **ctx)`` and ``timer`` (same arguments)."""
        hit = self.hits.get(fast)
        if hit is not None:
            return hit
        on = dict(device=device, **ctx)
        return self.decide(
            fast, key_of(), check=partial(check, **on), timer=partial(timer, **on), device=device
        )

    @torch.compiler.disable
    def decide(self, fast: tuple, key, *, check: Check, timer: Timer, device: torch.device) -> str:
        """An op's miss: :meth:`choose` for ``key``, remembered under the op's fast key ``fast``."""
        choice = self.hits[fast] = self.choose(key, check=check, timer=timer, device=device)
        return choice

    def candidates_for(self, key) -> tuple[str, ...]:
        """The candidates that compute ``key``'s op (all, unless a subclass splits them by key)."""
        return self.candidates

    @torch.compiler.disable
    def choose(self, key, *, check: Check | None = None, timer: Timer | None = None,
               device: torch.device | str | None = None) -> str:  # fmt: skip
        """The fastest right candidate for ``key`` (the injected check and timer win over the op's)."""
        device = torch.device(device) if device is not None else _current_device()
        env = self._fingerprint(device)
        hit = self._decisions.get((env, key))
        if hit is not None:
            return hit
        check, timer = self.check or check, self.timer or timer
        with self._file_lock():
            # Read under the lock: another rank may have decided this key while we waited.
            entries = self._read()
            record = entries.get(env, {}).get(key.label())
            usable = isinstance(record, dict) and isinstance(record.get("ms"), dict)
            choice = self._best(key, record["ms"]) if usable else None
            source = "cached in " + str(self._path())
            if choice is None:
                if check is None or timer is None:
                    raise ValueError(f"{self.op}: deciding {key.label()} needs a check and a timer")
                record, source = self._measure(key, check, timer), "measured"
                choice = self._best(key, record["ms"])
                if choice is not None:  # nothing cached when nothing passed: the next process tries again
                    cached = {k: v for k, v in record.items() if k != "rejected"}  # never the wrong ones
                    entries.setdefault(env, {})[key.label()] = cached
                    self._write(entries)
        final = choice or self._fallback(record)
        self._log(key, choice, final, source, record)
        self._decisions[(env, key)] = final
        return final

    def _fallback(self, record: dict) -> str:
        """When no candidate passed: ``fallback`` unless it was found wrong, then ``safe`` (the torch path)."""
        return self.safe if self.fallback in record.get("rejected", {}) else self.fallback

    def _log(self, key, choice: str | None, final: str, source: str, record: dict) -> None:
        ms = sorted(record["ms"].items(), key=lambda x: x[1])
        skipped, rejected = dict(record.get("skipped", {})), dict(record.get("rejected", {}))
        _remember(self.op, key.label(), choice=final, source=source, ms=dict(ms),
                  skipped=skipped, rejected=rejected)  # fmt: skip
        why = "".join(
            f"; {what} " + "; ".join(f"{n}: {r}" for n, r in d.items())
            for what, d in (("rejected", rejected), ("skipped", skipped)) if d
        )  # fmt: skip
        if choice is None:
            self.log.warning("%s %s: no candidate ran (%s); using %s", self.op, key.label(), why[2:], final)
            return
        timings = ", ".join(f"{n} {t:.3f} ms" for n, t in ms)
        (self.log.warning if rejected else self.log.info)(
            "%s %s: chose %s (%s; %s%s)", self.op, key.label(), choice, source, timings, why
        )

    def _best(self, key, ms: dict) -> str | None:
        # Ties go to the earlier candidate (our kernel first).
        allowed = self.candidates_for(key)
        ran = [(float(ms[n]), i, n) for i, n in enumerate(allowed) if isinstance(ms.get(n), (int, float))]
        return min(ran)[2] if ran else None

    def _measure(self, key, check: Check, timer: Timer) -> dict:
        ms, skipped, rejected = {}, {}, {}
        for name in self.candidates_for(key):
            try:
                wrong = check(name, key)
                if wrong is not None:
                    rejected[name] = str(wrong)[:200]
                elif math.isfinite(t := float(timer(name, key))) and t > 0:
                    ms[name] = t
                else:
                    skipped[name] = f"timer gave {t}"
                _sync()  # an asynchronous fault is this candidate's, not the next one's
            except Exception as e:
                if is_device_fault(e) or (not isinstance(e, Unavailable) and _sync_faults()):
                    _remember(self.op, key.label(), choice=None, fault=name, error=str(e)[:500])
                    raise CandidateFault(self.op, name, key.label(), e) from e
                first_line = str(e).splitlines()[0] if str(e) else ""
                why = first_line if isinstance(e, Unavailable) else f"{type(e).__name__}: {first_line}"
                skipped[name] = why[:200]
        return {
            "ms": ms,
            "skipped": skipped,
            "rejected": rejected,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _fingerprint(self, device: torch.device) -> str:
        if self.versions is None:
            self.versions = self.versions_fn()
        name = self.device_name
        if name is None:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return json.dumps({"device": name, **self.versions}, sort_keys=True)

    # ---------------------------------------------------------------- the cache file
    def _path(self) -> Path:
        return self.cache_path if self.cache_path is not None else default_cache_path(self.op)

    def _read(self) -> dict:
        """{fingerprint: {key label: record}}; a missing file is empty, a corrupt one is ignored (warned)."""
        path = self._path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.log.warning("ignoring unreadable %s backend cache %s (%s)", self.op, path, e)
            return {}
        ok = isinstance(data, dict) and data.get("format") == FILE_FORMAT
        entries = data.get("environments") if ok else None
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            self.log.warning(
                "ignoring %s backend cache %s: not a format-%d cache file", self.op, path, FILE_FORMAT
            )
            return {}
        return entries

    def _write(self, entries: dict) -> None:
        path = self._path()
        text = json.dumps({"format": FILE_FORMAT, "environments": entries}, indent=1, sort_keys=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, text + "\n")
        except OSError as e:  # a read-only home must not stop training: the choice stays in memory
            self.log.warning("could not write %s backend cache %s (%s)", self.op, path, e)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock on a file beside the cache, so ranks deciding at once take turns: the first
        decides and writes, the others then read its choice. Where locking is unavailable, go on without."""
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic writes alone still keep the file whole
            yield
            return
        lock = self._path().with_name(self._path().name + ".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield
            return
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self.log.warning("%s backend cache lock %s held for %.0f s; going on without it",
                                    self.op, lock, LOCK_TIMEOUT_S)  # fmt: skip
                        break
                    time.sleep(0.05)
                except OSError:  # a filesystem without flock
                    break
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _sync() -> None:
    """Wait for the candidate's queued work, so an asynchronous fault surfaces here, as its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _sync_faults() -> bool:
    """After an ordinary error: whether the device is now faulted (its queued work raised)."""
    try:
        _sync()
    except Exception as e:
        return is_device_fault(e)
    return False


def _current_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference's dtype for inputs of ``dtype``: fp32 for half precision, fp64 for fp32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
