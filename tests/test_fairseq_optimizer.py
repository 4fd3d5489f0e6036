"""The registered optimizers asam_adam / sam_adam: flags, defaults, checks, Adam's flags, bias detection.

Through fairseq's real parser (``options.parse_args_and_arch``) and real config objects; no training. ::

    .venv/bin/pytest tests/test_fairseq_optimizer.py
"""

import math

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim import build_optimizer
from fairseq_helpers import tiny_train_args
from omegaconf import OmegaConf, open_dict

from fairseq_asam import Perturbation
from fairseq_asam.fairseq_ext.optimizer import FairseqASAMAdam, FairseqSAMAdam, find_sharpness_optimizer


def _parse(*extra, tmp="/nonexistent/save"):
    parser = options.get_training_parser()
    # --task translation_sam: asam_adam/sam_adam refuse a task that does not run the two-pass update.
    return options.parse_args_and_arch(parser, tiny_train_args("/nonexistent/data-bin", tmp, "--task",
                                                               "translation_sam", *extra))


def _cfg(*extra):
    return convert_namespace_to_omegaconf(_parse(*extra))


def test_defaults_follow_the_paper_iwslt_choice():
    a = _parse("--optimizer", "asam_adam")
    assert (a.asam_rho, a.asam_eta, a.asam_p, a.asam_normalization, a.asam_normalize_bias) == (0.2, 0.01, 2.0, "element", False)
    s = _parse("--optimizer", "sam_adam")
    assert (s.asam_rho, s.asam_p) == (0.1, 2.0)
    assert not hasattr(s, "asam_eta")  # SAM has no normalization operator
    assert _parse("--optimizer", "asam_adam", "--asam-p", "inf").asam_p == math.inf


def test_help_names_the_paper_defaults():
    # fairseq-train --optimizer asam_adam --help lists a registered optimizer's flags only in its own
    # group; build that group the way fairseq does and read it.
    import argparse

    for cls, rho in ((FairseqASAMAdam, "0.2"), (FairseqSAMAdam, "0.1")):
        parser = argparse.ArgumentParser()
        cls.add_args(parser)
        text = " ".join(parser.format_help().split())
        assert f"(default {rho}: the paper's" in text and "IWSLT'14" in text
        assert "--adam-betas" in text and "--weight-decay" in text  # fairseq's Adam flags are all still there


@pytest.mark.parametrize(
    "opt,flag,value,message",
    [
        ("asam_adam", "--asam-rho", "-1", "--asam-rho must be > 0, got -1"),
        ("asam_adam", "--asam-rho", "0", "--asam-rho must be > 0, got 0"),
        ("sam_adam", "--asam-rho", "nan", "--asam-rho must be a finite number > 0, got nan"),
        ("asam_adam", "--asam-rho", "inf", "--asam-rho must be a finite number > 0, got inf"),
        ("asam_adam", "--asam-rho", "big", "--asam-rho must be a number, got 'big'"),
        ("asam_adam", "--asam-eta", "-0.1", "--asam-eta must be a finite number >= 0, got -0.1"),
        ("asam_adam", "--asam-p", "1", "--asam-p must be 2 or inf, got 1"),
        ("sam_adam", "--asam-p", "3", "--asam-p must be 2 or inf, got 3"),
        ("asam_adam", "--asam-normalization", "layer", "invalid choice: 'layer'"),
    ],
)
def test_bad_flag_is_an_argparse_error_naming_the_flag(capsys, opt, flag, value, message):
    with pytest.raises(SystemExit) as e:
        _parse("--optimizer", opt, flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and message in err


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("optimizer", "asam_rho", -1.0, "--asam-rho must be > 0, got -1"),
        ("optimizer", "asam_eta", float("nan"), "--asam-eta must be a finite number >= 0, got nan"),
        ("optimizer", "asam_p", 1.0, "--asam-p must be 2 or inf, got 1"),
        ("optimizer", "asam_normalization", "layer", "full_key: asam_normalization"),
        ("optimization", "use_bmuf", True, "does not support --use-bmuf"),
        ("distributed_training", "ddp_backend", "fully_sharded",
         "does not support --ddp-backend fully_sharded: fairseq's sharding is fairscale's FSDP"),
        ("distributed_training", "ddp_backend", "slowmo", "does not support --ddp-backend slowmo"),
    ],
)
def test_bad_config_value_stops_the_build(section, key, value, message):
    # The fairseq-hydra-train path (an inline optimizer block, no argparse): the value is refused when the
    # config is merged with the optimizer's dataclass or when the optimizer is built, before any update.
    from fairseq.dataclass.initialize import add_defaults

    root = _cfg("--optimizer", "adam")
    with open_dict(root):
        root.optimizer = OmegaConf.create({"_name": "asam_adam"})
        root[section][key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        add_defaults(root)
        build_optimizer(root.optimizer, [torch.nn.Parameter(torch.zeros(2, 2))])


def test_adam_flags_keep_working():
    cfg = _cfg("--optimizer", "asam_adam", "--adam-betas", "(0.8, 0.95)", "--adam-eps", "1e-6",
               "--weight-decay", "0.1", "--lr", "0.003", "--clip-norm", "0.7")  # fmt: skip
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(3, 3))])
    assert isinstance(opt, FairseqASAMAdam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.1
    assert group["lr"] == 0.003
    assert opt.clip_norm == 0.7  # read from --clip-norm through the config interpolation
    assert find_sharpness_optimizer(opt) is opt


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)


