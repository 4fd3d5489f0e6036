"""The README's and the guides' Python examples run as written and do what they say.

Every ```python block of README.md and docs/*.md runs, in file order, in one fresh Python process (one
fairseq import for all of them) whose working directory is a temporary folder, so files an example
writes (runs/...) land there. Each block gets its own globals, as if it were a script. A block that
cannot run in a test (it needs a GPU, a download, ...) is opted out by the line
``<!-- not-tested: the reason -->`` right before its fence; the reason is required.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)
OPT_OUT = re.compile(r"<!--\s*not-tested:\s*(?P<reason>\S.*?)\s*-->")

RUNNER = r"""
import json, sys, traceback
for block in json.load(sys.stdin):
    print(f"@@block {block['id']}", flush=True)
    try:
        exec(compile(block["code"], block["id"], "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        print(f"@@failed {block['id']}", flush=True)
        sys.exit(1)
print("@@done", flush=True)
"""


def python_blocks(path: Path) -> tuple[list[dict], list[str]]:
    """The blocks of one file to run ({id: "file:line", code}) and the ids of opted-out ones."""
    text = path.read_text(encoding="utf-8")
    run, skipped = [], []
    for m in FENCE.finditer("\n" + text):
        line = text[: max(m.start("code") - 1, 0)].count("\n") + 1
        block_id = f"{path.relative_to(ROOT)}:{line}"
        opt_out = OPT_OUT.search(m.group("before"))
        if opt_out:
            skipped.append(f"{block_id} ({opt_out.group('reason')})")
        else:
            run.append({"id": block_id, "code": m.group("code")})
    return run, skipped


def test_block_parser_finds_blocks_and_opt_outs(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("# t\n\n```python\nprint(1)\n```\n\n<!-- not-tested: needs a GPU -->\n```python\nimport cuda\n```\n"
                   "```bash\necho no\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    run, skipped = python_blocks(doc)
    assert run == [{"id": "x.md:4", "code": "print(1)\n"}]
    assert skipped == ["x.md:9 (needs a GPU)"]


@pytest.mark.slow
def test_every_python_example_runs(tmp_path, warm_launches):  # in one warm process (tests/warm_python.py)
    blocks, skipped = [], []
    for path in DOCS:
        run, skip = python_blocks(path)
        blocks += run
        skipped += skip
    assert any(b["id"].startswith("README.md:") for b in blocks), "README.md has no python example"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    out = proc.stdout
    failed = re.search(r"@@failed (\S+)", out)
    assert proc.returncode == 0 and "@@done" in out, (
        f"example {failed.group(1) if failed else '?'} failed:\n{proc.stderr[-4000:]}")
    per_block = dict(re.findall(r"@@block (\S+)\n(.*?)(?=@@block |@@done)", out, flags=re.S))
    assert set(per_block) == {b["id"] for b in blocks}

    # What the examples print is what their text says.
    readme = next(o for k, o in per_block.items() if k.startswith("README.md:"))
    m = re.search(r"loss ([0-9.]+), \|\|eps\|\| ([0-9.]+)", readme)
    assert m, readme
    assert float(m.group(2)) > 0
    vision = [o for k, o in per_block.items() if k.startswith("docs/vision.md:")]
    assert vision and vision[0].endswith("\nCifarResNet 32\n"), vision  # its model, its 32 test images
    if skipped:
        print("opted out:", *skipped, sep="\n  ")


def test_readme_mentions_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_to_files_in_the_repository_resolve(path):
    # Relative links and images: the guides the README points to, the figures, other guides.
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        if not (path.parent / target).exists() and target not in ("docs/python-api.md", "docs/migrating.md"):
            missing.append(target)  # python-api.md and migrating.md are written separately
    assert not missing, f"{path.name}: broken links {missing}"


def test_quickstart_block_is_the_readmes_cifar10_commands():
    from scripts import quickstart

    cmds = quickstart.block((ROOT / "README.md").read_text())
    assert [c.split()[0] for c in cmds] == [".venv/bin/python", ".venv/bin/asam-vision-train"]
    assert "--run-dir runs/toy-asam" in cmds[1] and "\\" not in cmds[1]  # the continuation line is joined
    with pytest.raises(ValueError, match="no paragraph starting with"):
        quickstart.block("# nothing here\n")


@pytest.mark.slow
def test_cifar10_quick_start_runs_as_printed(tmp_path):
    """The README's CIFAR-10 block, run as printed (scripts/quickstart.py), trains and reports top-1; its
    record renders the README's time line."""
    from scripts import quickstart, readme_numbers

    out = tmp_path / "qs.json"
    assert quickstart.main(["--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [s["command"] for s in rec["steps"]] == quickstart.block((ROOT / "README.md").read_text())
    assert "| best test top-1 " in rec["steps"][-1]["output_tail"][-1]
    # the training's own CPU time is counted (child processes), not only this process's
    assert rec["steps"][-1]["cpu_s"] > 1 and rec["wall_s"] == pytest.approx(sum(s["wall_s"] for s in rec["steps"]), abs=0.2)
    text = readme_numbers.quickstart_time(rec)
    assert f"{rec['wall_s']:.0f} s of wall time" in text and "the last line: `best test top-1 " in text
