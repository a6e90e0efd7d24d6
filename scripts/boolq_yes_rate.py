"""How often each BoolQ run answers "yes", from the records' per-item outcomes and the labels in the data folder.

SmolLM2-135M scores BoolQ below its majority class (62.2% of the 3270 validation answers are yes): a change in
accuracy there mostly says the run answers yes more or less often, not that it reads the passage better. A right
answer is the label, a wrong one its opposite, so the yes-rate follows from `items` alone (no re-run).
    python scripts/boolq_yes_rate.py [results/frontier/runs.jsonl]
"""

import json
import sys
from pathlib import Path

from chai.paths import data_file
from chai.records import read_jsonl
from chai.report.stats import outcomes


def yes_rate(record: dict, labels: list[bool]) -> float | None:
    found = outcomes(record.get("items"), "acc")
    if found is None:
        return None
    ids, right = found
    said_yes = [bool(labels[i]) == bool(r) for i, r in zip(ids, right)]
    return sum(said_yes) / len(said_yes)


def main(path: Path) -> None:
    labels = [bool(json.loads(line)["label"]) for line in data_file("boolq/val.jsonl").read_text().splitlines()]
    print(f"majority (yes) {100 * sum(labels) / len(labels):.1f}% of {len(labels)}")
    for record in read_jsonl(path):
        if record.get("task") != "boolq" or record.get("error"):
            continue
        rate = yes_rate(record, labels)
        layout = "9 KV heads" if record["config"]["model"].get("expand_kv_heads") else "as shipped"
        label = (record.get("display") or {}).get("label", record.get("method"))
        said = "no items" if rate is None else f"says yes {100 * rate:5.1f}%"
        print(f"{label:55s} {layout:10s} acc {100 * record['metrics']['acc']:5.1f}  {said}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/frontier/runs.jsonl"))
