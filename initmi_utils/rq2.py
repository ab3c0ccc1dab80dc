"""RQ2: at matched checkpoints, do runs of different schemes use different mechanisms?

Every run is read at a *step-matched* checkpoint (the last step every run has analysed, or a
given one) and at two *loss-matched* ones: each run's loss-ladder checkpoint of one val-loss level
and of one induction-loss level, the lowest level every emerged run reaches (``ladder_target``): two
runs can reach the same loss by different circuits, and only the matched views tell.

- The copying mechanism of every run (``offsets.mechanism_labels``: classic induction, shifted
  induction, long-offset recall or none) and induction accuracy on short vs long copies
  (``behavior.copy_distance_stats``), counted per scheme (k/n runs) and summarised as mean with
  its 95% t-interval over seeds.
- Head roles, ablation matrices and the "similar loss, different minds" pairs (ablation-profile
  distance, head-role disagreement, residual CKA). Heads are unordered within a layer, so every
  cross-run comparison of heads is invariant to permuting heads within a layer (profiles sorted
  within layer, roles compared as counts per layer).
- Scalar mechanism features (localisation indices, logit-lens first rank-1 layer, the induction
  circuit, the number of last-layer heads with the induction role): mean [95% t-interval] per
  scheme; per feature a Kruskal–Wallis test across schemes,
  then each scheme against the reference scheme (permutation test on the difference of means,
  exact at 5 v 5), Holm within the base family and within the seeded family; all pairs in the
  CSV only (``inference`` describes the procedure).
- ``persistence``: whether the `seeded` scheme's head slots keep the donor's role, against the
  same slots under the other schemes (mean over seeds with pointwise t-intervals).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from initmi_utils import plots
from initmi_utils.ablation import ABLATION_MIN_DROP, PATH_MIN_SHARE, agreement_table, final_evidence
from initmi_utils.behavior import emergence_table, evaluation_grid
from initmi_utils.config import PRESETS
from initmi_utils.donor_persistence import seeded_slots
from initmi_utils.inference import (MEAN_CI_SENTENCE, PAIR_NAME, REFERENCE, band_summary, format_ci,
                                    scheme_tests, summarise)
from initmi_utils.offsets import REPORT_ORDER, THRESHOLDS, mechanism_labels
from initmi_utils.probes import ProbeCache
from initmi_utils.report import Section
from initmi_utils.stats import ALPHA
from initmi_utils.study import (Result, Study, at_matched, feature_table, missing_note,
                                runs_of, section_table, seeds_note, show_scheme_tests)

BAND_LEGEND = "scheme (band: 95% t-interval of the mean over seeds)"


ROLE_METRICS = {"induction": "induction_score", "prev_token": "prev_token_score",
                "duplicate": "duplicate_score", "bos": "bos_score"}


def candidate_steps(*tables: pd.DataFrame) -> pd.DataFrame:
    """(run, step) pairs analysed in every given table that has the run (the checkpoints we can
    read mechanisms at)."""
    sets: dict[str, set[int]] = {}
    for t in tables:
        if t.empty:
            continue
        for run, g in t[t.step >= 0].groupby("run"):
            s = set(g.step.astype(int))
            sets[run] = sets[run] & s if run in sets else s
    return pd.DataFrame([(r, s) for r, ss in sets.items() for s in sorted(ss)], columns=["run", "step"])


def _val_loss(metrics: pd.DataFrame) -> pd.DataFrame:
    vl = metrics[metrics.metric == "val_loss"]
    return vl.groupby(["run", "scheme", "seed", "step"], as_index=False).value.mean().rename(columns={"value": "val_loss"})


def step_matched(candidates: pd.DataFrame, metrics: pd.DataFrame, step: int = -1) -> tuple[pd.DataFrame, int | None]:
    """Every run at the same step: ``step``, or with -1 the last step all runs have analysed.

    Returns (run, scheme, seed, step, val_loss) with ``step`` nan where a run lacks it, and the
    step used (None if no step is common to all runs).
    """
    runs = runs_of(metrics)
    if candidates.empty or runs.empty:
        return runs.assign(step=np.nan, val_loss=np.nan), None
    if step < 0:
        common = set.intersection(*[set(g.step) for _, g in candidates.groupby("run")])
        step = max(common) if common else None
    if step is None:
        return runs.assign(step=np.nan, val_loss=np.nan), None
    have = set(candidates[candidates.step == step].run)
    out = runs.assign(step=[step if r in have else np.nan for r in runs.run])
    vl = _val_loss(metrics)
    out = out.merge(vl[["run", "step", "val_loss"]], on=["run", "step"], how="left")
    return out.reset_index(drop=True), int(step)


LADDER_METRICS = {"val_loss": "ladder_val_loss", "val_loss_induction": "ladder_val_loss_induction"}
LADDER_NAMES = {"val_loss": "val loss", "val_loss_induction": "loss on induction targets"}


def ladder_target(ladder: pd.DataFrame, emergence: pd.DataFrame, which: str = "val_loss") -> float:
    """The lowest level of the ``which`` ladder that every emerged run reaches (``nan`` if no
    level is reached by all, or nothing emerged).

    Loss falls as a run learns, so the lowest level common to all emerged runs is the one they
    reach latest: past every run's emergence whenever any level is (a run crossing it before its
    own emergence is flagged by ``ladder_matched``). Runs that never emerged do not set the
    target; they are matched if they reach it and listed as "not reached" otherwise, never
    matched on their plateau (what the largest per-scheme median final loss did whenever a
    scheme's median run had not emerged).
    """
    lad = ladder[(ladder.metric == LADDER_METRICS[which]) & (ladder.step >= 0)]
    runs = set(emergence[emergence.emerged].run)
    if lad.empty or not runs:
        return math.nan
    for level in sorted(ladder[ladder.metric == LADDER_METRICS[which]].level.unique()):
        if runs <= set(lad[lad.level == level].run):
            return float(level)
    return math.nan


def ladder_matched(ladder: pd.DataFrame, metrics: pd.DataFrame, emergence: pd.DataFrame, level: float,
                   which: str = "val_loss") -> pd.DataFrame:
    """Each run at its ladder checkpoint of ``level``: (run, scheme, seed, step, loss (the ladder's
    subset loss there), tolerance (level - loss: how far past the level the first step at or below
    it landed), val_loss (full validation), reached, after_emergence)."""
    lad = ladder[(ladder.metric == LADDER_METRICS[which]) & (ladder.level == level) & (ladder.step >= 0)]
    lad = lad.drop_duplicates("run").set_index("run")
    em = emergence.set_index("run")
    vl = _val_loss(metrics).set_index(["run", "step"]).val_loss
    rows = []
    for run, scheme, seed in runs_of(metrics).itertuples(index=False):
        if run in lad.index:
            r = lad.loc[run]
            step = int(r.step)
            emerged_at = float(em.emergence_step[run]) if run in em.index else math.nan
            rows.append(dict(run=run, scheme=scheme, seed=int(seed), step=step, loss=float(r.value),
                             tolerance=float(r.tolerance), val_loss=float(vl.get((run, step), math.nan)), reached=True,
                             after_emergence=bool(not math.isnan(emerged_at) and step >= emerged_at)))
        else:
            rows.append(dict(run=run, scheme=scheme, seed=int(seed), step=np.nan, loss=np.nan, tolerance=np.nan,
                             val_loss=np.nan, reached=False, after_emergence=False))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "step", "loss", "tolerance", "val_loss", "reached",
                                       "after_emergence"])


def head_roles(attention: pd.DataFrame, threshold: float = 0.4) -> pd.DataFrame:
    """Each head's role: the role whose score is highest among those >= ``threshold``, else
    'other' (ties go to the order of ``ROLE_METRICS``: induction first)."""
    a = attention[attention.metric.isin(ROLE_METRICS.values()) & (attention["head"] >= 0)]
    if a.empty:
        return pd.DataFrame(columns=["run", "scheme", "seed", "step", "layer", "head", "role", "score"])
    wide = a.pivot_table(index=["run", "scheme", "seed", "step", "layer", "head"], columns="metric",
                         values="value", aggfunc="mean").reset_index()
    names = [r for r, m in ROLE_METRICS.items() if m in wide.columns]
    scores = wide[[ROLE_METRICS[r] for r in names]].to_numpy(dtype=float)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = scores.argmax(1)
    top = scores[np.arange(len(scores)), best]
    wide["role"] = np.where(top >= threshold, np.array(names)[best], "other")
    wide["score"] = np.where(np.isfinite(top), top, np.nan)
    return wide[["run", "scheme", "seed", "step", "layer", "head", "role", "score"]]


def induction_heads(roles: pd.DataFrame) -> pd.DataFrame:
    """Per run: how many heads of the last layer have the induction role (``head_roles``), as the
    feature ``induction heads in the last layer`` (one induction head, or induction spread over
    several)."""
    cols = ["run", "scheme", "seed", "step", "feature", "metric", "value"]
    if roles.empty:
        return pd.DataFrame(columns=cols)
    last = roles[roles.layer == roles.layer.max()]
    n = last.assign(value=(last.role == "induction").astype(float)) \
        .groupby(["run", "scheme", "seed", "step"], as_index=False).value.sum()
    name = "induction heads in the last layer"
    return n.assign(feature=name, metric=name)[cols]


def role_strings(roles: pd.DataFrame) -> pd.DataFrame:
    """One line per run: ``L0: prev_token · bos · other | L1: induction · …`` (heads by index)."""
    rows = []
    for (run, scheme, seed, step), g in roles.groupby(["run", "scheme", "seed", "step"], sort=False):
        parts = [f"L{l}: " + " · ".join(h.sort_values("head").role) for l, h in g.groupby("layer")]
        rows.append(dict(run=run, scheme=scheme, seed=seed, step=step, roles=" | ".join(parts)))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "step", "roles"])


def _runs_with(df: pd.DataFrame, schemes: Sequence[str], conditions: dict) -> pd.DataFrame:
    """Per scheme: ``n`` runs and, per named condition (a function of the scheme's rows giving a
    row mask), the runs with at least one row meeting it, as "k/n"."""
    rows = []
    for s in schemes:
        g = df[df.scheme == s]
        if g.empty:
            continue
        n = g.run.nunique()
        rows.append(dict(scheme=s, n=n, **{name: f"{g[cond(g)].run.nunique()}/{n}" for name, cond in conditions.items()}))
    return pd.DataFrame(rows, columns=["scheme", "n", *conditions])


def role_summary(roles: pd.DataFrame, schemes: Sequence[str]) -> pd.DataFrame:
    """Per scheme, for every (layer, role) but 'other': runs with at least one such head (k/n)."""
    if roles.empty:
        return pd.DataFrame(columns=["scheme", "n"])
    kinds = [(l, r) for l in sorted(roles.layer.unique()) for r in ROLE_METRICS]
    return _runs_with(roles, schemes, {f"L{l} {r}": (lambda g, l=l, r=r: (g.layer == l) & (g.role == r))
                                       for l, r in kinds})


def ablation_profiles(ablation: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """Per run: the per-head ablation effects sorted (descending) within each layer, layers in
    order, as one vector — head labels removed, so two runs that differ only by which index the
    induction head got have the same profile."""
    a = ablation[(ablation.metric == metric) & (ablation["head"] >= 0)]
    out = {}
    for run, g in a.groupby("run"):
        g = g.groupby(["layer", "head"]).value.mean().reset_index()
        out[run] = np.concatenate([np.sort(h.value.to_numpy())[::-1] for _, h in g.groupby("layer")])
    return out


def profile_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Cosine distance (1 - cos) between two sorted ablation profiles; 0 = same shape of effects,
    1 = orthogonal. nan when shapes differ or a profile is all zero."""
    if p.shape != q.shape:
        return math.nan
    d = np.linalg.norm(p) * np.linalg.norm(q)
    return float(1 - p @ q / d) if d > 0 else math.nan


def role_counts(roles: pd.DataFrame) -> pd.Series:
    """Number of heads per (layer, role) of one run: its role assignment up to relabelling heads."""
    return roles.groupby(["layer", "role"]).size()


def role_disagreement(a: pd.DataFrame | pd.Series, b: pd.DataFrame | pd.Series) -> float:
    """Fraction of heads whose role must change to turn run a's role assignment into run b's,
    under the best matching of heads within each layer: sum over layers of
    (1/2) sum_role |count_a - count_b|, divided by the number of heads. Takes role tables or
    their ``role_counts``."""
    ca = a if isinstance(a, pd.Series) else role_counts(a)
    cb = b if isinstance(b, pd.Series) else role_counts(b)
    n = ca.sum()
    if not n or cb.sum() != n:
        return math.nan
    return float(ca.subtract(cb, fill_value=0).abs().sum() / 2 / n)


def similar_loss_pairs(matched: pd.DataFrame, roles: pd.DataFrame, profiles: dict[str, np.ndarray], eps: float,
                       cka: Callable[[tuple, tuple], float] | None = None) -> pd.DataFrame:
    """Pairs of runs whose matched val losses differ by less than ``eps``, with how different
    their mechanisms are: ablation-profile distance, head-role disagreement and the CKA of their
    last layer's residual stream (``cka`` gives it for two (scheme, seed, step): the stored
    probes' debiased CKA, ``probes.ProbeCache``).
    Same-scheme pairs are kept: they are the seed-to-seed baseline for the cross-scheme ones."""
    m = matched.dropna(subset=["step", "val_loss"]).sort_values("run").reset_index(drop=True)
    counts = {run: role_counts(g) for run, g in roles.groupby("run")} if len(roles) else {}
    rows = []
    for i, j in itertools.combinations(range(len(m)), 2):
        a, b = m.iloc[i], m.iloc[j]
        gap = abs(a.val_loss - b.val_loss)
        if gap >= eps:
            continue
        ra, rb = counts.get(a.run), counts.get(b.run)
        pa, pb = profiles.get(a.run), profiles.get(b.run)
        c = cka((a.scheme, int(a.seed), int(a.step)), (b.scheme, int(b.seed), int(b.step))) if cka else math.nan
        rows.append(dict(run_a=a.run, run_b=b.run, same_scheme=a.scheme == b.scheme, step_a=int(a.step),
                         step_b=int(b.step), loss_gap=gap,
                         ablation_distance=profile_distance(pa, pb) if pa is not None and pb is not None else math.nan,
                         role_disagreement=role_disagreement(ra, rb) if ra is not None and rb is not None else math.nan,
                         cka_final=c))
    cols = ["run_a", "run_b", "same_scheme", "step_a", "step_b", "loss_gap", "ablation_distance",
            "role_disagreement", "cka_final"]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["ablation_distance", "role_disagreement"], ascending=False, na_position="last") \
        .reset_index(drop=True)


