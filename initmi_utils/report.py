"""The offline HTML report: one file, plotly.js inlined once, readable without server or network.

A report is a list of ``Section``s holding figures, tables, notes and text, in reading order::

    s = Section("RQ1 · training and emergence", folded=True)
    s.note("2 of 25 expected runs are missing: ...", kind="warning")
    s.figure(fig, "Validation loss, mean over seeds with its 95% t-interval")
    s.table(summary, "Emergence step per scheme")
    write_report(path, "initmi · quick", [findings, s])

A paper's order: sections that answer come first and open (``Section.finding``: a question's
sentences beside its one figure; ``Section.choice``: one of several figures picked with a
selector); the evidence follows in folded sections (``folded=True``, rendered as ``<details>``).
``write_report`` also writes every table it shows to a CSV beside the report
(``<report>_tables/``) and links it under the table. Column headers are shown in words
(``words``: ``val_loss`` → "validation loss") and numbers rounded for reading (``format_cell``).

Each figure is rendered with ``include_plotlyjs=False`` and the library is inlined once in
``<head>``: twenty figures cost one copy of plotly.js (~4.8 MB), not twenty. No element refers to
a URL, so the file renders the same offline (``tests/test_report_browser.py`` opens it in a
headless Chromium with networking disabled and checks that the plots were drawn).

``export_notebook_html`` exports an executed notebook to one offline HTML file: nbconvert's lab
template loads require.js, MathJax, mermaid and the widget manager from CDNs, which are dropped,
and it shows nothing for plotly's own output type (``application/vnd.plotly.v1+json``, what a
figure's ``show()`` writes in JupyterLab), so every such output is rendered from its JSON with
plotly.js inlined once; circuitsvis views carry their JavaScript inline and render as they are.
On the command line::

    python -m initmi_utils.report export NOTEBOOK [-o OUT]

``sign_notebook`` signs an executed notebook the way ``jupyter trust`` does, so JupyterLab runs
the scripts of its HTML outputs (circuitsvis views) when it is opened.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nbformat
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jupyter_core.paths import jupyter_data_dir
from nbformat.sign import NotebookNotary
from plotly.offline import get_plotlyjs

from initmi_utils.io import atomic_write

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1240px;
       padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 1.6em; }
h3 { margin-top: 1.4em; }
table.data { border-collapse: collapse; font-size: 13px; margin: .5em 0 .2em 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
table.data th { background: #f2f2f2; }
table.data .num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { font-size: 13px; color: #555; margin: .2em 0 .3em 0; }
.csv { font-size: 12px; margin: 0 0 1em 0; }
.note { border-left: 4px solid #3a7bd5; background: #eef4fc; padding: .4em .8em; margin: .6em 0; }
.note.warning { border-color: #d58a3a; background: #fdf3e7; }
.note.error { border-color: #c0392b; background: #fbeaea; }
.figure { margin: .8em 0 1.4em 0; }
nav ul { columns: 2; }
.meta { color: #666; font-size: 13px; }
.finding { display: grid; grid-template-columns: minmax(300px, 2fr) 3fr; gap: 1.6em; align-items: start;
           border-bottom: 1px solid #e3e3e3; padding-bottom: .6em; }
.finding h3 { margin-top: .8em; }
.finding p { margin: .45em 0; }
.finding .figure { margin: .4em 0 .2em 0; }
details.report-section { margin: .4em 0; border-top: 1px solid #ddd; }
details.report-section > summary { cursor: pointer; padding: .3em 0; }
details.report-section > summary h2 { display: inline; border: none; font-size: 1.25em; }
.choice select { font-size: 14px; margin: 0 .5em .5em .3em; }
"""

# One script for the page: open the folded section a link points to, and redraw the plots of a
# section or a choice panel when it becomes visible (plotly sizes a hidden plot to a default).
_PAGE_JS = """
(function () {
  function redraw(root) {
    if (window.Plotly) root.querySelectorAll('.js-plotly-plot').forEach(function (g) { Plotly.Plots.resize(g); });
  }
  document.querySelectorAll('details.report-section').forEach(function (d) {
    d.addEventListener('toggle', function () { if (d.open) redraw(d); });
  });
  function openTarget() {
    var t = location.hash && document.getElementById(location.hash.slice(1));
    if (t && t.tagName === 'DETAILS') t.open = true;
  }
  window.addEventListener('hashchange', openTarget);
  openTarget();
  document.querySelectorAll('select.choice-select').forEach(function (sel) {
    sel.addEventListener('change', function () {
      sel.closest('.choice').querySelectorAll('.choice-panel').forEach(function (p) {
        p.hidden = p.dataset.index !== sel.value;
        if (!p.hidden) redraw(p);
      });
    });
  });
})();
"""


