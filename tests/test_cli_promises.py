"""What the README promises a new user of the command line, checked as that user would see it
(subprocesses on the demo model): the first two commands run twice in a row, a reply streams as it
is generated, Ctrl-C or SIGTERM keep what was printed, Ctrl-C at any moment exits 130 without a
traceback (also when started with SIGINT ignored, as a background job is), every bad argument
value is one `[ERROR]` line with exit code 2, and a path that exists is used as given."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyengine._model import r16_available
from pyengine.demo_model import write_demo_model

PROMPT = "Why is the sky blue?"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo.gguf")


def cli(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def start(*args, cwd, sigint=signal.SIG_DFL) -> subprocess.Popen:
    """The CLI as a terminal would start it (SIGINT default), or with SIGINT as given."""
    return subprocess.Popen([sys.executable, "-m", "pyengine.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


class Reader(threading.Thread):
    """Collects a pipe's bytes as they arrive."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.fd, self.data = pipe.fileno(), bytearray()
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 4096):
            self.data += chunk

    def wait_for(self, n: int, proc: subprocess.Popen, timeout: float = 180) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.data) < n:
            assert proc.poll() is None, f"exited {proc.returncode} after {bytes(self.data)!r}"
            assert time.monotonic() < deadline, f"only {bytes(self.data)!r} after {timeout} s"
            time.sleep(0.02)
        return bytes(self.data)


