#!/usr/bin/env bash
# The GPU checks of issue 18 in one call on a bare H100/H200 machine, in under 8 minutes (issue 35: a session
# has 15 minutes of device time, about 1.5 of them to start the machine, and one command of at most 10):
#   1. pytest, smoke set   each kernel (attention, cross-entropy, clip+AdamW, Newton-Schulz) at its headline
#                          shapes in bf16 and fp32, forward and backward, against its oracle: the node ids of
#                          benchmarks/gpu_plan.py's SMOKE_TESTS, over 8 xdist workers (compiling is CPU-bound),
#                          a per-test timeout, junit xml in the results. GPU_CHECK_TESTS=full: all of -m gpu.
#   2. bench_e2e, 125m     an fp32 reference (10 steps), kernels off/on eager, then compiled, then activation
#                          checkpointing; each variant's loss at every step and its largest difference from
#                          the reference's, so a fast wrong kernel cannot pass for a speed-up
#   3. kernel benchmarks   attention, cross_entropy, clip_adamw, newton_schulz, moe_dispatch at their headline
#                          shapes (--headline); in each, the compiled peers (torch.compile, FlexAttention) last
# Each part runs under its own `timeout -s INT` (pytest still prints its failures; a benchmark has written
# every finished row, since each rewrites its .json/.md after every row). After EVERY part the results, the
# logs and parts.tsv are packed into $OUT/gpu-check.tar.gz (and parts.tsv copied beside it), and INT/TERM to
# the script does the same, so a call cut at any moment returns everything measured so far (in 4 files at
# most: the tool returns 8). Also kept: the kernels' autotune winners (*-autotune.json per benchmark, and
# TRITON_PRINT_AUTOTUNING in the logs), `nvidia-smi -q` (results/nvidia-smi-q.txt), the plan (logs/plan.txt).
# At the end: a summary of all parts, benchmarks/results/<date>-<device>.{md,json}, copied to $OUT too.
# Exit status 0 when every part passed, 1 otherwise.
#
# Time plan: benchmarks/gpu_plan.py holds each part's budget (within the 480 s allowed) and counts its Triton
#   compiles on sm_90a; `python -m benchmarks.gpu_plan` prints it. The deadline, GPU_CHECK_TOTAL_S, is 465 s:
#   a part's timeout may take 15 s more to kill it.
# A part gets its budget or what is left before the deadline, whichever is less. The compiled peers and the
# e2e variants after the first four are the likeliest to be cut; a second call with GPU_CHECK_PARTS=e2e
# GPU_CHECK_E2E_VARIANTS=<the missing ones> completes them.
#
# Calling it through the device tool (`run`):
#   once, here, in the repo root: bash ../shared/tools/gpu-wheels.sh zstandard
#       (.whl/: deepspeed, its dependencies the GPU image lacks, and zstandard, which mupfast.data imports)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# then copy the files that come back (files_at) into benchmarks/results/ and unpack gpu-check.tar.gz there for
# each benchmark's own .md/.json (results/) and the logs (logs/). The script installs .whl/*.whl into
# /tmp/site (PYTHONPATH) first, and links mupfast/kernels -> kernels when the package is not installed (a
# bare machine has no editable install to map mupfast.kernels onto kernels/).
#
# On the CPU, a dry run prints the plan (each part's budget, compile count and compile cost, and the total),
# then checks the plumbing (kernel benchmarks with --smoke, bench_e2e --smoke; the smoke tests skip without
# CUDA) and writes to a temporary folder unless --out is given:
#   bash benchmarks/gpu_check.sh --dry-run            (or GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh)
#
# Options: --dry-run, --out DIR (the summary's folder; default benchmarks/results, a temporary one when dry).
# Environment: PYTHON (default python3; .venv/bin/python in a dry run where present); GPU_CHECK_PARTS
# (comma-separated subset of: pytest,e2e,attention,cross_entropy,clip_adamw,newton_schulz,moe_dispatch);
# GPU_CHECK_SETUP (1; 0 skips the plan, the wheels and the import check: a second call on a warm machine,
# which keeps /tmp/site); GPU_CHECK_TOTAL_S (the deadline, 465); GPU_CHECK_BUDGET_<PART> (seconds for one
# part, e.g. GPU_CHECK_BUDGET_PYTEST=200); GPU_CHECK_TESTS (smoke | full), GPU_CHECK_PYTEST_WORKERS (8),
# GPU_CHECK_TEST_TIMEOUT_S (per test, 90); GPU_CHECK_E2E_VARIANTS (gpu-check), GPU_CHECK_E2E_MODELS (125m),
# GPU_CHECK_E2E_STEPS (30), GPU_CHECK_E2E_REF_STEPS (10); GPU_CHECK_CLIP_METHODS (the clip_adamw methods;
# DeepSpeed FusedAdam is left out by default: its JIT build of a CUDA extension alone takes its whole budget).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
T0=$(date +%s)

