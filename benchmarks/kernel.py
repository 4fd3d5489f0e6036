"""Benchmark section 1: the perturbation kernel alone (ascent + restore) against one Adam step.

Contenders, run alternately on the same parameters and gradients, each timed many times:

- ``loop``: the core's per-tensor kernel (``ASAM(..., foreach=False)``);
- ``foreach``: the core's ``torch._foreach_*`` kernel (``foreach=True``);
- ``reference``: the per-parameter loop of the published reference code, written here from its
  description (T, T*g and its norm per parameter; eps = rho T^2 g / norm stored per parameter, a fresh
  tensor every step; restore by subtracting eps), for context; which tensors are biases (T = 1) comes
  from the core's ``resolve_params``, so both sides normalize the same tensors;
- ``adam``: one step of fairseq's Adam on the same parameters (the cost the target is stated in).

    python scripts/benchmark.py --sections kernel
"""

from __future__ import annotations

import statistics
import time

import torch

from fairseq_asam.core import ASAM, resolve_params


def transformer_iwslt_model(src_vocab: int = 8848, tgt_vocab: int = 6632):
    """fairseq's transformer_iwslt_de_en with shared decoder input/output embeddings (39.5M parameters).

    The vocabulary sizes are those fairseq's IWSLT'14 recipe produces (10k joint BPE, separate dictionaries).
    """
    import argparse

    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, transformer_iwslt_de_en

    def dictionary(n):
        d = Dictionary()
        for i in range(n - len(d)):
            d.add_symbol(f"w{i}")
        return d

    args = argparse.Namespace(share_decoder_input_output_embed=True)
    transformer_iwslt_de_en(args)
    src, tgt = dictionary(src_vocab), dictionary(tgt_vocab)

    class _Task:
        source_dictionary, target_dictionary = src, tgt

    return TransformerModel.build_model(args, _Task())


def transformer_iwslt_params(src_vocab: int = 8848, tgt_vocab: int = 6632):
    """(name, parameter) of :func:`transformer_iwslt_model`."""
    return list(transformer_iwslt_model(src_vocab, tgt_vocab).named_parameters())


def wrn28_10_params():
    from fairseq_asam.vision.models import build_model

    return list(build_model("wrn28_10", 10).named_parameters())


def reference_kinds(named) -> dict[str, str]:
    """Which parameters the reference loop normalizes: the core's own rule, not a re-derived one.

    ``"none"`` (T = 1: biases, without bias normalization) or ``"element"`` (T = |w| + eta), from
    ``fairseq_asam.core.resolve_params`` with the paper's element-wise settings.
    """
    specs = resolve_params(named, adaptive=True, normalization="element", normalize_bias=False)
    return {spec.name: spec.kind for _, spec in specs}


def _reference_ascent(named, rho, eta, state, kinds):
    # The per-parameter loop of the reference implementations: allocates T, T*g and eps every step.
    wgrads = []
    for n, p in named:
        if p.grad is None:
            continue
        t_w = state.setdefault(n, {})
        if kinds[n] == "none":
            t = torch.ones_like(p)
        else:
            t = torch.abs(p) + eta
        t_w["t"] = t
        wgrads.append(torch.norm(t * p.grad, p=2))
    wgrad_norm = torch.norm(torch.stack(wgrads), p=2) + 1e-12
    for n, p in named:
        if p.grad is None:
            continue
        t = state[n]["t"]
        eps = t * t * p.grad * (rho / wgrad_norm)
        p.data.add_(eps)
        state[n]["eps"] = eps


def _reference_restore(named, state):
    for n, p in named:
        if n in state and "eps" in state[n]:
            p.data.sub_(state[n]["eps"])


def bench_kernel(named, *, device="cpu", repeats: int = 10, rho: float = 0.2, eta: float = 0.01):
    """Median seconds per call of each contender, measured alternately."""
    from fairseq.optim.adam import Adam as FairseqTorchAdam

    torch.manual_seed(0)
    params = []
    names = []
    for n, p in named:
        q = torch.nn.Parameter(p.detach().to(device).clone())
        params.append(q)
        names.append(n)
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    pairs = list(zip(names, params))
    adam = FairseqTorchAdam(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=1e-4)
    opts = {
        "loop": ASAM(pairs, adam, rho=rho, eta=eta, foreach=False),
        "foreach": ASAM(pairs, adam, rho=rho, eta=eta, foreach=True),
    }
    ref_state: dict = {}
    kinds = reference_kinds(pairs)

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def run(name):
        if name == "adam":
            adam.step()
        elif name == "reference":
            _reference_ascent(pairs, rho, eta, ref_state, kinds)
            _reference_restore(pairs, ref_state)
        else:
            opts[name].ascent_step()
            opts[name].restore()

    contenders = ["adam", "loop", "foreach", "reference"]
    times: dict[str, list[float]] = {c: [] for c in contenders}
    for r in range(repeats + 1):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            set_grads()
            sync()
            t0 = time.perf_counter()
            run(c)
            sync()
            if r > 0:  # the first round warms up allocators and caches
                times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}
    default = "foreach" if device != "cpu" else "loop"
    return {
        "n_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "seconds": med,
        "ratio_to_adam": {c: med[c] / med["adam"] for c in contenders},
        "default_kernel": default,
        "default_is_fastest_core_kernel": med[default] <= min(med["loop"], med["foreach"]),
    }
