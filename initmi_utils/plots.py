"""Plotly figure builders shared by the notebooks, and the one way figures are saved.

Builders are renderers only: they take a tidy frame that already holds what to draw (a mean and
its interval, a fraction per step, a value per layer and head) and return a ``go.Figure``. The
numbers come from ``behavior`` / ``compare``; nothing here computes a statistic, so a figure can
never disagree with the table printed next to it.

``save_figure`` writes each figure as one self-contained HTML file (plotly.js inlined, never the
CDN, so it opens offline) and, only when kaleido *and* a browser for it are already installed,
as PNG and SVG too; otherwise it prints a one-line notice once. Nothing is downloaded: kaleido is
given the browser it finds (``BROWSER_PATH``, else Chromium/Chrome on the PATH) and no MathJax,
whose default is a CDN.

Figures for papers: the comparison saves its main figures (the one figure beside each research
question's findings) as plotly JSON with a manifest, and ::

    python -m initmi_utils.plots --preset quick        # what `make figures PRESET=quick` runs

exports them to ``figures/<preset>/paper/<name>.svg`` and ``.png``, each stating the machine (CPU
model, cores) and the command that produced it; without kaleido or a browser it prints one line
saying what to install.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from initmi_utils.config import resolve_root
from initmi_utils import sources
from initmi_utils.io import atomic_write_text

TEMPLATE = "plotly_white"
PALETTE = qualitative.Plotly + qualitative.D3  # 20 distinct colours


def scheme_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per name, in the order given (pass the registry order for stable colours)."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _band_traces(s: pd.DataFrame, name: str, color: str, x: str, show_legend: bool) -> list[go.Scatter]:
    """The CI band (when there are >= 2 seeds) and the mean line of one group."""
    s = s.sort_values(x)
    n = int(s["n"].max()) if len(s) else 0
    traces = []
    if n > 1 and s["ci_low"].notna().any():
        band = s.dropna(subset=["ci_low", "ci_high"])
        traces.append(go.Scatter(
            x=pd.concat([band[x], band[x][::-1]]), y=pd.concat([band["ci_high"], band["ci_low"][::-1]]),
            fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), hoverinfo="skip",
            legendgroup=name, showlegend=False, name=f"{name} 95% CI"))
    traces.append(go.Scatter(
        x=s[x], y=s["mean"], mode="lines", line=dict(color=color, width=2), legendgroup=name,
        name=f"{name} (n={n})", showlegend=show_legend, customdata=s[["n"]],
        hovertemplate=f"{name}<br>{x}=%{{x}}<br>mean=%{{y:.4g}}<br>n=%{{customdata[0]}}<extra></extra>"))
    return traces


def band_figure(summary: pd.DataFrame, title: str, y_title: str = "", x: str = "step", group: str = "scheme",
                colors: dict[str, str] | None = None, log_x: bool = False) -> go.Figure:
    """Mean line per group with its 95% CI band (``summary``: group, x, mean, ci_low, ci_high, n).

    The legend shows each group's number of seeds; a group with one seed has no band.
    """
    colors = colors or scheme_colors(summary[group].unique())
    traces = [t for name, s in summary.groupby(group, sort=False) for t in _band_traces(s, str(name), colors[name], x, True)]
    fig = go.Figure(traces)
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x, yaxis_title=y_title,
                      legend_title=f"{group} (band: 95% bootstrap CI over seeds)")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def band_grid(summary: pd.DataFrame, title: str, panel: str = "metric", x: str = "step", group: str = "scheme",
              colors: dict[str, str] | None = None, n_cols: int = 2, panels: Sequence[str] | None = None,
              height_per_row: int = 300) -> go.Figure:
    """``band_figure`` in one panel per value of ``panel`` (shared legend, independent y axes)."""
    panels = list(panels) if panels is not None else list(dict.fromkeys(summary[panel]))
    panels = [p for p in panels if (summary[panel] == p).any()]
    colors = colors or scheme_colors(summary[group].unique())
    n_cols = max(1, min(n_cols, len(panels)))
    n_rows = max(1, -(-len(panels) // n_cols))
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[str(p) for p in panels],
                        horizontal_spacing=0.08, vertical_spacing=min(0.12, 0.5 / n_rows))
    seen: set[str] = set()
    traces, rows, cols = [], [], []
    for i, p in enumerate(panels):
        r, c = i // n_cols + 1, i % n_cols + 1
        for name, s in summary[summary[panel] == p].groupby(group, sort=False):
            new = _band_traces(s, str(name), colors[name], x, name not in seen)
            traces += new
            rows += [r] * len(new)
            cols += [c] * len(new)
            seen.add(name)
    if traces:
        fig.add_traces(traces, rows=rows, cols=cols)
    fig.update_xaxes(title_text=x)
    fig.update_layout(template=TEMPLATE, title=title, height=max(350, height_per_row * n_rows),
                      legend_title=f"{group} (band: 95% bootstrap CI over seeds)")
    return fig


def survival_figure(curves: pd.DataFrame, title: str, colors: dict[str, str] | None = None) -> go.Figure:
    """Fraction of seeds emerged by step t, a step function per scheme.

    ``curves``: scheme, step, fraction_emerged, n, n_never. Never-emerged seeds stay in the
    denominator, so a scheme whose curve ends below 1 lost seeds, it did not drop them.
    """
    colors = colors or scheme_colors(curves["scheme"].unique())
    fig = go.Figure()
    for name, s in curves.groupby("scheme", sort=False):
        s = s.sort_values("step")
        n, never = int(s["n"].iloc[0]), int(s["n_never"].iloc[0])
        fig.add_trace(go.Scatter(x=s["step"], y=s["fraction_emerged"], mode="lines", line_shape="hv",
                                 line=dict(color=colors[name], width=2),
                                 name=f"{name} (n={n}, never={never})"))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="step", yaxis_title="fraction of seeds emerged",
                      yaxis_range=[-0.02, 1.02])
    return fig


def interval_figure(summary: pd.DataFrame, title: str, y_title: str, group: str = "scheme",
                    colors: dict[str, str] | None = None, points: pd.DataFrame | None = None,
                    value: str = "value") -> go.Figure:
    """Mean and 95% CI per group (``summary``: group, mean, ci_low, ci_high, n), seeds as dots.

    ``points`` (optional, columns group and ``value``) draws every seed so that n is visible.
    """
    colors = colors or scheme_colors(summary[group].unique())
    fig = go.Figure()
    for _, r in summary.iterrows():
        name = r[group]
        err = dict(type="data", symmetric=False, array=[r["ci_high"] - r["mean"]], arrayminus=[r["mean"] - r["ci_low"]])
        fig.add_trace(go.Scatter(x=[f"{name} (n={int(r['n'])})"], y=[r["mean"]], mode="markers",
                                 marker=dict(color=colors[name], size=12, symbol="diamond"),
                                 error_y=err if pd.notna(r["ci_low"]) else None, name=f"{name} mean, 95% CI"))
        if points is not None:
            pts = points[points[group] == name][value]
            fig.add_trace(go.Scatter(x=[f"{name} (n={int(r['n'])})"] * len(pts), y=pts, mode="markers",
                                     marker=dict(color=colors[name], size=6, opacity=0.5), showlegend=False,
                                     name=f"{name} seeds"))
    fig.update_layout(template=TEMPLATE, title=title, yaxis_title=y_title, showlegend=False)
    return fig


def heatmap_grid(df: pd.DataFrame, title: str, row: str = "scheme", col: str = "seed", value: str = "value",
                 colorscale: str = "RdBu_r", zmid: float | None = 0.0, zrange: tuple[float, float] | None = None,
                 cell_px: int = 22) -> go.Figure:
    """One layer x head block per (``row``, ``col``) pair (e.g. scheme x seed), tiled into a single
    heatmap with blank gutters, one colour scale.

    ``df``: row, col, layer, head, ``value``. One trace for the whole grid keeps a 25-run figure
    light (a subplot per run is slow to build and to render). Heads keep their index: heads of
    different runs are not comparable by index (the comparison tables sort them); the picture
    shows each run as it is.
    """
    rows, cols = list(dict.fromkeys(df[row])), sorted(df[col].unique())
    n_layers, n_heads = int(df["layer"].max()) + 1, int(df["head"].max()) + 1
    lo, hi = zrange if zrange else (float(df[value].min()), float(df[value].max()))
    if zmid is not None:
        m = max(abs(lo - zmid), abs(hi - zmid)) or 1.0
        lo, hi = zmid - m, zmid + m
    H, W = len(rows) * (n_layers + 1) - 1, len(cols) * (n_heads + 1) - 1
    z = np.full((H, W), np.nan)
    text = np.full((H, W), "", dtype=object)
    cell = df.groupby([row, col, "layer", "head"])[value].mean()
    ri, ci = {r: i for i, r in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
    for (r, c, layer, head), v in cell.items():
        y, x = ri[r] * (n_layers + 1) + int(layer), ci[c] * (n_heads + 1) + int(head)
        z[y, x] = v
        text[y, x] = f"{r} · {col} {c}<br>L{int(layer)} H{int(head)}: {v:.3g}"
    fig = go.Figure(go.Heatmap(z=z, text=text, hoverinfo="text", zmin=lo, zmax=hi, colorscale=colorscale,
                               hoverongaps=False, xgap=1, ygap=1))
    fig.update_xaxes(tickvals=[j * (n_heads + 1) + (n_heads - 1) / 2 for j in range(len(cols))],
                     ticktext=[f"{col} {c}" for c in cols], side="top", showgrid=False, zeroline=False)
    fig.update_yaxes(tickvals=[i * (n_layers + 1) + (n_layers - 1) / 2 for i in range(len(rows))],
                     ticktext=[str(r) for r in rows], autorange="reversed", showgrid=False, zeroline=False)
    fig.update_layout(template=TEMPLATE, title=dict(text=title, font=dict(size=14)), height=max(250, 140 + H * cell_px),
                      width=max(800, 200 + W * cell_px),
                      annotations=[dict(text=f"each block: layers (rows) x heads (columns)", xref="paper", yref="paper",
                                        x=0, y=-0.02, showarrow=False, yanchor="top", font=dict(size=11))])
    return fig


def panel_lines(df: pd.DataFrame, panel: str, series: str, title: str, log_y: bool = False,
                n_cols: int = 3) -> go.Figure:
    """One line per ``series`` over training steps, one panel (own y axis) per value of ``panel``."""
    import plotly.express as px

    n_rows = -(-df[panel].nunique() // n_cols)
    fig = px.line(df.sort_values("step"), x="step", y="value", color=series, facet_col=panel,
                  facet_col_wrap=n_cols, markers=True, log_y=log_y, template=TEMPLATE, title=title,
                  height=380 * n_rows)
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return fig


def line_figure(df: pd.DataFrame, title: str, x: str = "step", y: str = "value", color: str = "metric",
                y_title: str = "", hline: float | None = None, vline: float | None = None) -> go.Figure:
    """Plain lines, one per ``color`` value (one run's curves); optional threshold / event lines."""
    fig = go.Figure()
    for name, s in df.groupby(color, sort=False):
        s = s.sort_values(x)
        fig.add_trace(go.Scatter(x=s[x], y=s[y], mode="lines+markers", name=str(name), marker=dict(size=4)))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", line_color="gray")
    if vline is not None and pd.notna(vline):
        fig.add_vline(x=vline, line_dash="dash", line_color="gray")
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x, yaxis_title=y_title)
    return fig


