"""The dashboard in a real headless browser (Debian's chromium and chromedriver, driven by
Selenium) against the real deployment: sign in, watch a running batch's bar move, cancel
it, open a finished batch and download its output, see the workers and models. Each test
saves screenshots under its tmp dir."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.batch_flow import create_batch, read_lines, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # the network cut: no name resolves but the deployment's address, so a page that
    # needed a CDN would not render
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-gpu",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations
    # the Debian driver that matches the browser: nothing is downloaded
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def dashboard(deployment: Deployment) -> str:
    return deployment.base_url.removesuffix("/v1") + "/dashboard"


def sign_in(browser: WebDriver, deployment: Deployment, key: str) -> None:
    browser.get(dashboard(deployment) + "#/batches")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(lambda: browser.find_element(By.ID, "signin-key").is_displayed(), 30,
               "the sign-in form")
    browser.find_element(By.ID, "signin-key").send_keys(key)
    browser.find_element(By.ID, "signin-button").click()
    wait_until(lambda: browser.find_element(By.ID, "batches").is_displayed(), 30,
               "the batches view")


def row_of(browser: WebDriver, batch_id: str) -> dict[str, str] | None:
    """A batch's row as shown, read in one call (the table is drawn anew every second)."""
    found: dict[str, str] | None = browser.execute_script(
        "const r = document.querySelector(`#batches-table tr[data-id='${arguments[0]}']`);"
        "return r && {status: r.dataset.status, done: r.dataset.done,"
        " bar: r.querySelector('.bar .done').style.width};", batch_id)
    return found


def open_batch(browser: WebDriver, batch_id: str) -> None:
    """Click the batch's link in the list (found and clicked in one call: see row_of)."""
    browser.execute_script(
        "document.querySelector(`#batches-table a[href='#/batch/${arguments[0]}']`).click()",
        batch_id)


def text_of(browser: WebDriver, selector: str) -> str:
    """The text of the first element matching, read in one call."""
    found: str | None = browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.innerText;", selector)
    return found or ""


def test_sign_in_watch_a_bar_move_and_cancel(browser: WebDriver, deployment: Deployment,
                                             client: OpenAI, model: str,
                                             tmp_path: Path) -> None:
    """Eight short lines finish at once; two that must generate 1,500 tokens each keep the
    batch running on any machine until the Cancel button ends them: the bar shows the short
    ones done while it runs, then every line once cancelled."""
    browser.get(dashboard(deployment))
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(lambda: browser.find_element(By.ID, "signin-key").is_displayed(), 30, "sign-in")
    browser.find_element(By.ID, "signin-key").send_keys("sk-not-a-key")
    browser.find_element(By.ID, "signin-button").click()
    wait_until(lambda: "not accepted" in browser.find_element(By.ID, "signin-error").text, 30,
               "the refusal")
    browser.save_screenshot(str(tmp_path / "signin-refused.png"))
    sign_in(browser, deployment, deployment.api_key)

    lines = [chat_line(f"s{i}", model, f"Say {i}.", max_tokens=4) for i in range(8)]
    lines += [chat_line(f"long{i}", model, "Tell a tale.", max_tokens=1500, min_tokens=1500)
              for i in range(2)]
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", lines))
    seen: list[int] = []

    def running_with_short_ones_done() -> bool:
        row = row_of(browser, batch.id)
        if row is None:
            return False
        if not seen or seen[-1] != int(row["done"]):
            seen.append(int(row["done"]))
        return row["status"] == "in_progress" and int(row["done"]) == 8

    wait_until(running_with_short_ones_done, 120, "the short lines on the bar")
    browser.save_screenshot(str(tmp_path / "batches-running.png"))
    assert (row_of(browser, batch.id) or {})["bar"] == "80%"

    open_batch(browser, batch.id)
    wait_until(lambda: browser.find_element(By.ID, "batch-id").text == batch.id, 30,
               "the batch view")
    cancel = browser.find_element(By.ID, "cancel-button")
    wait_until(lambda: cancel.is_enabled(), 30, "Cancel to be enabled")
    cancel.click()
    browser.switch_to.alert.accept()
    wait_until(lambda: browser.find_element(By.ID, "batch-status").text == "cancelled", 120,
               "the batch to be cancelled")
    wait_until(lambda: browser.find_element(By.ID, "batch-bar").get_attribute("data-done")
               == "10", 30, "every line on the bar")
    browser.save_screenshot(str(tmp_path / "batch-cancelled.png"))
    assert seen[-1] == 8 and seen == sorted(seen)  # the bar only ever moved forward
    assert client.batches.retrieve(batch.id).status == "cancelled"
    assert "batch_cancelled\t2" in text_of(browser, "#line-errors")
    assert browser.find_element(By.ID, "retry-button").is_enabled()


