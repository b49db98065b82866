"""A record made before a method's code changed its numbers is kept, never overwritten, and marked
stale by `bench run` and on the leaderboard."""
import json

from bench.cli import main
from bench.results import stale_record


def _stale(method: str, revision: int, **method_fields) -> str | None:
    return stale_record(method, {"name": method, **method_fields}, revision)


def test_records_older_than_the_methods_code_revision_are_stale():
    assert "revision 0" in _stale("prcl", 0)  # 0: also records written before revisions existed
    assert _stale("prcl", 1) is None
    assert _stale("ce", 0) is None  # ce never changed
    # pixcontrast changed in memory mode only
    assert _stale("pixcontrast", 0, memory=True) is not None
    assert _stale("pixcontrast", 0, memory=False) is None
    assert _stale("no_such_method", 0) is None  # not judged


def test_run_keeps_a_stale_record_and_the_page_marks_it(tmp_path, tiny_protocol, cache_dir, capsys, monkeypatch):
    from bench.leaderboard import render
    from methods.ce import CE

    results = tmp_path / "results"
    args = ["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--seeds", "0", "--results-dir",
            str(results), "--cache-dir", str(cache_dir), "--no-progress", "train.iterations=2"]
    assert main(args) == 0
    [path] = list(results.rglob("result.json"))
    assert json.loads(path.read_text())["method_revision"] == 0
    assert "**stale**:" not in render(results, tmp_path / "page.md", n_boot=10)
    before = path.read_bytes()
    monkeypatch.setattr(CE, "code_revision", 1)  # ce's code has moved on since the record was made
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[stale]" in out and "delete its folder to re-run it" in out
    assert path.read_bytes() == before  # kept as it was, never overwritten
    assert "**stale**:" in render(results, tmp_path / "page.md", n_boot=10)


def test_page_renders_records_with_and_without_telemetry_side_by_side(tmp_path):
    """A re-run seed (metrics.jsonl, predictions) pooled with an older seed that has neither."""
    import shutil
    from pathlib import Path

    from bench.leaderboard import render

    import json

    root = Path(__file__).resolve().parent.parent / "results" / "synth_1_8"
    for part in ("picie/seed0-1c21fd2149", "picie/seed1-39233d4516", "samples", "splits"):
        shutil.copytree(root / part, tmp_path / "synth_1_8" / part)
    # seed 0 made as before issue 14 and 17: no telemetry files, an older method revision
    old = tmp_path / "synth_1_8" / "picie" / "seed0-1c21fd2149"
    record = json.loads((old / "result.json").read_text())
    for key in ("metrics_file", "predictions_file", "samples_file"):
        record.pop(key, None)
    record["method_revision"] = 0
    (old / "result.json").write_text(json.dumps(record))
    (old / "metrics.jsonl").unlink()
    (old / "predictions.npz").unlink()
    page = render(tmp_path, tmp_path / "page.md", n_boot=10)
    assert "| picie |" in page and "**stale**:" in page
