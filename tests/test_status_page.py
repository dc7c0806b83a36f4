"""
The status page in a real browser: Debian's chromium driven by playwright,
against C{twistd rproxy} with two origins, as one process and as a supervisor
with two workers (whose health checks the supervisor runs); one origin stops
and its row turns red.

RPROXY_SCREENSHOT=docs/status-page.png saves the screenshot the README shows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from .conftest import free_port

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]


def _browser_or_skip() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install '.[test]')")
    return sync_playwright


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            time.sleep(0.05)
    raise AssertionError("twistd did not listen")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_status_page_shows_every_backend_and_turns_a_stopped_one_red(tmp_path, workers: int) -> None:
    sync_playwright = _browser_or_skip()
    from .test_reload import _NamedOrigin

    web = [_NamedOrigin(b"web-1"), _NamedOrigin(b"web-2")]
    api = _NamedOrigin(b"api-1")
    port, admin = free_port(), free_port()
    config = tmp_path / "rproxy.toml"
    config.write_text(f"""
[server]
access_log = "off"
workers = {workers}

[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"

[[listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[route]]
path = "/"
pool = "web"

[[route]]
path = "/api/"
pool = "api"

[pool.web]
backends = ["tcp:127.0.0.1:{web[0].port}", "tcp:127.0.0.1:{web[1].port}"]
health = {{ type = "tcp", interval = 0.3, timeout = 0.5, fall = 1, rise = 1 }}

[pool.api]
backends = ["tcp:127.0.0.1:{api.port}"]
""")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "rproxy", "--config",
         str(config)], cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_port(admin, proc)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
                page.goto(f"http://127.0.0.1:{admin}/")
                rows = page.locator("tr.backend")
                rows.nth(2).wait_for(timeout=30000)
                shown = sorted(rows.nth(i).get_attribute("data-backend") or "" for i in range(rows.count()))
                assert shown == sorted(f"tcp:127.0.0.1:{o.port}" for o in (*web, api))
                assert page.locator('section[data-pool="web"]').is_visible()
                assert page.locator('section[data-pool="api"]').is_visible()
                assert page.locator("tr.backend.down").count() == 0
                web[1].sock.close()  # the origin stops: its health checks fail
                stopped = page.locator(f'tr[data-backend="tcp:127.0.0.1:{web[1].port}"][data-state="down"]')
                stopped.wait_for(timeout=30000)
                colour = stopped.locator("td").first.evaluate("e => getComputedStyle(e).borderLeftColor")
                assert colour == "rgb(207, 34, 46)"  # red
                up = page.locator(f'tr[data-backend="tcp:127.0.0.1:{web[0].port}"]')
                assert up.get_attribute("data-state") == "up"
                assert page.locator("tr.backend.down").count() == 1
                shot = os.environ.get("RPROXY_SCREENSHOT")
                if shot and workers == 1:
                    import threading

                    def traffic() -> None:
                        end = time.monotonic() + 5
                        while time.monotonic() < end:
                            for target in (b"/", b"/api/x"):
                                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                                    s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                                    while s.recv(65536):
                                        pass

                    loader = threading.Thread(target=traffic)
                    loader.start()
                    page.set_viewport_size({"width": 900, "height": 620})
                    time.sleep(4.5)  # polls during traffic: rates shown
                    page.screenshot(path=shot, full_page=True)
                    loader.join()
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        for origin in (*web, api):
            origin.sock.close()
