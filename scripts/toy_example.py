"""The toy example of Kwon et al. (ICML 2021), Section 5.1 / Figure 3: SAM and ASAM trajectories.

    L(w) = |w1 ReLU(w2) - 0.04|,   minimizers: the curve w1 w2 = 0.04, w2 > 0 (the "valley")

Both methods run through the package's own ASAM/SAM classes around plain SGD (float64), from the
paper's two starting points (0.2, 0.05) and (0.3, 0.033). What the paper states, and what this
script shows (tests/test_toy_example.py checks each):

- SAM (rho = 0.05, as in the paper) from (0.2, 0.05) drifts along the valley to the flattest
  minimizer w1 = w2 = (0.2, 0.2): on the valley the gradient norm just off it, sqrt(w1^2 + w2^2),
  is smallest there. (The paper words it as "sharpness is maximized when w1 = w2 within the same
  loss contour"; what SAM moves to is the minimizer of sharpness along the valley.)
- ASAM (eta = 0) perturbs w to w (1 +- rho / sqrt(2)): its ascent point is a rescaling of w, so
  (like gradient flow) it keeps w1^2 - w2^2 and lands on the valley point with the initial
  w1^2 - w2^2, "near the initial point" (:func:`flow_limit` gives it in closed form).
- From (0.3, 0.033) SAM never moves: its ascent step lands at w2 + eps2 < 0, where ReLU is dead and
  the gradient is zero. ASAM's ascent point keeps w2 (1 - rho/sqrt(2)) > 0 for any rho < sqrt(2), so
  it reaches the valley from any w0 with w1, w2 > 0, at a speed proportional to 1 - rho/sqrt(2)
  (rho = 1.41 needs about 100x more steps than rho = 1); for rho > sqrt(2) it is stuck like SAM.

The paper gives neither ASAM's rho nor the learning rate and number of steps for Figure 3. Here:
ASAM rho = 0.5, SGD lr = 0.01 decayed linearly to 0 over 1000 steps (with a constant lr an |.|
loss keeps oscillating across the valley, and each oscillation of a finite step drifts towards
w1 = w2, for either method), eta = 0 (T_w = diag|w|, the exactly scale-invariant case).

Run (about 2 seconds)::

    python scripts/toy_example.py --out docs/figures/toy_example.png --json docs/toy-results.json

The JSON holds the commit, command, machine and date, the settings, and per run the start, rho, steps,
final w and final L; docs/sharpness.md prints its lines (``report_lines``) and tests/test_toy_example.py
recomputes every run and checks the JSON against it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass

import torch

from fairseq_asam import ASAM, SAM

TARGET = 0.04
STARTS = ((0.2, 0.05), (0.3, 0.033))


def toy_loss(w: torch.Tensor) -> torch.Tensor:
    """L(w) = |w1 ReLU(w2) - 0.04| (Section 5.1); w has shape (2,) or (..., 2)."""
    return (w[..., 0] * torch.relu(w[..., 1]) - TARGET).abs()


class _Point(torch.nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))


@dataclass
class Trajectory:
    method: str
    rho: float
    w0: tuple[float, float]
    points: torch.Tensor  # (steps + 1, 2): w_0 ... w_T
    ascent_points: torch.Tensor  # (steps, 2): w_t + eps_t, where the gradient was taken

    @property
    def final(self) -> tuple[float, float]:
        return tuple(float(x) for x in self.points[-1])

    @property
    def final_loss(self) -> float:
        return float(toy_loss(self.points[-1]))


def trajectory(w0, method: str, rho: float, *, lr: float = 0.01, steps: int = 1000, eta: float = 0.0) -> Trajectory:
    """Run SAM or ASAM (the package's classes, plain SGD base, lr decayed linearly to 0) from w0."""
    if method not in ("sam", "asam"):
        raise ValueError(f"Invalid method: {method!r}; expected 'sam' or 'asam'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r}; must be an integer >= 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid lr: {lr!r}; must be a finite number > 0")
    point = _Point(w0)
    base = torch.optim.SGD(point.parameters(), lr=lr)
    if method == "sam":
        opt = SAM(point.named_parameters(), base, rho=rho)
    else:
        opt = ASAM(point.named_parameters(), base, rho=rho, eta=eta)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda k: 1.0 - k / steps)
    points, ascent = [point.w.detach().clone()], []
    for _ in range(steps):
        toy_loss(point.w).backward()
        if opt.ascent_step():
            ascent.append(point.w.detach().clone())
            toy_loss(point.w).backward()
            opt.descent_step()
        else:
            ascent.append(point.w.detach().clone())
            opt.zero_grad()
        sched.step()
        points.append(point.w.detach().clone())
    return Trajectory(method, float(rho), tuple(w0), torch.stack(points), torch.stack(ascent))


def flow_limit(w0) -> tuple[float, float]:
    """The valley point with the same w1^2 - w2^2 as w0 (w1, w2 > 0): where ASAM's flow ends.

    ASAM (eta = 0) takes the gradient at w (1 +- rho/sqrt 2), a positive multiple of the gradient at w,
    and gradient flow on f(w1 w2) keeps d(w1^2 - w2^2)/dt = 0.
    """
    d = w0[0] ** 2 - w0[1] ** 2
    w1_sq = (d + math.sqrt(d * d + 4 * TARGET**2)) / 2
    w1 = math.sqrt(w1_sq)
    return w1, TARGET / w1


