"""Small models for tests, loaded through the ordinary `module:factory` spec."""
import torch
from torch import nn


class CenteredThumbnail(nn.Module):
    """Features = the 12x12 thumbnail minus its mean: a fast, meaningful embedder for tests of
    near-duplicate search (distinct random images are far apart, re-encoded crops stay close)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(12)
        self.classifier = nn.Linear(3 * 12 * 12, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.flatten(self.pool(x), 1)
        return f - f.mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def thumbnail() -> CenteredThumbnail:
    torch.manual_seed(0)
    return CenteredThumbnail()


def no_linear() -> nn.Module:
    """A classifier without any Linear layer: no penultimate features to reach."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 10, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class DoubledLogits(nn.Module):
    """A Linear whose output is doubled: the logits are not W f + b of the Linear's input."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(3 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.fc(torch.flatten(self.pool(x), 1)) + 1


def doubled_logits() -> DoubledLogits:
    torch.manual_seed(0)
    return DoubledLogits()
