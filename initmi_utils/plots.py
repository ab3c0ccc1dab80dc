"""Plotly figure builders shared by the notebooks, and the one way figures are saved.

Builders are renderers only: they take a tidy frame that already holds what to draw (a mean and
its interval, a fraction per step, a value per layer and head) and return a ``go.Figure``. The
numbers come from ``behavior`` / ``compare``; nothing here computes a statistic, so a figure can
never disagree with the table printed next to it.

``save_figure`` writes each figure as one self-contained HTML file (plotly.js inlined, never the
CDN, so it opens offline) and, only when kaleido *and* a browser for it are already installed,
as PNG and SVG too; otherwise it prints a one-line notice once. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

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


# ---------------------------------------------------------------------------------------------
# Saving.

_NOTICE_SHOWN = False


def static_export_status() -> tuple[bool, str]:
    """Whether PNG/SVG export can run *without downloading anything*, and why not.

    kaleido >= 1 drives an installed Chrome/Chromium (found via ``BROWSER_PATH`` or the usual
    names); kaleido 0.x bundles its own. We never call ``kaleido.get_chrome`` (a download).
    """
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, "kaleido is not installed"
    version = getattr(kaleido, "__version__", "0")
    if int(str(version).split(".")[0] or 0) < 1:
        return True, f"kaleido {version} (bundled browser)"
    browser = os.environ.get("BROWSER_PATH") or next(
        (b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)
    if not browser:
        return False, f"kaleido {version} found but no Chrome/Chromium for it"
    return True, f"kaleido {version} with {browser}"


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
    atomic_write_text(html, fig.to_html(include_plotlyjs=plotlyjs, full_html=True))
    written = [html]
    if static:
        ok, why = static_export_status()
        if ok:
            for ext in (".png", ".svg"):
                try:
                    fig.write_image(path.with_suffix(ext))
                    written.append(path.with_suffix(ext))
                except Exception as e:  # a broken kaleido must not lose the HTML figures
                    if not _NOTICE_SHOWN:
                        print(f"note: PNG/SVG export failed ({type(e).__name__}: {e}); HTML figures only.")
                        _NOTICE_SHOWN = True
                    break
        elif not _NOTICE_SHOWN:
            print(f"note: PNG/SVG export skipped ({why}); HTML figures only.")
            _NOTICE_SHOWN = True
    return written
