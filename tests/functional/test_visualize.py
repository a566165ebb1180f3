"""tools/visualize_selection.py, token_dynamics.py and learning_curve.py end to end on tiny
checkpoints (one spawned process runs the tools' ``main``), and the HTML report in headless
Chromium (Debian's ``chromium``; skipped with the reason when absent).

- The marks equal the selection of the selective op (pure-torch kernels) on the model's own
  logits with the sidecar's reference losses, computed without the tool; the shown losses equal
  that forward's.
- In Chromium: no console error, no network request but the page itself, one token element per
  shown token, the marked ones = that selection, the hover box shows the token's numbers; a
  screenshot is saved (``$VISUALIZE_SCREENSHOT`` or the test's tmp dir).
- Bad input: a document index beyond the dataset, a dataset without a sidecar and no
  ``--slm-ref-load``: exit status 2, one line naming the flag.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time

import numpy as np
import pytest

from tests.dist_helpers import run_distributed
from tests.functional.visualize_worker import build_and_run

pytestmark = pytest.mark.slow
SHOWN = [0, 3, 5]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("visualize"))
    return run_distributed(build_and_run, 1, root, SHOWN)[0]


def _marks_from_html(text: str) -> dict[int, list[bool]]:
    out = {}
    for sec in re.finditer(r'<section class="doc" data-doc="(\d+)">(.*?)</section>', text, re.S):
        spans = re.findall(r'<span class="(tok(?: sel)?)"', sec.group(2))
        out[int(sec.group(1))] = [c == "tok sel" for c in spans]
    return out


def test_report_marks_equal_the_selective_op(result):
    rc, out, err = result["runs"]["html"]
    assert rc == 0, err
    text = open(result["html"], encoding="utf-8").read()
    marks = _marks_from_html(text)
    assert sorted(marks) == SHOWN
    for d in SHOWN:
        loss, selected = result["expected"][d]
        assert marks[d] == selected.tolist(), f"document {d}"
        assert 0 < sum(marks[d]) < len(marks[d])
        shown_losses = re.findall(
            r'data-loss="([\d.]+)"',
            re.search(rf'data-doc="{d}">(.*?)</section>', text, re.S).group(1),
        )
        np.testing.assert_allclose(np.array(shown_losses, float), loss, atol=1.5e-3)
    assert "http://" not in text and "https://" not in text and "src=" not in text


def test_png_and_bad_inputs(result):
    rc, out, err = result["runs"]["png"]
    assert rc == 0, err
    assert open(result["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for case, needle in (("bad_doc", "--docs 99"), ("no_ref", "--data-path")):
        rc, out, err = result["runs"][case]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (case, err)
        assert lines[0].startswith("visualize_selection: error: ") and needle in lines[0]
    assert "6 documents" in result["runs"]["bad_doc"][2]
    assert "sidecar" in result["runs"]["no_ref"][2]


def test_dynamics_and_curve_tools(result):
    rc, out, err = result["runs"]["dynamics"]
    assert rc == 0, err
    prefix = os.path.join(os.path.dirname(result["html"]), "dyn")
    summary = json.load(open(prefix + ".json"))
    assert summary["steps"] == [1, 2, 3]  # sorted by step whatever the order given
    assert sum(c["count"] for c in summary["categories"].values()) == summary["tokens"]
    sel, unsel = summary["selection"]["selected"], summary["selection"]["unselected"]
    assert (
        sum(c["count"] for c in sel.values()) + sum(c["count"] for c in unsel.values())
        == summary["tokens"]
    )
    png = open(prefix + ".png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (700, 300)
    rc, out, err = result["runs"]["curve"]
    assert rc == 0, err
    curve = json.load(open(os.path.join(os.path.dirname(result["html"]), "curve.json")))
    assert [p["tokens"] for p in curve["curves"]["a"]] == [8 * 64, 16 * 64, 24 * 64]
    assert curve["runs"]["a"]["speedup"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# headless Chromium over the DevTools protocol
# ---------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


class _DevTools:
    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method, timeout=20.0):
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.ws.settimeout(max(0.1, end - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
            if time.monotonic() > end:
                raise TimeoutError(method)

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    websocket = pytest.importorskip("websocket", reason="websocket-client (the test extra)")
    profile = tempfile.mkdtemp(dir=tmp_path)
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file, end = os.path.join(profile, "DevToolsActivePort"), time.monotonic() + 30
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.monotonic() > end or proc.poll() is not None:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        import urllib.request

        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(p for p in pages if p.get("type") == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=20)
        yield _DevTools(ws)
        ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_report_in_headless_chromium(result, browser, tmp_path):
    cdp = browser
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.call(f"{domain}.enable")
    cdp.events.clear()
    url = "file://" + os.path.abspath(result["html"])
    cdp.call("Page.navigate", url=url)
    cdp.wait_for("Page.loadEventFired")
    time.sleep(0.2)  # late console messages
    requests = [e["params"]["request"]["url"] for e in cdp.events
                if e.get("method") == "Network.requestWillBeSent"]  # fmt: skip
    assert requests == [url], requests
    errors = [
        e
        for e in cdp.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert not errors, errors

    per_doc = cdp.evaluate(
        "Array.from(document.querySelectorAll('section.doc')).map(s => ({doc: +s.dataset.doc, "
        "marks: Array.from(s.querySelectorAll('.tok')).map(t => t.classList.contains('sel'))}))"
    )
    assert [d["doc"] for d in per_doc] == SHOWN
    n_tokens = sum(len(result["expected"][d][0]) for d in SHOWN)
    assert cdp.evaluate("document.querySelectorAll('.tok').length") == n_tokens
    for d in per_doc:
        assert d["marks"] == result["expected"][d["doc"]][1].tolist()

    # Hover the first selected token: the box shows its numbers.
    box = cdp.evaluate(
        "(() => {const t = document.querySelector('.tok.sel'); t.scrollIntoView(); "
        "const r = t.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2, "
        "t.dataset.loss, t.dataset.excess];})()"
    )
    cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
    tip = cdp.evaluate("[getComputedStyle(document.getElementById('tip')).display, "
                       "document.getElementById('tip').textContent]")  # fmt: skip
    assert tip[0] == "block" and box[2] in tip[1] and box[3] in tip[1] and "selected" in tip[1]

    shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    path = os.environ.get("VISUALIZE_SCREENSHOT") or str(tmp_path / "report.png")
    with open(path, "wb") as f:
        f.write(shot)
