# %% [markdown]
# # 01 · Train one run
#
# Trains one (init scheme, seed) run of a preset, or resumes it from its last checkpoint, or loads it if it
# already finished. Checkpoints go to `checkpoints/<preset>/<scheme>/seed<k>/` (safetensors, self-describing),
# the metrics table to `data/runs/<preset>/<scheme>/seed<k>/metrics.parquet`.
#
# Run the whole grid with `python -m initmi_utils.pipeline --preset quick`; run this notebook alone from
# JupyterLab after editing the parameters below.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs
stale: str = "refuse"  # checkpoints written by other training code: refuse | retrain | reuse
extend_to: int = -1  # a run not emerged by the horizon trains on to this step; -1: the preset's (full: 12000), 0: none
scheme_modules: str = ""  # comma-separated .py files that register schemes; empty: none, or the INITMI_SCHEME_MODULES variable

# %%
import plotly.express as px

from initmi_utils.config import RunPaths, experiment, extend_to as preset_extend_to
from initmi_utils.plots import save_figure
from initmi_utils.schemes import SCHEMES, load_scheme_modules
from initmi_utils.train import checkpoint_schedule, train

load_scheme_modules(scheme_modules)  # a user's own schemes, if any
cfg = experiment(preset, scheme, seed)
paths = RunPaths.of(cfg, root)
print(f"{cfg.run.name}: {SCHEMES[scheme].description}")
until = preset_extend_to(preset, extend_to)
print(f"{cfg.train.steps} steps (on to {until} if induction has not emerged by then)" if until else f"{cfg.train.steps} steps",
      f"batch {cfg.train.batch_size}, checkpoints at least at {checkpoint_schedule(cfg.train)}", sep=", ")

# %%
metrics = train(cfg, root, stale=stale, extend_to=until)
metrics.pivot_table(index="step", columns="metric", values="value").tail()

# %% [markdown]
# ## Loss and induction accuracy

# %%
figures = {
    "loss": ["train_loss", "val_loss", "val_loss_background", "val_loss_induction"],
    "induction": ["val_acc_induction", "rep_acc_induction", "induction_score"],
}
for name, which in figures.items():
    fig = px.line(metrics[metrics.metric.isin(which)], x="step", y="value", color="metric", markers=True,
                  title=f"{cfg.run.name} ({preset}): {name}", template="plotly_white")
    save_figure(fig, paths.figures / f"01_{name}")
    fig.show()
