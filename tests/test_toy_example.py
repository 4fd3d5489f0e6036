"""The toy example (paper Section 5.1 / Figure 3): the paper's claims, checked on real SAM/ASAM runs."""

import json
import math
from pathlib import Path

import pytest
import torch

from scripts import toy_example as toy

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "toy-results.json"


def dist(a, b):
    return math.hypot(a[0] - b[0], a[1] - b[1])


def test_loss_and_valley():
    w = torch.tensor([[0.2, 0.2], [0.3, -0.1], [0.2, 0.05]], dtype=torch.float64)
    assert toy.toy_loss(w).tolist() == pytest.approx([0.0, 0.04, 0.03], abs=1e-15)
    for w0 in toy.STARTS:
        f = toy.flow_limit(w0)
        assert f[0] * f[1] == pytest.approx(0.04, rel=1e-12)
        assert f[0] ** 2 - f[1] ** 2 == pytest.approx(w0[0] ** 2 - w0[1] ** 2, rel=1e-12)


@pytest.mark.slow
def test_sam_from_first_start_goes_to_the_flattest_minimizer_asam_stays_near():
    sam = toy.trajectory((0.2, 0.05), "sam", 0.05)
    asam = toy.trajectory((0.2, 0.05), "asam", 0.5)
    # Both reach the valley ...
    assert sam.final_loss < 1e-5 and asam.final_loss < 1e-5
    # ... SAM near (0.2, 0.2), the point of the valley where w1 = w2 ...
    assert dist(sam.final, (0.2, 0.2)) < 0.02
    # ... ASAM at the valley point that keeps w1^2 - w2^2, (0.251, 0.160), far from (0.2, 0.2).
    assert dist(asam.final, toy.flow_limit((0.2, 0.05))) < 0.005
    assert dist(asam.final, (0.2, 0.2)) > 0.05


def test_sam_is_stuck_from_second_start():
    sam = toy.trajectory((0.3, 0.033), "sam", 0.05, steps=300)
    # SAM's ascent point has w2 + eps2 = 0.033 - 0.05 * 0.3 / ||(0.033, 0.3)|| < 0, where ReLU is dead:
    # the gradient there is 0 and w never moves; the loss stays at |0.0099 - 0.04|.
    assert float(sam.ascent_points[0, 1]) == pytest.approx(0.033 - 0.05 * 0.3 / math.hypot(0.033, 0.3), rel=1e-12)
    assert float(sam.ascent_points[:, 1].max()) < 0
    assert torch.equal(sam.points[-1], torch.tensor([0.3, 0.033], dtype=torch.float64))
    assert sam.final_loss == pytest.approx(0.0301, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 1.0, 1.3])
def test_asam_reaches_the_valley_for_rho_below_sqrt2(rho):
    asam = toy.trajectory((0.3, 0.033), "asam", rho)
    # ASAM's ascent point is w (1 +- rho/sqrt 2): w2 stays positive, the ReLU never dies ...
    assert float(asam.ascent_points[:, 1].min()) > 0
    # ... and it lands on the valley, near the start's own valley point (0.323, 0.124).
    assert asam.final_loss < 1e-4
    assert dist(asam.final, toy.flow_limit((0.3, 0.033))) < 0.006


@pytest.mark.slow
def test_asam_from_other_starts_and_its_limit_at_sqrt2():
    # The paper: "ASAM converges no matter which w0 is used if rho < sqrt(2)", in the quadrant w1, w2 > 0 of
    # its figure (from w1 < 0 the loss's own flow, which ASAM follows, runs into the saddle at 0 or away).
    for w0 in [(0.05, 0.02), (0.4, 0.01), (0.01, 0.3), (0.1, 0.5)]:
        t = toy.trajectory(w0, "asam", 1.0, steps=1500)
        assert t.final_loss < 1e-4, w0
    # Above sqrt(2) the ascent kills the ReLU from below the valley: stuck, like SAM.
    stuck = toy.trajectory((0.3, 0.033), "asam", 1.5, steps=50)
    assert torch.equal(stuck.points[-1], stuck.points[0])
    assert float(stuck.ascent_points[0, 1]) == pytest.approx(0.033 * (1 - 1.5 / math.sqrt(2)), rel=1e-12)


@pytest.mark.slow
def test_main_writes_png_and_prints(tmp_path, capsys):
    out, js = tmp_path / "fig" / "toy.png", tmp_path / "toy.json"
    assert toy.main(["--out", str(out), "--steps", "200", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "SAM  rho=0.05  w0=(0.300, 0.033) -> w=(0.3000, 0.0330)  L=3.01e-02" in text
    assert text.count("ASAM rho=0.5") == 2
    doc = json.loads(js.read_text())
    assert doc["command"].endswith("--steps 200 --json " + str(js)) and len(doc["commit"].split("+")[0]) == 40
    assert [r["steps"] for r in doc["runs"]] == [200] * 4 and doc["runs"][2]["final_w"] == [0.3, 0.033]
    assert "\n".join(toy.report_lines(doc)) in text
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
    assert not list(out.parent.glob("*.tmp.png"))


@pytest.mark.parametrize(
    "argv, flag",
    [(["--lr", "-1"], "--lr"), (["--rho-asam", "nan"], "--rho-asam"), (["--steps", "0"], "--steps"), (["--out", "x.jpg"], "--out")],
)
def test_main_bad_flags(tmp_path, capsys, argv, flag):
    out = tmp_path / "toy.png"
    with pytest.raises(SystemExit) as e:
        toy.main(["--out", str(out)] + argv if flag != "--out" else argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        toy.trajectory((0.2, 0.05), "adam", 0.1)


def test_committed_json_says_where_it_comes_from_and_agrees_with_itself():
    doc = json.loads(RESULTS.read_text())
    assert doc["command"].startswith("python scripts/toy_example.py") and "--json docs/toy-results.json" in doc["command"]
    assert len(doc["commit"]) == 40 and doc["date"][:2] == "20" and {"cpu", "torch"} <= set(doc["machine"])
    assert [(r["method"], tuple(r["w0"])) for r in doc["runs"]] == [(m, w0) for w0 in toy.STARTS for m in ("sam", "asam")]
    for r in doc["runs"]:
        assert r["final_loss"] == float(toy.toy_loss(torch.tensor(r["final_w"], dtype=torch.float64)))
    assert [tuple(v["flow_limit"]) for v in doc["valley"]] == [toy.flow_limit(w0) for w0 in toy.STARTS]


@pytest.mark.slow
def test_committed_json_is_what_the_runs_give():
    # Every run recomputed in-process with the JSON's settings (float64 on a CPU: the same numbers to the
    # last bits; the tolerance only allows another CPU's rounding of the 2-element norms).
    doc = json.loads(RESULTS.read_text())
    rho = {r["method"]: r["rho"] for r in doc["runs"]}
    trajs = toy.run_all(rho_sam=rho["sam"], rho_asam=rho["asam"], lr=doc["settings"]["lr"],
                        steps=doc["settings"]["steps"])
    for r, t in zip(doc["runs"], trajs, strict=True):
        assert (r["method"], r["rho"], tuple(r["w0"]), r["steps"]) == (t.method, t.rho, t.w0, len(t.ascent_points))
        assert r["final_w"] == pytest.approx(list(t.final), rel=1e-12, abs=1e-15)
        assert r["final_loss"] == pytest.approx(t.final_loss, rel=1e-9, abs=1e-15)
