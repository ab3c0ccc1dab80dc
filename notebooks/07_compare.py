# %% [markdown]
# # 07 · Compare schemes: RQ1–3 across seeds
#
# Reads every run's tables of a preset (`tables.read_table`, one schema) and answers:
#
# - **RQ1** training and emergence: curves per scheme with seed bands; emergence step as median with its
#   order-statistic interval; survival curve (never-emerged seeds counted);
# - **RQ2** mechanisms at step-matched and loss-matched checkpoints: the copying mechanism of every run (classic
#   induction vs long-offset recall, from table `offsets`) with accuracy on short vs long copies, head roles,
#   ablation matrices, localisation, induction heads per run, and the "similar loss, different minds" table
#   (ablation-profile distance, head-role disagreement, residual CKA);
# - **RQ3** geometry trajectories with seed bands; early geometry vs emergence step;
# - **persistence** of the `seeded` scheme's donor heads, against the same head slots under the other schemes.
#
# Then the **findings**: a few sentences per question written from those tables (effect, interval, n, the test
# and its p; "no difference" or "not supported" where the tests do not show one), and a **head browser** per
# scheme (its seed-0 run). Statistics: means with 95% t-intervals over seeds, an omnibus test across schemes,
# then each scheme against `normal` with Holm; n seeds always shown (`initmi_utils.compare` documents each
# choice). Missing or failed runs are named, not silently averaged away. Writes `figures/<preset>/07_*.html`,
# `figures/<preset>/report.html` (one offline file: findings first, the evidence in folded sections), the main
# figures as JSON for `make figures`, and the tables as CSV under `data/compare/<preset>/`.

# %% tags=["parameters"]
preset: str = "quick"  # smoke | quick | full: which preset's runs to compare
root: str = ""  # project root: reads its data/ and checkpoints/, writes figures/; empty: this project
results: str = ""  # published results to read instead (e.g. results/full: tables and manifest, no checkpoints); empty: root's
seeds: list = []  # init seeds the grid ran (the pipeline passes its --seeds); empty means the preset's
emergence_threshold: float = 0.8  # induction accuracy on unambiguous targets that counts as emerged
match_step: int = -1  # step-matched view at this step; -1 means the last step every run has analysed
loss_match_target: float = 0.0  # val-loss ladder level of the loss-matched view; 0 means automatic (the lowest level every emerged run reaches)
role_threshold: float = 0.4  # attention score a head needs to get a role (induction, prev_token, duplicate, bos)
similar_loss_eps: float = 0.05  # runs whose matched val losses differ by less than this are "similar loss"
early_fraction: float = 0.1  # early geometry: the checkpoint nearest this fraction of training
cka: bool = True  # residual-stream CKA of similar-loss pairs, on the probes notebook 06 stores
n_boot: int = 10000  # unused (intervals are t- and order-statistic intervals); kept for old calls
n_perm: int = 10000  # permutations for tests (exact enumeration when there are fewer relabellings)
scheme_modules: str = ""  # comma-separated .py files that register schemes; empty: none, or the INITMI_SCHEME_MODULES variable

# %%
from initmi_utils import compare
from initmi_utils.schemes import load_scheme_modules

load_scheme_modules(scheme_modules)  # a user's schemes join the expected grid
study = compare.load_study(preset, results or root, seeds)
overview = compare.overview(study)
overview.section.show()

# %%
rq1 = compare.rq1(study, emergence_threshold, n_boot=n_boot, n_perm=n_perm)
rq1.section.show()

# %%
rq2 = compare.rq2(study, match_step=match_step, loss_match_target=loss_match_target, role_threshold=role_threshold,
                  similar_loss_eps=similar_loss_eps, cka=cka, n_boot=n_boot, n_perm=n_perm,
                  emergence_threshold=emergence_threshold)
rq2.section.show()

# %%
rq3 = compare.rq3(study, rq1.tables.get("emergence"), early_fraction=early_fraction, n_boot=min(n_boot, 2000),
                  n_perm=n_perm)
rq3.section.show()

# %%
persistence = compare.persistence(study, n_boot=min(n_boot, 2000))
persistence.section.show()

# %%
headline = compare.headline(study, rq1, rq2)
headline.section.show()

# %%
findings = compare.findings(study, rq1, rq2, rq3, emergence_threshold)
findings.section.show()

# %%
browsers = compare.head_browsers(study)
written = compare.save_outputs(study, [findings, browsers, overview, headline, rq1, rq2, rq3, persistence], out_root=root)
print("report:", written["report"])
