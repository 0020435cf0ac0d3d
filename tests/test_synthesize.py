"""Synthesize on a tiny pool: four classes of bright blobs, one per image quadrant, and a hand-built
teacher that reads the quadrants' brightness. The cVAE learns, the latent search makes the teacher
surer, and the shards hold what the manifest says, labelled as a fresh teacher forward labels them."""
import hashlib
import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import nn

from curation.errors import WebdistillError
from curation.ingest import ingest
from curation.score import ScoreConfig, score
from curation.synthesize import (
    CVAE,
    SynthConfig,
    initial_offsets,
    keep_confident,
    latent_search,
    prior_radius,
    synthesize,
    train_cvae,
)
from curation.workspace import Workspace
from distill.preprocess import image_to_tensor
from distill.spec import load_model

from .conftest import encode, write_tar

SCALE = 8.0  # teacher logit gain: a bright quadrant on black gives p ~ 1, a blurry one still p > 0.9
SIZE = 16  # generated images; the teacher reads 32x32, so the resize path is exercised too
QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) of class 0..3: tl, tr, bl, br


class QuadrantTeacher(nn.Module):
    """Logits = SCALE x (each quadrant's mean brightness minus the average of the four): the
    brightest quadrant is the class."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(4, 4)
        with torch.no_grad():
            self.classifier.weight.copy_(SCALE * (torch.eye(4) - 0.25))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x.mean(1, keepdim=True)).flatten(1))


def quadrant_teacher() -> QuadrantTeacher:
    return QuadrantTeacher()


def blob_image(rng: np.random.Generator, label: int, size: int = 32) -> np.ndarray:
    """A bright square of random size and place inside the label's quadrant, on dim noise."""
    img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    half = size // 2
    side = rng.integers(3 * half // 4, half + 1)
    r0 = QUADRANTS[label][0] * half + rng.integers(0, half - side + 1)
    c0 = QUADRANTS[label][1] * half + rng.integers(0, half - side + 1)
    img[r0:r0 + side, c0:c0 + side] = rng.integers(180, 256)
    return img


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and spares the cores other work shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pool_tensors(n_per_class: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    images = np.stack([np.asarray(Image.fromarray(blob_image(rng, c)).resize((SIZE, SIZE), Image.BILINEAR))
                       for c in labels])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory) -> str:
    spec = tmp_path_factory.mktemp("teacher") / "teacher.json"
    spec.write_text(json.dumps({"factory": "tests.test_synthesize:quadrant_teacher", "input_size": 32,
                                "mean": [0.5] * 3, "std": [0.5] * 3, "classes": ["tl", "tr", "bl", "br"]}))
    return str(spec)


def config(teacher: str, **kw) -> SynthConfig:
    base = dict(teacher=teacher, name="syn", image_size=SIZE, latent_dim=4, vae_epochs=5, vae_samples=400,
                vae_batch_size=16, vae_lr=5e-3, search_steps=20, search_lr=0.5, per_class=6, conf_threshold=0.9,
                candidates_per_class=12, shard_size=10, batch_size=64, workers=0, trust_model_code=True)
    return SynthConfig(**(base | kw))


def p_target(teacher, images_uint8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's probability of each target on 8-bit images, through the PIL path training uses."""
    x = torch.stack([image_to_tensor(Image.fromarray(im.permute(1, 2, 0).numpy()), teacher.input_size, teacher.mean,
                                     teacher.std) for im in images_uint8])
    with torch.no_grad():
        return torch.softmax(teacher.module(x), 1).gather(1, labels[:, None])[:, 0]


def test_cvae_training_lowers_reconstruction_loss(teacher_spec):
    x, y = pool_tensors()
    cfg = config(teacher_spec)

    floor = F.binary_cross_entropy(x, x, reduction="sum").item() / len(x)  # the BCE of a perfect reconstruction

    def recon_bce(cvae: CVAE) -> float:  # excess over the floor, per image, through the posterior mean (no noise)
        with torch.no_grad():
            mu, _ = cvae.encode(x, y)
            bce = F.binary_cross_entropy(torch.sigmoid(cvae.decode_logits(mu, y)), x, reduction="sum").item()
        return bce / len(x) - floor

    untrained = recon_bce(train_cvae(x, y, 4, config(teacher_spec, vae_epochs=0)))
    trained = recon_bce(train_cvae(x, y, 4, cfg))
    assert trained < 0.75 * untrained  # the dim noise background is unpredictable: most of what is left
    # a fixed seed gives the same model, and the caller's global RNG is left alone
    state = torch.random.get_rng_state()
    again = train_cvae(x, y, 4, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert recon_bce(again) == pytest.approx(trained, rel=1e-6)


@pytest.mark.parametrize("search", ["gradient", "evolution"])
def test_latent_search_raises_the_targets_confidence(teacher_spec, search):
    x, y = pool_tensors()
    teacher = load_model(teacher_spec, trust_model_code=True)
    cvae = train_cvae(x, y, 4, config(teacher_spec))
    labels = torch.arange(4).repeat_interleave(10)
    eps0 = initial_offsets(list(range(len(labels))), 4)
    before, logits0 = latent_search(cvae, teacher, labels, config(teacher_spec, search=search, search_steps=0), eps0)
    after, logits = latent_search(cvae, teacher, labels, config(teacher_spec, search=search, conf_threshold=0.99), eps0)
    assert before.dtype == after.dtype == torch.uint8 and after.shape == (40, 3, SIZE, SIZE)
    p0, p1 = p_target(teacher, before, labels), p_target(teacher, after, labels)
    assert p1.mean() > p0.mean() + 0.1 and (p1 >= 0.9).float().mean() > (p0 >= 0.9).float().mean()
    # the returned logits are the teacher's on exactly the returned pixels
    assert torch.allclose(torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0], p1, atol=1e-5)
    assert torch.allclose(torch.softmax(logits0, 1).gather(1, labels[:, None])[:, 0], p0, atol=1e-5)


def test_search_keeps_latents_in_the_prior_ball(teacher_spec):
    x, y = pool_tensors()
    teacher = load_model(teacher_spec, trust_model_code=True)
    cvae = train_cvae(x, y, 4, config(teacher_spec))
    labels = torch.arange(4).repeat_interleave(5)
    eps0 = 3 * initial_offsets(list(range(len(labels))), 4)  # far from the prior's mean
    # a ball of radius ~0.01 and a threshold no image reaches: every latent moves, and ends near m_y
    tight = config(teacher_spec, prior_mass=1e-9, conf_threshold=1.0, search_steps=3)
    assert prior_radius(4, 1e-9) < 0.02
    after, _ = latent_search(cvae, teacher, labels, tight, eps0)
    before, _ = latent_search(cvae, teacher, labels, config(teacher_spec, search_steps=0), eps0)
    with torch.no_grad():
        centre = (cvae.generate(torch.zeros(len(labels), 4), labels) * 255).round()
    assert (after.float() - centre).abs().max() <= 3
    assert (before.float() - centre).abs().amax(dim=(1, 2, 3)).min() > 20


def test_prior_radius_holds_the_prior_mass():
    # in 2-d, |eps|^2 ~ Exp(1/2): P(|eps| <= r) = 1 - exp(-r^2 / 2)
    assert prior_radius(2, 0.99) == pytest.approx(math.sqrt(-2 * math.log(0.01)), rel=1e-9)
    assert prior_radius(16, 0.5) == pytest.approx(3.9166, abs=1e-3)  # sqrt of chi2(16)'s median, 15.3385


def test_keep_confident_filters_and_balances():
    high, low = [6.0, 0.0, 0.0], [1.0, 0.0, 0.0]  # softmax maxima 0.9951 and 0.5761
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    logits = np.array([high, [7.0, 0, 0], low, [8.0, 0, 0],  # class 0: conf .9951, .9982, .5761, .9993
                       [0.0, 6.0, 0.0], [6.0, 0.0, 0.0],  # class 1: confident, then confident but wrong class
                       [0.0, 0.0, 1.0]], dtype=np.float32)  # class 2: not confident
    assert keep_confident(labels, logits, 0.99, per_class=2).tolist() == [0, 1, 4]
    assert keep_confident(labels, logits, 0.999, per_class=2).tolist() == [3]
    assert keep_confident(labels, logits, 0.9999, per_class=2).tolist() == []


@pytest.fixture(scope="module")
def scored_ws(tmp_path_factory, teacher_spec) -> Workspace:
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(1)
    for shard in range(2):
        samples = []
        for i in range(120):
            label = i % 4
            samples.append({"__key__": f"{shard}-{i:04d}", "png": encode(blob_image(rng, label), "PNG"),
                            "json": json.dumps({"url": None, "caption": None}).encode()})
        write_tar(root / "crawl" / f"{shard:05d}.tar", samples)
    ws = Workspace(root / "ws")
    ingest(ws, [str(root / "crawl")], workers=1, progress=False)
    score(ws, ScoreConfig(teacher=teacher_spec, name="s0", batch_size=64, workers=0, odin=False, trust_model_code=True),
          progress=False)
    return ws


@pytest.fixture(scope="module")
def synthesized(scored_ws, teacher_spec):
    return synthesize(scored_ws, config(teacher_spec), progress=False)


def read_back(path):
    manifest = json.loads((path / "manifest.json").read_text())
    samples = list(wds.WebDataset([str(path / s["path"]) for s in manifest["shards"]], shardshuffle=False,
                                  empty_check=False))
    return manifest, samples


def test_shards_hold_confident_balanced_samples_the_teacher_agrees_with(synthesized, teacher_spec):
    manifest, samples = read_back(synthesized.path)
    assert synthesized.path.name == "syn" and synthesized.path.parent.name == "synthetic"
    assert manifest["total"] == len(samples) == sum(s["count"] for s in manifest["shards"]) == synthesized.size
    assert len(manifest["shards"]) == math.ceil(len(samples) / 10)
    for shard in manifest["shards"]:
        assert hashlib.sha256((synthesized.path / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["provenance"] == "synthetic" and manifest["num_classes"] == 4
    assert (manifest["classes"], manifest["input_size"], manifest["mean"]) == (["tl", "tr", "bl", "br"], 32, [0.5] * 3)

    teacher = load_model(teacher_spec, trust_model_code=True)
    labels = []
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["provenance"] == "synthetic" and meta["source_shard"] == "synthetic" and meta["url"] is None
        assert meta["sample_id"] == s["__key__"] and isinstance(meta["latent_seed"], int)
        image = Image.open(io.BytesIO(s["png"]))
        assert image.format == "PNG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
        with torch.no_grad():
            fresh = teacher.module(image_to_tensor(image, 32, teacher.mean, teacher.std)[None])[0]
        stored = np.load(io.BytesIO(s["logits.npy"]))
        assert stored.dtype == np.float16 and np.allclose(stored, fresh.numpy(), atol=2e-3, rtol=2e-3)
        label = int(s["cls"])
        assert label == meta["teacher_label"] == int(fresh.argmax())
        assert meta["teacher_conf"] >= 0.9 and torch.softmax(fresh, 0).max() >= 0.9 - 1e-3
        # the right label, independently of the teacher: the brightest quadrant of the pixels
        quads = np.asarray(image, dtype=float).mean(2).reshape(2, SIZE // 2, 2, SIZE // 2).mean((1, 3)).ravel()
        assert int(quads.argmax()) == label
        labels.append(label)
    counts = Counter(labels)
    assert counts == {0: 6, 1: 6, 2: 6, 3: 6}  # 12 candidates a class, nearly all pass: the quota binds
    assert manifest["counts_per_class"] == {str(k): v for k, v in sorted(counts.items())}
    assert len({s["__key__"] for s in samples}) == len(samples)
    assert manifest["candidates"] == 4 * 12 and manifest["passed"] == sum(manifest["passed_per_class"].values())
    assert all(manifest["passed_per_class"][str(c)] >= 6 for c in range(4))


def test_rerun_is_idempotent_and_a_new_config_replaces_the_set(scored_ws, teacher_spec, synthesized):
    tars = {p.name: p.read_bytes() for p in synthesized.path.glob("*.tar")}
    again = synthesize(scored_ws, config(teacher_spec, workers=1), progress=False)  # workers change nothing
    assert again.unchanged and again.manifest == synthesized.manifest
    assert {p.name: p.read_bytes() for p in again.path.glob("*.tar")} == tars
    changed = synthesize(scored_ws, config(teacher_spec, per_class=2), progress=False)
    assert not changed.unchanged and changed.path == synthesized.path
    manifest, samples = read_back(changed.path)
    assert manifest["total"] == len(samples) == 8 and manifest["counts_per_class"] == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert sorted(p.name for p in changed.path.glob("*.tar")) == ["syn-000000.tar"]  # the old shards are gone
    # no temporary folder left
    assert sorted(p.name for p in (scored_ws.root / "synthetic").iterdir()) == [".lock-syn", "syn"]


def _one_line_error(fn) -> str:
    with pytest.raises(WebdistillError) as info:  # SynthError, or UnsafeName for a name
        fn()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_inputs_raise_one_line_errors(tmp_path, scored_ws, teacher_spec):
    assert "teacher" in _one_line_error(lambda: synthesize(scored_ws, config("no_such_module:factory"), progress=False))
    assert "no scored pool" in _one_line_error(lambda: synthesize(Workspace(tmp_path), config(teacher_spec),
                                                                   progress=False))
    assert "no scored pool" in _one_line_error(lambda: synthesize(scored_ws, config(teacher_spec, score_run="nope"),
                                                                   progress=False))
    assert "scoring run name '../ws' is not allowed" in _one_line_error(
        lambda: synthesize(scored_ws, config(teacher_spec, score_run="../ws"), progress=False))
    assert "rank_by" in _one_line_error(lambda: synthesize(scored_ws, config(teacher_spec, rank_by="url"),
                                                           progress=False))
    assert "name" in _one_line_error(lambda: synthesize(scored_ws, config(teacher_spec, name="../x"), progress=False))
    assert "image_size" in _one_line_error(lambda: synthesize(scored_ws, config(teacher_spec, image_size=12),
                                                              progress=False))
    assert not (scored_ws.root / "synthetic" / "x").exists()


def test_a_synthetic_set_mixes_into_a_selection(scored_ws, synthesized):
    import webdataset as wds

    from curation import catalog
    from curation.select import SelectConfig, SelectError, select

    catalog.refresh(scored_ws)
    size = json.loads((synthesized.path / "manifest.json").read_text())["total"]  # other tests may rewrite the set
    result = select(scored_ws, SelectConfig(name="mixed", policy="topk:k=10;by=msp", synthetic=("syn",)))
    m = result.manifest
    assert m["total"] == 10 + size and m["synthetic"] == {"syn": size}
    urls = [str(result.path / s["path"]) for s in m["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == m["total"]
    provenance = [json.loads(s["json"]).get("provenance") for s in samples]
    assert provenance.count("synthetic") == size
    assert sum(m["counts_per_class"].values()) == m["total"]
    with pytest.raises(SelectError, match="no synthetic set 'nope'"):
        select(scored_ws, SelectConfig(name="bad", policy="topk:k=10;by=msp", synthetic=("nope",)))
    assert not (scored_ws.root / "selections" / "bad").exists()
