"""Open a generated page in a real headless Chromium (Debian's ``chromium``, installed by ``make browser``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Runs in the page after load: every <img> loaded (naturalWidth > 0), every larger view a click opens loads,
# and each confusion-matrix link leads to a section whose images are of that cell. The verdict is written
# into the DOM, where --dump-dom shows it.
CHECK = """<script>
window.addEventListener("load", async () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const zooms = await Promise.all([...document.querySelectorAll("a.zoom")].map(a => new Promise(done => {
    const probe = new Image();
    probe.onload = () => done({href: a.getAttribute("href"), ok: probe.naturalWidth > 0});
    probe.onerror = () => done({href: a.getAttribute("href"), ok: false});
    probe.src = a.href;
  })));
  const links = [...document.querySelectorAll("a.cell-link")].map(a => {
    const target = document.getElementById(a.getAttribute("href").slice(1));
    const tiles = target ? [...target.querySelectorAll("figure.tile")] : [];
    return {href: a.getAttribute("href"), count: Number(a.textContent), tiles: tiles.length,
            match: tiles.every(t => t.dataset.true === a.dataset.true && t.dataset.predicted === a.dataset.predicted),
            loaded: tiles.every(t => { const i = t.querySelector("img"); return !i || i.naturalWidth > 0; })};
  });
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({imgs, zooms, links});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """The Chromium executable, or skip with the reason (``make browser`` installs it)."""
    found = os.environ.get("TLPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium on PATH: `make browser` installs Debian's chromium (or set TLPIPE_CHROMIUM)")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"]
    base += ["--enable-logging=stderr", "--v=0", "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    env = os.environ | {"HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120, env=env, check=False)


def console_messages(stderr: str) -> list[str]:
    """Every console message Chromium logged for the page (headless logs them as ``INFO:CONSOLE`` whatever
    their level, uncaught exceptions included). The pages log nothing, so any message is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def check_page(index: Path, screenshot: Path) -> dict:
    """Open ``index`` from disk: the in-page verdict (images, larger views, confusion links), the console
    errors of the page itself, and a screenshot of it at ``screenshot``."""
    probe = index.with_name("_browser_check.html")  # beside the page: the same relative URLs
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    try:
        dumped = _run(["--dump-dom", probe.as_uri()])
    finally:
        probe.unlink()
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"the page's check did not run: {dumped.stderr[-2000:]}"
    import html as _html

    verdict = json.loads(_html.unescape(found.group(1)))
    shot = _run([f"--screenshot={screenshot}", "--window-size=1280,2400", index.as_uri()])
    verdict["console_errors"] = console_messages(dumped.stderr) + console_messages(shot.stderr)
    verdict["screenshot"] = screenshot if screenshot.is_file() else None
    return verdict
