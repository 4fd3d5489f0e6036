"""End to end on a tiny archive: prepare, train a few updates with Adam, SAM and ASAM, evaluate, summarize.

The numbers in eval.json, table5.md/csv and the plotted curves must be the ones fairseq's own logs
(fairseq-generate's BLEU4 line, the validation records of fairseq-train) contain.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import tarfile

import pytest
from iwslt_helpers import write_archive

from fairseq_asam.iwslt import evaluate, summarize, train
from scripts import demo, readme_numbers

PYTHON = sys.executable  # the real interpreter (the warm_launches fixture replaces sys.executable)
TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--max-tokens", "512", "--log-interval", "1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, warm_launches):
    # fairseq-train, -preprocess and -generate start warm (tests/warm_python.py): their CPU time is not in
    # the demo's record here (test_cpu_seconds_counts_finished_child_processes checks that it would count them)
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    (corpus / "de-en").mkdir(parents=True)
    with tarfile.open(write_archive(root / "src.tgz", n_pairs=60)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                (corpus / m.name).write_bytes(tar.extractfile(m).read())
    log: list[str] = []
    res = demo.run_demo(root / "out", corpus=corpus, max_update=4, validate_every=2, extra=TINY, log=log.append,
                        json_out=root / "copy.json", command="pytest")
    return {"out": root / "out", "res": res, "log": log, "record": json.loads((root / "out" / "demo.json").read_text()),
            "copy": json.loads((root / "copy.json").read_text())}


def _valid_records(stdout_log: str) -> list[dict]:
    recs = []
    for line in stdout_log.splitlines():
        if "| valid |" in line:
            recs.append(json.loads(line.split("| valid |", 1)[1]))
    return recs


@pytest.mark.slow
def test_each_method_trained_evaluated_and_summarized(pipeline):
    out = pipeline["out"]
    rows = list(csv.DictReader(open(out / "table5.csv", encoding="utf-8")))
    md = (out / "table5.md").read_text(encoding="utf-8")
    assert "| BLEU score | Adam | Adam+SAM | Adam+ASAM | Adam+ASAM one-pass |" in md
    assert train.METHODS == ("adam", "sam", "asam", "asam-onepass")
    for method in train.METHODS:
        run = out / "runs" / f"{method}-seed1"
        meta = json.loads((run / "run.json").read_text())
        args = meta["fairseq_train_args"]
        optimizer = {"adam": "adam", "sam": "sam_adam", "asam": "asam_adam", "asam-onepass": "asam_adam"}[method]
        assert args[args.index("--optimizer") + 1] == optimizer
        assert ("--asam-one-pass" in args) == (method == "asam-onepass")
        if method != "adam":
            assert args[args.index("--asam-rho") + 1] == str(train.DEFAULT_RHO[method])
            assert args[args.index("--task") + 1] == "translation_sam"
        if method == "asam-onepass":
            assert args[args.index("--asam-one-pass") + 1] == "momentum"
        ev = json.loads((run / "eval.json").read_text())
        for split in ("valid", "test"):
            gen = (run / f"generate-{split}.txt").read_text(encoding="utf-8")
            bleu4 = float(re.search(rf"Generate {split} with beam=5: BLEU4 = ([0-9.]+),", gen).group(1))
            assert ev[split]["bleu_tokenized"] == bleu4
            # Every sentence is translated (none lost to fairseq-fixed's batching remainder bug).
            n_lines = len((out / "prep" / "tmp" / f"{split}.en").read_text(encoding="utf-8").splitlines())
            assert ev[split]["sentences"] == len(re.findall(r"^H-\d+\t", gen, flags=re.M)) == n_lines
            assert "tok:13a" in ev[split]["bleu_detok_signature"] and "tok:none" in ev[split]["bleu_tokenized_sacrebleu_signature"]
            for metric in ("bleu_tokenized", "bleu_detok"):
                row = [r for r in rows if (r["metric"], r["split"], r["method"]) == (metric, split, method)]
                assert len(row) == 1 and int(row[0]["n"]) == 1 and row[0]["std"] == ""
                assert float(row[0]["mean"]) == pytest.approx(ev[split][metric], abs=1e-9)
        assert f"{ev['test']['bleu_tokenized']:.2f} ± n/a" in md
        # The curve points are fairseq-train's own validation records (updates 2 and 4).
        recs = _valid_records((run / "stdout.log").read_text(encoding="utf-8"))
        pts = summarize.read_valid_log(run / "train.log")
        assert [p["update"] for p in pts] == [2, 4] == [int(r["valid_num_updates"]) for r in recs]
        assert [p["loss"] for p in pts] == [float(r["valid_loss"]) for r in recs]
        assert [p["bleu"] for p in pts] == [float(r["valid_bleu"]) for r in recs]
        assert (run / "checkpoints" / "checkpoint_best.pt").exists()
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert any("[demo] 5/5 summary" in m for m in pipeline["log"])


@pytest.mark.slow
def test_demo_json_records_the_tables_the_time_and_where_they_come_from(pipeline):
    rec, res = pipeline["record"], pipeline["res"]
    assert rec == pipeline["copy"]  # --json writes the same record
    assert rec["markdown"] == res["markdown"] and rec["rows"] == json.loads(json.dumps(res["rows"]))
    assert {"commit", "command", "machine", "date"} <= set(rec) and rec["command"] == "pytest"
    assert rec["reused"] == [] and rec["max_update"] == 4 and rec["cores_allowed"] >= 1 and rec["methods"] == list(train.METHODS)
    assert rec["wall_s"] > 0 and rec["cpu_s"] > 0
    assert len(rec["load_average_before"]) == 3 and len(rec["load_average_after"]) == 3
    text = readme_numbers.demo_time(rec)
    assert f"{rec['wall_s'] / 60:.1f} minutes of wall time and {rec['cpu_s']:.0f} s of CPU time" in text


@pytest.mark.slow
def test_cpu_seconds_counts_finished_child_processes():
    """The demo's (and the studies') CPU time includes their fairseq processes once they have ended."""
    from scripts.provenance import cpu_seconds

    before = cpu_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass"
    subprocess.run([PYTHON, "-c", burn], check=True)  # the real interpreter, a child of this process
    assert cpu_seconds() - before >= 0.5


@pytest.mark.slow
def test_sam_and_asam_take_the_perturbed_pass(pipeline):
    def inner(method):
        text = (pipeline["out"] / "runs" / f"{method}-seed1" / "stdout.log").read_text(encoding="utf-8")
        return [json.loads(x.split("| train_inner |", 1)[1]) for x in text.splitlines() if "| train_inner |" in x]

    adam, sam, asam, one = inner("adam"), inner("sam"), inner("asam"), inner("asam-onepass")
    assert [int(r["num_updates"]) for r in adam] == [1, 2, 3, 4] == [int(r["num_updates"]) for r in sam]
    assert all("eps_norm" not in r for r in adam)
    # SAM (T = I, p = 2): ||eps||_2 = rho exactly (logged to 4 decimals).
    assert [float(r["eps_norm"]) for r in sam] == [train.PAPER_RHO["sam"]] * 4
    # ASAM: ||eps||_2 = rho ||T^2 g|| / ||T g||, which depends on the weights: logged, positive, not rho.
    assert all(0 < float(r["eps_norm"]) != train.PAPER_RHO["asam"] for r in asam) and len(asam) == 4
    # The one-pass mode never runs a second pass; the two-pass updates always do.
    assert [float(r["second_pass"]) for r in one] == [0.0] * 4 and len(one) == 4
    assert all(float(r["second_pass"]) == 1.0 for r in sam + asam)


def _direct_sharpness(checkpoint, data, settings: dict) -> float:
    """Adaptive sharpness of a checkpoint on the demo's training batches, built here with fairseq's own
    loading and batching and measured by a direct call of measure_sharpness (not through asam-sharpness)."""
    import torch
    from fairseq import checkpoint_utils
    from fairseq import utils as fs_utils

    from fairseq_asam.sharpness import measure_sharpness

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                      arg_overrides={"data": str(data)})
    model, criterion = models[0], task.build_criterion(cfg.criterion)
    task.load_dataset("train", combine=False, epoch=1, task_cfg=cfg.task)
    dataset = task.dataset("train")
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=int(settings["--max-tokens"]),
                                  max_positions=fs_utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                                  ignore_invalid_inputs=True, seed=1, num_workers=0)
    order = torch.randperm(len(itr.frozen_batches), generator=torch.Generator().manual_seed(int(settings["--batch-seed"])))
    picked = [itr.frozen_batches[i] for i in order.tolist()[: int(settings["--max-batches"])]]
    batches = [dataset.collater([dataset[i] for i in idx]) for idx in picked]

    def loss_fn(m, sample):
        loss, sample_size, _ = criterion(m, sample)
        return loss / sample_size, float(sample_size)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo measures
    try:
        return measure_sharpness(model, loss_fn, batches, rho=float(settings["--rho"]), eta=float(settings["--eta"]),
                                 p=float(settings["--p"]), steps=int(settings["--steps"]),
                                 seed=int(settings["--seed"])).value
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_cost_and_sharpness_columns(pipeline):
    """The table's sharpness is measure_sharpness called directly on the same checkpoint and batches; the
    cost columns come from each run's log: passes 1 / 2 / 2 / 1, milliseconds per update > 0."""
    out = pipeline["out"]
    rows = list(csv.DictReader(open(out / "table5.csv", encoding="utf-8")))
    md = (out / "table5.md").read_text(encoding="utf-8")
    settings = dict(zip(demo.DEMO_SHARPNESS[::2], demo.DEMO_SHARPNESS[1::2]))
    assert settings["--split"] == "train"

    def row(metric, method):
        got = [r for r in rows if (r["metric"], r["split"], r["method"]) == (metric, "train", method)]
        assert len(got) == 1, (metric, method)
        return got[0]

    sharp_cells, passes = [], []
    for method in train.METHODS:
        run = out / "runs" / f"{method}-seed1"
        rep = json.loads((run / "sharpness.json").read_text())
        assert rep["checkpoint"] == str((run / "checkpoints" / "checkpoint_best.pt").absolute())
        assert rep["measure"] == "adaptive sharpness (Eq. 4)" and rep["split"] == "train" and rep["batch_seed"] == 0
        direct = _direct_sharpness(run / "checkpoints" / "checkpoint_best.pt", out / "data-bin", settings)
        assert rep["value"] == direct > 0, method  # two code paths, the same number
        assert float(row("adaptive_sharpness", method)["mean"]) == round(direct, 8)
        sharp_cells.append(f"{direct:.4f} ± n/a")
        passes.append(float(row("passes_per_update", method)["mean"]))
        assert float(row("ms_per_update", method)["mean"]) > 0
        cost = summarize.read_update_cost(run / "train.log")
        assert cost["seconds_per_update"] > 0 and cost["intervals"] == 2  # updates 2 and 4: 1 is start-up, 3 follows a validation
    assert passes == [1.0, 2.0, 2.0, 1.0]
    assert "| Adaptive sharpness (Eq. 4) | " + " | ".join(sharp_cells) + " |" in md
    assert "| Passes per update | 1 | 2 | 2 | 1 |" in md


