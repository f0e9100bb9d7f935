#!/usr/bin/env bash
# The one prepared GPU check of the CUDA backend: everything a ~10-minute device lease should tell,
# most informative first, under one deadline, into two files that the device tool returns.
#
#   bash bench/gpu_check.sh OUT [WHEEL_DIR]
#
# Steps (each gets at most its own cap and never more than what is left of the deadline; a step
# that cannot get its minimum is skipped, and so is any step whose prerequisite failed):
#   probe     GPU, driver, nvcc, Python packages, the wheels installed from WHEEL_DIR
#   build     pip install with PYENGINE_CUDA=ON, sm_90 only
#   synth     a gpt-oss-20b-shaped file in seconds (`pyengine synth --fast`, in /dev/shm if it fits)
#   logits    GPU vs CPU logits at that shape: 32-token prefill + 8 decode steps, then 8 decode steps
#             on int8 activations (bench/gpu_logits.py)
#   bench     `pyengine bench --device cuda` pp512 / tg128, then tg128 at depth 8192
#   ncu       Nsight Compute over one decode step, per-kernel duration, DRAM bytes, instructions,
#             issue-active (bench/ncu_decode.py)
#   profile   per-operation times with CUDA events (bench/bench_cuda.py)
#   reply     the same greedy reply as text from the CPU and the GPU (`pyengine run --exact`: the
#             CPU with float32 activations, the GPU's arithmetic)
#   tests     the GPU tests (pytest -m cuda: the real backend only, never the emulator)
#   memcheck, racecheck   compute-sanitizer over one engine test and the attention/matvec tests
# OUT gets summary.txt (one line per step: status, seconds, the figure that matters) and
# gpu-check.tar.gz (every step's full log). Exit status 0 when no step failed.
#
# WHEEL_DIR (default .whl): wheels for what the device image lacks. It has numpy, tiktoken, jinja2,
# pyyaml, requests, tqdm, pytest, Cython, scikit-build-core, CMake, ninja, nvcc, but no gguf and no
# package index; prepare (here, where pip works, then `carry` the folder):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
# Nothing else is needed: the synth file has a synthetic vocabulary (no bpe-openai) and the CLI
# never imports the node's web stack for these commands.
#
# Environment: GPU_CHECK_BUDGET seconds for the whole check (default 540: one device command may
# run 600), GPU_CHECK_STEPS a space-separated subset of the steps to run (the rest are recorded as
# skipped; a rerun with the device time left, e.g. "probe build tests memcheck racecheck"),
# PYTHON (default python3). PYENGINE_GPU_CHECK_DRY=1 runs every step on this machine
# against the CUDA emulator with small shapes (no build: the installed package is used; ncu and
# compute-sanitizer are left out where absent; packages the device lacks are made unimportable),
# so the script's logic is tested without a GPU (tests/test_gpu_check.py).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: bench/gpu_check.sh OUT [WHEEL_DIR]}")
WHEELS=$(realpath -m "${2:-.whl}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=${PYENGINE_GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}
PY=$(command -v "${PYTHON:-python3}") && PY=$(realpath -s "$PY") || { echo "no ${PYTHON:-python3}"; exit 1; }
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=8  # seconds kept for the archive
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
rm -f "$OUT/summary.txt" "$OUT/gpu-check.tar.gz"
SUMMARY=$OUT/summary.txt
declare -A DONE=()  # step -> ok | FAIL | SKIP
N_FAIL=0

finish() {
  local n_ok=0 n_skip=0 s
  for s in "${DONE[@]}"; do
    [ "$s" = ok ] && n_ok=$((n_ok + 1))
    [ "$s" = SKIP ] && n_skip=$((n_skip + 1))
  done
  printf 'RESULT: %d ok, %d FAIL, %d SKIP in %d s of %d\n' "$n_ok" "$N_FAIL" "$n_skip" \
    "$(($(date +%s) - START))" "$BUDGET" >> "$SUMMARY"
  cp "$SUMMARY" "$LOGS/summary.txt"
  tar czf "$OUT/gpu-check.tar.gz" -C "$WORK" logs
  rm -rf "$WORK" "${MODEL:-}"
}
trap finish EXIT

# record NAME STATUS SECONDS DETAIL
record() {
  DONE[$1]=$2
  [ "$2" = FAIL ] && N_FAIL=$((N_FAIL + 1))
  printf '%-10s %-4s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

# step NAME CAP MIN NEEDS DETAIL_PATTERN [N]: runs the function body_NAME under a time-out of
# min(CAP, time left - RESERVE) seconds, its output in logs/NAME.txt; skipped when less than MIN
# seconds are left or a step in NEEDS (space separated) is not ok. The summary's detail is the last
# N (default 1) log lines matching DETAIL_PATTERN (grep -E), or the log's last line when the step
# failed without one.
step() {
  local name=$1 cap=$2 min=$3 needs=$4 pattern=$5 n=${6:-1} dep left t rc t0 detail
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    record "$name" SKIP 0 "not in GPU_CHECK_STEPS"; return
  fi
  for dep in $needs; do
    if [ "${DONE[$dep]:-}" != ok ]; then record "$name" SKIP 0 "needs $dep"; return; fi
  done
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt "$min" ]; then record "$name" SKIP 0 "deadline: ${left}s left, needs ${min}s"; return; fi
  t=$((cap < left ? cap : left))
  t0=$(date +%s)
  echo "== $(date -u +%H:%M:%S) $name (time-out ${t}s)" >> "$LOGS/steps.txt"
  timeout -k 5 "$t" bash -c "body_$name" > "$LOGS/$name.txt" 2>&1
  rc=$?
  detail=$(grep -E -- "$pattern" "$LOGS/$name.txt" | tail -"$n" | cut -c1-160 | paste -sd ';' -)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" FAIL "$(($(date +%s) - t0))" "time-out after ${t}s; ${detail}"
  elif [ "$rc" != 0 ]; then
    [ -n "$detail" ] || detail=$(tail -1 "$LOGS/$name.txt" | cut -c1-200)
    record "$name" FAIL "$(($(date +%s) - t0))" "exit $rc: $detail"
  else
    record "$name" ok "$(($(date +%s) - t0))" "$detail"
  fi
}

# --- the shapes: the real ones, or small ones on the emulator --------------------------------------
if [ "$DRY" = 1 ]; then
  export PYENGINE_CUDA_EMULATOR=1
  SYNTH_ARGS="--shape tiny --layers 1"
  LOGITS_ARGS="--prompt 4 --decode 2 --int8 2"
  BENCH1="-p 8 -n 2 -r 1"
  BENCH2="-p 0 -n 2 -d 4 -r 1"
  NCU_ARGS="--depth 2 --warmup 1"
  PROFILE_ARGS="--depth 2 --tokens 1"
  REPLY_N=3
  TEST_SEL=(-m "not cuda" -k "test_rmsnorm or test_swiglu_oai_and_add")
  MEMCHECK_SEL=(-m "not cuda" -k "test_kv_store_ring_wraps")
  RACECHECK_SEL=(-m "not cuda" -k "test_gather_scatter_rows")
  # make what the device image lacks unimportable, so a dependency on it fails here too
  mkdir -p "$WORK/absent"
  cat > "$WORK/absent/sitecustomize.py" <<'EOF'
import sys
ABSENT = {"bpe_openai", "fastapi", "uvicorn", "pydantic", "llama_cpp"}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent from the device image)")
        return None
