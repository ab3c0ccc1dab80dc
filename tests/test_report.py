"""The report's page and the notebook exporter, without a browser: the findings open the page and
the evidence is folded, every table has its CSV, headers are words and numbers are rounded for
reading; an executed notebook's plotly outputs are drawn from their JSON with plotly.js once; the
command line fails with one line; signing marks a notebook trusted; the paper figures are
exported with what made them. (``tests/test_report_browser.py`` opens the same pages in Chromium.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from nbformat.sign import NotebookNotary
from plotly.offline import get_plotlyjs

from initmi_utils import plots
from initmi_utils.report import (PLOTLY_MIMETYPE, Section, export_notebook_html, format_cell, main, sign_notebook,
                                 table_html, words, write_report)

PLOTLYJS_MARK = get_plotlyjs()[:200]  # the head of the library: counts its copies in a page


def test_numbers_are_rounded_for_reading():
    assert format_cell(1050.0) == "1050" and format_cell(np.int64(1050)) == "1050"
    assert format_cell(12345.678) == "12346" and format_cell(123.456) == "123" and format_cell(1.23456) == "1.23"
    assert format_cell(0.012345) == "0.0123" and format_cell(0.5) == "0.5" and format_cell(2.0) == "2"
    assert format_cell(float("nan")) == "—" and format_cell(None) == "—" and format_cell(float("inf")) == "not reached"
    assert format_cell(True) == "yes" and format_cell("classic_induction 2") == "classic_induction 2"


def test_column_headers_are_words():
    assert words("p_holm") == "Holm p" and words("ci_low") == "95% interval low" and words("n_a") == "n (scheme)"
    assert words("final val_loss [95% t-interval]") == "final validation loss [95% t-interval]"
    long = words("ablation: localisation_top1_share_layer heldout_mean_ablation_logit_diff_delta L1 (step-matched)")
    assert "_" not in long and "layer 1" in long and long.startswith("ablation: top-1 share per layer")
    assert words("fraction_emerged") == "fraction emerged"  # not listed: underscores become spaces
    assert words("weight_kurtosis W_E") == "weight kurtosis W_E"  # weights keep their names
    html = table_html(pd.DataFrame({"p_holm": [0.04], "emergence_step": [1050.0]}))
    assert "<th class=\"num\">Holm p</th>" in html and ">1050<" in html and "p_holm" not in html


def _figure(y) -> go.Figure:
    return go.Figure(go.Scatter(y=y))


def test_the_report_opens_with_the_answers_and_folds_the_evidence(tmp_path):
    big = pd.DataFrame({"run": [f"r{i}" for i in range(250)], "p_holm": np.linspace(0, 1, 250)})
    findings = Section("Findings", key="findings")
    findings.text("Preset x: 35 of 35 runs usable.")
    findings.finding("RQ1 · a question", ["No difference in the emergence step across schemes (p = 0.5)."],
                     _figure([1, 2]), "the figure")
    browsers = Section("Head browser").choice({"normal": _figure([1, 3]), "xavier": _figure([3, 1])}, "run")
    details = Section("RQ1 · details", folded=True).table(big, "All tests.")
    details.figure(_figure([2, 2]))
    folder = tmp_path / "report_tables"
    folder.mkdir()
    (folder / "99-stale.csv").write_text("old")  # a table an earlier report had
    path = write_report(tmp_path / "report.html", "t", [findings, browsers, details])
    html = path.read_text(encoding="utf-8")
    body = html[html.index("</nav>"):]  # the contents list names every section first
    assert body.index('id="findings"') < body.index("Head browser") < body.index("<details") < body.index("All tests.")
    assert html.count(PLOTLYJS_MARK) == 1 and html.count('<div class="figure">') == 4
    assert html.count('class="choice-panel"') == 2 and html.count(" hidden>") == 1  # one browser shown at a time
    assert "(first 200 of 250 rows; all in the CSV)" in html and ">Holm p<" in html
    csvs = sorted(p.name for p in folder.glob("*.csv"))
    assert csvs == ["03-rq1-details-01.csv"]  # the stale one is gone
    assert 'href="report_tables/03-rq1-details-01.csv"' in html
    assert len(pd.read_csv(folder / csvs[0])) == 250  # every row, not the 200 shown


def _plotly_output(fig: go.Figure) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("display_data", data={PLOTLY_MIMETYPE: json.loads(fig.to_json()),
                                                        "text/plain": "Figure()"})


def _notebook(path: Path, outputs) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("fig.show()", outputs=outputs)]
    nbformat.write(nb, str(path))
    return path


def test_the_exporter_draws_plotly_outputs_from_their_json_with_one_plotlyjs(tmp_path):
    fig = _figure([1, 2, 3])
    fig.frames = [go.Frame(name="a", data=[go.Scatter(y=[3, 2, 1])])]
    outputs = [_plotly_output(fig), _plotly_output(_figure([4, 5])),
               nbformat.v4.new_output("display_data", data={"text/html": "<b id='plain-html'>hi</b>"})]
    page = export_notebook_html(_notebook(tmp_path / "nb.ipynb", outputs), tmp_path / "nb.html")
    html = page.read_text(encoding="utf-8")
    assert html.count(PLOTLYJS_MARK) == 1
    assert 'Plotly.newPlot("plotly-output-1"' in html and 'Plotly.newPlot("plotly-output-2"' in html
    assert "Plotly.addFrames" in html and 'id="plain-html"' in html
    assert "cdnjs" not in html and "require.min.js" not in html and "unpkg" not in html
    # Without plotly outputs there is no plotly.js to carry.
    plain = export_notebook_html(_notebook(tmp_path / "plain.ipynb", outputs[2:]), tmp_path / "plain.html")
    assert PLOTLYJS_MARK not in plain.read_text(encoding="utf-8")


def test_plain_nbconvert_shows_no_plotly_figure(tmp_path):
    """What the README warns about: nbconvert's own HTML has no drawing of a plotly output."""
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(_notebook(tmp_path / "nb.ipynb", [_plotly_output(_figure([1, 2]))])), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert "Plotly.newPlot" not in body and PLOTLYJS_MARK not in body