# =============================================================================================
# Words and numbers for readers.

# Identifiers in column headers, as words. A header is translated token by token (tokens are
# separated by spaces); what is not listed keeps its name with underscores as spaces.
WORDS = {
    "a": "scheme", "b": "reference", "n_a": "n (scheme)", "n_b": "n (reference)",
    "mean_a": "mean (scheme)", "mean_b": "mean (reference)", "median_a": "median (scheme)",
    "median_b": "median (reference)", "z": "log-rank z", "k": "schemes tested",
    "ci_low": "95% interval low", "ci_high": "95% interval high", "p_holm": "Holm p",
    "p_floor": "smallest attainable p", "p_asymptotic": "p (normal approximation)",
    "p_within": "p within schemes", "p_within_holm": "Holm p within schemes", "rho": "Spearman ρ",
    "rho_within": "Spearman ρ within schemes", "median_level": "interval level",
    "median_low": "median interval low", "median_high": "median interval high",
    "restricted_mean": "restricted mean", "restricted_low": "restricted mean low",
    "restricted_high": "restricted mean high", "mean_emerged": "mean step of emerged",
    "mean_emerged_low": "mean step of emerged low", "mean_emerged_high": "mean step of emerged high",
    "fraction_emerged": "fraction emerged", "emergence_step": "emergence step", "val_loss": "validation loss",
    "train_loss": "training loss", "val_acc_induction": "induction accuracy",
    "val_acc_induction_unambiguous": "induction accuracy (unambiguous targets)",
    "val_acc_induction_short": "induction accuracy, short copies", "val_acc_induction_long": "induction accuracy, long copies",
    "rep_acc_induction": "induction accuracy on BOS + A + A", "val_logit_diff": "logit difference",
    "val_loss_induction": "loss on induction targets", "induction_score": "induction score",
    "prev_token_score": "previous-token score", "duplicate_score": "duplicate-token score", "bos_score": "BOS score",
    "attn_entropy": "attention entropy", "resid_norm": "residual norm", "effective_rank": "effective rank",
    "drift": "drift from init", "weight_std": "weight std", "weight_kurtosis": "weight kurtosis",
    "localisation_top1_share": "top-1 share", "localisation_top1_share_layer": "top-1 share per layer",
    "localisation_entropy": "entropy of effects", "localisation_entropy_layer": "entropy of effects per layer",
    "zero_ablation_logit_diff_delta": "zero ablation Δ logit difference",
    "heldout_mean_ablation_logit_diff_delta": "mean ablation (held-out means) Δ logit difference",
    "zero_ablation_loss_delta": "zero ablation Δ loss", "first_rank1_layer": "first layer at rank 1",
    "ov_copying_score": "OV copying score", "k_composition_z": "K-composition z",
    "classic_induction": "classic induction", "shifted_induction": "shifted induction",
    "long_offset_recall": "long-offset recall", "same_scheme": "same scheme", "loss_gap": "loss gap",
    "ablation_distance": "ablation-profile distance", "role_disagreement": "role disagreement",
    "cka_final": "CKA, last layer", "after_emergence": "after emergence",
    "embed": "embedding", "pattern_similarity_to_donor": "pattern similarity to donor",
    "ablation_share": "ablation share", "cka_to_donor": "CKA to donor",
}


def words(name: Any) -> str:
    """A column header in words: ``p_holm`` → "Holm p", ``final val_loss [95% t-interval]`` →
    "final validation loss [95% t-interval]", ``L1`` → "layer 1"; other underscores become spaces."""
    text = str(name)
    if text in WORDS:
        return WORDS[text]

    def one(token: str) -> str:
        core = token.rstrip(":,")
        tail = token[len(core):]
        if core in WORDS:
            return WORDS[core] + tail
        if re.fullmatch(r"L\d+", core):
            return f"layer {core[1:]}" + tail
        if re.fullmatch(r"W_[A-Za-z]+", core):  # a weight keeps the field's name (W_Q, W_OV)
            return token
        return token.replace("_", " ")

    return " ".join(one(t) for t in text.split(" "))


