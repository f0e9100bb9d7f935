"""The node's web page (GET /) and its stats route, over HTTP and in a real headless Chromium.

HTTP tests need no browser. The browser tests drive Debian's `chromium` + `chromium-driver` with
selenium (`.ci/run` installs them; here they skip with the reason when either is missing): the
chat and status views against a real node (the CLI) serving the random-weight demo model, and the
page's rendering rules (reasoning folded, Markdown without HTML, tool calls, the API key) against
the scripted test double, whose replies are known in advance. Screenshots of both views are
written under the test's output folder (printed with -s; docs/webui-*.png are copies of them)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from node_scripted import ScriptedBackend
from node_server import free_port, run_node, serve_app
from test_node_router import FakeRouter

from pyengine.demo_model import write_demo_model
from pyengine.node.metrics import StepWindow
from pyengine.node.router_client import GpuProbe, run_router_client

PAGE_DIR = Path(__file__).resolve().parents[1] / "pyengine" / "node" / "webui"
METRIC = re.compile(r'^pyengine_expert_selections_total\{layer="(\d+)",expert="(\d+)"\} (\d+)$', re.M)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def expert_metrics(url: str, headers: dict | None = None) -> dict[tuple[int, int], int]:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return {(int(layer), int(expert)): int(n) for layer, expert, n in METRIC.findall(text)}


def gauge(url: str, name: str) -> float:
    m = re.search(rf"^pyengine_{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1))


# ---- HTTP: the page's routes, the key, --no-webui, the stats ------------------------------------

def test_page_and_its_files_are_served_with_a_strict_policy():
    with run_node(ScriptedBackend()) as (url, _):
        r = httpx.get(f"{url}/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        refs = re.findall(r'(?:src|href)="(/webui/[^"]+)"', r.text)
        assert len(refs) == 3  # every file index.html names is served, with its type
        for ref in refs:
            asset = httpx.get(url + ref)
            assert asset.status_code == 200 and asset.content == (PAGE_DIR / ref.rsplit("/", 1)[1]).read_bytes()
            assert asset.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
        missing = httpx.get(f"{url}/webui/../app.py")
        assert missing.status_code == 404 and "error" in missing.json()
        assert httpx.get(f"{url}/webui/nothing.js").status_code == 404
        assert httpx.get(f"{url}/props").json()["webui"] is True


def test_page_is_open_with_an_api_key_but_the_data_is_not():
    with run_node(ScriptedBackend(), api_key="sekrit") as (url, _):
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/webui/app.js").status_code == 200
        for path in ("/v1/node/stats", "/metrics", "/v1/models"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(f"{url}/v1/node/stats", headers={"Authorization": "Bearer sekrit"}).status_code == 200


def test_no_webui_turns_the_page_off():
    with run_node(ScriptedBackend(), webui=False) as (url, _):
        for path in ("/", "/webui/app.js", "/webui/style.css"):
            r = httpx.get(url + path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"{url}/v1/node/stats").status_code == 200
        assert httpx.get(f"{url}/props").json()["webui"] is False


def test_no_webui_flag_reaches_the_config(monkeypatch):
    from pyengine.node import cli

    seen = {}
    monkeypatch.setattr(cli, "serve", lambda config, load: seen.setdefault("config", config) and 0)
    for argv, webui in ((["-m", "x.gguf"], True), (["-m", "x.gguf", "--no-webui"], False)):
        seen.clear()
        assert cli.main(argv) == 0
        assert seen["config"].webui is webui


def test_step_window_rates_match_a_direct_count():
    rng = random.Random(16)
    for _ in range(50):
        window = StepWindow(span=rng.uniform(5, 60))
        steps, now = [], 0.0
        for _ in range(rng.randrange(0, 80)):
            now += rng.uniform(0, 3)
            step = (now, rng.uniform(1e-4, 0.5), rng.choice((0, rng.randrange(1, 512))), rng.randrange(0, 5))
            steps.append(step)
            window.add(*step)
        now += rng.uniform(0, 10)
        kept = [s for s in steps if s[0] >= now - window.span]
        prefill = [s for s in kept if s[2]]
        decode = [s for s in kept if not s[2] and s[3]]
        got = window.rates(now)
        assert got["prompt_tokens"] == sum(s[2] for s in kept)
        assert got["generated_tokens"] == sum(s[3] for s in kept)
        want_p = sum(s[2] for s in prefill) / sum(s[1] for s in prefill) if prefill else None
        want_d = sum(s[3] for s in decode) / sum(s[1] for s in decode) if decode else None
        assert got["prefill_tokens_per_second"] == pytest.approx(want_p)
        assert got["decode_tokens_per_second"] == pytest.approx(want_d)


def test_stats_follow_generation_and_the_router(monkeypatch):
    monkeypatch.setattr(GpuProbe, "COMMAND", "no-such-nvidia-smi")
    router = FakeRouter()
    with serve_app(router.app, free_port()) as router.url, \
            run_node(ScriptedBackend(), parallel=2, start_router=run_router_client, router_url=router.url,
                     heartbeat_secs=0.1, advertise_ip="127.0.0.1") as (url, state):
        before = httpx.get(f"{url}/v1/node/stats").json()
        assert before["generated_tokens"] == 0 and before["decode_tokens_per_second"] is None
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "count me"}]})
        usage = r.json()["usage"]
        wait_for(lambda: router.heartbeats, what="a heartbeat")
        stats = httpx.get(f"{url}/v1/node/stats").json()
        assert stats["generated_tokens"] == usage["completion_tokens"]
        assert stats["prompt_tokens"] == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        assert stats["decode_tokens_per_second"] > 0 and stats["prefill_tokens_per_second"] > 0
        assert stats["kv_cache_tokens"] == state.scheduler.kv_tokens() > 0
        assert stats["kv_cache_capacity_tokens"] == 2 * state.backend.info.n_ctx
        assert stats["rss_bytes"] > 10 * 2**20
        assert stats["expert_counts"] == state.backend.expert_counts()
        link = stats["router"]
        assert link["status"] == "registered"
        assert link["node_id"] == f"node-{len(router.registrations)}" and link["url"] == router.url
        assert abs(link["last_heartbeat"] - time.time()) < 5 and link["last_heartbeat_result"] == "HTTP 200"
    alone = ScriptedBackend()
    with run_node(alone) as (url, _):
        assert httpx.get(f"{url}/v1/node/stats").json()["router"] == {"url": None, "status": "off"}


# ---- the browser --------------------------------------------------------------------------------

def _find(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under selenium, its console log kept."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (tests/requirements.txt)")
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver_exe = _find("chromedriver")
    if not chromium or not driver_exe:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--force-color-profile=srgb"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_exe), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("webui-screenshots")
    print(f"\nweb page screenshots: {out}")
    return out


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, url: str, key: str | None = None) -> None:
    """Load the page with `key` (or none) in its storage, no reply in it."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    if key:
        driver.execute_script("localStorage.setItem('pyengine.apiKey', arguments[0])", key)
    driver.refresh()


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def set_options(driver, effort: str = "low", temperature: str = "0", max_tokens: str = "24") -> None:
    driver.execute_script(
        "document.getElementById('settings').open = true;"
        "document.getElementById('effort').value = arguments[0];"
        "document.getElementById('temperature').value = arguments[1];"
        "document.getElementById('max-tokens').value = arguments[2];", effort, temperature, max_tokens)


