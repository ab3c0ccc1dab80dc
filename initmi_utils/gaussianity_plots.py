"""The figure of the distance to the Gaussian over training, per matrix family.

A renderer only, like ``plots``: it draws what ``gaussianity.distance_curves`` computed (a mean per
group, matrix family, ``weights`` and step, with its t-interval) and computes nothing itself.
Colours: pass ``plots.scheme_colors(...)`` for the report's scheme colours; the default is
plotly's qualitative cycle in the order the groups appear.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from initmi_utils.gaussianity import FAMILIES, WEIGHTS

TEMPLATE = "plotly_white"
WEIGHT_TITLES = {"W": "W", "dW": "ΔW = W − W₀"}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return "rgba({},{},{},{})".format(*(int(h[i : i + 2], 16) for i in (0, 2, 4)), alpha)


def distance_figure(curves: pd.DataFrame, title: str, group: str = "scheme", y_title: str = "KS / Gaussian null",
                    colors: dict[str, str] | None = None, null_line: float | None = 1.0,
                    height_per_row: int = 190) -> go.Figure:
    """One row per matrix family (residual-stream order), W on the left and ΔW on the right; a line
    per ``group`` value with its interval as a band where ``n > 1``; log y axis, and a dashed line at
    ``null_line`` (1 = as far as a Gaussian sample of the same size).

    ``curves``: ``gaussianity.distance_curves`` output (``group, matrix, weights, step, mean,
    ci_low, ci_high, n``).
    """
    families = [f for f in FAMILIES if (curves["matrix"] == f).any()]
    groups = list(dict.fromkeys(curves[group].astype(str)))
    palette = qualitative.Plotly + qualitative.D3
    colors = colors or {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    n_rows = max(1, len(families))
    fig = make_subplots(rows=n_rows, cols=len(WEIGHTS), shared_xaxes=True, row_titles=families,
                        column_titles=[WEIGHT_TITLES[w] for w in WEIGHTS], horizontal_spacing=0.06,
                        vertical_spacing=min(0.03, 0.5 / n_rows))
    seen: set[str] = set()
    for r, family in enumerate(families, start=1):
        for c, weights in enumerate(WEIGHTS, start=1):
            part = curves[(curves["matrix"] == family) & (curves["weights"] == weights)]
            for name, s in part.groupby(part[group].astype(str), sort=False):
                s = s.sort_values("step")
                color = colors[name]
                band = s.dropna(subset=["ci_low", "ci_high"])
                if len(band) and int(s["n"].max()) > 1:
                    fig.add_trace(go.Scatter(
                        x=pd.concat([band["step"], band["step"][::-1]]),
                        y=pd.concat([band["ci_high"], band["ci_low"][::-1]]).clip(lower=1e-6),
                        fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), hoverinfo="skip",
                        legendgroup=name, showlegend=False), row=r, col=c)
                fig.add_trace(go.Scatter(
                    x=s["step"], y=s["mean"], mode="lines+markers", marker=dict(size=4),
                    line=dict(color=color, width=2), legendgroup=name, showlegend=name not in seen,
                    name=f"{name} (n={int(s['n'].max())})", customdata=s[["n"]],
                    hovertemplate=f"{name} · {family} {weights}<br>step %{{x}}<br>%{{y:.3g}}"
                                  f"<br>n=%{{customdata[0]}}<extra></extra>"), row=r, col=c)
                seen.add(name)
            if null_line is not None:
                fig.add_hline(y=null_line, line=dict(color="grey", dash="dash", width=1), row=r, col=c)
    fig.update_yaxes(type="log", dtick="D2")  # labels at 1, 2, 5, 10, …: a narrow log range otherwise labels every digit
    fig.update_xaxes(title_text="step", row=n_rows)
    fig.update_yaxes(title_text=y_title, row=(n_rows + 1) // 2, col=1)
    fig.update_layout(template=TEMPLATE, title=title, height=max(400, height_per_row * n_rows),
                      legend_title=f"{group} (band: 95% t-interval over seeds)")
    return fig
