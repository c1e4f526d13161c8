#!/usr/bin/env bash
# The GPU checks of issue 18 in one call on a bare H100/H200 machine, in under 8 minutes:
#   1. pytest -m gpu        bf16 (and fp32) correctness of every kernel against its oracle
#   2. kernel benchmarks    attention, cross_entropy, clip_adamw, newton_schulz, moe_dispatch at their
#                           headline shapes (--headline)
#   3. bench_e2e, 125M      kernels off/on x eager/compile x activation checkpointing none/full, 30 steps each
# Each part runs under its own `timeout`, so one that hangs cannot eat the others' time; bench_e2e gets
# what the others leave (at least GPU_CHECK_E2E_MIN_S). It writes each benchmark's own results and a
# summary of all of them, benchmarks/results/<date>-<device>.{md,json}, copies the summary and a tarball
# of everything (results and logs) to $OUT when it is set, and prints a summary last. Exit status 0 when
# every part passed, 1 otherwise.
#
# Time plan (seconds, of GPU_CHECK_TOTAL_S = 470): setup about 20, pytest 150, attention 40,
# cross_entropy 35, clip_adamw 20, newton_schulz 30, moe_dispatch 20, then e2e the rest (at least 150).
# bench_e2e runs the eager variants first and records each finished one, so a cut loses only the last;
# a second call with GPU_CHECK_PARTS=e2e (and GPU_CHECK_E2E_VARIANTS=the missing ones) completes it.
#
# Calling it through the device tool (`run`):
#   once, here, in the repo root: bash ../shared/tools/gpu-wheels.sh zstandard
#       (.whl/: deepspeed, its dependencies the GPU image lacks, and zstandard, which mupfast.data imports)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# then copy the files that come back (files_at) into benchmarks/results/ and unpack the tarball there for
# each benchmark's own .md/.json. The script installs .whl/*.whl into /tmp/site (PYTHONPATH) first, and
# links mupfast/kernels -> kernels when the package is not installed (a bare machine has no editable
# install to map mupfast.kernels onto kernels/).
#
# On the CPU, a dry run checks the plumbing (kernel benchmarks with --smoke, bench_e2e --smoke) and
# writes to a temporary folder unless --out is given:
#   bash benchmarks/gpu_check.sh --dry-run            (or GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh)
#
# Options: --dry-run, --out DIR (the summary's folder; default benchmarks/results, a temporary one when dry).
# Environment: PYTHON (default python3; .venv/bin/python in a dry run where present); GPU_CHECK_PARTS
# (comma-separated subset of: pytest,attention,cross_entropy,clip_adamw,newton_schulz,moe_dispatch,e2e);
# GPU_CHECK_TOTAL_S (the whole budget, default 470); GPU_CHECK_BUDGET_<PART> (seconds for one part, e.g.
# GPU_CHECK_BUDGET_PYTEST=200); GPU_CHECK_E2E_MIN_S (150); GPU_CHECK_E2E_VARIANTS, GPU_CHECK_E2E_MODELS
# (125m), GPU_CHECK_E2E_STEPS (30); GPU_CHECK_CLIP_METHODS (the clip_adamw methods; DeepSpeed FusedAdam
# is left out by default: its JIT build of a CUDA extension alone takes about its whole budget).
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

export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
else
  unset TRITON_INTERPRET
fi

TOTAL=${GPU_CHECK_TOTAL_S:-$([ "$DRY" = 1 ] && echo 900 || echo 470)}
DEADLINE=$((T0 + TOTAL))
E2E_MIN=${GPU_CHECK_E2E_MIN_S:-150}
SUMMARY_RESERVE=10
ALL_PARTS="pytest attention cross_entropy clip_adamw newton_schulz moe_dispatch e2e"
PARTS=$(echo "${GPU_CHECK_PARTS:-$ALL_PARTS}" | tr ',' ' ')

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

wanted() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

budget_of() {  # the part's own budget: GPU_CHECK_BUDGET_<PART>, else the default (dry runs get more)
  local var="GPU_CHECK_BUDGET_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  local default
  case "$1" in
    pytest) default=150 ;;
    attention) default=40 ;;
    cross_entropy) default=35 ;;
    clip_adamw) default=20 ;;
    newton_schulz) default=30 ;;
    moe_dispatch) default=20 ;;
    *) default=60 ;;
  esac
  [ "$DRY" = 1 ] && default=$((default * 3))
  echo "${!var:-$default}"
}

# run_part NAME BUDGET CMD...: runs CMD under timeout, its output in logs/NAME.log; appends a row to
# parts.tsv (name, status, rc, seconds, budget, log).
run_part() {
  local name=$1 budget=$2; shift 2
  local logf=$LOGS/$name.log start rc status
  if [ "$budget" -lt 5 ]; then
    log "$name: skipped (no time left)"
    printf '%s\tskipped (no time left)\t-\t0\t%s\t%s\n' "$name" "$budget" "$logf" >> "$PARTS_TSV"
    return
  fi
  log "$name: start (budget ${budget}s): $*"
  start=$(date +%s)
  timeout --kill-after=15 "$budget" "$@" > "$logf" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$budget" "$logf" \
    >> "$PARTS_TSV"
  log "$name: $status (rc $rc, $(( $(date +%s) - start ))s)"
  if [ "$status" != ok ]; then tail -n 8 "$logf" | sed "s/^/    $name| /"; fi
}