def format_cell(v: Any) -> str:
    """A table cell for reading: integers as they are (a step of 1050 stays "1050", never
    1.05e+03), other numbers to 3 significant digits without exponent from 0.0001 up, missing
    as "—"; text as it is."""
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "not reached" if v > 0 else "−∞"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.{max(0, 2 - int(math.floor(math.log10(abs(v)))))}f}"
        if abs(v) >= 1e-4:
            return f"{v:.3g}"
        return f"{v:.2g}"
    return str(v)


def table_html(df: pd.DataFrame) -> str:
    """A plain HTML table: headers in words, numbers right-aligned and rounded for reading
    (``format_cell``), text left, missing —."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    align = lambda num: ' class="num"' if num else ""  # noqa: E731
    head = "".join(f"<th{align(n)}>{html.escape(words(c))}</th>" for c, n in zip(df.columns, numeric))
    rows = "".join(
        "<tr>" + "".join(f"<td{align(n)}>{html.escape(format_cell(v))}</td>" for v, n in zip(r, numeric)) + "</tr>"
        for r in df.itertuples(index=False, name=None)
    )
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


# =============================================================================================
# Sections.


@dataclass
class Block:
    kind: str  # figure | table | text | note | heading | finding | choice | links
    content: Any
    caption: str = ""
    level: str = "info"
    data: Any = None  # a table's full frame (content holds the rows shown); a finding's sentences
    title: str = ""


@dataclass
class Section:
    """A titled part of the report; add blocks in reading order. ``folded`` sections are
    rendered closed (``<details>``): the evidence behind the answers, out of the reader's way."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    folded: bool = False
    key: str = ""  # the section's HTML id (default: its position)

    def figure(self, fig: go.Figure, caption: str = "") -> "Section":
        self.blocks.append(Block("figure", fig, caption))
        return self

    def table(self, df: pd.DataFrame, caption: str = "", max_rows: int = 200) -> "Section":
        """A table; the report shows its first ``max_rows`` rows and links a CSV of all of them."""
        self.blocks.append(Block("table", df.head(max_rows), caption if len(df) <= max_rows
                                 else f"{caption} (first {max_rows} of {len(df)} rows; all in the CSV)", data=df))
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

    def finding(self, question: str, sentences: Sequence[str], fig: go.Figure | None = None,
                caption: str = "") -> "Section":
        """One question's answer: its sentences beside the one figure that shows it."""
        self.blocks.append(Block("finding", fig, caption, data=list(sentences), title=question))
        return self

    def choice(self, options: dict[str, go.Figure], label: str, caption: str = "") -> "Section":
        """Several figures of which the reader sees one, picked with a selector labelled ``label``."""
        self.blocks.append(Block("choice", dict(options), caption, title=label))
        return self

    def links(self, links: Sequence[tuple[str, str]], caption: str = "") -> "Section":
        """A list of (text, relative URL) links, e.g. the CSV files behind the report."""
        self.blocks.append(Block("links", list(links), caption))
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
            elif b.kind == "finding":
                display(Markdown(f"### {b.title}\n\n" + "\n\n".join(b.data)))
                if b.content is not None:
                    b.content.show()
                if b.caption:
                    display(Markdown(f"*{b.caption}*"))
            elif b.kind == "choice":
                for name, fig in b.content.items():
                    display(Markdown(f"**{b.title}: {name}**"))
                    fig.show()
            elif b.kind == "links":
                display(Markdown(b.caption + "\n\n" + "\n".join(f"- [{t}]({u})" for t, u in b.content)))
            else:
                display(Markdown(b.content))


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "section"


def _anchor(i: int, s: Section) -> str:
    return s.key or f"sec{i}"


def table_files(sections: Sequence[Section]) -> dict[tuple[int, int], str]:
    """The CSV file name of every table block, keyed by (section index, block index)."""
    out = {}
    for i, s in enumerate(sections):
        k = 0
        for j, b in enumerate(s.blocks):
            if b.kind == "table":
                k += 1
                out[(i, j)] = f"{i + 1:02d}-{_slug(s.title)}-{k:02d}.csv"
    return out


