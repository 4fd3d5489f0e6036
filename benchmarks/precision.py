"""What half precision does to the perturbation eps (paper Section 4) on fairseq's transformer_iwslt_de_en.

Two measurements, on the real model's parameter shapes and weights (fairseq's initialisation) and a real
per-token gradient (one forward/backward of label-smoothed cross-entropy on a random batch):

1. direction: the cosine similarity between eps computed under ``--fp16`` (the fp16 gradients fairseq's
   FP16Optimizer holds, scaled by the loss scale, prepared for the ascent by the ``translation_sam`` task)
   and eps computed in fp32 from the same gradient (issue 15, item 1);
2. size: ||w_eps - w|| / ||eps||, the part of the intended perturbation that survives the rounding of
   w + eps in each precision mode's weights (fp32, fp16, bf16; AMP and bf16 autocast keep fp32 weights),
   with the core's own ascent (``ASAM.ascent_step``) and restore (issue 15, item 2).

    python -m benchmarks.precision            # prints both tables (about a minute on one CPU core)
    python -m benchmarks.precision --device cuda
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.kernel import transformer_iwslt_model
from fairseq_asam.core import ASAM, SAM, perturbation, resolve_params

__all__ = [
    "applied_fraction",
    "cosine",
    "eps_cosine_fp16_vs_fp32",
    "fairseq_fp16_grads",
    "iwslt_gradient",
    "main",
]

FP16_MAX = 65504.0


def iwslt_gradient(model, *, sentences: int = 8, length: int = 16, seed: int = 0, label_smoothing: float = 0.1):
    """The per-token gradient (summed loss / target tokens, as fairseq's Trainer normalises it) of ``model``
    on a random batch; returns (list of fp32 gradient tensors in ``model.parameters()`` order, tokens).

    Real data is not needed for the gradient's scale: at initialisation the loss is about ln(vocab) on any
    tokens, and the gradient norm (about 3 here) is of the order fairseq logs early in training (gnorm).
    """
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    src_vocab = model.encoder.embed_tokens.num_embeddings
    tgt_vocab = model.decoder.embed_tokens.num_embeddings
    src = torch.randint(4, src_vocab, (sentences, length), generator=gen).to(dev)
    tgt = torch.randint(4, tgt_vocab, (sentences, length), generator=gen).to(dev)
    prev = torch.cat([torch.full((sentences, 1), 2, device=dev), tgt[:, :-1]], 1)  # eos first, as fairseq
    torch.manual_seed(seed)  # dropout masks
    model.train()
    model.zero_grad(set_to_none=True)
    out, _ = model(src, torch.full((sentences,), length, device=dev), prev)
    lprobs = torch.log_softmax(out.float(), -1)
    nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    # fairseq's label_smoothed_cross_entropy, summed over tokens (the Trainer divides by the token count)
    eps_i = label_smoothing / (lprobs.shape[-1] - 1)
    loss = ((1.0 - label_smoothing - eps_i) * nll + eps_i * smooth).sum()
    loss.backward()
    n = sentences * length
    grads = [p.grad.detach().float() / n if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
             for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, n


def fairseq_fp16_grads(grads, ntokens: int):
    """The fp16 gradients FP16Optimizer holds at ``optimizer_step`` for this per-token gradient, and the scale.

    They are the sum over tokens times the loss scale; fairseq's dynamic scaler doubles the scale until the
    gradients overflow, so the largest entry sits in [2**15, 2**16): the scale used here. Casting the fp32
    sum is the best an fp16 backward can do, so the comparison isolates what the ascent does with them.
    """
    amax = max(float(g.abs().max()) for g in grads) * ntokens
    scale = 2.0 ** math.floor(math.log2(FP16_MAX / amax))
    g16 = [(g.double() * (ntokens * scale)).half() for g in grads]
    if not all(torch.isfinite(g).all() for g in g16):
        raise AssertionError("the fp16 gradients overflowed at the chosen loss scale")
    return g16, scale


def cosine(a, b) -> float:
    """Cosine similarity of two lists of tensors, taken as one vector each, in float64."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.double().square().sum()) for x in a))
    nb = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def _norm(ts) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in ts))


def _kinds(named, adaptive: bool = True):
    specs = resolve_params(named, adaptive=adaptive, normalization="element", normalize_bias=False)
    return [s.kind for _, s in specs]


def eps_cosine_fp16_vs_fp32(named, grads, ntokens, prepare, *, rho=0.2, eta=0.01, p=2, adaptive=True, foreach=False):
    """cos(eps under --fp16, eps in fp32) for one gradient; ``prepare(fp16 grads)`` is what the fairseq task
    does to FP16Optimizer's gradients before the ascent (in place; called as ``prepare(grads, p)``). Weights: the fp16 model weights, and the
    same values in fp32 for the reference, so only the gradient path differs."""
    kinds = _kinds(named, adaptive)
    eta = eta if adaptive else 0.0
    w16 = [q.detach().half() for _, q in named]
    w32 = [w.float() for w in w16]
    g16, _ = fairseq_fp16_grads(grads, ntokens)
    prepare(g16, p)
    e16 = perturbation(w16, g16, rho=rho, eta=eta, p=p, kinds=kinds, foreach=foreach)
    e32 = perturbation(w32, [g.float() for g in grads], rho=rho, eta=eta, p=p, kinds=kinds, foreach=foreach)
    return cosine(e16, e32)


