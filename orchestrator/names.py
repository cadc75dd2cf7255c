"""The names MLflow runs are found by, defined once for the sweep, the tables and export
(importing this module imports neither Ray nor MLflow)."""
TAG_ROLE = "buarl.role"              # "sweep" (the parent run) or "trial"
TAG_TRIAL = "buarl.trial_id"
TAG_SWEEP = "buarl.sweep"
TAG_POINT = "buarl.grid_point"
TAG_ROW = "buarl.row"                # a grid switch's row name (the tables' method column)
TAG_DIGEST = "buarl.code_digest"
TAG_VERSION = "buarl.code_version"
TAG_DATA = "buarl.data"              # the data's name: "ACDC", "ACDC phantom" (buarl.data.origin)
TAG_SYNTHETIC = "buarl.synthetic"    # "true" for the built-in phantom
TAG_CASES = "buarl.train_cases"      # training cases of the data: what a label ratio is a share of
PARENT = "mlflow.parentRunId"
VAL_METRICS = ("best_val_dice", "val_dice")  # what a sweep may select by; test metrics never
# metrics every trial reports at each evaluation, that a space may optimise
# (train_* scalars are the last log window's means: the loop's `loss` arrives as train_loss)
REPORTED_METRICS = ("best_val_dice", "val_dice", "train_loss")