class _Figures:
    """Figure divs numbered in page order (``figure-1`` …), plotly.js left out (it is in <head>)."""

    def __init__(self):
        self.n = 0

    def div(self, fig: go.Figure, caption: str = "") -> str:
        self.n += 1
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n}",
                          config={"displaylogo": False}, auto_play=False)
        cap = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
        return f'<div class="figure">{div}{cap}</div>'


def _block_html(b: Block, figures: _Figures, csv: str | None) -> str:
    if b.kind == "figure":
        return figures.div(b.content, b.caption)
    if b.kind == "table":
        cap = f'<div class="caption">{html.escape(b.caption)}</div>' if b.caption else ""
        link = f'<div class="csv"><a href="{html.escape(csv)}">CSV</a></div>' if csv else ""
        return cap + (table_html(b.content) if len(b.content) else "<p><em>(empty)</em></p>") + link
    if b.kind == "note":
        return f'<div class="note {html.escape(b.level)}">{_paragraphs(b.content)}</div>'
    if b.kind == "heading":
        return f"<h3>{html.escape(b.content)}</h3>"
    if b.kind == "finding":
        text = "".join(f"<p>{html.escape(s)}</p>" for s in b.data)
        fig = figures.div(b.content, b.caption) if b.content is not None else ""
        return (f'<div class="finding"><div class="finding-text"><h3>{html.escape(b.title)}</h3>{text}</div>'
                f'<div class="finding-figure">{fig}</div></div>')
    if b.kind == "choice":
        names = list(b.content)
        options = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, n in enumerate(names))
        panels = "".join(f'<div class="choice-panel" data-index="{i}"{" hidden" if i else ""}>'
                         f'{figures.div(b.content[n])}</div>' for i, n in enumerate(names))
        cap = f'<div class="caption">{html.escape(b.caption)}</div>' if b.caption else ""
        return (f'<div class="choice"><label>{html.escape(b.title)}<select class="choice-select">{options}</select>'
                f"</label>{cap}{panels}</div>")
    if b.kind == "links":
        items = "".join(f'<li><a href="{html.escape(u)}">{html.escape(t)}</a></li>' for t, u in b.content)
        return (_paragraphs(b.caption) if b.caption else "") + f'<ul class="links">{items}</ul>'
    return _paragraphs(b.content)


def render_report(title: str, sections: list[Section], meta: str = "",
                  csv_links: dict[tuple[int, int], str] | None = None) -> str:
    """The whole report as one HTML string (plotly.js inlined once, in ``<head>``).

    ``csv_links``: (section index, block index) → the relative URL of that table's CSV."""
    figures, body = _Figures(), []
    for i, s in enumerate(sections):
        inner = "\n".join(_block_html(b, figures, (csv_links or {}).get((i, j))) for j, b in enumerate(s.blocks))
        if s.folded:
            body.append(f'<details class="report-section" id="{_anchor(i, s)}"><summary><h2>{html.escape(s.title)}'
                        f"</h2></summary>\n{inner}\n</details>")
        else:
            body.append(f'<section class="report-section" id="{_anchor(i, s)}"><h2>{html.escape(s.title)}</h2>\n'
                        f"{inner}\n</section>")
    toc = "".join(f'<li><a href="#{_anchor(i, s)}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(meta)} · generated {stamp}</p>\n"
        f"<nav><ul>{toc}</ul></nav>\n" + "\n".join(body) +
        f"\n<script type=\"text/javascript\">{_PAGE_JS}</script>\n</body>\n</html>\n"
    )


def write_report(path: str | Path, title: str, sections: list[Section], meta: str = "") -> Path:
    """Render and write the report atomically, with every table it shows as a CSV in
    ``<report stem>_tables/`` beside it (linked under each table); returns the report's path."""
    path = Path(path)
    files = table_files(sections)
    folder = path.parent / f"{path.stem}_tables"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):  # tables of an earlier report that this one no longer has
        if old.name not in set(files.values()):
            old.unlink()
    for (i, j), name in files.items():
        b = sections[i].blocks[j]
        frame = b.data if b.data is not None else b.content
        atomic_write(folder / name, lambda p, f=frame: f.to_csv(p, index=False))
    links = {k: f"{folder.name}/{v}" for k, v in files.items()}
    text = render_report(title, sections, meta, links)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    path.chmod(0o644)  # atomic_write's temporary file is private; a report is for reading
    return path


# =============================================================================================
# Executed notebooks: offline HTML, trust.