def say(driver, text: str) -> None:
    box = by_id(driver, "input")
    box.clear()
    box.send_keys(text)
    by_id(driver, "send").click()


def replies(driver) -> list:
    return driver.find_elements("css selector", "#messages .msg.assistant")


def finished(driver) -> bool:
    return by_id(driver, "stop").get_attribute("disabled") is not None


def next_frames(driver, n: int = 2) -> None:
    """Return after the page has drawn n more animation frames (where a scheduled redraw would run)."""
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; let n = arguments[0];"
        "const tick = () => (--n > 0 ? requestAnimationFrame(tick) : done()); requestAnimationFrame(tick);", n)


@pytest.fixture(scope="module")
def demo_node(tmp_path_factory):
    """The CLI's node on the demo model: one slot, 2048 tokens of context, one thread."""
    folder = tmp_path_factory.mktemp("demo-node")
    model = write_demo_model(folder / "gpt-oss-demo.gguf")
    port = free_port()
    log = open(folder / "node.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pyengine.cli", "serve", "-m", str(model), "--port", str(port),
                             "-c", "2048", "-t", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (folder / "node.log").read_text()
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 120, "the demo node")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def normalise(text: str) -> str:
    """Text without whitespace and Markdown markup characters, to compare rendered with raw."""
    return re.sub(r"[\s*_`~#>|\-\[\]()+.:!]", "", text)