@pytest.mark.slow
def test_rerun_reuses_and_finished_run_is_not_extended(pipeline, capsys):
    out = pipeline["out"]
    run = out / "runs" / "adam-seed1"
    before = (run / "checkpoints" / "checkpoint_last.pt").read_bytes()
    log: list[str] = []
    demo.run_demo(out, corpus=out.parent / "corpus", max_update=4, validate_every=2, extra=TINY, log=log.append)
    text = "\n".join(log)
    n = len(train.METHODS)
    assert text.count("already trained to 4 updates, reused") == n and text.count("already evaluated") == n
    assert text.count("adaptive sharpness already measured") == n
    assert "binarize: reused" in text
    # demo.json says which steps were reused: such a record's time is not the demo's, and the docs refuse it
    rec = json.loads((out / "demo.json").read_text())
    assert sorted(rec["reused"]) == sorted(f"{step} {m}-seed1" for step in ("train", "evaluate", "sharpness")
                                           for m in train.METHODS)
    with pytest.raises(ValueError, match="reused earlier steps"):
        readme_numbers.demo_time(rec)
    rc = train.main(["adam", "1", "--data", str(out / "data-bin"), "--run-dir", str(run), "--max-update", "4"])
    assert rc == 0 and "already reached 4 updates" in capsys.readouterr().out
    assert (run / "checkpoints" / "checkpoint_last.pt").read_bytes() == before


