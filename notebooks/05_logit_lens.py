# %% [markdown]
# # 05 · Logit lens over training
#
# The residual stream after the embedding (layer −1) and after each layer, read through the final
# LayerNorm and the unembedding (`transformer_lens.tools.analysis.logit_lens`, each entry normalised
# with its own statistics), at every checkpoint. For the correct next token: mean rank (1 = argmax,
# ties count against it), probability and the fraction of positions where it is the argmax, split
# by position type — `val` background vs `val` induction targets (second copy of a repeated
# segment) and the induction targets of BOS + A + A (`rep`) — and the first layer at which it
# reaches rank 1 (`initmi_utils.logit_lens`; checked on a hand-built induction model in
# `tests/test_logit_lens.py`: there the answer appears only after the last layer).
#
# Writes the table `logit_lens` (… step, layer, metric, value, `dataset`, `position_type`) and
# figures to the run's figures folder.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs
n_val: int = 128  # validation sequences read through the lens (background and induction positions)
n_rep: int = 64  # BOS + A + A sequences (induction positions of the standard diagnostic)
rank1_fraction: float = 0.5  # a layer reaches rank 1 when the correct token is the argmax at this fraction of positions or more

# %%
import plotly.express as px

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.logit_lens import tables as logit_lens_tables
from initmi_utils.plots import panel_lines, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
final = ckpts.steps[-1]
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")

# %% [markdown]
# ## The lens at every checkpoint (one cached forward each)

# %%
lens = logit_lens_tables(cfg, root, n_val=n_val, n_rep=n_rep, rank1_fraction=rank1_fraction)["logit_lens"]
write_table(lens, cfg, "logit_lens", root)
lens["where"] = lens.dataset + " " + lens.position_type
lens[(lens.step == final) & (lens.metric != "first_rank1_layer")].pivot_table(
    index=["where", "metric"], columns="layer", values="value").round(3)

# %% [markdown]
# ## Correct-token rank, probability and top-1 fraction per layer, over training

# %%
per_layer = lens[lens.metric != "first_rank1_layer"].copy()
per_layer["panel"] = per_layer.metric + " · " + per_layer["where"]
per_layer["after"] = per_layer.layer.map(lambda l: "embedding" if l == -1 else f"layer {l}")
fig = panel_lines(per_layer, "panel", "after", f"{cfg.run.name} ({preset}): logit lens of the correct next token")
save_figure(fig, paths.figures / "05_logit_lens")
fig.show()

# %% [markdown]
# ## First layer at which the correct token is the argmax
#
# At ≥ `rank1_fraction` of the positions of each type; −1 = already from the embedding, a gap = never.

# %%
first = lens[lens.metric == "first_rank1_layer"]
fig = px.line(first.sort_values("step"), x="step", y="value", color="where", markers=True, template="plotly_white",
              title=f"{cfg.run.name} ({preset}): first layer with the correct token at rank 1")
fig.update_yaxes(title="layer", dtick=1, range=[-1.5, cfg.model.n_layers - 0.5])
save_figure(fig, paths.figures / "05_first_rank1_layer")
fig.show()
first[first.step == final][["where", "value"]]