def test_chat_streams_the_reply_and_stop_frees_the_slot(browser, demo_node, screenshots):
    url = demo_node
    open_page(browser, url)
    wait_for(lambda: by_id(browser, "model-name").text == "gpt-oss-demo", what="the model name")
    set_options(browser)
    say(browser, "Hello there, who are you?")
    wait_for(lambda: replies(browser) and finished(browser), 60, "the first reply")
    (reply,) = replies(browser)
    shown = reply.find_element("css selector", ".answer").text
    ref = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hello there, who are you?"}],
        "reasoning_effort": "low", "temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]
    assert shown and normalise(shown) == normalise(ref["content"])
    assert "tokens/s" in reply.find_element("css selector", ".meta").text
    assert console_errors(browser) == []

    cancelled = r'pyengine_requests_total\{endpoint="chat",outcome="cancelled"\} (\d+)'
    before = re.search(cancelled, httpx.get(f"{url}/metrics").text)
    set_options(browser, temperature="1", max_tokens="1900")
    say(browser, "Now write a very long story.")
    lengths = []
    wait_for(lambda: len(replies(browser)) == 2 and lengths.append(len(replies(browser)[1].text)) is None
             and lengths[-1] > 20 and len(set(lengths)) > 1, 60, "the second reply to stream")
    by_id(browser, "stop").click()
    wait_for(lambda: finished(browser), 10, "the page to stop")
    assert "stopped" in replies(browser)[1].find_element("css selector", ".meta").text
    wait_for(lambda: gauge(url, "requests_processing") == 0, 10, "the slot to free")
    after = re.search(cancelled, httpx.get(f"{url}/metrics").text)
    assert int(after.group(1)) == (int(before.group(1)) if before else 0) + 1
    assert not any(s["is_processing"] for s in httpx.get(f"{url}/slots").json())
    assert console_errors(browser) == []
    browser.execute_script("document.getElementById('settings').open = false")
    browser.save_screenshot(str(screenshots / "webui-chat.png"))


def test_regenerate_asks_the_last_message_again_from_the_slots_cache(browser, demo_node):
    """Regenerate replaces the last reply with a new one to the same conversation (greedy here: the
    same answer), the node taking that whole prompt but its last token from the slot's cache; the
    chat then goes on from the new reply."""
    url = demo_node
    open_page(browser, url)
    wait_for(lambda: by_id(browser, "model-name").text == "gpt-oss-demo", what="the model name")
    set_options(browser)
    regenerate = by_id(browser, "regenerate")
    assert regenerate.get_attribute("disabled") is not None  # nothing to ask again yet
    say(browser, "Name three rivers.")
    wait_for(lambda: replies(browser) and finished(browser), 60, "the reply")
    first = replies(browser)[0].find_element("css selector", ".answer").text

    def counters() -> tuple[float, float]:
        return gauge(url, "prompt_tokens_total"), gauge(url, "prompt_tokens_cached_total")

    prompt0, cached0 = counters()
    regenerate.click()
    wait_for(lambda: finished(browser) and regenerate.get_attribute("disabled") is None, 60, "the new reply")
    assert [m.text for m in browser.find_elements("css selector", "#messages .msg.user")] == ["Name three rivers."]
    (reply,) = replies(browser)
    assert first and reply.find_element("css selector", ".answer").text == first
    prompt1, cached1 = counters()
    assert cached1 - cached0 == prompt1 - prompt0 - 1 > 0
    say(browser, "And three lakes?")
    wait_for(lambda: len(replies(browser)) == 2 and finished(browser), 60, "the next turn")
    assert len(browser.find_elements("css selector", "#messages .msg.user")) == 2
    assert console_errors(browser) == []


