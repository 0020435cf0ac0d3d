"""The distillation job (distill.train) on a tiny curated selection built here.

The data: 32x32 images of 10 colour classes (a hue each, brightness jitter, pixel noise and a
dark patch at a random place), written as curated shards in `webdistill select`'s format (png,
jpg and webp images, json with a weight, float16 logits.npy, cls pseudo-label) beside a
manifest.json. The teacher (distill.models:tiny_student) trains on other images of the same kind in
about 2 s; its logits are the stored ones.
"""
import colorsys
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from distill.config import ConfigError, config_from_dict, load_config, write_config
from distill.data import DataError, EpochPlan, EpochStream, Preprocess, epoch_batches, load_manifest
from distill.launch import launch, torchrun_command
from distill.losses import build_distiller
from distill.models import tiny_student
from distill.spec import load_model
from distill.students import build_student
from distill.train import capture_rng, main, restore_rng

N_CLASSES = 10
PALETTE = np.array([colorsys.hsv_to_rgb(c / N_CLASSES, 0.9, 0.9) for c in range(N_CLASSES)])
PREP = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 images and their true labels, 10 balanced classes in random order."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    rng.shuffle(labels)
    x = PALETTE[labels][:, None, None, :] * rng.uniform(0.7, 1.0, (n, 1, 1, 1)) + rng.normal(0, 0.08, (n, 32, 32, 3))
    for i in range(n):
        r, c = rng.integers(0, 24, 2)
        x[i, r:r + 8, c:c + 8] *= 0.5
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), labels


