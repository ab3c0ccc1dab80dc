"""The offline report, an exported 03_attention notebook and the same notebook in JupyterLab,
opened in a real headless Chromium with networking to anything but 127.0.0.1 disabled: the figures
must really be drawn, the head browser's slider must change the drawn pattern, and the page must
request nothing from the network.

How "rendered", "moved" and "no failed requests" are observed:

- ``--dump-dom`` after ``--virtual-time-budget`` gives the DOM once scripts have run: plotly puts
  ``<svg class="main-svg">`` into every figure it draws, circuitsvis builds its React tree (a
  "Head Selector" and one ``<canvas>`` per head) inside its ``circuits-vis-…`` div;
- pages that are driven (a slider moved, a selector changed, JupyterLab) run in a Chromium
  controlled over the DevTools protocol (``Chromium``, a websocket from ``websocket-client``, which
  jupyter_server depends on): mouse events go to the slider's first tick at its on-screen
  position, and the heatmap's drawn image (the ``<image>`` plotly paints a heatmap into) must
  differ before and after;
- ``--log-net-log`` records every request the browser makes. Requests made *for the page* carry
  the page's network-isolation key (the browser's own background traffic does not), and with
  ``--host-resolver-rules="MAP * ~NOTFOUND"`` (127.0.0.1 excepted for JupyterLab) any request to
  another host fails. We require there to be none. (A plain text search for "http" cannot be the
  test: plotly.js itself contains URL strings it never fetches, e.g. map-tile servers.)

Negative controls prove the checks can fail: a page loading plotly from its CDN draws nothing and
its request is seen; the same executed notebook *unsigned* opens in JupyterLab with its circuitsvis
views blank (JupyterLab strips the scripts of untrusted outputs).
Chromium is Debian's ``chromium`` (``.ci/run`` installs it); without it the tests skip, saying so.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_compare import CKPT_STEPS, PRESET, make_synthetic_study  # noqa: E402  (the synthetic study with planted answers)

from initmi_utils import compare  # noqa: E402
from initmi_utils.checkpoints import save_checkpoint  # noqa: E402
from initmi_utils.config import RunPaths, experiment  # noqa: E402
from initmi_utils.report import PLOTLY_MIMETYPE, export_notebook_html, sign_notebook  # noqa: E402
from initmi_utils.schemes import SCHEMES, build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does this)")
LOCAL = re.compile(r"(https?|wss?)://(127\.0\.0\.1|localhost)[:/]")


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


def page_requests(netlog: Path, site: str = "file://") -> list[str]:
    """Network URLs requested on behalf of a page of ``site`` (its network-isolation key), other
    than to 127.0.0.1 (one event per line in the net log, so a log cut short still parses)."""
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
        if site in key and re.match(r"(https?|wss?)://", url) and not LOCAL.match(url):
            urls.add(url)
    return sorted(urls)


def static_external_refs(html: str) -> list[str]:
    """Markup that would load something from the network: src/href/@import to http(s) URLs.

    Script *bodies* are blanked first (their attributes, such as ``src``, stay): plotly.js holds
    attribution links like ``href="https://plotly.com/"`` as strings, which load nothing; whether
    scripts fetch anything at run time is what the browser's net log checks."""
    html = re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", html, flags=re.S | re.I)
    return re.findall(r"""(?:\bsrc|\bhref)\s*=\s*["'](?:https?:)?//[^"']+|@import\s+url\(\s*["']?https?://[^)]+""", html)


def plotly_figures_rendered(dom: str, n_figures: int, prefix: str = "figure-") -> list[int]:
    """Indices of the page's figure divs (``figure-1`` …; the exporter's ``plotly-output-1`` …)
    that contain no drawn plot."""
    missing = []
    for i in range(1, n_figures + 1):
        start = dom.find(f'id="{prefix}{i}"')
        end = dom.find(f'id="{prefix}{i + 1}"') if i < n_figures else len(dom)
        if start < 0 or 'class="main-svg"' not in dom[start:end]:
            missing.append(i)
    return missing


# ---------------------------------------------------------------------------------------------
# A Chromium driven over the DevTools protocol.


