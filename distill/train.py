"""The distillation job: `python -m distill.train CONFIG` alone, or under torchrun (one process per rank).

- Distributed: initialised from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) when it is
  there, else one process. gloo on CPU, nccl on GPU. Only the CPU/gloo path is tested here (our
  machines have no GPU); the GPU path (device per LOCAL_RANK, nccl, pinned memory) is kept as written.
- Faults: a collective that waits `collective_timeout_s` for a rank that hung, or one whose peer died,
  fails the waiting ranks with one line (PeerLost); the last checkpoint stays as it was. Nothing
  collective follows the last checkpoint, so no rank can be left in a collective a peer has left.
- The teacher is `stored` (its logits come from the shards: no teacher forward pass) or `live`
  (loaded with `distill.spec.load_model`, frozen; the distiller runs it).
- DDP wraps the distiller through `TrainForward`, so its training forward goes through DDP's __call__.
  Buffers are not synced at each forward: KD^3 counts per rank and sums in `on_epoch_end`.
- Checkpoints every `checkpoint_every` steps, at every epoch end and on SIGTERM/SIGINT: model,
  optimizer and distiller state, epoch, step in epoch, global step, and every rank's RNG states and
  buffers; written atomically, read with `weights_only=True`. A rerun of the same config resumes:
  the epoch's data stream is fast-forwarded past the consumed batches (no compute) and the RNGs are
  restored, so the loss trajectory is the one of an uninterrupted run.
- Writes metrics.jsonl, evaluates on the optional labelled eval set after every epoch (each rank a
  share of it), and exports
  the student: student.pt (state_dict), student.json (a spec that rebuilds it from the registry and
  loads student.pt with weights_only: safe to load, feature API kept; summary.json's `checkpoint`),
  student.pt2 (a torch.export program: portable, logits only) and summary.json. Model code from a
  spec (TorchScript, a module:factory outside the allowlist) runs only with `trust_model_code`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from curation.errors import WebdistillError, first_line
from curation.files import atomic_path
from curation.progress import bar_disabled

from .config import ConfigError, DistillConfig, load_config
from .data import (
    DataError,
    EpochPlan,
    EpochStream,
    Manifest,
    Preprocess,
    check_shards,
    derive_seed,
    epoch_batches,
    eval_batches,
    load_manifest,
    pool_batches,
    start_worker_server,
)
from .losses import Distiller, LogitDistiller, PoolPass, build_distiller
from .model_files import save_exported_program
from .spec import ModelSpecError, load_model
from .students import build_student

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class JobError(WebdistillError, RuntimeError):
    """The run cannot go on as configured (a checkpoint of another config, a teacher that does not fit...)."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: the job checkpointed and stops."""


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the job, and the few collectives the job uses."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 300.0  # how long a collective waits for the other ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor); the identity with one process."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (picklable objects; CPU tensors)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_copy(self, module: nn.Module) -> nn.Module:
        """`module` as rank 0 holds it: with several ranks a copy with rank 0's buffers (DDP keeps the
        parameters equal but not the buffers, such as BatchNorm statistics); alone, `module` itself."""
        if self.world == 1:
            return module
        module = copy.deepcopy(module)
        with torch.no_grad():
            for buf in module.buffers():
                dist.broadcast(buf, src=0)
        return module


def init_distributed(timeout_s: float = 300.0) -> Dist:
    """From torchrun's environment when present; else one process. A collective that waits longer than
    `timeout_s` for another rank (hung, stopped, or far behind) fails on the ranks that wait."""
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():  # untested here (no GPU): one GPU per local rank, NCCL
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout_s)


class PeerLost(WebdistillError, RuntimeError):
    """A collective failed because another rank died or hung; the last checkpoint is intact."""


