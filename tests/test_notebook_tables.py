"""The ``tables`` functions behind notebooks 02-06: one call per notebook, one block of rows per
checkpoint, the same rows as the per-checkpoint functions they loop over.

The run is three hand-built checkpoints saved under ``tmp_path`` (no training): two noisy copies
of ``handbuilt.induction_model`` and the exact one at the final step, so the final checkpoint has
a known copying head (L1H2, classic induction) and a checkpoint scored at the wrong step shows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import one_value
from initmi_utils import ablation, attention, behavior, circuits, donor_persistence, logit_lens
from initmi_utils.checkpoints import list_checkpoints, save_checkpoint
from initmi_utils.config import RunConfig, RunPaths
from initmi_utils.data import load_dataset
from initmi_utils.geometry import geometry_table, hook_names
from initmi_utils.handbuilt import ROLES, handbuilt_experiment, induction_model
from initmi_utils.model import to_bridge
from initmi_utils.offsets import induction_accuracy, induction_queries, offset_table
from initmi_utils.tables import write_table

STEPS = (0, 5, 9)
FINAL = STEPS[-1]
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, root) of a finished 'run': noisy hand-built models at steps 0 and 5, the exact one at 9.

    The scheme is ``normal`` so that ``circuits.tables`` can draw its composition null."""
    root = tmp_path_factory.mktemp("run")
    base = handbuilt_experiment(attn_only=False, n_diagnostic=16)
    cfg = dataclasses.replace(base, run=RunConfig(scheme="normal", seed=0, preset="handbuilt"),
                              train=dataclasses.replace(base.train, eval_every=1))  # every step evaluated
    folder = RunPaths.of(cfg, root).checkpoints
    models = {0: induction_model(attn_only=False, noise=1.0, seed=1)[0],
              5: induction_model(attn_only=False, noise=0.3, seed=2)[0],
              FINAL: induction_model(attn_only=False)[0]}
    for step, model in models.items():
        save_checkpoint(folder, model, cfg, step, {})
    (folder / "done.json").write_text("{}")
    metrics = pd.DataFrame({"step": list(STEPS), "metric": "val_acc_induction_unambiguous", "value": [0.0, 0.5, 1.0]})
    write_table(metrics, cfg, "metrics", root)
    return cfg, root


def _load(run, step):
    cfg, root = run
    return list_checkpoints(cfg, root).load(step)[0]


def _same(table: pd.DataFrame, direct: pd.DataFrame) -> None:
    """``table``'s rows equal ``direct``'s on ``direct``'s columns, in the same order."""
    pd.testing.assert_frame_equal(table[list(direct.columns)].reset_index(drop=True), direct.reset_index(drop=True),
                                  check_dtype=False)


def test_behavior_tables(run):
    cfg, root = run
    out = behavior.tables(cfg, root, emergence_threshold=0.8)
    assert set(out) == {"behavior"}
    df = out["behavior"]
    assert sorted(df.step.unique()) == [-1, *STEPS]
    per_step = df[df.step >= 0].groupby("step").metric.apply(lambda m: tuple(sorted(m)))
    assert per_step.nunique() == 1, "every checkpoint has the same rows"
    assert {"val_loss", "rep_acc_induction", "icl_score", "rep_half_gap", "val_acc_induction_short",
            "val_loss_at_position", "val_acc_by_copy_distance"} <= set(df.metric)
    emergence = df[df.metric == "emergence_step"]
    assert emergence.value.item() == FINAL and emergence.threshold.item() == 0.8
    low = behavior.tables(cfg, root, emergence_threshold=0.4)["behavior"]
    assert one_value(low, metric="emergence_step") == 5
    # the exact induction model sits at the final step: it copies BOS + A + A
    assert one_value(df, step=FINAL, metric="rep_acc_induction") > 0.9 > one_value(df, step=0, metric="rep_acc_induction")

    ds, model = load_dataset(cfg, root), _load(run, 5)
    with torch.no_grad():
        direct = behavior.behavior_table(model(ds.val.tokens), ds.val, model(ds.rep.tokens), ds.rep, cfg.data.rep_len, 5)
    _same(df[df.step == 5], direct)


