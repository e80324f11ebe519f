"""The README's two set-up commands are the ones the project really runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.+?)\n\s*```", setup)]


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_main_job_command_runs_the_pipeline_flow():
    assert readme_commands()[0].endswith("python -m flows.pipeline")
    assert (ROOT / "flows" / "pipeline.py").exists()


def test_readme_python_example_predicts_rock_salt_with_the_shipped_model():
    text = (ROOT / "README.md").read_text().split("## Trained models", 1)[1]
    example = re.search(r"```python\n(.+?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # our own text, not user input
    energy = namespace["energy"]
    assert energy.shape == (1, 1)
    assert abs(energy[0, 0] - (-2.105)) < 0.15  # NaCl, mp-22862 in mp2018: -2.105 eV/atom