def peer_failure(exc: BaseException, d: Dist) -> PeerLost | None:
    """The one-line PeerLost for a communication backend's error (gloo raises plain RuntimeErrors),
    else None (a bug in this rank keeps its traceback)."""
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or re.search(r"gloo|NCCL|ProcessGroup", text)):
        return None
    if re.search(r"[Tt]imed out|[Tt]imeout", text):
        return PeerLost(f"rank {d.rank} waited {d.timeout_s:g} s for the other ranks (config key "
                        "'collective_timeout_s'): a rank hung or stopped; rerun to resume from the last checkpoint")
    if not re.search(r"Connection (closed|reset)|Broken pipe|peer", text):
        return None  # the backend refused this rank's own call: a bug, with its traceback
    why = re.sub(r"^\[[^\]]*\] ", "", first_line(exc)).split(". This is typically")[0]
    return PeerLost(f"rank {d.rank} lost another rank ({why}): it died or was killed; rerun to resume "
                    "from the last checkpoint")


def leave_process_group() -> None:
    """Take the process group down. This rank's part is over by now (done, or failed with its own
    error line), so a peer that left first is no reason to fail the rank: one warning line."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - teardown only: the result is on disk or the error reported
        say(f"distill: warning: leaving the process group: {first_line(exc)}")


def exit_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so killing torchrun (even its whole process
    group) would leave the ranks training on. A rank whose launcher is gone stops at once, as if it
    had been killed with it; the rerun resumes from the last checkpoint."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank RNGs for what varies between ranks (augmentations, Gumbel noise)."""
    s = derive_seed(seed, rank, 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)},
            "python": {"version": int(version), "state": list(state), "gauss": gauss}}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# -- files --------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl, written by rank 0 only; a resume cuts it back to the checkpoint's line count."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.lines = path, enabled, 0

    def truncate(self, lines: int) -> None:
        if self.enabled and self.path.is_file():
            kept = self.path.read_text().splitlines(keepends=True)[:lines]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(kept))
        self.lines = lines

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.lines += 1