def stacked_counts(df: pd.DataFrame, x: str, color: str, value: str, title: str, x_order: Sequence[str] | None = None,
                   color_order: Sequence[str] | None = None, names: dict[str, str] | None = None) -> go.Figure:
    """Stacked bars: per ``x`` (e.g. scheme), the ``value`` (e.g. runs) of each ``color``
    category (e.g. copying mechanism); ``names`` gives the legend's words for the categories."""
    names = names or {}
    xs = list(x_order) if x_order is not None else list(dict.fromkeys(df[x]))
    cats = list(color_order) if color_order is not None else list(dict.fromkeys(df[color]))
    colors = scheme_colors(cats)
    fig = go.Figure()
    for c in cats:
        g = df[df[color] == c].set_index(x)[value]
        fig.add_trace(go.Bar(x=xs, y=[float(g.get(v, 0)) for v in xs], name=names.get(c, str(c)),
                             marker_color=colors[c], hovertemplate=f"%{{x}}: %{{y}} ({names.get(c, c)})<extra></extra>"))
    fig.update_layout(template=TEMPLATE, barmode="stack", title=dict(text=title, font=dict(size=14)), yaxis_title=value,
                      showlegend=True, legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0), height=420)
    return fig


# ---------------------------------------------------------------------------------------------
# Saving.