sys.meta_path.insert(0, _Absent())
EOF
  export PYTHONPATH=$WORK/absent${PYTHONPATH:+:$PYTHONPATH}
else
  unset PYENGINE_CUDA_EMULATOR
  SYNTH_ARGS="--shape gpt-oss-20b"
  LOGITS_ARGS="--prompt 32 --decode 8 --int8 8"
  BENCH1="-p 512 -n 128 -r 3"
  BENCH2="-p 0 -n 128 -d 8192 -r 2"
  NCU_ARGS="--depth 512"
  PROFILE_ARGS="--depth 512 --tokens 16"
  REPLY_N=16
  TEST_SEL=(-m cuda)
  MEMCHECK_SEL=(-m cuda -k "test_prefill_and_decode_match_cpu and q8_0")
  RACECHECK_SEL=(-m cuda -k "attention or matvec")
fi
MODEL_DIR=$WORK
if [ "$DRY" != 1 ] && [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)" -gt 20000000 ] 2>/dev/null; then
  MODEL_DIR=/dev/shm  # the 13 GB file is written at memory speed, not disk speed
fi
MODEL=$MODEL_DIR/gpu-check-synth.gguf
SITE=$WORK/site  # the wheels from WHEEL_DIR, installed by the probe
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export SITE REPO WHEELS DRY PY MODEL SYNTH_ARGS LOGITS_ARGS BENCH1 BENCH2 NCU_ARGS PROFILE_ARGS REPLY_N LOGS
export TEST_SEL_S="${TEST_SEL[*]@Q}" MEMCHECK_SEL_S="${MEMCHECK_SEL[*]@Q}" RACECHECK_SEL_S="${RACECHECK_SEL[*]@Q}"
cd "$WORK" || exit 1  # import the installed package, never the source folder

