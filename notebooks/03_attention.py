# %% [markdown]
# # 03 · Attention patterns over training
#
# Per head and checkpoint, from one cached forward pass on the repeated-random diagnostic
# (BOS + A + A): previous-token score, duplicate-token score, induction score (attention from a
# token's second occurrence to the token after its first occurrence), BOS score and attention
# entropy (`initmi_utils.attention`; the scores are checked on hand-built heads and against
# `transformer_lens.head_detector` in `tests/test_attention.py`).
#
# Writes the table `attention` (run, scheme, seed, preset, step, layer, head, metric, value) and one
# heatmap per score over training to the run's figures folder. The **head browser** then shows each
# head's attention pattern on one fixed short sequence across training (a slider over up to 8
# analysed checkpoints, a dropdown for the head, the head's scores over training beside it); a
# circuitsvis view of the final checkpoint follows, which renders offline (the bundled JavaScript is
# inlined, no CDN) once the notebook is trusted (the pipeline signs what it executes).
#
# **Which copying mechanism?** From a second forward pass on validation sequences (where the distance
# between the two copies varies): the attention mass at every offset from the earlier copy of the query's
# token, directly and rolled back through each layer-0 head (`initmi_utils.offsets`), and a label per
# checkpoint: `classic_induction` (a layer-1 head attends to offset +1: previous-token head + induction
# head), `shifted_induction` (a layer-1 head attends to offset +2 and reads the token to copy there through
# a layer-0 head looking one back), `long_offset_recall` (a layer-1 head attends ~12-14 positions *after*
# the earlier copy and reads,
# through a layer-0 head looking ~13 back, the tokens around it; its induction score is ~0) or `none`.
# Table `offsets`.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs
n_examples: int = 64  # repeated-random sequences the scores are averaged over
view_example: int = 0  # which sequence the circuitsvis view of the final checkpoint shows
persistence_checkpoints: int = 6  # checkpoints (evenly spaced, first and last included) scored against the seeded donor
n_offset_sequences: int = 64  # validation sequences for the copy-offset profiles and the mechanism label
browser_checkpoints: int = 8  # checkpoints on the head browser's slider (the first, the last, those where scores change most)

# %%
from initmi_utils.attention import METRICS, scores_grid_figure
from initmi_utils.attention import tables as attention_tables
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.donor import donor_metrics
from initmi_utils.donor_persistence import tables as persistence_tables
from initmi_utils.head_browser import head_browser
from initmi_utils.plots import line_figure, save_figure
from initmi_utils.tables import write_table
from initmi_utils.train import checkpoint_schedule