_NOTICE_SHOWN = False


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_HINT = ("to export PNG/SVG install kaleido >= 1 (pip install 'kaleido>=1') and a Chromium "
                "(Debian/Ubuntu: apt-get install chromium), or set BROWSER_PATH to a Chrome/Chromium")


def static_browser() -> str | None:
    """The browser kaleido may use: ``BROWSER_PATH``, else the first Chromium/Chrome on the PATH.
    Never one kaleido would download."""
    path = os.environ.get("BROWSER_PATH")
    if path:
        return path if Path(path).is_file() else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def static_export_status() -> tuple[bool, str]:
    """Whether PNG/SVG export can run *without downloading anything*, and why not.

    kaleido >= 1 drives an installed Chrome/Chromium (``static_browser``); kaleido 0.x bundles
    its own. We never call ``kaleido.get_chrome`` (a download).
    """
    try:
        version = metadata.version("kaleido")
    except metadata.PackageNotFoundError:
        return False, "kaleido is not installed"
    if int(version.split(".")[0] or 0) < 1:
        return True, f"kaleido {version} (bundled browser)"
    browser = static_browser()
    if not browser:
        return False, f"kaleido {version} found but no Chrome/Chromium for it"
    return True, f"kaleido {version} with {browser}"


_KALEIDO_SERVER = False  # whether this process's kaleido server (one browser for every export) is running