def test_tokenized_sacrebleu_equals_fairseqs_bleu_scorer():
    """Two code paths for the paper's tokenized BLEU: fairseq's scorer (as fairseq-generate) and sacreBLEU none."""
    from fairseq.data import Dictionary
    from fairseq.scoring.bleu import BleuConfig, Scorer

    refs = ["the big dog sees the cat in the garden .", "i think that the man has bought a red car .",
            "today she paints two small pictures .", "do the children hear the loud song ?"]
    hyps = ["the big dog sees a cat in the garden .", "i think that the man bought a red car .",
            "today she paints two pictures .", "do the children hear the loud song ?"]
    d = Dictionary()
    scorer = Scorer(BleuConfig(pad=d.pad(), eos=d.eos(), unk=d.unk()))
    for h, r in zip(hyps, refs):
        scorer.add(d.encode_line(r, add_if_not_exist=True), d.encode_line(h, add_if_not_exist=True))
    res = evaluate.score(hyps, refs)
    assert res["bleu_tokenized_sacrebleu"] == pytest.approx(round(scorer.score(), 2), abs=0.01)
    assert 40 < res["bleu_tokenized_sacrebleu"] < 100
    assert evaluate.score(refs, refs)["bleu_detok"] == pytest.approx(100.0)


def test_parse_generate_orders_by_id_and_reads_bleu4():
    text = "\n".join([
        "S-1\tein hund", "T-1\ta dog", "H-1\t-0.5\ta dog", "D-1\t-0.5\ta dog",
        "S-0\tdie katze", "T-0\tthe cat", "H-0\t-0.2\tthe cat", "D-0\t-0.2\tthe cat",
        "Generate test with beam=5: BLEU4 = 34.86, 67.0/42.1/28.4/19.5 (BP=1.000, ratio=1.0, syslen=4, reflen=4)",
    ])
    p = evaluate.parse_generate(text)
    assert p == {"hyps": ["the cat", "a dog"], "refs": ["the cat", "a dog"], "fairseq_bleu4": 34.86}
    with pytest.raises(ValueError, match="hypotheses"):
        evaluate.parse_generate("T-0\tx\n")


