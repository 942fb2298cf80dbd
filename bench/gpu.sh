#!/usr/bin/env bash
# The project on a GPU in one short call, from the repository root, nothing installed. What has never run on a GPU
# comes first (capture legality and capture-failure counts, the AR program, the scheduler's per-pass graphs against
# cohort programs, deterministic mode's cost), then e2e eager vs graphed at B=1,4,16; parity comes last.
#
#   bash bench/gpu.sh --prepare   # here, before a device call: the fixture (whole: the tests read every file) into
#                                 # .gpu/fixtures, soundfile's cp312 wheels into .gpu/wheels (the device has neither)
#   bash bench/gpu.sh             # on the GPU: device run(command="bash bench/gpu.sh", carry=[".gpu"],
#                                 #   kind="nvidia-h200", timeout_s=420); an H100 run is as welcome, labelled
#   ONLY=load-static-graph,e2e-ar-program bash bench/gpu.sh   # just these stages (a rerun), extra ones included
#   bash bench/gpu.sh --quick     # (or QUICK=1) a CPU dry run: tiny shapes, Triton's interpreter; stages that need
#                                 # CUDA are reported as skipped, with the reason
#
# Budget arithmetic (a session has 15 min = 900 s of device time, the machine's start included):
#   start-up and transfers ~120 s + BUDGET 360 s (the default stages' limits add up to exactly that) = ~480 s,
#   which leaves ~420 s for a rerun of what failed (ONLY=...) inside the same 900 s. Stages marked `extra` (what
#   already ran on an H200: kernel checks, other backends, the HF peer) run only when ONLY names them.
# A stage that needs a GPU and captures graphs fails when a capture failed (bench load/e2e exit 1 with the reason;
# the test stages assert no capture failure).
#
# Environment: OUT (results; default a new tmp dir), MAGNET_FIXTURES (the folder holding magnet-tiny/; default
# .gpu/fixtures, else ../shared/fixtures), PYTHON (default python3), BUDGET (seconds for all stages, default 360),
# ONLY (comma-separated stage names). Results in $OUT (at most 8 files, what a device call brings back):
# stages.jsonl (an "env" line naming the card, then one line per stage: status ok | failed | timeout | skipped, rc,
# seconds, the skip reason), stages.log (every stage's output), fixture.jsonl and fixture_tokens.npz, e2e.jsonl,
# load.jsonl, kernels.jsonl (every row names the card: host.gpu), kernel_check.jsonl. A failing stage does not stop
# the others; the exit status is 1 when one failed or timed out.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
PREPARE=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (use --quick, --prepare or --help)" >&2; exit 2 ;;
  esac
done

if [ "$PREPARE" = 1 ]; then
  src=${MAGNET_FIXTURES:-$ROOT/../shared/fixtures}/magnet-tiny
  [ -d "$src" ] || { echo "bench/gpu.sh --prepare: no fixture at $src; set MAGNET_FIXTURES=DIR (holding magnet-tiny/)" >&2; exit 2; }
  rm -rf .gpu/fixtures && mkdir -p .gpu/fixtures/magnet-tiny .gpu/wheels || exit 1
  cp -r --no-preserve=mode "$src"/. .gpu/fixtures/magnet-tiny/ || exit 1  # ~18 MB of the 64 MiB a call carries
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels soundfile cffi pycparser || exit 1
  du -sh .gpu && echo "now: device run(command=\"bash bench/gpu.sh\", carry=[\".gpu\"], kind=\"nvidia-h200\", timeout_s=420)"
  exit 0