def write_static(items: Sequence[tuple[go.Figure, Path]]) -> list[Path]:
    """Write each (figure, path) as an image (the format is the path's suffix: .png, .svg, .pdf),
    with the browser of ``static_browser`` and MathJax off (its default is a CDN). Raises when
    kaleido or the browser fails; call ``static_export_status`` first.

    kaleido >= 1 starts a browser per call unless its sync server runs: one per process is started
    on first use and kept (kaleido closes it at exit; a killed kernel takes it along with its
    process group). A notebook saves up to 7 figures and a warm grid kernel runs many notebooks,
    so one browser launch (≈ 5 s on 2 cores) per figure would cost a run about 2 minutes; with the
    server a figure's PNG and SVG take under a second. A server that fails is stopped and the call
    retried once in a browser of its own."""
    global _KALEIDO_SERVER
    import kaleido  # imported only when exporting: it starts nothing, but pulls in choreographer

    if int(metadata.version("kaleido").split(".")[0]) < 1:
        for fig, path in items:
            fig.write_image(path)
        return [Path(p) for _, p in items]
    specs = []
    for fig, path in items:
        layout = fig.layout
        specs.append(dict(fig=fig.to_dict(), path=str(path),
                          opts=dict(format=Path(path).suffix.lstrip("."), width=layout.width or 900,
                                    height=layout.height or 520)))
    kopts = dict(path=static_browser(), mathjax=False)
    try:
        if not _KALEIDO_SERVER:
            kaleido.start_sync_server(silence_warnings=True, **kopts)
            _KALEIDO_SERVER = True
        result = kaleido.write_fig_from_object_sync(specs)
        if isinstance(result, BaseException):
            raise result
    except Exception:
        kaleido.stop_sync_server(silence_warnings=True)
        _KALEIDO_SERVER = False
        kaleido.write_fig_from_object_sync(specs, kopts=kopts)
    return [Path(p) for _, p in items]


def _shared_plotlyjs(html: Path) -> str:
    """Write plotly.min.js once into the nearest ``figures`` folder above ``html``; its relative URL.

    Inlining plotly.js (4.8 MB) into every per-run figure would make the full grid's figures
    several GB; one local copy keeps them small and still offline (no CDN).
    """
    from plotly.offline import get_plotlyjs

    folder = next((p for p in html.parents if p.name == "figures"), html.parent)
    js = folder / "plotly.min.js"
    if not js.exists():
        atomic_write_text(js, get_plotlyjs())
    return os.path.relpath(js, html.parent)


def save_figure(fig: go.Figure, path: str | Path, static: bool = True, self_contained: bool = False) -> list[Path]:
    """Write ``path.html`` and, if possible, ``.png``/``.svg``.

    ``self_contained=True`` inlines plotly.js (what 07_compare's figures and the report do);
    otherwise the page loads the one local ``figures/plotly.min.js`` (per-run figures), never a
    CDN. ``path`` is given without suffix (a suffix is replaced). Returns the files written.
    """
    global _NOTICE_SHOWN
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    html = path.with_suffix(".html")
    plotlyjs = True if self_contained else _shared_plotlyjs(html)
    atomic_write_text(html, fig.to_html(include_plotlyjs=plotlyjs, full_html=True, auto_play=False))
    written = [html]
    if static:
        ok, why = static_export_status()
        if ok:
            try:
                written += write_static([(fig, path.with_suffix(ext)) for ext in (".png", ".svg")])
            except Exception as e:  # a broken kaleido must not lose the HTML figures
                if not _NOTICE_SHOWN:
                    print(f"note: PNG/SVG export failed ({type(e).__name__}: {e}); HTML figures only.")
                    _NOTICE_SHOWN = True
        elif not _NOTICE_SHOWN:
            print(f"note: PNG/SVG export skipped ({why}); HTML figures only.")
            _NOTICE_SHOWN = True
    return written


