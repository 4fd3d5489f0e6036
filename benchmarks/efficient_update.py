"""Benchmark section "efficient": the whole-update cost of the cheaper schedules (:mod:`fairseq_asam.schedule`)
next to the base optimizer and the full update, in fairseq-train (adam / sam_adam / asam_adam) and in the
vision entry point's update (sgd / asam).

A periodic schedule's cost is an average over its cycle, so each contender's cost is the *mean* time of
``timed`` consecutive updates (a multiple of 10: every 5 runs exactly 2 of each 10), not a median. The
contenders run alternately, round after round, in one process per fairseq run, so a slow spell of a
shared machine hits all of them; ratios measured side by side are the numbers to read.

    python scripts/benchmark.py --sections efficient
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import fairseq_update
from fairseq_asam.core import ASAM
from fairseq_asam.schedule import EveryK, LookASAM, OnePass

# name -> (fairseq-train flags on top of asam_adam's, the vision schedule)
EFFICIENT = {
    "every5": (["--asam-every", "5"], lambda: EveryK(5)),
    "look5-a0.7": (["--asam-every", "5", "--asam-reuse-alpha", "0.7"], lambda: LookASAM(5, 0.7)),
    "onepass-prev": (["--asam-one-pass", "previous"], lambda: OnePass("previous")),
    "onepass-mom": (["--asam-one-pass", "momentum"], lambda: OnePass("momentum")),
}


def bench_fairseq(*, rounds: int = 1, timed: int = 10, warmup: int = 4, device: str = "cpu", quick: bool = False,
                  threads: int | None = 1) -> dict:
    """Mean seconds per whole fairseq update (Trainer.train_step) and the ratio to adam, per contender: wall
    time and, on the CPU, the process's CPU time (``threads`` torch threads, 1 by default: then CPU time is
    the work done, whatever else shares the cores)."""
    arch = fairseq_update.TINY if quick else fairseq_update.MEDIUM
    max_tokens = 400 if quick else 1200
    methods = {m: list(fairseq_update.METHODS[m]) for m in ("adam", "sam_adam", "asam_adam")}
    for name, (flags, _) in EFFICIENT.items():
        methods[f"asam_adam {name}"] = [*fairseq_update.METHODS["asam_adam"], *flags]
    per: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    with tempfile.TemporaryDirectory(prefix="asam-bench-eff-") as d:
        tmp = Path(d)
        data_bin = fairseq_update.make_corpus(tmp)
        for r in range(rounds):
            for m in names[r % len(names):] + names[: r % len(names)]:
                rec = fairseq_update.run_once(data_bin, m, arch, updates=warmup + timed, device=device, tmp=tmp,
                                              max_tokens=max_tokens, threads=threads, method_flags=methods[m])
                times = rec["update_seconds"][warmup:]
                if len(times) < timed:
                    raise RuntimeError(f"{m}: only {len(rec['update_seconds'])} updates ran")
                per[m].append(statistics.fmean(times))
                cpu[m].append(statistics.fmean(rec["update_cpu_seconds"][warmup:]))
    sec = {m: statistics.median(v) for m, v in per.items()}
    out = {"device": device, "threads": threads, "timed_updates": timed, "seconds_per_update": sec,
           "ratio_to_adam": {m: s / sec["adam"] for m, s in sec.items()},
           "ratio_to_asam_adam": {m: s / sec["asam_adam"] for m, s in sec.items()}}
    if device == "cpu":
        cs = {m: statistics.median(v) for m, v in cpu.items()}
        out.update(cpu_seconds_per_update=cs, cpu_ratio_to_adam={m: s / cs["adam"] for m, s in cs.items()})
    return out


def _optimizers(build_model, lr: float, weight_decay: float = 0.0) -> dict:
    """{contender: (model, optimizer)}: sgd, full asam and each cheaper schedule, same initial weights."""
    setups = {}
    for name in ["sgd", "asam", *EFFICIENT]:
        torch.manual_seed(0)
        model = build_model()
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        opt = base if name == "sgd" else ASAM(model.named_parameters(), base, rho=0.5,
                                              schedule=None if name == "asam" else EFFICIENT[name][1]())
        setups[name] = (model, opt)
    return setups


def _alternate(setups: dict, update, *, rounds: int, timed: int, device: str = "cpu",
               updates: dict | None = None) -> tuple[dict, dict]:
    """Median over rounds of the mean seconds per ``update(model, opt)`` (``updates[name]`` instead, where
    given), wall time and this process's CPU time; contenders take turns, round 0 warms up, and each round
    starts with another contender (a slow spell of the machine hits all)."""
    names = list(setups)
    per: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, opt = setups[name]
            if device != "cpu":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step = (updates or {}).get(name, update)
            for _ in range(timed):
                step(model, opt)
            if device != "cpu":
                torch.cuda.synchronize()
            if r > 0:
                per[name].append((time.perf_counter() - t0) / timed)
                cpu[name].append((time.process_time() - c0) / timed)
    return ({k: statistics.median(v) for k, v in per.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def bench_vision(*, model_name: str = "resnet20", batch: int = 128, rounds: int = 3, timed: int = 10,
                 device: str = "cpu", threads: int | None = 1) -> dict:
    """Mean seconds per update of the vision entry point's train_step (sgd, asam and the schedules); on the
    CPU with ``threads`` torch threads (1 by default, so that CPU time is the work done)."""
    from fairseq_asam.vision.models import build_model
    from fairseq_asam.vision.step import train_step

    if threads and device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    setups = _optimizers(lambda: build_model(model_name, 10).to(device).train(), 0.1, 5e-4)
    sec, cs = _alternate(setups, lambda model, opt: train_step(model, opt, crit, x, y), rounds=rounds,
                         timed=timed, device=device)
    out = {"model": model_name, "batch": batch, "device": device, "threads": threads, "timed_updates": timed,
           "n_params": sum(p.numel() for p in setups["sgd"][0].parameters()),
           "seconds_per_update": sec, "ratio_to_sgd": {k: v / sec["sgd"] for k, v in sec.items()},
           "ratio_to_asam": {k: v / sec["asam"] for k, v in sec.items()}}
    if device == "cpu":
        out.update(cpu_seconds_per_update=cs, cpu_ratio_to_sgd={k: v / cs["sgd"] for k, v in cs.items()})
    return out


class _BarePasses:
    """The floor of any perturbation with an exact restore, as plain torch ops around SGD's update: the
    norm of a direction (a dot of w and d per tensor, one host sync), w saved and moved along d, and w
    copied back after the backward; no T_w arithmetic and no bookkeeping. The direction is SGD's momentum
    (one pass: the pass runs at w + eps) or the update's gradient (two passes: the ascent between them)."""

    def __init__(self, model, opt, crit, x, y, *, two_pass: bool):
        self.model, self.opt, self.crit, self.x, self.y, self.two_pass = model, opt, crit, x, y, two_pass
        self.params = list(model.parameters())
        self.saved = [torch.empty_like(p) for p in self.params]

    @torch.no_grad()
    def _save_and_move(self, dirs) -> bool:
        if any(d is None for d in dirs):
            return False  # the first update: no momentum yet, a plain step
        sq = torch.stack([torch.dot(p.view(-1), d.view(-1)) for p, d in zip(self.params, dirs)]).sum()
        alpha = 1e-30 / (abs(float(sq)) + 1.0)  # the host sync; a step that leaves w as it is in fp32
        for p, d, s in zip(self.params, dirs, self.saved):
            s.copy_(p)
            p.add_(d, alpha=alpha)
        return True

    @torch.no_grad()
    def _restore(self) -> None:
        for p, s in zip(self.params, self.saved):
            p.copy_(s)

    def _backward(self) -> None:
        self.opt.zero_grad()
        with torch.enable_grad():
            self.crit(self.model(self.x), self.y).backward()

    def __call__(self, model, opt) -> None:
        if self.two_pass:
            self._backward()
            moved = self._save_and_move([p.grad for p in self.params])
            self._backward()
        else:
            moved = self._save_and_move([opt.state.get(p, {}).get("momentum_buffer") for p in self.params])
            self._backward()
        if moved:
            self._restore()
        opt.step()


