"""Build notebooks/05_logit_lens.ipynb and notebooks/06_geometry.ipynb (no outputs).

Run from anywhere: ``.venv/bin/python notebooks/_build/build_05_06.py``. Edit the cells here,
not in the .ipynb files, so the committed notebooks stay output-free and reviewable.
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell

from common import notebook, run_parameters as parameters, write

NB05 = [
    new_markdown_cell("""\
# 05 · Logit lens over training

The residual stream after the embedding (layer −1) and after each layer, read through the final
LayerNorm and the unembedding (`transformer_lens.tools.analysis.logit_lens`, each entry normalised
with its own statistics), at every checkpoint. For the correct next token: mean rank (1 = argmax,
ties count against it), probability and the fraction of positions where it is the argmax, split
by position type — `val` background vs `val` induction targets (second copy of a repeated
segment) and the induction targets of BOS + A + A (`rep`) — and the first layer at which it
reaches rank 1 (`initmi_utils.logit_lens`; checked on a hand-built induction model in
`tests/test_logit_lens.py`: there the answer appears only after the last layer).

Writes the table `logit_lens` (… step, layer, metric, value, `dataset`, `position_type`) and
figures to the run's figures folder."""),
    parameters('''\
n_val: int = 128  # validation sequences read through the lens (background and induction positions)
n_rep: int = 64  # BOS + A + A sequences (induction positions of the standard diagnostic)
rank1_fraction: float = 0.5  # a layer reaches rank 1 when the correct token is the argmax at this fraction of positions or more
'''),
    new_code_cell('''\
import pandas as pd
import plotly.express as px
import torch

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.logit_lens import hook_names, lens_batch, logit_lens_table
from initmi_utils.plots import panel_lines, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, init_scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
batch = lens_batch(load_dataset(cfg, root), n_val, n_rep)
names = hook_names(cfg.model.n_layers)
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}, batch {tuple(batch.tokens.shape)}")

'''),
    new_markdown_cell("## The lens at every checkpoint (one cached forward each)"),
    new_code_cell('''\
frames = []
for step, model, bridge in ckpts.bridges():
    with torch.no_grad():
        _, cache = bridge.run_with_cache(batch.tokens, names_filter=names)
    frames.append(logit_lens_table(cache, batch, rank1_fraction).assign(step=step))
lens = pd.concat(frames, ignore_index=True)
write_table(lens, cfg, "logit_lens", root)
lens["where"] = lens.dataset + " " + lens.position_type
final = ckpts.steps[-1]
lens[(lens.step == final) & (lens.metric != "first_rank1_layer")].pivot_table(
    index=["where", "metric"], columns="layer", values="value").round(3)'''),
    new_markdown_cell("## Correct-token rank, probability and top-1 fraction per layer, over training"),
    new_code_cell('''\
per_layer = lens[lens.metric != "first_rank1_layer"].copy()
per_layer["panel"] = per_layer.metric + " · " + per_layer["where"]
per_layer["after"] = per_layer.layer.map(lambda l: "embedding" if l == -1 else f"layer {l}")
fig = panel_lines(per_layer, "panel", "after", f"{cfg.run.name} ({preset}): logit lens of the correct next token")
save_figure(fig, paths.figures / "05_logit_lens")
fig.show()'''),
    new_markdown_cell("""\
## First layer at which the correct token is the argmax

At ≥ `rank1_fraction` of the positions of each type; −1 = already from the embedding, a gap = never."""),
    new_code_cell('''\
first = lens[lens.metric == "first_rank1_layer"]
fig = px.line(first.sort_values("step"), x="step", y="value", color="where", markers=True, template="plotly_white",
              title=f"{cfg.run.name} ({preset}): first layer with the correct token at rank 1")
fig.update_yaxes(title="layer", dtick=1, range=[-1.5, cfg.model.n_layers - 0.5])
save_figure(fig, paths.figures / "05_first_rank1_layer")
fig.show()
first[first.step == final][["where", "value"]]'''),
]


