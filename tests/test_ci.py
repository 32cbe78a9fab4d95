"""README's test command is the one CI runs, verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert len(commands) == 1, commands
    assert "ruff check" in commands[0] and "pytest" in commands[0]
    assert f"```bash\n{commands[0]}\n```" in (REPO / "README.md").read_text()