# -- building -----------------------------------------------------------------------------------
def resolve_preprocess(cfg: DistillConfig, manifest: Manifest, teacher_spec: str | None) -> Preprocess:
    """input_size / mean / std: the config's, else the manifest's, else the teacher spec's."""
    size, mean, std = cfg.input_size, cfg.mean, cfg.std
    size, mean, std = size or manifest.input_size, mean or manifest.mean, std or manifest.std
    if None in (size, mean, std):
        if teacher_spec is None:
            raise ConfigError("config keys 'input_size'/'mean'/'std' are needed: neither the manifest nor a "
                              "'teacher' spec gives them")
        loaded = load_model(teacher_spec, cfg.trust_model_code)
        size, mean, std = size or loaded.input_size, mean or loaded.mean, std or loaded.std
    return Preprocess(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def load_live_teacher(spec: str | None, prep: Preprocess, num_classes: int,
                      trust_model_code: bool = False) -> nn.Module:
    if spec is None:
        raise ConfigError("teacher_mode: live needs a 'teacher' spec (none in the config or the manifest)")
    teacher = load_model(spec, trust_model_code).module
    with torch.no_grad():
        out = teacher.eval()(torch.zeros(2, 3, prep.size, prep.size))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise JobError(f"teacher {spec} gives outputs of shape {tuple(out.shape)}, the selection has "
                       f"{num_classes} classes")
    return teacher


def make_optimizer(cfg: DistillConfig, groups: list) -> torch.optim.Optimizer:
    """The job's optimizer over the distiller's parameter groups (`Distiller.optimizer_groups`); a group's
    `lr_scale` (default 1) scales the job's learning rate and schedule, its `weight_decay` overrides the job's."""
    groups = [{"lr_scale": 1.0, **g, "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The job's learning rate for this step, times each group's `lr_scale` (SAKD's policy: 0.5)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(cfg: DistillConfig, step: int, total: int) -> float:
    """The learning rate of 0-based `step` of `total` (a function of the step: nothing to checkpoint)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


class TrainForward(nn.Module):
    """`forward` = the distiller's `forward_train`: DDP's gradient hooks need the training forward to
    go through its own __call__."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, images, teacher_logits, sample_weights):
        return self.distiller.forward_train(images, teacher_logits, sample_weights)


def evaluate(model: nn.Module, shards, prep: Preprocess, batch_size: int, d: Dist) -> tuple[float, int]:
    """Top-1 accuracy of rank 0's `model` (the student that is exported) on a labelled eval set, and its
    size. Every rank scores its share of the samples (no rank idles in a collective while another
    evaluates) and the counts are summed. May leave `model` in eval mode (the next epoch puts the
    distiller back in train mode, its teacher kept in eval)."""
    model = d.main_copy(model).eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in eval_batches(shards, prep, batch_size, part=(d.rank, d.world)):
            correct += int((model(x.to(d.device)).argmax(1).cpu() == y).sum())
            total += len(y)
    correct, total = (int(v) for v in d.all_reduce(torch.tensor([correct, total], device=d.device)).cpu())
    if total == 0:
        raise DataError(f"eval set {shards} has no labelled samples (image + cls)")
    return correct / total, total


def student_spec(distiller: Distiller, student: str, num_classes: int) -> dict:
    """What student.json needs to rebuild the deployable student from the registry."""
    from .losses.kd3 import KD3Student

    spec = {"factory": student, "num_classes": num_classes, "weights": "student.pt"}
    deployable = distiller.deployable()
    if isinstance(deployable, KD3Student):  # backbone + projector + the teacher's pool and classifier
        spec["kd3"] = {"teacher_channels": deployable.classifier.in_features,
                       "factor": int(distiller.params["factor"])}
    return spec


def export_student(distiller: Distiller, out: Path, prep: Preprocess, classes: list[str], extra: dict,
                   student: str, num_classes: int, trust_model_code: bool = False) -> Path | None:
    """student.pt (state_dict), student.json (spec + preprocessing) and student.pt2 (torch.export).
    Returns the checkpoint to record: student.json when it loads back to the same outputs (it keeps
    the feature API), else student.pt2, else None. An export that fails costs a warning, not the run."""
    model = copy.deepcopy(distiller.deployable()).cpu().eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / "student.pt") as tmp:
        torch.save(state, tmp)
    spec = student_spec(distiller, student, num_classes) | {
        "input_size": prep.size, "mean": list(prep.mean), "std": list(prep.std), "classes": classes, **extra}
    with atomic_path(out / "student.json") as tmp:
        tmp.write_text(json.dumps(spec, indent=2))
    example = torch.randn(2, 3, prep.size, prep.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(example)
    checkpoint = None
    try:
        save_exported_program(model, example, out / "student.pt2")
        checkpoint = out / "student.pt2"
    except Exception as exc:  # noqa: BLE001 - torch.export cannot trace every model
        say(f"distill: warning: student.pt2 not written: {first_line(exc)}")
    try:
        with torch.no_grad():
            rebuilt = load_model(str(out / "student.json"), trust_model_code).module(example)
        if torch.allclose(rebuilt, want, atol=1e-5, rtol=1e-4):
            checkpoint = out / "student.json"
    except ModelSpecError as exc:
        say(f"distill: warning: student.json does not rebuild the student: {first_line(exc)}")
    return checkpoint


# -- the job ------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM/SIGINT; the job checks it between steps, on every rank at once."""

    def __init__(self):
        self.set = False

    def install(self) -> dict:
        """Install the handlers; returns the previous ones (an in-process run puts them back)."""
        return {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.set = True


def load_initial_weights(model: nn.Module, path: str) -> None:
    """The deployable student's state_dict from an earlier run (weights_only, refusing code)."""
    from .spec import ModelSpecError, load_state_dict

    try:
        model.load_state_dict(load_state_dict(path))
    except (ModelSpecError, RuntimeError) as exc:
        raise ConfigError(f"config key 'init_from': {path} does not fit this student: "
                          f"{first_line(exc)}") from exc


class Job:
    def __init__(self, cfg: DistillConfig, world: Dist):
        self.cfg, self.d = cfg, world
        self.out = cfg.out_dir
        self.manifest = load_manifest(cfg.selection)
        self.teacher_spec = cfg.teacher or self.manifest.teacher
        self.prep = resolve_preprocess(cfg, self.manifest, self.teacher_spec)
        self.stored = cfg.teacher_mode == "stored"
        check_shards(self.manifest, self.prep, need_logits=self.stored)
        per_rank = cfg.samples_per_epoch or self.manifest.total // world.world
        self.steps = per_rank // cfg.batch_size
        if self.steps == 0:
            raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) exceeds the samples per rank and epoch "
                              f"({per_rank}): lower it, or set 'samples_per_epoch'")
        self.total_steps = cfg.epochs * self.steps
        num_classes = self.manifest.num_classes
        teacher = None if self.stored else load_live_teacher(self.teacher_spec, self.prep, num_classes,
                                                             cfg.trust_model_code)
        torch.manual_seed(cfg.seed)  # the same initial student on every rank
        student = build_student(cfg.student, num_classes, cfg.trust_model_code)
        self.distiller = build_distiller(cfg.loss, student, teacher, num_classes).to(world.device)
        if cfg.init_from:  # a new round continues from the previous round's student
            load_initial_weights(self.distiller.deployable(), cfg.init_from)
        self.optimizer = make_optimizer(cfg, self.distiller.optimizer_groups())
        self.forward = TrainForward(self.distiller)
        if world.world > 1:
            find_unused = cfg.find_unused_parameters
            if find_unused is None:  # logit methods use every parameter; feature methods may skip some per step
                find_unused = not isinstance(self.distiller, LogitDistiller)
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=find_unused)
        seed_rank(cfg.seed, world.rank)
        # what a checkpoint must match to be resumed: the config and the selection it reads
        selection = Path(cfg.selection).read_bytes()
        self.selection_sha256 = hashlib.sha256(selection).hexdigest()  # lineage: the exact selection trained on
        self.run_hash = hashlib.sha256(cfg.content_hash().encode() + selection).hexdigest()[:16]
        # a checkpoint from before content hashes is the same run when its paths are this config's
        self.resumable = {self.run_hash, hashlib.sha256(cfg.trajectory_hash().encode() + selection).hexdigest()[:16]}
        self.metrics = MetricsLog(self.out / METRICS, world.main)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_started = False
        self.seconds = 0.0
        self.eval_accuracy: float | None = None
        self.resume_state: dict | None = None

    # -- checkpoints --------------------------------------------------------------------------
    def buffers(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.distiller.named_buffers()}

    def save_checkpoint(self) -> None:
        """Collective: every rank sends its RNG states and buffers; rank 0 writes."""
        rngs, buffers = self.d.gather(capture_rng()), self.d.gather(self.buffers())
        if not self.d.main:
            return
        state = {"format": 1, "run_hash": self.run_hash, "world_size": self.d.world,
                 "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "epoch_started": self.epoch_started, "distiller": self.distiller.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": rngs, "buffers": buffers,
                 "metrics_lines": self.metrics.lines, "seconds": self.seconds, "eval_accuracy": self.eval_accuracy}
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save(state, tmp)

    def find_checkpoint(self) -> None:
        """Read the run folder's checkpoint, if any, and take its position; state is restored per epoch."""
        path = self.out / CHECKPOINT
        found = self.d.all_reduce(torch.tensor([int(path.is_file())], device=self.d.device)).item()
        if found == 0:
            return
        if found != self.d.world:
            raise JobError(f"{path} is visible to {found} of {self.d.world} ranks: the out folder must be shared")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("run_hash") not in self.resumable:
            raise JobError(f"{self.out} holds a checkpoint of another config or selection: use a new 'out' folder, "
                           f"or delete {path} to start over")
        if ckpt["world_size"] != self.d.world:
            raise JobError(f"{path} was written by {ckpt['world_size']} processes, this run has {self.d.world}: "
                           f"resume with the same number (torchrun --nproc-per-node {ckpt['world_size']})")
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.seconds, self.eval_accuracy = ckpt["seconds"], ckpt["eval_accuracy"]
        self.metrics.truncate(ckpt["metrics_lines"])
        self.resume_state = ckpt

    def restore(self) -> None:
        ckpt, self.resume_state = self.resume_state, None
        self.distiller.load_state_dict(ckpt["distiller"])
        with torch.no_grad():  # this rank's own buffers (KD^3 counts are per rank until the epoch ends)
            for name, buf in self.distiller.named_buffers():
                buf.copy_(ckpt["buffers"][self.d.rank][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"][self.d.rank])

    def start_epoch(self) -> None:
        """`on_epoch_start`, and the checkpoint's state restored in the order in which it was saved."""
        if self.resume_state is not None and not self.resume_state["epoch_started"]:
            self.restore()
        self.distiller.on_epoch_start(self.epoch, self.cfg.epochs, self.pool_pass())
        self.epoch_started = True
        if self.resume_state is not None:
            self.restore()

    def pool_pass(self) -> PoolPass:
        """The whole selection, this rank's share, for methods with per-epoch pool statistics (KD^3)."""
        urls, d = [s.url for s in self.manifest.shards], self.d

        def batches():
            for images in pool_batches(urls, self.prep, self.cfg.eval_batch_size, part=(d.rank, d.world)):
                yield images.to(d.device, non_blocking=True)
        return PoolPass(batches, d.all_reduce)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch, lr: float) -> dict[str, torch.Tensor]:
        images, logits, weights, _ = (t.to(self.d.device, non_blocking=True) for t in batch)
        set_lr(self.optimizer, lr)
        _, terms = self.forward(images, logits if self.stored else None,
                                weights if self.cfg.use_sample_weights else None)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in terms.items()}}

    def log_step(self, terms: dict[str, torch.Tensor], lr: float, samples_per_s: float) -> dict:
        """Loss terms averaged over ranks (a collective), written by rank 0."""
        values = self.d.all_reduce(torch.stack([v.float() for v in terms.values()])) / self.d.world
        record = {"step": self.global_step, "epoch": self.epoch,
                  **{k: float(v) for k, v in zip(terms, values.cpu())},
                  "lr": lr, "samples_per_s": round(samples_per_s, 1)}
        self.metrics.write(record)
        return record

    def run_epoch(self, stop: StopFlag, bar: tqdm) -> None:
        cfg = self.cfg
        plan = EpochPlan(cfg.seed, self.epoch, self.d.rank, self.d.world, self.steps, cfg.batch_size,
                         cfg.shuffle_buffer)
        stream = EpochStream([s.url for s in self.manifest.shards], plan, self.prep, self.manifest.num_classes,
                             need_logits=self.stored, skip_batches=self.step_in_epoch)
        self.distiller.train()
        window_start, window_steps = time.perf_counter(), 0
        last = window_start  # `seconds` counts data loading and steps, not evaluation or start-up
        for batch in epoch_batches(stream, cfg.workers, pin_memory=self.d.device.type == "cuda"):
            lr = lr_at(cfg, self.global_step, self.total_steps)
            terms = self.train_step(batch, lr)
            self.step_in_epoch += 1
            self.global_step += 1
            window_steps += 1
            now = time.perf_counter()
            self.seconds += now - last
            last = now
            bar.update(1)
            if self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps:
                rate = window_steps * cfg.batch_size * self.d.world / max(now - window_start, 1e-9)
                record = self.log_step(terms, lr, rate)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                window_start, window_steps = now, 0
            stopping = self.d.all_reduce(torch.tensor([int(stop.set)], device=self.d.device)).item() > 0
            if stopping or (self.global_step % cfg.checkpoint_every == 0 and self.step_in_epoch < self.steps):
                self.save_checkpoint()
            if stopping:
                raise Interrupted(f"stopped at step {self.global_step}; checkpoint in {self.out / CHECKPOINT}")

    def end_epoch(self) -> None:
        self.distiller.on_epoch_end(self.d.all_reduce)
        if self.cfg.eval is not None:
            acc, n = evaluate(self.distiller.deployable(), self.cfg.eval, self.prep, self.cfg.eval_batch_size, self.d)
            self.eval_accuracy = acc
            self.metrics.write({"step": self.global_step, "epoch": self.epoch, "eval_accuracy": acc,
                                "eval_samples": n})
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_started = False
        self.save_checkpoint()

    def run(self, stop: StopFlag) -> dict:
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.json") as tmp:
                tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        self.d.barrier()
        self.find_checkpoint()
        resumed_at = self.global_step
        shown = not bar_disabled(self.d.main and self.cfg.progress)  # shown through torchrun's pipe too
        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not shown,
                   desc=f"distill {self.cfg.run_name}", unit="step", mininterval=1.0, file=sys.stderr)
        with bar:
            while self.epoch < self.cfg.epochs:
                self.start_epoch()
                self.run_epoch(stop, bar)
                self.end_epoch()
        if self.resume_state is not None:  # the run was already complete: take its final state
            self.restore()
        # No collective after the last checkpoint: a rank leaves as soon as its part is done, so none can
        # be left inside a collective that a peer has already left (the other ranks have no more to write).
        return self.finish(resumed_at)

    def finish(self, resumed_at: int) -> dict:
        cfg = self.cfg
        samples = self.global_step * cfg.batch_size * self.d.world
        summary = {
            "name": cfg.run_name, "selection": cfg.selection, "selection_name": self.manifest.name,
            "selection_sha256": self.selection_sha256,
            "student": cfg.student, "loss": cfg.loss["method"], "loss_config": cfg.loss,
            "teacher": self.teacher_spec, "teacher_mode": cfg.teacher_mode, "eval": cfg.eval,
            "eval_accuracy": self.eval_accuracy, "checkpoint": str(self.out / "student.json"),
            "state_dict": str(self.out / "student.pt"), "epochs": cfg.epochs, "steps": self.global_step,
            "steps_per_epoch": self.steps, "batch_size": cfg.batch_size,
            "samples_per_epoch": self.steps * cfg.batch_size, "num_classes": self.manifest.num_classes,
            "seconds": round(self.seconds, 3), "samples_per_s": round(samples / max(self.seconds, 1e-9), 1),
            "world_size": self.d.world, "resumed_from_step": resumed_at or None,
        }
        if self.d.main:
            lineage = {"student": cfg.student, "loss": cfg.loss["method"], "selection": cfg.selection}
            checkpoint = export_student(self.distiller, self.out, self.prep, self.manifest.classes, lineage,
                                        cfg.student, self.manifest.num_classes, cfg.trust_model_code)
            summary["checkpoint"] = str(checkpoint) if checkpoint else None
            with atomic_path(self.out / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
        return summary


def run(cfg: DistillConfig) -> dict:
    """Run (or resume) the job in this process: the whole job alone, or this rank's part under torchrun."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        exit_with_launcher()
    if cfg.workers:
        start_worker_server()  # before the process group's threads, and before StopFlag's handlers
    world = init_distributed(cfg.collective_timeout_s)
    stop = StopFlag()
    previous = stop.install()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return Job(cfg, world).run(stop)  # the Job (DDP and its reducer) is gone before the process group
    except RuntimeError as exc:
        if world.world > 1 and (lost := peer_failure(exc, world)) is not None:
            raise lost from exc
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        leave_process_group()


def say(line: str) -> None:
    """One line to stderr in a single write: ranks share torchrun's pipe, and print()'s separate
    writes of the text and its newline let two ranks' lines run together."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file (tests capturing stderr)
        sys.stderr.write(line + "\n")
        return
    sys.stderr.flush()
    os.write(fd, (line + "\n").encode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m distill.train CONFIG.yaml|CONFIG.json  (alone, or under torchrun)", file=sys.stderr)
        return 2
    try:
        summary = run(load_config(argv[0]))
    except WebdistillError as exc:  # distill's own errors (config, data, models, peers) and a full disk
        say(f"distill: error: {first_line(exc)}")
        return 2
    except Interrupted as exc:
        say(f"distill: interrupted: {first_line(exc)}")
        return 130
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
