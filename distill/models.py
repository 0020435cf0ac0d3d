"""Small CNNs for the demo, with the parts the distillation methods need exposed:
`forward_features` (last feature map), `pool` and `classifier` (KD^3 shares the
teacher's classifier), and BatchNorm layers (the BN-statistics OOD score reads them)."""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-BN-ReLU stages with max-pooling, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += _block(cin, w) + _block(w, w)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the `teacher` embedder's vectors."""
        return torch.flatten(self.pool(self.forward_features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def mnist_teacher(num_classes: int = 10) -> SmallCNN:
    """The demo teacher: about 65k parameters."""
    return SmallCNN(num_classes, widths=(16, 32, 64))


def tiny_student(num_classes: int = 10) -> SmallCNN:
    """A smaller student for the demo: about 17k parameters."""
    return SmallCNN(num_classes, widths=(8, 16, 32))
