"""The chat page of `serve`, in a real headless Chromium (Debian's chromium + chromedriver, driven
by selenium): it shows the model's name and version, streams an answer equal to what the API gives
for the same conversation, reports tokens/s, its Stop button ends an answer and frees the slot, and
it loads nothing from anywhere but the server.

The screenshot in the README (docs/chat-page.png) is this test's: run it with
MINILM_EDGE_SCREENSHOT=docs/chat-page.png to write it there.
"""
import contextlib
import os
import shutil
import threading
import time
import urllib.request

import openai
import pytest
from conftest import skip_or_fail

from minilm_edge.app.serve import Engine, Limits, Server, model_version

pytestmark = pytest.mark.real_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 180         # seconds the page may take to answer on a busy 2-core machine
# Without the background-networking flags Chromium keeps trying to reach Google's services, which
# hangs it on a closed network.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,760"]


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        skip_or_fail("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def running(model, name, version):
    engine = Engine(model, Limits(max_tokens=200))
    httpd = Server(("127.0.0.1", 0), engine, name, version, None, log=open(os.devnull, "w"))
    loop = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    loop.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", engine
    finally:
        engine.close(0)
        httpd.shutdown()
        httpd.server_close()


def wait_for(driver, script, what, timeout=WAIT):
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"the page did not show {what} within {timeout} s")
        time.sleep(0.1)


def ask(driver, question):
    from selenium.webdriver.common.by import By
    n = len(driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    driver.find_element(By.ID, "input").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait_for(driver, f"return document.querySelectorAll('.assistant').length > {n}", "an answer bubble", 30)
    return f"document.querySelectorAll('.assistant')[{n}]"


def test_chat_page_streams_the_answer_the_api_gives(browser, real_model, real_model_dir, tmp_path):
    name, version = real_model_dir.name, model_version(real_model_dir)
    question = "What is the capital of France?"
    with running(real_model, name, version) as (url, engine):
        browser.get(url + "/")
        header = wait_for(browser, "return document.getElementById('model').dataset.ready &&"
                                   " document.getElementById('model').textContent", "the model's name", 60)
        assert header == f"{name} · {version}"

        bubble = ask(browser, question)
        wait_for(browser, f"return {bubble}.dataset.state === 'done'", "the finished answer")
        shown = browser.execute_script(f"return {bubble}.textContent")
        speed = browser.execute_script("return document.getElementById('speed').textContent")

        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=WAIT)
        expected = api.chat.completions.create(model=name, messages=[{"role": "user", "content": question}])
        assert shown and shown == expected.choices[0].message.content
        assert "Paris" in shown
        assert f"{expected.usage.completion_tokens} tokens" in speed and "tokens/s" in speed

        # Stop: a long answer is cut by the button, and its slot is freed on the server
        bubble = ask(browser, "Write a long story about a dragon who learns to bake bread.")
        wait_for(browser, f"return {bubble}.textContent.length > 0", "the start of the second answer")
        browser.find_element("id", "stop").click()
        wait_for(browser, "return [...document.querySelectorAll('.note')].some(n => n.textContent === '(stopped)')",
                 "the answer stopped", 30)
        assert browser.execute_script(f"return {bubble}.dataset.state") == "done"
        end = time.monotonic() + 30
        while engine.counts() != (0, 0) and time.monotonic() < end:
            time.sleep(0.1)
        assert engine.counts() == (0, 0), "the stopped answer still holds its slot"

        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(url + "/") for r in resources), resources
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        shot = os.environ.get("MINILM_EDGE_SCREENSHOT")
        assert browser.save_screenshot(shot or str(tmp_path / "chat-page.png"))