DRY=${GPU_CHECK_DRY:-0}
SUMMARY_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) SUMMARY_DIR=${2:-}; shift ;;
    --out=*) SUMMARY_DIR=${1#--out=} ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = "1" ] || DRY=0

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

RUN=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
RES=$RUN/results
LOGS=$RUN/logs
mkdir -p "$RES" "$LOGS"
if [ -z "$SUMMARY_DIR" ]; then
  if [ "$DRY" = 1 ]; then SUMMARY_DIR=$RUN/summary; else SUMMARY_DIR=$ROOT/benchmarks/results; fi
fi
mkdir -p "$SUMMARY_DIR" || exit 2
PARTS_TSV=$RUN/parts.tsv
: > "$PARTS_TSV"

export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
else
  unset TRITON_INTERPRET
  export TRITON_PRINT_AUTOTUNING=1  # each autotuner's winner and its time, in the part's log
fi

TOTAL=${GPU_CHECK_TOTAL_S:-$([ "$DRY" = 1 ] && echo 900 || echo 465)}
DEADLINE=$((T0 + TOTAL))
ALL_PARTS="pytest e2e attention cross_entropy clip_adamw newton_schulz moe_dispatch"
PARTS=$(echo "${GPU_CHECK_PARTS:-$ALL_PARTS}" | tr ',' ' ')
CHILD=""     # the running part's `timeout` process
CURRENT=""   # and its name

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

wanted() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# The plan's budgets (benchmarks/gpu_plan.py --budgets imports no torch); 60 s for a part it lacks.
declare -A PLAN_BUDGET=()
while read -r part secs; do
  [ -n "${part:-}" ] && PLAN_BUDGET[$part]=$secs
done < <("$PY" -m benchmarks.gpu_plan --budgets 2> "$LOGS/plan-budgets.err")
SUMMARY_RESERVE=${PLAN_BUDGET[summary]:-10}

budget_of() {  # the part's own budget: GPU_CHECK_BUDGET_<PART>, else the plan's (dry runs get 3x)
  local var="GPU_CHECK_BUDGET_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  local default=${PLAN_BUDGET[$1]:-60}
  [ "$DRY" = 1 ] && default=$((default * 3))
  echo "${!var:-$default}"
}

# A part's time: its own budget, cut so that the summary keeps its seconds before the deadline.
timeout_for() {
  local b left
  b=$(budget_of "$1")
  left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE))
  if [ "$b" -lt "$left" ]; then echo "$b"; else echo "$left"; fi
}

# snapshot: the results, logs and parts.tsv as they stand, into $OUT/gpu-check.tar.gz (written beside and
# renamed: a reader never sees half of it) and $OUT/parts.tsv. One tarball, since the device tool returns at
# most 8 files; each benchmark file in it is complete (they are written atomically; temporary dot-files are
# left out).
snapshot() {
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  tar -czf "$OUT/.gpu-check.tar.gz.tmp" -C "$RUN" --exclude='.*' results logs parts.tsv 2> /dev/null
  # 1: a file (a log still written by a process of the part) changed while read; the archive is complete
  [ $? -le 1 ] && mv -f "$OUT/.gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
  cp -p "$PARTS_TSV" "$OUT/parts.tsv" 2> /dev/null
  return 0
}

