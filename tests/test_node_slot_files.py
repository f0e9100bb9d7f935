"""llama-server's slot files (POST /slots/{id}?action=save|restore|erase, --slot-save-path) over HTTP.

The model is the scripted test double (tests/node_scripted.py), whose slots hold tokens only: these
tests check the route's contract (llama-server's shapes and errors, file names confined to the
folder, corrupt files refused, a busy slot waited for). That a restored slot's K/V rows continue a
conversation bit for bit is checked on the real engine in test_node_engine.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from node_scripted import ScriptedBackend
from node_server import run_node

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside") / "slots"
    folder.mkdir()
    with run_node(ScriptedBackend(delay=0.003), parallel=2, slot_save_path=folder) as (url, state):
        yield url, state, folder


def slots(url: str) -> list[dict]:
    return httpx.get(f"{url}/slots").json()


def act(url: str, slot, action: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/slots/{slot}", params={"action": action}, json=body or None, timeout=60)


def chat(url: str, text: str, max_tokens: int = 8):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model="scripted-oss", max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": text}])


def test_save_erase_restore_round_trip(node):
    url, state, folder = node
    for i in range(2):
        assert act(url, i, "erase").status_code == 200
    r = chat(url, "Remember the cathedral of Köln, please.")
    busy = [s for s in slots(url) if s["n_prompt_tokens_cached"]]
    assert len(busy) == 1
    slot, held = busy[0]["id"], busy[0]["n_prompt_tokens_cached"]
    assert held >= r.usage.prompt_tokens

    saved = act(url, slot, "save", filename="koeln.bin").json()
    assert saved["id_slot"] == slot and saved["filename"] == "koeln.bin" and saved["n_saved"] == held
    assert saved["n_written"] == (folder / "koeln.bin").stat().st_size and saved["timings"]["save_ms"] > 0
    assert sorted(p.name for p in folder.iterdir()) == ["koeln.bin"]  # no temporary file left

    assert act(url, slot, "erase").json() == {"id_slot": slot, "n_erased": held}
    assert slots(url)[slot]["n_prompt_tokens_cached"] == 0
    other = 1 - slot  # restored into the other slot
    restored = act(url, other, "restore", filename="koeln.bin").json()
    assert restored["n_restored"] == held and restored["n_read"] == saved["n_written"]
    assert restored["id_slot"] == other and restored["timings"]["restore_ms"] > 0
    assert slots(url)[other]["n_prompt_tokens_cached"] == held
    again = chat(url, "Remember the cathedral of Köln, please.")  # takes the restored slot
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_without_a_folder_slot_actions_are_not_supported():
    with run_node(ScriptedBackend(), parallel=1) as (url, _):
        for action in ("save", "restore", "erase", "nonsense"):
            r = act(url, 0, action, filename="a.bin")
            assert r.status_code == 501
            assert r.json()["error"]["message"] == ("This server does not support slots action. "
                                                    "Start it with `--slot-save-path`")
            assert r.json()["error"]["type"] == "not_supported_error"


@pytest.mark.parametrize("slot", ["2", "-1", "abc", "1e0", "0x1", "１", "99999999999"])
def test_invalid_slot_ids(node, slot):
    r = act(node[0], slot, "erase")
    assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid slot ID"


@pytest.mark.parametrize("action", ["", "load", "SAVE", "save "])
def test_invalid_actions(node, action):
    r = act(node[0], 0, action, filename="a.bin")
    assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid action"


BAD_NAMES = ["", ".", "..", "../escape.bin", "a/b.bin", "/etc/passwd", "a\\b", ".hidden", "name.", " lead",
             "trail ", "new\nline", "nul\x00", "tab\tname", "bom\ufeff.bin", "rtl\u202e.bin", "x" * 256,
             "é" * 128, "c:drive", "star*", "q?", "pipe|", "lt<", "quote\"", "\ud800"]


@pytest.mark.parametrize("action", ["save", "restore"])
def test_file_names_stay_in_the_folder(node, action):
    url, _, folder = node
    outside = sorted(p.name for p in folder.parent.iterdir())
    for name in BAD_NAMES:
        r = httpx.post(f"{url}/slots/0", params={"action": action},
                       content=json.dumps({"filename": name}).encode(), timeout=30)
        assert r.status_code == 400, name
        # a lone surrogate is refused earlier, as the body's JSON is checked to hold text
        assert r.json()["error"]["message"] == ("Invalid filename" if name != "\ud800" else
                                                "a string in the request body holds a lone UTF-16 "
                                                "surrogate, which is not text"), name
    r = act(url, 0, action)  # no filename at all
    assert r.status_code == 400 and r.json()["error"]["param"] == "filename"
    assert act(url, 0, action, filename=7).status_code == 400
    assert sorted(p.name for p in folder.parent.iterdir()) == outside
    assert not any(p.name.startswith(".") for p in folder.iterdir())
    if action == "save":  # 255 bytes of UTF-8 are a name; 256 are not
        assert act(url, 0, "save", filename="é" * 126 + ".bi").status_code == 200
        assert act(url, 0, "save", filename="é" * 126 + ".bin").status_code == 400


def test_restoring_what_is_not_a_slot_file(node, tmp_path):
    url, _, folder = node
    r = act(url, 0, "restore", filename="never-saved.bin")
    assert r.status_code == 400 and "never-saved.bin" in r.json()["error"]["message"]
    (folder / "garbage.bin").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    (folder / "a-folder").mkdir()
    act(url, 0, "erase")
    chat(url, "Something to save.")
    held = max(s["n_prompt_tokens_cached"] for s in slots(url))
    slot = next(s["id"] for s in slots(url) if s["n_prompt_tokens_cached"] == held)
    good = act(url, slot, "save", filename="good.bin").json()
    data = (folder / "good.bin").read_bytes()
    (folder / "cut.bin").write_bytes(data[:len(data) // 2])
    for name in ("garbage.bin", "a-folder", "cut.bin"):
        r = act(url, slot, "restore", filename=name)
        assert r.status_code == 400, name
        message = r.json()["error"]["message"]
        assert name in message and str(folder) not in message  # the server's folder is not revealed
        assert slots(url)[slot]["n_prompt_tokens_cached"] == held  # untouched
    assert act(url, slot, "restore", filename="good.bin").json()["n_restored"] == good["n_saved"]


def test_a_busy_slot_is_saved_once_its_request_ends(tmp_path):
    backend = ScriptedBackend(delay=0.02)
    with run_node(backend, parallel=1, slot_save_path=tmp_path) as (url, _):
        answer = {}
        worker = threading.Thread(target=lambda: answer.setdefault("r", chat(url, "A slow one.", max_tokens=40)))
        worker.start()
        deadline = time.monotonic() + 30
        while not slots(url)[0]["is_processing"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        saved = act(url, 0, "save", filename="busy.bin").json()  # waits for the request to end
        worker.join(30)
        r = answer["r"]
        assert saved["n_saved"] == slots(url)[0]["n_prompt_tokens_cached"]
        assert saved["n_saved"] >= r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_a_request_can_name_its_slot(node):
    """llama-server's id_slot: the request runs in that slot, not the one that reuses the most."""
    url = node[0]
    for i in range(2):
        act(url, i, "erase")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

    def ask(**extra):
        return client.chat.completions.create(model="scripted-oss", max_tokens=4, extra_body=extra,
                                              messages=[{"role": "user", "content": "Pin me, please."}])

    ask(id_slot=1)
    assert [s["n_prompt_tokens_cached"] > 0 for s in slots(url)] == [False, True]
    r = ask(id_slot=0)  # slot 1 holds this prompt, but the request named slot 0
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert all(s["n_prompt_tokens_cached"] > 0 for s in slots(url))
    assert ask(id_slot=-1).usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1  # -1: any
    for bad in (2, -2, "1", 1.5):
        with pytest.raises(openai.BadRequestError) as e:
            ask(id_slot=bad)
        assert e.value.body["param"] == "id_slot", bad
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        ask(id_slot=0, n=2)


def test_a_request_for_a_busy_slot_waits_while_others_go_first():
    with run_node(ScriptedBackend(delay=0.02), parallel=2) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        ended = {}

        def ask(name, max_tokens, **extra):
            client.chat.completions.create(model="scripted-oss", max_tokens=max_tokens, extra_body=extra,
                                           messages=[{"role": "user", "content": f"Request {name}."}])
            ended[name] = time.monotonic()

        long = threading.Thread(target=ask, args=("long", 40), kwargs={"id_slot": 0})
        long.start()
        deadline = time.monotonic() + 30
        while not slots(url)[0]["is_processing"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pinned = threading.Thread(target=ask, args=("pinned", 2), kwargs={"id_slot": 0})
        pinned.start()
        time.sleep(0.05)  # queued behind the long one's slot
        ask("free", 2)  # takes slot 1 at once
        for t in (long, pinned):
            t.join(60)
        assert ended["free"] < ended["long"] < ended["pinned"]
