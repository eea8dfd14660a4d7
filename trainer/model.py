"""DeepLabv3+ on a ResNet backbone, with MITrans for the mixed features. Pure PyTorch, no I/O.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..4, downsample.0/1), so an ImageNet
state dict in that format loads into `backbone` as it is (see `load_backbone_weights`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


# name -> (block, blocks per stage, stage widths)
BACKBONES = {
    "tiny": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512)),
}


class ResNet(nn.Module):
    """Returns (low-level features at stride 4, high-level features at `output_stride`)."""

    def __init__(self, name: str, output_stride: int = 16):
        super().__init__()
        block, layers, widths = BACKBONES[name]
        # the last stages trade stride for dilation so the output keeps `output_stride`
        strides, dilations = ((1, 2, 2, 1), (1, 1, 1, 2)) if output_stride == 16 else ((1, 2, 1, 1), (1, 1, 2, 4))
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, widths[0], layers[0], strides[0], dilations[0])
        self.layer2 = self._stage(block, widths[1], layers[1], strides[1], dilations[1])
        self.layer3 = self._stage(block, widths[2], layers[2], strides[2], dilations[2])
        self.layer4 = self._stage(block, widths[3], layers[3], strides[3], dilations[3])
        self.low_channels = widths[0] * block.expansion
        self.high_channels = widths[3] * block.expansion

    def _stage(self, block, planes, blocks, stride, dilation):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        first_dilation = max(1, dilation // 2)
        layers = [block(self.inplanes, planes, stride, first_dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def _conv_bn_relu(cin, cout, kernel, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout, 1))
        self.project = nn.Sequential(_conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(0.1))

    def forward(self, x):
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class MITrans(nn.Module):
    """Embedded-Gaussian non-local block: F' = F + W_o softmax(theta(F) phi(F)^T / sqrt(d)) g(F).

    Pixels attend to all pixels of the same (mixed) image, so pixels of one class pull together.
    W_o starts at zero, so the block starts as the identity and training decides how much to use it.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        inner = max(1, channels // reduction)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # B x HW x d
        k = self.phi(x).flatten(2).transpose(1, 2)
        v = self.g(x).flatten(2).transpose(1, 2)
        if x.is_cuda:  # CUDA's fused kernels need a heads dimension and contiguous rows (else the math kernel
            # builds the HW x HW matrix: 50 ms against 3 ms at R101/512 on an H200); the CPU keeps the call
            # that its study tables were made with, bit for bit
            q, k, v = (t.unsqueeze(1).contiguous() for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).reshape(b, h * w, -1)  # softmax(q k^T / sqrt(d)) v
        return x + self.out(attended.transpose(1, 2).reshape(b, -1, h, w))


class DeepLabV3Plus(nn.Module):
    """Segmenter f = classifier(decoder(encoder(x))) exposing the pieces GuidedMix needs:
    `encode` (backbone), `embed` (pooled, L2-normalised encoder features), `decode` (features before the
    classifier), `classify`, and `mitrans` (applied by the objective to the mixed features only)."""

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 16,
                 aspp_channels: int = 256, decoder_channels: int = 256, aspp_rates: Sequence[int] = (6, 12, 18),
                 mitrans_reduction: int = 2):
        super().__init__()
        self.backbone = ResNet(backbone, output_stride)
        rates = [r * (16 // output_stride) for r in aspp_rates]
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, rates)
        low = max(8, decoder_channels // 5)  # 48 of 256 in the paper's decoder
        self.reduce = _conv_bn_relu(self.backbone.low_channels, low, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_channels + low, decoder_channels, 3),
                                  _conv_bn_relu(decoder_channels, decoder_channels, 3))
        self.mitrans = MITrans(decoder_channels, mitrans_reduction)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def encode(self, x):
        return self.backbone(x)

    @staticmethod
    def embed(high: torch.Tensor) -> torch.Tensor:
        return F.normalize(high.mean(dim=(2, 3)), dim=1)

    def decode(self, low, high):
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.reduce(low)], 1))

    def classify(self, features, size):
        return F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)

    def forward(self, x, use_mitrans: bool = False):
        """Logits at input size. Inference never uses MITrans; the objective asks for it on mixed images."""
        features = self.decode(*self.encode(x))
        if use_mitrans:
            features = self.mitrans(features)
        return self.classify(features, x.shape[-2:])

    def param_groups(self, head_lr_mult: float = 1.0) -> list[dict]:
        """Backbone at the base lr, everything after it at `head_lr_mult` times (10x in some configs)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": head_lr_mult}]


def build_model(cfg_model, num_classes: int, mitrans_reduction: int = 2) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, cfg_model.backbone, cfg_model.output_stride, cfg_model.aspp_channels,
                         cfg_model.decoder_channels, cfg_model.aspp_rates, mitrans_reduction)


def load_backbone_weights(model: DeepLabV3Plus, state_dict: dict) -> None:
    """Load a torchvision-format ResNet state dict (the classifier `fc.*` is dropped)."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"backbone weights do not match this backbone ({str(e).splitlines()[1].strip()})") from None
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ValueError(f"backbone weights do not match this backbone (first mismatch: {first})")
