"""The benchmark's pieces run and report consistent numbers (no timing assertions: shared machines)."""

import subprocess
import sys
from pathlib import Path

import torch

from fairseq_asam.bench.kernel import bench_kernel

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


def test_benchmark_cli_rejects_bad_arguments():
    for args, msg in ((["--sections", "gpu"], "--sections: unknown"), (["--updates", "3"], "--updates must be >= 6")):
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, p.stderr


def test_efficient_vision_section_on_a_small_model():
    from fairseq_asam.bench.efficient_update import EFFICIENT, bench_vision

    r = bench_vision(model_name="resnet8", batch=4, rounds=1, timed=10)
    assert set(r["seconds_per_update"]) == {"sgd", "asam", *EFFICIENT}
    for k, v in r["ratio_to_sgd"].items():
        assert v > 0 and abs(v - r["seconds_per_update"][k] / r["seconds_per_update"]["sgd"]) < 1e-12
    assert r["ratio_to_asam"]["asam"] == 1.0