# INT/TERM (the device tool's time limit, a person): stop the running part, record it, copy what exists.
on_signal() {
  trap - INT TERM
  log "signal $1: stopping ${CURRENT:-nothing} and copying what exists to \$OUT/gpu-check.tar.gz"
  if [ -n "$CHILD" ]; then
    kill -INT "$CHILD" 2> /dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CHILD" 2> /dev/null || break; sleep 0.5; done
    kill -KILL -- "-$CHILD" 2> /dev/null  # `timeout` leads its own process group: the part's processes
    printf '%s\tcut (signal %s)\t-\t-\t-\t%s\n' "$CURRENT" "$1" "$LOGS/$CURRENT.log" >> "$PARTS_TSV"
  fi
  snapshot
  if [ "$1" = INT ]; then exit 130; else exit 143; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# run_part NAME BUDGET CMD...: runs CMD under `timeout -s INT`, its output in logs/NAME.log; appends a row to
# parts.tsv (name, status, rc, seconds, budget, log), then copies everything to $OUT. The part runs in the
# background so that a signal to the script is handled at once (bash runs traps between commands).
run_part() {
  local name=$1 budget=$2; shift 2
  local logf=$LOGS/$name.log start rc status
  if [ "$budget" -lt 5 ]; then
    log "$name: skipped (no time left)"
    printf '%s\tskipped (no time left)\t-\t0\t%s\t%s\n' "$name" "$budget" "$logf" >> "$PARTS_TSV"
    snapshot
    return
  fi
  log "$name: start (budget ${budget}s): $*"
  start=$(date +%s)
  CURRENT=$name
  timeout -s INT --kill-after=15 "$budget" "$@" > "$logf" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$budget" "$logf" \
    >> "$PARTS_TSV"
  log "$name: $status (rc $rc, $(( $(date +%s) - start ))s)"
  if [ "$status" != ok ]; then tail -n 8 "$logf" | sed "s/^/    $name| /"; fi
  snapshot
}

# ---------------------------------------------------------------------------------------------- setup
log "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU plumbing)' || echo GPU); python: $PY; run folder: $RUN"
# The plan: compile counts need the kernels imported without the interpreter (it keeps one config).
SETUP=${GPU_CHECK_SETUP:-1}  # 0: no plan, no wheels, no import check (a machine set up by an earlier call)
if [ "$SETUP" = 0 ]; then
  :
elif [ "$DRY" = 1 ]; then
  env -u TRITON_INTERPRET timeout 120 "$PY" -m benchmarks.gpu_plan > "$LOGS/plan.txt" 2>&1
  sed 's/^/    plan| /' "$LOGS/plan.txt"
else  # on the GPU it runs beside the setup, for the record
  (env -u TRITON_INTERPRET timeout 120 "$PY" -m benchmarks.gpu_plan > "$LOGS/plan.txt" 2>&1 &)
fi
SETUP_LOG=$LOGS/setup.log
: > "$SETUP_LOG"
if [ "$SETUP" = 0 ]; then
  echo "setup skipped (GPU_CHECK_SETUP=0)" >> "$SETUP_LOG"
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH  # the wheels an earlier call installed
elif [ "$DRY" = 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
  echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site" >> "$SETUP_LOG"
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$SETUP_LOG" 2>&1 || echo "warning: installing .whl failed" >> "$SETUP_LOG"
  export PYTHONPATH=/tmp/site:$PYTHONPATH
elif [ "$DRY" = 0 ]; then
  echo "warning: no .whl/*.whl: deepspeed and zstandard must already be importable" >> "$SETUP_LOG"
fi
if [ "$SETUP" = 1 ] && [ "$DRY" = 0 ] && [ ! -e mupfast/kernels ] && ! "$PY" -c "import mupfast.kernels" 2> /dev/null; then
  echo "mupfast.kernels is not importable (no editable install): linking mupfast/kernels -> ../kernels" \
    >> "$SETUP_LOG"
  ln -s ../kernels mupfast/kernels
fi
if [ "$SETUP" = 1 ] && command -v nvidia-smi > /dev/null 2>&1; then
  timeout 20 nvidia-smi -q > "$RES/nvidia-smi-q.txt" 2>&1 || echo "warning: nvidia-smi -q failed" >> "$SETUP_LOG"
fi
[ "$SETUP" = 0 ] || timeout 120 "$PY" - >> "$SETUP_LOG" 2>&1 << 'PYEOF'
import importlib

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for mod in ("triton", "deepspeed", "zstandard", "yaml", "tokenizers", "mupfast.kernels", "mupfast.train"):
    try:
        m = importlib.import_module(mod)
        print(f"ok {mod} {getattr(m, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"MISSING {mod}: {type(e).__name__}: {e}")
for mod in ("xdist", "pytest_timeout"):  # optional: the smoke tests run without them, slower or unguarded
    try:
        importlib.import_module(mod)
        print(f"ok {mod}")
    except Exception as e:  # noqa: BLE001
        print(f"absent {mod}: {type(e).__name__}")
PYEOF
sed 's/^/    setup| /' "$SETUP_LOG"
if grep -q '^MISSING' "$SETUP_LOG"; then setup_status=failed; else setup_status=ok; fi
if [ "$SETUP" = 1 ] && [ "$DRY" = 0 ] && ! grep -q 'available True' "$SETUP_LOG"; then setup_status="failed (no CUDA device)"; fi
printf 'setup\t%s\t-\t%s\t-\t%s\n' "$setup_status" "$(( $(date +%s) - T0 ))" "$SETUP_LOG" >> "$PARTS_TSV"
snapshot

# ---------------------------------------------------------------------------------------------- parts
if wanted pytest; then
  if [ "${GPU_CHECK_TESTS:-smoke}" = full ]; then
    mapfile -t TESTS < <(grep -l 'pytest\.mark\.gpu' tests/test_*.py)
    TESTS=(-m gpu --continue-on-collection-errors "${TESTS[@]}")
  else
    mapfile -t TESTS < <("$PY" -m benchmarks.gpu_plan --smoke-tests)
  fi
  opts=(-q -p no:cacheprovider -rfE --junitxml="$RES/pytest-junit.xml")
  if "$PY" -c "import xdist" 2> /dev/null; then
    workers=${GPU_CHECK_PYTEST_WORKERS:-8}
    cores=$(nproc 2> /dev/null || echo 1)
    [ "$workers" -gt "$cores" ] && workers=$cores
    opts+=(-n "$workers")
  fi
  if "$PY" -c "import pytest_timeout" 2> /dev/null; then opts+=(--timeout="${GPU_CHECK_TEST_TIMEOUT_S:-90}"); fi
  run_part pytest "$(timeout_for pytest)" "$PY" -m pytest "${opts[@]}" "${TESTS[@]}"
fi

if wanted e2e; then
  if [ "$DRY" = 1 ]; then
    run_part e2e "$(timeout_for e2e)" "$PY" -m benchmarks.bench_e2e --smoke \
      --variants "${GPU_CHECK_E2E_VARIANTS:-smoke}" --out "$RES"
  else
    # The order answers the most first (bench_e2e's gpu-check list): a time limit cuts the least telling.
    run_part e2e "$(timeout_for e2e)" "$PY" -m benchmarks.bench_e2e --models "${GPU_CHECK_E2E_MODELS:-125m}" \
      --steps "${GPU_CHECK_E2E_STEPS:-30}" --ref-steps "${GPU_CHECK_E2E_REF_STEPS:-10}" --log-every 1 \
      --variants "${GPU_CHECK_E2E_VARIANTS:-gpu-check}" --out "$RES"
  fi
fi

for bench in attention cross_entropy clip_adamw newton_schulz moe_dispatch; do
  wanted "$bench" || continue
  if [ "$DRY" = 1 ]; then shape=--smoke; else shape=--headline; fi
  extra=()
  if [ "$bench" = clip_adamw ] && [ "$DRY" = 0 ]; then
    extra=(--methods "${GPU_CHECK_CLIP_METHODS:-mupfast,torch AdamW,apex}")
  fi
  run_part "$bench" "$(timeout_for "$bench")" "$PY" -m "benchmarks.bench_$bench" "$shape" --out "$RES" \
    ${extra[@]+"${extra[@]}"}
done

# -------------------------------------------------------------------------------------------- summary
log "writing the summary"
STEM=$("$PY" - "$RUN" "$SUMMARY_DIR" "$DRY" "$(( $(date +%s) - T0 ))" << 'PYEOF'
import datetime as dt
import json
import re
import shutil
import sys
from pathlib import Path

run, summary_dir, dry, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
try:
    from benchmarks.common import device_name, versions

    device, vers = device_name(), versions()
except Exception as e:  # noqa: BLE001 - a broken install still gets its summary
    device, vers = "unknown device", {"error": f"{type(e).__name__}: {e}"}
stem = f"{dt.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}"
if dry:
    stem += "-dry-run"

parts = []
for line in (run / "parts.tsv").read_text().splitlines():
    name, status, rc, secs, budget, log = line.split("\t")
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
    note = ""
    if name == "pytest":  # its last line: "3 passed, 2 skipped, 9 deselected in 41.2s" (== around it or not)
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s)", text, re.M)
        note = found[-1] if found else (tail[-1] if tail else "")
    elif status != "ok" and tail:
        note = tail[-1][:200]
    parts.append({"part": name, "status": status, "rc": rc, "seconds": int(secs) if secs.isdigit() else None,
                  "budget_s": budget,
                  "note": note, "log_tail": tail})

benches, autotune = {}, {}
for path in sorted((run / "results").glob("*.json")):
    try:
        data = json.loads(path.read_text())
    except ValueError:
        continue
    if path.stem.endswith("-autotune"):  # the kernels' autotune winners of one benchmark
        autotune[data.get("benchmark", path.stem)] = data.get("winners", {})
    elif "rows" in data:
        benches[data.get("meta", {}).get("benchmark", path.stem)] = {"file": path.name, **data}

meta = {
    "what": "benchmarks/gpu_check.sh" + (" --dry-run (CPU plumbing: timings meaningless)" if dry else ""),
    "device": device,
    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    "versions": vers,
    "seconds": seconds,
    "all_ok": all(p["status"] == "ok" for p in parts),
}
summary = {"meta": meta, "parts": parts, "benchmarks": benches, "autotune": autotune}
(summary_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))


def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


lines = [f"# GPU check: {device}", "", f"- date: {meta['date']}", f"- {meta['what']}, {seconds} s in all",
         f"- versions: {', '.join(f'{k} {v}' for k, v in vers.items())}", "",
         "| part | status | seconds | budget s | note |", "|---|---|---|---|---|"]
lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['budget_s']} | {p['note'].replace('|', '/')} |"
          for p in parts]
