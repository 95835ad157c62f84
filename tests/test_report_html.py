"""The HTML report renders in a real browser: headless Chromium loads it from disk with the network
off, every embedded plot decodes (naturalWidth > 0), provenance is at the top, and a screenshot is
kept under test-artifacts/ for a human to look at.

Needs Debian's chromium (`apt-get install -y chromium`): without it the test skips and says why on a
developer's machine, and fails in CI (the ``chromium`` fixture in conftest.py), which installs it.
"""

import re
import subprocess
from pathlib import Path

import pandas as pd

from conftest import ARTIFACTS, CHROMIUM_FLAGS
from dinoscale.analysis import write_report

CHECK_SCRIPT = """<img id="control" alt="deliberately broken" src="data:image/png;base64,AAAA">
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].filter(i => i.id !== 'control');
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const control = document.getElementById('control');
  const caught = control.complete && control.naturalWidth === 0;
  const first = document.body.firstElementChild.nextElementSibling;
  document.body.insertAdjacentHTML('beforeend',
    `<pre id="check">images=${imgs.length} loaded=${ok} second_block=${first ? first.id : ''} broken_control_caught=${caught}</pre>`);
});
</script>"""


def _run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def _report(tmp_path: Path) -> Path:
    rows = []
    for strategy in ("frozen", "lora"):
        for res in (64, 128, 224):
            for name, n in (("xs", 4e5), ("s", 1.1e6), ("m", 2.8e6), ("l", 6.5e6)):
                m = 0.95 - 0.3 * (n / 4e5) ** -0.3 + res / 1e4 + (0.03 if strategy == "lora" else 0)
                rows.append(
                    dict(
                        backbone=name,
                        n_params=int(n),
                        resolution=res,
                        probe="linear",
                        strategy=strategy,
                        seed=0,
                        test_macro_auroc=m,
                        test_macro_auroc_ci_low=m - 0.01,
                        test_macro_auroc_ci_high=m + 0.01,
                        tokens_per_image=5 + (res // 16) ** 2,
                        modality="xray",
                        dataset="phantom-xray",
                        weights="random",
                    )
                )
    out = write_report(
        pd.DataFrame(rows),
        tmp_path / "report",
        "xray demo",
        ["data: PHANTOM (phantom-xray v1, seed 0) - synthetic, not patient data"],
    )
    return out / "report.html"


def test_html_report_is_self_contained_and_every_plot_loads_in_chromium(tmp_path, chromium):
    html_path = _report(tmp_path)
    html = html_path.read_text()
    n_images = html.count("<img ")
    # heatmap, cost frontier; then the curves vs params, vs resolution, vs GFLOPs; strategy differences
    assert n_images == 6
    # self-contained: every image is a data URI; nothing is fetched from anywhere
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == n_images
    assert not re.search(r'(src|href)="(https?:|file:|//)', html)
    # provenance right under the title, data and weights both named
    assert (
        html.index('id="provenance"')
        < html.index('id="answer"')
        < html.index("over model size x resolution")
        < html.index("<h2>Verdicts")
    )
    assert html.index("<h2>Verdicts") < html.index("<h2>Method")
    assert "PHANTOM" in html and "weights: RANDOM init" in html

    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _run_chromium(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = re.search(
        r'<pre id="check">images=(\d+) loaded=(\d+) second_block=(\S*) broken_control_caught=(\w+)</pre>', dom.stdout
    )
    assert check, f"the check script did not run; chromium said: {dom.stderr[-2000:]}"
    assert (int(check[1]), int(check[2])) == (n_images, n_images), f"only {check[2]} of {check[1]} plots loaded"
    assert check[3] == "provenance"  # the first block after the title
    assert check[4] == "true"  # the check does see a plot that fails to decode

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_html.png"
    shot.unlink(missing_ok=True)
    res = _run_chromium(
        chromium, tmp_path, "--window-size=1280,3000", "--hide-scrollbars", f"--screenshot={shot}", html_path.as_uri()
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000  # a rendered page, not a blank one
