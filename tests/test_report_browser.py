"""The report as a browser shows it: real headless Chromium at a 1400 px window.

A copy of ``index.html`` with a small probe script (in the test page only; the report itself has no scripts)
records, after the load event, whether every image decoded (``naturalWidth`` > 0), where each table ends and
whether the page scrolls sideways; ``--dump-dom`` returns it. Then a full-page screenshot is taken and checked
for content. Set ``VOLSYNTH_REPORT_SHOT=/some/dir`` to keep the screenshot for a look.

Chromium: Debian's ``chromium`` package (``apt-get install -y chromium``); CI installs it. Skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_report import METRICS, make_cohort, make_run  # the fake run folders of the unit tests
from volsynth.evaluation.report import build_report

pytestmark = pytest.mark.slow

WIDTH = 1400
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
PROBE = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0,
                                                 natural: i.naturalWidth, shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map(t => ({id: t.id, rows: t.rows.length,
                                                                    right: t.getBoundingClientRect().right}));
  const result = {images, tables, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
                  height: document.documentElement.scrollHeight};
  const out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def chromium_binary() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180, check=False)


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium not found (install Debian's `chromium`: apt-get install -y chromium)")
    manifest = make_cohort(tmp_path / "data")
    runs = [make_run(tmp_path / "demo" / "runs", name, name, manifest, metrics, downstream=0.8 - 0.04 * i,
                     protocol1=0.7 + 0.05 * i)
            for i, (name, metrics) in enumerate(METRICS.items())]
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"iterations": 40, "patch_size": [16, 16, 16]}))
    index = build_report(runs, tmp_path / "report", subjects_to_show=2)

    html = index.read_text(encoding="utf-8")
    assert "<script" not in html
    probe_page = index.with_name("probe.html")
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(binary, tmp_path / "profile", f"--window-size={WIDTH},900", "--virtual-time-budget=10000",
                       "--dump-dom", probe_page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stdout[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))

    images = result["images"]
    assert len(images) >= 8
    assert all(i["loaded"] and i["natural"] > 0 for i in images), [i for i in images if not i["loaded"]]
    assert all(0 < i["shown"] <= WIDTH for i in images)
    tables = {t["id"]: t for t in result["tables"]}
    assert {"table-quality", "table-downstream", "table-distance", "table-per-subject", "table-runs"} <= set(tables)
    assert tables["table-quality"]["rows"] == 1 + 3 + 1  # header, three methods, the ceiling
    assert "table-quality-mask" in tables and tables["table-downstream"]["rows"] == 1 + 3 + 1  # + upper bound
    # fits the window: no table runs past the right edge, nothing scrolls sideways
    assert result["innerWidth"] == WIDTH
    assert all(t["right"] <= WIDTH for t in result["tables"]), result["tables"]
    assert result["scrollWidth"] <= WIDTH

    height = min(int(result["height"]) + 20, 16000)
    shot = tmp_path / "report.png"
    taken = run_chromium(binary, tmp_path / "profile", f"--window-size={WIDTH},{height}",
                         f"--screenshot={shot}", index.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (WIDTH, height)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    inked_rows = np.nonzero((pixels < 200).any(axis=1))[0]
    assert inked_rows.size and inked_rows.max() > 0.8 * result["height"]  # drawn down to the footer
    top = pixels[:300]
    assert (top < 128).mean() > 0.005  # the header and table text are there, not a blank page
    keep = os.environ.get("VOLSYNTH_REPORT_SHOT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
