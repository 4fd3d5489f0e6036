"""The CIFAR models of the paper's Tables 2, 3 and 6 (Section 5.2, 5.4), plus torchvision's ResNet-50 (Table 4).

torchvision has no 32x32 versions of these networks, so they are written here, each after its paper:

    resnet20/32/56     He et al. 2016, Section 4.2 (16-32-64 channels, option-A identity shortcuts)
    wrn16_8, wrn28_2,  Zagoruyko & Komodakis 2016 (pre-activation basic blocks, 1x1 conv shortcuts);
    wrn28_10           WRN-16-8 is the network of the paper's Figure 4 (Section 5.1)
    vgg19_bn           Simonyan & Zisserman 2015, configuration E with BatchNorm, one 512->classes head
    densenet121        Huang et al. 2017, DenseNet-BC 6-12-24-16, growth 32, 3x3 stem (no stem pooling)
    resnext29_32x4d    Xie et al. 2017, Section 5.3 CIFAR template (output widths 256-512-1024)
    pyramidnet272      Han et al. 2017, PyramidNet-272 (alpha 200, bottleneck blocks) with ShakeDrop
                       (Yamada et al. 2019, p_L = 0.5): the last row of the paper's Tables 2 and 3
    resnet50           torchvision.models.resnet50 (ImageNet)

Parameter counts (10 classes) are checked in tests/test_vision_models.py against the published ones.

    python -c "from fairseq_asam.vision.models import build_model, count_parameters; \
print(count_parameters(build_model('resnet20', 10)))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "CIFAR_MODELS", "IMAGENET_MODELS", "PyramidNet", "ShakeDrop", "build_model", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _init(model: nn.Module) -> nn.Module:
    # He initialisation for rectifier networks (He et al. 2015), as in all the papers above.
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return model


# ---- ResNet-20/32/56 (He et al. 2016, CIFAR) -------------------------------------------------------


class _BasicBlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Option A of the paper: a parameter-free shortcut (subsample, zero-pad the new channels), which
        # is what gives the published 0.27M/0.46M/0.85M.
        sc = x
        if self.stride != 1:
            sc = sc[:, :, :: self.stride, :: self.stride]
        if self.pad:
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_BasicBlockA(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- Wide ResNet (Zagoruyko & Komodakis 2016) ------------------------------------------------------


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(_WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- VGG-19 with BatchNorm (configuration E) -------------------------------------------------------

_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg=_VGG19, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        # 32x32 input -> 1x1x512 after five poolings: one linear head, as in the common CIFAR VGG.
        self.classifier = nn.Linear(512, num_classes)
        _init(self)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---- DenseNet-BC-121 (Huang et al. 2017), CIFAR stem ----------------------------------------------


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, reduction: float = 0.5, num_classes: int = 10):
        super().__init__()
        c = 2 * growth
        # 3x3 stem without the ImageNet 7x7/stride-2 conv and max-pool: 32x32 images are already small.
        layers = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = int(c * reduction)
                layers.append(_Transition(c, out))
                c = out
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---- ResNeXt-29 (Xie et al. 2017, Section 5.3) -----------------------------------------------------


class _ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, stage_width: int, cardinality: int, base_width: int, stride: int):
        super().__init__()
        # The paper's CIFAR template: group width C*D with D = base_width * stage_width / 64, output 4x stage width.
        d = cardinality * (base_width * stage_width // 64)
        cout = 4 * stage_width
        self.conv1 = nn.Conv2d(cin, d, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(d)
        self.conv2 = nn.Conv2d(d, d, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(d)
        self.conv3 = nn.Conv2d(d, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNeXt29(nn.Module):
    def __init__(self, cardinality: int = 32, base_width: int = 4, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for i, sw in enumerate((64, 128, 256)):
            for j in range(3):  # 29 = 3 stages x 3 blocks x 3 layers + stem + classifier
                blocks.append(_ResNeXtBlock(cin, sw, cardinality, base_width, 2 if (i > 0 and j == 0) else 1))
                cin = 4 * sw
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- PyramidNet with ShakeDrop (Han et al. 2017; Yamada et al. 2019) --------------------------------


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch F(x) (Yamada et al. 2019, Eq. 6, image level).

    Training: forward (b + alpha - b alpha) F(x), backward (b + beta - b beta) dF, with b ~ Bernoulli(p_keep),
    alpha ~ U[-1, 1], beta ~ U[0, 1] drawn per image. All three are drawn in the forward (from the global
    generator of the input's device), so replaying that generator's state replays the whole update:
    fairseq_asam.vision.step does so between the two passes of SAM/ASAM. Evaluation: the expected value,
    E[b + alpha - b alpha] = p_keep, so ``p_keep * F(x)``, deterministic. The last draws are kept in
    ``last_draws`` (b, alpha, beta) for inspection.
    """

    def __init__(self, p_keep: float, alpha_range=(-1.0, 1.0), beta_range=(0.0, 1.0)):
        super().__init__()
        if not 0.0 <= p_keep <= 1.0:
            raise ValueError(f"ShakeDrop p_keep must be in [0, 1], got {p_keep}")
        self.p_keep, self.alpha_range, self.beta_range = float(p_keep), alpha_range, beta_range
        self.last_draws = None

    def forward(self, x):
        if not self.training:
            mean_alpha = sum(self.alpha_range) / 2
            return x * (self.p_keep + mean_alpha - self.p_keep * mean_alpha)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        b = (torch.rand(shape, device=x.device) < self.p_keep).to(x.dtype)
        alpha = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(*self.alpha_range)
        beta = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(*self.beta_range)
        self.last_draws = (b, alpha, beta)
        fwd = b + alpha - b * alpha
        bwd = b + beta - b * beta
        # Value x * fwd, gradient bwd (as in the reference implementations: the forward part is detached).
        return x * bwd + (x * fwd - x * bwd).detach()


