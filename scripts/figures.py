"""Every table and figure from the recorded results: `python scripts/figures.py` (or `make figures`).

Reads results/**/runs.jsonl and results/calibration/*.json; writes PNG + PDF into results/figures/ and Markdown +
LaTeX into results/tables/. Anything the records do not cover yet is skipped with a one-line reason.
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
    parser.add_argument("--figures", type=Path, default=None, help="default <results>/figures")
    parser.add_argument("--tables", type=Path, default=None, help="default <results>/tables")
    parser.add_argument("--metric", default="acc", choices=("acc", "acc_norm"), help="accuracy metric of the tables")
    args = parser.parse_args(argv)
    report = build(args.results, args.figures, args.tables, args.metric)
    print(f"{report['records']} records in {args.results}")
    for path in report["written"]:
        print(f"wrote {path}")
    for reason in report["skipped"]:
        print(f"skip  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
