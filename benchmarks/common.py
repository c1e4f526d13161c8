"""Shared plumbing for the benchmark scripts: timing, device facts, and recorded results.

Every script measures ours and the peers side by side in one process on one device, and writes
``benchmarks/results/<date>-<device>-<name>.{md,json}`` with the device name, library versions,
the exact command and the median and spread of each measurement. A ``Recorder`` rewrites them after each
row (atomically), so a run stopped from outside keeps every row it finished, and the winners of the kernels'
autotuners beside them (``*-autotune.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_parser(
    doc: str | None, *, warmup: int | None, reps: int | None, smoke: str
) -> argparse.ArgumentParser:
    """An argument parser with the options every kernel benchmark shares."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--smoke", action="store_true", help=smoke)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    return ap


def bench_device() -> torch.device:
    """CUDA when present; otherwise the CPU with Triton kernels under the interpreter.

    Call before any kernel module is imported: the interpreter flag is read at @triton.jit time.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of the device the benchmark runs on."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Versions of the libraries a kernel figure depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "deepspeed", "flash_attn", "liger_kernel", "apex"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception:  # noqa: BLE001 - optional peers may fail to import in many ways
            continue
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def measure(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> dict[str, float]:
    """Median, min and max wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def selected_methods(names, spec: str = "", keep=None) -> list[str]:
    """``names`` in order: only those in ``keep`` when it is given, and with ``spec`` (``--methods``: comma-
    separated parts of names) only those containing one of its parts."""
    parts = [s.strip() for s in spec.split(",")] if spec else []
    return [n for n in names if (keep is None or n in keep) and (not parts or any(s in n for s in parts))]


def eager_then_compiled(names: list[str], compiled) -> list[list[str]]:
    """``names`` in two phases, those not in ``compiled`` first: a time limit then cuts the compiles first. An
    empty phase is left out."""
    phases = ([n for n in names if n not in compiled], [n for n in names if n in compiled])
    return [phase for phase in phases if phase]


def error_line(e: BaseException, width: int = 120) -> str:
    """``Type: first line of the message`` for a row's status (cut at ``width``; an empty message, as a bare
    ``AssertionError()`` has, gives the type alone)."""
    first = str(e).splitlines()[0][:width] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before (MiB)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _stem(name: str) -> str:
    return f"{_dt.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', device_name()).strip('-')}-{name}"


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(name: str, rows: list[dict], *, notes: str = "", out_dir: Path | None = None) -> Path:
    """Write rows as a Markdown table and JSON (each atomically); return the Markdown path."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device_name()
    stem = _stem(name)
    meta = {
        "benchmark": name,
        "device": dev,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "notes": notes,
    }
    _write_atomic(out_dir / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [
        f"# {name}",
        "",
        f"- device: {dev}",
        f"- date: {meta['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- command: `{meta['command']}`",
    ]
    if notes:
        lines.append(f"- notes: {notes}")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    md = out_dir / f"{stem}.md"
    _write_atomic(md, "\n".join(lines) + "\n")
    return md


def publish(
    name: str, rows: list[dict], notes: str, args, *, smoke: str = "tiny shapes, Triton interpreter"
) -> Path:
    """Write a benchmark's results (marked as a smoke run where it was one) and its kernels' autotune
    winners, print them; return the path."""
    if getattr(args, "smoke", False):
        notes += f"; SMOKE RUN ({smoke}): timings meaningless"
    path = write_results(name, rows, notes=notes, out_dir=args.out)
    write_autotune(name, args.out)
    print_rows(rows)
    print(f"wrote {path}")
    return path


class Recorder:
    """A benchmark's rows on disk as they are measured: ``add`` rewrites the .json/.md (marked PARTIAL) and
    the autotune winners after each row; ``publish`` writes the finished results."""

    def __init__(self, name: str, args, *, notes: str = "", smoke: str = "tiny shapes, Triton interpreter"):
        self.name, self.args, self.notes, self.smoke = name, args, notes, smoke
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> Path:
        notes = f"{self.notes}; PARTIAL: {len(self.rows)} rows so far, the run has not finished"
        if getattr(self.args, "smoke", False):
            notes += "; SMOKE RUN"
        path = write_results(self.name, self.rows, notes=notes, out_dir=self.args.out)
        write_autotune(self.name, self.args.out)
        return path

    def publish(self, notes: str | None = None) -> Path:
        return publish(
            self.name, self.rows, self.notes if notes is None else notes, self.args, smoke=self.smoke
        )


def autotune_winners() -> dict[str, dict[str, str]]:
    """What each of our kernels' Triton autotuners chose so far: kernel -> {autotune key: best config} (the
    interpreter's single config where nothing was tuned). Only kernel modules already imported are read."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    out: dict[str, dict[str, str]] = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("mupfast.kernels.") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            if not isinstance(obj, Autotuner):
                continue
            chosen = {str(k): str(c) for k, c in (getattr(obj, "cache", None) or {}).items()}
            if not chosen and getattr(obj, "best_config", None) is not None:  # one config: nothing tuned
                chosen = {"(its only config)": str(obj.best_config)}
            if chosen:
                out[f"{mod_name.rpartition('.')[2]}.{attr}"] = chosen
    return out


def write_autotune(name: str, out_dir: Path | None = None) -> Path | None:
    """``<stem>-<name>-autotune.json``: the autotune winners of this process's kernels, where there are any."""
    winners = autotune_winners()
    if not winners:
        return None
    out_dir = out_dir or RESULTS_DIR
    path = out_dir / f"{_stem(name)}-autotune.json"
    _write_atomic(
        path, json.dumps({"benchmark": name, "device": device_name(), "winners": winners}, indent=2)
    )
    return path


def print_rows(rows: list[dict]) -> None:
    """Each result row on one line, floats rounded, for the console of a benchmark run."""
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