NB06 = [
    new_markdown_cell("""\
# 06 · Geometry and circuits over training

**Geometry** (`initmi_utils.geometry`, tests in `tests/test_geometry.py`): residual-stream norm
after the embedding and after each layer; attention entropy per head; singular-value spectra and
effective rank (Roy & Vetterli: exp of the entropy of the normalised singular values) of W_Q,
W_K, W_V, W_O, W_QK = W_Q W_Kᵀ and W_OV = W_V W_O per head and of the MLP's W_in, W_out; head-output
similarity (mean cosine and linear CKA between heads' writes `hook_z @ W_O` on the same tokens);
drift ‖W_t − W_0‖/‖W_0‖ and weight-distribution shape (std, excess kurtosis) per matrix.

**Circuits** (`initmi_utils.circuits`, tests in `tests/test_circuits.py`), with LayerNorm's linear
part folded in: full OV circuit W_E W_V W_O W_U copying score (Σλ/Σ|λ|) and top-1 diagonal
accuracy; positional QK previous-token score; Q/K/V composition between heads of different
layers (TransformerLens's `composition_scores`), also as z-scores against fresh models of the
same init scheme at step 0.

Writes the tables `geometry` and `circuits`; figures to the run's figures folder."""),
    parameters('''\
n_sequences: int = 64  # validation sequences for the activation metrics (norms, entropy, head similarity)
null_models: int = 8  # fresh inits of this scheme forming the composition-score null
store_singular_values: bool = True  # also store every singular value (metric singular_value), not only summaries
'''),
    new_code_cell('''\
import numpy as np
import pandas as pd
import plotly.express as px
import torch

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.circuits import circuits_table, composition_null
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.geometry import geometry_table, hook_names
from initmi_utils.plots import panel_lines, save_figure
from initmi_utils.tables import write_table

cfg = experiment(preset, init_scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
tokens = load_dataset(cfg, root).val.tokens[:n_sequences]
names = hook_names(cfg.model.n_layers)
model0, _ = ckpts.load(0)  # the drift reference: this run at step 0
null = composition_null(cfg.model, init_scheme, null_models, cfg, root)
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}, {len(tokens)} sequences")
print("composition null (mean ± std):", {f"{m} L{s}->L{l}": f"{null.mean[(m, s, l)]:.3f} ± {null.std[(m, s, l)]:.3f}" for m, s, l in null.mean})

'''),
    new_markdown_cell("## Every checkpoint (one cached forward each)"),
    new_code_cell('''\
geo_frames, circ_frames = [], []
for step, model, bridge in ckpts.bridges():
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
    geo_frames.append(geometry_table(model, model0, cache, step, with_spectra=store_singular_values))
    circ_frames.append(circuits_table(model, step, null, n_pos=cfg.data.seq_len))
geometry = pd.concat(geo_frames, ignore_index=True)
circuits = pd.concat(circ_frames, ignore_index=True)
write_table(geometry, cfg, "geometry", root)
write_table(circuits, cfg, "circuits", root)
final = ckpts.steps[-1]
head = lambda df: "L" + df.layer.astype(str) + "H" + df["head"].astype(str)  # noqa: E731
circuits[(circuits.step == final) & ~circuits.metric.str.contains("composition")].pivot_table(
    index=["layer", "head"], columns="metric", values="value").round(3)'''),
    new_markdown_cell("## Activations: residual norm and attention entropy"),
    new_code_cell('''\
act = geometry[geometry.metric.isin(["resid_norm", "attn_entropy", "attn_entropy_norm"])].copy()
act["series"] = act.layer.map(lambda l: "embedding" if l == -1 else f"after layer {l}").where(act.metric == "resid_norm", head(act))
fig = panel_lines(act, "metric", "series", f"{cfg.run.name} ({preset}): residual norm and attention entropy")
save_figure(fig, paths.figures / "06_activations")
fig.show()'''),
    new_markdown_cell("""\
## Weights: effective rank, drift and distribution shape

Effective rank is averaged over the heads of a layer; drift and shape are per whole matrix."""),
    new_code_cell('''\
w = geometry[geometry.metric.isin(["effective_rank", "drift", "weight_std", "weight_kurtosis"])]
w = w.groupby(["step", "metric", "matrix", "layer"], as_index=False).value.mean()
w["series"] = w.matrix + w.layer.map(lambda l: "" if l == -1 else f" L{l}")
fig = panel_lines(w, "metric", "series", f"{cfg.run.name} ({preset}): weight geometry", n_cols=2)
save_figure(fig, paths.figures / "06_weights")
fig.show()
sv = geometry[(geometry.metric == "singular_value") & geometry.step.isin([0, final]) & geometry.matrix.isin(["W_QK", "W_OV"])].copy()
if len(sv):
    sv["series"] = head(sv) + " step " + sv.step.astype(str)
    fig = px.line(sv, x="sv_index", y="value", color="series", facet_col="matrix", log_y=True, template="plotly_white",
                  title=f"{cfg.run.name} ({preset}): singular values of W_QK and W_OV per head, step 0 vs {final}")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    save_figure(fig, paths.figures / "06_spectra")
    fig.show()'''),
    new_markdown_cell("## Head-output similarity at the final checkpoint"),
    new_code_cell('''\
sim = geometry[(geometry.step == final) & geometry.metric.isin(["head_cka", "head_cosine"])].copy()
sim["a"], sim["b"] = head(sim), "L" + sim.other_layer.astype(str) + "H" + sim.other_head.astype(str)
sim = pd.concat([sim, sim.rename(columns={"a": "b", "b": "a"})])  # both triangles
labels = sorted(set(sim.a))
z = np.stack([sim[sim.metric == m].pivot_table(index="a", columns="b", values="value").reindex(index=labels, columns=labels).values
              for m in ("head_cka", "head_cosine")])  # the diagonal (a head with itself) stays empty
fig = px.imshow(z, x=labels, y=labels, facet_col=0, color_continuous_scale="RdBu_r", zmin=-1, zmax=1, text_auto=".2f", template="plotly_white",
                title=f"{cfg.run.name} ({preset}) step {final}: similarity of heads' outputs")
fig.for_each_annotation(lambda a: a.update(text=["linear CKA", "mean cosine"][int(a.text.split("=")[-1])]))
save_figure(fig, paths.figures / "06_head_similarity")
fig.show()'''),
    new_markdown_cell("""\
## Circuits: OV copying and positional previous-token structure per head

A copying head has copying score ≈ 1 and a high diagonal accuracy; a previous-token head has a
positional previous-token score ≈ 1."""),
    new_code_cell('''\
c = circuits[circuits.metric.isin(["ov_copying_score", "ov_top1_diag_acc", "qk_prev_token_score"])].copy()
c["series"] = head(c)
fig = panel_lines(c, "metric", "series", f"{cfg.run.name} ({preset}): OV and QK circuits per head")
save_figure(fig, paths.figures / "06_circuits")
fig.show()'''),
    new_markdown_cell("""\
## Composition between layers, as z-scores against the step-0 null of this scheme

A previous-token head feeding an induction head shows as one K-composition pair far above the
null (|z| ≫ 3) once induction has emerged."""),
    new_code_cell('''\
comp = circuits[circuits.metric.str.endswith("_composition_z")].copy()
comp["series"] = "L" + comp.source_layer.astype(str) + "H" + comp.source_head.astype(str) + " → " + head(comp)
fig = panel_lines(comp, "metric", "series", f"{cfg.run.name} ({preset}): composition z-scores (vs {null_models} fresh {init_scheme} inits)")
save_figure(fig, paths.figures / "06_composition")
fig.show()
comp[comp.step == final].pivot_table(index="series", columns="metric", values="value").round(2)'''),
]


def main() -> None:
    for name, cells in (("05_logit_lens.ipynb", NB05), ("06_geometry.ipynb", NB06)):
        write(notebook(cells), name)


if __name__ == "__main__":
    main()
