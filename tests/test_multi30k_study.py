"""studies/multi30k.py (issue 25): the plan decided from finished runs alone (rho grid, widening at an edge,
paired seeds), the results JSON rewritten after every run, and a rerun that skips finished runs."""

import contextlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies import multi30k as S  # noqa: E402


def rec(method, rho, seed, valid, test=None):
    sc = {"valid": {"bleu_detok": valid, "bleu_tokenized": valid + 1},
          "test": {"bleu_detok": test if test is not None else valid, "bleu_tokenized": (test or valid) + 1}}
    args = S.train_args(method, seed, data=Path("data"), run_dir=Path("run"), rho=rho, model=S.MODEL, recipe=S.RECIPE,
                        max_epoch=S.MAX_EPOCH, patience=S.PATIENCE)
    return {"method": method, "rho": rho, "seed": seed, "key": S.key(method, rho, seed), "best": sc, "avg": sc,
            "wall_s_per_update": 1.0, "train_wall_s": 600.0, "cpu_s_per_update": 0.9, "updates": 100, "best_epoch": 5, "stop_epoch": 10,
            "fairseq_train_args": args}


def runs_of(*recs):
    return {r["key"]: r for r in recs}


# what corpora.prepare_multi30k returns, for the tests whose runs do not read the data
PREPARED = {"corpus": "multi30k", "counts": {}, "dict_sizes": {}, "dict_sha256": {"de": "a", "en": "b"}, "cased": True,
            "sources": {}}
KW = {"seeds": [1, 2, 3], "grid_seeds": [1], "grids": {"asam": (0.1, 0.2, 0.5)}, "methods": ("asam",)}


def test_plan_starts_with_adam_and_the_grid_and_waits_for_it():
    jobs, dec = S.plan({}, **KW)
    assert jobs == [("adam", None, 1), ("asam", 0.1, 1), ("asam", 0.2, 1), ("asam", 0.5, 1)]
    assert dec == {"asam": {"grid": [0.1, 0.2, 0.5], "chosen": None, "widened": []}}


def test_a_choice_inside_the_grid_runs_the_paired_seeds_at_it():
    runs = runs_of(rec("adam", None, 1, 30), rec("asam", 0.1, 1, 31), rec("asam", 0.2, 1, 33), rec("asam", 0.5, 1, 32))
    jobs, dec = S.plan(runs, **KW)
    assert jobs[4:] == [("adam", None, 2), ("asam", 0.2, 2), ("adam", None, 3), ("asam", 0.2, 3)]
    assert dec["asam"]["chosen"] == 0.2 and dec["asam"]["edge"] is None and dec["asam"]["edge_note"] is None
    assert dec["asam"]["means"] == {"0.1": 31, "0.2": 33, "0.5": 32}


def test_a_choice_at_an_edge_widens_the_grid_along_the_papers_range_and_says_so():
    runs = runs_of(rec("adam", None, 1, 30), rec("asam", 0.1, 1, 31), rec("asam", 0.2, 1, 32), rec("asam", 0.5, 1, 33))
    jobs, dec = S.plan(runs, **KW)
    assert jobs[-1] == ("asam", 1.0, 1) and dec["asam"] == {"grid": [0.1, 0.2, 0.5, 1.0], "chosen": None,
                                                            "widened": [1.0]}
    runs.update(runs_of(rec("asam", 1.0, 1, 34)))
    jobs, dec = S.plan(runs, **KW)
    assert jobs[-1] == ("asam", 2.0, 1)
    runs.update(runs_of(rec("asam", 2.0, 1, 35)))
    jobs, dec = S.plan(runs, **KW)
    # 2.0 is the end of the paper's range (and the budget of two widenings is spent): chosen, flagged
    d = dec["asam"]
    assert d["chosen"] == 2.0 and d["edge"] == "highest" and d["widened"] == [1.0, 2.0]
    assert "highest value of the grid after 2 widening(s)" in d["edge_note"]
    assert jobs[-2:] == [("adam", None, 3), ("asam", 2.0, 3)]
    assert "highest value of the grid" in S.markdown(S.summarize(runs, dec, [1, 2, 3]), dec)
    # the lower end widens downwards; at the ladder's end there is nothing further
    assert S.widen([0.1, 0.2], "lowest") == 0.05 and S.widen([0.005, 0.01], "lowest") is None
    assert S.edge(0.2, [0.2]) is None and S.edge(0.1, [0.1, 0.2]) == "lowest"


