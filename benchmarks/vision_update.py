"""Benchmark section 4: whole updates of the torchvision entry point, sgd vs sam vs asam.

The update is the entry point's own (``fairseq_asam.vision.step.train_step`` with the optimizer that
``asam-vision-train`` builds: SGD momentum 0.9, weight decay 5e-4, rho 0.05 / 0.5), on a CIFAR-shaped
batch; the three minimizers run alternately, round after round.

    python scripts/benchmark.py --sections vision
"""

from __future__ import annotations

import statistics
import time

import torch

from fairseq_asam.core import ASAM, SAM


def bench_vision(*, model_name: str = "resnet20", batch: int = 128, repeats: int = 6, device: str = "cpu") -> dict:
    from fairseq_asam.vision.models import build_model
    from fairseq_asam.vision.step import train_step

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    setups = {}
    for name in ("sgd", "sam", "asam"):
        torch.manual_seed(0)
        model = build_model(model_name, 10).to(device).train()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if name == "asam":
            opt = ASAM(model.named_parameters(), base, rho=0.5)
        elif name == "sam":
            opt = SAM(model.named_parameters(), base, rho=0.05)
        else:
            opt = base
        setups[name] = (model, opt)
    n_params = sum(p.numel() for p in setups["sgd"][0].parameters())
    times: dict[str, list[float]] = {k: [] for k in setups}
    names = list(setups)
    for r in range(repeats + 1):
        for name in names[r % 3:] + names[: r % 3]:
            model, opt = setups[name]
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(model, opt, crit, x, y)
            if device != "cpu":
                torch.cuda.synchronize()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "batch": batch,
        "device": device,
        "n_params": n_params,
        "seconds_per_update": sec,
        "ratio_to_sgd": {k: v / sec["sgd"] for k, v in sec.items()},
    }
