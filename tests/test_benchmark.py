"""The benchmark's pieces run and report consistent numbers (no timing assertions: shared machines)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.kernel import _reference_ascent, _reference_restore, bench_kernel, reference_kinds
from fairseq_asam import ASAM

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_section_on_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
    r = bench_kernel(list(model.named_parameters()), repeats=2)
    n = sum(p.numel() for p in model.parameters())
    assert r["n_params"] == n and r["param_bytes"] == 4 * n
    assert set(r["seconds"]) == {"adam", "loop", "foreach", "reference"}
    assert all(v > 0 for v in r["seconds"].values())
    for k, v in r["ratio_to_adam"].items():
        assert abs(v - r["seconds"][k] / r["seconds"]["adam"]) < 1e-12
    assert r["default_kernel"] == "loop"


def test_reference_loop_uses_the_cores_bias_rule_and_matches_its_ascent():
    # fairseq's MultiheadAttention has weights named bias_k / bias_v: "bias" in the name, not at its
    # end, so they are weights (T = |w| + eta) for the core, and must be for the reference too.
    torch.manual_seed(0)
    shapes = {"attn.bias_k": (1, 1, 4), "attn.out.bias": (4,), "attn.out.weight": (4, 4)}
    named = [(n, torch.nn.Parameter(torch.randn(*s, dtype=torch.float64))) for n, s in shapes.items()]
    assert reference_kinds(named) == {"attn.bias_k": "element", "attn.out.bias": "none", "attn.out.weight": "element"}

    grads = [torch.randn_like(p) for _, p in named]
    w0 = [p.detach().clone() for _, p in named]
    for (_, p), g in zip(named, grads):
        p.grad = g.clone()
    state: dict = {}
    _reference_ascent(named, 0.3, 0.01, state, reference_kinds(named))
    ref = [p.detach().clone() for _, p in named]
    _reference_restore(named, state)

    opt = ASAM(named, torch.optim.SGD([p for _, p in named], lr=0.1), rho=0.3, eta=0.01)
    for (_, p), g in zip(named, grads):
        p.grad = g.clone()
    opt.ascent_step()
    for (n, p), r, w in zip(named, ref, w0):
        assert torch.allclose(p.detach(), r, rtol=0, atol=1e-12), n
        assert not torch.equal(r, w), n  # every tensor moved, the bias by rho T^2 g / norm with T = 1
    opt.restore()


@pytest.mark.slow
def test_benchmark_cli_rejects_bad_arguments():
    for args, msg in ((["--sections", "gpu"], "--sections: unknown"), (["--updates", "3"], "--updates must be >= 6")):
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, p.stderr


@pytest.mark.slow
def test_benchmark_prints_each_table_as_soon_as_it_is_measured(tmp_path):
    # vision (seconds with --quick) first, then fairseq (real fairseq-train processes, many seconds):
    # the vision table must arrive while the fairseq section is still running.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--sections", "vision,fairseq",
                             "--quick", "--device", "cpu", "--out", str(tmp_path / "b.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("| asam | cpu |"):
                break
        assert any("Whole update of the torchvision entry point" in x for x in seen), seen
        assert proc.poll() is None, "the process ended before its table was read: nothing was streamed"
        assert (tmp_path / "b.json").exists()  # the JSON is written after every section
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark and its fairseq-train child
        proc.wait(timeout=60)


@pytest.mark.slow
def test_efficient_vision_section_on_a_small_model():
    from benchmarks.efficient_update import EFFICIENT, bench_vision

    r = bench_vision(model_name="resnet8", batch=4, rounds=1, timed=10)
    assert set(r["seconds_per_update"]) == {"sgd", "asam", *EFFICIENT}
    for k, v in r["ratio_to_sgd"].items():
        assert v > 0 and abs(v - r["seconds_per_update"][k] / r["seconds_per_update"]["sgd"]) < 1e-12
    assert r["ratio_to_asam"]["asam"] == 1.0
    cpu = r["cpu_seconds_per_update"]
    assert set(cpu) == set(r["seconds_per_update"]) and all(v > 0 for v in cpu.values())
    assert all(abs(r["cpu_ratio_to_sgd"][k] - cpu[k] / cpu["sgd"]) < 1e-12 for k in cpu)


@pytest.mark.parametrize("two_pass", [False, True])
def test_small_model_floor_is_sgd_exactly_with_the_passes_of_an_exact_restore(two_pass):
    """floor-*: the save, the move along the direction and the restore change nothing: after 5 updates the
    weights and SGD's momentum are SGD's, bit for bit (a restore that lost a bit would show here)."""
    from benchmarks.efficient_update import _BarePasses

    torch.manual_seed(0)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    crit = torch.nn.CrossEntropyLoss()
    runs = []
    for floor in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        bare = _BarePasses(model, opt, crit, x, y, two_pass=two_pass)
        for _ in range(5):
            if floor:
                bare(model, opt)
            else:
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p0, p1)
        assert torch.equal(o0.state[p0]["momentum_buffer"], o1.state[p1]["momentum_buffer"])


def test_small_section_has_every_contender_and_the_floors():
    from benchmarks.efficient_update import EFFICIENT, bench_small

    r = bench_small(rounds=1, timed=2)
    assert set(r["seconds_per_update"]) == {"sgd", "asam", *EFFICIENT, "floor-1pass", "floor-2pass"}
    assert r["n_params"] == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    cpu = r["cpu_seconds_per_update"]
    assert all(v > 0 for v in cpu.values()) and r["cpu_ratio_to_sgd"]["sgd"] == 1.0


@pytest.mark.slow
def test_lightning_section_runs_every_method_through_real_trainers():
    # --quick shapes: real pl.Trainer fits in a subprocess (the driver checks global_step == updates).
    from benchmarks import lightning_update

    r = lightning_update.bench_lightning(quick=True, rounds=1, updates=3, warmup=1)
    assert set(r["update_seconds"]) == set(lightning_update.METHODS)
    assert all(len(v) == 2 for v in r["update_seconds"].values())
    assert r["n_params"] == sum(p.numel() for p in __import__("torchvision").models.resnet18(num_classes=10).parameters())
    assert r["cpu_ratio_to_adam"]["adam"] == 1.0 and r["extra_memory_over_adam_in_param_bytes"]["adam"] == 0.0
