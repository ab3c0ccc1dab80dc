"""The offline HTML report: one file, plotly.js inlined once, readable without server or network.

A report is a list of ``Section``s holding figures, tables, notes and text, in reading order::

    s = Section("RQ1 · training and emergence")
    s.note("2 of 25 expected runs are missing: ...", kind="warning")
    s.figure(fig, "Validation loss, mean over seeds with 95% bootstrap CI")
    s.table(summary, "Emergence step per scheme")
    write_report(path, "initmi · quick", [s])

Each figure is rendered with ``include_plotlyjs=False`` and the library is inlined once in
``<head>``: twenty figures cost one copy of plotly.js (~4.8 MB), not twenty. No element refers to
a URL, so the file renders the same offline (``tests/test_report_browser.py`` opens it in a
headless Chromium with networking disabled and checks that the plots were drawn).

``export_notebook_html`` exports an executed notebook to HTML the same way: nbconvert's lab
template loads require.js, MathJax and mermaid from CDNs, which we drop, so circuitsvis and
plotly outputs (which carry their JavaScript inline) render offline.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from initmi_utils.io import atomic_write

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table.data { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
table.data th { background: #f2f2f2; }
table.data .num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { font-size: 13px; color: #555; margin: .2em 0 .3em 0; }
.note { border-left: 4px solid #3a7bd5; background: #eef4fc; padding: .4em .8em; margin: .6em 0; }
.note.warning { border-color: #d58a3a; background: #fdf3e7; }
.note.error { border-color: #c0392b; background: #fbeaea; }
.figure { margin: .8em 0 1.4em 0; }
nav ul { columns: 2; }
.meta { color: #666; font-size: 13px; }
"""


@dataclass
class Block:
    kind: str  # figure | table | text | note | heading
    content: Any
    caption: str = ""
    level: str = "info"


@dataclass
class Section:
    """A titled part of the report; add blocks in reading order."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def figure(self, fig: go.Figure, caption: str = "") -> "Section":
        self.blocks.append(Block("figure", fig, caption))
        return self

    def table(self, df: pd.DataFrame, caption: str = "", max_rows: int = 200) -> "Section":
        self.blocks.append(Block("table", df.head(max_rows), caption if len(df) <= max_rows
                                 else f"{caption} (first {max_rows} of {len(df)} rows)"))
        return self

    def text(self, text: str) -> "Section":
        self.blocks.append(Block("text", text))
        return self

    def note(self, text: str, kind: str = "info") -> "Section":
        """A highlighted paragraph; ``kind`` is info, warning (missing data) or error."""
        self.blocks.append(Block("note", text, level=kind))
        return self

    def heading(self, text: str) -> "Section":
        self.blocks.append(Block("heading", text))
        return self

    def show(self) -> None:
        """Display the section in a notebook, block by block (what the report will show)."""
        from IPython.display import HTML, Markdown, display

        display(Markdown(f"## {self.title}"))
        for b in self.blocks:
            if b.kind == "figure":
                b.content.show()
                if b.caption:
                    display(Markdown(f"*{b.caption}*"))
            elif b.kind == "table":
                if b.caption:
                    display(Markdown(f"**{b.caption}**"))
                display(HTML(table_html(b.content)))
            elif b.kind == "note":
                display(Markdown(("**Warning:** " if b.level != "info" else "**Note:** ") + b.content))
            elif b.kind == "heading":
                display(Markdown(f"### {b.content}"))
            else:
                display(Markdown(b.content))


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "—"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return str(v)


def table_html(df: pd.DataFrame) -> str:
    """A plain HTML table (numbers right-aligned to 4 significant digits, text left, missing —)."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    align = lambda num: ' class="num"' if num else ""  # noqa: E731
    head = "".join(f"<th{align(n)}>{html.escape(str(c))}</th>" for c, n in zip(df.columns, numeric))
    rows = "".join(
        "<tr>" + "".join(f"<td{align(n)}>{html.escape(_fmt(v))}</td>" for v, n in zip(r, numeric)) + "</tr>"
        for r in df.itertuples(index=False, name=None)
    )
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _anchor(i: int) -> str:
    return f"sec{i}"


def render_report(title: str, sections: list[Section], meta: str = "") -> str:
    """The whole report as one HTML string (plotly.js inlined once, in ``<head>``)."""
    from plotly.offline import get_plotlyjs

    body, fig_i = [], 0
    for i, s in enumerate(sections):
        body.append(f'<h2 id="{_anchor(i)}">{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if b.kind == "figure":
                fig_i += 1
                div = b.content.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{fig_i}",
                                        config={"displaylogo": False})
                cap = f'<div class="caption">{html.escape(b.caption)}</div>' if b.caption else ""
                body.append(f'<div class="figure">{div}{cap}</div>')
            elif b.kind == "table":
                cap = f'<div class="caption">{html.escape(b.caption)}</div>' if b.caption else ""
                body.append(cap + (table_html(b.content) if len(b.content) else "<p><em>(empty)</em></p>"))
            elif b.kind == "note":
                body.append(f'<div class="note {html.escape(b.level)}">{_paragraphs(b.content)}</div>')
            elif b.kind == "heading":
                body.append(f"<h3>{html.escape(b.content)}</h3>")
            else:
                body.append(_paragraphs(b.content))
    toc = "".join(f'<li><a href="#{_anchor(i)}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(meta)} · generated {stamp}</p>\n"
        f"<nav><ul>{toc}</ul></nav>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report(path: str | Path, title: str, sections: list[Section], meta: str = "") -> Path:
    """Render and write the report atomically; returns its path."""
    path, text = Path(path), render_report(title, sections, meta)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    path.chmod(0o644)  # atomic_write's temporary file is private; a report is for reading
    return path


_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_notebook_html(notebook: str | Path, out: str | Path) -> Path:
    """Export an executed notebook to one offline HTML file (no CDN scripts from the template).

    The lab template's require.js, MathJax and mermaid come from cdnjs; dropping them costs
    LaTeX rendering in markdown cells and nothing else our notebooks use.
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"initmi_offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="initmi_offline.html.j2")
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    out = Path(out)
    atomic_write(out, lambda p: p.write_text(body, encoding="utf-8"))
    out.chmod(0o644)
    return out