def induction_circuit(attention: pd.DataFrame, circuits: pd.DataFrame) -> pd.DataFrame:
    """Per run and step, the last layer's strongest induction head (by induction score) and what
    feeds it: its induction score, its OV copying score, its largest K-composition z-score over
    the previous layer's heads, and whether that K-composition partner is the previous layer's
    strongest previous-token head (1/0) — the two-head induction circuit, read per run."""
    cols = ["run", "scheme", "seed", "step", "feature", "metric", "value"]
    a = attention[attention.metric.isin(["induction_score", "prev_token_score"]) & (attention["head"] >= 0)]
    if a.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (run, scheme, seed, step), g in a.groupby(["run", "scheme", "seed", "step"], sort=False):
        last = int(g.layer.max())
        ind = g[(g.metric == "induction_score") & (g.layer == last)]
        if ind.empty:
            continue
        top = ind.loc[ind.value.idxmax()]
        head = int(top["head"])
        out = {"induction head: induction_score": float(top.value)}
        c = circuits[(circuits.run == run) & (circuits.step == step) & (circuits.layer == last) & (circuits["head"] == head)] \
            if len(circuits) else circuits
        ov = c[c.metric == "ov_copying_score"]
        if len(ov):
            out["induction head: ov_copying_score"] = float(ov.value.mean())
        kz = c[(c.metric == "k_composition_z")]
        if len(kz) and "source_head" in kz.columns:
            best = kz.loc[kz.value.idxmax()]
            out["induction head: max k_composition_z"] = float(best.value)
            prev = g[(g.metric == "prev_token_score") & (g.layer == last - 1)]
            if len(prev):
                p = prev.loc[prev.value.idxmax()]
                out["K-partner is the prev-token head"] = float(int(best.source_head) == int(p["head"])
                                                               and int(best.source_layer) == int(p.layer))
        for f, v in out.items():
            rows.append(dict(run=run, scheme=scheme, seed=seed, step=step, feature=f, metric=f, value=v))
    return pd.DataFrame(rows, columns=cols)


