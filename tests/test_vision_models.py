"""Every vision model: output shape, forward/backward on a 2-image batch, parameter count vs the published one."""

import pytest
import torch
import torchvision

from fairseq_asam.vision.models import MODELS, PyramidNet, ResNeXt29, ShakeDrop, build_model, count_parameters

# Published counts (10 classes): He et al. 2016 Table 6 (ResNet-20/32/56: 0.27M, 0.46M, 0.85M);
# Zagoruyko & Komodakis 2016 Table 1/4 (WRN-16-8: 11.0M, WRN-28-10: 36.5M) and the widely quoted 1.5M of WRN-28-2
# (Oliver et al. 2018); torchvision's ResNet-50: 25.6M (25,557,032).
PUBLISHED = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet56": 0.85e6,
    "wrn16_8": 11.0e6,
    "wrn28_2": 1.47e6,
    "wrn28_10": 36.5e6,
}


@pytest.mark.parametrize("name,published", sorted(PUBLISHED.items()))
def test_parameter_count_matches_paper(name, published):
    n = count_parameters(build_model(name, 10))
    assert abs(n - published) <= 0.005e6 if published < 1e6 else abs(n - published) / published < 0.005, n


def test_resnext_template_matches_xie_et_al():
    # Xie et al. 2017 Table 7: ResNeXt-29 8x64d has 34.4M parameters on CIFAR; the 32x4d of the ASAM paper
    # is the same template with cardinality 32 and bottleneck width 4.
    assert round(count_parameters(ResNeXt29(8, 64, 10)) / 1e6, 1) == 34.4
    assert count_parameters(build_model("resnext29_32x4d", 10)) == 4_775_754


def test_densenet121_is_torchvisions_with_a_cifar_stem():
    # DenseNet-BC-121 (Huang et al.): torchvision's densenet121 minus its ImageNet stem (7x7 conv + BN)
    # and 1000-way head, plus a 3x3 stem conv and a 10-way head.
    tv = count_parameters(torchvision.models.densenet121(weights=None))
    head_tv, head = 1024 * 1000 + 1000, 1024 * 10 + 10
    stem_tv, stem = 3 * 64 * 7 * 7 + 2 * 64, 3 * 64 * 3 * 3
    assert count_parameters(build_model("densenet121", 10)) == tv - head_tv - stem_tv + head + stem == 6_956_298


def test_vgg19_bn_is_torchvisions_features_with_one_linear_head():
    # torchvision's VGG-19-BN convolutional part (configuration "E"), built alone: the 4096-wide ImageNet
    # head is 120M parameters and slow to initialise.
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=True)
    assert count_parameters(build_model("vgg19_bn", 10)) == count_parameters(features) + 512 * 10 + 10 == 20_040_522


def test_resnet50_is_torchvision():
    assert count_parameters(build_model("resnet50", 1000)) == 25_557_032


def _conv_fc_params(model):
    return sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               for p in m.parameters())


@pytest.mark.parametrize("depth,alpha,published", [pytest.param(272, 200, 26.0e6, marks=pytest.mark.slow), (164, 270, 27.0e6)])
def test_pyramidnet_bottleneck_matches_han_et_al(depth, alpha, published):
    # Han et al. 2017, Table 4 (bottleneck, CIFAR, 10 classes): 272/alpha 200: 26.0M; 164/alpha 270: 27.0M.
    # Their counts are the convolution and linear weights (no BatchNorm affine parameters): 25,999,978 is
    # their 26.0M exactly; with the BatchNorm scales and shifts the model has 0.8% more. Built, not run.
    model = PyramidNet(depth, alpha, 10)
    assert abs(_conv_fc_params(model) - published) / published < 0.002
    assert abs(count_parameters(model) - published) / published < 0.01
    if depth == 272:
        assert _conv_fc_params(model) == 25_999_978 and count_parameters(model) == 26_210_842
        assert count_parameters(build_model("pyramidnet272", 10)) == 26_210_842  # ShakeDrop adds no parameters
        p_keep = [b.shake.p_keep for b in model.blocks]
        assert len(p_keep) == 90 and p_keep[-1] == pytest.approx(0.5) and p_keep[0] == pytest.approx(1 - 0.5 / 90)


def test_shakedrop_forward_backward_and_eval():
    torch.manual_seed(0)
    sd = ShakeDrop(0.6)
    x = torch.randn(64, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    out = sd(x)
    b, alpha, beta = sd.last_draws
    assert set(b.unique().tolist()) <= {0.0, 1.0} and 0.4 < b.mean() < 0.8
    assert alpha.min() >= -1 and alpha.max() <= 1 and alpha.min() < 0 < alpha.max() and 0 <= beta.min()
    torch.testing.assert_close(out, x * (b + alpha - b * alpha), rtol=0, atol=1e-15)  # Eq. 6, forward
    out.sum().backward()
    torch.testing.assert_close(x.grad, (b + beta - b * beta).expand_as(x), rtol=0, atol=0)  # Eq. 6, backward
    sd.eval()
    assert torch.equal(sd(x), x * 0.6)  # the expected value E[b + alpha - b alpha] = p_keep


def test_pyramidnet_shakedrop_is_random_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    model = PyramidNet(20, 16, 10).double()  # 6 bottleneck blocks: a fast stand-in for PyramidNet-272
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        e1, e2 = model(x), model(x)
    assert torch.equal(e1, e2)
    # Eval mode is ShakeDrop replaced by its expected value: the same net with each branch scaled by p_keep.
    ref = PyramidNet(20, 16, 10, shakedrop_pl=None).double()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    scales = []
    for blk, sd in zip(ref.blocks, model.blocks):
        blk.bn4.register_forward_hook(lambda m, i, o, s=sd.shake.p_keep: o * s)
        scales.append(sd.shake.p_keep)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), e1, rtol=0, atol=1e-12)
    assert scales[0] > scales[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "wrn28_10" else n  # 36M parameters
                                  for n in sorted(set(MODELS) - {"pyramidnet272"})])  # 272 layers: too slow here, see above
def test_forward_backward_two_images(name):
    torch.manual_seed(0)
    num_classes = 100 if name != "resnet50" else 7
    model = build_model(name, num_classes)
    size = 64 if name == "resnet50" else 32  # resnet50 pools adaptively; 64 px keeps the CPU test cheap
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_build_model_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        build_model("resnet18", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", 1)