def test_mean_std_and_grid_pick(tmp_path):
    m, s = summarize.mean_std([34.0, 35.0, 36.0])
    assert m == 35.0 and s == pytest.approx(1.0)
    assert summarize.mean_std([1.5]) == (1.5, None)
    with pytest.raises(ValueError):
        summarize.mean_std([])
    for method, rho, seed, bleu in [("sam", 0.05, 1, 30.0), ("sam", 0.1, 1, 31.0), ("sam", 0.1, 2, 33.0),
                                    ("sam", 0.2, 1, 31.5), ("asam", 0.2, 1, 35.0), ("asam", 0.5, 1, 35.0)]:
        d = tmp_path / f"{method}-rho{rho}-seed{seed}"
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"method": method, "seed": seed, "rho": rho}))
        (d / "eval.json").write_text(json.dumps({"valid": {"bleu_tokenized": bleu, "bleu_detok": bleu}}))
    md, best = summarize.grid_table(summarize.collect_runs([tmp_path]))
    # sam: 0.1 averages 32.0 over two seeds; asam: a tie is broken towards the smaller rho.
    assert best == {"sam": {"rho": 0.1, "valid_bleu": 32.0}, "asam": {"rho": 0.2, "valid_bleu": 35.0}}
    assert "| Adam+SAM | 0.1 | 32.00 **best** | 2 |" in md
    assert summarize.main(["--grid", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "grid.json").read_text())["sam"]["rho"] == 0.1