def test_ties_go_to_the_smaller_rho_and_test_scores_never_choose():
    runs = runs_of(rec("asam", 0.1, 1, 31, test=0), rec("asam", 0.2, 1, 33, test=0), rec("asam", 0.5, 1, 33, test=99))
    assert S.choose_rho(runs, "asam", [0.1, 0.2, 0.5], [1]) == (0.2, {0.1: 31, 0.2: 33, 0.5: 33})


def test_summary_pairs_every_method_with_adam_and_checks_power():
    runs = runs_of(*[rec("adam", None, s, 30, test=30 + s) for s in (1, 2, 3)],
                   rec("asam", 0.1, 1, 31), rec("asam", 0.2, 1, 33), rec("asam", 0.5, 1, 32),
                   *[rec("asam", 0.2, s, 33, test=31 + s + 0.1 * s) for s in (1, 2, 3)])
    _, dec = S.plan(runs, **KW)
    s = S.summarize(runs, dec, [1, 2, 3])
    g = s["rows"]["asam"]["test_bleu_detok_vs_adam"]
    assert g["diffs"] == [1.1, 1.2, 1.3] and g["gain"] == pytest.approx(1.2) and g["powered"]
    assert s["power"] is g and s["rows"]["adam"]["test_bleu_detok_vs_adam"] is None
    assert set(s["rows"]) == {"adam", "adam+avg", "asam", "asam+avg"}


@pytest.mark.slow
def test_study_writes_the_json_after_every_run_and_a_rerun_skips_finished_runs(tmp_path, monkeypatch):
    trained = []
    scores = {("asam", 0.1): 31, ("asam", 0.2): 33, ("asam", 0.5): 32}

    def fake_train(out, m, rho, seed, **kw):
        trained.append(S.key(m, rho, seed))
        # the JSON on disk already holds every run finished before this one
        on_disk = json.loads(js.read_text())["runs"]
        assert len(on_disk) == len(trained) - 1 + n_before
        return rec(m, rho, seed, scores.get((m, rho), 30), test=30 + seed + (m == "asam"))

    monkeypatch.setattr(S, "train_one", fake_train)
    monkeypatch.setattr(S.corpora, "prepare_multi30k", lambda *a, **k: PREPARED)
    js = tmp_path / "res.json"
    argv = ["--out", str(tmp_path / "out"), "--json", str(js), "--seeds", "1,2", "--grid-seeds", "1",
            "--methods", "asam"]
    n_before = 0
    assert S.main([*argv, "--max-runs", "3"]) == 0
    assert trained == ["adam-seed1", "asam-seed1-rho0.1", "asam-seed1-rho0.2"]
    res = json.loads(js.read_text())
    assert res["status"] == {"finished_runs": 3, "planned_runs_known": 4, "running": [], "next": ["asam-seed1-rho0.5"],
                             "complete": False}
    assert "studies.multi30k" in res["command"] and res["resume"]
    # the page's status table (scripts/readme_numbers.py renders it into docs/multi30k.md) is the JSON's runs
    assert res["status_markdown"] == S.status_markdown(res) and "| asam-seed1-rho0.2 | 100 |" in res["status_markdown"]
    # the README's table (the paper's Table 5 layout) is the first table of the markdown, stored on its own
    assert res["table5"] == S.table5(res["summary"]) and res["markdown"].startswith(res["table5"] + "\n\n")
    # resumed from the JSON alone: only the missing runs train
    trained.clear()
    n_before = 3
    assert S.main(argv) == 0
    assert trained == ["asam-seed1-rho0.5", "adam-seed2", "asam-seed2-rho0.2"]
    res = json.loads(js.read_text())
    assert res["status"]["complete"] and len(res["runs"]) == 6 and res["plan"]["asam"]["chosen"] == 0.2
    trained.clear()
    assert S.main(argv) == 0 and trained == []
    # a run made under other settings (here: another --max-epoch) is kept aside, not reused: it runs again
    res = json.loads(js.read_text())
    old = next(r for r in res["runs"] if r["key"] == "adam-seed2")
    old["fairseq_train_args"] = [*old["fairseq_train_args"], "--max-epoch", "40"]
    js.write_text(json.dumps(res))
    n_before = 5
    assert S.main(argv) == 0 and trained == ["adam-seed2"]
    res = json.loads(js.read_text())
    assert [r["key"] for r in res["other_settings_runs"]] == ["adam-seed2"] and len(res["runs"]) == 6
    # runs made with other dictionaries are not mixed in
    monkeypatch.setattr(S.corpora, "prepare_multi30k", lambda *a, **k: {**PREPARED, "dict_sha256": {"de": "x"}})
    with pytest.raises(SystemExit, match="dictionaries differ"):
        S.main(argv)


