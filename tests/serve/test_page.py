"""The page in a real headless browser (Debian's chromium and chromium-driver, through
selenium): a prompt streams text in, a session is made, continued and forked."""

from __future__ import annotations

import shutil

import pytest

from servers import start_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (.ci/run installs them)"
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_the_page_streams_a_completion_and_works_a_session(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server(tmp_path / "data")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.url)
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("def fibonacci(n):\n")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_element(By.ID, "output").text) >= 20)

        browser.find_element(By.ID, "new-session").click()
        wait.until(lambda d: d.find_element(By.ID, "current-id").text.startswith("sess_"))
        first = browser.find_element(By.ID, "current-id").text
        browser.find_element(By.ID, "to-session").click()  # the prompt read into the session, then continued
        wait.until(lambda d: int(d.find_element(By.ID, "current-position").text.replace(",", "")) > 18)
        browser.find_element(By.ID, "fork").click()
        wait.until(lambda d: d.find_element(By.ID, "current-id").text not in ("", first))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#session-list li")) == 2)
        assert browser.find_element(By.ID, "status").text == ""
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        server.stop()