def test_status_shows_the_model_and_expert_heatmap_matching_metrics(browser, demo_node, screenshots):
    url = demo_node
    open_page(browser, url)
    if not replies(browser):  # counts need a generation: run one if the chat test did not
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 8}, timeout=60)
    by_id(browser, "tab-status").click()
    def facts() -> dict[str, str]:  # read in one go: the view redraws every 2 s
        return browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('dd')].map(d => [d.dataset.fact, d.textContent]))")
    wait_for(lambda: facts().get("name") == "gpt-oss-demo", what="the model facts")
    want = expert_metrics(url)
    assert sum(want.values()) > 0 and len(want) == 2 * 8  # the demo model: 2 layers x 8 experts

    def cells() -> dict[tuple[int, int], tuple[int, str]]:
        return {(int(layer), int(expert)): (int(count), shade) for layer, expert, count, shade in browser.execute_script(
            "return [...document.querySelectorAll('#heatmap .cell')].map(c => [c.dataset.layer, c.dataset.expert, "
            "c.dataset.count ?? -1, getComputedStyle(c).backgroundColor])")}

    wait_for(lambda: {k: n for k, (n, _) in cells().items()} == want, 10, "heatmap cells equal to /metrics")
    assert len({shade for _, shade in cells().values()}) > 1  # counts differ, so do the colours
    shown = facts()
    assert shown["decode"].endswith("tokens/s") and shown["state"].startswith("not registering")
    assert shown["process RSS"].endswith("MiB") and "of 2048 tokens" in shown["KV cache in use"]
    props = httpx.get(f"{url}/props").json()
    assert (shown["architecture"], shown["quantization"]) == (props["model"]["arch"], props["model"]["quantization"])
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#slots tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
    assert rows == [[str(s["id"]), "busy" if s["is_processing"] else "idle", str(s["n_prompt_tokens_cached"]),
                     str(s["n_decoded"]), str(s["n_ctx"])] for s in httpx.get(f"{url}/slots").json()]
    assert console_errors(browser) == []
    browser.save_screenshot(str(screenshots / "webui-status.png"))


ALLOWED = {"P": set(), "H1": set(), "H2": set(), "H3": set(), "H4": set(), "H5": set(), "H6": set(), "HR": set(),
           "BLOCKQUOTE": set(), "UL": set(), "OL": {"start"}, "LI": set(), "PRE": set(), "CODE": {"class"},
           "TABLE": set(), "THEAD": set(), "TBODY": set(), "TR": set(), "TH": set(), "TD": set(), "STRONG": set(),
           "EM": set(), "DEL": set(), "A": {"href", "target", "rel"}}
KEPT = "ab<\"'&=/;"  # characters no Markdown rule consumes: each must reach the page's text, in order
PIECES = [*"ab<>\"'&=/;*_`~#|-+[]()!: ", "\n", "\n\n", "```", "~~~", "**", "<script>", "<img src=x onerror=alert(1)>",
          "javascript:alert(1)", "https://example.org/x", "1. ", "- ", "> ", "| a | b |\n|---|---|\n"]


def random_markdown(rng: random.Random, pieces: list[str]) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))


def test_markdown_of_random_text_is_only_safe_elements_and_keeps_the_text(browser, demo_node):
    """Random mixes of Markdown, HTML and URLs: only the allowed elements and attributes come out,
    links only to http(s), and every character no rule consumes reaches the text in order."""
    browser.get(demo_node + "/")
    rng = random.Random(1616)
    texts = [random_markdown(rng, PIECES) for _ in range(300)]
    # without links (a URL is no text) and code fences (an opening line's rest is its info string, no text)
    plain = [re.sub(r"(`|~)\1\1+", r"\1\1", random_markdown(rng, [p for p in PIECES if "(" not in p and "http" not in p]))
             for _ in range(300)]
    out = browser.execute_script("""
        return arguments[0].map(t => {
          const box = document.createElement('div');
          box.append(window.renderMarkdown(t));
          return [box.textContent, [...box.querySelectorAll('*')].map(e => [e.tagName, e.getAttributeNames(),
                  e.getAttribute('href')])];
        });""", texts + plain)
    for text, (shown, elements) in zip(texts + plain, out):
        for tag, attrs, href in elements:
            assert tag in ALLOWED and set(attrs) <= ALLOWED[tag], (text, tag, attrs)
            assert href is None or href.startswith(("http://", "https://", "mailto:")), (text, href)
    for text, (shown, _) in zip(plain, out[len(texts):]):
        assert [c for c in shown if c in KEPT] == [c for c in text if c in KEPT], text
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def scripted_node():
    backend = ScriptedBackend(delay=0.002)
    with run_node(backend, api_key="key-16") as (url, _):
        yield url, backend