def test_open_a_finished_batch_and_download_its_output(browser: WebDriver,
                                                      deployment: Deployment,
                                                      client: OpenAI, model: str,
                                                      tmp_path: Path) -> None:
    lines = [chat_line(f"d{i}", model, f"Name a colour, {i}.", max_tokens=6) for i in range(3)]
    lines.append(chat_line("bad", model, "x", temperature=-1))  # vLLM refuses it
    batch = wait_done(client, create_batch(client, write_jsonl(tmp_path / "in.jsonl",
                                                                lines)).id)
    assert batch.status == "completed"
    sign_in(browser, deployment, deployment.api_key)
    wait_until(lambda: row_of(browser, batch.id), 30, "the batch in the list")
    open_batch(browser, batch.id)
    wait_until(lambda: browser.find_element(By.ID, "download-output").is_displayed(), 30,
               "the download link")
    browser.save_screenshot(str(tmp_path / "batch-completed.png"))
    assert browser.find_element(By.ID, "batch-status").text == "completed"
    timeline = text_of(browser, "#timeline")
    for event in ("created", "in progress", "finalizing", "completed"):
        assert event in timeline
    assert text_of(browser, "#line-examples tbody").startswith("bad\t")
    assert "priority\n0" in text_of(browser, "#details")
    # the link is pre-signed: it works without a key, and holds exactly the output file
    href = browser.find_element(By.ID, "download-output").get_attribute("href") or ""
    downloaded = httpx.get(href, timeout=30)
    assert downloaded.status_code == 200
    expected = read_lines(client, batch.output_file_id)
    got = [json.loads(x) for x in downloaded.text.splitlines()]
    assert [x["custom_id"] for x in got] == [x.custom_id for x in expected]
    assert sorted(x["custom_id"] for x in got) == ["d0", "d1", "d2"]

    # a project's key sees its own batches only; the admin key sees every project's
    minted = httpx.post(deployment.base_url.removesuffix("/v1") + "/admin/api-keys",
                        json={"project": "dash-other"}, timeout=30,
                        headers={"Authorization": f"Bearer {deployment.api_key}"}).json()
    other = OpenAI(base_url=deployment.base_url, api_key=minted["key"], max_retries=0)
    theirs = create_batch(other, write_jsonl(tmp_path / "theirs.jsonl", lines[:1]))
    sign_in(browser, deployment, minted["key"])
    wait_until(lambda: row_of(browser, theirs.id), 30, "their batch")
    assert row_of(browser, batch.id) is None
    assert "project dash-other" in browser.find_element(By.ID, "who").text
    sign_in(browser, deployment, deployment.api_key)
    wait_until(lambda: row_of(browser, theirs.id) and row_of(browser, batch.id), 30,
               "both projects' batches")
    browser.save_screenshot(str(tmp_path / "batches-admin.png"))


def test_workers_and_models(browser: WebDriver, deployment: Deployment, model: str,
                            embedding_model: str, tmp_path: Path) -> None:
    sign_in(browser, deployment, deployment.api_key)
    browser.find_element(By.LINK_TEXT, "Workers & models").click()
    wait_until(lambda: text_of(browser, "#workers-table tr[data-worker]"), 60,
               "a worker's report")
    models = text_of(browser, "#models-table")
    assert model in models and embedding_model in models
    worker = text_of(browser, "#workers-table tr[data-worker]")
    assert worker.startswith("worker@") and model in worker
    # the chart draws from the workers' history: a point every 10 s
    wait_until(lambda: int(browser.find_element(By.ID, "throughput-chart")
                           .get_attribute("data-points") or 0) >= 1, 60, "a throughput point")
    assert browser.find_elements(By.CSS_SELECTOR, "#throughput-chart canvas")
    browser.save_screenshot(str(tmp_path / "workers.png"))


def csp_violations(browser: WebDriver) -> list[str]:
    return [e["message"] for e in browser.get_log("browser")
            if "Content Security Policy" in e["message"]]


@pytest.mark.parametrize(("page", "shown"), [
    ("/docs", ".swagger-ui .info .title"),  # Swagger UI rendered the document
    ("/redoc", "h1"),  # ReDoc rendered it
])
def test_the_api_docs_render_offline_under_the_csp(
        browser: WebDriver, deployment: Deployment, page: str, shown: str,
        tmp_path: Path) -> None:
    browser.get_log("browser")  # what earlier pages said
    browser.get(deployment.base_url.removesuffix("/v1") + page)
    title = wait_until(lambda: (found := browser.find_elements(By.CSS_SELECTOR, shown))
                       and found[0].text, 60, f"{page} to render")
    browser.save_screenshot(str(tmp_path / f"{page.strip('/')}.png"))
    assert title.startswith("millrace"), title
    assert csp_violations(browser) == []


def test_the_dashboard_runs_under_the_csp(browser: WebDriver, deployment: Deployment) -> None:
    browser.get_log("browser")
    sign_in(browser, deployment, deployment.api_key)  # its scripts ran: the view is shown
    assert csp_violations(browser) == []
