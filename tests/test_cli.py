import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=300)


def test_list_shows_methods_and_protocols():
    out = run_cli("list")
    assert out.returncode == 0
    assert "ce" in out.stdout and "pixel_labels" in out.stdout
    for p in ("synth_1_16", "synth_1_8", "synth_1_4", "synth_full"):
        assert p in out.stdout


@pytest.mark.parametrize("command", [[], ["run"], ["list"], ["leaderboard"], ["compare"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_method_is_one_line_exit_2(tmp_path):
    out = run_cli("run", "--methods", "ce,nosuch", "--protocol", "synth_1_8", "--results-dir", str(tmp_path))
    assert out.returncode == 2
    # the subprocess sees the methods in methods/ (one file each), not ones other tests registered here
    import methods
    shipped = sorted(p.stem for p in Path(methods.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    assert {"ce", "pixcontrast", "prcl", "picie"} <= set(shipped)
    valid = ", ".join(shipped)
    assert out.stderr.strip() == f"bench: error: unknown method 'nosuch'; valid methods: {valid}"
    assert "Traceback" not in out.stderr


def test_unknown_protocol_is_one_line_exit_2(tmp_path):
    out = run_cli("run", "--methods", "ce", "--protocol", "voc_9000", "--results-dir", str(tmp_path))
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and "unknown protocol 'voc_9000'" in line and "synth_1_8" in line


def test_malformed_protocol_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndataset: {name: synth}\nlabeled: {ratio: 2}\ntrain: {crop: 32, iterations: 1}\n")
    out = run_cli("run", "--methods", "ce", "--protocol", str(bad), "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "field labeled.ratio" in out.stderr and "Traceback" not in out.stderr


def test_unwritable_results_dir_fails_before_training(tmp_path, tiny_protocol):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = run_cli("run", "--methods", "ce", "--protocol", str(tiny_protocol), "--results-dir", str(blocker / "results"))
    assert out.returncode == 2
    assert "results dir" in out.stderr and "not writable" in out.stderr
    assert "ce train" not in out.stderr  # no training started


def test_bad_method_override_names_the_field(tmp_path, tiny_protocol, capsys):
    code = main(["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--results-dir", str(tmp_path),
                 "ce.temperature=0.1"])
    assert code == 2
    assert "method ce: config field temperature" in capsys.readouterr().err


def test_override_the_chosen_mode_ignores_is_named(tmp_path, tiny_protocol, capsys):
    code = main(["run", "--methods", "pixcontrast", "--protocol", str(tiny_protocol), "--results-dir", str(tmp_path),
                 "pixcontrast.memory=true", "pixcontrast.temperature=0.2"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        "method pixcontrast: temperature has no effect with memory=True; set memory_temperature")


def test_bad_protocol_override_names_the_field(tmp_path, tiny_protocol, capsys):
    code = main(["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--results-dir", str(tmp_path),
                 "train.iterations=-3"])
    assert code == 2
    assert "field train.iterations" in capsys.readouterr().err


def test_unavailable_cuda_is_a_clear_error(tmp_path, tiny_protocol, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main(["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--results-dir", str(tmp_path),
                 "--device", "cuda"])
    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_every_protocol_of_a_sweep_is_checked_before_training(tmp_path, tiny_protocol, capsys):
    code = main(["run", "--methods", "ce", "--protocol", f"{tiny_protocol},voc_9000", "--results-dir", str(tmp_path)])
    assert code == 2
    assert "unknown protocol 'voc_9000'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("result.json"))


def test_leaderboard_page_is_the_projects_only_for_the_committed_results(tmp_path, monkeypatch):
    from bench.cli import leaderboard_path

    monkeypatch.chdir(tmp_path)
    assert leaderboard_path(Path("results")) == Path("leaderboard.md")
    assert leaderboard_path(tmp_path / "results") == Path("leaderboard.md")  # the same folder, spelt absolute
    assert leaderboard_path(Path("runs")) == Path("runs") / "leaderboard.md"