def test_train_command_has_the_papers_settings(tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    assert train.main(["asam", "3", "--data", str(tmp_path / "bin"), "--runs", str(tmp_path / "runs"), "--dry-run",
                       "--max-tokens", "1024"]) == 0
    cmd = capsys.readouterr().out.split()
    for flag, value in [("--arch", "transformer_iwslt_de_en"), ("--optimizer", "asam_adam"), ("--asam-rho", "0.2"),
                        ("--lr", "5e-4"), ("--lr-scheduler", "inverse_sqrt"), ("--warmup-updates", "4000"),
                        ("--dropout", "0.3"), ("--weight-decay", "0.0001"), ("--label-smoothing", "0.1"),
                        ("--seed", "3"), ("--save-dir", str(tmp_path / "runs" / "asam-seed3" / "checkpoints"))]:
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--share-decoder-input-output-embed" in cmd and "'(0.9," in cmd
    # Extra arguments come after the defaults, so fairseq's argparse keeps them.
    assert cmd[-2:] == ["--max-tokens", "1024"] and cmd.index("4096") < len(cmd) - 2
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv, message", [
    (["rmsprop"], "invalid choice"),
    (["adam", "--rho", "0.1"], "only applies to sam and asam"),
    (["sam", "--rho", "-1"], "--rho (RHO) must be > 0"),
    (["sam", "--data", "/nonexistent/bin"], "--data (DATA) /nonexistent/bin: no such directory"),
])
def test_train_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_args_validation():
    with pytest.raises(ValueError, match="METHOD must be one of"):
        train.fairseq_train_args("sgd", 1, data="d", run_dir="r")
    with pytest.raises(ValueError, match="SEED must be >= 0, got -1"):
        train.fairseq_train_args("adam", -1, data="d", run_dir="r")
    with pytest.raises(ValueError, match="RHO must be a finite number > 0, got nan"):
        train.fairseq_train_args("sam", 1, data="d", run_dir="r", rho=math.nan)


def test_train_uses_amp_on_a_gpu_unless_a_precision_is_given():
    # --fp16 would perturb fp16 weights, where most of eps rounds away (docs/precision.md).
    def args(cuda, extra=()):
        return train.fairseq_train_args("asam", 1, data="d", run_dir="r", cuda=cuda, extra=list(extra))

    assert args(True).count("--amp") == 1
    assert "--amp" not in args(False)
    for flag in ("--cpu", "--fp16", "--bf16", "--memory-efficient-fp16", "--amp"):
        assert args(True, [flag]).count("--amp") == (flag == "--amp"), flag


@pytest.mark.slow
def test_resumed_asam_run_equals_uninterrupted(pipeline):
    """Stop ASAM after 2 updates, resume to 4: the weights equal those of the uninterrupted 4-update run."""
    import torch
    from fairseq import checkpoint_utils

    out = pipeline["out"]
    run = out.parent / "resumed-asam"
    for stop in (2, 4):
        sched = ["--max-update", str(stop), "--validate-interval-updates", "2", "--save-interval-updates", "2"]
        demo._train("asam", 1, out / "data-bin", run, [*demo.DEMO_TRAIN_ARGS, *sched, *TINY], log=lambda m: None)
    assert "Loaded checkpoint" in (run / "stdout.log").read_text()  # the second start really resumed
    a = checkpoint_utils.load_checkpoint_to_cpu(str(run / "checkpoints" / "checkpoint_last.pt"))
    b = checkpoint_utils.load_checkpoint_to_cpu(str(out / "runs" / "asam-seed1" / "checkpoints" / "checkpoint_last.pt"))
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert summarize.read_valid_log(run / "train.log")[-1] == summarize.read_valid_log(
        out / "runs" / "asam-seed1" / "train.log")[-1]


@pytest.mark.slow
def test_evaluation_streams_generate_progress_and_keeps_every_hypothesis(pipeline, tmp_path, capsys):
    import shutil

    src = pipeline["out"] / "runs" / "asam-seed1"
    run = tmp_path / "asam-seed1"  # a copy: evaluate_run rewrites eval.json, which other tests read
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoint_last.pt", "checkpoint_*_*.pt"))
    before = json.loads((src / "eval.json").read_text())
    capsys.readouterr()
    res = evaluate.evaluate_run(run, subsets=("test",), batch_size=2, log=lambda m: None)
    err = capsys.readouterr().err
    # A progress bar fed by fairseq-generate's per-batch progress lines (8 batches of 2 of the 15
    # sentences) while its stdout was captured whole: every hypothesis, and the BLEU line.
    assert "fairseq-generate test" in err and "/8 [" in err, err[-2000:]
    assert "INFO" not in err  # fairseq's own messages stay out of the way unless it fails
    assert res["test"]["sentences"] == before["test"]["sentences"] == 15
    assert (run / "generate-test.txt").read_text().count("\nH-") == 15
    assert res["test"]["bleu_tokenized"] >= 0