def run_all(*, rho_sam: float = 0.05, rho_asam: float = 0.5, lr: float = 0.01, steps: int = 1000):
    return [
        trajectory(w0, method, rho_sam if method == "sam" else rho_asam, lr=lr, steps=steps)
        for w0 in STARTS
        for method in ("sam", "asam")
    ]


def results_document(trajs, *, lr: float, steps: int, provenance: dict) -> dict:
    """What ``--json`` commits: every run's start, rho, final w and final L, and where ASAM's flow ends."""
    return {**provenance,
            "settings": {"lr": lr, "lr_schedule": "linear to 0", "steps": steps, "eta": 0.0, "dtype": "float64"},
            "runs": [{"method": t.method, "rho": t.rho, "w0": list(t.w0), "steps": len(t.ascent_points),
                      "final_w": list(t.final), "final_loss": t.final_loss} for t in trajs],
            "valley": [{"w0": list(w0), "flow_limit": list(flow_limit(w0))} for w0 in STARTS]}


def report_lines(doc: dict) -> list[str]:
    """What the script prints, from its JSON (docs/sharpness.md shows these lines)."""
    lines = [f"{r['method'].upper():4s} rho={r['rho']:<5g} w0=({r['w0'][0]:.3f}, {r['w0'][1]:.3f}) -> "
             f"w=({r['final_w'][0]:.4f}, {r['final_w'][1]:.4f})  L={r['final_loss']:.2e}" for r in doc["runs"]]
    lines += [f"valley point with the same w1^2 - w2^2 as ({v['w0'][0]}, {v['w0'][1]}): "
              f"({v['flow_limit'][0]:.4f}, {v['flow_limit'][1]:.4f})" for v in doc["valley"]]
    return lines


def plot(trajs, out: str) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves the root logger verbose
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w1 = torch.linspace(0.0, 0.45, 300, dtype=torch.float64)
    w2 = torch.linspace(-0.05, 0.3, 300, dtype=torch.float64)
    g1, g2 = torch.meshgrid(w1, w2, indexing="xy")
    z = toy_loss(torch.stack([g1, g2], dim=-1))
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    cs = ax.contour(g1.numpy(), g2.numpy(), z.numpy(), levels=15, cmap="Greys", linewidths=0.7)
    ax.clabel(cs, fontsize=6)
    curve = torch.linspace(TARGET / 0.3, 0.45, 200, dtype=torch.float64)
    ax.plot(curve.numpy(), (TARGET / curve).numpy(), color="red", lw=1.5, label="minimizers $w_1 w_2 = 0.04$")
    style = {"sam": dict(color="tab:blue"), "asam": dict(color="tab:orange")}
    for t in trajs:
        pts = t.points.numpy()
        label = f"{t.method.upper()} (rho={t.rho:g})" if t.w0 == STARTS[0] else None
        ax.plot(pts[:, 0], pts[:, 1], lw=1.4, label=label, **style[t.method])
        ax.plot(*pts[-1], marker="*", ms=11, **style[t.method])
        ax.plot(*t.w0, marker="o", color="black", ms=5)
    ax.set_xlabel("$w_1$")
    ax.set_ylabel("$w_2$")
    ax.set_xlim(0, 0.45)
    ax.set_ylim(-0.05, 0.3)
    ax.set_title("$L(w) = |w_1\\,\\mathrm{ReLU}(w_2) - 0.04|$: SAM vs ASAM (paper Fig. 3)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)  # no half-written figure if saving fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/figures/toy_example.png", help="PNG to write")
    ap.add_argument("--rho-sam", type=float, default=0.05, help="SAM radius (paper: 0.05)")
    ap.add_argument("--rho-asam", type=float, default=0.5, help="ASAM radius (any value < sqrt(2) reaches the valley)")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, decayed linearly to 0")
    ap.add_argument("--steps", type=int, default=1000, help="number of SAM/ASAM updates")
    ap.add_argument("--json", default="docs/toy-results.json",
                    help="the runs' final points with the commit, command, machine and date ('' to skip)")
    args = ap.parse_args(argv)
    for flag, value in (("--rho-sam", args.rho_sam), ("--rho-asam", args.rho_asam), ("--lr", args.lr)):
        if not (math.isfinite(value) and value > 0):
            ap.error(f"{flag} must be a finite number > 0, got {value}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not args.out.endswith(".png"):
        ap.error(f"--out must name a .png file, got {args.out}")
    trajs = run_all(rho_sam=args.rho_sam, rho_asam=args.rho_asam, lr=args.lr, steps=args.steps)
    provenance = {"commit": None, "command": None, "machine": None, "date": None}
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file
        from provenance import stamp, write_json

        provenance = stamp("python scripts/toy_example.py " +
                           shlex.join(argv if argv is not None else sys.argv[1:]))
    doc = results_document(trajs, lr=args.lr, steps=args.steps, provenance=provenance)
    print("\n".join(report_lines(doc)))
    plot(trajs, args.out)
    print(f"wrote {args.out}")
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