@pytest.mark.parametrize(
    "extra,want",
    [
        ([], {"lin.weight": "element", "lin.bias": "none", "norm.weight": "element", "norm.bias": "none"}),
        (["--asam-normalize-bias"], {"lin.weight": "element", "lin.bias": "element", "norm.weight": "element", "norm.bias": "element"}),
    ],
)
def test_perturbation_uses_parameter_names_for_biases(extra, want):
    net = _Net()
    cfg = _cfg("--optimizer", "asam_adam", *extra)
    opt = build_optimizer(cfg.optimizer, list(net.parameters()))
    core = opt.make_perturbation(net)
    assert isinstance(core, Perturbation) and core.adaptive
    assert core.param_groups[0]["rho"] == 0.2 and core.param_groups[0]["eta"] == 0.01
    assert {s.name: s.kind for _, s in core.named_specs()} == want
    drv = opt.build_driver(opt, net)
    assert drv.schedule is opt.schedule and {s.name: s.kind for _, s in drv.perturbation.named_specs()} == want


def test_sam_perturbation_is_identity_normalized():
    net = _Net()
    opt = build_optimizer(_cfg("--optimizer", "sam_adam", "--asam-p", "inf").optimizer, list(net.parameters()))
    core = opt.make_perturbation(net)
    assert isinstance(core, Perturbation) and not core.adaptive
    assert core.param_groups[0]["p"] == math.inf and core.param_groups[0]["rho"] == 0.1
    assert {s.kind for _, s in core.named_specs()} == {"none"}
    assert isinstance(opt, FairseqSAMAdam)


def test_step_outside_the_two_pass_task_is_refused():
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer(_cfg("--optimizer", "asam_adam").optimizer, [p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="add --task translation_sam"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(2))
    with opt.descent():
        opt.step()
    assert not torch.equal(p.detach(), torch.ones(2))


def test_hydra_style_config_builds():
    # An inline `optimizer: {_name: asam_adam, ...}` block: defaults from the dataclass fill the rest.
    root = _cfg("--optimizer", "adam")
    with open_dict(root):
        root.optimizer = OmegaConf.create({"_name": "asam_adam", "asam_rho": 0.3, "adam_betas": "(0.9, 0.98)"})
    from fairseq.dataclass.initialize import add_defaults

    add_defaults(root)
    opt = build_optimizer(root.optimizer, [torch.nn.Parameter(torch.zeros(2, 2))])
    assert (opt.rho, opt.eta, opt.p, opt.normalization) == (0.3, 0.01, 2.0, "element")