_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{{ resources.get('initmi_plotlyjs', '') }}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element (no "</" can close it)."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def plotly_output_html(spec: dict, div_id: str) -> str:
    """A plotly output (its ``application/vnd.plotly.v1+json`` data: data, layout, frames,
    config) as a div and the script that draws it with the page's plotly.js."""
    height = (spec.get("layout") or {}).get("height") or 360  # JupyterLab's renderer's default
    return (f'<div id="{div_id}" class="plotly-graph-div" style="height:{int(height)}px; width:100%;"></div>'
            f'<script type="text/javascript">(function () {{ var s = {_script_json(spec)};'
            f' Plotly.newPlot("{div_id}", s.data || [], s.layout || {{}},'
            f' Object.assign({{responsive: true, displaylogo: false}}, s.config || {{}}))'
            f'.then(function (gd) {{ if (s.frames) return Plotly.addFrames(gd, s.frames); }}); }})();</script>')


def with_plotly_html(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A copy of ``nb`` whose plotly outputs also carry ``text/html`` that draws them (replacing
    any HTML they had: plotly's notebook renderer needs require.js from a CDN), and how many."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            spec = out.get("data", {}).get(PLOTLY_MIMETYPE)
            if spec is None:
                continue
            n += 1
            out["data"]["text/html"] = plotly_output_html(spec, f"plotly-output-{n}")
            out["data"].pop(PLOTLY_MIMETYPE)
    return nb, n


def export_notebook_html(notebook: str | Path, out: str | Path) -> Path:
    """Export an executed notebook to one offline HTML file: plotly outputs drawn from their JSON
    with plotly.js inlined once (from the installed plotly, only when there is a plotly output),
    circuitsvis views as they are, no CDN script from the template.

    The lab template's require.js, MathJax, mermaid and widget manager come from CDNs; dropping
    them costs LaTeX rendering in markdown cells and nothing else our notebooks use. Plain
    ``jupyter nbconvert --to html`` keeps them and shows no plotly figure at all.
    """
    import jinja2  # nbconvert takes seconds to import: only when exporting
    from nbconvert import HTMLExporter

    nb, n_plotly = with_plotly_html(nbformat.read(str(notebook), as_version=4))
    resources = {"initmi_plotlyjs": (
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>") if n_plotly else ""}
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"initmi_offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="initmi_offline.html.j2")
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    out = Path(out)
    atomic_write(out, lambda p: p.write_text(body, encoding="utf-8"))
    out.chmod(0o644)
    return out


def sign_notebook(path: str | Path, data_dir: str | Path | None = None) -> None:
    """Mark an executed notebook as trusted, as ``jupyter trust`` does: its signature goes into
    the notary's database in ``data_dir`` (default: Jupyter's data directory, the one JupyterLab
    reads), so JupyterLab runs the scripts of its HTML outputs (circuitsvis views) when it is
    opened on this machine. The file itself is not changed."""
    data_dir = Path(data_dir) if data_dir is not None else Path(jupyter_data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    NotebookNotary(data_dir=str(data_dir)).sign(nbformat.read(str(path), as_version=4))


# =============================================================================================
# Command line.


def main(argv: list[str] | None = None) -> int:
    """``python -m initmi_utils.report export NOTEBOOK [-o OUT]``: one offline HTML file."""
    parser = argparse.ArgumentParser(prog="python -m initmi_utils.report",
                                     description="Offline HTML of executed notebooks (plotly figures and circuitsvis "
                                                 "views included; plain `jupyter nbconvert` shows no plotly figure).")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write one offline HTML file of an executed notebook")
    export.add_argument("notebook", help="an executed .ipynb")
    export.add_argument("-o", "--out", help="the HTML file to write (default: the notebook's path with .html)")
    args = parser.parse_args(argv)
    src = Path(args.notebook)
    out = Path(args.out) if args.out else src.with_suffix(".html")
    if not src.is_file():
        print(f"error: notebook {src} does not exist.", file=sys.stderr)
        return 2
    try:
        nbformat.read(str(src), as_version=4)
    except Exception as e:  # not JSON, not a notebook: say so in one line
        print(f"error: {src} is not a readable notebook ({type(e).__name__}: {str(e).splitlines()[0][:200]}).",
              file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"error: the folder of {out} does not exist.", file=sys.stderr)
        return 2
    export_notebook_html(src, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
