#!/usr/bin/env bash
# The one prepared GPU check of the CUDA backend: build with nvcc, run the GPU tests (real backend
# only; the emulator runs in CI), a memcheck of one engine test, then time a gpt-oss-20b-shaped file.
# Logs go to LOG_DIR (created). Finishes in a few minutes on an H100/H200.
#
#   bash bench/gpu_check.sh LOG_DIR [WHEEL_DIR]
#
# WHEEL_DIR (default .whl): wheels to install first, for a machine without a package index (the
# device machine has numpy, torch, tiktoken, jinja2, pyyaml, pytest but not gguf): prepare them with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
# Environment: SYNTH_LAYERS (default 24: the whole 20b shape), SKIP_BENCH=1 to stop after the tests,
# NCU=1 to add Nsight Compute counters of one decode layer. Expected: ~10 minutes without NCU
# (build ~1, tests and sanitizers ~4, synth ~2-3, bench and profile ~2).
set -uo pipefail
LOG=$(realpath -m "${1:?usage: bench/gpu_check.sh LOG_DIR [WHEEL_DIR]}")
WHEELS=${2:-.whl}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$LOG"
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG/steps.txt"; }

step "device"
{ nvidia-smi; nvcc --version; git -C "$REPO" rev-parse HEAD; } > "$LOG/device.txt" 2>&1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (PYENGINE_CUDA=ON, sm_90 only)"
cd "$REPO"
if ! PYENGINE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
     python3 -m pip install --no-build-isolation --no-deps -v . > "$LOG/build.txt" 2>&1; then
  tail -40 "$LOG/build.txt"; echo "BUILD FAILED"; exit 1
fi
cd /tmp  # import the installed package, not the source folder
python3 -c "import pyengine._cuda as c; print(c.BACKEND, c.device_count(), c.device_info(0), c.copy_bandwidth() / 1e9, 'GB/s')" \
  2>&1 | tee -a "$LOG/device.txt"

step "GPU tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -k "not emu" -x \
  "$REPO/tests/test_cuda_matmul.py" "$REPO/tests/test_cuda_ops.py" "$REPO/tests/test_cuda_engine.py" \
  2>&1 | tee "$LOG/tests.txt" | tail -5

step "compute-sanitizer memcheck of one engine test"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
  -k "cuda and q8_0-mxfp4" "$REPO/tests/test_cuda_engine.py::test_prefill_and_decode_match_cpu" \
  > "$LOG/memcheck.txt" 2>&1; echo "memcheck exit $?" | tee -a "$LOG/memcheck.txt"

step "compute-sanitizer racecheck of the attention and matvec kernels (shared-memory races the emulator cannot see)"
timeout 180 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
  -k "cuda and (attention or matvec)" "$REPO/tests/test_cuda_ops.py" "$REPO/tests/test_cuda_matmul.py" \
  > "$LOG/racecheck.txt" 2>&1; echo "racecheck exit $?" | tee -a "$LOG/racecheck.txt"

step "end to end with the real tokenizer: greedy replies on the CPU and the GPU must be the same text"
python3 -m pyengine.cli demo-model /tmp/demo.gguf --force > /dev/null 2>&1
for dev in cpu cuda; do
  python3 -m pyengine.cli run /tmp/demo.gguf "Why is the sky blue?" -n 32 --temperature 0 --device $dev \
    > "$LOG/demo-$dev.txt" 2> "$LOG/demo-$dev.err"
done
cmp -s "$LOG/demo-cpu.txt" "$LOG/demo-cuda.txt" && echo "same reply" || echo "REPLIES DIFFER (see demo-*.txt)"

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
step "synth gpt-oss-20b-shaped file"
MODEL=/tmp/synth20b.gguf
python3 -m pyengine.cli synth --shape gpt-oss-20b --layers "${SYNTH_LAYERS:-24}" --arch-name gpt-oss "$MODEL" \
  > "$LOG/synth.txt" 2>&1 || { tail -5 "$LOG/synth.txt"; exit 1; }

step "pyengine bench --device cuda (pp512, tg128)"
timeout 240 python3 -m pyengine.cli bench "$MODEL" -p 512 -n 128 -r 3 --device cuda 2>&1 | tee "$LOG/bench.txt"

step "per-operation profile of decode at depth 512"
timeout 180 python3 "$REPO/bench/bench_cuda.py" "$MODEL" --depth 512 --tokens 32 --json "$LOG/profile.json" \
  2>&1 | tee "$LOG/profile.txt"

step "per-kernel counters of one decode layer (ncu; NCU=1 only: it adds minutes)"
if [ "${NCU:-0}" = 1 ] && command -v ncu > /dev/null; then
  timeout 180 ncu --launch-skip 400 --launch-count 40 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    --csv python3 "$REPO/bench/bench_cuda.py" "$MODEL" --depth 64 --tokens 4 > "$LOG/ncu.csv" 2>&1
fi
step "done"