# A part's time: its own budget, cut so that bench_e2e keeps its minimum and the summary its seconds.
timeout_for() {
  local name=$1 reserve=$SUMMARY_RESERVE left
  if [ "$name" != e2e ] && wanted e2e; then reserve=$((reserve + E2E_MIN)); fi
  left=$((DEADLINE - $(date +%s) - reserve))
  if [ "$name" = e2e ]; then
    local own="GPU_CHECK_BUDGET_E2E"
    [ -n "${!own:-}" ] && [ "${!own}" -lt "$left" ] && left=${!own}
    echo "$left"; return
  fi
  local b; b=$(budget_of "$name")
  if [ "$b" -lt "$left" ]; then echo "$b"; else echo "$left"; fi
}

# ---------------------------------------------------------------------------------------------- setup
log "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU plumbing)' || echo GPU); python: $PY; run folder: $RUN"
SETUP_LOG=$LOGS/setup.log
: > "$SETUP_LOG"
if [ "$DRY" = 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
  echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site" >> "$SETUP_LOG"
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$SETUP_LOG" 2>&1 || echo "warning: installing .whl failed" >> "$SETUP_LOG"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ "$DRY" = 0 ]; then
  echo "warning: no .whl/*.whl: deepspeed and zstandard must already be importable" >> "$SETUP_LOG"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 0 ] && [ ! -e mupfast/kernels ] && ! "$PY" -c "import mupfast.kernels" 2> /dev/null; then
  echo "mupfast.kernels is not importable (no editable install): linking mupfast/kernels -> ../kernels" \
    >> "$SETUP_LOG"
  ln -s ../kernels mupfast/kernels
fi
timeout 120 "$PY" - >> "$SETUP_LOG" 2>&1 << 'EOF'
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
EOF
sed 's/^/    setup| /' "$SETUP_LOG"
if grep -q '^MISSING' "$SETUP_LOG"; then setup_status=failed; else setup_status=ok; fi
if [ "$DRY" = 0 ] && ! grep -q 'available True' "$SETUP_LOG"; then setup_status="failed (no CUDA device)"; fi
printf 'setup\t%s\t-\t%s\t-\t%s\n' "$setup_status" "$(( $(date +%s) - T0 ))" "$SETUP_LOG" >> "$PARTS_TSV"

# ---------------------------------------------------------------------------------------------- parts
if wanted pytest; then
  mapfile -t GPU_TESTS < <(grep -l 'pytest\.mark\.gpu' tests/test_*.py)
  run_part pytest "$(timeout_for pytest)" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE \
    --continue-on-collection-errors "${GPU_TESTS[@]}"
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

if wanted e2e; then
  if [ "$DRY" = 1 ]; then
    run_part e2e "$(timeout_for e2e)" "$PY" -m benchmarks.bench_e2e --smoke \
      --variants "${GPU_CHECK_E2E_VARIANTS:-smoke}" --out "$RES"
  else
    # Most telling first: a time limit then cuts the least telling (every finished variant is kept).
    variants=off-eager-none,on-eager-none,off-eager-full,on-eager-full
    variants=$variants,on-compile-none,off-compile-none,on-compile-full,off-compile-full
    run_part e2e "$(timeout_for e2e)" "$PY" -m benchmarks.bench_e2e --models "${GPU_CHECK_E2E_MODELS:-125m}" \
      --steps "${GPU_CHECK_E2E_STEPS:-30}" --variants "${GPU_CHECK_E2E_VARIANTS:-$variants}" --out "$RES"
  fi
fi

# -------------------------------------------------------------------------------------------- summary
log "writing the summary"
STEM=$("$PY" - "$RUN" "$SUMMARY_DIR" "$DRY" "$(( $(date +%s) - T0 ))" << 'EOF'
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
    parts.append({"part": name, "status": status, "rc": rc, "seconds": int(secs), "budget_s": budget,
                  "note": note, "log_tail": tail})

benches = {}
for path in sorted((run / "results").glob("*.json")):
    try:
        data = json.loads(path.read_text())
    except ValueError:
        continue
    benches[data.get("meta", {}).get("benchmark", path.stem)] = {"file": path.name, **data}

meta = {
    "what": "benchmarks/gpu_check.sh" + (" --dry-run (CPU plumbing: timings meaningless)" if dry else ""),
    "device": device,
    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    "versions": vers,
    "seconds": seconds,
    "all_ok": all(p["status"] == "ok" for p in parts),
}
(summary_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "parts": parts, "benchmarks": benches}, indent=2))


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
            "mem_vs_base"]
    console += ["", "e2e: " + " | ".join(cols), *("     " + " | ".join(fmt(r.get(c)) for c in cols) for r in e2e)]
(run / "console.txt").write_text("\n".join(console) + "\n")
print(stem)
EOF
)
SUMMARY_RC=$?
if [ $SUMMARY_RC -ne 0 ] || [ -z "$STEM" ]; then
  log "the summary could not be written (rc $SUMMARY_RC); the logs are in $LOGS"
  STEM=gpu-check-$(date +%F)
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$SUMMARY_DIR/$STEM.md" "$SUMMARY_DIR/$STEM.json" "$OUT/" 2> /dev/null
  tar -czf "$OUT/gpu-check-$STEM.tar.gz" -C "$RUN" results logs parts.tsv 2> /dev/null
  log "copied the summary and gpu-check-$STEM.tar.gz to \$OUT"
fi

log "summary: $SUMMARY_DIR/$STEM.md (and .json); benchmark results: $SUMMARY_DIR; logs: $LOGS"
[ -f "$RUN/console.txt" ] && cat "$RUN/console.txt"
if awk -F'\t' '$2 != "ok" { bad = 1 } END { exit bad ? 0 : 1 }' "$PARTS_TSV"; then
  log "done: some parts did not pass"
  exit 1
fi
log "done: every part passed"
exit 0
