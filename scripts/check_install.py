"""After `make install`: every requirement of fairseq-asam and its extras is met, no torchaudio, and torch and
torchvision are still the versions requirements/torch.txt pins (no later step brought another).

The project is installed with ``--no-deps`` (pip would otherwise resolve fairseq-fixed's declared
torchaudio and pull a second torch), so nothing else checks that the pinned requirements/*.txt
satisfy the ranges declared in pyproject.toml. This does::

    .venv/bin/python scripts/check_install.py
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

TORCH_PINS = Path(__file__).resolve().parents[1] / "requirements" / "torch.txt"
EXTRAS = ("fairseq", "iwslt", "vision", "plots", "studies", "tracking", "hf", "lightning", "dev")


def unmet(dist: str = "fairseq-asam", extras=EXTRAS) -> list[str]:
    """The requirements of ``dist`` (core plus ``extras``) that are missing or at a version out of range."""
    problems = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (installed: {version})")
    return problems


def torch_moved(pins: Path = TORCH_PINS) -> list[str]:
    """The pins of requirements/torch.txt that the environment no longer meets (a step pulled another torch)."""
    problems = []
    lines = pins.read_text().splitlines() if pins.is_file() else []
    for line in (ln.split("#", 1)[0].strip() for ln in lines):
        if not line:
            continue
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (requirements/torch.txt; not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (requirements/torch.txt; installed: {version}): a later install step replaced it")
    return problems


def main() -> int:
    problems = unmet() + torch_moved()
    try:
        metadata.version("torchaudio")
        problems.append("torchaudio is installed; it must not be (it forces another torch)")
    except metadata.PackageNotFoundError:
        pass
    for p in problems:
        print(f"check_install: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_install: fairseq-asam and its extras ({', '.join(EXTRAS)}): every requirement met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
