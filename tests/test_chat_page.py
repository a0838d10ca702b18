"""The server's chat page at /, in a real headless browser: Debian's Chromium driven by selenium
through Debian's chromedriver. Two turns stream in with a tokens/s figure, the Stop button ends a
generation on the server, and what is typed or generated shows as text, never as HTML. A screenshot
is kept in $MIXTRAL_EXT_ARTIFACTS (CI sets it), else in the test's temporary folder.

Skipped where Chromium or selenium is missing, unless MIXTRAL_EXT_REQUIRE_BROWSER=1 (CI), where that fails."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from test_server import KEY, metric, start_server, stop_server

REQUIRED = os.environ.get("MIXTRAL_EXT_REQUIRE_BROWSER") == "1"


def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and chromedriver):
        message = "needs selenium, and Chromium with chromedriver (apt-get install chromium chromium-driver)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    # The browser runs without the sanitizers' preloaded runtime (tests/run_sanitizers.sh), which is for our code.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    return webdriver.Chrome(service=Service(chromedriver, env=env), options=options)


def test_chat_page_streams_two_turns_and_stops(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    process, url = start_server(None, "--api-key", KEY, "--max-context", "4096")  # the demo model
    try:
        driver = browser()
    except BaseException:
        stop_server(process)
        raise
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.execute_script("maxTokens = 64")  # short turns (the page's own choice is checked below)

        def say(text: str, turns: int) -> str:
            driver.find_element(By.ID, "prompt").send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 60).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turns)
            return driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text

        first = say("<b>Hello</b> & <script>alert(1)</script>", 1)
        user = driver.find_element(By.CSS_SELECTOR, ".user")
        assert user.text == "<b>Hello</b> & <script>alert(1)</script>"
        assert not user.find_elements(By.TAG_NAME, "b") and not user.find_elements(By.TAG_NAME, "script")
        assert first and not driver.find_elements(By.CSS_SELECTOR, ".error")
        assert "tokens/s" in driver.find_element(By.ID, "stats").text
        second = say("And then?", 2)
        assert second and len(driver.find_elements(By.CSS_SELECTOR, ".user")) == 2
        assert all(not e.find_elements(By.XPATH, "./*") for e in driver.find_elements(By.CSS_SELECTOR, ".turn"))
        driver.save_screenshot(os.path.join(os.environ.get("MIXTRAL_EXT_ARTIFACTS", str(tmp_path)), "chat_page.png"))

        # The page's reply length: 512 tokens, or a quarter of the context when that is shorter.
        assert driver.execute_script("maxTokens = null; return replyLength({'Authorization': 'Bearer %s'})" % KEY) == 512
        # Stop: a 3,000-token answer (seconds), stopped by a click on Stop as soon as its first text shows
        # (made in the page, so that a slow machine's webdriver round trips cannot come too late).
        driver.find_element(By.ID, "reset").click()
        driver.execute_script("""
            maxTokens = 3000;
            new MutationObserver((changes, observer) => {
              const reply = document.querySelector(".assistant");
              if (reply && reply.textContent) { observer.disconnect(); document.getElementById("stop").click(); }
            }).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});""")
        driver.find_element(By.ID, "prompt").send_keys("Tell me a long story.")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        stats = driver.find_element(By.ID, "stats").text
        assert "stopped" in stats, stats
        deadline = time.monotonic() + 10
        while metric(url, "mixtral_ext_requests_running") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "mixtral_ext_requests_running") == 0
        assert metric(url, "mixtral_ext_kv_cache_usage_ratio") == 0  # the stopped generation kept no pages
    except BaseException:
        print("the page:", driver.find_element(By.TAG_NAME, "body").text[-2000:])
        driver.save_screenshot(os.path.join(os.environ.get("MIXTRAL_EXT_ARTIFACTS", str(tmp_path)), "chat_page_failed.png"))
        raise
    finally:
        driver.quit()
        stop_server(process)
