"""Write notebooks/02_behavior.ipynb and notebooks/07_compare.ipynb (no outputs, kernel python3).

    python notebooks/_build/build_02_07.py

Comments in ``parameters`` cells must not contain "=": papermill's parser then drops the line
and the pipeline cannot pass that parameter. The notebooks are generated so that their cells stay thin library calls and diff cleanly; edit
this script, not the .ipynb files.
"""

from __future__ import annotations

from common import code, md, notebook, parameters, run_parameters, write

BEHAVIOR = notebook([
    md("""
# 02 · Behaviour of one run

Loss, induction accuracy and logit difference over training (from the training metrics), and, at every
checkpoint, the in-context-learning score and the loss on the first vs the repeated half of BOS + A + A.
Writes the table `behavior` (`data/runs/<preset>/<scheme>/seed<k>/behavior.parquet`) and the figures
`figures/<preset>/<scheme>/seed<k>/02_*.html`.

- **emergence step**: first evaluated step whose `val_acc_induction` ≥ `emergence_threshold`; `nan` = never
  (stored as metric `emergence_step` at step −1);
- **ICL score** (Olsson et al. 2022): mean loss on the last 4 tokens minus mean loss on tokens 10–13
  (`behavior.icl_score` says why these positions); negative = the model uses its context;
- **first vs repeated half**: loss on A[1:] in the first copy vs in the second copy (`behavior.half_losses`);
- **accuracy by copy distance**: induction accuracy when the two copies of the segment are fewer than 12
  positions apart (`val_acc_induction_short`) vs 12 or more (`val_acc_induction_long`), and per distance bin
  (`behavior.copy_distance_stats`, `behavior.accuracy_by_copy_distance`). A classic induction head copies at
  every distance; the long-offset recall circuit (`initmi_utils.offsets`, notebook 03) fails below ~12.
"""),
    run_parameters("""
emergence_threshold: float = 0.8  # val_acc_induction that counts as "induction has emerged"
"""),
    code("""
import pandas as pd
import torch

from initmi_utils import plots
from initmi_utils.behavior import behavior_table, emergence_rows
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.tables import table_path, write_table

cfg = experiment(preset, init_scheme, seed)
paths = RunPaths.of(cfg, root)
checkpoints = list_checkpoints(cfg, root)  # raises, naming the training to run, if the run is not trained
metrics = pd.read_parquet(table_path(cfg, "metrics", root))
ds = load_dataset(cfg, root)
print(f"{cfg.run.name} ({preset}): {len(checkpoints.steps)} checkpoints {checkpoints.steps}")
"""),
    code("""
rows = []
with torch.no_grad():
    for step in checkpoints.steps:
        model, _ = checkpoints.load(step)
        rows.append(behavior_table(model(ds.val.tokens), ds.val, model(ds.rep.tokens), ds.rep, cfg.data.rep_len, step))
emergence = emergence_rows(metrics, emergence_threshold)
behavior = pd.concat(rows + [emergence], ignore_index=True)
write_table(behavior, cfg, "behavior", root)
emerged_at = emergence.value.item()
print("emergence step:", "never" if pd.isna(emerged_at) else int(emerged_at), f"(threshold {emergence_threshold})")
scalars = behavior[(behavior.position == -1) & (behavior.copy_distance == -1)]
scalars.pivot_table(index="step", columns="metric", values="value").round(3)
"""),
    md("## Loss, accuracy and logit difference over training"),
    code("""
figures = {
    "02_loss": (["train_loss", "val_loss", "val_loss_background", "val_loss_induction"], "loss (nats)", None),
    "02_accuracy": (["val_acc_induction", "rep_acc_induction", "induction_score"], "accuracy / score", emergence_threshold),
    "02_logit_diff": (["val_logit_diff", "rep_logit_diff"], "logit(correct) - logit(distractor)", None),
}
for name, (which, y_title, hline) in figures.items():
    fig = plots.line_figure(metrics[metrics.metric.isin(which)], f"{cfg.run.name} ({preset}): {name[3:]}",
                            y_title=y_title, hline=hline, vline=emerged_at)
    plots.save_figure(fig, paths.figures / name)
    fig.show()
"""),
    md("""
## Induction accuracy by copy distance

Short copies (fewer than 12 positions between the two copies, ~6% of the validation targets) separate the
classic induction circuit, which copies at every distance, from the long-offset recall circuit, which cannot.
"""),
    code("""
which = ["val_acc_induction", "val_acc_induction_short", "val_acc_induction_long"]
fig = plots.line_figure(behavior[behavior.metric.isin(which)], f"{cfg.run.name} ({preset}): induction accuracy, short vs long copies",
                        y_title="accuracy", hline=emergence_threshold, vline=emerged_at)
plots.save_figure(fig, paths.figures / "02_accuracy_by_copy_distance")
fig.show()
by_distance = behavior[behavior.metric.isin(["val_acc_by_copy_distance", "val_n_targets_by_copy_distance"])]
by_distance[by_distance.step == by_distance.step.max()].pivot_table(index="copy_distance", columns="metric", values="value").round(3)
"""),
    md("## In-context learning: ICL score and the two halves of BOS + A + A, per checkpoint"),
    code("""
icl = behavior[behavior.metric.isin(["icl_score", "rep_first_half", "rep_repeated_half", "rep_half_gap"])]
fig = plots.line_figure(icl, f"{cfg.run.name} ({preset}): in-context learning", y_title="loss difference / loss (nats)",
                        vline=emerged_at)
plots.save_figure(fig, paths.figures / "02_icl")
fig.show()
"""),
    code("""
by_pos = behavior[behavior.metric == "val_loss_at_position"]
steps = sorted(by_pos.step.unique())
shown = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
fig = plots.line_figure(by_pos[by_pos.step.isin(shown)].assign(checkpoint=lambda d: "step " + d.step.astype(str)),
                        f"{cfg.run.name} ({preset}): validation loss by token position", x="position",
                        color="checkpoint", y_title="loss (nats)")
plots.save_figure(fig, paths.figures / "02_loss_by_position")
fig.show()
"""),
])


