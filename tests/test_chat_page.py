"""The chat page at `/`, driven in headless Chromium against real servers on loopback ports.

Two servers, one each per module: a tiny random model with a tiny tokenizer (fast) for most of the
page, and the real SmolLM2 where a real answer matters (streaming, stop, the screenshot). The tiny
tokenizer has one extra token, `HOSTILE`, a string of HTML and a `javascript:` link: a request with
a logit bias on it makes the model answer exactly that, so the hostile-rendering test goes through
the real stream and the real renderer. See browser_helpers.py for the browser (tests skip, with
a hint, where none is installed).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import httpx
import numpy as np
import pytest

from browser_helpers import launch_browser
from engine_helpers import load_model
from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.tokenizer import Tokenizer
from tokenizer_helpers import tiny_sentencepiece_metadata

HOSTILE = ('Hi <img src=x onerror="window.__xss=(window.__xss||0)+1"> <script>window.__xss=(window.__xss||0)+1'
           '</script> [go](javascript:window.__xss=(window.__xss||0)+1)')
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
SAFE_TAGS = {"P", "H1", "H2", "H3", "H4", "H5", "H6", "UL", "OL", "LI", "BLOCKQUOTE", "PRE", "CODE", "TABLE", "THEAD",
             "TBODY", "TR", "TH", "TD", "EM", "STRONG", "DEL", "A", "BR", "HR", "DIV", "SPAN", "BUTTON"}


def tiny_tokenizer() -> tuple[Tokenizer, dict[str, int]]:
    metadata = tiny_sentencepiece_metadata()
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"], HOSTILE]
    metadata["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], 0.0]
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], 4]  # user-defined: kept whole
    tokens = metadata["tokenizer.ggml.tokens"]
    return Tokenizer.from_gguf_metadata(metadata), {"hostile": tokens.index(HOSTILE), "hello": tokens.index("▁Hello")}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def browser():
    playwright, chromium = launch_browser()
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer, ids = tiny_tokenizer()
    model, config = load_model(tiny_model_dir("llama"))
    engine = Engine(model, config, tokenizer, EngineConfig(dtype="float32"))
    app = create_app(engine, ServerConfig(served_model_name="tiny", chat_template=TEMPLATE))
    with BackgroundServer(app) as server:
        yield app, server.url, ids


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from quill import LLM

    llm = LLM(smollm2_gguf)
    app = create_app(llm, ServerConfig(served_model_name="smollm2", response_cache=False))
    with BackgroundServer(app) as server:
        yield app, server.url, llm


@pytest.fixture
def context(browser):
    contexts = []

    def make(**options):
        made = browser.new_context(viewport=options.pop("viewport", {"width": 1100, "height": 760}), **options)
        contexts.append(made)
        return made

    yield make
    for made in contexts:
        made.close()


def open_page(context, url: str, **options):
    """A fresh page on the chat, connected to the server; its uncaught errors fail the test."""
    page = context(**options).new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.errors = errors
    page.goto(url)
    page.wait_for_function("() => document.body.dataset.connected === 'true'")
    return page


def settings(page, **values) -> None:
    if not page.locator("#settings").evaluate("details => details.open"):
        page.click("#settings summary")
    for name, value in values.items():
        field = f"#{name}"
        page.fill(field, json.dumps(value) if isinstance(value, dict) else str(value))
        page.locator(field).dispatch_event("change")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answers(page, count: int, timeout: float = 120_000) -> None:
    """Wait until `count` answers have finished (each finished answer has its action buttons)."""
    page.wait_for_function(
        f"() => document.querySelectorAll('article.assistant .actions').length >= {count} && !document.body.classList"
        ".contains('busy')", timeout=timeout)


def say_hello(ids: dict, **fields) -> dict:
    """Settings under which the tiny model answers "Hello Hello ...": readable, and the same every time."""
    return {**fields, "extra": {"logit_bias": {str(ids["hello"]): 100}}}


def hello_exchange(context, tiny, text: str, **fields):
    """A fresh page on the tiny server with one finished exchange: `text`, answered "Hello ..."."""
    page = open_page(context, tiny[1])
    settings(page, **say_hello(tiny[2], **fields))
    send(page, text)
    wait_answers(page, 1)
    return page


def import_file(page, content: dict | bytes, name: str = "conversations.json") -> None:
    """Choose a file in the page's Import dialog (a dict is written as JSON)."""
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    page.set_input_files("#import-file", files=[{"name": name, "mimeType": "application/json", "buffer": data}])