def test_reasoning_is_folded_and_markdown_never_becomes_html(browser, scripted_node):
    url, backend = scripted_node
    hostile = ('**bold** and `x<y>` <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
               '[click](javascript:window.pwned=3) [home](https://example.org/a_b)\n\n- one\n- two\n\n'
               '```py\nprint("<b>")\n```not the end\n```')
    backend.script = lambda prompt: ("<|channel|>analysis<|message|>Think <b>hard</b>.<|end|><|start|>assistant"
                                     f"<|channel|>final<|message|>{hostile}<|return|>")
    open_page(browser, url, key="key-16")
    say(browser, "show me")
    wait_for(lambda: replies(browser) and finished(browser), 20, "the reply")
    (reply,) = replies(browser)
    details = reply.find_element("css selector", "details.reasoning")
    assert details.get_attribute("open") is None and details.is_displayed()
    dim, plain = (reply.find_element("css selector", s).value_of_css_property("color") for s in ("details", ".answer"))
    assert dim != plain
    details.find_element("tag name", "summary").click()
    assert reply.find_element("css selector", ".reasoning-text").text == "Think <b>hard</b>."
    answer = reply.find_element("css selector", ".answer")
    assert [e.text for e in answer.find_elements("tag name", "strong")] == ["bold"]
    assert [(e.text, e.get_attribute("class")) for e in answer.find_elements("tag name", "code")] == [
        ("x<y>", ""), ('print("<b>")\n```not the end', "language-py")]
    assert answer.find_elements("css selector", "img, script, b") == []
    assert [a.get_attribute("href") for a in answer.find_elements("tag name", "a")] == ["https://example.org/a_b"]
    assert [e.text for e in answer.find_elements("tag name", "li")] == ["one", "two"]
    assert '<img src=x onerror="window.pwned=1">' in answer.text and "<script>" in answer.text
    assert browser.execute_script("return window.pwned") is None

    backend.script = lambda prompt: ('<|channel|>commentary to=functions.get_weather <|constrain|>json'
                                     '<|message|>{"city": "Köln"}<|call|>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    browser.execute_script("document.getElementById('tools').value = arguments[0]", json.dumps(tools))
    # animation frames 0.2 s apart, so a draw the stream scheduled is still pending when the reply
    # finishes: the final draw must drop it, or it rebuilds the tool calls under the test's feet
    browser.execute_script("window.requestAnimationFrame = (f) => setTimeout(f, 200);"
                           "window.cancelAnimationFrame = (id) => clearTimeout(id);")
    say(browser, "weather?")
    wait_for(lambda: len(replies(browser)) == 2 and finished(browser), 20, "the tool call")
    call = replies(browser)[1].find_element("css selector", ".tool-call")
    next_frames(browser)
    assert call.find_element("css selector", ".tool-name").text == "tool call: get_weather"
    assert json.loads(call.find_element("tag name", "pre").text) == {"city": "Köln"}
    assert backend.last_tools == [tools[0]["function"]]
    assert [(m["role"], m["content"]) for m in backend.last_messages] == [
        ("user", "show me"), ("assistant", hostile), ("user", "weather?")]


def test_the_page_asks_for_the_key_and_sends_it(browser, scripted_node):
    url, backend = scripted_node
    backend.script = lambda prompt: "<|channel|>final<|message|>with the key<|return|>"
    open_page(browser, url)
    dialog = by_id(browser, "key-dialog")
    wait_for(dialog.is_displayed, what="the key dialog")
    by_id(browser, "key-input").send_keys("wrong")
    by_id(browser, "key-save").click()
    wait_for(lambda: dialog.is_displayed() and "refused" in by_id(browser, "key-reason").text, what="a refusal")
    field = by_id(browser, "key-input")
    field.clear()
    field.send_keys("key-16")
    by_id(browser, "key-save").click()
    wait_for(lambda: by_id(browser, "model-name").text == "scripted-oss", what="the model name")
    assert not dialog.is_displayed()
    say(browser, "hi")
    wait_for(lambda: replies(browser) and finished(browser), 20, "the reply")
    assert replies(browser)[0].find_element("css selector", ".answer").text == "with the key"
    assert browser.execute_script("return localStorage.getItem('pyengine.apiKey')") == "key-16"
    by_id(browser, "clear").click()  # New chat: an empty page and history
    assert replies(browser) == []
    say(browser, "fresh start")
    wait_for(lambda: replies(browser) and finished(browser), 20, "the reply")
    assert [(m["role"], m["content"]) for m in backend.last_messages] == [("user", "fresh start")]