def test_speculative_widening_is_the_run_the_plan_adds_if_the_leading_rho_stays_the_best():
    base = [rec("adam", None, 1, 30), rec("asam", 0.1, 1, 33), rec("asam", 0.2, 1, 32)]
    runs = runs_of(*base)
    _, dec = S.plan(runs, **KW)  # 0.5 still missing: the choice waits
    assert dec["asam"]["chosen"] is None
    assert S.speculative(runs, dec, grid_seeds=[1]) == [("asam", 0.05, 1)]
    assert S.speculative(runs, dec, grid_seeds=[1], busy=[("asam", 0.05, 1)]) == []
    # then the other seeds at the leader, the runs the plan asks for if it is chosen
    assert S.speculative(runs, dec, grid_seeds=[1], seeds=[1, 2, 3], busy=[("asam", 0.05, 1)]) == [
        ("asam", 0.1, 2), ("asam", 0.1, 3)]
    # the leader inside the grid, or the widening budget spent: no widening to start early
    runs = runs_of(base[0], rec("asam", 0.1, 1, 31), rec("asam", 0.2, 1, 33))
    assert S.speculative(runs, S.plan(runs, **KW)[1], grid_seeds=[1]) == []
    assert S.speculative(runs, S.plan(runs, **KW)[1], grid_seeds=[1], seeds=[1, 2]) == [("asam", 0.2, 2)]
    assert S.speculative(runs_of(*base), {"asam": {**dec["asam"], "widened": [1.0, 2.0]}}, grid_seeds=[1]) == []
    # when the choice lands where the speculation bet, the plan asks for exactly the run already started
    runs = runs_of(*base, rec("asam", 0.5, 1, 31))
    jobs, dec = S.plan(runs, **KW)
    assert jobs[-1] == ("asam", 0.05, 1) and dec["asam"]["widened"] == [0.05]


def _timed_train(out, m, rho, seed, **kw):
    """A stand-in for one run that logs when it ran and in which process and on which cores (a forked
    worker: the test's monkeypatch is inherited)."""
    import os
    import time

    t0 = time.time()
    time.sleep(1.2 if rho == 0.5 else 0.3)
    with open(Path(out) / "ran.jsonl", "a") as f:
        f.write(json.dumps({"key": S.key(m, rho, seed), "pid": os.getpid(), "t0": t0, "t1": time.time(),
                            "cores": sorted(os.sched_getaffinity(0))}) + "\n")
    valid = {0.1: 33, 0.2: 32, 0.5: 31, None: 30}.get(rho, 34)  # the lowest end leads: the grid widens twice
    return rec(m, rho, seed, valid, test=30 + seed + (m == "asam"))


