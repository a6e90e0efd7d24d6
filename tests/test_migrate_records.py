"""scripts/migrate_records.py gives records the `display` the runners now write, touching nothing else, and the
committed records have it."""

import importlib.util
import json

import pytest

from chai.paths import ROOT


@pytest.fixture(scope="module")
def migrate():
    spec = importlib.util.spec_from_file_location("migrate_records", ROOT / "scripts" / "migrate_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_record(method: dict, **fields) -> str:
    return json.dumps({"run_id": "r1", "method": method["name"], "config": {"method": method}, "x": 0.1 + 0.2,
                       "name": "Zoë", **fields})


def test_display_is_added_every_other_byte_kept_and_a_second_run_changes_nothing(tmp_path, migrate):
    lines = [old_record({"name": "dejavu_static", "sparsity": 0.3, "dense_layers": 0, "head_scores": None}),
             '{"torn": ',  # a killed writer's half line
             old_record({"name": "sparq", "compression": 2}, display={"label": "kept as it is"}),
             old_record({"name": "renamed_since"})]
    path = tmp_path / "accuracy" / "runs.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    assert migrate.main(["--results", str(tmp_path), "--check"]) == 1 and path.read_text().splitlines() == lines

    assert migrate.main(["--results", str(tmp_path)]) == 0
    after = path.read_text().splitlines()
    display = json.loads(after[0])["display"]
    # no method_info to count the heads it pruned: the label states the requested share
    assert display == {"label": "DejaVu-static 30% (requested)", "family": "DejaVu-static", "order": 20,
                       "color": "tab:green"}
    assert after[0] == lines[0][:-1] + f', "display": {json.dumps(display)}}}'  # appended, the rest byte for byte
    assert after[1:] == lines[1:]  # torn, already displayed, unknown method: as they were

    assert migrate.main(["--results", str(tmp_path), "--check"]) == 0
    assert migrate.main(["--results", str(tmp_path)]) == 0 and path.read_text().splitlines() == after


def test_refresh_rewrites_a_stale_display(tmp_path, migrate):
    method = {"name": "sparq", "compression": 2}
    line = json.dumps({"method": "sparq", "config": {"method": method}, "display": {"label": "old"}})
    assert migrate.migrate_line(line, refresh=False) == (line, "kept")
    new, what = migrate.migrate_line(line, refresh=True)
    # a SparQ record from before `scope` ran every row sparse, the current position not forced: the row-wise variant
    assert what == "refreshed" and json.loads(new)["display"]["label"] == "SparQ row-wise 2x (current not forced)"


def test_refresh_states_the_share_of_heads_a_record_really_pruned(migrate):
    method = {"name": "dejavu_static", "sparsity": 0.3, "dense_layers": 0, "head_scores": None}
    facts = {"pruned_layers": [0, 1], "kept_heads": {"0": [0, 1, 2, 3, 4, 5], "1": [0, 1, 2, 3, 4, 5]},
             "attention_compute_fraction": 6 / 9}
    line = json.dumps({"method": "dejavu_static", "config": {"method": method}, "method_info": facts,
                       "display": {"label": "DejaVu-static 30%"}})
    new, what = migrate.migrate_line(line, refresh=True)
    assert what == "refreshed" and json.loads(new)["display"]["label"] == "DejaVu-static 33% (3/9 heads)"


def test_the_committed_records_carry_their_display(migrate, capsys):
    assert migrate.main(["--check"]) == 0, capsys.readouterr().out
