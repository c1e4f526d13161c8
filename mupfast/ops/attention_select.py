"""The fastest attention per shape: `model.attention_backend: auto` on CUDA measures, once per shape key, our
Triton kernel against SDPA's cuDNN and flash backends and flash-attn's `flash_attn_func`, and keeps the winner.

A key is (head dim, T, causal, GQA group, dtype); each is measured forward+backward on random tensors of the
caller's batch and head count (CUDA events, warm-up then timed reps). A candidate that raises, or whose package
is missing, is skipped and named in the log line. Decisions live in a plain dict (a hit costs one lookup, which
torch.compile traces without a graph break) and on disk in `$MUPFAST_CACHE_DIR/attention_backends.json`
(default `~/.cache/mupfast/`), under a fingerprint of the device name and the torch / cuDNN / Triton / flash-attn
versions and a hash of our kernel's source, so a new GPU, a new library or an edited kernel re-measures.

Our kernel is returned without measuring when the caller needs what only it gives: the log-sum-exp, document
ids (packed documents) or a deterministic backward.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mupfast.atomic import write_text_atomically

__all__ = [
    "CANDIDATES",
    "ShapeKey",
    "BackendSelector",
    "select_backend",
    "run_attention",
    "default_cache_path",
]

log = logging.getLogger(__name__)

CANDIDATES = ("triton", "sdpa_cudnn", "sdpa_flash", "flash_attn")
# Bump when what a measurement means changes (reps, what is timed), so old cached choices are dropped.
SELECTOR_VERSION = 1
FILE_FORMAT = 1
WARMUP, REPS = 3, 10
LOCK_TIMEOUT_S = 300.0  # a rank waits this long for another measuring one, then goes on without the lock


@dataclass(frozen=True)
class ShapeKey:
    """What a choice depends on (batch and head count only scale the work, so they are not part of it)."""

    head_dim: int
    seq_len: int
    causal: bool
    group: int  # query heads per kv head (1: no GQA)
    dtype: str  # "bfloat16", "float16", "float32"

    def label(self) -> str:
        kind = "causal" if self.causal else "full"
        return f"D{self.head_dim}-T{self.seq_len}-{kind}-g{self.group}-{self.dtype}"

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, causal: bool) -> ShapeKey:
        return cls(q.shape[-1], q.shape[2], bool(causal), q.shape[1] // k.shape[1], _dtype_name(q.dtype))


class Unavailable(RuntimeError):
    """A candidate that cannot run here at all (its package is missing, or the device is not CUDA)."""


def default_cache_path() -> Path:
    root = os.environ.get("MUPFAST_CACHE_DIR") or Path.home() / ".cache" / "mupfast"
    return Path(root) / "attention_backends.json"


# ------------------------------------------------------------------ running a candidate --------------------
def run_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                  causal: bool) -> torch.Tensor:  # fmt: skip
    """softmax(scale·QKᵀ)·V by ``backend``: q (B,Hq,T,D), k/v (B,Hkv,T,D) → (B,Hq,T,D). "triton" is not taken:
    the model calls our kernel itself, for its log-sum-exp."""
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel(which):
            gqa = q.shape[1] != k.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn takes (B, T, H, D) with the last dim contiguous (a transpose keeps it so) and does GQA
        # itself when k/v have fewer heads.
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                            causal=causal)  # fmt: skip
        return o.transpose(1, 2)
    if backend == "triton":
        raise ValueError("run_attention does not run 'triton': call mupfast.kernels.attention.mup_attention")
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {CANDIDATES}")


def _attention_fn(name: str) -> Callable:
    """The function one timed rep calls, with the call the model makes (our kernel returns the lse too)."""
    if name == "triton":
        from mupfast.kernels.attention import mup_attention

        return lambda q, k, v, scale, causal: mup_attention(
            q, k, v, scale=scale, causal=causal, return_lse=True
        )[0]
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn is not installed")
    if name not in CANDIDATES:
        raise ValueError(f"unknown attention backend {name!r}")
    return lambda q, k, v, scale, causal: run_attention(name, q, k, v, scale=scale, causal=causal)


def time_candidate(name: str, key: ShapeKey, *, batch: int, q_heads: int, device: torch.device) -> float:
    """Median milliseconds of one forward+backward of ``name`` at this shape, on random tensors."""
    if device.type != "cuda":
        raise Unavailable(f"measuring needs a CUDA device, got {device}")
    fn = _attention_fn(name)
    dtype = getattr(torch, key.dtype)
    # A private generator: measuring must not move the training RNG (a run with a warm cache would
    # otherwise draw different dropout/noise than one that measured).
    g = torch.Generator(device=device).manual_seed(0)
    kv_heads = q_heads // key.group

    def randn(h: int) -> torch.Tensor:
        shape = (batch, h, key.seq_len, key.head_dim)
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    q, k, v = (
        randn(q_heads).requires_grad_(),
        randn(kv_heads).requires_grad_(),
        randn(kv_heads).requires_grad_(),
    )
    do = randn(q_heads)
    scale = 1.0 / key.head_dim

    def step() -> None:
        o = fn(q, k, v, scale, key.causal)
        torch.autograd.grad(o, (q, k, v), do)

    for _ in range(WARMUP):  # the first also autotunes / compiles, so it is never timed
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
def _measuring(device: torch.device) -> Iterator[None]:
    """Measure as if in plain eager training, whatever the caller is inside of (no_grad, inference mode,
    autocast), and without SDPA's 'kernel not used because…' warnings for the candidates that do not fit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(torch.cuda.device(device))
        yield


