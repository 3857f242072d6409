"""A real headless browser for tests: Chromium (Debian's `chromium` package) driven over the DevTools
protocol through `--remote-debugging-pipe` (NUL-separated JSON on file descriptors 3 and 4; the
standard library is enough, no websocket, no port).

`render(page)` loads a local page, waits for its load event, and returns what a person would have
seen: a full-page PNG, every console error, uncaught exception and failed resource load the page
caused (the DevTools console's red lines), whether each image decoded, and any values the caller
asks the page for. Chromium's own stderr (D-Bus, GPU probing) is never mistaken for the page's.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


@dataclass
class Rendered:
    png: bytes  # the whole page, captured beyond the viewport
    errors: list[str]  # console errors, uncaught exceptions, failed loads: "source: text (url)"
    images: list[tuple[str, bool]]  # (src, decoded with a non-zero width)
    values: dict[str, Any] = field(default_factory=dict)  # the caller's expressions, evaluated


class DevTools:
    """One Chromium process and its DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        commands_r, self._commands = os.pipe()  # we write, Chromium reads fd 3
        self._answers, answers_w = os.pipe()  # Chromium writes fd 4, we read

        def onto_3_and_4() -> None:  # in the child: move the two ends (wherever they are) to 3 and 4
            read_end = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(answers_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        command += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            command,
            preexec_fn=onto_3_and_4,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(answers_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> dict:
        seen = next((e for e in self.events if e.get("method") == method and e.get("sessionId") == session), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                seen = event
        return seen

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer over the DevTools pipe")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium closed the DevTools pipe (exit status {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


def page_errors(events: list[dict]) -> list[str]:
    """What the DevTools console would show in red: console.error/assert, uncaught exceptions, and
    log entries of level error (failed loads of images, stylesheets, scripts)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(f"exception: {details.get('exception', {}).get('description', details['text'])}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            errors.append(f"{entry['source']}: {entry['text']} ({entry.get('url', '')})")
    return errors


def render(page: Path, *, width: int = 1400, evaluate: dict[str, str] | None = None) -> Rendered:
    """Load `page` (a local file) in headless Chromium and return the `Rendered` page; `evaluate`
    maps names to JavaScript expressions whose JSON values come back in `values`."""
    assert CHROMIUM, "no chromium on PATH (apt-get install chromium)"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = DevTools(Path(profile))
        try:
            target = next(t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
            session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log"):
                browser.send(f"{domain}.enable", session=session)
            metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
            browser.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
            browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            browser.wait_for("Page.loadEventFired", session)

            def value(expression: str) -> Any:
                result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
                return result["result"].get("value")

            images = [
                tuple(i) for i in value("[...document.images].map(i => [i.src, i.complete && i.naturalWidth > 0])")
            ]
            values = {name: value(expression) for name, expression in (evaluate or {}).items()}
            height = value("document.documentElement.scrollHeight")
            clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
            shot = browser.send(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}, session
            )
            return Rendered(base64.b64decode(shot["data"]), page_errors(browser.events), images, values)
        finally:
            browser.close()
