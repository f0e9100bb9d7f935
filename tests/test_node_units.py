"""Node pieces without a server: stop strings, settings precedence, model names, metrics text."""

from __future__ import annotations

import argparse

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyengine.node.backend import ModelInfo
from pyengine.node.config import NodeConfig
from pyengine.node.metrics import Histogram, Metrics
from pyengine.node.pull import target_path
from pyengine.stops import StopMatcher


def cut_at_stop(text: str, stops: list[str], ends: list[int]) -> tuple[str, bool]:
    """Reference: generation stops after the first piece (ending at one of `ends`) that completes a
    stop string; the text is cut where the earliest stop string found by then begins."""
    for end in ends:
        hits = [text[:end].find(s) for s in stops if s in text[:end]]
        if hits:
            return text[:min(hits)], True
    return text, False


@given(st.text(alphabet="ab cü", max_size=40), st.lists(st.text(alphabet="ab cü", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(1, 5), max_size=40))
def test_streamed_stop_matching_equals_cutting_the_text(text, stops, sizes):
    m = StopMatcher(stops)
    out, stopped, pos, ends = "", False, 0, []
    for size in sizes + [len(text)]:
        piece, pos = text[pos:pos + size], min(pos + size, len(text))
        ends.append(pos)
        emitted, stopped = m.feed(piece)
        out += emitted
        if stopped or pos >= len(text):
            break
    if not stopped:
        out += m.flush()
    assert (out, stopped) == cut_at_stop(text, stops, ends)
    assert not any(s in out for s in stops)


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["</end>"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("ndless") == ("</endless", False)
    assert m.feed(" x </end> y") == (" x ", True)


def test_config_flags_beat_environment(tmp_path):
    env = {"LLM_NODE_PORT": "9000", "LLM_NODE_MODELS_DIR": str(tmp_path), "LLM_ROUTER_URL": "http://r:8080",
           "LLM_NODE_HEARTBEAT_SECS": "3", "LLM_NODE_IP": "10.0.0.5", "LLM_NODE_BIND_ADDRESS": "0.0.0.0"}
    cfg = NodeConfig.from_env(env)
    assert (cfg.port, cfg.models_dir, cfg.router_url, cfg.heartbeat_secs, cfg.advertise_ip, cfg.host) == (
        9000, tmp_path, "http://r:8080", 3.0, "10.0.0.5", "0.0.0.0")
    cfg = NodeConfig.from_env(env, port=8123, host="127.0.0.1", models_dir="~/m", parallel=None)
    assert (cfg.port, cfg.host, cfg.models_dir, cfg.parallel) == (8123, "127.0.0.1", Path("~/m").expanduser(), 1)
    default = NodeConfig.from_env({})
    assert (default.port, default.host, default.router_url) == (8081, "127.0.0.1", None)
    assert default.models_dir == Path("~/.llm-router/models").expanduser()


def test_prompt_cache_limit_flag_and_default():
    from pyengine.node import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for argv, mib in ((["-m", "x"], None), (["-m", "x", "--cache-ram", "512"], 512), (["-m", "x", "-cram", "0"], 0)):
        args = parser.parse_args(argv)
        assert args.cache_ram == mib
        assert NodeConfig.from_env({}, cache_ram_mib=args.cache_ram).cache_ram_mib == mib
    with pytest.raises(SystemExit):
        parser.parse_args(["-m", "x", "--cache-ram", "-1"])
    gib = 1 << 30
    assert NodeConfig(cache_ram_mib=512).prompt_cache_bytes(64 * gib, 12 * gib) == 512 << 20
    assert NodeConfig(cache_ram_mib=0).prompt_cache_bytes(64 * gib, 12 * gib) == 0
    default = NodeConfig()
    assert default.prompt_cache_bytes(64 * gib, 12 * gib) == 8 * gib  # llama-server's default
    assert default.prompt_cache_bytes(20 * gib, 12 * gib) == 2 * gib  # a quarter of what the model leaves
    assert default.prompt_cache_bytes(10 * gib, 12 * gib) == 0
    assert default.prompt_cache_bytes(None, 12 * gib) == 8 * gib


def test_slot_save_path_flag_creates_the_folder_or_fails_clearly(tmp_path, monkeypatch):
    from pyengine.errors import ModelLoadError
    from pyengine.node import cli

    served = []

    def serve(config, load):
        served.append(config)
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args(["-m", "x"]).slot_save_path is None
    assert parser.parse_args(["-m", "x"]).batch_size is None and parser.parse_args(["-m", "x", "-b", "64"]).batch_size == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["-m", "x", "--batch-size", "0"])
    assert [parser.parse_args(["-m", "x", *a]).ctx_checkpoints for a in ([], ["--ctx-checkpoints", "0"],
                                                                        ["--swa-checkpoints", "3"])] == [None, 0, 3]
    with pytest.raises(SystemExit):
        parser.parse_args(["-m", "x", "--ctx-checkpoints", "-1"])
    assert cli.run(parser.parse_args(["-m", "x", "--ctx-checkpoints", "0"])) == 0 and served[-1].ctx_checkpoints == 0
    assert cli.run(parser.parse_args(["-m", "x"])) == 0 and served[-1].ctx_checkpoints == 8
    from pyengine.commands import _terminal  # run and chat take the same flag into Engine(ctx_checkpoints=)
    from pyengine.commands._device import cache_options

    terminal = argparse.ArgumentParser()
    _terminal.add_arguments(terminal)
    assert [cache_options(terminal.parse_args(["m", *a]))["ctx_checkpoints"] for a in ([], ["--ctx-checkpoints", "2"])] == [8, 2]
    # --checkpoint-min-step and llama-server's other spellings; -1 (llama.cpp's "off") is taken, -2 is not
    assert [cache_options(terminal.parse_args(["m", *a]))["checkpoint_min_step"] for a in (
        [], ["--checkpoint-min-step", "1024"], ["-cms", "0"], ["--checkpoint-every-n-tokens", "-1"], ["-cpent", "64"])
    ] == [4096, 1024, 0, -1, 64]
    with pytest.raises(SystemExit):
        parser.parse_args(["-m", "x", "--checkpoint-min-step", "-2"])
    assert cli.run(parser.parse_args(["-m", "x", "-cms", "2048"])) == 0 and served[-1].checkpoint_min_step == 2048
    assert NodeConfig.from_env({}, slot_save_path=None).slot_save_path is None  # off by default
    folder = tmp_path / "a" / "slots"
    assert cli.run(parser.parse_args(["-m", "x", "--slot-save-path", str(folder)])) == 0
    assert served[-1].slot_save_path == folder and folder.is_dir()  # created, parents too
    monkeypatch.setenv("HOME", str(tmp_path))
    assert NodeConfig.from_env({}, slot_save_path="~/s").slot_save_path == tmp_path / "s"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ModelLoadError, match="--slot-save-path"):
        cli.run(parser.parse_args(["-m", "x", "--slot-save-path", str(tmp_path / "file")]))
    assert len(served) == 4  # nothing served after the refusal