class Chromium:
    """Headless Chromium on ``about:blank``, driven over its DevTools websocket: ``goto``,
    ``evaluate`` (JavaScript, value returned), ``click`` (real mouse events), ``wait_for``. Net log
    and host rules as ``render``'s; ``local`` lets 127.0.0.1 through (JupyterLab)."""

    def __init__(self, work: Path, local: bool = False, size: tuple[int, int] = (1400, 1000)):
        import websocket  # websocket-client, a dependency of jupyter_server

        work.mkdir(parents=True, exist_ok=True)
        profile = work / "profile"
        self.netlog = work / "netlog.json"
        rules = "MAP * ~NOTFOUND" + (", EXCLUDE 127.0.0.1" if local else "")
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", f"--host-resolver-rules={rules}", f"--log-net-log={self.netlog}",
             "--remote-debugging-port=0", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=(work / "chromium.log").open("w"))
        try:
            start = time.monotonic()
            while not (port_file.exists() and port_file.read_text().strip()):
                assert self.proc.poll() is None, f"chromium exited: {(work / 'chromium.log').read_text()[-2000:]}"
                assert time.monotonic() - start < 60, "chromium did not open its DevTools port in 60 s"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
            url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            self.ws = websocket.create_connection(url, timeout=180, suppress_origin=True)
            self.n = 0
            self.send("Page.enable")
            self.send("Page.addScriptToEvaluateOnNewDocument", source=(
                "window.__errors = []; addEventListener('error', e => __errors.push(String(e.message)));"))
        except BaseException:
            self.proc.kill()  # never leave a browser behind
            self.proc.wait()
            raise

    def send(self, method: str, **params):
        """Call ``method``; meanwhile accept any dialog, such as JupyterLab's "leave the page?" when
        a notebook is left with outputs its renderer changed."""
        self.n += 1
        mine = self.n
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Page.javascriptDialogOpening":
                self.n += 1
                self.ws.send(json.dumps({"id": self.n, "method": "Page.handleJavaScriptDialog",
                                         "params": {"accept": True}}))
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, js: str):
        r = self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{js[:80]}…: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait_for(self, js: str, timeout: float = 60, every: float = 0.25):
        """The first truthy value of ``js`` within ``timeout`` seconds (None if none)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            value = self.evaluate(js)
            if value:
                return value
            time.sleep(every)
        return None

    def goto(self, url: str, timeout: float = 120) -> None:
        self.send("Page.navigate", url=url)
        assert self.wait_for("document.readyState === 'complete'", timeout), f"{url} did not load"

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self, site: str = "file://") -> list[str]:
        """Close the browser; the requests its pages of ``site`` made to hosts other than 127.0.0.1
        (the browser's own background traffic is not theirs)."""
        try:
            self.send("Browser.close")
        except Exception:  # already gone
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return page_requests(self.netlog, site)


@contextmanager
def chromium(work: Path, local: bool = False):
    c = Chromium(work, local)
    try:
        yield c
    finally:
        c.close()


# The head browser on screen: the first visible plot with a slider; scrolled into view; its
# heatmap's drawn image, its slider's label, and where its first tick is.
_BROWSER_STATE = """(function () {
  var g = [...document.querySelectorAll('.js-plotly-plot')]
    .find(p => p.querySelector('.slider-container') && p.querySelector('.hm image') && p.getClientRects().length);
  if (!g) return null;
  if (%(scroll)s) g.scrollIntoView({block: 'center'});
  var im = g.querySelector('.hm image'), tick = g.querySelector('.slider-tick-rect').getBoundingClientRect();
  var rail = g.querySelector('.slider-rail-touch-rect').getBoundingClientRect();
  var label = [...g.querySelectorAll('.slider-label')].map(t => t.textContent).find(t => t.startsWith('checkpoint'));
  var x = tick.x + tick.width / 2, y = rail.y + Math.min(10, rail.height / 2);
  return {image: im.getAttribute('href') || im.getAttribute('xlink:href'), label: label, x: x, y: y,
          onscreen: x > 0 && y > 0 && x < innerWidth && y < innerHeight};
})()"""


def move_head_browser_slider(c: Chromium) -> tuple[dict, dict]:
    """The head browser's state before and after a click on its slider's first tick."""
    assert c.wait_for(_BROWSER_STATE % {"scroll": "true"}, timeout=60), \
        "no head browser drawn on the page (a plot with a slider and a heatmap)"
    last = None
    for _ in range(40):  # content above may still change height (JupyterLab draws outputs late): scroll again
        time.sleep(0.5)
        before = c.evaluate(_BROWSER_STATE % {"scroll": "false"})
        if before["onscreen"] and last is not None and (before["x"], before["y"]) == (last["x"], last["y"]):
            break  # on screen, and where it was half a second ago
        if not before["onscreen"]:
            c.evaluate(_BROWSER_STATE % {"scroll": "true"})
        last = before
    assert before["onscreen"], f"the head browser's slider stays off screen: {before}"
    c.click(before["x"], before["y"])
    after = c.wait_for(f"(function () {{ var s = {_BROWSER_STATE % {'scroll': 'false'}}; "
                       f"return s && s.label !== {json.dumps(before['label'])} "
                       f"&& s.image !== {json.dumps(before['image'])} && s; }})()", timeout=60)  # drawn late under load
    return before, after or c.evaluate(_BROWSER_STATE % {"scroll": "false"})


# ---------------------------------------------------------------------------------------------
# The report.


def write_browser_checkpoints(root: Path, seeds=(0,)) -> None:
    """Checkpoints at ``CKPT_STEPS`` for each scheme's ``seeds`` of the synthetic study, so its
    report has head browsers: the ``normal`` init of the preset's model with W_Q and W_K scaled
    up step by step (attention sharpens along the slider), and a ``done.json``."""
    for scheme in SCHEMES:
        for seed in seeds:
            cfg = experiment(PRESET, scheme, seed)
            folder = RunPaths.of(cfg, root).checkpoints
            for step in CKPT_STEPS:
                model = build_model(experiment(PRESET, "normal", seed), root)
                with torch.no_grad():
                    for block in model.blocks:
                        block.attn.W_Q.mul_(1 + step / 100)
                        block.attn.W_K.mul_(1 + step / 100)
                save_checkpoint(folder, model, cfg, step, {})
            (folder / "done.json").write_text("{}")


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    make_synthetic_study(root, seeds=(0, 1, 2))
    write_browser_checkpoints(root)
    compare.run_compare(PRESET, root, n_boot=200, n_perm=200, cka=False, static=False)
    return root


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
def test_report_renders_offline_in_chromium(synthetic_report: Path, tmp_path):
    report = synthetic_report / "figures" / PRESET / "report.html"
    html = report.read_text(encoding="utf-8")
    n_figures = html.count('<div class="figure">')
    assert n_figures >= 6 and html.count("<script type=\"text/javascript\">") >= 2  # plotly.js inlined once + config
    assert html.count("var Plotly") <= 1 or len(html) < 2 * 5_000_000  # not one copy per figure
    assert static_external_refs(html) == []
    # The answers first, open; the evidence after them, folded.
    body = html[html.index("</nav>"):]
    assert body.index('id="findings"') < body.index('id="head-browser"') < body.index("<details")
    assert body[:body.index("<details")].count('class="finding"') == 3
    assert "RQ1 · Training and emergence</h2></summary>" in body  # the full RQ1 is folded

    dom, requests = render(report, tmp_path / "chrome")
    assert requests == [], f"the report requested network resources: {requests}"
    assert plotly_figures_rendered(dom, n_figures) == [], "some figures were not drawn"
    assert "normal-s3" in dom  # a missing run is named in the rendered page

    # Each standalone figure file renders offline too.
    one = synthetic_report / "figures" / PRESET / "07_rq1_survival.html"
    dom, requests = render(one, tmp_path / "chrome-one")
    assert requests == [] and 'class="main-svg"' in dom and static_external_refs(one.read_text(encoding="utf-8")) == []


@needs_chromium
@pytest.mark.slow
def test_the_reports_head_browser_moves_with_its_slider_and_selector(synthetic_report: Path, tmp_path):
    report = synthetic_report / "figures" / PRESET / "report.html"
    with chromium(tmp_path / "chrome") as c:
        c.goto(report.resolve().as_uri())
        options = c.evaluate("[...document.querySelectorAll('select.choice-select option')].map(o => o.textContent)")
        assert options == [f"{s} (seed 0)" for s in SCHEMES]
        before, after = move_head_browser_slider(c)
        assert before["label"] == f"checkpoint step {CKPT_STEPS[-1]}" and after["label"] == "checkpoint step 0"
        assert after["image"] != before["image"], "moving the slider did not change the drawn pattern"
        # The selector shows another run's browser, drawn, and hides the first.
        shown = c.evaluate("""(function () {
          var s = document.querySelector('select.choice-select'); s.value = '3'; s.dispatchEvent(new Event('change'));
          return [...document.querySelectorAll('.choice-panel')].map(p => !p.hidden && !!p.querySelector('.hm image'));
        })()""")
        assert shown == [i == 3 for i in range(len(SCHEMES))]
        assert c.evaluate("window.__errors") == []
        requests = c.close()
    assert requests == [], requests


# ---------------------------------------------------------------------------------------------
# An executed notebook: exported, and in JupyterLab.


@pytest.fixture(scope="module")
def executed_03(tmp_path_factory) -> Path:
    """03_attention executed by papermill on a freshly trained smoke run."""
    try:  # the grid runner's kernel registration (its module is being split: jobs, then pipeline)
        from initmi_utils.jobs import ensure_kernel
    except ImportError:
        from initmi_utils.pipeline import ensure_kernel
    from initmi_utils.train import train

    root = tmp_path_factory.mktemp("run03")
    nb = REPO / "notebooks" / "03_attention.ipynb"
    cfg = experiment("smoke", "normal", 0)
    train(cfg, root, progress=False)
    out = root / "03_attention.ipynb"
    code = ("import papermill, json, sys; papermill.execute_notebook(sys.argv[1], sys.argv[2], "
            "parameters=json.loads(sys.argv[3]), kernel_name=sys.argv[4], cwd=sys.argv[5], progress_bar=False)")
    params = json.dumps(dict(scheme="normal", seed=0, preset="smoke", root=str(root)))
    r = subprocess.run([sys.executable, "-c", code, str(nb), str(out), params, ensure_kernel(), str(nb.parent)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def expected_outputs(notebook: Path) -> tuple[int, int]:
    """(plotly outputs, circuitsvis views) in an executed notebook."""
    nb = nbformat.read(str(notebook), as_version=4)
    outs = [o for c in nb.cells for o in c.get("outputs", [])]
    plotly = sum(PLOTLY_MIMETYPE in o.get("data", {}) for o in outs)
    views = sum(str(o.get("data", {}).get("text/html", "")).count('<div id="circuits-vis-') for o in outs)
    return plotly, views


# Drawn plotly figures (a plot container with plotly's svg) and circuitsvis views (their div,
# and those that hold what circuitsvis draws: a canvas per head, the "Head Selector").
_COUNTS = """(function () {
  var plots = [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.querySelector('svg.main-svg')).length;
  var views = [...document.querySelectorAll('[id^="circuits-vis-"]')];
  var drawn = views.filter(v => v.querySelector('canvas') || v.textContent.includes('Head Selector')).length;
  return {plots: plots, views: views.length, drawn: drawn};
})()"""


@needs_chromium
@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "notebooks" / "03_attention.ipynb").exists(),
                    reason="notebooks/03_attention.ipynb does not exist yet")
def test_exported_03_attention_notebook_renders_plotly_and_circuitsvis_offline(executed_03: Path, tmp_path):
    n_plotly, n_views = expected_outputs(executed_03)
    assert n_plotly >= 3 and n_views >= 2, "the executed 03 notebook lacks its plotly figures or circuitsvis views"
    page = export_notebook_html(executed_03, tmp_path / "03_attention.html")
    html = page.read_text(encoding="utf-8")
    assert "circuits-vis-" in html and static_external_refs(html) == [], static_external_refs(html)[:5]

    dom, requests = render(page, tmp_path / "chrome")
    assert requests == [], f"the exported notebook requested network resources: {requests}"
    views = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(.*?)</canvas>', dom, flags=re.S)
    assert len(views) == n_views, "circuitsvis did not render (its div has no canvas after scripts ran)"
    assert len(re.findall(r'id="plotly-output-\d+"', dom)) == n_plotly
    assert plotly_figures_rendered(dom, n_plotly, "plotly-output-") == [], "some plotly outputs were not drawn"

    with chromium(tmp_path / "chrome-driven") as c:  # the head browser works in the exported page
        c.goto(page.resolve().as_uri())
        counts = c.wait_for(f"(function () {{ var n = {_COUNTS}; return n.plots >= {n_plotly} && n; }})()", 60)
        assert counts and counts["drawn"] == n_views, counts
        before, after = move_head_browser_slider(c)
        assert after["label"] != before["label"] and after["image"] != before["image"]
        assert c.close() == []


@contextmanager
def jupyterlab(folder: Path, work: Path):
    """JupyterLab serving ``folder`` on 127.0.0.1 with a token, its Jupyter directories under
    ``work`` (so its notary's signatures are ``work/data``'s); yields (base URL, token, data dir).
    Notebooks open with every cell rendered (windowing off) and no news fetched."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    dirs = {name: work / name for name in ("data", "config", "runtime", "settings", "workspaces")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for ext, settings in (("notebook-extension/tracker", {"windowingMode": "none"}),
                          ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})):
        path = dirs["settings"] / "@jupyterlab" / f"{ext}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = {**os.environ, "JUPYTER_DATA_DIR": str(dirs["data"]), "JUPYTER_CONFIG_DIR": str(dirs["config"]),
           "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]), "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"])}
    log = (work / "jupyterlab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            assert proc.poll() is None, (work / "jupyterlab.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                assert time.monotonic() - start < 120, "JupyterLab did not start in 120 s"
                time.sleep(0.5)
        yield base, token, dirs["data"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@needs_chromium
@pytest.mark.slow
def test_03_attention_in_jupyterlab_draws_plotly_and_circuitsvis_once_signed(executed_03: Path, tmp_path):
    n_plotly, n_views = expected_outputs(executed_03)
    lab = tmp_path / "lab"
    lab.mkdir()
    shutil.copy(executed_03, lab / "signed.ipynb")
    control = nbformat.read(str(executed_03), as_version=4)
    control.metadata["title"] = "unsigned"  # trust goes by content: the control must not be the signed notebook
    nbformat.write(control, str(lab / "unsigned.ipynb"))
    with jupyterlab(lab, tmp_path / "jupyter") as (base, token, data_dir):
        sign_notebook(lab / "signed.ipynb", data_dir)
        with chromium(tmp_path / "chrome", local=True) as c:
            c.goto(f"{base}/lab/tree/signed.ipynb?token={token}")
            counts = c.wait_for(f"(function () {{ var n = {_COUNTS}; "
                                f"return n.plots >= {n_plotly} && n.drawn >= {n_views} && n; }})()", timeout=240)
            if not counts:
                c.screenshot(tmp_path / "signed.png")
            assert counts, f"not drawn in JupyterLab: {c.evaluate(_COUNTS)} of {n_plotly} plots, {n_views} views"
            before, after = move_head_browser_slider(c)
            assert after["label"] != before["label"] and after["image"] != before["image"]

            # The control: the same notebook, unsigned, has its plotly figures but blank circuitsvis views.
            c.goto(f"{base}/lab/tree/unsigned.ipynb?reset&token={token}")  # reset: the signed tab is not restored
            unsigned = c.wait_for(f"""(function () {{
              if (!document.title.startsWith('unsigned.ipynb')) return null;
              var p = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden')
                && p.querySelector('.jp-NotebookPanel-notebook') && p.getClientRects().length);
              if (!p) return null;
              var plots = [...p.querySelectorAll('.js-plotly-plot')].filter(g => g.querySelector('svg.main-svg')).length;
              var drawn = [...p.querySelectorAll('[id^="circuits-vis-"]')]
                .filter(v => v.querySelector('canvas') || v.textContent.includes('Head Selector')).length;
              return plots >= {n_plotly} && {{plots: plots, drawn: drawn, title: document.title}};
            }})()""", timeout=240)
            assert unsigned and "unsigned" in unsigned["title"], unsigned
            assert unsigned["drawn"] == 0, "an untrusted notebook ran circuitsvis: the trust check proves nothing"
            requests = c.close(base)
    assert requests == [], f"JupyterLab's page requested hosts other than 127.0.0.1: {requests}"
