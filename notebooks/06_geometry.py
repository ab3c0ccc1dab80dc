# %% [markdown]
# # 06 · Geometry and circuits over training
#
# **Geometry** (`initmi_utils.geometry`, tests in `tests/test_geometry.py`): residual-stream norm
# after the embedding and after each layer; attention entropy per head; singular-value spectra and
# effective rank (Roy & Vetterli: exp of the entropy of the normalised singular values) of W_Q,
# W_K, W_V, W_O, W_QK = W_Q W_Kᵀ and W_OV = W_V W_O per head and of the MLP's W_in, W_out; head-output
# similarity (mean cosine and linear CKA between heads' writes `hook_z @ W_O` on the same tokens);
# drift ‖W_t − W_0‖/‖W_0‖ and weight-distribution shape (std, excess kurtosis) per matrix.
#
# **Circuits** (`initmi_utils.circuits`, tests in `tests/test_circuits.py`), with LayerNorm's linear
# part folded in: full OV circuit W_E W_V W_O W_U copying score (Σλ/Σ|λ|) and top-1 diagonal
# accuracy; positional QK previous-token score; Q/K/V composition between heads of different
# layers (TransformerLens's `composition_scores`), also as z-scores against fresh models of the
# same init scheme at step 0.
#
# **Gaussianity** (`initmi_utils.gaussianity`, tests in `tests/test_gaussianity.py`): are the weights
# W, and what training added to them ΔW = W − W₀, Gaussian, and is ΔW i.i.d. noise? Per matrix and
# checkpoint: std, excess kurtosis, skewness, the KS distance of the standardised entries to N(0, 1)
# relative to a Gaussian sample of the same size, and the spectrum against Marchenko–Pastur.
#
# Writes the tables `geometry`, `circuits` and `gaussianity`, and the probe 07 compares runs on; figures to
# the run's figures folder.

# %% tags=["parameters"]
scheme: str = "normal"  # initialisation scheme: normal | xavier | kaiming | orthogonal | scaled_residual | mimetic | seeded
seed: int = 0  # init seed; the data and the batch order are fixed by the preset's data seed
preset: str = "quick"  # smoke (seconds) | quick (minutes) | full (the study)
root: str = ""  # project root for checkpoints/, data/ and figures/; empty: this project, wherever the kernel runs
n_sequences: int = 64  # validation sequences for the activation metrics (norms, entropy, head similarity)
null_models: int = 8  # fresh inits of this scheme forming the composition-score null
singular_values: str = "ends"  # every singular value (metric singular_value) at: ends (step 0 and the last checkpoint) | all | none
scheme_modules: str = ""  # comma-separated .py files that register schemes; empty: none, or the INITMI_SCHEME_MODULES variable

# %%
import numpy as np
import pandas as pd
import plotly.express as px

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.circuits import composition_null
from initmi_utils.circuits import tables as geometry_circuits_tables
from initmi_utils.config import RunPaths, experiment
from initmi_utils.gaussianity import distance_curves
from initmi_utils.gaussianity import tables as gaussianity_tables
from initmi_utils.gaussianity_plots import distance_figure
from initmi_utils.plots import panel_lines, save_figure
from initmi_utils.schemes import load_scheme_modules
from initmi_utils.probes import read_probes, write_probes
from initmi_utils.tables import write_table

load_scheme_modules(scheme_modules)  # the composition null draws fresh inits of this scheme
cfg = experiment(preset, scheme, seed)
ckpts = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
paths = RunPaths.of(cfg, root)
final = ckpts.steps[-1]
null = composition_null(cfg.model, scheme, null_models, cfg, root)
print(f"{cfg.run.name} ({preset}): {len(ckpts.steps)} checkpoints {list(ckpts.steps)}")
print("composition null (mean ± std):", {f"{m} L{s}->L{l}": f"{null.mean[(m, s, l)]:.3f} ± {null.std[(m, s, l)]:.3f}" for m, s, l in null.mean})

# %% [markdown]
# ## Every checkpoint (one cached forward each)
#
# `circuits.tables` computes both tables in one pass over the checkpoints, with the null drawn above.

# %%
tables = geometry_circuits_tables(cfg, root, n_sequences=n_sequences, singular_values=singular_values, null=null)
for name, df in tables.items():
    write_table(df, cfg, name, root)
