"""The dashboard in a real browser. Headless Chromium (the system's `chromium`, driven by Playwright)
opens /scope on a live server with the embedded model, submits a burst from the lab panel, and sees
the block grid, the queues and the charts change as the requests run, with no console error. The
run is recorded; replayed, the trace draws the same block grid at each step the live view showed,
and play / step work. A screenshot is saved (to $SCOPE_SCREENSHOT if set, e.g. docs/scope.png)."""
from __future__ import annotations

import os
import shutil
import time

import pytest
from loopback import serving
from test_server import running_server

from inferlab.scope.recorder import Recorder
from inferlab.scope.replay import build_replay_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SAMPLE = """() => { const f = scope.state.frame, c = scope.state.charts; return {
  step: f.step, grid: scope.gridImage(), running: f.num_running, waiting: f.num_waiting,
  listed: document.querySelectorAll('#q-running li').length, batch: c.batch.data[0].length,
  rate: c.rate.data[0].length, ttft: f.latency.ttft.reduce((a, b) => a + b, 0),
  tput: Number(document.getElementById('t-tput').textContent) }; }"""


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        pytest.skip("the dashboard test needs Chromium: `apt-get install chromium` (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/scope")
    page.wait_for_function("window.scope && scope.ready && scope.state.frame !== null")
    return page, errors


def test_live_dashboard_follows_a_burst_and_replay_draws_the_same_grid(chromium, smol, tmp_path):
    trace = str(tmp_path / "trace.jsonl")
    with running_server(smol, num_kv_blocks=64) as server:
        # The engine thread is idle (nothing submitted yet), so the recorder can join from here.
        recorder = Recorder(server.engine.engine, trace)
        page, errors = open_page(chromium, server.url)
        idle = page.evaluate(SAMPLE)
        assert idle["running"] == idle["listed"] == 0
        page.fill("input[name=count]", "6")
        page.fill("input[name=prompt_len]", "160")
        page.fill("input[name=output_len]", "40")
        page.click("#lab-form button[type=submit]")
        page.wait_for_function("document.getElementById('lab-result').textContent.startsWith('submitted 6')")
        samples, shot = [], os.environ.get("SCOPE_SCREENSHOT") or str(tmp_path / "scope.png")
        deadline = time.monotonic() + 120
        while not (samples and samples[-1]["running"] == samples[-1]["waiting"] == 0 and samples[-1]["ttft"] == 6):
            assert time.monotonic() < deadline, f"the burst did not finish on the page: {samples[-1:]}"
            page.wait_for_timeout(100)
            samples.append(page.evaluate(SAMPLE))
            if samples[-1]["running"] and samples[-1]["batch"] >= 8 and not os.path.exists(shot):
                page.hover("#grid", position={"x": 4, "y": 4})  # block 0: the shared system prompt's first
                tip = page.inner_text("#tip")
                assert tip.startswith("block 0: ref count ") and "owner" in tip and "hash " in tip, tip
                page.screenshot(path=shot, full_page=True)
        server.wait_idle()
        recorder.close()  # idle again: no step runs
        page.fill("input[name=output_len]", "200")
        page.evaluate("document.getElementById('lab-result').textContent = ''")
        page.click("#lab-form button[type=submit]")
        page.wait_for_function("document.getElementById('lab-result').textContent.startsWith('submitted 6')")
        page.click("#lab-cancel")  # the lab's requests are aborted at once
        page.wait_for_function("document.getElementById('lab-result').textContent.startsWith('cancelled ')")
        assert int(page.inner_text("#lab-result").split()[1]) > 0
        server.wait_idle()
        page.close()
    busy = [s for s in samples if s["running"]]
    assert busy and all(s["listed"] == s["running"] for s in busy)  # the queue lists what runs
    assert len({s["grid"] for s in busy}) >= 2 and idle["grid"] not in {s["grid"] for s in busy}
    assert samples[-1]["batch"] > busy[0]["batch"] and samples[-1]["rate"] > idle["rate"]
    assert max(s["tput"] for s in samples) > 0
    assert os.path.getsize(shot) > 10_000
    assert errors == []

    with serving(build_replay_app(trace)) as url:
        page, errors = open_page(chromium, url)
        for s in busy:
            assert page.evaluate(f"scope.seekStep({s['step']})") == s["step"]
            assert page.evaluate("scope.gridImage()") == s["grid"], f"replay differs from live at step {s['step']}"
        page.click("#r-next")
        assert page.evaluate("scope.state.frame.step") == busy[-1]["step"] + 1
        page.select_option("#r-speed", "16")
        page.click("#r-play")
        page.wait_for_function("document.getElementById('r-label').textContent.startsWith("
                               "`frame ${scope.frames.length} /`)")
        assert page.input_value("#r-slider") == str(len(page.evaluate("scope.frames")) - 1)
        assert errors == []
