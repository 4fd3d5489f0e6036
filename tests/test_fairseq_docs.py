"""docs/fairseq.md's offline "Try it" runs as written, and the model it trains has learned the tiny corpus.

The indented commands after "## Try it" run in one bash process (``set -euo pipefail``) in a temporary
folder, with ``.venv/bin/`` replaced by a folder of warm launchers (tests/warm_python.py) of this
interpreter's ``python`` and fairseq commands and ``fairseq_asam`` linked in, so the relative paths of the
guide resolve as they do from the repository root. What fairseq-generate and
fairseq-interactive print must show a trained model: the guide's 300 updates gave test BLEU 75.72, 94 of
the 112 reference words in place, 6 of the 16 sentences exact, 3 to 9 words per hypothesis, and "t1 t2
t3" for "s1 s2 s3" (CPU, one thread), where the guide's earlier 50 updates gave one or two tokens per
sentence. About 40 seconds on two idle cores::

    .venv/bin/pytest tests/test_fairseq_docs.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_BIN = Path(sys.executable).parent  # the virtual environment's (read before warm_launches replaces it)
pytestmark = pytest.mark.slow


def try_it_commands(text: str) -> list[str]:
    """The shell commands of the first indented block after "## Try it", continuation lines joined."""
    section = text.split("\n## Try it\n", 1)[1]
    lines, started = [], False
    for line in section.splitlines():
        if line.startswith("    "):
            started = True
            lines.append(line[4:])
        elif started:
            break
    return [c.strip() for c in re.sub(r"\\\n\s*", "", "\n".join(lines)).splitlines() if c.strip()]


def test_try_it_commands_are_found():
    cmds = try_it_commands((ROOT / "docs" / "fairseq.md").read_text(encoding="utf-8"))
    assert [c.split()[0] for c in cmds] == [".venv/bin/python", ".venv/bin/fairseq-train", ".venv/bin/fairseq-generate",
                                            "echo"]
    assert "--max-update 300" in cmds[1] and "\\" not in "".join(cmds)


def warm_bin(folder: Path, launcher: str) -> str:
    """A folder with ``python`` and the fairseq commands, each the real one run by the warm launcher."""
    folder.mkdir()
    for tool in ("python", "fairseq-preprocess", "fairseq-train", "fairseq-generate", "fairseq-interactive"):
        run = "" if tool == "python" else f' "{REAL_BIN / tool}"'
        (folder / tool).write_text(f'#!/bin/sh\nexec "{launcher}"{run} "$@"\n')
        (folder / tool).chmod(0o755)
    return str(folder) + "/"


def test_try_it_runs_and_the_model_learned(tmp_path, warm_launches):
    cmds = try_it_commands((ROOT / "docs" / "fairseq.md").read_text(encoding="utf-8"))
    bin_dir = warm_bin(tmp_path / ".warm-bin", warm_launches)
    # Each command's stdout after a marker line, so generate's and interactive's H-0 lines stay apart.
    script = "set -euo pipefail\n" + "".join(f"echo @@{i}\n{c.replace('.venv/bin/', bin_dir)}\n"
                                             for i, c in enumerate(cmds))
    (tmp_path / "fairseq_asam").symlink_to(ROOT / "fairseq_asam")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = re.split(r"^@@\d+\n", proc.stdout, flags=re.M)[1:]
    generate, interactive = outs[2], outs[3]

    refs = dict(re.findall(r"^T-(\d+)\t(.*)$", generate, flags=re.M))
    hyps = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", generate, flags=re.M))
    assert len(refs) == 16 and set(hyps) == set(refs), generate[-3000:]
    bleu = float(re.search(r"Generate test with beam=2: BLEU4 = ([0-9.]+),", generate).group(1))
    # Position by position, the words the hypotheses get right (the corpus maps word i to word i).
    right = sum(a == b for i in refs for a, b in zip(hyps[i].split(), refs[i].split()))
    total = sum(len(r.split()) for r in refs.values())
    assert bleu > 40, (bleu, generate[-3000:])  # 75.72 measured
    assert right > 0.5 * total, (right, total)  # 94 of 112 measured
    assert all(len(h.split()) >= 2 for h in hyps.values()), hyps  # not the one-token output of 50 updates
    inter = re.findall(r"^H-0\t\S+\t(.*)$", interactive, flags=re.M)
    assert len(inter) == 1 and sum(a == b for a, b in zip(inter[0].split(), ["t1", "t2", "t3"])) >= 2, interactive