for name, data in benches.items():
    md = run / "results" / (Path(data["file"]).stem + ".md")
    body = md.read_text().splitlines()[1:] if md.is_file() else []
    lines += ["", f"## {name}", *body]
(summary_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
if summary_dir.resolve() != (run / "results").resolve():
    for f in (run / "results").iterdir():
        shutil.copy2(f, summary_dir / f.name)

# The console's summary (printed last by the script): the parts, then the end-to-end rows.
console = lines[6 : 8 + len(parts)]
e2e = benches.get("e2e", {}).get("rows", [])
if e2e:
    cols = ["model", "variant", "status", "tokens_per_s", "tflops", "mfu_nominal", "peak_mem_GiB", "speedup_vs_base",
            "mem_vs_base", "max_abs_loss_diff_vs_ref"]
    console += ["", "e2e: " + " | ".join(cols), *("     " + " | ".join(fmt(r.get(c)) for c in cols) for r in e2e)]
(run / "console.txt").write_text("\n".join(console) + "\n")
print(stem)
PYEOF
)
SUMMARY_RC=$?
if [ $SUMMARY_RC -ne 0 ] || [ -z "$STEM" ]; then
  log "the summary could not be written (rc $SUMMARY_RC); the logs are in $LOGS"
  STEM=gpu-check-$(date +%F)
fi

snapshot
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$SUMMARY_DIR/$STEM.md" "$SUMMARY_DIR/$STEM.json" "$OUT/" 2> /dev/null
  log "copied the summary ($STEM.md, .json), parts.tsv and gpu-check.tar.gz to \$OUT"
fi

log "summary: $SUMMARY_DIR/$STEM.md (and .json); benchmark results: $SUMMARY_DIR; logs: $LOGS"
[ -f "$RUN/console.txt" ] && cat "$RUN/console.txt"
if awk -F'\t' '$2 != "ok" { bad = 1 } END { exit bad ? 0 : 1 }' "$PARTS_TSV"; then
  log "done: some parts did not pass"
  exit 1
fi
log "done: every part passed"
exit 0
