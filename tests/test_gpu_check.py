"""bench/gpu_check.sh, the prepared device check, run here in its dry mode (every step against the
CUDA emulator, small shapes, the device image's missing packages made unimportable): every step
runs and reports, the summary and the one archive are written, the deadline skips what it cannot
fit, a failed step's dependants are skipped, two failed reply runs never count as the same reply.
Also bench/ncu_decode.py's summary of an ncu CSV."""

import csv
import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["probe", "build", "synth", "logits", "bench", "ncu", "profile", "reply", "tests", "memcheck", "racecheck"]


def run_check(out: Path, python=sys.executable, **env):
    e = {**os.environ, "PYENGINE_GPU_CHECK_DRY": "1", "PYTHON": str(python), **env}
    e.pop("PYENGINE_CUDA_EMULATOR", None)
    r = subprocess.run(["bash", str(SCRIPT), str(out), str(out / "no-wheels")], capture_output=True, text=True,
                       env=e, cwd=REPO, timeout=900)
    lines = (out / "summary.txt").read_text().splitlines()
    status = {}
    for line in lines[1:-1]:
        name, st, *_ = line.split()
        assert name not in status, f"step {name} reported twice"
        status[name] = st
    return r, lines, status


def archive(out: Path) -> dict:
    with tarfile.open(out / "gpu-check.tar.gz") as t:
        return {m.name: t.extractfile(m).read().decode() for m in t.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return out, *run_check(out)


def test_dry_run_every_step_ok(full):
    out, r, lines, status = full
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(status) == STEPS and set(status.values()) == {"ok"}, "\n".join(lines)
    assert lines[0].startswith("gpu-check DRY") and lines[-1].startswith("RESULT: 11 ok, 0 FAIL, 0 SKIP")
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]  # what the tool returns
    logs = archive(out)
    for name in STEPS:
        assert f"logs/{name}.txt" in logs
    assert logs["logs/summary.txt"] == (out / "summary.txt").read_text()
    detail = {line.split()[0]: line for line in lines[1:-1]}
    assert "RESULT ok" in detail["logits"] and "argmax agrees" in detail["logits"]
    assert detail["bench"].count("BENCH") == 3 and "tg2 @ d4" in detail["bench"]
    assert "same reply" in detail["reply"]
    assert logs["logs/reply-cpu.txt"] == logs["logs/reply-cuda.txt"] != ""
    assert '"ok": true' in logs["logs/logits.json"]
    # the synth step used --fast and the device image's absent packages were absent
    assert "absent from the device image" not in "".join(logs.values())


def test_deadline_skips_what_does_not_fit(tmp_path):
    r, lines, status = run_check(tmp_path, GPU_CHECK_BUDGET="25")
    assert list(status) == STEPS
    assert status["probe"] == "ok"
    skipped = [line for line in lines[1:-1] if " SKIP " in line]
    assert len(skipped) == len(STEPS) - 1
    assert "deadline" in skipped[0] and all("needs " in line or "deadline" in line for line in skipped)
    assert lines[-1].startswith("RESULT: 1 ok, 0 FAIL, 10 SKIP")
    assert set(archive(tmp_path)) >= {"logs/probe.txt", "logs/summary.txt", "logs/steps.txt"}


def test_failed_replies_never_compare_equal(tmp_path):
    """A python whose `pyengine run` fails silently (no output on either device) must fail the
    reply step, not report 'same reply'."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"pyengine.cli run"*) exit 3;; esac\nexec "{sys.executable}" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    r, lines, status = run_check(out, python=fake, GPU_CHECK_STEPS="probe build synth reply")
    assert status["reply"] == "FAIL" and r.returncode != 0
    assert "same reply" not in "\n".join(lines)
    assert status["logits"] == status["tests"] == "SKIP"


def test_ncu_summary_sums_each_kernel(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ncu_decode
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    kernels = ["gemv_kernel(int, const float *)", "attention_pass", "rmsnorm"]
    want = {k: {"launches": 0, "values": {m: [] for m in ncu_decode.METRICS}} for k in kernels}
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Process ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"])
    for launch in range(int(rng.integers(5, 12))):
        k = kernels[int(rng.integers(0, 3))]
        want[k]["launches"] += 1
        for m in ncu_decode.METRICS:
            v = float(rng.integers(1, 2_000_000))
            want[k]["values"][m].append(v)
            w.writerow([launch, 1, k, "Command line profiler metrics", m, "", f"{v:,.0f}"])
    path = tmp_path / "ncu.csv"
    path.write_text("==PROF== Connected to process 1\n" + buf.getvalue())
    got = {k["kernel"]: k for k in ncu_decode.summarize(str(path))}
    assert set(got) == {k for k in kernels if want[k]["launches"]}
    for k, g in got.items():
        assert g["launches"] == want[k]["launches"]
        for m, col in ncu_decode.METRICS.items():
            vals = want[k]["values"][m]
            assert g[col] == pytest.approx(np.mean(vals) if col == "issue_active_pct" else sum(vals))
    assert [k["ns"] for k in ncu_decode.summarize(str(path))] == sorted((g["ns"] for g in got.values()), reverse=True)
    assert "kernel launches" in ncu_decode.table(list(got.values()))


def test_cli_needs_no_web_stack(tmp_path):
    """The device image has no fastapi/uvicorn: every command but serve works without them (the dry
    run above shows it), and serve says what is missing in one [ERROR] line."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _A:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('uvicorn', 'fastapi'):\n"
        "            raise ModuleNotFoundError(name)\nsys.meta_path.insert(0, _A())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pyengine.cli", "serve", "-m", "x.gguf", "--port", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stderr.count("[ERROR]") == 1 and "web packages" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pyengine.cli", "synth", "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "--fast" in r.stdout
