"""The library as a user installs it: a wheel, in a fresh virtual environment, used from outside the clone.

The wheel is built from a copy of what it needs (pyproject.toml, setup.py, README.md, fairseq_asam/),
so it cannot lean on the rest of the repository. The fresh venv gets the wheel with ``--no-deps`` and
reaches the already-installed pinned torch (and numpy, fairseq, ...) through a ``.pth`` file naming
this interpreter's site-packages: a plain path line, so the editable install that lives there (its
own ``.pth`` files and finder) is not activated. Everything then runs from a temporary directory with
no PYTHONPATH, so only the installed copy of ``fairseq_asam`` can be imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, pkgutil, sys, json
import torch
import fairseq_asam
from fairseq_asam import ASAM, SAM

pkg_dir = fairseq_asam.__path__[0]
assert pkg_dir.startswith(sys.argv[1]), (pkg_dir, sys.argv[1])

torch.manual_seed(0)
w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
opt = ASAM([("w", w)], torch.optim.SGD([w], lr=0.1), rho=0.5, eta=0.0)
(w ** 2).sum().backward()
opt.ascent_step()
# eps = rho T^2 g / ||T g|| with T = |w|, g = 2w: T g = 2 w|w| = (2, -8), T^2 g = (2, -16)
expected = torch.tensor([1.0, -2.0]) + 0.5 * torch.tensor([2.0, -16.0]) / (68 ** 0.5)
assert torch.allclose(w.detach(), expected, atol=1e-6), (w, expected)
(w ** 2).sum().backward()
opt.descent_step()

# Every installed module imports without the repository (fairseq registers through the package).
names = sorted(m.name for m in pkgutil.walk_packages(fairseq_asam.__path__, "fairseq_asam.")
               if not m.name.endswith(".__main__"))  # __main__ runs a command line
for name in names:
    importlib.import_module(name)
leaked = sorted({m.split(".")[0] for m in sys.modules} & {"tests", "benchmarks", "scripts", "fairseq_helpers"})
assert not leaked, leaked
print(json.dumps({"modules": names}))
"""


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.mark.slow
def test_wheel_installs_and_works_without_the_repository(tmp_path):
    t0 = time.time()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fairseq_asam", src / "fairseq_asam", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("fairseq_asam-*.whl")

    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
    tops = {f.split("/")[0] for f in files}
    assert all(t == "fairseq_asam" or t.endswith(".dist-info") for t in tops), tops  # no tests/, benchmarks/, scripts/
    assert "fairseq_asam/py.typed" in files
    assert "fairseq_asam/config/iwslt14_de_en_asam.yaml" in files
    assert not [f for f in files if "/bench/" in f or "/data/" in f or "demo_corpus" in f], files
    meta = next(f for f in files if f.endswith(".dist-info/METADATA"))
    entry = next(f for f in files if f.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        metadata, entry_points = z.read(meta).decode(), z.read(entry).decode()
    assert "Requires-Dist: torch>=2.6" in metadata
    assert 'Requires-Dist: tensorboard>=2.14; extra == "tracking"' in metadata
    for script in ("asam-iwslt-prepare", "asam-iwslt-train", "asam-iwslt-evaluate", "asam-iwslt-summarize",
                   "asam-vision-train", "asam-sharpness", "asam-mt-prepare", "asam-mt-train", "asam-mt-evaluate",
                   "asam-mt-summarize"):
        assert f"{script} = " in entry_points, entry_points

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = _site_packages(venv)
    (site / "pinned-torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, capture_output=True, text=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(site)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fairseq_asam.iwslt.prepare" in r.stdout and "fairseq_asam.fairseq_ext.task" in r.stdout

    # A console script of the installed package; --user-dir must name the installed copy.
    r = subprocess.run([str(venv / "bin" / "asam-iwslt-train"), "asam", "1", "--dry-run"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"--user-dir {site / 'fairseq_asam'}" in r.stdout, r.stdout
    assert str(ROOT) not in r.stdout
    # The pinned versions this environment was installed with meet every range the wheel declares.
    r = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "scripts" / "check_install.py")], cwd=elsewhere,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "every requirement met" in r.stdout
    print(f"wheel build + fresh venv + checks: {time.time() - t0:.1f}s")


def test_check_install_names_what_is_missing_or_out_of_range(monkeypatch):
    from importlib import metadata

    from scripts import check_install

    declared = ["torch>=2.6", 'wandb>=0.16; extra == "tracking"', 'nosuchpkg>=1; extra == "dev"',
                'other>=1; extra == "not-checked"']
    installed = {"torch": "2.5.1", "wandb": "0.31.0", "other": "0.1"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "requires", lambda dist: declared)
    monkeypatch.setattr(metadata, "version", version)
    assert check_install.unmet() == ["torch>=2.6 (installed: 2.5.1)", 'nosuchpkg>=1; extra == "dev" (not installed)']


def test_check_install_names_a_torch_that_a_later_step_replaced(tmp_path, monkeypatch):
    from importlib import metadata

    from scripts import check_install

    pins = tmp_path / "torch.txt"
    pins.write_text("# step 1\ntorch==2.14.1\ntorchvision==0.29.1  # with it\n")
    installed = {"torch": "2.14.1+cu130", "torchvision": "0.30.0"}
    monkeypatch.setattr(metadata, "version", lambda name: installed[name])
    assert check_install.torch_moved(pins) == [
        "torchvision==0.29.1 (requirements/torch.txt; installed: 0.30.0): a later install step replaced it"]
