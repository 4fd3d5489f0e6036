"""The measured tables of README.md and docs/efficiency.md are exactly what their committed JSON gives.

``scripts/readme_numbers.py`` renders them from ``docs/bench.json`` (``make bench``) and
``docs/efficiency-results.json``; a number edited by hand, or a JSON rerun without ``--write``, fails here.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import readme_numbers as R  # noqa: E402


@pytest.mark.parametrize("name,path", [(n, p) for n, (_, paths) in R.TABLES.items() for p in paths],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_committed_table_is_the_rendering_of_the_json(name, path):
    shown = R.between(path.read_text(), name)
    assert shown is not None, f"{path.name} has no {name} table markers"
    assert shown == R.render()[name], f"{path.name}: run python scripts/readme_numbers.py --write"


def test_bench_json_says_where_its_numbers_come_from():
    bench = json.loads(R.BENCH.read_text())
    assert bench["command"].startswith("python scripts/benchmark.py")
    assert len(str(bench["commit"]).split("+")[0]) == 40 and bench["date"][:2] == "20"
    assert {"cpu", "cpu_count", "torch"} <= set(bench["machine"])
    assert {"kernel", "fairseq", "efficient", "hf", "lightning"} <= set(bench["sections"])


def test_tables_follow_the_json(tmp_path):
    # A changed number in the JSON changes the rendered table (the test above cannot pass on stale text).
    bench = json.loads(R.BENCH.read_text())
    before = R.render(bench=bench)["cost"]
    bench["sections"]["lightning"]["cpu_ratio_to_adam"]["asam"] = 9.87
    after = R.render(bench=bench)["cost"]
    assert "9.87x" in after and "9.87x" not in before


def test_write_refuses_a_file_without_markers(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# no markers here\n")
    monkeypatch.setitem(R.TABLES, "cost", (R.TABLES["cost"][0], [page]))
    with pytest.raises(SystemExit, match="no 'cost' markers"):
        R.write({"cost": "x", "cheaper-updates": R.render()["cheaper-updates"]})
    assert page.read_text() == "# no markers here\n"
