"""What every notebook builder shares: the run parameters, the notebook shell, cell helpers.

The builders (``build_*.py``) are the source of the notebooks: edit cells there, run the builder,
commit both. Cell ids are stable so that regenerating a notebook does not churn its diff.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent

# The parameters every per-run notebook starts with (papermill: literals only, and no '=' in comments).
RUN_PARAMETERS = '''\
init_scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ".."  # project root: artefacts go to root/checkpoints, root/data, root/figures
'''


def notebook(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, c in enumerate(nb.cells):
        c.id = f"cell-{i:02d}"
    return nb


def parameters(source: str) -> nbformat.NotebookNode:
    cell = new_code_cell(source.strip())
    cell.metadata["tags"] = ["parameters"]
    return cell


def run_parameters(extra: str = "") -> nbformat.NotebookNode:
    """The per-run parameters cell: ``RUN_PARAMETERS`` plus the notebook's own knobs."""
    return parameters(RUN_PARAMETERS + extra)


def code(source: str) -> nbformat.NotebookNode:
    return new_code_cell(source.strip())


def md(source: str) -> nbformat.NotebookNode:
    return new_markdown_cell(source.strip())


def write(nb: nbformat.NotebookNode, name: str) -> None:
    nbformat.validate(nb)
    nbformat.write(nb, str(NOTEBOOKS / name))
    print("wrote", NOTEBOOKS / name)
