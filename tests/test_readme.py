"""The README's two commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert "python -m bench run --methods" in main_job and 'pip install -e ".[dev]"' in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = next(line.strip() for line in ci.splitlines() if "python -m pytest" in line)
    assert tests.endswith(ci_command)
    assert "python3 -m venv .venv" in tests and "python3 -m venv .venv" in ci


def test_what_is_here_names_every_harness_file_and_method():
    """The README's layout table lists each file of bench/ (a package by its folder) and each method."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What is here"):text.index("## Using it")]
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.stem not in ("__init__", "__main__"):
            assert f"`{path.name}`" in section, path.name
    for folder in ("data", "leaderboard"):
        assert f"`{folder}/`" in section
    for path in sorted((ROOT / "methods").glob("*.py")):
        if path.stem != "__init__":
            assert f"`{path.stem}`" in section, path.name