# --- step bodies (run by `bash -c` under a time-out, so exported) ---------------------------------
body_probe() {
  echo "mode: $([ "$DRY" = 1 ] && echo "dry (emulator)" || echo device)"
  (cd "$REPO" && git rev-parse HEAD 2>/dev/null) || echo "commit: unknown (no git)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: absent"
  fi
  command -v nvcc > /dev/null && nvcc --version | tail -2 || echo "nvcc: absent"
  for tool in ncu compute-sanitizer; do command -v "$tool" > /dev/null && echo "$tool: $(command -v $tool)" || echo "$tool: absent"; done
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || exit 1
    echo "installed: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
  fi
  "$PY" -c "import sys, numpy, tiktoken, gguf, jinja2, yaml; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'gguf ok')"
}
body_build() {
  if [ "$DRY" = 1 ]; then
    "$PY" -c "import pyengine._cuda_emu as c; print('dry: the installed package, backend', c.BACKEND)"
    return
  fi
  (cd "$REPO" && PYENGINE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=16 \
    "$PY" -m pip install --no-build-isolation --no-deps -v .) || exit 1
  "$PY" -c "import pyengine._cuda as c; print(c.BACKEND, c.device_count(), c.device_info(0), round(c.copy_bandwidth() / 1e9), 'GB/s copy')"
}
body_synth() {
  rm -f "$MODEL"
  "$PY" -m pyengine.cli synth --fast $SYNTH_ARGS --arch-name gpt-oss "$MODEL"
}
body_logits() { "$PY" "$REPO/bench/gpu_logits.py" "$MODEL" $LOGITS_ARGS --json "$LOGS/logits.json"; }
body_bench() {  # the markdown tables, then one "BENCH test t/s" line per row
  local args
  for args in "$BENCH1" "$BENCH2"; do
    "$PY" -m pyengine.cli bench "$MODEL" $args --device cuda > "$LOGS/bench-table.txt" || exit 1
    cat "$LOGS/bench-table.txt"
    awk -F'|' '$(NF-2) ~ /(pp|tg)[0-9]/ {print "BENCH", $(NF-2), $(NF-1)}' "$LOGS/bench-table.txt" | tr -s ' '
  done
}
body_ncu() {
  if command -v ncu > /dev/null; then
    ncu --profile-from-start off --clock-control none --graph-profiling node --print-units base --csv \
      --metrics "$("$PY" "$REPO/bench/ncu_decode.py" --metrics)" \
      "$PY" "$REPO/bench/ncu_decode.py" "$MODEL" $NCU_ARGS > "$LOGS/ncu.csv" || exit 1
    "$PY" "$REPO/bench/ncu_decode.py" --summarize "$LOGS/ncu.csv" --json "$LOGS/ncu.json"
  else
    echo "ncu absent: the profiled step runs without it"
    "$PY" "$REPO/bench/ncu_decode.py" "$MODEL" $NCU_ARGS
  fi
}
body_profile() { "$PY" "$REPO/bench/bench_cuda.py" "$MODEL" $PROFILE_ARGS --json "$LOGS/profile.json"; }
body_reply() {
  local dev
  for dev in cpu cuda; do
    "$PY" -m pyengine.cli run "$MODEL" "Why is the sky blue?" -n "$REPLY_N" -c 256 --temperature 0 --exact --device $dev \
      > "$LOGS/reply-$dev.txt" 2> "$LOGS/reply-$dev.err" || { echo "$dev run failed: $(tail -1 "$LOGS/reply-$dev.err")"; exit 1; }
  done
  # two failed or empty runs must never compare equal
  if [ ! -s "$LOGS/reply-cpu.txt" ]; then echo "empty reply"; exit 1; fi
  if cmp -s "$LOGS/reply-cpu.txt" "$LOGS/reply-cuda.txt"; then
    echo "same reply ($(wc -c < "$LOGS/reply-cpu.txt") bytes)"
  else
    echo "REPLIES DIFFER (reply-cpu.txt, reply-cuda.txt)"; exit 1
  fi
}
pytest_in() {  # pytest_in SELECTION PREFIX...: PREFIX -m pytest over the cuda test files
  local sel=$1; shift
  eval "local extra=($sel)"
  "$@" -m pytest -q -p no:cacheprovider -x "${extra[@]}" "$REPO/tests/test_cuda_ops.py" \
    "$REPO/tests/test_cuda_matmul.py" "$REPO/tests/test_cuda_engine.py" "$REPO/tests/test_cuda_gemm_i8.py"
}
sanitizer() {  # sanitizer TOOL: compute-sanitizer --tool TOOL, or nothing where it is absent (dry)
  if command -v compute-sanitizer > /dev/null; then echo compute-sanitizer --tool "$1" --error-exitcode 9; fi
}
body_tests() { pytest_in "$TEST_SEL_S" "$PY"; }
body_memcheck() { pytest_in "$MEMCHECK_SEL_S" $(sanitizer memcheck) "$PY"; }
body_racecheck() { pytest_in "$RACECHECK_SEL_S" $(sanitizer racecheck) "$PY"; }
export -f body_probe body_build body_synth body_logits body_bench body_ncu body_profile body_reply \
  body_tests body_memcheck body_racecheck pytest_in sanitizer

printf 'gpu-check %s, %s UTC, budget %d s\n' "$([ "$DRY" = 1 ] && echo "DRY (emulator)" || echo device)" \
  "$(date -u '+%Y-%m-%d %H:%M:%S')" "$BUDGET" > "$SUMMARY"
#    name      cap min needs          detail pattern
step probe      60  10 ""             "^python |nvcc: absent|^NVIDIA|H[12]00"
step build     300  60 "probe"        "GB/s copy|backend"
step synth     120  20 "build"        "wrote "
step logits    120  30 "synth"        "^RESULT"
step bench     200  40 "synth"        "^BENCH"                               3
step ncu       100  40 "synth"        "one decode step|profiled one decode step"
step profile    60  30 "synth"        "^prefill .*decode"
step reply      90  30 "synth"        "reply|REPLIES|failed"
step tests     150  30 "build"        "passed|failed|error"
step memcheck  120  40 "build"        "passed|failed|error|ERROR SUMMARY"
step racecheck 120  40 "build"        "passed|failed|error|RACECHECK SUMMARY"
[ "$N_FAIL" = 0 ]
