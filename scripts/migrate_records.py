"""Give every record of results/**/runs.jsonl the `display` the runners now write: how the report shows its method,
`Method.display(settings)` = {"label", "family", "order", "color"} of the method class in chai/methods/.

    python scripts/migrate_records.py              # add `display` where a record lacks it
    python scripts/migrate_records.py --refresh    # also rewrite a stored `display` that the classes now give otherwise
    python scripts/migrate_records.py --check      # change nothing; exit 1 if a record would change

Only that field is touched: a record without it gets `, "display": {...}` appended before its closing brace, every
other byte of the line as it was; a torn line (a killed writer's) is kept as it is. Idempotent: a second run changes
nothing. Each file is written beside itself and renamed over it, and only if nobody appended to it meanwhile (run
it when no sweep is writing; a file that changed is left alone and reported).
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file from anywhere, installed or not

from chai.methods import _discover  # noqa: E402  (imports torch: the method classes say how they show)
from chai.methods import display_of as method_display  # noqa: E402


def display_of(record: dict) -> dict | None:
    """The method's display for the record's settings; None when its method is not a registered one."""
    method = {"name": record.get("method"), **((record.get("config") or {}).get("method") or {})}
    return method_display(method, record.get("method_info"))


def migrate_line(line: str, refresh: bool) -> tuple[str, str]:
    """(the line as it should be, what happened: added | refreshed | kept | torn | unknown)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line, "torn"
    if not isinstance(record, dict) or not record:
        return line, "torn"
    display = display_of(record)
    if display is None:
        return line, "unknown"
    if "display" not in record:
        body = line.rstrip()  # "{...}": the field goes in before the closing brace
        return f"{body[:-1]}, \"display\": {json.dumps(display)}}}{line[len(body):]}", "added"
    if not refresh or record["display"] == display:
        return line, "kept"
    if json.dumps(record, default=str) != line:  # not as append_jsonl wrote it: re-encoding would touch other bytes
        return line, "kept (not refreshed: not in json.dumps form)"
    return json.dumps({**record, "display": display}, default=str), "refreshed"


def migrate_file(path: Path, refresh: bool, check: bool) -> dict:
    before = path.stat()
    text = path.read_text()
    counts, lines = {}, []
    for line in text.splitlines():
        new, what = migrate_line(line, refresh) if line.strip() else (line, "blank")
        counts[what] = counts.get(what, 0) + 1
        lines.append(new)
    changed = counts.get("added", 0) + counts.get("refreshed", 0)
    if changed and not check:
        part = path.with_name(f".{path.name}.migrate")
        with part.open("w") as f:
            f.write("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(part, before.st_mode & 0o777)
        now = path.stat()
        if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            part.unlink()
            counts = {"left alone: written to while migrating (run again)": 1}
        else:
            os.replace(part, path)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="records folder (default results/)")
    parser.add_argument("--refresh", action="store_true", help="rewrite a stored display that differs")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything would change")
    args = parser.parse_args(argv)
    _discover()
    pending = 0
    for path in sorted(args.results.glob("**/runs.jsonl")):
        counts = migrate_file(path, args.refresh, args.check)
        pending += counts.get("added", 0) + counts.get("refreshed", 0)
        shown = ", ".join(f"{what} {n}" for what, n in sorted(counts.items()))
        print(f"{path.relative_to(args.results)}: {shown}")
    if args.check and pending:
        print(f"{pending} records would change", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