def test_attention_tables(run):
    cfg, root = run
    out = attention.tables(cfg, root, n_examples=8, n_offset_sequences=16)
    assert set(out) == {"attention", "offsets"}
    scores, offsets = out["attention"], out["offsets"]
    n_heads = cfg.model.n_layers * cfg.model.n_heads
    assert scores.groupby("step").size().to_dict() == {s: n_heads * len(attention.METRICS) for s in STEPS}
    labels = offsets[offsets.metric == "mechanism"].set_index("step").label
    assert list(labels.index) == list(STEPS) and labels[FINAL] == "classic_induction"
    assert one_value(scores, step=FINAL, layer=ROLES.induction[0], head=ROLES.induction[1], metric="induction_score") > 0.9

    ds, model = load_dataset(cfg, root), _load(run, 5)
    tokens = ds.rep.tokens[:8]
    _same(scores[scores.step == 5], attention.head_scores(attention.checkpoint_patterns(to_bridge(model), tokens), tokens, step=5))
    val_tokens, patterns = ds.val.tokens[:16], []
    with torch.no_grad():
        logits = model(val_tokens, patterns=patterns)
    accuracy = induction_accuracy(logits, val_tokens, ds.val.target[:16])  # a label needs behaviour too
    direct = offset_table(torch.stack(patterns), val_tokens, induction_queries(ds.val.target[:16]), step=5,
                          accuracy=accuracy)
    _same(offsets[offsets.step == 5], direct)


def test_ablation_tables(run):
    cfg, root = run
    out = ablation.tables(cfg, root, n_examples=8, n_patch_pairs=8)
    assert set(out) == {"ablation", "patching", "paths", "evidence"}
    ab, pa, paths = out["ablation"], out["patching"], out["paths"]
    ev = out["evidence"]  # the final checkpoint's label and its causal check: the built classic circuit passes
    assert len(ev) == 1 and ev.step.item() == FINAL and ev.label.item() == "classic_induction"
    assert (ev.layer.item(), ev["head"].item()) == ROLES.induction and ev.value.item() == 1.0
    agreement = ablation.agreement_table(ev)
    assert agreement.loc["classic_induction", "passes"] == 1 and agreement.loc["none", "n"] == 0
    for df in (ab, pa):
        assert sorted(df.step.unique()) == list(STEPS)
        assert all(pd.api.types.is_integer_dtype(df[c]) for c in ("ablated_layer", "ablated_head", "top_layer", "top_head")
                   if c in df)
    assert set(ab.source.dropna()) == set(ablation.ABLATION_SOURCES) | set(ablation.HELDOUT_SOURCES)
    per_layer = ab[ab.metric == "localisation_top1_share_layer"]
    assert set(per_layer.layer) == {0, 1} and set(per_layer.step) == set(STEPS)  # headline: per layer, every step
    assert set(pa.source.dropna()) == set(ablation.PATCHING_SOURCES)
    # per-position patching only at the final checkpoint unless asked for every one
    assert set(pa[pa.metric == "patch_resid_pre_normalised"].step) == {FINAL}
    # the paths are those of the final checkpoint's copying head
    assert set(paths.step) == {FINAL} and set(paths.mechanism) == {"classic_induction"}
    assert {(int(r.ablated_layer), int(r.ablated_head)) for r in paths.itertuples()} == {ROLES.induction}
    assert one_value(paths, layer=ROLES.prev_token[0], head=ROLES.prev_token[1], metric="path_k_acc_delta") < -0.5

    ds = load_dataset(cfg, root)
    rep = ablation.subset_batch(ds.rep, 8)
    model = _load(run, 5)
    direct = ablation.ablation_effects(to_bridge(model), rep)
    _same(ab[(ab.step == 5) & ab.source.isna() & ab.metric.isin(direct.metric.unique())], direct)
    held = ablation.heldout_ablation(to_bridge(model), ds.val)
    for col in ("ablated_layer", "ablated_head", "top_layer", "top_head"):
        held[col] = held[col].fillna(-1).astype(int)
    _same(ab[(ab.step == 5) & (ab.metric.str.startswith("heldout_") | ab.metric.str.endswith("_layer"))],
          held[held.metric.str.startswith("heldout_") | held.metric.str.endswith("_layer")])
    final = _load(run, FINAL)
    _same(paths, ablation.mechanism_paths(final, to_bridge(final), ds.val, rep))

    every = ablation.tables(cfg, root, n_examples=8, n_patch_pairs=8, positions_every_checkpoint=True)["patching"]
    assert set(every[every.metric == "patch_resid_pre_normalised"].step) == set(STEPS)


