"""Small CNNs for the demo, with the parts the distillation methods need exposed:
`forward_features` (last feature map), `pool` and `classifier` (KD^3 shares the
teacher's classifier), BatchNorm layers (the BN-statistics OOD score reads them), and a stage
API for multi-spot methods (SAKD): `stages()` (their composition is `forward_features`),
`stage_channels` (each stage's output channels) and `head()` (feature map -> logits)."""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ClassifierHead(nn.Module):
    """pool -> flatten -> classifier, as one module (so it can be called on a feature map alone)."""

    def __init__(self, pool: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pool = pool
        self.classifier = classifier

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(feature_map), 1))


class SmallCNN(nn.Module):
    """conv-BN-ReLU stages with max-pooling, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        stage_ends: list[int] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += _block(cin, w) + _block(w, w)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            stage_ends.append(len(layers))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        self.stage_channels = tuple(widths)
        self._stage_ends = tuple(stage_ends)  # plain attribute: the state_dict keys stay `features.N.*`

    def stages(self) -> list[nn.Module]:
        """One module per width (its conv blocks and pooling), sharing this model's layers."""
        starts = (0,) + self._stage_ends[:-1]
        return [self.features[a:b] for a, b in zip(starts, self._stage_ends)]

    def head(self) -> nn.Module:
        """Feature map -> logits (pooling, flatten, classifier), sharing this model's layers."""
        return ClassifierHead(self.pool, self.classifier)

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
