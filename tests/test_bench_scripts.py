"""bench/compare_llamacpp.py (several files in one run, the ratio table against the best llama.cpp
configuration, decode as a share of each file's bandwidth limit) and bench/batch_decode.py (the
bytes a batched decode step really reads, pyengine.bench.step_bytes, and the bound they set), on
tiny synth files and mocked timings: the logic, not the speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyengine import Engine
from pyengine.bench import BenchResult, decode_bytes, prompt_macs, step_bytes
from pyengine.model_file import open_model
from pyengine.synth import write_synth_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import batch_decode  # noqa: E402
import compare_llamacpp  # noqa: E402

sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return [write_synth_model(d / f"{mix}.gguf", "tiny", fast=True, mix=mix, arch_name="gpt-oss")
            for mix in ("mxfp4", "q4_k_m")]


def test_step_bytes_counts_each_touched_expert_once(tiny):
    mf = open_model(tiny[1])
    hp, raw = mf.hparams, mf.raw_tensors
    assert step_bytes(mf, [hp.n_expert] * hp.n_layer, n_tokens=mf.metadata.count("tokenizer.ggml.tokens")) == sum(
        t.nbytes for t in raw.values())
    assert decode_bytes(mf) == step_bytes(mf, [hp.n_expert_used] * hp.n_layer)
    rng = np.random.default_rng(5)
    experts = rng.integers(1, hp.n_expert, hp.n_layer)
    for layer in range(hp.n_layer):
        more = experts.copy()
        more[layer] += 1
        one_expert = sum(raw[f"blk.{layer}.ffn_{k}_exps.weight"].nbytes for k in ("gate", "up", "down")) // hp.n_expert
        assert step_bytes(mf, more, 3) - step_bytes(mf, experts, 3) == one_expert
    row = raw["token_embd.weight"].nbytes // raw["token_embd.weight"].shape[-1]
    assert step_bytes(mf, experts, 4) - step_bytes(mf, experts, 1) == 3 * row


def test_prompt_macs_counts_the_products_a_prompt_token_makes(tiny):
    """A prompt token's weight multiply-adds, from the shapes alone: q|k|v and the attention output,
    the router, and n_expert_used experts' gate, up and down per layer; no embedding, no output head,
    no biases."""
    for path in tiny:
        hp = open_model(path).hparams
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        layer = hp.n_embd * (q + 2 * kv) + q * hp.n_embd + hp.n_embd * hp.n_expert
        layer += hp.n_expert_used * 3 * hp.n_embd * hp.n_ff_exp
        assert prompt_macs(open_model(path)) == hp.n_layer * layer


def test_batch_decode_touched_experts(tiny):
    eng = Engine(tiny[0], n_ctx=128, n_threads=1)
    hp = eng.model_file.hparams
    rate, step, experts = batch_decode.decode_rate(eng, 1, 3, 0)
    assert rate > 0 and experts == hp.n_expert_used and step == decode_bytes(eng.model_file)
    rate, step, experts = batch_decode.decode_rate(eng, 3, 3, 1)
    assert hp.n_expert_used < experts <= min(hp.n_expert, 3 * hp.n_expert_used)
    assert decode_bytes(eng.model_file) < step < 3 * decode_bytes(eng.model_file)

    r = subprocess.run([sys.executable, str(BENCH / "batch_decode.py"), str(tiny[0]), "-s", "3", "-n", "2", "-r", "1",
                        "-t", "1", "--profile"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sequences touched" in r.stdout and "bandwidth-bound ratio" in r.stdout
    # one profiled pass per 3-sequence step: 2 steps, the tiny model's layers once each
    prof = r.stdout.split("profile of the 3-sequence steps")[1]
    assert "| **forward pass** | 1 |" in prof and f"| expert_up | {hp.n_layer} |" in prof


def row(model: str, backend: str, n_prompt: int, n_gen: int, ts: float) -> BenchResult:
    n = n_prompt + n_gen
    return BenchResult(model_filename=model, model_type="m", model_size=1, model_n_params=1, n_batch=512,
                       n_threads=2, n_prompt=n_prompt, n_gen=n_gen, n_depth=0, backends=backend,
                       samples_ns=[int(n * 1e9 / ts)] * 2)


def test_comparison_table_takes_the_best_configuration_that_ran():
    rng = np.random.default_rng(7)
    runs, want = [], []
    for name, per_token in (("a.gguf", 2_598_000_000), ("b.gguf", 2_100_000_000)):
        ours, repacked, plain = rng.uniform(1, 30, (3, 2))
        run = compare_llamacpp.ModelRun(f"/x/{name}", per_token, {
            "pyengine": [row(name, "pyengine", 512, 0, ours[0]), row(name, "pyengine", 0, 64, ours[1])],
            "llama.cpp": [row(name, "repacked", 512, 0, repacked[0]), row(name, "repacked", 0, 64, repacked[1])],
            "llama.cpp-plain": [row(name, "plain", 512, 0, plain[0]), row(name, "plain", 0, 64, plain[1])]})
        runs.append(run)
        want.append((name, ours, np.maximum(repacked, plain), np.where(repacked >= plain, "repacked", "plain"),
                     per_token))
    runs.append(compare_llamacpp.ModelRun("/x/c.gguf", 10**9, {
        "pyengine": [row("c", "pyengine", 0, 64, 5.0)], "llama.cpp": "llama.cpp failed (signal 11): ",
        "llama.cpp-plain": [row("c", "plain", 0, 64, 4.0)]}))
    bw = 40.0
    lines = compare_llamacpp.comparison(runs, bw).splitlines()
    assert len(lines) == 2 + 5
    for i, (name, ours, best, config, per_token) in enumerate(want):
        for j, test in enumerate(("pp512", "tg64")):
            cells = [c.strip() for c in lines[2 + 2 * i + j].strip("|").split("|")]
            limit = bw * 1e9 / per_token
            assert cells[:6] == [name, test, f"{ours[j]:.2f}", f"{best[j]:.2f}", config[j], f"{ours[j] / best[j]:.2f}x"]
            assert cells[6:] == (["-", "-"] if j == 0 else [
                f"{limit:.2f}", f"{100 * ours[j] / limit:.0f} % / {100 * best[j] / limit:.0f} %"])
    assert [c.strip() for c in lines[-1].strip("|").split("|")] == ["c.gguf", "tg64", "5.00", "4.00", "plain", "1.25x",
                                                                    "40.00", "12 % / 10 %"]
    without_bw = compare_llamacpp.comparison(runs[:1], 0.0).splitlines()
    assert without_bw[3].rstrip("| ").endswith("| - | -")


def test_comparison_table_gives_prefill_its_int8_limit():
    """With an int8 peak, a pp row's limit is the peak over the file's multiply-adds per prompt token
    and both engines' speeds are shown as shares of it; tg rows keep the bandwidth's."""
    rng = np.random.default_rng(11)
    ours, peer = rng.uniform(5, 60, 2)
    run = compare_llamacpp.ModelRun("/x/a.gguf", 2_598_000_000, {
        "pyengine": [row("a", "pyengine", 512, 0, ours), row("a", "pyengine", 0, 64, 10.0)],
        "llama.cpp": [row("a", "repacked", 512, 0, peer), row("a", "repacked", 0, 64, 8.0)]}, macs=3_034_644_480)
    peak = float(rng.uniform(100, 500))
    lines = compare_llamacpp.comparison([run], 40.0, peak).splitlines()
    pp = [c.strip() for c in lines[2].strip("|").split("|")]
    limit = peak * 1e9 / 3_034_644_480
    assert pp[6:] == [f"{limit:.2f}", f"{100 * ours / limit:.0f} % / {100 * peer / limit:.0f} %"]
    tg = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tg[6:] == [f"{40e9 / 2_598_000_000:.2f}", f"{100 * 10 * 2.598 / 40:.0f} % / {100 * 8 * 2.598 / 40:.0f} %"]
    no_peak = [c.strip() for c in compare_llamacpp.comparison([run], 40.0).splitlines()[2].strip("|").split("|")]
    assert no_peak[6:] == ["-", "-"]


@pytest.mark.parametrize("system_info,crashed,hinted", [
    (b"AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |", True, True),
    (b"AVX512 = 1 | REPACK = 1 |", True, False),  # a build without AMX: the crash is something else
    (b"AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |", False, False)])
def test_amx_crash_hint_names_the_build_without_amx(monkeypatch, system_info, crashed, hinted):
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(llama_print_system_info=lambda: system_info))
    repacked = "llama.cpp failed (signal 11): " if crashed else [row("a", "repacked", 0, 64, 4.0)]
    runs = [compare_llamacpp.ModelRun("/x/a.gguf", 10**9, {"pyengine": [row("a", "pyengine", 0, 64, 5.0)]}),
            compare_llamacpp.ModelRun("/x/b.gguf", 10**9, {"llama.cpp": repacked})]
    hint = compare_llamacpp.amx_crash_hint(runs)
    assert bool(hint) == hinted
    assert not hint or "without AMX" in hint and "PYTHONPATH" in hint


def test_compare_script_runs_several_files(tiny):
    args = [sys.executable, str(BENCH / "compare_llamacpp.py"), *map(str, tiny), "-p", "8", "-n", "4", "-r", "1",
            "-t", "1", "--bandwidth", "10", "--int8-peak", "100"]
    r = subprocess.run([*args, "--only", "pyengine"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "memory read bandwidth: 10.0 GB/s (given, not probed)" in out
    assert "int8 multiply-add peak (1 threads, given): 100.0 G/s" in out
    for path in tiny:
        per_token = decode_bytes(open_model(path))
        macs = prompt_macs(open_model(path))
        assert f"- {path.name}: a decoded token reads {per_token / 1e9:.3f} GB of weights: " \
               f"limit {10e9 / per_token:.2f} tok/s; a prompt token takes {macs / 1e9:.3f} G weight " \
               f"multiply-adds: limit {100e9 / macs:.2f} tok/s" in out
        assert f"| {path.name} | pp8 |" in out and f"| {path.name} | tg4 |" in out
    assert "MXFP4 MoE" in out and "Q4_K - Medium" in out  # llama-bench's table tells the two files apart
    llama_cpp = pytest.importorskip("llama_cpp")
    r = subprocess.run([*args[:3], *args[4:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith(f"| {tiny[0].name} | tg4 |"))
    assert "llama.cpp" in line.split("|")[5] and line.split("|")[6].strip().endswith("x")
    # three configurations: repacked, repacked with flash attention, plain; --no-flash-attn drops one
    def backends(out: str) -> set[str]:
        cells = [c.split("|")[4].strip() for c in out.splitlines() if c.startswith("| ")]  # llama-bench's column
        return {c for c in cells if c.startswith("llama.cpp")}

    version = llama_cpp.__version__
    assert backends(r.stdout) == {f"llama.cpp {version} repacked", f"llama.cpp {version} (no extra bufts)",
                                  f"llama.cpp {version} repacked flash-attn"}
    r = subprocess.run([*args[:3], "-d", "8", "--no-flash-attn", *args[4:]], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert backends(r.stdout) == {f"llama.cpp {version} repacked", f"llama.cpp {version} (no extra bufts)"}
    assert f"| {tiny[0].name} | tg4 @ d8 |" in r.stdout


def test_compare_stops_at_once_on_a_file_llama_cpp_cannot_read(tmp_path):
    """llama.cpp knows gpt-oss only as 'gpt-oss': on a 'gptoss' file (synth's default) the script says
    how to write one it loads, before any engine runs; with --only pyengine it runs."""
    path = write_synth_model(tmp_path / "canonical.gguf", "tiny", fast=True)
    args = [sys.executable, str(BENCH / "compare_llamacpp.py"), str(path), "-p", "0", "-n", "2", "-r", "1", "-t", "1",
            "--bandwidth", "10"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "general.architecture is 'gptoss'" in r.stderr and "--arch-name gpt-oss" in r.stderr
    assert "| canonical.gguf |" not in r.stdout
    r = subprocess.run([*args, "--only", "pyengine"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "| canonical.gguf | tg2 |" in r.stdout, r.stderr


def test_compare_probes_the_pages_pyengine_streams(tiny):
    """Without --bandwidth, after each pyengine round the script probes the page cache of the file
    pyengine streamed (its repack cache beside the model) and shows decode as a share of that rate:
    the share printed is the round's tok/s times the file's bytes a token over the probed rate."""
    if not (Path(sys.executable).parent / "pyengine-bench-kernels").exists():
        pytest.skip("pyengine-bench-kernels is installed by `pip install .` next to the interpreter")
    r = subprocess.run([sys.executable, str(BENCH / "compare_llamacpp.py"), str(tiny[0]), "-p", "0", "-n", "4", "-r", "1",
                        "-t", "1", "--only", "pyengine"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cache = f"{tiny[0].name}.pyengine-r16"
    assert compare_llamacpp.streamed_file(str(tiny[0])) == str(tiny[0].with_name(cache))
    line = next(x for x in r.stdout.splitlines() if "its weights' pages" in x)
    assert line.startswith(f"  - pyengine tg4: its weights' pages ({cache}, ") and line.endswith(" % of that")
    gbs = float(line.split("read at ")[1].split(" GB/s")[0])
    share = float(line.split("decode at ")[1].split(" %")[0])
    ts = float(next(x for x in r.stdout.splitlines() if x.startswith("| ") and "tg4" in x and "±" in x)
               .split("|")[-2].split("±")[0])
    want = 100 * ts * decode_bytes(open_model(tiny[0])) / (gbs * 1e9)
    assert gbs > 0 and share > 0 and share == pytest.approx(want, rel=0.01, abs=0.06)
    # --no-mmap: pyengine's weights are in anonymous memory, so there are no pages to probe
    r = subprocess.run([sys.executable, str(BENCH / "compare_llamacpp.py"), str(tiny[0]), "-p", "0", "-n", "4", "-r", "1",
                        "-t", "1", "--only", "pyengine", "--no-mmap"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| pyengine (no-mmap) | 1 | tg4 |" in r.stdout and "its weights' pages" not in r.stdout


def test_streamed_file_is_the_model_without_a_cache(tmp_path):
    model = write_synth_model(tmp_path / "plain.gguf", "tiny", fast=True)
    assert compare_llamacpp.streamed_file(str(model)) == str(model)


@pytest.mark.parametrize("test,flags", [("tg", []), ("pp", ["--each"]), ("tg", ["--b-no-repack"]),
                                        ("tg", ["--b-without", "q8_0,q5_0"])])
def test_ab_builds_pairs_two_builds(tiny, test, flags):
    """bench/ab_builds.py: both workers start, take turns, and the paired ratio line comes out (the
    same build twice here, so the ratios are about 1; their values are timing, not checked);
    --b-no-repack: B on the file's layout, A on the repack cache; --b-without: B on the cache but
    for the named types; --each: a line per round before it."""
    r = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), str(tiny[0]), "", "", "--test", test,
                        "-n", "3", "-r", "2", "-t", "1", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    line = lines[-1]
    assert line.startswith(f"{test}3, 2 rounds, 1 threads: A median ") and "paired B/A median" in line
    each = [x for x in lines if x.startswith("round ")]
    assert [x.split(":")[0] for x in each] == (["round 1", "round 2"] if "--each" in flags else [])
    ratios = [float(x) for x in line.split("range [")[1].rstrip("]").split(", ")]
    assert 0 < ratios[0] <= ratios[1]


def test_ab_builds_reports_a_worker_that_cannot_start(tiny, tmp_path):
    bad = tmp_path / "site"
    (bad / "pyengine").mkdir(parents=True)
    (bad / "pyengine" / "__init__.py").write_text("raise ImportError('broken build')\n")
    r = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), str(tiny[0]), str(bad), "", "-n", "2", "-r", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "did not start" in r.stderr


def test_rounds_merge_samples_and_take_each_rounds_own_bandwidth():
    """Two rounds: the repetitions are merged, and each round's decode speed is a share of the
    bandwidth probed around it; the table shows the median of those shares, not speed / one probe."""
    run = compare_llamacpp.ModelRun("/x/a.gguf", 2_000_000_000)
    rng = np.random.default_rng(3)
    rates, bws = rng.uniform(5, 15, 2), rng.uniform(25, 50, 2)
    for rate, bw in zip(rates, bws):
        run.add("pyengine", [row("a", "pyengine", 512, 0, 20.0), row("a", "pyengine", 0, 64, rate)], bw)
        run.add("llama.cpp", [row("a", "repacked", 0, 64, rate / 2)], bw)
    tg = next(r for r in run.results["pyengine"] if r.test == "tg64")
    assert len(tg.samples_ns) == 2 * len(row("a", "x", 0, 64, 1.0).samples_ns)
    want = [rate * 2e9 / (bw * 1e9) for rate, bw in zip(rates, bws)]
    assert run.shares[("pyengine", "tg64")] == pytest.approx(want)
    line = compare_llamacpp.comparison([run], max(bws)).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "tg64" and cells[-1] == f"{100 * np.median(want):.0f} % / {50 * np.median(want):.0f} %"
    run.add("llama.cpp", "llama.cpp failed (signal 11): ", bws[0])  # a later failure is reported
    assert run.results["llama.cpp"] == "llama.cpp failed (signal 11): "
