"""The README's first screen is the project's promise: keep it true."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    blocks, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            blocks.append(line)
    return blocks


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_command = _commands(readme)[1]
    assert "pytest" in test_command
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines() if not l.lstrip().startswith("#")]
    assert test_command in ci_lines


def test_readme_first_command_installs_and_generates():
    first = _commands((REPO / "README.md").read_text())[0]
    assert "pip install" in first and "rwkv-mlx generate" in first
