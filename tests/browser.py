"""A page opened in real headless Chromium (Debian's `chromium`), driven over the DevTools protocol on loopback,
with the network off: every http(s) request goes to a proxy on 127.0.0.1:9 (nothing listens there) and fails,
and so shows as a console error. Collects console errors, uncaught exceptions and failed loads, evaluates
scripts in the page, and saves a full-page screenshot. tests/ensure_chromium.sh installs chromium."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT = 90.0


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    results: list[object] = field(default_factory=list)  # of each script, in order


def require_chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (tests/ensure_chromium.sh installs Debian's package)")
    return CHROMIUM


def open_page(url: str, scripts: list[str], screenshot: Path, size: tuple[int, int] = (1600, 1200)) -> Page:
    """Load `url`, run each script (an expression; its value returned by value), screenshot the whole page."""
    binary = require_chromium()
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(proc)
        return asyncio.run(asyncio.wait_for(_drive(port, url, scripts, screenshot, size), TIMEOUT))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(proc: subprocess.Popen) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        if "DevTools listening on ws://" in line:
            return int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    raise AssertionError(f"chromium exited ({proc.wait()}) before opening its DevTools port")


async def _drive(port: int, url: str, scripts: list[str], screenshot: Path, size: tuple[int, int]) -> Page:
    import aiohttp

    page = Page()
    ids = itertools.count(1)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            loaded = asyncio.Event()

            async def call(method: str, **params: object) -> dict:
                n = next(ids)
                await ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    message = json.loads((await ws.receive()).data)
                    if message.get("id") == n:
                        if "error" in message:
                            raise AssertionError(f"{method}: {message['error']}")
                        return message["result"]
                    _event(message, page, loaded)

            for domain in ("Runtime", "Log", "Page"):
                await call(f"{domain}.enable")
            await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            while not loaded.is_set():
                _event(json.loads((await ws.receive()).data), page, loaded)
            for script in scripts:
                result = await call("Runtime.evaluate", expression=script, returnByValue=True)
                if "exceptionDetails" in result:
                    page.errors.append(f"evaluate: {result['exceptionDetails'].get('text')}")
                page.results.append(result["result"].get("value"))
            await asyncio.sleep(0.3)  # late console messages
            await call("Runtime.evaluate", expression="0")
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
    return page


def _event(message: dict, page: Page, loaded: asyncio.Event) -> None:
    method, params = message.get("method"), message.get("params", {})
    if method == "Page.loadEventFired":
        loaded.set()
    elif method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        page.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        page.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
        page.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
