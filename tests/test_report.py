"""The report is one self-contained page: it opens offline in a real browser, every figure renders, no errors."""

import re
import shutil
import subprocess

import pytest

from legointerp.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Collect uncaught errors and console.error calls into the DOM, where --dump-dom can read them.
ERROR_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.map(String).join(' ')); consoleError(...args); };
window.addEventListener('load', () => setTimeout(() => {
  const out = document.createElement('pre'); out.id = '__errors';
  out.textContent = JSON.stringify(window.__errors); document.body.appendChild(out);
}, 1500));
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", "--out", str(path), "--samples", "600", "--head-samples", "200", "--quiet"]) == 0
    return path.read_text()


def test_report_is_self_contained(report):
    assert not re.search(r"<script[^>]+src=[\"']https?://", report)
    assert not re.search(r"<link[^>]+href=[\"']https?://", report)
    for section in ["Accuracy per chain position", "Training curves", "Attention heads", "Information percolation",
                    "Activation patching", "Shortcut detection: no shortcut"]:
        assert section in report


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's chromium)")
def test_report_renders_offline_in_chromium_without_errors(report, tmp_path):
    page = tmp_path / "probe.html"
    page.write_text(report.replace("<head>", "<head>" + ERROR_PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # networking off
               "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    errors = re.search(r'<pre id="__errors">(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page never finished loading"
    assert errors.group(1) == "[]", errors.group(1)
    figures = report.count('class="plotly-graph-div"')
    assert figures >= 6
    assert dom.count('class="main-svg"') >= figures  # plotly drew every figure
    assert "circuits-vis" in dom or "cv-" in dom or "<canvas" in dom  # the circuitsvis view mounted
