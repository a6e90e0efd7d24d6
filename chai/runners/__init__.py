"""The mode runners: one module per mode, each `run(cfg, record) -> dict` (what it adds to its run's record), all
starting from one `setup` (model, tokenizer, method prepared: chai/runners/setup.py) and recording their results
through one path (chai/runners/record.py). chai.cli dispatches through `RUNNERS`; these modules import torch and
lm-eval, so chai.cli imports this package only once the input is known good."""

from chai.runners import bench, calibrate, capacity, eval, membership

RUNNERS = {"eval": eval.run, "calibrate": calibrate.run, "bench": bench.run, "membership": membership.run,
           "capacity": capacity.run}
# A run of these modes is one result, skipped as a whole when its settings are already recorded (resume). A bench run
# is a grid of cells, each a result of its own, resumed one by one, keyed by what the run's config cannot say (the
# device, the static step as resolved, kernel launch settings); the bench run's record only summarises its cells.
RESUMED_AS_A_WHOLE = ("eval", "calibrate", "membership")