COMPARE = notebook([
    md("""
# 07 · Compare schemes: RQ1–3 across seeds

Reads every run's tables of a preset (`tables.read_table`, one schema) and answers:

- **RQ1** training and emergence: curves per scheme with seed bands; emergence step with 95% bootstrap CI;
  survival curve (never-emerged seeds counted);
- **RQ2** mechanisms at step-matched and loss-matched checkpoints: the copying mechanism of every run (classic
  induction vs long-offset recall, from table `offsets`) with accuracy on short vs long copies, head roles,
  ablation matrices, localisation, and the "similar loss, different minds" table (ablation-profile distance,
  head-role disagreement, residual CKA);
- **RQ3** geometry trajectories with seed bands; early geometry vs emergence step;
- **persistence** of the `seeded` scheme's donor heads, against the same head slots under the other schemes.

Statistics: mean ± 95% bootstrap CI over seeds, pairwise permutation tests with Holm correction, n seeds always
shown (`initmi_utils.compare` documents each choice). Missing or failed runs are named, not silently averaged away.
Writes `figures/<preset>/07_*.html`, `figures/<preset>/report.html` (one offline file) and the tables as CSV under
`data/compare/<preset>/`.
"""),
    parameters("""
preset: str = "quick"  # smoke | quick | full: which preset's runs to compare
root: str = ".."  # project root: reads root/data and root/checkpoints, writes root/figures
seeds: list = []  # init seeds the grid ran (the pipeline passes its --seeds); empty means the preset's
emergence_threshold: float = 0.8  # val_acc_induction that counts as "induction has emerged"
match_step: int = -1  # step-matched view at this step; -1 means the last step every run has analysed
loss_match_target: float = 0.0  # loss-matched view at this val loss; 0 means automatic (largest per-scheme median final val loss)
role_threshold: float = 0.4  # attention score a head needs to get a role (induction, prev_token, duplicate, bos)
similar_loss_eps: float = 0.05  # runs whose matched val losses differ by less than this are "similar loss"
early_fraction: float = 0.1  # early geometry: the checkpoint nearest this fraction of training
cka_sequences: int = 128  # validation sequences for residual-stream CKA (0 skips CKA)
n_boot: int = 10000  # bootstrap resamples for confidence intervals
n_perm: int = 10000  # permutations for tests (exact enumeration when there are fewer relabellings)
"""),
    code("""
from initmi_utils import compare

study = compare.load_study(preset, root, seeds)
overview = compare.overview(study)
overview.section.show()
"""),
    code("""
rq1 = compare.rq1(study, emergence_threshold, n_boot=n_boot, n_perm=n_perm)
rq1.section.show()
"""),
    code("""
rq2 = compare.rq2(study, match_step=match_step, loss_match_target=loss_match_target, role_threshold=role_threshold,
                  similar_loss_eps=similar_loss_eps, cka_sequences=cka_sequences, n_boot=n_boot, n_perm=n_perm)
rq2.section.show()
"""),
    code("""
rq3 = compare.rq3(study, rq1.tables.get("emergence"), early_fraction=early_fraction, n_boot=min(n_boot, 2000),
                  n_perm=n_perm)
rq3.section.show()
"""),
    code("""
persistence = compare.persistence(study, n_boot=min(n_boot, 2000))
persistence.section.show()
"""),
    code("""
headline = compare.headline(study, rq1, rq2)
headline.section.show()
written = compare.save_outputs(study, [overview, headline, rq1, rq2, rq3, persistence])
print("report:", written["report"])
"""),
])


def main() -> None:
    for name, nb in (("02_behavior.ipynb", BEHAVIOR), ("07_compare.ipynb", COMPARE)):
        write(nb, name)


if __name__ == "__main__":
    main()
