# %% [markdown]
# # 04 · Ablation and activation patching over training
#
# Per checkpoint (`initmi_utils.ablation`, checked on hand-built circuits in `tests/test_ablation.py`):
#
# - **ablation effect matrix**: zero- and mean-ablate every head's output (`blocks.{l}.attn.hook_z`)
#   on the repeated-random diagnostic; change in loss, induction accuracy and logit difference at
#   the induction targets;
# - **K-composition evidence**: ablating each layer-0 head, the change in every layer-1 head's
#   induction score;
# - **activation patching** clean → corrupted (`transformer_lens.patching` on the bridge), per head and
#   per (layer, position relative to the query), normalised so 0 = corrupted run, 1 = clean run;
# - **localisation index**: top-1 share and entropy of |effect| over heads.
#
# Tables `ablation`, `patching` and `paths` (Q/K/V paths into the copying head, final checkpoint); figures in the run's figures folder.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs
n_examples: int = 32  # repeated-random sequences each ablation is measured on
n_patch_pairs: int = 32  # clean/corrupted pairs for activation patching
positions_every_checkpoint: bool = False  # per-position patching at every checkpoint (slow) or only the final one
evidence_every_checkpoint: bool = False  # label vs causal evidence at every checkpoint (label validation) or only the final one

# %%
import pandas as pd
import plotly.express as px

from initmi_utils.ablation import tables as ablation_tables
from initmi_utils.attention import scores_grid_figure, scores_over_training_figure
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.plots import line_figure, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
final = ckpts.steps[-1]
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")

# %% [markdown]
# ## Ablations and patching at every checkpoint
#
# `ablation.tables` also computes the tables `paths` and `evidence` at the final checkpoint (last sections;
# `evidence` at every checkpoint with `evidence_every_checkpoint`).

# %%
tables = ablation_tables(cfg, root, n_examples=n_examples, n_patch_pairs=n_patch_pairs,
                         positions_every_checkpoint=positions_every_checkpoint,
                         evidence_every_checkpoint=evidence_every_checkpoint)
for name, df in tables.items():
    write_table(df, cfg, name, root)
ablation, patching, paths_table = tables["ablation"], tables["patching"], tables["paths"]
ablation[(ablation.step == final) & (ablation.ablated_layer == ablation.layer) & (ablation.ablated_head == ablation["head"])].pivot_table(
    index=["layer", "head"], columns="metric", values="value").round(3)

# %% [markdown]
# ## Ablation effect matrix over training

# %%
effects = [f"{kind}_ablation_{m}_delta" for m in ("acc", "logit_diff", "loss") for kind in ("zero", "mean")]
fig = scores_grid_figure(ablation, effects, title=f"{cfg.run.name} ({preset}): effect of ablating each head, over training")
save_figure(fig, paths.figures / "04_ablation_effects")
fig.show()

# %% [markdown]
# ## K-composition: ablating a layer-0 head, change in each layer-1 head's induction score
#
# Rows: the ablated layer-0 head; columns: the layer-1 head whose induction score changed. A
# previous-token head feeding an induction head shows as one strongly negative cell.

# %%
comp = ablation[ablation.metric == "zero_ablation_induction_score_delta"].copy()
comp["ablated"] = "L" + comp.ablated_layer.astype(str) + "H" + comp.ablated_head.astype(str)
comp["measured"] = "L" + comp.layer.astype(str) + "H" + comp["head"].astype(str)
z = comp[comp.step == final].pivot_table(index="ablated", columns="measured", values="value")
fig = px.imshow(z, color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0, text_auto=".2f", template="plotly_white",
                title=f"{cfg.run.name} ({preset}) step {final}: induction-score change after zero-ablating a head")
save_figure(fig, paths.figures / "04_k_composition_final")
fig.show()
comp["pair"] = comp.ablated + " → " + comp.measured
fig = line_figure(comp, title=f"{cfg.run.name} ({preset}): induction-score change after ablation, over training",
                  color="pair", y_title="Δ induction score")