@pytest.mark.slow
@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs two allowed cores")
def test_two_jobs_run_side_by_side_on_their_own_cores_and_reach_the_one_job_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "train_one", _timed_train)
    monkeypatch.setattr(S.corpora, "prepare_multi30k", lambda *a, **k: PREPARED)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--out", str(out), "--seeds", "1,2", "--grid-seeds", "1", "--methods", "asam"]
    assert S.main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    (out / "ran.jsonl").unlink()
    assert S.main([*argv, "--json", str(tmp_path / "two.json"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["plan"] == two["plan"] and one["summary"] == two["summary"] and two["status"]["complete"]
    # runs started early on a leader that the choice then passed by are kept, unused
    extra = {r["key"]: r for r in two["runs"]}.keys() - {r["key"] for r in one["runs"]}
    assert {r["key"] for r in one["runs"]} <= {r["key"] for r in two["runs"]}
    assert all(r["seed"] == 2 and r["rho"] != 0.02 for r in two["runs"] if r["key"] in extra)
    ran = [json.loads(x) for x in (out / "ran.jsonl").read_text().splitlines()]
    assert two["plan"]["asam"]["chosen"] == 0.02 and two["plan"]["asam"]["widened"] == [0.05, 0.02]
    assert len(ran) == 8 + len(extra) and len({r["pid"] for r in ran}) == 2  # two worker processes
    assert all(len(r["cores"]) == 1 for r in ran) and len({r["cores"][0] for r in ran}) == 2
    at = {r["key"]: r for r in ran}
    # the first pair overlaps in time; the widening run starts while the grid's last run still trains
    first = sorted(ran, key=lambda r: r["t0"])[:2]
    assert first[1]["t0"] < first[0]["t1"]
    assert at["asam-seed1-rho0.05"]["t0"] < at["asam-seed1-rho0.5"]["t1"]
    # every run records (at least) the runs that shared the machine with it
    for r in two["runs"]:
        me = at[r["key"]]
        overlap = {k for k, x in at.items() if k != r["key"] and x["t0"] < me["t1"] and me["t0"] < x["t1"]}
        assert set(r["beside"]) >= overlap
    assert "asam-seed1-rho0.5" in next(r for r in two["runs"] if r["key"] == "asam-seed1-rho0.05")["beside"]
    assert all(r["beside"] == [] for r in one["runs"])
    assert "taskset -c" in two["command"] and "--jobs 2" in two["command"]
    # the page's run table says which runs shared the machine
    assert "asam-seed1-rho0.05 with asam-seed1-rho0.5" in two["status_markdown"]
    assert "at the same time" not in one["status_markdown"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def _train_that_sleeps(out, m, rho, seed, **kw):
    """A run whose child process (as fairseq-train is started) sleeps; its pid goes to a file."""
    import os
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], preexec_fn=S.die_with_parent)
    (Path(out) / f"{S.key(m, rho, seed)}.pid").write_text(f"{child.pid} {os.getpid()}")
    time.sleep(300)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_leaves_no_worker_or_training_process_behind(tmp_path, monkeypatch):
    import multiprocessing
    import os
    import signal
    import time

    monkeypatch.setattr(S, "train_one", _train_that_sleeps)
    monkeypatch.setattr(S.corpora, "prepare_multi30k", lambda *a, **k: PREPARED)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--out", str(out), "--json", str(tmp_path / "r.json"), "--seeds", "1", "--methods", "asam", "--jobs", "2"]
    study = multiprocessing.get_context("fork").Process(target=S.main, args=(argv,))
    study.start()
    deadline = time.time() + 60
    while len(list(out.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p) for f in out.glob("*.pid") for p in f.read_text().split()]  # each run's child and worker
    try:
        assert len(pids) == 4 and not any(_gone(p) for p in pids)
        os.kill(study.pid, signal.SIGKILL)  # as `kill -9` of the study: no handler of its own runs
        study.join()
        deadline = time.time() + 20
        while not all(_gone(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "a worker or a training process outlived the killed study"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(study.pid, signal.SIGKILL)


TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2"]


@pytest.mark.slow
def test_one_run_trains_to_early_stop_and_scores_sacrebleu_against_raw_references(tmp_path):
    from mt_helpers import write_multi30k

    from fairseq_asam.iwslt import corpora, evaluate

    src, out = tmp_path / "m30k", tmp_path / "out"
    sums = write_multi30k(src, n_train=80)
    corpora.prepare_multi30k(src, dest=out / "data-bin", work=out / "prep", sums=sums, bpe_tokens=200, log=lambda m: None)
    r = S.train_one(out, "asam", 0.2, 1, model=TINY, recipe=["--max-tokens", "512", "--warmup-updates", "2"],
                    max_epoch=4, patience=1, avg_n=2, log=lambda m: None)
    assert r["key"] == "asam-seed1-rho0.2" and r["updates"] > 0 and r["stop_epoch"] <= 4
    assert r["averaged"][0] == f"checkpoint{r['best_epoch']}.pt" and len(r["averaged"]) <= 2
    assert r["train_cpu_s"] > 0 and r["cpu_s_per_update"] > 0 and r["second_pass_frac"] == 1.0
    args = r["fairseq_train_args"]
    assert args[args.index("--optimizer") + 1] == "asam_adam" and args[args.index("--asam-rho") + 1] == "0.2"
    assert args[args.index("--patience") + 1] == "1" and "--no-epoch-checkpoints" not in args
    for c in ("best", "avg"):
        for sub in ("valid", "test"):
            sc = r[c][sub]
            assert sc["sentences"] == 8 and sc["detok_references"] == "raw"
            assert "case:mixed" in sc["bleu_detok_signature"] and "tok:13a" in sc["bleu_detok_signature"]
            assert sc["bleu_tokenized"] is not None
    # asam-mt-evaluate on the same run: the same numbers for the best checkpoint, the signature printed
    run_dir = out / "runs" / "asam-seed1-rho0.2"
    lines: list[str] = []
    ev = evaluate.evaluate_run(run_dir, data=out / "data-bin", log=lines.append)
    for sub in ("valid", "test"):
        assert ev[sub]["bleu_tokenized"] == r["best"][sub]["bleu_tokenized"]
        assert ev[sub]["bleu_detok"] == r["best"][sub]["bleu_detok"]
    assert any("nrefs:1|case:mixed" in m for m in lines)


def test_report_prints_every_finished_run_from_the_json_alone(tmp_path, capsys):
    runs = [dict(rec("adam", None, 1, 30.0, test=31.5), train_wall_s=600.0,
                 valid_curve=[{"epoch": 1, "update": 250, "loss": 5.0}, {"epoch": 2, "update": 500, "loss": 4.0}])]
    res = {"runs": runs, "status": {"finished_runs": 1, "next": ["asam-seed1-rho0.1"], "complete": False},
           "settings": {"seeds": [1, 2, 3], "grid_seeds": [1], "grids": {"asam": [0.1, 0.2, 0.5]}}}
    js = tmp_path / "r.json"
    js.write_text(json.dumps(res))
    assert S.main(["--json", str(js), "--report", "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "| adam-seed1 | 100 | 5 / 10 | 30.00 | 31.50 / 31.50 | 32.50 / 32.50 | 10.0 | 1.000 / 0.900 |" in out
    assert "1 runs finished; next: asam-seed1-rho0.1" in out and "- asam: grid [0.1, 0.2, 0.5] still running" in out
    assert "| BLEU (test_2016_flickr) | Adam |" in out and "| sacreBLEU, best checkpoint | 31.50 ± - (n=1) |" in out
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_plot_data_is_the_mean_curve_at_the_chosen_rho_and_the_paired_difference_to_adam():
    def curve(*losses):
        return [{"epoch": e + 1, "update": 100 * (e + 1), "loss": v} for e, v in enumerate(losses)]

    runs = [dict(rec("adam", None, 1, 30.0), valid_curve=curve(5.0, 4.0, 3.0)),
            dict(rec("adam", None, 2, 30.0), valid_curve=curve(5.2, 4.2)),  # stopped one epoch earlier
            dict(rec("asam", 0.1, 1, 30.0), valid_curve=curve(5.5, 4.1, 2.9)),
            dict(rec("asam", 0.1, 2, 30.0), valid_curve=curve(5.3, 4.5, 3.5)),
            dict(rec("asam", 0.5, 1, 30.0), valid_curve=curve(9.0, 9.0, 9.0))]  # not the chosen rho: left out
    d = S.plot_curves({"runs": runs, "plan": {"asam": {"chosen": 0.1}}})
    assert d["adam"]["seeds"] == [1, 2] and [p["loss"] for p in d["adam"]["curve"]] == pytest.approx([5.1, 4.1])
    assert [p["epoch"] for p in d["adam"]["curve"]] == [1, 2] and d["adam"]["diff_vs_adam"] == []
    # epoch 1: diffs 0.5, 0.1 -> mean 0.3, std 0.2828, SE 0.2; epoch 2: 0.1, 0.3 -> 0.2, SE 0.1; epoch 3: adam 2 has none
    diff = d["asam"]["diff_vs_adam"]
    assert [p["epoch"] for p in diff] == [1, 2]
    assert [p["diff"] for p in diff] == pytest.approx([0.3, 0.2]) and [p["se"] for p in diff] == pytest.approx([0.2, 0.1])
    assert [p["loss"] for p in d["asam"]["curve"]] == pytest.approx([5.4, 4.3, 3.2])


@pytest.mark.slow
def test_more_jobs_than_cores_share_every_core_and_reach_the_same_choice(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(S, "train_one", _timed_train)
    monkeypatch.setattr(S.corpora, "prepare_multi30k", lambda *a, **k: PREPARED)
    out = tmp_path / "out"
    out.mkdir()
    allowed = sorted(os.sched_getaffinity(0))
    jobs = len(allowed) + 1
    assert S.main(["--out", str(out), "--seeds", "1,2", "--grid-seeds", "1", "--methods", "asam",
                   "--json", str(tmp_path / "r.json"), "--jobs", str(jobs)]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["status"]["complete"] and res["plan"]["asam"]["chosen"] == 0.02
    ran = [json.loads(x) for x in (out / "ran.jsonl").read_text().splitlines()]
    assert all(r["cores"] == allowed for r in ran)  # unpinned
    assert len({r["pid"] for r in ran}) == jobs