def test_the_first_two_readme_commands_run_twice_in_a_row(tmp_path):
    for _ in range(2):
        made = cli("demo-model", "demo.gguf", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        reply = cli("run", "demo.gguf", PROMPT, "-n", 16, cwd=tmp_path)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
    # Where the CPU runs the R16 kernel, `run` leaves the repack cache beside the model (README,
    # "The repack cache"); nothing else is left behind.
    cache = ["demo.gguf.pyengine-r16"] if r16_available() else []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.gguf", *cache]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_reply_streams_and_an_interrupted_one_keeps_what_was_printed(demo, tmp_path, sig, code):
    seed = random.randrange(10**6)
    proc = start("run", demo, PROMPT, "-n", 3000, "--seed", seed, "-t", 1, cwd=tmp_path)
    out = Reader(proc.stdout)
    try:
        # Generating 3000 tokens takes minutes: text that arrives now was streamed, not held.
        seen = out.wait_for(40, proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, f"seed {seed}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.join(10)
    err = proc.stderr.read().decode()
    assert bytes(out.data).startswith(seen) and bytes(out.data).endswith(b"\n"), f"seed {seed}"
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_ctrl_c_works_when_started_with_sigint_ignored(demo, tmp_path):
    """A background job (`cmd &` in a script) inherits SIGINT ignored; Ctrl-C still stops a reply."""
    proc = start("run", demo, PROMPT, "-n", 3000, "-t", 1, cwd=tmp_path, sigint=signal.SIG_IGN)
    out = Reader(proc.stdout)
    try:
        out.wait_for(1, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def catches_sigint(pid: int) -> bool:
    """Whether the process has a SIGINT handler installed (Linux: SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def interrupt_after_handler(proc: subprocess.Popen, delay: float) -> bytes:
    """Send SIGINT `delay` seconds after the process installed its SIGINT handler; its stderr."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and not catches_sigint(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)[1]


def test_ctrl_c_at_a_random_moment_exits_130_quietly(demo, tmp_path):
    """Started with SIGINT ignored, the command line installs its handler as its first step, so
    the moment it does is where its own code begins; the signal comes at random after that, in
    imports, model loading, tokenizer building, prefill, generation or writing a file."""
    rng = random.Random()
    commands = [("run", demo, PROMPT, "-n", 40, "-t", 1), ("bench", demo, "-p", 32, "-n", 8, "-r", 2, "-t", 1),
                ("demo-model", tmp_path / "new.gguf", "--force"), ("info", demo)]
    for _ in range(2):
        for args in commands:
            delay = rng.uniform(0, 2.5)
            proc = start(*args, cwd=tmp_path, sigint=signal.SIG_IGN)
            stderr = interrupt_after_handler(proc, delay)
            err = stderr.decode()
            what = f"{args[0]} interrupted after {delay:.2f} s: exit {proc.returncode}\n{err}"
            assert proc.returncode in (0, 130), what  # 0: it had finished before the signal
            assert "Traceback" not in err and "Exception ignored" not in err, what
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # demo-model left no partial file


def bad_values(rng: random.Random) -> list[tuple[str, ...]]:
    """(command and flag, bad value) pairs, the values drawn at random."""
    neg = str(-rng.randrange(1, 10**6))
    return [
        ("run", "--top-p", f"{rng.uniform(1.001, 50):.3f}"), ("run", "--min-p", f"-{rng.uniform(0.01, 5):.2f}"),
        ("run", "--temperature", rng.choice(["-0.5", "nan", "inf", "hot"])), ("run", "-t", rng.choice(["0", neg])),
        ("run", "-c", neg), ("run", "-n", rng.choice(["0", neg])), ("run", "--seed", neg),
        ("run", "--top-k", rng.choice([neg, "1.5"])),
        ("run", "--device", rng.choice(["tpu", "cuda:x", "gpu", "cpu:1"])), ("chat", "-n", "0"),
        ("bench", "-r", "0"), ("bench", "-b", rng.choice(["0", neg])), ("bench", "-p", neg),
        ("serve", "--port", str(rng.randrange(65536, 10**6))), ("serve", "-np", rng.choice(["0", neg])),
        ("serve", "-c", str(rng.randrange(-100, 16))), ("serve", "-t", "0"),
        ("demo-model", "--layers", "0"), ("synth", "--seed", neg), ("synth", "--mix", rng.choice(["q2_k", "Q4_K_M"])),
    ]


def test_every_bad_value_is_one_error_line_and_exit_2(demo, tmp_path):
    rng = random.Random()
    for command, flag, value in rng.sample(bad_values(rng), 8):
        model = [] if command in ("demo-model", "synth") else (["-m", demo] if command == "serve" else [demo])
        target = [tmp_path / "out.gguf"] if command in ("demo-model", "synth") else []
        r = cli(command, *model, *target, f"{flag}={value}", cwd=tmp_path)
        lines = r.stderr.splitlines()
        what = f"{command} {flag}={value}: exit {r.returncode}\n{r.stderr}"
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("[ERROR] "), what
        assert flag in lines[0] and "Loading model" not in r.stderr, what
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_exists_is_used_whatever_its_name(demo, tmp_path):
    blob = tmp_path / f"sha256-{random.getrandbits(64):016x}"  # an Ollama blob's name
    blob.symlink_to(demo)
    r = cli("info", blob.name, "--models-dir", tmp_path / "no-models-here", cwd=tmp_path)
    assert r.returncode == 0 and "general.name: gpt-oss-demo" in r.stdout, r.stderr
    folder = tmp_path / "gpt-oss-20b"
    folder.mkdir()
    for arg in (folder.name, f"./{folder.name}", str(folder)):
        r = cli("info", arg, "--models-dir", tmp_path / "no-models-here", cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.startswith(f"[ERROR] {arg} is a folder, not a GGUF file"), r.stderr
    (folder / "config.json").write_text("{}")
    r = cli("run", f"./{folder.name}", "hi", cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if not line.startswith("[INFO] ")]
    assert r.returncode == 1 and len(errors) == 1 and "pyengine convert" in errors[0], r.stderr


def test_a_ctrl_c_while_the_handlers_are_put_back_is_exit_130(monkeypatch):
    """A Ctrl-C that lands while the CLI puts the caller's signal handlers back raises inside
    signal.signal: it is counted as Ctrl-C (exit 130) and the handlers still end up restored."""
    from pyengine import cli as cli_module

    real, calls = signal.signal, []

    def interrupted_once(sig, handler):
        calls.append(sig)
        previous = real(sig, handler)
        if len(calls) == 2:  # the first restore (call 1 installs the start-up Ctrl-C guard)
            raise KeyboardInterrupt
        return previous

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli_module.signal, "signal", interrupted_once)
    assert cli_module._guarded(lambda argv, in_main_thread: 0, []) == 130
    monkeypatch.undo()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


NODE_ENTRY = "import sys; from pyengine.cli import node_main; sys.exit(node_main())"


def test_the_node_entry_point_is_guarded_against_ctrl_c_during_its_imports(demo, tmp_path):
    """`llm-router-node` (pyproject's script, pyengine.cli:node_main) imports the web stack before it
    can parse a flag; a Ctrl-C at a random moment of that, or of loading, still exits 130 quietly."""
    rng = random.Random()
    for _ in range(3):
        delay = rng.uniform(0, 1.5)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", NODE_ENTRY, "-m", str(demo), "--port", str(port), "-t", "1"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        stderr = interrupt_after_handler(proc, delay)
        err = stderr.decode()
        assert proc.returncode == 130, f"exit {proc.returncode} after {delay:.2f} s\n{err}"
        assert "Traceback" not in err, err


def test_the_kernel_harness_explains_its_flags():
    """`pyengine-bench-kernels --help` describes every flag (exit 0); an unknown flag is exit 2."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and all(f in r.stdout for f in ("-t THREADS", "-r REPS", "-m MIB", "--bandwidth",
                                                             "--int8-peak"))
    assert len(r.stdout.splitlines()) > 5, r.stdout
    bad = subprocess.run([exe, "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_the_kernel_harness_probes_a_files_pages(tmp_path):
    """`pyengine-bench-kernels --bandwidth-file PATH` reads a file's pages (as the engine maps its
    weights) and prints GB/s; a file it cannot map is exit 1 with the reason."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(8 << 20))
    r = subprocess.run([exe, "-t", "2", "--bandwidth-file", f], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) > 0.1
    for bad in (tmp_path / "missing.bin", tmp_path):
        r = subprocess.run([exe, "--bandwidth-file", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and str(bad) in r.stderr and not r.stdout


def test_the_kernel_harness_probes_the_int8_peak():
    """`pyengine-bench-kernels --int8-peak` prints the G int8 multiply-adds/s the threads reach
    together with vpdpbusd (prefill's ceiling) where the AVX-512 level runs, else exit 1 saying why;
    capped to AVX2 by PYENGINE_SIMD it says so too."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    r = subprocess.run([exe, "-t", "1", "--int8-peak"], capture_output=True, text=True, timeout=60)
    if r.returncode == 1:
        assert "no AVX-512 VNNI" in r.stderr and not r.stdout
    else:
        assert r.returncode == 0 and float(r.stdout) > 10, r.stdout + r.stderr  # >= 64 products a ns at 0.16 GHz
    capped = subprocess.run([exe, "--int8-peak"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYENGINE_SIMD": "avx2"})
    assert capped.returncode == 1 and "no AVX-512 VNNI here (SIMD avx2)" in capped.stderr


def test_the_kernel_harness_times_attention_at_depth():
    """`pyengine-bench-kernels -T attention` times one decoded token's attention in a full gpt-oss
    layer at depths 4096 and 32768: a row each with microseconds per layer, the cache's megabytes
    (K and V, 2 KiB a position) and the rate they stream at."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    r = subprocess.run([exe, "-t", "2", "-r", "1", "-T", "attention"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Attention, one decoded token"))
    rows = [line.split() for line in lines[at + 2:at + 4]]
    assert [row[0] for row in rows] == ["4096", "32768"], r.stdout
    for row in rows:
        depth, us, mb, gbs = int(row[0]), float(row[1]), float(row[2]), float(row[3])
        assert mb == pytest.approx(2 * 8 * (depth + 1) * 128 / 1e6, abs=0.06), r.stdout
        assert us > 0 and gbs == pytest.approx(mb * 1e6 / (us * 1e-6) / 1e9, rel=0.02), r.stdout
    assert "MoE layer" not in r.stdout and "Q8_0" not in r.stdout


def test_the_kernel_harness_maps_a_files_read_rate_by_window(tmp_path):
    """`pyengine-bench-kernels --bandwidth-map PATH -m MIB` reads a file's pages window by window:
    one line per window (offsets in GiB, GB/s), the last window what is left, then the slowest and
    fastest; a file it cannot map is exit 1 with the reason."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(10 << 20))
    r = subprocess.run([exe, "-t", "2", "-m", "4", "--bandwidth-map", f], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    *windows, summary = r.stdout.splitlines()
    bounds = [(float(w.split()[0]), float(w.split()[2])) for w in windows]
    assert bounds == [(0.0, 0.004), (0.004, 0.008), (0.008, 0.01)], r.stdout
    rates = [float(w.split()[4]) for w in windows]
    assert all(g > 0.1 for g in rates), r.stdout
    assert summary == f"slowest {min(rates):.2f} GB/s, fastest {max(rates):.2f} GB/s", r.stdout
    r = subprocess.run([exe, "--bandwidth-map", tmp_path / "missing.bin"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "missing.bin" in r.stderr and not r.stdout


def test_the_kernel_harness_samples_where_its_two_threads_sit():
    """`pyengine-bench-kernels --placement N` prints N samples of "latency_ns GB/s" (a cache line
    handed between two threads, then their read rate), then how many fell under and over twice the
    lowest latency with each bin's median rate; N < 1 is exit 2, and a team held to one thread
    (OMP_THREAD_LIMIT=1) exit 1 saying it needs two."""
    exe = Path(sys.executable).parent / "pyengine-bench-kernels"
    if not exe.exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    r = subprocess.run([exe, "--placement", "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *samples, summary = r.stdout.splitlines()
    pairs = [tuple(map(float, s.split())) for s in samples]
    assert len(pairs) == 5 and all(lat > 0 and gbs > 0.1 for lat, gbs in pairs), r.stdout
    m = re.fullmatch(r"under (\d+) ns: (\d+) samples, median ([\d.]+) GB/s; over: (\d+) samples, median ([\d.]+) GB/s",
                     summary)
    assert m, summary
    cut, n_near, near, n_far, far = int(m[1]), int(m[2]), float(m[3]), int(m[4]), float(m[5])
    assert n_near >= 1 and n_near + n_far == 5, summary
    assert cut == pytest.approx(2 * min(lat for lat, _ in pairs), abs=0.6), summary
    rates = [gbs for _, gbs in pairs]
    assert min(rates) - 0.05 <= near <= max(rates) + 0.05 and (n_far == 0) == (far == 0), summary
    assert subprocess.run([exe, "--placement", "0"], capture_output=True, timeout=30).returncode == 2
    one = subprocess.run([exe, "--placement", "2"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    assert one.returncode == 1 and "needs two threads" in one.stderr and not one.stdout