def as_input(u8: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def encode(u8: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                             **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def write_selection(folder: Path, u8: np.ndarray, logits: np.ndarray | None, shard_sizes: list[int],
                    teacher: str | None = None) -> Path:
    """Curated shards + manifest.json as `webdistill select` writes them; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    entries, start = [], 0
    for s, size in enumerate(shard_sizes):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, start + size):
                fmt = ("png", "jpg", "webp")[i % 3]
                sample = {"__key__": f"s{i:05d}", fmt: encode(u8[i], fmt),
                          "json": json.dumps({"sample_id": f"s{i:05d}", "weight": float(rng.uniform(0.5, 1.5))})}
                if logits is not None:
                    buf = io.BytesIO()
                    np.save(buf, logits[i].astype(np.float16))
                    sample["logits.npy"] = buf.getvalue()
                    sample["cls"] = str(int(logits[i].argmax()))
                sink.write(sample)
        entries.append({"path": path.name, "count": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        start += size
    manifest = {"name": folder.name, "total": start, "num_classes": N_CLASSES,
                "classes": [f"hue{c}" for c in range(N_CLASSES)], "teacher": teacher, "input_size": 32,
                "mean": [0.5] * 3, "std": [0.5] * 3, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, two threads contend and run up to 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread) -> dict:
    """A trained teacher, a 400-sample selection in 3 uneven shards with its logits, a labelled eval set."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = tiny_student()
    x, y = colour_images(400, seed=1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=5e-3)
    xt, yt = as_input(x), torch.from_numpy(y).long()
    for _ in range(40):
        idx = torch.randint(0, len(xt), (64,))
        loss = F.cross_entropy(teacher(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    torch.save(teacher.state_dict(), root / "teacher.pt")
    spec = f"distill.models:tiny_student@{root / 'teacher.pt'}"
    pool, _ = colour_images(400, seed=2)
    with torch.no_grad():
        logits = teacher(as_input(pool)).numpy()
    manifest = write_selection(root / "selection", pool, logits, [170, 150, 80], teacher=spec)
    ev, ev_labels = colour_images(200, seed=3)
    with torch.no_grad():
        teacher_acc = float((teacher(as_input(ev)).argmax(1).numpy() == ev_labels).mean())
    assert teacher_acc > 0.9  # the data is what the tests assume: a teacher that knows the task
    eval_tar = root / "eval.tar"
    with wds.TarWriter(str(eval_tar)) as sink:
        for i in range(len(ev)):
            sink.write({"__key__": f"e{i:04d}", "png": encode(ev[i], "png"), "cls": str(int(ev_labels[i]))})
    return {"root": root, "manifest": manifest, "teacher": spec, "eval": str(eval_tar), "pool": pool,
            "logits": logits}


def job_config(data: dict, out: Path, **over) -> Path:
    cfg = {"selection": str(data["manifest"]), "student": "tiny_cnn", "teacher_mode": "stored",
           "loss": {"method": "kd", "T": 2.0}, "epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 5e-3,
           "weight_decay": 0.0, "workers": 2, "shuffle_buffer": 100, "eval": data["eval"], "out": str(out),
           "checkpoint_every": 5, "log_every": 1, "progress": False, "seed": 3, "threads": 1, **over}
    out.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out.parent / f"{out.name}.json")


def loss_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def two_process_run(data) -> dict:
    """The reference run: 2 processes under torchrun, 3 shards for 2 ranks x 2 workers."""
    out = data["root"] / "runs" / "reference"
    summary = launch(job_config(data, out), nproc=2, stream=None)
    return {"out": out, "summary": summary}


@pytest.mark.slow  # torchrun
def test_two_process_run_learns_from_the_stored_logits(two_process_run):
    summary, out = two_process_run["summary"], two_process_run["out"]
    steps_per_epoch = 400 // 2 // 16  # manifest total // world size // batch size
    assert summary["world_size"] == 2 and summary["steps"] == 3 * steps_per_epoch
    assert summary["teacher_mode"] == "stored" and summary["loss"] == "kd"
    assert summary["eval_accuracy"] > 0.6  # chance is 0.1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 3 * steps_per_epoch + 1))
    evals = [r for r in metrics if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and evals[-1]["eval_accuracy"] == summary["eval_accuracy"]
    assert all(r["eval_samples"] == 200 for r in evals)
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert all(r["loss"] == pytest.approx(r["loss_kd"]) for r in metrics if "loss" in r)
    assert Path(summary["checkpoint"]).is_file() and summary["samples_per_s"] > 0


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # torchrun
def test_resume_after_sigkill_follows_the_uninterrupted_trajectory(data, two_process_run):
    out = data["root"] / "runs" / "killed"
    config = job_config(data, out)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(torchrun_command(config, nproc=2), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ranks = children(proc.pid)  # torchrun starts each rank in a session of its own
        assert len(ranks) == 2
        os.killpg(proc.pid, signal.SIGKILL)  # the job's process group: torchrun, no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 10  # the ranks notice their launcher is gone and die too
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in ranks)
    finally:
        for pid in filter(alive, ranks):
            os.killpg(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["global_step"] < 36 and not (out / "summary.json").exists()
    summary = launch(config, nproc=2, stream=None)
    assert summary["resumed_from_step"] == ckpt["global_step"] and summary["steps"] == 36
    reference, resumed = loss_lines(two_process_run["out"]), loss_lines(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for key in ("loss", "lr"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in reference], rtol=1e-5, atol=1e-7)
    assert summary["eval_accuracy"] == pytest.approx(two_process_run["summary"]["eval_accuracy"])
    a = torch.load(out / "student.pt", weights_only=True)
    b = torch.load(two_process_run["out"] / "student.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def run_in_process(config: Path) -> dict:
    assert main([str(config)]) == 0
    return json.loads((Path(load_config(config).out) / "summary.json").read_text())


def test_stored_and_live_teacher_runs_export_a_loadable_student(data):
    root = data["root"] / "runs"
    stored = run_in_process(job_config(data, root / "stored", epochs=1, workers=0))
    live = run_in_process(job_config(data, root / "live", epochs=1, workers=1, teacher_mode="live",
                                     loss={"method": "kd3", "weights": {"ntxent": 0.0}}))
    assert (stored["teacher_mode"], live["teacher_mode"]) == ("stored", "live")
    again = run_in_process(job_config(data, root / "stored", epochs=1, workers=0))  # complete: nothing to train
    assert again["steps"] == stored["steps"] and again["resumed_from_step"] == stored["steps"]
    assert again["eval_accuracy"] == stored["eval_accuracy"]
    assert main([str(job_config(data, root / "stored", epochs=1, workers=0, lr=0.1))]) == 2  # not its checkpoint
    assert live["loss"] == "kd3" and live["eval_accuracy"] is not None
    x = as_input(colour_images(8, seed=9)[0])
    # kd: the checkpoint is student.json (registry + weights_only, features kept) == tiny_cnn with
    # student.pt, and student.pt2 (torch.export, read with the checked loader) gives the same logits
    assert Path(stored["checkpoint"]).name == "student.json"
    loaded = load_model(stored["checkpoint"])
    assert loaded.kind == "module" and loaded.input_size == 32 and loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.classes == [f"hue{c}" for c in range(N_CLASSES)] and hasattr(loaded.module, "embed")
    exported = load_model(str(root / "stored" / "student.pt2"))
    assert exported.kind == "pt2" and exported.classes == loaded.classes and exported.input_size == 32
    student = build_student("tiny_cnn", N_CLASSES)
    student.load_state_dict(torch.load(root / "stored" / "student.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), student.eval()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported.module(x), student.eval()(x), atol=1e-5, rtol=1e-5)
    # kd3: the deployable (backbone + projector + the teacher's classifier) exports and reloads the same way
    teacher = load_model(data["teacher"]).module
    distiller = build_distiller({"method": "kd3", "weights": {"ntxent": 0.0}}, build_student("tiny_cnn", N_CLASSES),
                                teacher, N_CLASSES)
    deployable = distiller.deployable()
    deployable.load_state_dict(torch.load(root / "live" / "student.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(load_model(live["checkpoint"]).module(x), deployable.eval()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(str(root / "live" / "student.pt2")).module(x), deployable(x),
                                   atol=1e-5, rtol=1e-5)
    assert Path(live["checkpoint"]).name == "student.json"  # KD^3's deployable rebuilds from the registry too


def test_sigterm_checkpoints_and_the_rerun_continues_the_same_trajectory(data):
    """kd3 draws random numbers every step (MixStyle's Beta and permutation): the rerun follows the
    uninterrupted run only if the checkpoint restored the RNG states as well as the data position (and
    the thresholds of the epoch's pool pass)."""
    root = data["root"] / "runs"
    steps = 400 // 16  # one process, one epoch
    kd3 = {"teacher_mode": "live", "loss": {"method": "kd3", "weights": {"kd": 1.0}}, "epochs": 1,
           "checkpoint_every": 1000}
    reference = run_in_process(job_config(data, root / "uninterrupted", **kd3))
    config = job_config(data, root / "sigterm", **kd3)  # no periodic checkpoint: SIGTERM's is the only one
    metrics = root / "sigterm" / "metrics.jsonl"

    def stop_early() -> None:
        while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not end pytest
    try:
        sender = threading.Thread(target=stop_early, daemon=True)
        sender.start()
        assert main([str(config)]) == 130
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    ckpt = torch.load(root / "sigterm" / "checkpoint.pt", weights_only=True)
    assert 3 <= ckpt["global_step"] == ckpt["step_in_epoch"] < steps and ckpt["epoch"] == 0
    resumed = run_in_process(config)
    assert resumed["steps"] == reference["steps"] == steps and resumed["resumed_from_step"] == ckpt["global_step"]
    resumed_lines, reference_lines = loss_lines(root / "sigterm"), loss_lines(root / "uninterrupted")
    assert [r["step"] for r in resumed_lines] == list(range(1, steps + 1))
    for key in ("loss", "loss_kd", "loss_align", "loss_ntxent"):
        values = [r[key] for r in reference_lines]
        assert min(values) > 0  # every term is live, so the comparison means something
        np.testing.assert_allclose([r[key] for r in resumed_lines], values, rtol=1e-5, atol=1e-7)


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": capture_rng()}, tmp_path / "c.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def stream_batches(manifest, rank: int, world: int, workers: int, steps: int, epoch: int = 0, skip: int = 0,
                   batch_size: int = 16) -> list:
    m = load_manifest(manifest)
    plan = EpochPlan(seed=5, epoch=epoch, rank=rank, world=world, steps=steps, batch_size=batch_size,
                     shuffle_buffer=50)
    stream = EpochStream([s.url for s in m.shards], plan, PREP, m.num_classes, need_logits=True, skip_batches=skip)
    return list(epoch_batches(stream, workers))


def test_fixed_samples_per_rank_with_fewer_shards_than_ranks(data, tmp_path):
    manifest = write_selection(tmp_path / "one", data["pool"][:60], data["logits"][:60], [60])
    # one 60-sample shard, 2 ranks x 2 workers, 6 batches of 16 per rank: more than the shard holds
    per_rank = [stream_batches(manifest, rank, 2, 2, steps=6) for rank in (0, 1)]
    for batches in per_rank:
        assert len(batches) == 6 and all(b[0].shape == (16, 3, 32, 32) and b[1].shape == (16, 10) for b in batches)
        logits = torch.cat([b[1] for b in batches])
        # every sample is one of the shard's (its stored logits identify it)
        pool = torch.from_numpy(data["logits"][:60].astype(np.float16).astype(np.float32))
        assert all(((pool - row).abs().sum(1) == 0).any() for row in logits)
    assert not torch.equal(per_rank[0][0][1], per_rank[1][0][1])  # ranks read different orders


def test_data_order_is_a_function_of_seed_epoch_and_rank(data):
    def keys(batches):  # a sample's logits row identifies it
        return torch.cat([b[1] for b in batches])

    a = stream_batches(data["manifest"], 1, 2, 2, steps=5)
    assert torch.equal(keys(a), keys(stream_batches(data["manifest"], 1, 2, 2, steps=5)))
    assert not torch.equal(keys(a), keys(stream_batches(data["manifest"], 1, 2, 2, steps=5, epoch=1)))
    assert not torch.equal(keys(a), keys(stream_batches(data["manifest"], 0, 2, 2, steps=5)))
    # a resumed epoch (3 batches done, odd with 2 workers) yields exactly the rest of the uninterrupted one
    rest = stream_batches(data["manifest"], 1, 2, 2, steps=5, skip=3)
    assert len(rest) == 2 and torch.equal(keys(rest), keys(a[3:]))
    assert torch.equal(torch.cat([b[0] for b in rest]), torch.cat([b[0] for b in a[3:]]))
    assert torch.equal(keys(stream_batches(data["manifest"], 1, 2, 0, steps=5, skip=3)),
                       keys(stream_batches(data["manifest"], 1, 2, 0, steps=5)[3:]))


def base_config(data, tmp_path) -> dict:
    return {"selection": str(data["manifest"]), "student": "tiny_cnn", "out": str(tmp_path / "out")}


@pytest.mark.parametrize("change, key", [
    ({"epoch": 3}, "epoch"),                          # unknown key (typo)
    ({"epochs": "3"}, "epochs"),                      # wrong type
    ({"epochs": 0}, "epochs"),                        # out of range
    ({"batch_size": True}, "batch_size"),             # a bool is not an int
    ({"optimizer": "lion"}, "optimizer"),             # not one of sgd, adamw
    ({"teacher_mode": "cached"}, "teacher_mode"),
    ({"loss": "kd"}, "loss"),                         # must be a mapping with a method
    ({"loss": {"T": 4}}, "loss"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"selection": "/no/such/manifest.json"}, "selection"),
    ({"eval": "/no/such/eval-{0..1}.tar"}, "eval"),
    ({"samples_per_epoch": 10, "batch_size": 32}, "samples_per_epoch"),
    ({"student": None}, "student"),                   # required
    ({"student": "resnet"}, "student"),               # not in the registry, no torchvision:/timm: prefix
])
def test_bad_config_is_a_one_line_config_error_naming_the_key(data, tmp_path, change, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base_config(data, tmp_path), **change})
    assert key in str(info.value) and "\n" not in str(info.value)


def test_config_files_resolve_paths_and_reject_bad_syntax(data, tmp_path):
    (tmp_path / "job.yaml").write_text(f"selection: {data['manifest'].parent}\nstudent: tiny_cnn\nout: run1\n")
    cfg = load_config(tmp_path / "job.yaml")
    assert cfg.selection == str(data["manifest"]) and cfg.out == str(tmp_path / "run1")  # relative to the file
    assert (cfg.epochs, cfg.use_sample_weights, cfg.teacher_mode) == (10, True, "stored")
    (tmp_path / "bad.yaml").write_text("selection: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_job_errors_are_one_line(data, tmp_path, capsys):
    no_logits = write_selection(tmp_path / "nologits", data["pool"][:40], None, [40])
    config = write_config({"selection": str(no_logits), "student": "tiny_cnn", "out": str(tmp_path / "o1"),
                           "batch_size": 8}, tmp_path / "c1.json")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and "logits.npy" in err and "teacher_mode: live" in err
    assert len(err.splitlines()) == 1
    config = write_config({"selection": str(data["manifest"]), "student": "tiny_cnn", "out": str(tmp_path / "o2"),
                           "loss": {"method": "kd3"}}, tmp_path / "c2.json")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a live teacher" in err and len(err.splitlines()) == 1
    config = write_config({"selection": str(data["manifest"]), "student": "tiny_cnn", "out": str(tmp_path / "o3"),
                           "loss": {"method": "kd", "Tx": 2}}, tmp_path / "c3.json")
    with pytest.raises(ConfigError, match="unknown parameter 'Tx'"):  # refused before torchrun starts
        launch(config, nproc=1, stream=None)
    with pytest.raises(DataError, match="no selection manifest"):
        load_manifest(tmp_path / "nowhere" / "manifest.json")


def test_torchrun_command_one_node_and_several(tmp_path):
    config = tmp_path / "job.json"
    config.write_text("{}")
    one = torchrun_command(config, nproc=4)
    assert one[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert one[one.index("--nproc-per-node") + 1] == "4" and one[-3:] == ["-m", "distill.train", str(config)]
    many = [torchrun_command(config, nproc=8, nnodes=2, node_rank=r, rdzv_endpoint="head:29400") for r in (0, 1)]
    assert "--standalone" not in many[0] and many[1][many[1].index("--node-rank") + 1] == "1"
    assert many[0][many[0].index("--rdzv-backend") + 1] == "c10d"
    assert many[0][many[0].index("--rdzv-id") + 1] == many[1][many[1].index("--rdzv-id") + 1]  # same job
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(config, nproc=8, nnodes=2)
