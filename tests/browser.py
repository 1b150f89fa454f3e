"""A headless Chromium driven over the DevTools protocol, for the playground test.

Why not `chromium --dump-dom --virtual-time-budget=...`: tried first, it dumps the page while the
streamed `/v2/rerank` answer is still in flight (virtual time does not wait for a streaming fetch), so
the test would read a half-drawn page. The protocol lets the test wait for what the page itself says
(`body[data-state]`), read the DOM, and take a screenshot, with nothing but `websockets` (already a
Ray Serve dependency) and the Debian `chromium` package.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from conftest import free_port

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_or_install_chromium() -> tuple[str | None, str]:
    """The browser binary, installing Debian's `chromium` with apt (as the README's set-up does) when
    running as root and none is present. Returns (binary, why not) with binary None when there is none."""
    for name in BINARIES:
        if shutil.which(name):
            return shutil.which(name), ""
    if not shutil.which("apt-get"):
        return None, "no chromium binary and no apt-get to install one"
    if os.geteuid() != 0:
        return None, "no chromium binary, and not root to `apt-get install -y chromium`"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = ""
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        out = (proc.stdout + proc.stderr)[-400:]
        if shutil.which("chromium"):
            return shutil.which("chromium"), ""
    return None, f"`apt-get install -y chromium` did not install a browser: {out}"



class Browser:
    """One headless Chromium with one page; `open` navigates and waits for a JS condition."""

    def __init__(self, binary: str, profile_dir: Path, width: int = 1200, height: int = 1600):
        from websockets.sync.client import connect

        port = free_port()
        self._log = open(profile_dir / "chromium.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir / 'profile'}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline, pages = time.monotonic() + 60, []
        while time.monotonic() < deadline and not pages:
            try:
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                         if t["type"] == "page"]
            except httpx.HTTPError:
                time.sleep(0.2)
        if not pages:
            self.close()
            raise RuntimeError(f"chromium did not open its DevTools port; see {profile_dir / 'chromium.log'}")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30))
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:  # anything else is an event we did not ask to wait for
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, until: str = "['done', 'error'].includes(document.body && document.body.dataset.state)",
             timeout: float = 90) -> None:
        """Navigate to `url` and wait until the JS expression `until` is true in the page."""
        self.evaluate("window.__left = true")  # the next document has a fresh window without it
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"!window.__left && !!({until})"):
                    return
            except RuntimeError:  # the page is between documents
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{url}: {until!r} not true after {timeout}s; state "
                           f"{self.evaluate('document.body && document.body.dataset.state')!r}")

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "_stack", None) is not None:
                self._stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._log.close()
