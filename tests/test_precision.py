"""Half precision and the perturbation (issue 15, items 1 and 2) on fairseq's transformer_iwslt_de_en.

- item 1: eps under --fp16 points where eps in fp32 points (cos >= 0.999), for p = 2 and inf, ASAM and SAM,
  both kernels; the gradient is a real per-token gradient of the real model, held the way fairseq's
  FP16Optimizer holds it (sum over tokens x loss scale, in fp16);
- item 2: the measurement behind docs/precision.md runs and gives the numbers the document states.

About 15 s on one core (one forward/backward of the 39.5M-parameter model, shared by the module).
"""

import math

import pytest
import torch

from benchmarks.kernel import transformer_iwslt_model
from benchmarks.precision import (
    applied_fraction,
    eps_cosine_fp16_vs_fp32,
    fairseq_fp16_grads,
    iwslt_gradient,
)
from fairseq_asam.fairseq_ext.task import fp16_grads_for_ascent

# Every test reads the gradients of the full-size transformer_iwslt_de_en (built once per module, seconds).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def iwslt():
    torch.manual_seed(0)
    model = transformer_iwslt_model()
    grads, n = iwslt_gradient(model)
    return list(model.named_parameters()), grads, n


def _fully_unscaled(grads, n):
    # What the task did before: fairseq's whole pending factor, 1 / (loss scale x tokens), in fp16.
    _, scale = fairseq_fp16_grads(grads, n)
    return lambda g16, p: torch._foreach_mul_(g16, 1.0 / (scale * n))


@pytest.mark.parametrize(
    "p,method,foreach",
    [(2, "asam", False), (2, "sam", True), (math.inf, "asam", False), (math.inf, "asam", True), (math.inf, "sam", False)],
    ids=["p2-asam-loop", "p2-sam-foreach", "pinf-asam-loop", "pinf-asam-foreach", "pinf-sam-loop"],
)
def test_fp16_eps_points_where_fp32_eps_points(iwslt, p, method, foreach):
    named, grads, n = iwslt
    adaptive = method == "asam"
    cos = eps_cosine_fp16_vs_fp32(named, grads, n, fp16_grads_for_ascent, p=p, adaptive=adaptive, foreach=foreach)
    assert cos >= 0.999
    if p == math.inf and adaptive:
        # The data does show the defect: per-token fp16 gradients flushed to zero lose their sign (measured
        # 0.968 for ASAM; 0.9998 for SAM), so this test fails with the old preparation.
        before = eps_cosine_fp16_vs_fp32(named, grads, n, _fully_unscaled(grads, n), p=p, adaptive=adaptive,
                                         foreach=foreach)
        assert before < 0.99


@pytest.mark.parametrize("p", [2, math.inf], ids=["p2", "pinf"])
def test_fp16_rescale_is_one_power_of_two(iwslt, p):
    _, grads, n = iwslt
    g16, _ = fairseq_fp16_grads(grads, n)
    before = [g.clone() for g in g16]
    fp16_grads_for_ascent(g16 + [None, torch.ones(3)], p)  # None and fp32 entries are left alone
    amax = max(float(g.abs().max()) for g in g16)
    ratio = amax / max(float(g.abs().max()) for g in before)
    assert math.log2(ratio) == int(math.log2(ratio))
    if p == 2:  # down to where T g cannot overflow
        assert 128 <= amax <= 256
    else:  # sign(g) only: loss-scaled fp16 gradients are left as they are, no entry is flushed
        assert ratio == 1.0 and all(torch.equal(a, b) for a, b in zip(before, g16))
    for a, b in zip(before, g16):  # one factor for every tensor, exact wherever the result stays normal
        normal = a.double().abs() * ratio >= 2.0**-14
        assert torch.equal(a.double()[normal] * ratio, b.double()[normal])
    tiny = [torch.full((4,), 2.0**-20, dtype=torch.float16)]
    fp16_grads_for_ascent(tiny, p)  # small gradients are scaled up, for either p
    assert float(tiny[0][0]) == 2.0**-20 * 2.0**15
    z = [torch.zeros(4, dtype=torch.float16)]
    fp16_grads_for_ascent(z, p)  # an all-zero gradient stays zero (no 0 * inf)
    assert torch.equal(z[0], torch.zeros(4, dtype=torch.float16))


def test_applied_fraction_of_eps(iwslt):
    # The numbers docs/precision.md reports (ASAM, rho 0.2): fp32 weights (also AMP and bf16 autocast) carry
    # eps whole; in fp16 weights ||w_eps - w|| stays about ||eps|| (eps is concentrated on the few entries
    # with a large T, e.g. layer-norm weights) but over 99% of the entries do not move and the direction
    # bends; bf16 weights lose about 7% of the norm and 10% of the direction (ASAM). The restore is exact in every mode.
    named, grads, _ = iwslt
    r32, r16, rbf = (applied_fraction(named, grads, dt, rho=0.2) for dt in (torch.float32, torch.float16, torch.bfloat16))
    assert r32["ratio"] == pytest.approx(1.0, abs=1e-4) and r32["cos"] > 1 - 1e-6
    assert 0.98 < r16["ratio"] < 1.03 and 0.95 < r16["cos"] < 0.999 and r16["unchanged_fraction"] > 0.99
    assert rbf["ratio"] < 0.97 and rbf["cos"] < 0.95 and rbf["unchanged_fraction"] > 0.99
    assert r32["restored"] and r16["restored"] and rbf["restored"]
    assert r16["eps_norm"] == pytest.approx(r32["eps_norm"], rel=0.1)  # the same eps, up to the weights' rounding
