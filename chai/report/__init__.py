"""Tables and figures as pure functions of the recorded results (results/**/runs.jsonl and
results/calibration/*.json). pandas + matplotlib only: nothing here imports torch, so reports build anywhere.

`build(results, figures_dir, tables_dir)` writes everything the records allow and says what it skipped and why.
"""

from chai.report.build import build

__all__ = ["build"]
