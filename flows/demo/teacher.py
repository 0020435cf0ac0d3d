"""Train the demo teacher: a small CNN on the MNIST split kept aside for it.

It is saved the way a user's teacher would be: a state_dict (loaded with
`weights_only=True`) beside a JSON spec naming its `module:factory` and preprocessing,
plus a torch.export program (teacher.pt2, whose sidecar is that spec). Its accuracy is measured
on the held-out MNIST test shard.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import nn
from torchvision.transforms import v2

from distill.model_files import save_exported_program
from distill.models import mnist_teacher
from distill.preprocess import image_to_tensor

INPUT_SIZE = 32
MEAN = STD = (0.5, 0.5, 0.5)
FACTORY = "distill.models:mnist_teacher"


def _train_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) normalised, as `image_to_tensor` would make them."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def evaluate_on_shards(model: nn.Module, shards: str, batch_size: int = 256) -> float:
    """Top-1 accuracy on a labelled WebDataset (image + `cls`)."""
    ds = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("png;jpg;jpeg;webp", "cls")
        .map_tuple(lambda im: image_to_tensor(im, INPUT_SIZE, MEAN, STD), int)
        .batched(batch_size)
    )
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for x, y in ds:
            pred = model(x).argmax(1)
            correct += int((pred == torch.as_tensor(y)).sum())
            total += len(y)
    return correct / max(total, 1)


def train_demo_teacher(demo_dir: str | Path, epochs: int = 20, seed: int = 0, log=print,
                       test_set: str = "eval/mnist-test.tar", classes: list[str] | None = None) -> dict:
    """Train on <demo_dir>/teacher/train.npz (images, int labels) and test on <demo_dir>/<test_set>.
    The benchmarks train their other-domain teachers through it too (their own split, test set, classes)."""
    demo_dir = Path(demo_dir)
    out = demo_dir / "teacher"
    data = np.load(out / "train.npz", allow_pickle=False)
    x, y = _train_tensor(data["images"]), torch.from_numpy(data["labels"]).long()
    torch.manual_seed(seed)
    model = mnist_teacher()
    augment = v2.RandomAffine(degrees=12, translate=(0.1, 0.1), scale=(0.85, 1.15))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = torch.stack([augment(img) for img in x[idx]])
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"teacher epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    acc = evaluate_on_shards(model, str(demo_dir / test_set))
    torch.save(model.state_dict(), out / "teacher.pt")
    save_exported_program(model, torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE), out / "teacher.pt2")
    spec = {
        "factory": FACTORY,
        "weights": "teacher.pt",
        "program": "teacher.pt2",
        "input_size": INPUT_SIZE,
        "mean": list(MEAN),
        "std": list(STD),
        "classes": list(classes) if classes else [str(i) for i in range(10)],
        "train_samples": int(len(x)),
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "test_accuracy": acc,
        "test_set": test_set,
    }
    (out / "teacher.json").write_text(json.dumps(spec, indent=2))
    return spec