class _PyramidBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, p_keep: float | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.shake = ShakeDrop(p_keep) if p_keep is not None else None
        self.stride = stride

    def forward(self, x):
        y = self.conv1(self.bn1(x))  # no ReLU before the first conv (Han et al., Fig. 6(d))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.bn4(self.conv3(F.relu(self.bn3(y))))
        if self.shake is not None:
            y = self.shake(y)
        # Parameter-free shortcut: 2x2 average pooling when downsampling, zero-padded new channels.
        sc = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        pad = y.shape[1] - sc.shape[1]
        if pad:
            sc = F.pad(sc, (0, 0, 0, 0, 0, pad))
        return y + sc


class PyramidNet(nn.Module):
    """Bottleneck PyramidNet for CIFAR (Han et al. 2017): widths grow by alpha / (3n) per block from 16.

    depth = 9n + 2. ``shakedrop_pl`` (p_L) sets ShakeDrop's keep probability of block l to
    1 - (l / L)(1 - p_L) (Yamada et al., linear decay); None: no ShakeDrop.
    """

    def __init__(self, depth: int = 272, alpha: float = 200, num_classes: int = 10, shakedrop_pl: float | None = 0.5):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"bottleneck PyramidNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        total = 3 * n
        add = alpha / total
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin, width = [], 16, 16.0
        for i in range(total):
            width += add
            p_keep = None if shakedrop_pl is None else 1.0 - (i + 1) / total * (1.0 - shakedrop_pl)
            stride = 2 if i in (n, 2 * n) else 1
            blocks.append(_PyramidBottleneck(cin, int(round(width)), stride, p_keep))
            cin = int(round(width)) * _PyramidBottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.blocks(self.bn1(self.conv1(x)))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


CIFAR_MODELS = {
    "resnet8": lambda nc: CifarResNet(8, nc),  # the smallest of the family: smoke tests and demos
    "resnet20": lambda nc: CifarResNet(20, nc),
    "resnet32": lambda nc: CifarResNet(32, nc),  # Table 6 (label noise)
    "resnet56": lambda nc: CifarResNet(56, nc),
    "vgg19_bn": lambda nc: VGG(num_classes=nc),
    "densenet121": lambda nc: DenseNet(num_classes=nc),
    "wrn16_8": lambda nc: WideResNet(16, 8, nc),  # Figure 4 (normalization, p, bias normalization vs rho)
    "wrn28_2": lambda nc: WideResNet(28, 2, nc),
    "wrn28_10": lambda nc: WideResNet(28, 10, nc),
    "resnext29_32x4d": lambda nc: ResNeXt29(32, 4, nc),
    "pyramidnet272": lambda nc: PyramidNet(272, 200, nc, shakedrop_pl=0.5),  # Tables 2-3, last row
}
IMAGENET_MODELS = {"resnet50": _resnet50}
MODELS = {**CIFAR_MODELS, **IMAGENET_MODELS}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return MODELS[name](num_classes)
