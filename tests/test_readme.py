"""The README's Python examples run as written and do what they say."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    outputs = []
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, f"README block failed:\n{code}\n{out.stderr}"
        outputs.append(out.stdout)
    m = re.search(r"loss ([0-9.]+), \|\|eps\|\| ([0-9.]+)", "".join(outputs))
    assert m, outputs
    assert float(m.group(2)) > 0


def test_readme_mentions_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (ROOT / "README.md").read_text()