def bench_small(*, batch: int = 128, rounds: int = 5, timed: int = 20, threads: int = 1) -> dict:
    """Mean seconds per ``opt.step(closure)`` update of an MLP 784-256-256-10 (270k parameters), where the
    perturbation's fixed per-update work (Python, small kernels) weighs most against SGD's update.

    Two more contenders bound what any implementation with an exact restore can reach here
    (:class:`_BarePasses`): ``floor-1pass`` and ``floor-2pass``, SGD's update plus only the memory passes
    of a save, a move along a direction and the restore (and, for two passes, the second forward/backward).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))
    crit = torch.nn.CrossEntropyLoss()

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 10))

    setups = _optimizers(mlp, 0.01)
    floors = {}
    for name, two in (("floor-1pass", False), ("floor-2pass", True)):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups[name] = (model, opt)
        floors[name] = _BarePasses(model, opt, crit, x, y, two_pass=two)

    def update(model, opt):
        def closure():
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    sec, cs = _alternate(setups, update, rounds=rounds, timed=timed, updates=floors)
    return {"model": "mlp-784-256-256-10", "batch": batch, "threads": threads, "timed_updates": timed,
            "n_params": sum(p.numel() for p in setups["sgd"][0].parameters()), "seconds_per_update": sec,
            "ratio_to_sgd": {k: v / sec["sgd"] for k, v in sec.items()},
            "cpu_seconds_per_update": cs, "cpu_ratio_to_sgd": {k: v / cs["sgd"] for k, v in cs.items()}}