def test_label_evidence_at_every_checkpoint_feeds_the_held_out_validation(run, tmp_path):
    """``evidence_every_checkpoint``: one evidence row per checkpoint, the final one the default's;
    ``results.label_validation`` counts them per label for held-out seeds and refuses tuning seeds."""
    from initmi_utils.results import ResultsError, label_validation

    cfg, root = run
    ev = ablation.tables(cfg, root, n_examples=8, n_patch_pairs=8, evidence_every_checkpoint=True)["evidence"]
    assert list(ev.step) == list(STEPS)
    default = ablation.tables(cfg, root, n_examples=8, n_patch_pairs=8)["evidence"]
    pd.testing.assert_frame_equal(ev[ev.step == FINAL].reset_index(drop=True), default)
    assert ev.set_index("step").label[FINAL] == "classic_induction"
    noisy = ev.set_index("step").label[0]  # noise 1.0 swamps the circuit: no classic head to name

    held = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=5))
    write_table(ev, held, "evidence", tmp_path)
    dest, tables = label_validation(cfg.run.preset, [5], tmp_path, tmp_path / "labels.csv")
    assert tables["final"].loc["classic_induction", "n"] == 1 and tables["final"].n.sum() == 1
    assert tables["every"].n.sum() == len(STEPS) and tables["every"].loc[noisy, "n"] >= 1
    assert tables["by_scheme"][("normal", "n")].sum() == len(STEPS)
    assert len(pd.read_csv(dest)) == len(STEPS)
    with pytest.raises(ResultsError, match="tuned on"):
        label_validation(cfg.run.preset, [0, 5], tmp_path, tmp_path / "x.csv")
    with pytest.raises(ResultsError, match="run notebooks 01 and 04"):
        label_validation(cfg.run.preset, [6], tmp_path, tmp_path / "y.csv")


def test_logit_lens_tables(run):
    cfg, root = run
    out = logit_lens.tables(cfg, root, n_val=16, n_rep=8, rank1_fraction=0.5)
    assert set(out) == {"logit_lens"}
    df = out["logit_lens"]
    first = df[df.metric == "first_rank1_layer"]
    assert first.groupby("step").size().to_dict() == {s: 3 for s in STEPS}  # val background/induction, rep induction
    assert set(logit_lens.METRICS) <= set(df.metric)
    # the hand-built model's answer appears only after its last layer
    assert one_value(first, step=FINAL, dataset="rep", position_type="induction") == cfg.model.n_layers - 1

    batch = logit_lens.lens_batch(load_dataset(cfg, root), 16, 8)
    with torch.no_grad():
        _, cache = to_bridge(_load(run, 5)).run_with_cache(batch.tokens, names_filter=logit_lens.hook_names(cfg.model.n_layers))
    _same(df[df.step == 5], logit_lens.logit_lens_table(cache, batch, 0.5).assign(step=5))