# ------------------------------------------------------------------ environment fingerprint ----------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _package_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def _kernel_source_hash() -> str:
    """Our kernel's version: a hash of its source, so an edited kernel is measured again without anyone
    remembering to bump a constant."""
    spec = importlib.util.find_spec("mupfast.kernels.attention")
    if spec is None or spec.origin is None:
        return "absent"
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]


def environment_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "cudnn": str(torch.backends.cudnn.version()),
        "triton": _package_version("triton", "pytorch-triton"),
        "flash_attn": _package_version("flash-attn", "flash_attn"),
        "mupfast_attention_kernel": _kernel_source_hash(),
        "selector": str(SELECTOR_VERSION),
    }


# ------------------------------------------------------------------ the selector -----------------------------
class BackendSelector:
    """Measures candidates per ShapeKey, remembers the fastest in memory and on disk.

    ``timer(name, key) -> milliseconds`` replaces the CUDA measurement (tests inject one); ``device_name`` and
    ``versions`` replace what is read from the device and the installed packages; ``cache_path`` defaults to
    ``default_cache_path()``, read when the file is first needed.
    """

    def __init__(
        self,
        cache_path: Path | None = None,
        timer: Callable[[str, ShapeKey], float] | None = None,
        candidates: tuple[str, ...] = CANDIDATES,
        device_name: str | None = None,
        versions: dict | None = None,
    ):
        unknown = set(candidates) - set(CANDIDATES)
        if unknown or not candidates:
            raise ValueError(f"candidates must be a nonempty subset of {CANDIDATES}; got {candidates}")
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.timer = timer
        self.candidates = tuple(candidates)
        self.device_name = device_name
        self.versions = dict(versions) if versions is not None else None
        # (fingerprint, key) -> backend; the fast dict below skips even building the fingerprint.
        self._decisions: dict[tuple[str, ShapeKey], str] = {}
        self._hits: dict[tuple, str] = {}

    # The hit path: plain Python on shapes, which torch.compile traces into guards (no graph break).
    def select(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool, needs_lse: bool = False,
               has_doc_ids: bool = False, deterministic: bool = False) -> str:  # fmt: skip
        """`select_backend` on any device (tests run it on CPU tensors with an injected timer)."""
        if needs_lse or has_doc_ids or deterministic or torch.are_deterministic_algorithms_enabled():
            return "triton"  # only our kernel gives these: nothing to measure
        fast = (q.shape[-1], q.shape[2], bool(causal), q.shape[1] // k.shape[1], q.dtype, q.device)
        hit = self._hits.get(fast)
        return hit if hit is not None else self._select_miss(fast, q, k, causal)

    @torch.compiler.disable
    def _select_miss(self, fast: tuple, q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
        choice = self.choose(ShapeKey.of(q, k, causal), batch=q.shape[0], q_heads=q.shape[1], device=q.device)
        self._hits[fast] = choice
        return choice

    @torch.compiler.disable
    def choose(self, key: ShapeKey, *, batch: int = 1, q_heads: int | None = None,
               device: torch.device | str | None = None) -> str:  # fmt: skip
        """The fastest candidate for ``key``: from memory, else from the cache file, else measured (at
        ``batch`` × ``q_heads`` on ``device``; default 1 × 8 kv heads' worth, the current CUDA device)."""
        device = torch.device(device) if device is not None else _current_device()
        env = self._fingerprint(device)
        hit = self._decisions.get((env, key))
        if hit is not None:
            return hit
        with self._file_lock():
            # Read under the lock: another rank may have measured this key while we waited.
            entries = self._read()
            record = entries.get(env, {}).get(key.label())
            usable = isinstance(record, dict) and isinstance(record.get("ms"), dict)
            choice = self._best(record["ms"]) if usable else None
            if choice is not None:
                source = "cached in " + str(self._path())
            else:
                timer = self.timer or self._cuda_timer(batch, q_heads or 8 * key.group, device)
                record = self._measure(key, timer)
                choice = self._best(record["ms"])
                if choice is not None:  # nothing cached when nothing ran: the next process tries again
                    entries.setdefault(env, {})[key.label()] = record
                    self._write(entries)
                source = "measured"
        if choice is None:
            log.warning(
                "attention %s: no candidate ran (%s); using triton", key.label(), record.get("skipped")
            )
            choice = "triton"
        else:
            ms = sorted(record["ms"].items(), key=lambda x: x[1])
            timings = ", ".join(f"{n} {t:.3f} ms" for n, t in ms)
            skipped = "; ".join(f"{n}: {why}" for n, why in dict(record.get("skipped", {})).items())
            log.info("attention %s: chose %s (%s; fwd+bwd %s%s)", key.label(), choice, source, timings,
                     f"; skipped {skipped}" if skipped else "")  # fmt: skip
        self._decisions[(env, key)] = choice
        return choice

    def _best(self, ms: dict) -> str | None:
        # Ties go to the earlier candidate (our kernel first: it also gives the lse for free).
        ran = [
            (float(ms[n]), i, n) for i, n in enumerate(self.candidates) if isinstance(ms.get(n), (int, float))
        ]
        return min(ran)[2] if ran else None

    def _measure(self, key: ShapeKey, timer: Callable[[str, ShapeKey], float]) -> dict:
        ms, skipped = {}, {}
        for name in self.candidates:
            try:
                ms[name] = float(timer(name, key))
            except Exception as e:  # any failure (no kernel for this shape, out of memory) skips it
                first_line = str(e).splitlines()[0] if str(e) else ""
                skipped[name] = f"{type(e).__name__}: {first_line}"[:200]
                _drain_cuda()
        return {"ms": ms, "skipped": skipped, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _cuda_timer(self, batch: int, q_heads: int, device: torch.device) -> Callable[[str, ShapeKey], float]:
        def timer(name: str, key: ShapeKey) -> float:
            with _measuring(device):
                return time_candidate(name, key, batch=batch, q_heads=q_heads, device=device)

        return timer

    def _fingerprint(self, device: torch.device) -> str:
        if self.versions is None:
            self.versions = environment_versions()
        name = self.device_name
        if name is None:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return json.dumps({"device": name, **self.versions}, sort_keys=True)

    # ---------------------------------------------------------------- the cache file
    def _path(self) -> Path:
        return self.cache_path if self.cache_path is not None else default_cache_path()

    def _read(self) -> dict:
        """{fingerprint: {key label: record}}; a missing file is empty, a corrupt one is ignored (warned)."""
        path = self._path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable attention backend cache %s (%s)", path, e)
            return {}
        ok = isinstance(data, dict) and data.get("format") == FILE_FORMAT
        entries = data.get("environments") if ok else None
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            log.warning("ignoring attention backend cache %s: not a format-%d cache file", path, FILE_FORMAT)
            return {}
        return entries

    def _write(self, entries: dict) -> None:
        path = self._path()
        text = json.dumps({"format": FILE_FORMAT, "environments": entries}, indent=1, sort_keys=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, text + "\n")
        except OSError as e:  # a read-only home must not stop training: the choice stays in memory
            log.warning("could not write attention backend cache %s (%s)", path, e)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock on a file beside the cache, so ranks measuring at once take turns: the first
        measures and writes, the others then read its choice. Where locking is unavailable, go on without."""
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
            locked = False
            while not locked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("attention backend cache lock %s held for %.0f s; going on without it",
                                    lock, LOCK_TIMEOUT_S)  # fmt: skip
                        break
                    time.sleep(0.05)
                except OSError:  # a filesystem without flock
                    break
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _drain_cuda() -> None:
    """Wait for the failed candidate's queued work, so an asynchronous error is its own, not the next one's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize()


def _current_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# ------------------------------------------------------------------ the module-level entry point ------------
_DEFAULT = BackendSelector()


def select_backend(q: torch.Tensor, k: torch.Tensor, *, causal: bool, needs_lse: bool = False,
                   has_doc_ids: bool = False, deterministic: bool = False) -> str:  # fmt: skip
    """One of CANDIDATES for attention on q (B,Hq,T,D), k (B,Hkv,T,D): the fastest measured on this shape key,
    or "triton" without measuring when only our kernel will do (lse, document ids, deterministic backward,
    also when torch's deterministic algorithms are on) or the tensors are not on CUDA."""
    if not q.is_cuda:  # nothing to measure off CUDA; Triton runs there only under the interpreter
        return "triton"
    return _DEFAULT.select(
        q, k, causal=causal, needs_lse=needs_lse, has_doc_ids=has_doc_ids, deterministic=deterministic
    )


def default_selector() -> BackendSelector:
    """The selector `select_backend` uses (one per process)."""
    return _DEFAULT
