"""Train the demo's small CLIP on the crawl's image-caption pairs, then use it like any user's
checkpoint (`--pretrained PATH`). No pretrained CLIP can be downloaded offline; this gives the
open_clip path a checkpoint that carries meaning.

The model is an open_clip config of ours (`webdistill-tiny-clip`: ViT at 32 px, patch 4, width
128, 4 layers; text width 128, 4 layers). The loss is open_clip's `ClipLoss` on image-caption
pairs plus the same loss between two random crops of each image (SLIP-style, Mu et al. 2022),
which makes the image tower tell instances apart: near-duplicates land close together.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchvision.transforms import v2

from curation.embedders import MODEL_CONFIGS, Geometry
from curation.shard_reader import load_images, shard_jobs
from curation.workspace import Workspace, atomic_path

MODEL = "webdistill-tiny-clip"


def _captions(ws: Workspace, jobs) -> list[str]:
    caps: list[str] = []
    for job in jobs:
        t = pq.read_table(ws.root / "samples" / f"{job.shard}.parquet", columns=["idx", "caption"]).sort_by("idx")
        caps += [c or "" for c in t["caption"].to_pylist()]
    return caps


def train_demo_clip(ws: Workspace, out: str | Path, steps: int = 100, batch_size: int = 256,
                    max_samples: int = 30_000, seed: int = 0, text_weight: float = 1.0, log=print) -> dict:
    """Train for a fixed number of steps (reproducible, unlike a time budget) on up to `max_samples`
    accepted samples. 100 steps of 256 take about 2.5 minutes on 2 cores."""
    import open_clip
    from open_clip.loss import ClipLoss

    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that a model built to be trained has no weights
    try:
        model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(MODEL)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)

    jobs = shard_jobs(ws)
    captions = _captions(ws, jobs)
    offsets = np.cumsum([0] + [len(j.keys) for j in jobs])
    images = torch.zeros((offsets[-1], 3, size, size), dtype=torch.uint8)
    for job_idx, rows, x, _ in load_images(jobs, Geometry(size, v2.Resize((size, size), antialias=True)),
                                           desc="decode for CLIP"):
        images[torch.as_tensor(offsets)[job_idx] + rows] = x
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(images))[:max_samples]
    tokens = tokenizer([captions[i] for i in pool])
    images = images[pool]

    # the changes a re-upload makes: crops, rescaling (JPEG loss mostly vanishes at 32 px)
    augment = v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    start, step, seen, epoch = time.perf_counter(), 0, 0, 0
    history = []
    while step < steps:
        order = torch.randperm(len(images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            views = [torch.stack([augment(im) for im in images[idx]]) for _ in range(2)]
            views = [((v.float() / 255.0) - mean) / std for v in views]
            feats_a = model.encode_image(views[0], normalize=True)
            feats_b = model.encode_image(views[1], normalize=True)
            scale = model.logit_scale.exp()
            loss = loss_fn(feats_a, feats_b, scale)
            if text_weight:
                loss = loss + text_weight * loss_fn(feats_a, model.encode_text(tokens[idx], normalize=True), scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            step, seen = step + 1, seen + len(idx)
            if step % 20 == 0:
                history.append(round(loss.item(), 4))
                log(f"clip step {step}: loss {loss.item():.3f} ({seen / (time.perf_counter() - start):.0f} pairs/s)")
            if step >= steps:
                break
        epoch += 1
    out = Path(out)
    path = out / f"{MODEL}.pt"
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    info = {"model": MODEL, "checkpoint": str(path), "steps": step, "pairs_seen": seen, "train_samples": len(images),
            "seconds": round(time.perf_counter() - start, 1), "loss_every_20_steps": history}
    (out / "clip.json").write_text(json.dumps(info, indent=2))
    return info
