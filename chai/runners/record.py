"""The one path every result is recorded through, in every mode: a record starts with the fields every record has
(`chai.records.new_record`) and where it is stored; a result whose settings already have a finished record is
skipped (resume: `chai.records.already_recorded` for a run, `records_by_key` for a bench grid's cells); a failure is
recorded with its error, and the traceback of an unexpected one, and the sweep or the grid goes on."""

import dataclasses
import traceback

from chai.errors import ChaiError
from chai.records import new_record


def start(config: dict, overrides: list[str], mode: str, path) -> dict:
    """A new record of `config` (a run's or a bench cell's settings), stored in the runs.jsonl at `path`."""
    record = new_record(config, overrides, mode)
    record["results_path"] = str(path)
    return record


def failure(err: BaseException) -> dict:
    """A failed result's fields: the error in one line, and the traceback unless it is bad input (ChaiError)."""
    found = {"error": f"{type(err).__name__}: {err}"}
    if not isinstance(err, ChaiError):
        found["traceback"] = "".join(traceback.format_exception(err))
    return found


def method_facts(method) -> dict:
    """What an eval or bench record says about the method that ran (contract hooks only): its own facts, how the
    report shows it (label, family, order, colour) and the counters it kept."""
    facts = method.describe()
    return {"method_info": facts, "display": method.display(method.settings(), facts),
            "run_stats": dataclasses.asdict(method.run_stats())}
