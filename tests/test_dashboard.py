"""The dashboard (GET / on the coordinator's HTTP port) in a real headless chromium: while a
2-worker job runs, every worker's bar advances (live through SSE, no reload); the cancel button
cancels; an endless block_pipeline job shows its newest frame and a strip of thumbnails while it
runs (frames received in the jobs table too); an ended job's video plays. A screenshot of the growing
job goes to docs/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN, wait_until

pytestmark = pytest.mark.slow
# the README's screenshot: written there with CLIPMESH_DOCS_SCREENSHOT=1, else beside the test's files
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):  # `make test` installs both where it may (Debian: chromium, chromium-driver)
        pytest.skip("no chromium and chromedriver on this machine")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def steps_shown(browser) -> dict[str, int]:
    return {row.get_attribute("id")[5:]: int(row.get_attribute("data-step"))
            for row in browser.find_elements("css selector", "#ranks > div")}


def test_the_dashboard_follows_a_job_cancels_it_and_plays_a_video(daemons, browser, tmp_path):
    from selenium.webdriver.common.by import By

    port_file = daemons.tmp / "http.port"
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(port_file))
    for name in ("d0", "d1"):
        daemons.worker(name)
    with daemons.client() as client:
        daemons.wait_idle(client, {"d0", "d1"})
        browser.get(f"http://127.0.0.1:{port_file.read_text()}/?access_token={TOKEN}")
        wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#workers tr")) == 3, 20, "the workers listed")

        job = client.submit("a long walk", num_frames=33, num_inference_steps=60, num_workers=2, strategy="clip_parallel")
        wait_until(lambda: set(steps_shown(browser)) == {"d0", "d1"}, 60, "a bar per worker", daemons)
        first = steps_shown(browser)
        wait_until(lambda: all(steps_shown(browser)[w] > first[w] for w in first), 60, "every bar advancing", daemons)
        assert browser.find_element(By.ID, "job-id").text == job.id

        browser.find_element(By.ID, "cancel").click()
        wait_until(lambda: client.get(job.id).state == pb.CANCELLED, 30, "the cancel button's cancel", daemons)
        daemons.wait_idle(client, {"d0", "d1"}, timeout=30)

        # an endless block_pipeline job delivers each block's frames while the next ones denoise: the
        # video is seen growing, and the jobs table says how far it is (frames, not a share of none)
        growing = client.submit("an endless walk", num_frames=0, num_inference_steps=4, num_workers=2,
                                strategy="block_pipeline")

        def open_growing() -> bool:  # its row appears at the list's next refresh (every second), rebuilt each time
            browser.find_element(By.CSS_SELECTOR, f'tr.job[data-id="{growing.id}"]').click()
            return browser.find_element(By.ID, "job-id").text == growing.id
        wait_until(open_growing, 20, "the growing job's row, clicked", daemons)

        def preview_shown() -> bool:
            preview = browser.find_element(By.ID, "preview")
            return preview.is_displayed() and browser.execute_script(
                "const p = arguments[0]; return p.complete && p.naturalWidth === 64", preview)
        wait_until(preview_shown, 60, "a preview of the newest frame", daemons)
        wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#thumbs img")) >= 2, 30,
                   "a thumbnail per block landed", daemons)
        labels = [int(f.text) for f in browser.find_elements(By.CSS_SELECTOR, "#thumbs figcaption")]
        assert labels == sorted(set(labels)) and labels[-1] > 0, labels  # newer frames to the right

        def frames_in_table() -> int:
            row = browser.find_element(By.CSS_SELECTOR, f'tr.job[data-id="{growing.id}"]')
            frames, of = row.find_element(By.CSS_SELECTOR, "td.frames").text.split("/")
            assert of == "∞" and "streaming" in row.text  # not "0%": an endless job has no share done
            return int(frames)
        wait_until(lambda: frames_in_table() > 0, 20, "frames received in the jobs table", daemons)
        assert browser.find_element(By.ID, "grid").is_displayed()  # the window of blocks in flight
        assert client.get(growing.id).state == pb.RUNNING  # all of it seen while the job runs
        screenshot = DOCS_SCREENSHOT if os.environ.get("CLIPMESH_DOCS_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

        browser.find_element(By.ID, "cancel").click()
        wait_until(lambda: client.get(growing.id).state == pb.CANCELLED, 30, "the endless job cancelled", daemons)
        kept = client.get(growing.id).video_frames
        wait_until(lambda: browser.execute_script("const v = document.getElementById('player');"
                                                  "return v.readyState >= 2 && v.currentTime > 0"), 30,
                   "the ended job's video playing", daemons)
        duration = browser.execute_script("return document.getElementById('player').duration")
        assert kept > 0 and abs(duration - kept / 8) < 0.3, (duration, kept)  # the frames kept, at 8 fps