def applied_fraction(named, grads, dtype, *, rho=0.2, eta=0.01, p=2, adaptive=True, foreach=None):
    """||w_eps - w|| / ||eps|| and cos(w_eps - w, eps) when w is held in ``dtype``.

    eps is the intended perturbation, computed in float64 from the same weights (rounded to ``dtype``) and
    gradient; w_eps is what the core's ascent leaves in the parameters. Also checks that restore() gives
    back w bit for bit.
    """
    kinds = _kinds(named, adaptive)
    eta = eta if adaptive else 0.0
    params = [torch.nn.Parameter(q.detach().to(dtype).clone()) for _, q in named]
    names = [n for n, _ in named]
    w0 = [q.detach().clone() for q in params]
    want = perturbation([w.double() for w in w0], [g.double() for g in grads], rho=rho, eta=eta, p=p, kinds=kinds)
    for q, g in zip(params, grads):
        q.grad = g.to(dtype, copy=True)  # the ascent consumes .grad: never the caller's tensor
    if dtype == torch.float16:
        from fairseq_asam.fairseq_ext.task import fp16_grads_for_ascent

        fp16_grads_for_ascent([q.grad for q in params], p)
    base = torch.optim.SGD(params, lr=0.0)
    if adaptive:
        opt = ASAM(list(zip(names, params)), base, rho=rho, eta=eta, p=p, foreach=foreach)
    else:
        opt = SAM(list(zip(names, params)), base, rho=rho, p=p, foreach=foreach)
    if not opt.ascent_step():
        raise AssertionError("the ascent found a non-finite gradient")
    applied = [q.detach().double() - w.double() for q, w in zip(params, w0)]
    opt.restore()
    restored = all(torch.equal(q.detach(), w) for q, w in zip(params, w0))
    return {
        "ratio": _norm(applied) / _norm(want),
        "cos": cosine(applied, want),
        "eps_norm": _norm(want),
        "restored": restored,
        "unchanged_fraction": sum(int((a == 0).sum()) for a in applied) / sum(a.numel() for a in applied),
    }


# The precision modes of fairseq-train and asam-vision-train, by the dtype their weights (the tensors the
# ascent perturbs) are held in. AMP (--amp) and bf16 autocast cast inside the forward and keep fp32 weights.
MODES = [
    ("fp32", torch.float32, "fairseq default; vision --amp none"),
    ("AMP / bf16 autocast (fp32 weights)", torch.float32, "fairseq --amp; vision --amp fp16 or bf16"),
    ("fp16 weights", torch.float16, "fairseq --fp16, --memory-efficient-fp16"),
    ("bf16 weights", torch.bfloat16, "fairseq --bf16, --memory-efficient-bf16"),
]


def measure(device: str = "cpu", *, sentences: int = 8, length: int = 16, seed: int = 0) -> dict:
    """Both measurements on transformer_iwslt_de_en; returns a dict of the numbers."""
    from fairseq_asam.fairseq_ext.task import fp16_grads_for_ascent

    torch.manual_seed(seed)
    model = transformer_iwslt_model().to(device)
    grads, n = iwslt_gradient(model, sentences=sentences, length=length, seed=seed)
    named = list(model.named_parameters())
    out = {"n_params": sum(q.numel() for _, q in named), "tokens": n, "grad_norm": _norm(grads),
           "cosine": {}, "applied": {}}

    def old_prepare(g16, p):
        # What the task did before issue 15: fairseq's whole pending factor, 1 / (loss scale x tokens).
        _, scale = fairseq_fp16_grads(grads, n)
        torch._foreach_mul_(g16, 1.0 / (scale * n))

    for label, prep in (("before (x 1/(scale*tokens))", old_prepare), ("after (power-of-two rescale)", fp16_grads_for_ascent)):
        for p in (2, math.inf):
            for adaptive in (True, False):
                key = f"{label} | {'ASAM' if adaptive else 'SAM'} p={'inf' if p == math.inf else 2}"
                out["cosine"][key] = eps_cosine_fp16_vs_fp32(named, grads, n, prep, p=p, adaptive=adaptive)
    done = {}
    for label, dtype, flags in MODES:
        for adaptive, rho in ((True, 0.2), (False, 0.1)):
            if (dtype, adaptive) not in done:  # AMP and fp32 share their weights' dtype: one measurement
                done[(dtype, adaptive)] = applied_fraction(named, grads, dtype, rho=rho, adaptive=adaptive)
            out["applied"][f"{label} | {'ASAM rho 0.2' if adaptive else 'SAM rho 0.1'}"] = dict(done[(dtype, adaptive)], flags=flags)
    return out


def format_tables(res: dict) -> list[str]:
    lines = [
        f"transformer_iwslt_de_en, {res['n_params'] / 1e6:.1f}M parameters; real per-token gradient on "
        f"{res['tokens']} random tokens, ||g|| = {res['grad_norm']:.3g}",
        "",
        "| fp16 gradient preparation | method | cos(eps fp16, eps fp32) | 1 - cos |",
        "|---|---|---|---|",
    ]
    for key, c in res["cosine"].items():
        prep, method = key.split(" | ")
        lines.append(f"| {prep} | {method} | {c:.6f} | {1 - c:.2e} |")
    lines += [
        "",
        "| weights | method | ‖w_eps − w‖ / ‖eps‖ | cos(w_eps − w, eps) | entries left unchanged | restore exact | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in res["applied"].items():
        mode, method = key.split(" | ")
        lines.append(f"| {mode} | {method} | {r['ratio']:.4f} | {r['cos']:.4f} | {100 * r['unchanged_fraction']:.1f}% | "
                     f"{'yes' if r['restored'] else 'NO'} | {r['flags']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--length", type=int, default=16)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    print("\n".join(format_tables(measure(args.device, sentences=args.sentences, length=args.length))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
