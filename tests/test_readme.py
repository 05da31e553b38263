"""The README's commands and example must keep telling the truth."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_install_run_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    assert first_block[0].startswith("pip install") and "arbor " in first_block[0]
    assert first_block[1].startswith("pip install") and "pytest" in first_block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    # CI runs both, in the README's order, so the suite passes after the default run left its files.
    assert first_block[0] in ci and first_block[1] in ci
    assert ci.index(first_block[0]) < ci.index(first_block[1])


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    example = re.search(r"## In Python\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "tiny-model" / "model.safetensors").is_file()