def test_geometry_and_circuits_tables(run):
    cfg, root = run
    out = circuits.tables(cfg, root, n_sequences=8, null_models=2, singular_values="none")
    assert set(out) == {"geometry", "circuits"}
    geo, circ = out["geometry"], out["circuits"]
    for df in (geo, circ):
        assert sorted(df.step.unique()) == list(STEPS)
    assert "singular_value" not in set(geo.metric) and "effective_rank" in set(geo.metric)
    # by default every singular value at the first and last checkpoints only; the summaries everywhere
    ends = circuits.tables(cfg, root, n_sequences=8, null_models=2)["geometry"]
    assert sorted(ends[ends.metric == "singular_value"].step.unique()) == [STEPS[0], STEPS[-1]]
    assert sorted(ends[ends.metric == "effective_rank"].step.unique()) == list(STEPS)
    pd.testing.assert_frame_equal(ends[ends.metric != "singular_value"].drop(columns="sv_index").reset_index(drop=True),
                                  geo.reset_index(drop=True), check_like=True)
    with pytest.raises(ValueError, match="singular_values='some'"):
        circuits.tables(cfg, root, singular_values="some")
    assert (geo[(geo.step == 0) & (geo.metric == "drift")].value == 0).all()  # drift is measured from step 0
    assert {"ov_copying_score", "qk_prev_token_score", "k_composition", "k_composition_z"} <= set(circ.metric)
    k = circ[(circ.step == FINAL) & (circ.metric == "k_composition_z")]
    top = k.loc[k.value.idxmax()]
    assert ((top.source_layer, top.source_head), (top.layer, top["head"])) == (ROLES.prev_token, ROLES.induction)

    # the default null is composition_null of the run's scheme: passing it in gives the same table
    null = circuits.composition_null(cfg.model, cfg.run.scheme, 2)
    again = circuits.tables(cfg, root, n_sequences=8, singular_values="none", null=null)
    pd.testing.assert_frame_equal(again["circuits"], circ)

    model, model0 = _load(run, 5), _load(run, 0)
    tokens = load_dataset(cfg, root).val.tokens[:8]
    with torch.no_grad():
        _, cache = to_bridge(model).run_with_cache(tokens, names_filter=hook_names(cfg.model.n_layers))
    _same(geo[geo.step == 5], geometry_table(model, model0, cache, 5, with_spectra=False))
    _same(circ[circ.step == 5], circuits.circuits_table(model, 5, null, n_pos=cfg.data.seq_len))


def test_persistence_steps_come_from_the_schedule():
    available = [0, 1, 3, 5, 7, 10, 12, 20]  # 7 and 12: adaptive extra checkpoints
    schedule = [0, 5, 10, 15, 20]  # 15: not saved (yet)
    assert donor_persistence.picked_steps(available, schedule, 3) == [0, 10, 20]
    assert donor_persistence.picked_steps(available, schedule, 99) == [0, 5, 10, 20]
    assert donor_persistence.picked_steps(available, None, 2) == [0, 20]
    with pytest.raises(ValueError, match="none of the scheduled steps"):
        donor_persistence.picked_steps(available, [2, 4], 3)


def test_persistence_tables_scores_the_picked_steps(run, monkeypatch):
    cfg, root = run
    calls = []
    monkeypatch.setattr(donor_persistence, "persistence_table",
                        lambda cfg, root, steps: calls.append(steps) or pd.DataFrame({"step": steps}))
    out = donor_persistence.tables(cfg, root, schedule=[0, 9, 20], persistence_checkpoints=6)
    assert calls == [[0, FINAL]] and list(out) == ["persistence"]


@pytest.mark.parametrize("name", ["02_behavior", "03_attention", "04_ablation_patching", "05_logit_lens", "06_geometry"])
def test_the_notebook_calls_its_tables_function_and_loops_over_no_checkpoint(name):
    src = (NOTEBOOKS / f"{name}.py").read_text()
    assert "tables(cfg, root" in src
    assert ".bridges(" not in src and "for step" not in src
