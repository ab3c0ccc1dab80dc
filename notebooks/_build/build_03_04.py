"""Build notebooks/03_attention.ipynb and notebooks/04_ablation_patching.ipynb (no outputs).

Run from anywhere: ``.venv/bin/python notebooks/_build/build_03_04.py``. Edit the cells here,
not in the .ipynb files, so the committed notebooks stay output-free and reviewable.
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell

from common import notebook, run_parameters as parameters, write

NB03 = [
    new_markdown_cell("""\
# 03 · Attention patterns over training

Per head and checkpoint, from one cached forward pass on the repeated-random diagnostic
(BOS + A + A): previous-token score, duplicate-token score, induction score (attention from a
token's second occurrence to the token after its first occurrence), BOS score and attention
entropy (`initmi_utils.attention`; the scores are checked on hand-built heads and against
`transformer_lens.head_detector` in `tests/test_attention.py`).

Writes the table `attention` (run, scheme, seed, preset, step, layer, head, metric, value) and one
heatmap per score over training to the run's figures folder; ends with a circuitsvis view of the
final checkpoint that renders offline (the bundled JavaScript is inlined, no CDN).

**Which copying mechanism?** From a second forward pass on validation sequences (where the distance
between the two copies varies): the attention mass at every offset from the earlier copy of the query's
token, directly and rolled back through each layer-0 head (`initmi_utils.offsets`), and a label per
checkpoint: `classic_induction` (a layer-1 head attends to offset +1: previous-token head + induction
head), `long_offset_recall` (a layer-1 head attends ~12-14 positions *after* the earlier copy and reads,
through a layer-0 head looking ~13 back, the tokens around it; its induction score is ~0) or `none`.
Table `offsets`."""),
    parameters('''\
n_examples: int = 64  # repeated-random sequences the scores are averaged over
view_example: int = 0  # which sequence the circuitsvis view of the final checkpoint shows
persistence_checkpoints: int = 6  # checkpoints (evenly spaced, first and last included) scored against the seeded donor
n_offset_sequences: int = 64  # validation sequences for the copy-offset profiles and the mechanism label
'''),
    new_code_cell('''\
import pandas as pd
import torch
from IPython.display import display

from initmi_utils.attention import METRICS, attention_view, head_scores, pattern_names, patterns_from_cache, scores_grid_figure
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.offsets import induction_queries, offset_table
from initmi_utils.plots import line_figure, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, init_scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
ds = load_dataset(cfg, root)
tokens = ds.rep.tokens[:n_examples]
val_tokens, val_queries = ds.val.tokens[:n_offset_sequences], induction_queries(ds.val.target[:n_offset_sequences])
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}, {len(tokens)} sequences of {tokens.shape[1]} tokens")'''),
    new_markdown_cell("## Scores at every checkpoint (one cached forward each)"),
    new_code_cell('''\
frames, offset_frames = [], []
for step, model, bridge in ckpts.bridges():
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=pattern_names(cfg.model.n_layers))
        val_patterns = []
        model(val_tokens, patterns=val_patterns)  # the plain model computes the bridge's patterns, faster
    pattern = patterns_from_cache(cache, cfg.model.n_layers)
    frames.append(head_scores(pattern, tokens, step=step))
    offset_frames.append(offset_table(patterns_from_cache(val_patterns, cfg.model.n_layers), val_tokens, val_queries,
                                      step=step))
scores = pd.concat(frames, ignore_index=True)
offsets = pd.concat(offset_frames, ignore_index=True)
final_pattern = pattern  # the last checkpoint's, for the circuitsvis view
write_table(scores, cfg, "attention", root)
write_table(offsets, cfg, "offsets", root)
scores[scores.step == ckpts.steps[-1]].pivot_table(index=["layer", "head"], columns="metric", values="value").round(3)'''),
    new_markdown_cell("## Scores over training"),
    new_code_cell('''\
fig = scores_grid_figure(scores, METRICS, title=f"{cfg.run.name} ({preset}): attention scores per head over training")
save_figure(fig, paths.figures / "03_attention_scores")
fig.show()'''),
    new_markdown_cell("""\
## Which copying mechanism? Copy-offset profiles and the label per checkpoint

Thresholds (`offsets.classify_mechanism`): `classic_induction` if a layer-1 head puts ≥ 0.3 of its
attention on offset +1 from the earlier copy; else `long_offset_recall` if a layer-1 head with < 0.1 at
every offset within ±3 of the copy puts ≥ 0.25 on offsets {0, +1} once rolled back through a layer-0
head; else `none`. Queries: validation positions that predict an induction target."""),
    new_code_cell('''\
labels = offsets[offsets.metric == "mechanism"][["step", "label", "layer", "head", "source_layer", "source_head"]]
print(f"{cfg.run.name}: {labels.label.iloc[-1]} at step {ckpts.steps[-1]}")
final_offsets = offsets[(offsets.step == ckpts.steps[-1]) & (offsets.layer >= 1)]
for metric, what in (("copy_offset_mass", "attention by offset from the earlier copy"),
                     ("composed_copy_offset_mass", "attention rolled back through each layer-0 head")):
    sub = final_offsets[final_offsets.metric == metric]
    sub = sub.assign(line="L" + sub.layer.astype(str) + "H" + sub["head"].astype(str)
                     + sub.source_head.map(lambda h: f" via L0H{h}" if h >= 0 else ""))
    fig = line_figure(sub, f"{cfg.run.name} step {ckpts.steps[-1]}: {what}", x="offset", color="line",
                      y_title="attention mass")
    save_figure(fig, paths.figures / f"03_{metric}")
    fig.show()
labels.set_index("step")'''),
    new_markdown_cell("""\
## Attention patterns of the final checkpoint

All heads of a layer in one `circuitsvis.attention.attention_heads` view (click a head to
enlarge it). The JavaScript is inlined from the installed package, so this renders offline."""),
    new_code_cell('''\
view = attention_view(final_pattern[:, view_example], tokens[view_example].tolist(),
                      title=f"{cfg.run.name} step {ckpts.steps[-1]}, sequence {view_example}")
paths.figures.mkdir(parents=True, exist_ok=True)
(paths.figures / "03_attention_final.html").write_text(f"<!DOCTYPE html><html><body>{view.html}</body></html>", encoding="utf-8")
display(view)'''),
    new_markdown_cell("""\
## Persistence: do the `seeded` head slots keep the donor's role?

The `seeded` scheme embeds a smaller trained donor (`initmi_utils.seeded`) into head slots
0 .. n-1 of every layer. Over training: attention-pattern similarity of each slot to its donor
head (1 - Jensen-Shannon divergence), the slot's share of the total |ablation effect| on the
induction loss, and linear CKA between the donor's residual stream and the student's seeded
subspace (`initmi_utils.persistence`). For every other scheme the same slots are the baseline.
The donor of this seed is trained once and cached (`checkpoints/<preset>/_donors/`)."""),
    new_code_cell('''\
import numpy as np

from initmi_utils.persistence import persistence_table, seeded_slots
from initmi_utils.plots import line_figure
from initmi_utils.seeded import donor_metrics
from initmi_utils.train import checkpoint_schedule

donor = donor_metrics(cfg, root)
print("donor at its last step:", donor[donor.step == donor.step.max()].set_index("metric").value[["val_loss", "val_acc_induction"]].round(3).to_dict())
# Steps from the fixed schedule (not the adaptive extra checkpoints), so every run is scored at the same steps.
regular = [s for s in checkpoint_schedule(cfg.train) if s in ckpts.steps]
picked = sorted({regular[int(i)] for i in np.linspace(0, len(regular) - 1, persistence_checkpoints).round()})
persistence = persistence_table(cfg, root, steps=picked)
write_table(persistence, cfg, "persistence", root)
slots = seeded_slots(persistence).assign(slot=lambda d: "L" + d.layer.astype(str) + d["head"].map(lambda h: f"H{h}" if h >= 0 else ""))
for metric in ("pattern_similarity_to_donor", "ablation_share", "cka_to_donor"):
    fig = line_figure(slots[slots.metric == metric], f"{cfg.run.name}: {metric} of the seeded slots", color="slot", y_title=metric)
    save_figure(fig, paths.figures / f"03_persistence_{metric}")
    fig.show()
slots.pivot_table(index="step", columns=["metric", "slot"], values="value").round(3)'''),
]


NB04 = [
    new_markdown_cell("""\
# 04 · Ablation and activation patching over training

Per checkpoint (`initmi_utils.ablation`, checked on hand-built circuits in `tests/test_ablation.py`):

- **ablation effect matrix**: zero- and mean-ablate every head's output (`blocks.{l}.attn.hook_z`)
  on the repeated-random diagnostic; change in loss, induction accuracy and logit difference at
  the induction targets;
- **K-composition evidence**: ablating each layer-0 head, the change in every layer-1 head's
  induction score;
- **activation patching** clean → corrupted (`transformer_lens.patching` on the bridge), per head and
  per (layer, position relative to the query), normalised so 0 = corrupted run, 1 = clean run;
- **localisation index**: top-1 share and entropy of |effect| over heads.

Tables `ablation` and `patching`; figures in the run's figures folder."""),
    parameters('''\
n_examples: int = 32  # repeated-random sequences each ablation is measured on
n_patch_pairs: int = 32  # clean/corrupted pairs for activation patching
positions_every_checkpoint: bool = False  # per-position patching at every checkpoint (slow) or only the final one
'''),
    new_code_cell('''\
import pandas as pd
import plotly.express as px

from initmi_utils.ablation import ablation_effects, localisation_table, patching_effects, subset_batch, subset_pairs
from initmi_utils.attention import scores_grid_figure, scores_over_training_figure
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.plots import line_figure, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, init_scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
ds = load_dataset(cfg, root)
rep, pairs = subset_batch(ds.rep, n_examples), subset_pairs(ds.patch, n_patch_pairs)
ABLATION_SOURCES = ("zero_ablation_logit_diff_delta", "mean_ablation_logit_diff_delta", "zero_ablation_acc_delta")
PATCHING_SOURCES = ("patch_head_normalised",)
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")'''),
    new_markdown_cell("## Ablations and patching at every checkpoint"),
    new_code_cell('''\
ablation_frames, patching_frames = [], []
for step, model, bridge in ckpts.bridges():
    ab = ablation_effects(bridge, rep)
    pa = patching_effects(bridge, pairs, cfg.data.rep_len, positions=positions_every_checkpoint or step == ckpts.steps[-1])
    ablation_frames += [ab.assign(step=step), localisation_table(ab, ABLATION_SOURCES).assign(step=step)]
    patching_frames += [pa.assign(step=step), localisation_table(pa, PATCHING_SOURCES).assign(step=step)]
ablation = pd.concat(ablation_frames, ignore_index=True)
patching = pd.concat(patching_frames, ignore_index=True)
for df in (ablation, patching):
    for col in ("ablated_layer", "ablated_head", "top_layer", "top_head"):
        if col in df:
            df[col] = df[col].fillna(-1).astype(int)
write_table(ablation, cfg, "ablation", root)
write_table(patching, cfg, "patching", root)
final = ckpts.steps[-1]
ablation[(ablation.step == final) & (ablation.ablated_layer == ablation.layer) & (ablation.ablated_head == ablation["head"])].pivot_table(
    index=["layer", "head"], columns="metric", values="value").round(3)'''),
    new_markdown_cell("## Ablation effect matrix over training"),
    new_code_cell('''\
effects = [f"{kind}_ablation_{m}_delta" for m in ("acc", "logit_diff", "loss") for kind in ("zero", "mean")]
fig = scores_grid_figure(ablation, effects, title=f"{cfg.run.name} ({preset}): effect of ablating each head, over training")
save_figure(fig, paths.figures / "04_ablation_effects")
fig.show()'''),
    new_markdown_cell("""\
## K-composition: ablating a layer-0 head, change in each layer-1 head's induction score

Rows: the ablated layer-0 head; columns: the layer-1 head whose induction score changed. A
previous-token head feeding an induction head shows as one strongly negative cell."""),
    new_code_cell('''\
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
fig.show()'''),
    new_markdown_cell("## Activation patching"),
    new_code_cell('''\
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
fig.show()'''),
    new_markdown_cell("## Localisation over training"),
    new_code_cell('''\
loc = pd.concat([ablation, patching])
loc = loc[loc.metric.isin(["localisation_top1_share", "localisation_entropy_normalised"])].copy()
loc["series"] = loc.source + " · " + loc.metric.str.replace("localisation_", "")
fig = line_figure(loc, title=f"{cfg.run.name} ({preset}): localisation of effects over heads", color="series",
                  y_title="top-1 share / normalised entropy")
save_figure(fig, paths.figures / "04_localisation")
fig.show()
loc[loc.step == final][["source", "metric", "value", "top_layer", "top_head"]]'''),
]


def main() -> None:
    for name, cells in (("03_attention.ipynb", NB03), ("04_ablation_patching.ipynb", NB04)):
        write(notebook(cells), name)


if __name__ == "__main__":
    main()