def test_the_command_line_exports_and_fails_with_one_line(tmp_path, capsys):
    nb = _notebook(tmp_path / "nb.ipynb", [_plotly_output(_figure([1, 2]))])
    assert main(["export", str(nb)]) == 0 and (tmp_path / "nb.html").exists()
    assert main(["export", str(nb), "-o", str(tmp_path / "out.html")]) == 0 and (tmp_path / "out.html").exists()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "missing.ipynb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.ipynb does not exist" in err
    (tmp_path / "bad.ipynb").write_text("not json")
    assert main(["export", str(tmp_path / "bad.ipynb")]) == 2
    assert "is not a readable notebook" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "initmi_utils.report", "export", str(tmp_path / "missing.ipynb")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_signing_marks_a_notebook_trusted(tmp_path):
    nb_path = _notebook(tmp_path / "nb.ipynb", [nbformat.v4.new_output("display_data", data={"text/html": "<b>x</b>"})])
    (tmp_path / "jupyter").mkdir()
    notary = NotebookNotary(data_dir=str(tmp_path / "jupyter"))
    assert not notary.check_signature(nbformat.read(str(nb_path), as_version=4))
    sign_notebook(nb_path, tmp_path / "jupyter")
    assert notary.check_signature(nbformat.read(str(nb_path), as_version=4))
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[1].outputs[0].data["text/html"] = "<b>changed</b>"  # an edited notebook is not trusted
    assert not notary.check_signature(nb)


# ---------------------------------------------------------------------------------------------
# Figures for papers.


def test_export_status_reads_the_installed_kaleido_and_never_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    ok, why = plots.static_export_status()
    assert not ok and "no Chrome/Chromium" in why and "kaleido 1." in why
    assert plots.static_browser() is None


def test_make_figures_says_what_is_missing_in_one_line(tmp_path, capsys, monkeypatch):
    assert plots.main(["--preset", "smoke", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("run the comparison first" in err or "install" in err)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    assert plots.main(["--preset", "smoke", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install chromium" in err and "kaleido" in err


@pytest.mark.slow
@pytest.mark.skipif(not plots.static_export_status()[0], reason="kaleido >= 1 and a Chromium are not installed")
def test_main_figures_are_exported_with_the_machine_and_the_command(tmp_path):
    folder = tmp_path / "figures" / "smoke"
    fig = go.Figure(go.Bar(x=["normal", "xavier"], y=[3, 5]))
    plots.save_main_figures({"finding_rq1": fig}, folder, "preset smoke, seeds 0", "python -m initmi_utils.pipeline x")
    written = plots.export_main_figures("smoke", tmp_path, "make figures PRESET=smoke")
    assert sorted(p.name for p in written) == ["finding_rq1.png", "finding_rq1.svg"]
    svg = (folder / "paper" / "finding_rq1.svg").read_text()
    cpu = plots.machine().split(",")[0]
    assert "make figures PRESET=smoke" in svg and cpu[:20] in svg and "python -m initmi_utils.pipeline x" in svg
    assert (folder / "paper" / "finding_rq1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
