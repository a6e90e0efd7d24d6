"""Every table and figure from the recorded results: `python scripts/figures.py` (or `make figures`).

Reads results/**/runs.jsonl and results/calibration/*.json; writes PNG + PDF into results/figures/, Markdown +
LaTeX (and accuracy_cells.csv) into results/tables/ and results/bench/bench_table.md. Accuracy differences carry
their paired bootstrap 95% interval where both records hold per-item outcomes (`items`); the `frontier` experiment
(chai/report/report.yaml) gives accuracy against K,V bytes stored and read (frontier_<model>[_expanded]) and the
matched-savings table (frontier_savings_<model>[_expanded].md). Whatever the records are, it builds what they
support and says in one line each what it skipped and why.

Which records: the curated experiments only, i.e. every results/<experiment>/runs.jsonl except results/adhoc/,
where a plain `python run.py ...` writes (experiment_name defaults to `adhoc`; the folder is gitignored). So a
scratch run such as `python run.py method=chai task.limit=50` never rewrites a committed table or figure.
`--include-adhoc` builds from the curated and the ad-hoc records together into results/adhoc/figures and
results/adhoc/tables (the bench table too) instead. A run meant for the committed report names its experiment
(`experiment=...` or `experiment_name=...`).

Safe to stop or to fail: everything is drawn into a temporary folder and moved into place only at the end, one file
at a time by rename, so the output folders are never half-written. A table or figure whose code raises is listed
as FAILED with its error (the rest is still built) and the exit status is 1.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file from anywhere, installed or not

from chai.report import build  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="records folder (default results/)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="default <results>/figures (<results>/adhoc/figures with --include-adhoc)")
    parser.add_argument("--tables", type=Path, default=None,
                        help="default <results>/tables (<results>/adhoc/tables with --include-adhoc)")
    parser.add_argument("--metric", default="acc", choices=("acc", "acc_norm"), help="accuracy metric of the tables")
    parser.add_argument("--include-adhoc", action="store_true",
                        help="also read results/adhoc/ (scratch runs) and write into results/adhoc/ instead")
    args = parser.parse_args(argv)
    report = build(args.results, args.figures, args.tables, args.metric, include_adhoc=args.include_adhoc)
    print(f"{report['records']} records in {args.results}")
    for path in report["written"]:
        print(f"wrote {path}")
    for reason in report["skipped"]:
        print(f"skip  {reason}")
    for error in report["failed"]:
        print(f"FAILED {error}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
