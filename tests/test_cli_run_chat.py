"""`pyengine run` and `pyengine chat` end to end (subprocesses) on a random-weight gpt-oss with the
real o200k vocabulary: what they print is what Engine's greedy generation gives, parsed into
reasoning and answer, with no control tokens; chat reuses the cached conversation."""

import subprocess
import sys

import pytest

import gguf_factory
import vocab
from pyengine import Engine

CONTROL = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>", "<|call|>")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "gpt-oss-tiny.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gptoss", wtype="f16", expert_type="mxfp4", tie_output=True,
                                   extra_keys=vocab.gguf_keys("gptoss"), n_vocab=vocab.N_VOCAB, seed=5)
    return path


def pyengine(*args, stdin="", cwd=None):
    return subprocess.run([sys.executable, "-m", "pyengine.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def greedy_reply(path, messages, n):
    eng = Engine(path, n_ctx=4096, n_threads=1)
    msg = eng.create_chat_completion(messages, reasoning_effort="low", max_tokens=n, temperature=0)["choices"][0]["message"]
    return {"reasoning_content": msg["reasoning_content"] or "", "content": msg["content"] or ""}


def test_run_streams_the_greedy_reply(model, tmp_path):
    r = pyengine("run", model, "Why is the sky blue?", "--temperature", "0", "-n", "12",
                 "--reasoning-effort", "low", "--stats", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = greedy_reply(model, [{"role": "user", "content": "Why is the sky blue?"}], 12)
    assert ref["content"] or ref["reasoning_content"]
    assert ref["content"] in r.stdout and ref["reasoning_content"] in r.stdout
    assert not any(c in r.stdout for c in CONTROL)
    assert "[reasoning] " in r.stdout or not ref["reasoning_content"]  # not a terminal: marked, not dimmed
    assert "\x1b[" not in r.stdout
    assert "prompt tokens in" in r.stderr and "generated" in r.stderr


def test_run_raw_is_a_plain_completion(model, tmp_path):
    r = pyengine("run", model, "--raw", "--temperature", "0", "-n", "6", stdin="Once upon a time", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    eng = Engine(model, n_ctx=4096, n_threads=1)
    expected = eng.create_completion("Once upon a time", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert r.stdout == "Once upon a time" + expected + "\n"


def test_run_rejects_an_empty_or_too_long_prompt_a_missing_model_and_a_huge_context(model, tmp_path):
    r = pyengine("run", model, "   ", cwd=tmp_path)
    assert r.returncode == 2 and "the prompt is empty" in r.stderr
    r = pyengine("run", model, "word " * 300, "--n-ctx", "128", cwd=tmp_path)
    assert r.returncode == 1 and "[ERROR] the prompt has" in r.stderr and "Traceback" not in r.stderr
    r = pyengine("run", model, "word " * 300, "--raw", "--n-ctx", "128", cwd=tmp_path)
    assert r.returncode == 1 and "does not fit" in r.stderr and "Traceback" not in r.stderr
    r = pyengine("run", tmp_path / "nope.gguf", "hi", cwd=tmp_path)
    assert r.returncode == 1 and "[ERROR] Model file not found" in r.stderr and "Traceback" not in r.stderr
    r = pyengine("run", model, "hi", "--n-ctx", 10 ** 12, cwd=tmp_path)  # a context no memory holds
    assert r.returncode == 1 and "[ERROR] n_ctx=1000000000000 needs" in r.stderr and "Traceback" not in r.stderr


def test_chat_regen_answers_the_last_message_again_from_the_cache(model, tmp_path):
    """/regen drops the last answer and asks the same conversation again: greedy, the same answer,
    and the whole prompt but its last token comes from the KV cache."""
    r = pyengine("chat", model, "--temperature", "0", "-n", "8", "--reasoning-effort", "low", "--stats",
                 stdin="/regen\nHello there\n/regen\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[ERROR] /regen: no answer to replace yet" in r.stderr
    stats = [line for line in r.stderr.splitlines() if "prompt tokens in" in line]
    prompts = [int(line.split("[INFO] ")[1].split()[0]) for line in stats]
    reused = [int(line.split("reused ")[1].split()[0]) for line in stats]
    assert len(stats) == 2 and prompts[0] == prompts[1] and reused == [0, prompts[1] - 1]
    first = greedy_reply(model, [{"role": "user", "content": "Hello there"}], 8)
    if first["content"]:
        assert r.stdout.count(first["content"]) == 2


def test_chat_keeps_the_conversation_and_reuses_its_cache(model, tmp_path):
    r = pyengine("chat", model, "--temperature", "0", "-n", "8", "--reasoning-effort", "low", "--stats",
                 stdin="Hello there\n\nTell me more\n/reset\nHello there\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if "prompt tokens in" in line]
    assert len(stats) == 3
    reused = [int(line.split("reused ")[1].split()[0]) for line in stats]
    assert reused[1] > 20  # the second turn evaluates only what the first did not cache
    first = greedy_reply(model, [{"role": "user", "content": "Hello there"}], 8)
    replies = r.stdout.split("\n\n")
    assert r.stdout.count(first["content"]) >= 2 if first["content"] else True
    assert not any(c in r.stdout for c in CONTROL) and replies
