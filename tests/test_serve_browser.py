"""The chat page, end to end in headless Chromium: type, send, watch the reply stream in.

Playwright drives Debian's `/usr/bin/chromium` (it never downloads a browser). On a
developer machine without chromium the test skips; `.ci/run` installs chromium, and under
CI=true a skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmscratch import GPT, GPTConfig, get_tokenizer
from llmscratch.checkpoints.run import save_model
from llmscratch.serve import BackgroundServer, create_app, load_engine

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():  # one skip for the file, not one per test
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def _need(condition: bool, why: str) -> None:
    if not condition:
        pytest.skip(why)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    run = tmp_path_factory.mktemp("browser-run")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny")), run, get_tokenizer("gpt2"), extra={"template": "alpaca"})
    engine = load_engine(str(run), device="cpu", max_concurrency=2, max_tokens_limit=256)
    with BackgroundServer(create_app(engine)) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


def test_chat_page_streams_a_reply_and_keeps_the_conversation(browser, page_url):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(page_url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'browser-run0'")
    # a tiny model writes 40 tokens faster than the page repaints, which can merge the stream
    # into two updates; a slow link (Chrome's network emulation) spreads the chunks out
    page.context.new_cdp_session(page).send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": 4000, "uploadThroughput": -1})

    # the sampling settings are on the page; make the reply long and random
    page.fill("#max_tokens", "40")
    page.fill("#top_k", "0")
    page.fill("#seed", "3")
    # record every length the reply bubble passes through: streaming shows many
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant:last-of-type');
            if (b) window.lengths.push(b.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "Write a short poem about the sea.")
    page.press("#prompt", "Enter")

    bubble = page.locator(".msg.assistant").first
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "!document.querySelector('.msg.assistant').dataset.streaming", timeout=30_000)
    reply = bubble.inner_text()
    assert reply.strip(), "no text arrived"
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if n > 0}) >= 3, f"reply did not stream: {lengths}"
    assert page.locator(".msg.user").first.inner_text() == "Write a short poem about the sea."
    first = bodies[0]
    assert first["stream"] is True and first["max_tokens"] == 40 and first["seed"] == 3
    assert first["temperature"] == 0.8 and first["top_p"] == 1 and "top_k" not in first

    # a second message sends the whole conversation back
    page.fill("#prompt", "Another one.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.querySelectorAll('.msg.assistant')[1].dataset.streaming", timeout=30_000)
    roles = [m["role"] for m in bodies[1]["messages"]]
    assert roles == ["user", "assistant", "user"]

    # a conversation past the context window (128 tokens here): the server says
    # context_length_exceeded, the page drops the oldest exchanges and retries
    long = " ".join(["waves"] * 70)
    page.fill("#prompt", long)
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 3 && "
                           "!document.querySelectorAll('.msg.assistant')[2].dataset.streaming", timeout=30_000)
    tries = [[m["role"] for m in b["messages"]] for b in bodies[2:]]
    assert tries[0] == ["user", "assistant"] * 2 + ["user"] and tries[-1] == ["user"]
    assert "left out" in page.locator(".msg.assistant").nth(2).inner_text()
    assert not errors and not page.locator(".msg.error").count()
    page.close()


def test_chat_page_shows_an_error_instead_of_failing_silently(browser, page_url):
    page = browser.new_page()
    page.goto(page_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.evaluate("document.getElementById('max_tokens').removeAttribute('max')")
    page.fill("#max_tokens", "100000")  # above the server's limit
    page.fill("#prompt", "hello")
    page.click("#send")
    err = page.locator(".msg.error")
    err.wait_for(timeout=10_000)
    assert "limit" in err.inner_text()
    assert page.locator(".msg.assistant").count() == 0  # the empty bubble is removed
    page.close()


def test_chat_page_says_what_the_model_is_and_asks_for_the_key(browser, tmp_path):
    run = tmp_path / "base-run"  # pretrained only: no template recorded
    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny")), run, get_tokenizer("gpt2"))
    engine = load_engine(str(run), device="cpu", max_tokens_limit=1024)
    with BackgroundServer(create_app(engine, api_key="s3cret")) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
        assert "needed" in page.get_attribute("#api_key", "class")
        page.fill("#api_key", "s3cret")
        page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.getElementById('model').textContent === 'base-run'")
        assert "not instruction-tuned" in page.inner_text("#kind")
        hint = page.inner_text("#log .empty")  # before anything is typed
        assert "base language model" in hint and "template plain" in hint and "context 128 tokens" in hint
        assert page.get_attribute("#max_tokens", "max") == "128"  # bounded by the context, not 1024
        page.fill("#top_k", "-3")
        page.fill("#prompt", "hello")
        page.click("#send")
        err = page.locator(".msg.error")
        err.wait_for(timeout=10_000)
        assert "top_k" in err.inner_text()  # the server's one rule, one line
        page.close()