def test_model_names_the_node_answers_to():
    info = ModelInfo("gpt-oss-20b", 4096, 131072, 201088, 1, 1, aliases=("gpt-oss_20b",))
    assert all(info.answers_to(n) for n in (None, "", "gpt-oss-20b", "GPT-OSS-20B", "gpt-oss:20b"))
    assert not info.answers_to("gpt-oss-120b")
    assert target_path(Path("/m"), "gpt-oss:20b") == Path("/m/gpt-oss_20b/model.gguf")
    assert target_path(Path("/m"), "gpt-oss") == Path("/m/gpt-oss_latest/model.gguf")
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            target_path(Path("/m"), bad)


def test_histogram_is_cumulative_and_metrics_render():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 3.650000", "x_count 4"]
    m = Metrics()
    m.count_request("chat", "ok")
    m.count_tokens(prompt=7, cached=3, generated=5)
    m.gauge("queue_depth", "Waiting.", lambda: 2)
    m.expert_counts = lambda: [[1, 0], [0, 4]]
    text = m.render()
    assert 'pyengine_requests_total{endpoint="chat",outcome="ok"} 1' in text
    assert "pyengine_prompt_tokens_cached_total 3" in text and "pyengine_queue_depth 2" in text
    assert 'pyengine_expert_selections_total{layer="1",expert="1"} 4' in text


def test_unknown_request_fields_are_accepted_but_named_in_a_warning(caplog):
    import json
    import logging

    from pyengine.node.schemas import ChatCompletionRequest, parse_body

    body = {"messages": [{"role": "user", "content": "x"}], "cache_prompt": True, "user": "u",
            "x\n[ERROR] forged": 1}
    with caplog.at_level(logging.WARNING, logger="pyengine"):
        req = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert req.messages[0].content == "x"
    (record,) = [r for r in caplog.records if "ignoring request field" in r.getMessage()]
    assert "'cache_prompt'" in record.getMessage() and "'user'" in record.getMessage()
    assert "\n" not in record.getMessage()  # a client's key cannot forge a log line
    with caplog.at_level(logging.WARNING, logger="pyengine"):
        caplog.clear()
        parse_body(json.dumps({"messages": body["messages"], "n": 2}).encode(), ChatCompletionRequest)
    assert not caplog.records