fi

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/magnet-gpu.XXXXXX")}
mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/magnet-gpu-work.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/p" "$WORK/site" "$WORK/logs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# carried wheels (soundfile, cffi, pycparser) where soundfile is missing: the device has no registry
if ls .gpu/wheels/*.whl >/dev/null 2>&1 && ! "$PY" -c "import soundfile" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .gpu/wheels/*.whl || echo "bench/gpu.sh: installing .gpu/wheels failed; stages that write audio will fail" >&2
fi
# The checkout's root on the path (magnet_engine/ reaches its sibling folders in a checkout), and a dist-info with
# setup.py's entry points beside it, so the backends and subcommands are found uninstalled.
export PYTHONPATH="$ROOT:$WORK/p:$WORK/site"
"$PY" -m magnet_engine.bench.gpu_check dist-info "$WORK/p" >/dev/null || { echo "bench/gpu.sh: no dist-info" >&2; exit 1; }

if [ -n "${MAGNET_FIXTURES:-}" ]; then FIXTURES=$MAGNET_FIXTURES
elif [ -d .gpu/fixtures/magnet-tiny ]; then FIXTURES=$ROOT/.gpu/fixtures
else FIXTURES=$ROOT/../shared/fixtures; fi
export MAGNET_FIXTURES=$FIXTURES  # the tests' conftest reads it too
FIXTURE=$FIXTURES/magnet-tiny

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$QUICK" = 1 ]; then
  DEV=cpu; export TRITON_INTERPRET=1  # Triton's interpreter runs the kernels on CPU tensors
  MAGNET="tiny --kind magnet"; AR="tiny --kind ar"; DTYPE=bfloat16; BATCH=1; DURATION=0.5
  RUNS_MAGNET="--steps 2,1,1,1 --repeats 1 --warmup 0"; RUNS_AR="--repeats 1 --warmup 0"; RUNS_PEER=$RUNS_AR
  FIXTURE_RUNS=gen_nonoverlap_max; CHECK_QUICK=--quick
  DET_BACKEND=torch  # the interpreted Triton GEMM over a whole burst would outlast the stage's limit
  LOAD_MODEL="tiny --kind magnet"; RUNS_LOAD="--requests 2 --max-batch 2 --min-duration 0.5 --max-duration 0.5 --repeats 1"
else
  [ "$HAS_CUDA" = 1 ] || { echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); --quick is the CPU dry run" >&2; exit 2; }
  DEV=cuda; unset TRITON_INTERPRET  # compiled kernels
  MAGNET=magnet-small-10secs; AR=musicgen-small; DTYPE=float16; BATCH=1,4,16; DURATION=10
  RUNS_MAGNET="--repeats 3 --warmup 1"; RUNS_AR="--repeats 3 --warmup 1"; RUNS_PEER="--repeats 2 --warmup 1"
  FIXTURE_RUNS=gen_nonoverlap_max,gen_nonoverlap_prod,gen_stride1,gen_cfg3_temp1,gen_continuation; CHECK_QUICK=
  DET_BACKEND=triton
  LOAD_MODEL=magnet-small-10secs; RUNS_LOAD="--requests 16 --max-batch 16 --min-duration 10 --max-duration 10 --repeats 2"
fi
E2E="$PY -m magnet_engine.bench e2e --device $DEV --dtype $DTYPE --batch $BATCH --duration $DURATION --json $OUT/e2e.jsonl"
CHECK="$PY -m magnet_engine.bench.gpu_check"
LOAD="$PY -m magnet_engine.bench load --trace burst --static-wait 0 --device $DEV --dtype $DTYPE --model $LOAD_MODEL $RUNS_LOAD --out $OUT/load.jsonl"
FIX="$CHECK fixture --fixture $FIXTURE --device $DEV --dtype float32 --runs $FIXTURE_RUNS --json $OUT/fixture.jsonl --tokens $OUT/fixture_tokens.npz"

# One stage a line: name | time limit (s) | needs (comma-separated: cuda, extra; - for none) | command. The default
# stages' limits add up to BUDGET's default, 360 s (tests/test_gpu_harness.py checks it); on a GPU `extra` ones run
# only when ONLY names them.
TESTS="$PY -m pytest -q -p no:cacheprovider -k cuda"
STAGES=(
  # never run on a GPU before: every captured path without a capture failure, fp16 batched == solo, graphs == eager
  "capture-tests|55|cuda|$TESTS tests/test_capture.py tests/test_static.py tests/test_determinism.py"
  "e2e-ar-program|30|cuda|$E2E --model $AR --cuda-graph $RUNS_AR"
  # the scheduler: per-pass graphs (one per layout) against whole-cohort programs, and both eager
  "load-static-graph|30|cuda|$LOAD --policy static --cuda-graph"
  "load-scheduler-graph|30|cuda|$LOAD --policy scheduler --cuda-graph"
  "load-static|20|-|$LOAD --policy static --no-deterministic"
  "load-scheduler|20|-|$LOAD --policy scheduler --no-deterministic"
  # deterministic mode's cost against load-static (same burst): the Triton fixed-tile GEMM (one launch per linear)
  # and the torch backend's 64-row cuBLAS blocks; then per linear of a pass against F.linear
  "load-static-deterministic|25|-|$LOAD --policy static --deterministic --backend $DET_BACKEND"
  "load-static-deterministic-torch|25|cuda|$LOAD --policy static --deterministic"
  "invariant-gemm|20|cuda|$PY -m magnet_engine.bench kernels --what invariant_matmul --models magnet-small --T 500 --B 1 4 16 --dtypes fp16 --json $OUT/kernels.jsonl"
  # B=1,4,16 eager vs whole-program graphs
  "e2e-magnet-torch|35|-|$E2E --model $MAGNET --backend torch $RUNS_MAGNET"
  "e2e-magnet-cuda-graph|35|cuda|$E2E --model $MAGNET --backend torch --cuda-graph $RUNS_MAGNET"
  # parity last: it ran on an H200 before
  "fixture-triton-fp32|35|-|$FIX --backend triton"
  # extra: run with ONLY=name
  "e2e-magnet-triton-graph|120|extra,cuda|$E2E --model $MAGNET --backend triton --cuda-graph $RUNS_MAGNET"
  "kernels-check|120|extra|$CHECK kernels --device $DEV $CHECK_QUICK --json $OUT/kernel_check.jsonl"
  "fixture-torch-fp32|90|extra|$FIX --backend torch"
  "e2e-magnet-triton|120|extra|$E2E --model $MAGNET --backend triton $RUNS_MAGNET"
  "e2e-ar-eager|120|extra|$E2E --model $AR $RUNS_AR"
  "e2e-hf-musicgen|90|extra|$PY -m magnet_engine.bench e2e --model $AR --kind hf-musicgen --device $DEV --dtype $DTYPE --batch 1 --duration $DURATION --json $OUT/e2e.jsonl $RUNS_PEER"
  "bench-kernels|60|extra,cuda|$PY -m magnet_engine.bench kernels --json $OUT/kernels.jsonl"
)

if [ -n "${ONLY:-}" ]; then  # a misspelt name would silently run nothing
  names=$(printf '%s\n' "${STAGES[@]}" | cut -d'|' -f1 | tr '\n' ' ')
  IFS=, read -ra wanted <<<"$ONLY"
  for w in "${wanted[@]}"; do
    case " $names " in *" $w "*) ;; *) echo "bench/gpu.sh: ONLY names no stage '$w'; stages: $names" >&2; exit 2 ;; esac
  done
fi

jline() {  # KEY=VALUE ... -> one JSON line on stages.jsonl (integers as numbers, empty as null)
  "$PY" - "$@" >>"$OUT/stages.jsonl" <<'PY'
import json, sys
row = {}
for kv in sys.argv[1:]:
    key, _, value = kv.partition("=")
    row[key] = int(value) if value.lstrip("-").isdigit() else (value or None)
print(json.dumps(row))
PY
}

why_skip() {  # NAME NEEDS -> the reason this stage cannot run here, or nothing
  local need
  if [ -n "${ONLY:-}" ]; then
    case ",$ONLY," in *",$1,"*) ;; *) echo "not in ONLY=$ONLY"; return ;; esac
  fi
  IFS=, read -ra needs <<<"$2"
  for need in "${needs[@]}"; do
    case $need in
      -|"") ;;
      extra)  # the CPU dry run runs these too: it is the only check they get in CI
        [ -n "${ONLY:-}" ] || [ "$QUICK" = 1 ] || { echo "extra: runs when ONLY names it"; return; } ;;
      cuda)
        if [ "$QUICK" = 1 ]; then echo "needs CUDA: the --quick dry run runs on the CPU"; return; fi ;;
      *) echo "unknown need $need"; return ;;
    esac
  done
}

T0=$(date +%s)
BUDGET=${BUDGET:-360}
FAILED=0
run_stage() {  # NAME LIMIT NEEDS COMMAND
  local name=$1 limit=$2 needs=$3 cmd=$4 reason left rc t0 status
  reason=$(why_skip "$name" "$needs")
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ -z "$reason" ] && [ "$left" -lt 10 ]; then reason="the ${BUDGET}s budget is spent"; FAILED=1; fi
  if [ -n "$reason" ]; then
    echo "== $(date +%T) $name: skipped ($reason)"
    jline stage="$name" status=skipped skipped="$reason" command="$cmd"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $(date +%T) $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$cmd" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed; FAILED=1 ;; esac
  [ "$status" = timeout ] && FAILED=1
  echo "   $status rc=$rc $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-4}" "$WORK/logs/$name.log" | sed 's/^/   /'
  { echo "===== $name: $status rc=$rc $(( $(date +%s) - t0 ))s: $cmd"; cat "$WORK/logs/$name.log"; } >>"$OUT/stages.log"
  jline stage="$name" status="$status" rc="$rc" seconds="$(( $(date +%s) - t0 ))" limit_s="$limit" \
    command="$cmd" last_line="$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-300)"
}

: >"$OUT/stages.jsonl"
: >"$OUT/stages.log"
"$PY" - "$DEV" "$QUICK" "$FIXTURE" >>"$OUT/stages.jsonl" <<'PY'
import json, platform, sys
import numpy, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print(json.dumps({"stage": "env", "device": sys.argv[1], "quick": sys.argv[2] == "1", "fixture": sys.argv[3],
                  "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None, "triton": triton_version,
                  "transformers": transformers.__version__, "numpy": numpy.__version__}))
PY
tail -n 1 "$OUT/stages.jsonl"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader

for line in "${STAGES[@]}"; do
  IFS='|' read -r name limit needs cmd <<<"$line"
  run_stage "$name" "$limit" "$needs" "$cmd"
done

echo "== $(date +%T) summary ($(( $(date +%s) - T0 ))s; results in $OUT)"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for r in map(json.loads, (out / "stages.jsonl").read_text().splitlines()[1:]):
    print(f"  {r['stage']:24s} {r['status']:8s} {r.get('skipped') or r.get('last_line') or ''}"[:150])
if (out / "e2e.jsonl").is_file():
    for r in map(json.loads, (out / "e2e.jsonl").read_text().splitlines()):
        stages = {k: round(v * 1000, 1) for k, v in (r.get("stages_s") or {}).items()}
        print(f"  {r['scenario']:64s} {r['latency_s']['median'] * 1000:9.1f} ms  {stages}")
if (out / "load.jsonl").is_file():
    for r in map(json.loads, (out / "load.jsonl").read_text().splitlines()):
        graphs = {k: r[k] for k in r if k.startswith(("program_", "pass_", "passes_", "capture_"))}
        print(f"  load {r['policy']:9s} graph={r['cuda_graph']!s:5s} repeat {r['repeat']}: makespan "
              f"{r['makespan_s']:.3f} s, p50 latency {r['latency_s']['p50']:.3f} s  {graphs}")
PY
exit "$FAILED"
