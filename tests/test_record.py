"""The typed run record: every committed record reads through it unchanged; a malformed record is
one error naming its file and field, and the leaderboard leaves it out with that message."""
import json
from pathlib import Path

import pytest

from bench import BenchError
from bench.leaderboard import render
from bench.record import SCHEMA_VERSION, RunRecord, read_record, upgraded
from tests.test_leaderboard import make_record

COMMITTED = sorted((Path(__file__).resolve().parent.parent / "results").rglob("result.json"))


def test_every_committed_record_reads_through_the_model_unchanged():
    """Read, a committed record holds exactly what its file holds; one of version 1 (no version
    field, or 1) in version 2's names (``labeled``), nothing else changed."""
    assert COMMITTED, "no committed records"
    for path in COMMITTED:
        original = json.loads(path.read_text())
        record = read_record(path)
        assert record.schema_version == SCHEMA_VERSION == 2
        if original.get("schema_version", 1) == 2:
            assert record.to_json() == original, path
            continue
        expected = json.loads(json.dumps({**original, "schema_version": 2})
                              .replace('"labelled_sha256"', '"labeled_sha256"').replace('"n_labelled"', '"n_labeled"')
                              .replace('"labelled_pixels"', '"labeled_pixels"').replace('"labelled":', '"labeled":')
                              .replace('"labelled.', '"labeled.'))
        assert record.to_json() == expected, path
        assert record.split.n_labeled == original["split"]["n_labelled"]
        assert record.metrics.miou == original["metrics"]["miou"]


def test_a_version_1_record_is_upgraded_without_touching_the_file_or_other_values():
    # a committed record written before schema_version (re-runs replace some with version 2)
    original = next(r for r in map(lambda p: json.loads(p.read_text()), COMMITTED) if "schema_version" not in r)
    snapshot = json.dumps(original)
    new = upgraded(original)
    assert json.dumps(original) == snapshot  # a copy: the JSON read is not changed in place
    assert new["config"]["protocol"]["labeled"] == original["config"]["protocol"]["labelled"]
    assert "labelled" not in new["config"]["protocol"] and new["schema_version"] == 2
    assert upgraded(new) is new  # the current version is returned as it is


def test_a_written_record_carries_the_schema_version(tmp_path):
    from bench.record import write_record

    record = read_record(COMMITTED[0])
    write_record(tmp_path / "result.json", RunRecord.model_validate({**record.to_json()}))
    assert json.loads((tmp_path / "result.json").read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("change, message", [
    (lambda r: r["metrics"].update(miou="high"), r"field metrics\.miou: Input should be a valid number"),
    (lambda r: r["split"].pop("n_train"), r"lacks field\(s\) split\.n_train$"),
    (lambda r: r.update(seed=[0]), r"field seed: Input should be a valid integer"),
    (lambda r: r.update(mIoU=50.0), r"mIoU is not a field of a run record"),
    (lambda r: r.update(schema_version=SCHEMA_VERSION + 1),
     rf"field schema_version: schema version {SCHEMA_VERSION + 1} is not one this bench reads"),
])
def test_a_malformed_record_is_one_error_naming_its_file_and_field(tmp_path, change, message):
    path = tmp_path / "result.json"
    record = json.loads(COMMITTED[0].read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(BenchError, match=message) as err:
        read_record(path)
    assert str(err.value).startswith(f"result record {path}") and "\n" not in str(err.value)


def test_the_leaderboard_leaves_a_malformed_record_out_and_says_so(tmp_path):
    results = tmp_path / "results"
    make_record(results, seed=0, miou=50.0)
    bad = make_record(results, seed=1, miou=54.0)
    record = json.loads(bad.read_text())
    record["metrics"]["miou"] = "54 %"
    bad.write_text(json.dumps(record))
    skipped = []
    page = render(results, tmp_path / "page.md", n_boot=10, on_bad_record=lambda p, m: skipped.append((p, m)))
    [(path, message)] = skipped
    assert path == bad and message.startswith(f"result record {bad}: field metrics.miou")
    assert "| ce | pixel labels | 50.00 | 80.00 | 1 |" in page  # the other seed alone
    assert "## Records left out" in page and "`results/synth_1_8/ce/seed1-ref/result.json`: field metrics.miou" in page