def stored(page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('quill.conversations') || '[]')")


def chat_requests(page) -> list[dict]:
    bodies = []
    page.on("request", lambda request: bodies.append(request.post_data_json)
            if request.url.endswith("/v1/chat/completions") else None)
    return bodies


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


# ----------------------------------------------------------------------- a real model answers


@pytest.mark.real_model
def test_answer_streams_in_then_the_stats_line(context, smollm2):
    app, url, llm = smollm2
    page = open_page(context, url)
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const body = document.querySelector('article.assistant .body');
            const done = document.querySelector('article.assistant .stats') !== null;
            if (body) window.lengths.push([body.textContent.length, done]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    settings(page, temperature=0, max_tokens=24)
    send(page, "Name the capital of France.")
    wait_answers(page, 1)
    lengths = page.evaluate("window.lengths")
    streaming = sorted({length for length, done in lengths if not done and length > 0})
    # The text grew over more than one render before the answer finished. (Not more: a browser
    # coalesces renders, and on a quiet machine the eight-token answer arrived in two, then the stats.)
    assert len(streaming) >= 2, lengths
    assert not any(done for length, done in lengths[:-1] if length < streaming[-1])  # stats came last
    answer = stored(page)[0]["messages"][1]
    assert "Paris" in answer["content"] and "Paris" in page.inner_text("article.assistant .body")
    prompt_tokens = len(llm.tokenizer.encode_chat([{"role": "user", "content": "Name the capital of France."}]))
    stats = page.inner_text("article.assistant .stats")
    assert re.search(r"TTFT \d+(\.\d+)? m?s", stats) and re.search(r"\d+\.\d tok/s", stats), stats
    assert f"{prompt_tokens} in" in stats and f"{answer['stats']['completion_tokens']} out" in stats, stats
    assert 0 < answer["stats"]["completion_tokens"] <= 24
    assert "cache bypass" in stats and "self-hosted" in stats and "gpt-4o $" in stats, stats
    assert page.errors == []


@pytest.mark.real_model
def test_escape_stops_the_answer_and_the_server_frees_it(context, smollm2):
    app, url, _ = smollm2
    page = open_page(context, url)
    settings(page, max_tokens=4000, extra={"ignore_eos": True})
    aborted_before = metric(url, "quill:request_success_total", finished_reason="abort")
    send(page, "Tell me a very long story about a lighthouse keeper.")
    page.wait_for_function("() => (document.querySelector('article.assistant .body')?.textContent.length || 0) > 20",
                           timeout=120_000)
    assert metric(url, "quill:num_requests_running") == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("article.assistant .notice >> text=Stopped.")
    stopped = page.inner_text("article.assistant .body")
    deadline = time.monotonic() + 10
    while metric(url, "quill:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)
    page.wait_for_timeout(1000)
    assert page.inner_text("article.assistant .body") == stopped  # the text stopped growing
    assert metric(url, "quill:request_success_total", finished_reason="abort") == aborted_before + 1
    stats = app.state.engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks  # its KV blocks are free again
    message = stored(page)[0]["messages"][1]
    assert message["stopped"] is True and message["content"] == stopped
    assert not page.locator("#stop").is_visible() and page.locator("#send").is_visible()


@pytest.mark.real_model
def test_screenshot_of_a_finished_exchange_is_not_blank(context, smollm2, tmp_path):
    from PIL import Image

    _, url, _ = smollm2
    page = open_page(context, url)
    settings(page, temperature=0, max_tokens=48)
    page.click("#settings summary")  # closed again, as a user would leave it
    send(page, "Name the capital of France.")
    wait_answers(page, 1)
    path = tmp_path / "chat-page.png"
    page.screenshot(path=str(path))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape == (760, 1100)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 32  # text and panels, not an empty page
    if os.environ.get("QUILL_CHAT_SCREENSHOT"):  # where to keep it, e.g. to refresh the README's picture
        shutil.copy(path, os.environ["QUILL_CHAT_SCREENSHOT"])


# --------------------------------------------------------------------------------- safe rendering


def test_hostile_answer_runs_nothing(context, tiny):
    """The model answers HTML with an onerror handler, a script and a javascript: link. The page
    runs in a context that ignores the Content-Security-Policy, so only the renderer stands between
    the text and the page; the control shows the probe would see the text run if it were parsed."""
    _, url, ids = tiny
    page = open_page(context, url, bypass_csp=True)
    page.evaluate("html => { const d = document.createElement('div'); d.id = 'control'; d.innerHTML = html;"
                  " document.body.append(d); }", HOSTILE)
    page.wait_for_function("() => window.__xss >= 1")
    page.evaluate("() => { document.getElementById('control').remove(); delete window.__xss; }")
    settings(page, temperature=0, max_tokens=1, extra={"logit_bias": {str(ids["hostile"]): 100}})
    send(page, "Say something.")
    wait_answers(page, 1)
    assert stored(page)[0]["messages"][1]["content"] == HOSTILE  # the model did answer the hostile text
    page.wait_for_timeout(500)  # time for a broken image's error event, had one been created
    assert_ran_nothing(page)
    body = page.inner_text("article.assistant .body")
    assert '<img src=x onerror="window.__xss' in body and "<script>" in body
    assert page.errors == []


def test_hostile_import_and_user_text_run_nothing(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url, bypass_csp=True)
    send(page, HOSTILE)  # the user's own message
    wait_answers(page, 1)
    answer = f"```html\n</code></pre>{HOSTILE}\n```\n\n# {HOSTILE}\n\n- {HOSTILE}\n\n| a | b |\n|---|---|\n| {HOSTILE} | x |"
    export = {"format": "quill-conversations", "version": 1, "conversations": [{
        "id": "hostile", "title": HOSTILE, "created": 1, "updated": 2 ** 40, "settings": {"system": HOSTILE},
        "messages": [{"role": "user", "content": HOSTILE},
                     {"role": "assistant", "content": answer, "model": HOSTILE,
                      "stats": {"ttft": HOSTILE, "prompt_tokens": 3, "cache": HOSTILE,
                                "cost": {"self_hosted_usd": HOSTILE, "reference_usd": {HOSTILE: 0.5}}},
                      "tool_calls": [{"name": HOSTILE, "arguments": HOSTILE}]}]}]}
    import_file(page, export)
    page.wait_for_selector("#conversations li.active[data-id='hostile']")
    page.wait_for_timeout(500)
    assert_ran_nothing(page)
    assert page.inner_text("#conversations li.active button.open").startswith("Hi <img")
    assert page.locator("article.assistant .code-block").count() == 1
    assert page.locator("article.assistant .tool-call").count() == 1
    assert page.errors == []


def assert_ran_nothing(page) -> None:
    assert page.evaluate("window.__xss") is None
    assert page.locator("#messages img, #messages script, #messages iframe, #conversations img").count() == 0
    tags = set(page.eval_on_selector_all("#messages .body *, #messages .tool-calls *", "els => els.map(e => e.tagName)"))
    assert tags <= SAFE_TAGS, tags - SAFE_TAGS
    hrefs = page.eval_on_selector_all("#messages a", "els => els.map(e => e.getAttribute('href'))")
    assert all(h.startswith(("http://", "https://", "mailto:")) for h in hrefs), hrefs
    handlers = page.evaluate("""() => [...document.querySelectorAll('*')].flatMap(
        e => [...e.attributes].filter(a => a.name.startsWith('on')).map(a => a.name))""")
    assert handlers == []


def test_markdown_renders_to_safe_elements(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    cases = {
        "**bold**, *em*, ~~del~~ and `code`":
            "<p><strong>bold</strong>, <em>em</em>, <del>del</del> and <code>code</code></p>",
        "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
        "<b>not bold</b> &amp;": "<p>&lt;b&gt;not bold&lt;/b&gt; &amp;amp;</p>",
        "- a\n  - b\n- c": "<ul><li><p>a</p><ul><li><p>b</p></li></ul></li><li><p>c</p></li></ul>",
        "3. three\n4. four": '<ol start="3"><li><p>three</p></li><li><p>four</p></li></ol>',
        "> quoted\n> text": "<blockquote><p>quoted<br>text</p></blockquote>",
        "## Title": "<h2>Title</h2>",
        "| a | b |\n|:--|--:|\n| 1 | 2 |":
            '<div class="table-wrap"><table><thead><tr><th class="align-left">a</th><th class="align-right">b</th>'
            '</tr></thead><tbody><tr><td class="align-left">1</td><td class="align-right">2</td></tr></tbody>'
            "</table></div>",
        "[site](https://example.com/a_(b)) and [bad](javascript:alert(1))":
            '<p><a href="https://example.com/a_(b)" target="_blank" rel="noopener noreferrer nofollow">site</a> and '
            '<span class="unsafe-link">bad (javascript:alert(1))</span></p>',
        "![pic](https://example.com/x.png)":
            '<p><a href="https://example.com/x.png" target="_blank" rel="noopener noreferrer nofollow">'
            "[image: pic]</a></p>",
        "see https://example.com/page.":
            '<p>see <a href="https://example.com/page" target="_blank" rel="noopener noreferrer nofollow">'
            "https://example.com/page</a>.</p>",
        "\\*not em\\*": "<p>*not em*</p>",
    }
    rendered = render(page, list(cases))
    for (source, expected), html in zip(cases.items(), rendered):
        assert html == expected, source
    [code] = render(page, ["```python\ndef f(x):\n    return x + 1  # one\n```"])
    assert '<span class="code-lang">python</span>' in code and '<button class="copy-code"' in code
    assert ('<code><span class="tok-keyword">def</span> f(x):\n    <span class="tok-keyword">return</span> x + '
            '<span class="tok-number">1</span>  <span class="tok-comment"># one</span></code>') in code
    [unclosed] = render(page, ["text\n```js\nlet a = 'streaming"])  # a code block still being written
    assert '<span class="tok-keyword">let</span> a = <span class="tok-string">\'streaming</span>' in unclosed


def test_markdown_fuzz_never_makes_unsafe_elements(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    pieces = ["*", "**", "_", "`", "```", "~~", "[", "](", ")", "(", "]", "<", ">", "!", "#", "# ", "- ", "1. ", "> ",
              "|", "|---|", "\n", "\n\n", "  ", "\\", "javascript:", "JaVaScRiPt:", "data:text/html,", "http://x",
              "mailto:a@b", "<img src=x onerror=alert(1)>", "<script>", "&lt;", "\u202e", "onload=", "\"", "'", "a", "b"]
    rng = random.Random(21)
    cases = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    result = page.evaluate("""async (cases) => {
        const {renderMarkdown} = await import('/ui/markdown.js');
        const tags = new Set(), hrefs = [], attributes = new Set();
        for (const text of cases) {
            const box = document.createElement('div');
            box.append(renderMarkdown(text));
            for (const node of box.querySelectorAll('*')) {
                tags.add(node.tagName);
                for (const a of node.attributes) attributes.add(a.name);
                if (node.tagName === 'A') hrefs.push(node.getAttribute('href'));
            }
        }
        return {tags: [...tags], hrefs, attributes: [...attributes]};
    }""", cases)
    assert set(result["tags"]) <= SAFE_TAGS, result["tags"]
    assert set(result["attributes"]) <= {"class", "href", "target", "rel", "start", "type", "title"}
    assert all(h.startswith(("http://", "https://", "mailto:")) for h in result["hrefs"]), result["hrefs"]


def render(page, texts: list[str]) -> list[str]:
    return page.evaluate("""async (texts) => {
        const {renderMarkdown} = await import('/ui/markdown.js');
        return texts.map((text) => { const box = document.createElement('div'); box.append(renderMarkdown(text));
                                     return box.innerHTML; });
    }""", texts)


# ---------------------------------------------------------------------------- conversations


def test_reload_keeps_the_conversation(context, tiny):
    page = hello_exchange(context, tiny, "first question", max_tokens=3)
    before = page.inner_text("#messages")
    page.reload()
    page.wait_for_function("() => document.body.dataset.connected === 'true'")
    assert page.inner_text("#messages") == before and "Hello" in before
    assert page.input_value("#max_tokens") == "3"  # the conversation's settings came back too
    assert page.inner_text("#conversations li.active button.open") == "first question"


def test_export_then_import_restores_conversations(context, tiny):
    _, url, ids = tiny
    page = open_page(context, url)
    settings(page, **say_hello(ids, max_tokens=3, system="Be brief."))
    send(page, "one")
    wait_answers(page, 1)
    page.click("#new-chat")
    send(page, "two")
    wait_answers(page, 1)
    saved = stored(page)
    with page.expect_download() as download:
        page.click("#export")
    exported = download.value.path().read_text()
    assert json.loads(exported)["conversations"] == saved
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#conversations li.active button.delete")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#conversations li.active button.delete")
    assert stored(page) == [] or all(not c["messages"] for c in stored(page))
    import_file(page, exported.encode())
    page.wait_for_selector("#banner.info >> text=Imported 2 conversations.")
    assert sorted(stored(page), key=lambda c: c["id"]) == sorted(saved, key=lambda c: c["id"])
    page.click("#conversations li[data-id='%s'] button.open" % saved[-1]["id"])
    assert page.inner_text("article.user .body") == "one" and page.input_value("#system") == "Be brief."


def test_import_of_a_wrong_file_says_why_and_changes_nothing(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    before = stored(page)
    for content, reason in ((b"{not json", "not JSON"), (b'{"conversations": []}', "not a Quill conversation export"),
                            (json.dumps({"format": "quill-conversations", "conversations": [
                                {"messages": [{"role": "tool", "content": "x"}]}]}).encode(), "message 1")):
        import_file(page, content)
        page.wait_for_selector(f"#banner.error >> text={reason}")
        assert stored(page) == before


def test_rename_and_delete_a_conversation(context, tiny):
    page = hello_exchange(context, tiny, "keep me", max_tokens=2)
    page.click("#conversations li.active button.rename")
    page.fill("#conversations input.rename", "Renamed")
    page.press("#conversations input.rename", "Enter")
    assert page.inner_text("#conversations li.active button.open") == "Renamed" and stored(page)[0]["title"] == "Renamed"
    page.once("dialog", lambda dialog: dialog.dismiss())  # cancelled: nothing happens
    page.click("#conversations li.active button.delete")
    assert [c["title"] for c in stored(page)] == ["Renamed"]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#conversations li.active button.delete")
    assert "Renamed" not in [c["title"] for c in stored(page)]
    assert page.locator("article.message").count() == 0


# ------------------------------------------------------------------------------------- chatting


def test_regenerate_and_edit_resend_cut_the_conversation(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    requests = chat_requests(page)
    settings(page, max_tokens=4, seed=5)
    send(page, "first")
    wait_answers(page, 1)
    send(page, "second")
    wait_answers(page, 2)
    page.locator("article.assistant").nth(0).locator("button.regenerate").click()
    wait_answers(page, 1)
    assert [m["role"] for m in stored(page)[0]["messages"]] == ["user", "assistant"]
    assert requests[2]["messages"] == [{"role": "user", "content": "first"}]  # the history before that answer
    page.locator("article.user button.edit").click()
    page.fill("article.user textarea.edit-box", "first, edited")
    page.press("article.user textarea.edit-box", "Enter")
    wait_answers(page, 1)
    assert requests[3]["messages"] == [{"role": "user", "content": "first, edited"}]
    assert [m["content"] for m in stored(page)[0]["messages"]][0] == "first, edited"
    assert len(stored(page)[0]["messages"]) == 2


def test_settings_are_sent_and_empty_ones_show_the_servers_defaults(context, tiny):
    app, url, _ = tiny
    page = open_page(context, url)
    requests = chat_requests(page)
    assert page.get_attribute("#temperature", "placeholder") == "1 (server default)"
    assert page.get_attribute("#top_p", "placeholder") == "1 (server default)"
    assert page.get_attribute("#max_tokens", "placeholder") == f"{app.state.config.default_max_tokens} (server default)"
    assert page.get_attribute("#seed", "placeholder") == "random"
    send(page, "defaults")
    wait_answers(page, 1)
    assert requests[0].keys() == {"model", "messages", "stream", "stream_options"}  # nothing the user left empty
    assert requests[0]["model"] == "tiny" and requests[0]["stream_options"] == {"include_usage": True}
    settings(page, system="You are terse.", temperature=0.5, top_p=0.9, max_tokens=3, seed=7, extra={"top_k": 5})
    send(page, "set")
    wait_answers(page, 2)
    body = requests[1]
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"], body["top_k"]) == (0.5, 0.9, 3, 7, 5)
    settings(page, extra="not json")
    page.fill("#input", "blocked")
    page.press("#input", "Enter")
    assert page.is_visible("#settings-error") and "not JSON" in page.inner_text("#settings-error")
    assert len(requests) == 2 and page.input_value("#input") == "blocked"


def test_server_error_is_shown_under_the_answer(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    settings(page, temperature=5)
    send(page, "too hot")
    wait_answers(page, 1)
    assert "temperature" in page.inner_text("article.assistant .notice.error")


def test_enter_sends_and_shift_enter_adds_a_line(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    settings(page, max_tokens=2)
    page.click("#input")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator("article.message").count() == 0
    page.keyboard.press("Enter")
    wait_answers(page, 1)
    assert stored(page)[0]["messages"][0]["content"] == "line one\nline two"
    assert page.input_value("#input") == ""


def test_response_cache_hit_shows_in_the_stats(context, tiny):
    page = hello_exchange(context, tiny, f"cache me {time.time()}", temperature=0, max_tokens=3)
    assert "cache miss" in page.inner_text("article.assistant .stats")
    page.click("article.assistant button.regenerate")
    wait_answers(page, 1)
    stats = page.inner_text("article.assistant .stats")
    assert "cache hit" in stats and "saved $" in stats, stats


def test_api_key_is_asked_for_and_kept_for_the_session_only(context, tiny):
    app, url, ids = tiny
    config = app.state.config
    config.api_key = "sekret"
    try:
        page = context().new_page()
        page.goto(url)
        page.wait_for_selector("#auth-form:not([hidden])")
        assert "Incorrect or missing API key" in page.inner_text("#auth-message")
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        page.wait_for_function("() => document.body.dataset.connected === 'false'")
        assert page.is_visible("#auth-form")
        page.fill("#api-key", "sekret")
        page.press("#api-key", "Enter")
        page.wait_for_function("() => document.body.dataset.connected === 'true'")
        assert page.is_hidden("#auth-form")
        settings(page, **say_hello(ids, max_tokens=2))
        send(page, "with a key")
        wait_answers(page, 1)
        assert "Hello" in page.inner_text("article.assistant .body")
        with page.expect_request(lambda request: request.url.endswith("/metrics")) as scrape:
            pass  # the load panel's next poll
        assert scrape.value.headers.get("authorization") == "Bearer sekret"  # the key goes with every call
        assert page.evaluate("sessionStorage.getItem('quill.apiKey')") == "sekret"
        assert "sekret" not in page.evaluate("JSON.stringify(localStorage)")
        config.api_key = "rotated"  # a key that stops working mid-session brings the form back
        send(page, "again")
        wait_answers(page, 2)
        assert page.is_visible("#auth-form") and "API key" in page.inner_text("article.assistant >> nth=1")
    finally:
        config.api_key = None


def test_tool_calls_show_as_tool_calls(context, tiny):
    """The server does not stream tool calls yet; a stubbed stream in OpenAI's shape shows how the page
    renders them once it does: as a named block with the arguments, not as text."""
    _, url, _ = tiny
    page = open_page(context, url)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
    deltas = [{"role": "assistant", "content": None},
              {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
    send(page, "weather?")
    wait_answers(page, 1)
    block = page.locator("article.assistant .tool-call")
    assert block.locator(".tool-name").inner_text() == "Tool call: get_weather"
    assert json.loads(block.locator("code").inner_text()) == {"city": "Paris"}
    assert stored(page)[0]["messages"][1]["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]


def test_copy_buttons_copy_the_code_and_the_answer(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer = "Here:\n\n```python\nprint('hi')  # <b>\n```\n\nDone."
    export = {"format": "quill-conversations", "version": 1, "conversations": [{
        "id": "copy", "title": "copy", "messages": [{"role": "user", "content": "code?"},
                                                   {"role": "assistant", "content": answer}]}]}
    import_file(page, export)
    page.click("article.assistant .copy-code")
    page.wait_for_selector("article.assistant .copy-code >> text=Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('hi')  # <b>"
    page.click("article.assistant button.copy")
    page.wait_for_selector("article.assistant button.copy >> text=Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == answer


# ------------------------------------------------------------------------------------- layout


def test_phone_width_and_both_themes(context, tiny):
    _, url, _ = tiny
    page = open_page(context, url, viewport={"width": 390, "height": 760}, color_scheme="dark", is_mobile=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    sidebar = page.locator("#sidebar").bounding_box()
    assert sidebar["x"] + sidebar["width"] <= 0  # tucked away until asked for
    for selector in ("#input", "#send", "#menu"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 760, selector
    page.click("#menu")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    light_page = open_page(context, url, color_scheme="light")
    light = light_page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark != light and light == "rgb(255, 255, 255)"
