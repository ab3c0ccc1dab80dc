from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook, new_code_cell, new_markdown_cell
cells = [
new_markdown_cell("""# 01 · Train one run

Trains one (init scheme, seed) run of a preset, or resumes it from its last checkpoint, or loads it if it
already finished. Checkpoints go to `checkpoints/<preset>/<scheme>/seed<k>/` (safetensors, self-describing),
the metrics table to `data/runs/<preset>/<scheme>/seed<k>/metrics.parquet`.

Run the whole grid with `python -m initmi_utils.pipeline --preset quick`; run this notebook alone from
JupyterLab after editing the parameters below."""),
new_code_cell("""init_scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | ...
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ".."  # project root: artefacts go to root/checkpoints, root/data, root/figures""", metadata={"tags": ["parameters"]}),
new_code_cell("""import plotly.express as px

from initmi_utils.config import RunPaths, experiment
from initmi_utils.plots import save_figure
from initmi_utils.schemes import SCHEMES
from initmi_utils.train import checkpoint_schedule, train

cfg = experiment(preset, init_scheme, seed)
paths = RunPaths.of(cfg, root)
print(f"{cfg.run.name}: {SCHEMES[init_scheme].description}")
print(f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, checkpoints at least at {checkpoint_schedule(cfg.train)}")"""),
new_code_cell("""metrics = train(cfg, root)
metrics.pivot_table(index="step", columns="metric", values="value").tail()"""),
new_markdown_cell("## Loss and induction accuracy"),
new_code_cell("""figures = {
    "loss": ["train_loss", "val_loss", "val_loss_background", "val_loss_induction"],
    "induction": ["val_acc_induction", "rep_acc_induction", "induction_score"],
}
for name, which in figures.items():
    fig = px.line(metrics[metrics.metric.isin(which)], x="step", y="value", color="metric", markers=True,
                  title=f"{cfg.run.name} ({preset}): {name}", template="plotly_white")
    save_figure(fig, paths.figures / f"01_{name}")
    fig.show()"""),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}, "language_info": {"name": "python"}})
nbformat.write(nb, Path(__file__).resolve().parents[1] / "01_train.ipynb")
