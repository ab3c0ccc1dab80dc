# %% [markdown]
# # 02 · Behaviour of one run
#
# Loss, induction accuracy and logit difference over training (from the training metrics), and, at every
# checkpoint, the in-context-learning score and the loss on the first vs the repeated half of BOS + A + A.
# Writes the table `behavior` (`data/runs/<preset>/<scheme>/seed<k>/behavior.parquet`) and the figures
# `figures/<preset>/<scheme>/seed<k>/02_*.html`.
#
# - **emergence step**: first evaluated step whose `val_acc_induction_unambiguous` (induction accuracy on the targets
#   whose query token occurred exactly once before: `behavior.unambiguous_targets`) ≥ `emergence_threshold`; `nan` = never
#   (stored as metric `emergence_step` at step −1);
# - **ICL score** (Olsson et al. 2022): mean loss on the last 4 tokens minus mean loss on tokens 10–13
#   (`behavior.icl_score` says why these positions); negative = the model uses its context;
# - **first vs repeated half**: loss on A[1:] in the first copy vs in the second copy (`behavior.half_losses`);
# - **accuracy by copy distance**: induction accuracy when the two copies of the segment are fewer than 12
#   positions apart (`val_acc_induction_short`) vs 12 or more (`val_acc_induction_long`), and per distance bin
#   (`behavior.copy_distance_stats`, `behavior.accuracy_by_copy_distance`). A classic induction head copies at
#   every distance; the long-offset recall circuit (`initmi_utils.offsets`, notebook 03) fails below ~12.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs

emergence_threshold: float = 0.8  # unambiguous induction accuracy that counts as emerged

# %%
import pandas as pd

from initmi_utils import plots
from initmi_utils.behavior import tables as behavior_tables
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.tables import table_path, write_table

cfg = experiment(preset, scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")

# %%
behavior = behavior_tables(cfg, root, emergence_threshold=emergence_threshold)["behavior"]
write_table(behavior, cfg, "behavior", root)
metrics = pd.read_parquet(table_path(cfg, "metrics", root))  # the training curves plotted below
emerged_at = behavior[behavior.metric == "emergence_step"].value.item()
print("emergence step:", "never" if pd.isna(emerged_at) else int(emerged_at), f"(threshold {emergence_threshold})")
scalars = behavior[(behavior.position == -1) & (behavior.copy_distance == -1)]
scalars.pivot_table(index="step", columns="metric", values="value").round(3)

# %% [markdown]
# ## Loss, accuracy and logit difference over training

# %%
figures = {
    "02_loss": (["train_loss", "val_loss", "val_loss_background", "val_loss_induction"], "loss (nats)", None),
    "02_accuracy": (["val_acc_induction", "val_acc_induction_unambiguous", "rep_acc_induction", "induction_score"], "accuracy / score", emergence_threshold),
    "02_logit_diff": (["val_logit_diff", "rep_logit_diff"], "logit(correct) - logit(distractor)", None),
}
for name, (which, y_title, hline) in figures.items():
    fig = plots.line_figure(metrics[metrics.metric.isin(which)], f"{cfg.run.name} ({preset}): {name[3:]}",
                            y_title=y_title, hline=hline, vline=emerged_at)
    plots.save_figure(fig, paths.figures / name)
    fig.show()

# %% [markdown]
# ## Induction accuracy by copy distance
#
# Short copies (fewer than 12 positions between the two copies, ~6% of the validation targets) separate the
# classic induction circuit, which copies at every distance, from the long-offset recall circuit, which cannot.

# %%
which = ["val_acc_induction", "val_acc_induction_short", "val_acc_induction_long"]
fig = plots.line_figure(behavior[behavior.metric.isin(which)], f"{cfg.run.name} ({preset}): induction accuracy, short vs long copies",
                        y_title="accuracy", hline=emergence_threshold, vline=emerged_at)
plots.save_figure(fig, paths.figures / "02_accuracy_by_copy_distance")
fig.show()
by_distance = behavior[behavior.metric.isin(["val_acc_by_copy_distance", "val_n_targets_by_copy_distance"])]
by_distance[by_distance.step == by_distance.step.max()].pivot_table(index="copy_distance", columns="metric", values="value").round(3)

# %% [markdown]
# ## In-context learning: ICL score and the two halves of BOS + A + A, per checkpoint

# %%
icl = behavior[behavior.metric.isin(["icl_score", "rep_first_half", "rep_repeated_half", "rep_half_gap"])]
fig = plots.line_figure(icl, f"{cfg.run.name} ({preset}): in-context learning", y_title="loss difference / loss (nats)",
                        vline=emerged_at)
plots.save_figure(fig, paths.figures / "02_icl")
fig.show()

# %%
by_pos = behavior[behavior.metric == "val_loss_at_position"]
steps = sorted(by_pos.step.unique())
shown = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
fig = plots.line_figure(by_pos[by_pos.step.isin(shown)].assign(checkpoint=lambda d: "step " + d.step.astype(str)),
                        f"{cfg.run.name} ({preset}): validation loss by token position", x="position",
                        color="checkpoint", y_title="loss (nats)")
plots.save_figure(fig, paths.figures / "02_loss_by_position")
fig.show()
