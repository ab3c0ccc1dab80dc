"""The offline report and an exported 03_attention notebook, opened in a real headless Chromium
with networking disabled: the figures must really be drawn, and the page must request nothing
from the network.

How "rendered" and "no failed requests" are observed:

- ``--dump-dom`` after ``--virtual-time-budget`` gives the DOM once scripts have run: plotly puts
  ``<svg class="main-svg">`` into every figure it draws, circuitsvis builds its React tree (a
  "Head Selector" and one ``<canvas>`` per head) inside its ``circuits-vis-…`` div;
- ``--log-net-log`` records every request the browser makes. Requests made *for the page* carry
  the page's ``file://`` network-isolation key (the browser's own background traffic does not),
  and with ``--host-resolver-rules="MAP * ~NOTFOUND"`` any http(s) request among them fails. We
  require there to be none. (A plain text search for "http" cannot be the test: plotly.js itself
  contains URL strings it never fetches, e.g. map-tile servers.)

A negative control (a page loading plotly from its CDN) proves both checks can fail.
Chromium is Debian's ``chromium`` (``.ci/run`` installs it); without it the tests skip, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_compare import PRESET, make_synthetic_study  # noqa: E402  (the synthetic study with planted answers)

from initmi_utils import compare  # noqa: E402
from initmi_utils.report import export_notebook_html  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does this)")


def render(page: Path, work: Path, budget_ms: int = 20_000) -> tuple[str, list[str]]:
    """(DOM after scripts ran, URLs the page requested over the network) for ``page``."""
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={work / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--log-net-log={netlog}", f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout, page_requests(netlog)


def page_requests(netlog: Path) -> list[str]:
    """Network URLs requested on behalf of a page loaded from disk (one event per line in the
    net log, so a log cut short by a crash still parses)."""
    urls = set()
    for line in netlog.read_text(errors="replace").splitlines():
        line = line.strip().rstrip(",")
        if not line.startswith("{") or '"url"' not in line:
            continue
        try:
            params = json.loads(line).get("params", {})
        except json.JSONDecodeError:
            continue
        url, key = params.get("url", ""), str(params.get("network_isolation_key", ""))
        if "file://" in key and re.match(r"(https?|wss?)://", url):
            urls.add(url)
    return sorted(urls)


def static_external_refs(html: str) -> list[str]:
    """Markup that would load something from the network: src/href/@import to http(s) URLs.

    Script *bodies* are blanked first (their attributes, such as ``src``, stay): plotly.js holds
    attribution links like ``href="https://plotly.com/"`` as strings, which load nothing; whether
    scripts fetch anything at run time is what the browser's net log checks."""
    html = re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", html, flags=re.S | re.I)
    return re.findall(r"""(?:\bsrc|\bhref)\s*=\s*["'](?:https?:)?//[^"']+|@import\s+url\(\s*["']?https?://[^)]+""", html)


def plotly_figures_rendered(dom: str, n_figures: int) -> list[int]:
    """Indices of the report's figure divs (``figure-1`` …) that contain no drawn plot."""
    missing = []
    for i in range(1, n_figures + 1):
        start = dom.find(f'id="figure-{i}"')
        end = dom.find(f'id="figure-{i + 1}"') if i < n_figures else len(dom)
        if start < 0 or 'class="main-svg"' not in dom[start:end]:
            missing.append(i)
    return missing


@needs_chromium
def test_checks_can_fail_on_a_page_that_needs_the_network(tmp_path):
    page = tmp_path / "cdn.html"
    page.write_text('<html><head><script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script></head><body>'
                    '<div id="figure-1"></div><script>if (window.Plotly) Plotly.newPlot("figure-1", [{y: [1, 2]}]);'
                    "</script></body></html>")
    dom, requests = render(page, tmp_path / "chrome")
    assert plotly_figures_rendered(dom, 1) == [1]  # nothing drawn without the CDN
    assert any("cdn.plot.ly" in u for u in requests)  # and the failed request was seen
    assert static_external_refs(page.read_text())


@needs_chromium
@pytest.mark.slow
def test_report_renders_offline_in_chromium(tmp_path):
    make_synthetic_study(tmp_path, seeds=(0, 1, 2))
    results, written = compare.run_compare(PRESET, tmp_path, n_boot=200, n_perm=200, cka_sequences=0, static=False)
    report = written["report"]
    html = report.read_text(encoding="utf-8")
    n_figures = html.count('<div class="figure">')
    assert n_figures >= 6 and html.count("<script type=\"text/javascript\">") >= 2  # plotly.js inlined once + config
    assert html.count("var Plotly") <= 1 or len(html) < 2 * 5_000_000  # not one copy per figure
    assert static_external_refs(html) == []

    dom, requests = render(report, tmp_path / "chrome")
    assert requests == [], f"the report requested network resources: {requests}"
    assert plotly_figures_rendered(dom, n_figures) == [], "some figures were not drawn"
    assert "normal-s3" in dom  # a missing run is named in the rendered page

    # Each standalone figure file renders offline too.
    one = tmp_path / "figures" / PRESET / "07_rq1_survival.html"
    dom, requests = render(one, tmp_path / "chrome-one")
    assert requests == [] and 'class="main-svg"' in dom and static_external_refs(one.read_text(encoding="utf-8")) == []


def _executed_03(tmp_path: Path) -> Path:
    """03_attention executed on a freshly trained smoke run under ``tmp_path``."""
    from initmi_utils.config import experiment
    from initmi_utils.pipeline import ensure_kernel
    from initmi_utils.train import train

    nb = REPO / "notebooks" / "03_attention.ipynb"
    cfg = experiment("smoke", "normal", 0)
    train(cfg, tmp_path, progress=False)
    out = tmp_path / "03_attention.ipynb"
    code = ("import papermill, json, sys; papermill.execute_notebook(sys.argv[1], sys.argv[2], "
            "parameters=json.loads(sys.argv[3]), kernel_name=sys.argv[4], cwd=sys.argv[5], progress_bar=False)")
    params = json.dumps(dict(scheme="normal", seed=0, preset="smoke", root=str(tmp_path)))
    r = subprocess.run([sys.executable, "-c", code, str(nb), str(out), params, ensure_kernel(), str(nb.parent)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@needs_chromium
@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "notebooks" / "03_attention.ipynb").exists(),
                    reason="notebooks/03_attention.ipynb does not exist yet")
def test_exported_03_attention_notebook_renders_circuitsvis_offline(tmp_path):
    executed = _executed_03(tmp_path)
    page = export_notebook_html(executed, tmp_path / "03_attention.html")
    html = page.read_text(encoding="utf-8")
    assert "circuits-vis-" in html, "the executed 03 notebook has no circuitsvis output"
    assert static_external_refs(html) == [], static_external_refs(html)[:5]

    dom, requests = render(page, tmp_path / "chrome")
    assert requests == [], f"the exported notebook requested network resources: {requests}"
    views = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(.*?)</canvas>', dom, flags=re.S)
    assert views, "circuitsvis did not render (its div has no canvas after scripts ran)"
    assert "Head Selector" in dom or "<canvas" in views[0]