save_figure(fig, paths.figures / "04_k_composition_over_training")
fig.show()

# %% [markdown]
# ## Activation patching

# %%
fig = scores_over_training_figure(patching, "patch_head_normalised",
                                  title=f"{cfg.run.name} ({preset}): patching each head clean → corrupted (1 = clean restored)")
save_figure(fig, paths.figures / "04_patch_head")
fig.show()
pos = patching[(patching.metric == "patch_resid_pre_normalised") & (patching.step == final)].sort_values("pos")
z = pos.pivot(index="layer", columns="pos", values="value")  # pivot, not pivot_table: keep nan cells
labels = dict(zip(pos.pos, pos.pos_label))
fig = px.imshow(z.values, x=[labels[p] for p in z.columns], y=[f"resid_pre {l}" for l in z.index], color_continuous_scale="RdBu_r",
                color_continuous_midpoint=0.0, aspect="auto", template="plotly_white",
                title=f"{cfg.run.name} ({preset}) step {final}: patching the residual stream by position (offset from the query)")
save_figure(fig, paths.figures / "04_patch_resid_pre_final")
fig.show()

# %% [markdown]
# ## Localisation over training

# %%
loc = pd.concat([ablation, patching])
loc = loc[loc.metric.isin(["localisation_top1_share", "localisation_entropy_normalised"])].copy()
loc["series"] = loc.source + " · " + loc.metric.str.replace("localisation_", "")
fig = line_figure(loc, title=f"{cfg.run.name} ({preset}): localisation of effects over heads", color="series",
                  y_title="top-1 share / normalised entropy")
save_figure(fig, paths.figures / "04_localisation")
fig.show()
loc[loc.step == final][["source", "metric", "value", "top_layer", "top_head"]]

# %% [markdown]
# ## Which input does the copying head read its earlier heads through?
#
# At the final checkpoint, the head that decides the copying mechanism (`offsets.model_mechanism` on
# validation sequences) and, for every layer-0 head, the change in induction accuracy when that head is
# mean-ablated in the copying head's Q, K or V input alone (`ablation.path_ablation_effects`). K carries
# the match with the earlier copy (the previous-token head of classic induction); a large V drop means the
# copied token is read from a layer-0 head's output. Table `paths`.

# %%
if paths_table.empty:
    print(f"step {final}: no copying head (mechanism none), so no paths to ablate")
else:
    acc = paths_table[paths_table.metric.str.endswith("_acc_delta")].copy()
    acc["source"] = "L" + acc.layer.astype(str) + "H" + acc["head"].astype(str)
    acc["input"] = acc.metric.str.split("_").str[1].str.upper()
    dst = f"L{acc.ablated_layer.iloc[0]}H{acc.ablated_head.iloc[0]}"
    fig = px.imshow(acc.pivot_table(index="source", columns="input", values="value"), color_continuous_scale="RdBu_r",
                    color_continuous_midpoint=0.0, text_auto=".2f", template="plotly_white",
                    title=f"{cfg.run.name} ({preset}) step {final}: Δ induction accuracy, a head removed from one input of "
                          f"{dst} ({acc.mechanism.iloc[0]})")
    save_figure(fig, paths.figures / "04_paths_final")
    fig.show()

# %% [markdown]
# ## Does the label pass its causal check?
#
# `ablation.label_evidence` at the final checkpoint, or at every one with `evidence_every_checkpoint` (table `evidence`): the copying-mechanism label, the
# induction-accuracy drop when its deciding head is mean-ablated (it must be ≥ 0.3), and the largest
# path drop through Q, K and V, a path being one layer-0 head or all of them, directly or through MLP0
# (classic needs K; shifted and recall need K and V, each ≥ 0.2 of the head's drop). `causal_ok` (value) is 1 when both hold; for `none`, when no layer-1 head's ablation
# costs 0.3.

# %%
tables["evidence"][["step", "label", "layer", "head", "accuracy", "ablation_drop", "path_drop_q", "path_drop_k",
                    "path_drop_v", "ablation_ok", "path_ok", "value"]].round(3)
