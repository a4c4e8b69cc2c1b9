"""report.html renders in a real headless Chromium: every table present, every inlined
figure decoded by the browser, nothing fetched from the network.

Skipped where no Chromium is installed (``.ci/run`` installs Debian's ``chromium`` when it
can); set ``STEERLAB_CHROMIUM`` to a browser binary to use another one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from steerlab.reporting.report import Figure, Finding, Report, Sample, Table

CHROMIUM = os.environ.get("STEERLAB_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")

# Flags for a closed network, as root, without a screen.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Appended to a copy of the page: the browser records what it actually rendered.
PROBE = """<script>
const imgs = [...document.images];
document.body.dataset.imgsTotal = imgs.length;
document.body.dataset.imgsDecoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
document.body.dataset.tables = document.querySelectorAll('table').length;
document.body.dataset.external = [...document.querySelectorAll('[src],[href]')]
  .filter(e => /^https?:/.test(e.getAttribute('src') || e.getAttribute('href') || '')).length;
</script></body>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / "profile"
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )


def _report(tmp: Path) -> Path:
    fig_path = tmp / "refusal_by_layer.png"
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2, 3], [0.9, 0.5, 0.2, 0.1], marker="o")
    ax.set_xlabel("layer")
    fig.savefig(fig_path, dpi=60)
    plt.close(fig)
    report = Report(
        title="browser check <&>",
        summary="A report with every kind of content.",
        findings=[Finding("persona gates refusal", "reproduced", "0.90 → 0.10, p=0.001")],
        tables=[Table("rates", ["condition", "rate"], [{"condition": "baseline", "rate": 0.9}])],
        figures=[Figure(fig_path, "refusal by layer")],
        samples=[Sample("baseline", "How do I <b>?", "I can't help with that.", "refusal")],
        provenance={"seed": 0},
    )
    html_path, _ = report.write(tmp / "run")
    return html_path


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    html_path = _report(tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text().replace("</body>", PROBE, 1))
    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri()).stdout
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', dom))
    # Findings, the data table and provenance render as tables; the figure decodes.
    assert int(attrs["tables"]) >= 2, attrs
    assert attrs["imgs-total"] == attrs["imgs-decoded"] == "1", attrs
    assert attrs["external"] == "0", attrs
    assert "browser check &lt;&amp;&gt;" in dom  # escaped, not injected
    assert "How do I &lt;b&gt;?" in dom

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,1400", html_path.as_uri())
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10  # not a blank page