def mechanism_scalars(study: Study, matched: pd.DataFrame) -> pd.DataFrame:
    """One number per run and feature at its matched checkpoint: localisation indices (ablation,
    patching), the logit lens's first rank-1 layer and the induction-circuit profile."""
    parts = []
    abl = at_matched(study.table("ablation"), matched)
    loc = abl[abl.metric.str.startswith("localisation")]
    parts.append(feature_table(loc, ["source"], keep_layer=sorted(set(loc.metric[loc.metric.str.endswith("_layer")])),
                               prefix="ablation: "))
    pat = at_matched(study.table("patching"), matched)
    parts.append(feature_table(pat[pat.metric.str.startswith("localisation")], ["source"], prefix="patching: "))
    ll = at_matched(study.table("logit_lens"), matched)
    parts.append(feature_table(ll[ll.metric == "first_rank1_layer"], ["dataset", "position_type"], prefix="logit lens: "))
    parts.append(induction_circuit(at_matched(study.table("attention"), matched), at_matched(study.table("circuits"), matched)))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run", "scheme", "seed", "step", "feature", "value"])


def scalar_tests(scalars: pd.DataFrame, schemes: Sequence[str], reference: str = REFERENCE, n_perm: int = 10_000,
                 seed: int = 0, alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per feature: (summary per scheme with t-intervals, Kruskal–Wallis omnibus, reference
    families, all pairs). Schemes without a value are left out of a feature's tests; features
    with no value in any run are dropped entirely."""
    scalars = scalars[scalars.groupby("feature").value.transform(lambda v: v.notna().any())]
    summ = summarise(scalars, ["feature", "scheme"])
    omni, ref, pairs = scheme_tests(scalars, schemes, by="feature", reference=reference, n_perm=n_perm, seed=seed,
                                    alpha=alpha)
    return summ, omni, ref, pairs


MECHANISM_SENTENCE = (
    "Three copying mechanisms reach similar losses: classic induction, where a layer-0 previous-token head lets a "
    "layer-1 induction head attend to the token right after the earlier copy of the current token and copy it; "
    "shifted induction, where the layer-1 head attends one token further (+2) and reads the token to copy there "
    "through a layer-0 head that looks one back; "
    "and long-offset recall, where a layer-0 head looking ~12-14 positions back lets a layer-1 head attend ~12-14 "
    "positions after the earlier copy, read the tokens around it and keep the one that is not recent, which "
    "fails when the two copies are fewer than ~12 positions apart.")
COPY_DISTANCE_METRICS = {"val_acc_induction_short": "short copies (< 12 apart)",
                         "val_acc_induction_long": "long copies (≥ 12 apart)"}


def mechanism_counts(labels: pd.DataFrame, schemes: Sequence[str]) -> pd.DataFrame:
    """Per scheme: n runs and, for every label of ``offsets.MECHANISMS``, runs with it (k/n)."""
    return _runs_with(labels, schemes, {m: (lambda g, m=m: g.mechanism == m)
                                        for m in REPORT_ORDER})


def copy_distance_accuracy(behavior: pd.DataFrame) -> pd.DataFrame:
    """Per run: induction accuracy on short and long copies and their gap (long − short), long
    format (run, scheme, seed, step, metric, value); the gap is ~0 for classic induction and large
    for long-offset recall."""
    b = behavior[behavior.metric.isin(list(COPY_DISTANCE_METRICS))]
    cols = ["run", "scheme", "seed", "step", "metric", "value"]
    if b.empty:
        return pd.DataFrame(columns=cols)
    b = b.groupby(cols[:-1], as_index=False).value.mean()
    wide = b.pivot_table(index=cols[:4], columns="metric", values="value").reset_index()
    gap = wide.assign(metric="val_acc_induction_long_minus_short",
                      value=wide.get("val_acc_induction_long", np.nan) - wide.get("val_acc_induction_short", np.nan))
    return pd.concat([b, gap[cols]], ignore_index=True)[cols]


def path_summary(paths: pd.DataFrame) -> pd.DataFrame:
    """Per run (``paths`` rows at one step): the copying head's mechanism and, per input Q, K, V,
    the largest loss of induction accuracy when one earlier head is removed from that input alone,
    with that head (``ablation.path_ablation_effects``)."""
    acc = paths[paths.metric.str.match(r"path_[qkv]_acc_delta")] if len(paths) else paths
    cols = ["run", "scheme", "seed", "step", "mechanism", "head"] + [f"{c} {w}" for c in "QKV" for w in ("Δacc", "via")]
    if acc.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (run, scheme, seed, step), g in acc.groupby(["run", "scheme", "seed", "step"], sort=True):
        row = dict(run=run, scheme=scheme, seed=seed, step=step, mechanism=g.mechanism.iloc[0],
                   head=f"L{int(g.ablated_layer.iloc[0])}H{int(g.ablated_head.iloc[0])}")
        for c in "qkv":
            worst = g[g.metric == f"path_{c}_acc_delta"].nsmallest(1, "value")
            row[f"{c.upper()} Δacc"] = float(worst.value.iloc[0]) if len(worst) else math.nan
            row[f"{c.upper()} via"] = f"L{int(worst.layer.iloc[0])}H{int(worst['head'].iloc[0])}" if len(worst) else "—"
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _mechanism_view(study: Study, sec: Section, res: Result, key: str, label: str, matched: pd.DataFrame) -> None:
    """The copying mechanism of every run at its matched checkpoint (``offsets.mechanism_labels``),
    counts per scheme, and induction accuracy on short vs long copies per scheme (mean [95%
    t-interval])."""

    labels = mechanism_labels(at_matched(study.table("offsets"), matched), at_matched(study.table("behavior"), matched))
    paths = path_summary(at_matched(study.table("paths"), matched))
    acc = copy_distance_accuracy(at_matched(study.table("behavior"), matched))
    if labels.empty and acc.empty:
        return
    sec.text(MECHANISM_SENTENCE)
    if len(labels):
        per_run = labels.assign(
            head=[f"L{r.layer}H{r.head}" + (f" via L{r.source_layer}H{r.source_head}" if r.source_head >= 0 else "")
                  if r.layer >= 0 else "—" for r in labels.itertuples()])
        if len(acc):
            wide = acc.pivot_table(index="run", columns="metric", values="value").reset_index()
            per_run = per_run.merge(wide, on="run", how="left")
        shown = ["run", "scheme", "seed", "step", "mechanism", "head", "score"] + \
            [c for c in ("val_acc_induction_short", "val_acc_induction_long") if c in per_run.columns]
        res.tables[f"{key}_mechanism_labels"] = per_run[shown]
        res.tables[f"{key}_mechanism_counts"] = mechanism_counts(labels, study.schemes)
        sec.table(res.tables[f"{key}_mechanism_counts"],
                  f"{label}: copying mechanism per scheme, runs with each label (k/n; offsets.classify_mechanism: "
                  f"classic_induction = a layer-1 head with ≥ 0.3 attention on +1 from the earlier copy; "
                  f"shifted_induction = else a layer-1 head with ≥ 0.3 on +2 and ≥ 0.25 on offsets 0/+1 when rolled "
                  f"back through a layer-0 head; "
                  f"long_offset_recall = else a layer-1 head with < 0.1 within ±3 of the copy and ≥ 0.25 on offsets "
                  f"0/+1 when rolled back through a layer-0 head; partial = one of these attention patterns with "
                  f"induction accuracy below {THRESHOLDS.min_induction_accuracy}, the floor a label needs).")
        sec.table(res.tables[f"{key}_mechanism_labels"],
                  f"{label}: mechanism per run, the deciding head and its score (attention mass), with the run's "
                  f"induction accuracy on short and long copies.")
    if len(paths):
        res.tables[f"{key}_mechanism_paths"] = paths
        sec.table(paths, f"{label}: which input of its copying head each run's layer-0 heads act through: per input, "
                         f"the largest drop of induction accuracy on BOS + A + A when one layer-0 head is mean-ablated "
                         f"in that input alone, and that head (ablation.path_ablation_effects; notebook 04 measures "
                         f"the final checkpoint only). K carries the match with the earlier copy; a large V drop means "
                         f"the copied token is read from a layer-0 head's output, not from the embedding.")
    if len(acc):
        summ = summarise(acc, ["metric", "scheme"])
        res.tables[f"{key}_copy_distance_accuracy"] = summ
        names = {**COPY_DISTANCE_METRICS, "val_acc_induction_long_minus_short": "long − short"}
        wide = summ.assign(what=summ.metric.map(names),
                           cell=[format_ci(*r) + f" (n={n})" for r, n in
                                 zip(summ[["mean", "ci_low", "ci_high"]].values, summ.n)]) \
            .pivot_table(index="scheme", columns="what", values="cell", aggfunc="first")
        wide = wide.reindex([s for s in study.schemes if s in wide.index])
        wide = wide[[c for c in names.values() if c in wide.columns]].reset_index()
        wide.columns.name = None
        sec.table(wide, f"{label}: validation induction accuracy by distance between the two copies, "
                        f"{MEAN_CI_SENTENCE} (n seeds). Long-offset recall fails on short copies; classic induction "
                        f"does not.")


def _rq2_view(study: Study, sec: Section, res: Result, key: str, label: str, matched: pd.DataFrame, role_threshold: float,
              eps: float, ablation_metric: str, cka_cache: ProbeCache | None, reference: str, n_perm: int,
              seed: int, alpha: float) -> None:
    res.tables[f"{key}_matched"] = matched
    _mechanism_view(study, sec, res, key, label, matched)
    att = at_matched(study.table("attention"), matched)
    roles = head_roles(att, role_threshold)
    res.tables[f"{key}_roles"] = roles
    if len(roles):
        sec.table(role_summary(roles, study.schemes),
                  f"{label}: runs with at least one head of each role (score ≥ {role_threshold}), per layer.")
        sec.table(role_strings(roles), f"{label}: head roles per run (heads in index order).")
        for metric in ("induction_score", "prev_token_score"):
            sub = att[(att.metric == metric) & (att["head"] >= 0)]
            if len(sub):
                fig = plots.heatmap_grid(sub, f"{label}: {metric} per head (rows: scheme, columns: seed)",
                                         colorscale="Viridis", zmid=None, zrange=(0, 1))
                res.figures[f"rq2_{key}_{metric}"] = fig
                sec.figure(fig)
    elif study.has("attention"):
        sec.note(f"{label}: no attention rows at the matched checkpoints (or no role scores "
                 f"{', '.join(ROLE_METRICS.values())}).", "warning")

    abl = at_matched(study.table("ablation"), matched)
    sub = abl[(abl.metric == ablation_metric) & (abl["head"] >= 0)]
    if len(sub):
        fig = plots.heatmap_grid(sub, f"{label}: {ablation_metric} per head (rows: scheme, columns: seed)")
        res.figures[f"rq2_{key}_ablation"] = fig
        sec.figure(fig, "Ablation effect matrices side by side (red: ablating the head hurts).")
    scalars = mechanism_scalars(study, matched)
    if len(roles):
        scalars = pd.concat([scalars, induction_heads(roles)], ignore_index=True)
    if len(scalars):
        summ, omni, tests, pairs = scalar_tests(scalars, study.schemes, reference, n_perm, seed, alpha)
        res.tables[f"{key}_mechanism"] = summ
        res.tables[f"{key}_mechanism_omnibus"] = omni
        res.tables[f"{key}_mechanism_tests"] = tests
        res.tables[f"{key}_mechanism_tests_all_pairs"] = pairs
        wide = summ.assign(cell=[format_ci(*r) + f" (n={n})" for r, n in
                                 zip(summ[["mean", "ci_low", "ci_high"]].values, summ.n)]) \
            .pivot_table(index="feature", columns="scheme", values="cell", aggfunc="first", sort=False)
        wide = wide[[s for s in study.schemes if s in wide.columns]].reset_index()
        sec.table(wide, f"{label}: localisation indices (top-1 share and entropy of |effects|), logit-lens first "
                        f"rank-1 layer, the induction circuit and the number of last-layer heads with the induction "
                        f"role (score ≥ {role_threshold}) per scheme, {MEAN_CI_SENTENCE} (n seeds).")
        show_scheme_tests(sec, omni, tests, f"{label}: mechanism features", PAIR_NAME["mean"],
                          f"{key}_mechanism_tests_all_pairs", alpha, by="feature")

    profiles = ablation_profiles(abl, ablation_metric)
    cka = cka_cache.cka if cka_cache is not None else None
    pairs = similar_loss_pairs(matched, roles, profiles, eps, cka)
    res.tables[f"{key}_similar_loss_pairs"] = pairs
    if len(pairs):
        sec.table(pairs, f"{label}: similar loss, different minds — run pairs with |Δ val loss| < {eps}, most "
                         f"different ablation profiles first (cosine distance of within-layer-sorted effects; role "
                         f"disagreement = fraction of heads to relabel under the best within-layer matching; "
                         f"CKA = debiased linear CKA of the last layer's residual stream on the same probe tokens, "
                         f"stored by notebook 06).")
        within = pairs.groupby("same_scheme")[["ablation_distance", "role_disagreement", "cka_final"]].mean()
        sec.table(within.reset_index(), f"{label}: mean mechanism distance for same-scheme (seed baseline) vs "
                                        f"cross-scheme pairs.")
    else:
        sec.note(f"{label}: no pair of runs has val losses within {eps} of each other at these checkpoints.")


def label_agreement(study: Study, sec: Section, res: Result) -> None:
    """Each run's final-checkpoint label against the causal criterion (table ``evidence``, written
    by notebook 04 from ``ablation.label_evidence``): per label, how many runs pass it. When 04 ran
    with ``evidence_every_checkpoint`` (label validation), a second table counts every checkpoint."""
    ev = study.table("evidence")
    if ev.empty:
        return
    final = final_evidence(ev)
    table = agreement_table(final).reset_index()
    res.tables["label_agreement"] = table
    res.tables["label_evidence"] = ev
    sec.heading("Do the mechanism labels agree with causal evidence? (final checkpoints)")
    criterion = (f"a label passes when mean-ablating its deciding head costs ≥ {ABLATION_MIN_DROP} induction accuracy on "
                 f"BOS + A + A and its implied paths (classic: K; shifted and recall: K and V) each carry ≥ "
                 f"{PATH_MIN_SHARE} of that drop, a path being one layer-0 head or all of them, directly or through "
                 f"MLP0; `none` passes when no layer-1 head's ablation costs that much.")
    sec.table(table, f"Label × causal evidence over runs: {criterion}")
    if len(ev) > len(final):
        every = agreement_table(ev).reset_index()
        res.tables["label_agreement_every_checkpoint"] = every
        sec.table(every, f"Label × causal evidence over every checkpoint with evidence ({len(ev)} checkpoints of "
                         f"{ev.run.nunique()} runs): the same criterion.")


def rq2(study: Study, match_step: int = -1, loss_match_target: float = 0.0, role_threshold: float = 0.4,
        similar_loss_eps: float = 0.05, ablation_metric: str = "zero_ablation_loss_delta",
        cka: bool = True, n_boot: int | None = None, n_perm: int = 10_000, seed: int = 0,
        reference: str = REFERENCE, alpha: float = ALPHA, emergence_threshold: float = 0.8) -> Result:
    """RQ2's section. ``cka``: the residual-stream CKA of similar-loss pairs, from the probes
    notebook 06 stores. ``n_boot`` is unused (intervals are t-intervals now); it is accepted so
    that existing calls keep working."""
    sec = Section("RQ2 · Mechanisms at step- and loss-matched checkpoints", folded=True)
    res = Result(sec)
    for name, mets in (("attention", list(ROLE_METRICS.values())), ("ablation", [ablation_metric]),
                       ("patching", ["localisation_top1_share"]), ("logit_lens", ["first_rank1_layer"]),
                       ("circuits", ["ov_copying_score", "k_composition_z"]),
                       ("offsets", ["copy_offset_plus1", "composed_copy_mass"]),
                       ("behavior", list(COPY_DISTANCE_METRICS))):
        note = missing_note(study, name, mets)
        if note:
            sec.note(note, "warning")
    metrics = study.table("metrics")
    candidates = candidate_steps(study.table("attention"), study.table("ablation"))
    if candidates.empty or metrics.empty:
        sec.note("No attention or ablation table (or no metrics): RQ2 cannot be answered for this preset.", "warning")
        return res
    used = pd.concat([study.table("attention"), study.table("ablation")])
    sec.text(seeds_note(study, used, "Runs with mechanism tables"))
    cka_cache = ProbeCache(study.preset, study.root) if cka else None

    sm, step = step_matched(candidates, metrics, match_step)
    sec.heading(f"Step-matched: every run at step {step}" if step is not None else "Step-matched")
    if step is None:
        sec.note("No checkpoint step is analysed in every run; step-matched view skipped.", "warning")
    else:
        lacking = sm[sm.step.isna()].run.tolist()
        if lacking:
            sec.note(f"Runs without an analysed checkpoint at step {step}: {', '.join(lacking)}.", "warning")
        _rq2_view(study, sec, res, "step", f"Step-matched (step {step})", sm, role_threshold, similar_loss_eps,
                  ablation_metric, cka_cache, reference, n_perm, seed, alpha)

    label_agreement(study, sec, res)
    ladder = study.table("ladder")
    em = emergence_table(evaluation_grid(metrics, PRESETS[study.preset].train.eval_every), emergence_threshold)
    targets = []
    if ladder.empty:
        sec.note("No loss-ladder checkpoints (table `ladder`, written by training): the loss-matched views need "
                 "them; retrain the runs (notebook 01) to add them.", "warning")
    for key, which in (("loss", "val_loss"), ("induction_loss", "val_loss_induction")):
        if ladder.empty:
            break
        given = loss_match_target if which == "val_loss" and loss_match_target > 0 else 0.0
        target = given or ladder_target(ladder, em, which)
        how = "given" if given else ("automatic: the lowest ladder level every emerged run reaches (emergence: "
                                     f"unambiguous induction accuracy ≥ {emergence_threshold})")
        name = LADDER_NAMES[which]
        targets.append(dict(view=key, loss=which, target=target, how=how))
        sec.heading(f"Loss-matched on the {name}: each run at its first step with {name} ≤ {target:.4g} ({how})")
        if math.isnan(target):
            sec.note(f"No level of the {name} ladder is reached by every emerged run (or no run emerged): no "
                     f"{name}-matched view.", "warning")
            continue
        lm = ladder_matched(ladder, metrics, em, target, which)
        if not lm.reached.any():
            sec.note(f"{target:.4g} is not a level of the {name} ladder any run reached.", "warning")
            continue
        never = lm[~lm.reached].run.tolist()
        if never:
            sec.note(f"Not reached ({name} never ≤ {target:.4g}; not matched anywhere else): {', '.join(never)}.",
                     "warning")
        early = lm[lm.reached & ~lm.after_emergence].run.tolist()
        if early:
            sec.note(f"Matched before their own emergence (or never emerged): {', '.join(early)}.", "warning")
        res.tables[f"{key}_matched"] = lm
        sec.table(lm, f"Loss-matched checkpoint per run: the first step whose {name} on the ladder's fixed "
                      f"validation subset is ≤ {target:.4g}; tolerance = level − loss there (max "
                      f"{lm.tolerance.max():.3g} nats over reached runs).")
        _rq2_view(study, sec, res, key, f"Loss-matched ({name} ≤ {target:.4g})", lm, role_threshold,
                  similar_loss_eps, ablation_metric, cka_cache, reference, n_perm, seed, alpha)
    if cka_cache is not None and cka_cache.errors:
        sec.note("CKA left empty where a stored probe is missing (notebook 06 keeps them at the loss-ladder "
                 "checkpoints and the last one): " +
                 "; ".join(f"{k}: {v}" for k, v in list(cka_cache.errors.items())[:10]), "warning")
    res.tables["loss_target"] = pd.DataFrame(targets, columns=["view", "loss", "target", "how"])
    return res


# =============================================================================================
# Persistence of the seeded scheme's donor heads.

PERSISTENCE_METRICS = ("pattern_similarity_to_donor", "ablation_share", "cka_to_donor")


def persistence(study: Study, n_boot: int | None = None, seed: int = 0) -> Result:
    """Do the `seeded` head slots keep the donor's role? The same slots under the other schemes
    are the baseline (their similarity to a donor they never saw is what chance looks like).
    Means over seeds with t-intervals; ``n_boot`` and ``seed`` are unused (kept for existing calls)."""

    sec = Section("Persistence · do the seeded head slots keep the donor's role?", folded=True)
    res = Result(sec)
    table = section_table(study, sec, "persistence", PERSISTENCE_METRICS, "Runs with a persistence table")
    if table.empty:
        return res
    slots = (seeded_slots(table)
             .groupby(["scheme", "seed", "run", "step", "layer", "metric"], as_index=False).value.mean()
             .assign(panel=lambda d: d.metric + ", layer " + d.layer.astype(str)))
    summary = band_summary(slots, extra=["panel"])
    panels = sorted(slots.panel.unique())
    fig = plots.band_grid(summary, "Seeded head slots vs the donor over training (mean over seeds, 95% t-interval)",
                          panel="panel", panels=panels, colors=study.colors, n_cols=min(3, len(panels)))
    fig.update_layout(legend_title=BAND_LEGEND)
    res.figures["persistence"] = fig
    sec.figure(fig, "Pattern similarity (1 − Jensen–Shannon) of each seeded slot to its donor head, the slots' share "
                    "of the total |ablation effect| on induction loss, and linear CKA between the donor's residual "
                    "stream and the student's seeded subspace; mean over a layer's seeded slots. Under schemes other "
                    "than `seeded` the same slots are the baseline. Band: pointwise 95% t-interval of the mean over seeds.")
    final = slots[slots.step == slots.groupby("run").step.transform("max")]
    res.tables["persistence_final"] = summarise(final, by=["metric", "layer", "scheme"])
    sec.table(res.tables["persistence_final"], f"At each run's last scored checkpoint: {MEAN_CI_SENTENCE} "
                                               f"(ci_low, ci_high; n = seeds).")
    return res