# ---------------------------------------------------------------------------------------------
# Figures for papers.

MAIN_MANIFEST = "main_figures.json"


def machine() -> str:
    """This machine in a few words: CPU model and logical cores (``sources.machine``)."""
    m = sources.machine()
    return f"{m['cpu']}, {m['cores']} cores"


def save_main_figures(figures: dict[str, go.Figure], folder: str | Path, study: str, command: str) -> Path:
    """Keep the report's main figures for ``make figures``: each as plotly JSON
    (``<folder>/07_<name>.json``) and a manifest naming them with the study they show, the
    command and the machine that computed them. Returns the manifest's path."""
    folder = Path(folder)
    files = {}
    for name, fig in figures.items():
        atomic_write_text(folder / f"07_{name}.json", fig.to_json())
        files[name] = f"07_{name}.json"
    manifest = dict(figures=files, study=study, command=command, machine=machine(),
                    created=_dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_text(folder / MAIN_MANIFEST, json.dumps(manifest, indent=1))
    return folder / MAIN_MANIFEST


def stamp(fig: go.Figure, lines: Sequence[str]) -> go.Figure:
    """A copy of ``fig`` with ``lines`` written small under the plot (what made the figure)."""
    fig = go.Figure(fig)
    bottom = (fig.layout.margin.b if fig.layout.margin and fig.layout.margin.b is not None else 80)
    fig.add_annotation(text="<br>".join(lines), xref="paper", yref="paper", x=0, y=0, xanchor="left", yanchor="top",
                       yshift=-(bottom - 14 * len(lines) - 6), showarrow=False, align="left",
                       font=dict(size=9, color="#666"))
    fig.update_layout(margin=dict(b=bottom + 14 * len(lines) + 10))
    return fig


def export_main_figures(preset: str, root: str | Path | None = None, command: str = "") -> list[Path]:
    """``figures/<preset>/paper/<name>.svg`` and ``.png`` of every main figure in the manifest,
    each stamped with its study, the comparison's command and machine, and ``command`` run here
    on this machine. Raises ``FileNotFoundError`` (saying what to run) without a manifest and
    ``RuntimeError`` (saying what to install) without kaleido or a browser."""
    folder = resolve_root(root) / "figures" / preset
    manifest_path = folder / MAIN_MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"no {manifest_path}: run the comparison first (make reproduce PRESET={preset}, or "
                                f"notebook 07 with preset={preset}).")
    ok, why = static_export_status()
    if not ok:
        raise RuntimeError(f"{why}: {INSTALL_HINT}.")
    manifest = json.loads(manifest_path.read_text())
    out = folder / "paper"
    out.mkdir(parents=True, exist_ok=True)
    here = f"exported by `{command}` on {machine()}, {_dt.date.today().isoformat()}" if command else \
        f"exported on {machine()}, {_dt.date.today().isoformat()}"
    lines = [f"initmi · {manifest['study']}", f"computed by `{manifest['command']}` on {manifest['machine']}", here]
    items = []
    for name, file in manifest["figures"].items():
        fig = stamp(go.Figure(json.loads((folder / file).read_text())), lines)
        items += [(fig, out / f"{name}{ext}") for ext in (".svg", ".png")]
    return write_static(items)


def main(argv: list[str] | None = None) -> int:
    """``python -m initmi_utils.plots --preset P [--root DIR]``: the report's main figures as SVG and PNG."""
    parser = argparse.ArgumentParser(prog="python -m initmi_utils.plots",
                                     description="Export the report's main figures to SVG and PNG (kaleido + Chromium).")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--root", default="", help="project root (default: this project)")
    parser.add_argument("--command", default="", help="the command to name on the figures (default: this one)")
    args = parser.parse_args(argv)
    command = args.command or "python -m initmi_utils.plots " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    ok, why = static_export_status()
    if not ok:
        print(f"figures not exported: {why}; {INSTALL_HINT}.", file=sys.stderr)
        return 1
    try:
        written = export_main_figures(args.preset, args.root or None, command)
    except FileNotFoundError as e:
        print(f"figures not exported: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
