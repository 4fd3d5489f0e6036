"""The measured tables of README.md and the guides are exactly what their committed JSON gives.

``scripts/readme_numbers.py`` renders them from the JSON files under docs/ (``make bench``, the studies,
the toy example, the Figure 4 laptop study); a number edited by hand, or a JSON rerun without ``--write``,
fails here.
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


def _load(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("path,script", [
    (R.TOY, "scripts/toy_example.py"), (R.FIGURE4, "scripts/figure4.py"), (R.CORRELATION, "scripts/correlation_study.py"),
    (R.DEMO, "scripts/demo.sh"), (R.QUICKSTART, "scripts/quickstart.py"), (R.STUDY, "scripts/efficiency_study.py"),
    (R.ROOT / "docs" / "efficiency-mt.json", "studies.mt_convergence"),
    (R.ROOT / "docs" / "efficiency-mt-dropout0.json", "studies.mt_convergence")], ids=lambda v: str(v)[-24:])
def test_study_json_says_where_its_numbers_come_from(path, script):
    doc = _load(path)
    assert script in doc["command"]
    assert len(str(doc["commit"]).split("+")[0]) == 40 and str(doc["date"])[:2] == "20" and doc["machine"]


def test_figure4_json_records_the_machine_and_every_run():
    doc = _load(R.FIGURE4)
    assert {"cpu", "cpu_count", "torch", "torch_threads"} <= set(doc["machine"])
    c = doc["config"]
    assert len(doc["runs"]) == len(c["factors"]) * len(c["rhos"]) * len(c["seeds"])
    assert doc["cpu_seconds"] == pytest.approx(sum(r["cpu_s"] for r in doc["runs"]), abs=0.1)


def test_reproduced_rows_follow_the_json():
    # Each verdict of the README's "What has been reproduced" is computed, not written: change the JSON and
    # the row changes with it.
    toy, fig4, corr, m30k, study = (_load(p) for p in (R.TOY, R.FIGURE4, R.CORRELATION, R.MULTI30K, R.STUDY))
    before = R.render()["reproduced"]
    assert "reproduced: from (0.3, 0.033) SAM does not move, ASAM reaches L = " in before

    toy["runs"][2]["final_w"] = [0.31, 0.1]
    assert "not reproduced: from (0.3, 0.033) SAM moves to (0.310, 0.100)" in R.render(toy=toy)["reproduced"]

    for r in fig4["runs"]:
        if r["factor"] == "elem-p2":
            r["best_test_acc"] = 99.5
    assert "reproduced: p = inf breaks at rho >= " in R.render(figure4=fig4)["reproduced"]
    assert "p = 2's best accuracy (99.5%) is above p = inf's" in R.render(figure4=fig4)["reproduced"]

    corr["stats"]["asharp_pinf"]["Psi"] = -1.0
    assert "not reproduced: adaptive sharpness" in R.render(correlation=corr)["reproduced"]

    study["summary"]["mnist-mlp 40% noise"]["power"]["gain"] = 4.56
    assert "ASAM gains 4.6 points over SGD" in R.render(study=study)["reproduced"]

    m30k["status"], m30k["plan"] = {**m30k["status"], "finished_runs": 7, "complete": False}, {}  # no widened grid
    assert "Multi30k study running: 7 of 18 runs finished" in R.render(multi30k=m30k)["reproduced"]
    m30k["status"] = {**m30k["status"], "complete": True}
    assert "Multi30k study complete (7 runs)" in R.render(multi30k=m30k)["reproduced"]


def test_multi30k_planned_runs_count_the_plan():
    # 3 seeds of Adam; per method a 3-point grid on seed 1 and the chosen rho on seeds 2 and 3: 3 + 3 * 5.
    m30k = _load(R.MULTI30K)
    m30k["settings"] = {**m30k["settings"], "seeds": [1, 2, 3], "grid_seeds": [1],
                        "grids": {"asam": [0.1, 0.2, 0.5], "onepass": [0.1, 0.2, 0.5], "sam": [0.05, 0.1, 0.2]}}
    m30k["status"] = {"finished_runs": 3, "complete": False}
    m30k["plan"] = {"asam": {"widened": []}}
    assert R.multi30k_status(m30k) == "Multi30k study running: 3 of 18 runs finished"
    m30k["plan"] = {"asam": {"widened": [1.0]}}  # a widened grid: one more grid run per grid seed
    assert R.multi30k_status(m30k) == "Multi30k study running: 3 of 19 runs finished"
    # complete: a run started early (--jobs) beyond the grid seeds at a rho that was then not chosen is named
    m30k["status"], m30k["plan"] = {"finished_runs": 4, "complete": True}, {"asam": {"chosen": 0.2, "widened": []}}
    m30k["runs"] = [{"key": "adam-seed2", "method": "adam", "seed": 2, "rho": None},
                    {"key": "asam-seed1-rho0.1", "method": "asam", "seed": 1, "rho": 0.1},
                    {"key": "asam-seed2-rho0.2", "method": "asam", "seed": 2, "rho": 0.2},
                    {"key": "asam-seed2-rho0.1", "method": "asam", "seed": 2, "rho": 0.1}]
    assert R.multi30k_status(m30k) == ("Multi30k study complete (4 runs; asam-seed2-rho0.1 started early at a rho "
                                       "that was then not chosen, in no comparison)")


def test_toy_output_is_the_scripts_lines():
    toy = _load(R.TOY)
    toy["runs"][0]["final_loss"] = 1.23e-4
    assert "    SAM  rho=0.05  w0=(0.200, 0.050) -> w=(" in R.render(toy=toy)["toy-output"]
    assert "L=1.23e-04" in R.render(toy=toy)["toy-output"]
    assert "L=1.23e-04" not in R.render()["toy-output"]


def test_render_refuses_an_unknown_document():
    with pytest.raises(TypeError, match="unknown documents"):
        R.render(benchh={})


def test_figure4_findings_follow_the_json():
    fig4 = _load(R.FIGURE4)
    top = max(fig4["config"]["rhos"])
    for r in fig4["runs"]:
        r["best_test_acc"] = {"elem-p2": 99.5, "filter-p2": 99.0 + (r["seed"] == 0),
                              "elem-p2-bn": 99.5 - 5 * (r["rho"] == top)}.get(r["factor"], r["best_test_acc"])
    text = R.render(figure4=fig4)["figure4-findings"]
    assert "As in the paper, p = 2 gives the better accuracy: p = 2's best is 99.50 ± 0.00 (rho = " in text
    assert "- Element-wise and filter-wise do not differ over the whole grid, as in the paper." in text
    assert f"- Bias normalization differs at rho = {top:g} (94.5 against 99.5 without)." in text
    assert "reproduced: p = inf breaks at rho >= " in R.render(figure4=fig4)["reproduced"]
    for r in fig4["runs"]:
        if r["factor"] == "elem-pinf":
            r["best_test_acc"] = 99.0 + r["seed"]  # 99.5 ± 0.71: the same as p = 2's best, and never broken
    text = R.render(figure4=fig4)["figure4-findings"]
    assert f"- p = inf does not break down within the grid (rho up to {top:g})." in text
    assert "does not show at this scale: p = 2's best is 99.50 ± 0.00" in text and "within the seeds' spread" in text
    assert "partly: p = inf does not break, but its best accuracy (99.5%) is within the seeds' spread of p = 2's" in \
        R.render(figure4=fig4)["reproduced"]


def test_multi30k_result_sets_the_paired_gain_beside_the_papers_and_the_seeds_it_would_take():
    m30k = _load(R.MULTI30K)
    m30k["summary"] = {**m30k["summary"], "power": {"gain": 0.3, "paired_std": 0.4, "se": 0.2, "ratio": 1.5,
                                                     "seeds": [1, 2, 3, 4], "powered": False}}
    m30k["status"] = {**m30k["status"], "complete": True}
    # the paper: 35.02 - 34.86 = +0.16 = 0.8 SE of 0.2; (3 * 0.4 / 0.16)^2 = 56.25 -> 57 seeds
    want = ("ASAM - Adam on Multi30k: +0.30 ± 0.20 SE test sacreBLEU over 4 paired seeds (+1.5 SE, not powered); "
            "the paper's IWSLT'14 gain, +0.16, would be 0.8 SE here: resolving it at 3 SE takes about 57 paired seeds")
    assert R.multi30k_result(m30k) == want
    assert want in R.render(multi30k=m30k)["reproduced"] and want + "." in R.render(multi30k=m30k)["multi30k"]
    # the page leads with the table and what it means; every run's row follows
    page = R.render(multi30k=m30k)["multi30k"]
    assert page.index(m30k["markdown"]) < page.index(want) < page.index(m30k["status_markdown"])
    # the README shows the Table 5 layout (the study's first table) and the same sentence, not the run list
    readme = R.render(multi30k=m30k)["multi30k-summary"]
    assert "| BLEU (test_2016_flickr) | Adam |" in readme and want + "." in readme
    assert m30k["table5"] in readme and "| run | updates |" not in readme
    m30k["status"]["complete"] = False
    assert R.multi30k_result(m30k).startswith("ASAM - Adam on Multi30k so far: +0.30")
    m30k["summary"]["power"] = None  # before ASAM and Adam share a seed
    assert R.multi30k_result(m30k) == "" and "; ASAM - Adam" not in R.render(multi30k=m30k)["reproduced"]