geometry, circuits = tables["geometry"], tables["circuits"]
head = lambda df: "L" + df.layer.astype(str) + "H" + df["head"].astype(str)  # noqa: E731
circuits[(circuits.step == final) & ~circuits.metric.str.contains("composition")].pivot_table(
    index=["layer", "head"], columns="metric", values="value").round(3)

# %% [markdown]
# ## Activations: residual norm and attention entropy

# %%
act = geometry[geometry.metric.isin(["resid_norm", "attn_entropy", "attn_entropy_norm"])].copy()
act["series"] = act.layer.map(lambda l: "embedding" if l == -1 else f"after layer {l}").where(act.metric == "resid_norm", head(act))
fig = panel_lines(act, "metric", "series", f"{cfg.run.name} ({preset}): residual norm and attention entropy")
save_figure(fig, paths.figures / "06_activations")
fig.show()

# %% [markdown]
# ## Weights: effective rank, drift and distribution shape
#
# Effective rank is averaged over the heads of a layer; drift and shape are per whole matrix.

# %%
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
    fig.show()

# %% [markdown]
# ## Gaussianity of W and of ΔW = W − W₀
#
# Distance to the fitted Gaussian as a multiple of a Gaussian sample's of the same size: 1 (dashed)
# is as Gaussian as Gaussian noise; uniform entries (xavier at step 0) sit at 6–12. Then ΔW's
# spectrum against Marchenko–Pastur, as a multiple of a Gaussian matrix's of the same shape: 1 is
# i.i.d.; a low-rank update stands far above. One line per layer; ΔW starts after step 0.

# %%
gauss_tables = gaussianity_tables(cfg, root)
for name, df in gauss_tables.items():
    write_table(df, cfg, name, root)
gauss = gauss_tables["gaussianity"]
for metric, label in (("ks_rel", "KS distance to the fitted Gaussian / null"), ("mp_ks_rel", "KS distance to Marchenko–Pastur / null")):
    fig = distance_figure(distance_curves(gauss, metric, by="layer"), f"{cfg.run.name} ({preset}): {label}", group="layer", y_title=label)
    save_figure(fig, paths.figures / f"06_gaussianity_{metric}")
    fig.show()
gauss[gauss.step == final].pivot_table(index=["matrix", "layer"], columns=["weights", "metric"], values="value").reindex(
    columns=["std", "kurtosis", "skew", "ks_rel", "mp_ks_rel", "mp_edge_ratio"], level="metric").round(3)

# %% [markdown]
# ## The probe kept for comparisons between runs
#
# The last layer's residual stream on a fixed probe (16 validation sequences × 16 positions, float16) at the
# loss-ladder checkpoints and the last one: 07 compares runs' representations (debiased CKA) from it, without
# checkpoints (`initmi_utils.probes`).

# %%
probe = write_probes(cfg, root)
print(f"{probe.name}: steps {sorted(read_probes(cfg, root))}, {probe.stat().st_size / 1e3:.0f} kB")

# %% [markdown]
# ## Head-output similarity at the final checkpoint

# %%
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
fig.show()

# %% [markdown]
# ## Circuits: OV copying and positional previous-token structure per head
#
# A copying head has copying score ≈ 1 and a high diagonal accuracy; a previous-token head has a
# positional previous-token score ≈ 1.

# %%
c = circuits[circuits.metric.isin(["ov_copying_score", "ov_top1_diag_acc", "qk_prev_token_score"])].copy()
c["series"] = head(c)
fig = panel_lines(c, "metric", "series", f"{cfg.run.name} ({preset}): OV and QK circuits per head")
save_figure(fig, paths.figures / "06_circuits")
fig.show()

# %% [markdown]
# ## Composition between layers, as z-scores against the step-0 null of this scheme
#
# A previous-token head feeding an induction head shows as one K-composition pair far above the
# null (|z| ≫ 3) once induction has emerged.

# %%
comp = circuits[circuits.metric.str.endswith("_composition_z")].copy()
comp["series"] = "L" + comp.source_layer.astype(str) + "H" + comp.source_head.astype(str) + " → " + head(comp)
fig = panel_lines(comp, "metric", "series", f"{cfg.run.name} ({preset}): composition z-scores (vs {null_models} fresh {scheme} inits)")
save_figure(fig, paths.figures / "06_composition")
fig.show()
comp[comp.step == final].pivot_table(index="series", columns="metric", values="value").round(2)