cfg = experiment(preset, scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
final = ckpts.steps[-1]
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")

# %% [markdown]
# ## Scores at every checkpoint (one cached forward each)

# %%
tables = attention_tables(cfg, root, n_examples=n_examples, n_offset_sequences=n_offset_sequences)
for name, df in tables.items():
    write_table(df, cfg, name, root)
scores, offsets = tables["attention"], tables["offsets"]
scores[scores.step == final].pivot_table(index=["layer", "head"], columns="metric", values="value").round(3)

# %% [markdown]
# ## Scores over training

# %%
fig = scores_grid_figure(scores, METRICS, title=f"{cfg.run.name} ({preset}): attention scores per head over training")
save_figure(fig, paths.figures / "03_attention_scores")
fig.show()

# %% [markdown]
# ## Head browser: each head's attention across training
#
# Left, the chosen head's attention on BOS + B + B (B: the first 12 tokens of the first diagnostic
# sequence, the same for every run) at the slider's checkpoint, in % of each query's attention: an
# induction head attends from each token of the second B to the token after its first occurrence (a
# stripe one above the diagonal of the lower-left block), a previous-token head to the token just before.
# Right, the head's previous-token, induction and duplicate-token scores at every analysed checkpoint,
# the slider's checkpoint dashed. Pick the head in the dropdown.

# %%
fig = head_browser(cfg, root, scores=scores, n_checkpoints=browser_checkpoints, keep=True)  # kept for the report
save_figure(fig, paths.figures / "03_head_browser", static=False)
fig.show()

# %% [markdown]
# ## Which copying mechanism? Copy-offset profiles and the label per checkpoint
#
# Thresholds (`offsets.classify_mechanism`): `classic_induction` if a layer-1 head puts ≥ 0.3 of its
# attention on offset +1 from the earlier copy; else `shifted_induction` if a layer-1 head puts ≥ 0.3 on
# offset +2 and ≥ 0.25 on offsets {0, +1} once rolled back through a layer-0 head; else
# `long_offset_recall` if a layer-1 head with < 0.1 at
# every offset within ±3 of the copy puts ≥ 0.25 on offsets {0, +1} once rolled back through a layer-0
# head; else `none`. A label needs behaviour too: below induction accuracy 0.5 on the same sequences, an
# attention label becomes `partial` (`offsets.THRESHOLDS`, frozen with their provenance). Queries:
# validation positions that predict an induction target.

# %%
labels = offsets[offsets.metric == "mechanism"][["step", "label", "layer", "head", "source_layer", "source_head"]]
print(f"{cfg.run.name}: {labels.label.iloc[-1]} at step {final}")
final_offsets = offsets[(offsets.step == final) & (offsets.layer >= 1)]
for metric, what in (("copy_offset_mass", "attention by offset from the earlier copy"),
                     ("composed_copy_offset_mass", "attention rolled back through each layer-0 head")):
    sub = final_offsets[final_offsets.metric == metric]
    sub = sub.assign(line="L" + sub.layer.astype(str) + "H" + sub["head"].astype(str)
                     + sub.source_head.map(lambda h: f" via L0H{h}" if h >= 0 else ""))
    fig = line_figure(sub, f"{cfg.run.name} step {final}: {what}", x="offset", color="line",
                      y_title="attention mass")
    save_figure(fig, paths.figures / f"03_{metric}")
    fig.show()
labels.set_index("step")

# %% [markdown]
# ## Attention patterns of the final checkpoint
#
# All heads of a layer in one `circuitsvis.attention.attention_heads` view (click a head to
# enlarge it). The JavaScript is inlined from the installed package, so this renders offline.

# %%
from IPython.display import display

from initmi_utils.attention import attention_view, checkpoint_patterns
from initmi_utils.data import load_dataset
from initmi_utils.model import to_bridge

model, _ = ckpts.load(final)
tokens = load_dataset(cfg, root).rep.tokens[:n_examples]  # the sequences the scores were measured on
final_pattern = checkpoint_patterns(to_bridge(model), tokens)
view = attention_view(final_pattern[:, view_example], tokens[view_example].tolist(),
                      title=f"{cfg.run.name} step {final}, sequence {view_example}")
paths.figures.mkdir(parents=True, exist_ok=True)
(paths.figures / "03_attention_final.html").write_text(f"<!DOCTYPE html><html><body>{view.html}</body></html>", encoding="utf-8")
display(view)

# %% [markdown]
# ## Persistence: do the `seeded` head slots keep the donor's role?
#
# The `seeded` scheme embeds a smaller trained donor (`initmi_utils.seeded`) into head slots
# 0 .. n-1 of every layer. Over training: attention-pattern similarity of each slot to its donor
# head (1 - Jensen-Shannon divergence), the slot's share of the total |ablation effect| on the
# induction loss, and linear CKA between the donor's residual stream and the student's seeded
# subspace (`initmi_utils.donor_persistence`). For every other scheme the same slots are the baseline.
# The donor of this seed is trained once and cached (`checkpoints/<preset>/_donors/`).

# %%
donor = donor_metrics(cfg, root)  # trains the donor of this seed first if it is not cached
print("donor at its last step:", donor[donor.step == donor.step.max()].set_index("metric").value[["val_loss", "val_acc_induction"]].round(3).to_dict())
# Steps from the fixed schedule (not the adaptive extra checkpoints), so every run is scored at the same steps.
persistence = persistence_tables(cfg, root, schedule=checkpoint_schedule(cfg.train),
                                 persistence_checkpoints=persistence_checkpoints)["persistence"]
write_table(persistence, cfg, "persistence", root)

# %%
from initmi_utils.donor_persistence import seeded_slots

slots = seeded_slots(persistence).assign(slot=lambda d: "L" + d.layer.astype(str) + d["head"].map(lambda h: f"H{h}" if h >= 0 else ""))
for metric in ("pattern_similarity_to_donor", "ablation_share", "cka_to_donor"):
    fig = line_figure(slots[slots.metric == metric], f"{cfg.run.name}: {metric} of the seeded slots", color="slot", y_title=metric)
    save_figure(fig, paths.figures / f"03_persistence_{metric}")
    fig.show()
slots.pivot_table(index="step", columns=["metric", "slot"], values="value").round(3)
