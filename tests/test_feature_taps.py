"""Features from any model file (curation/feature_taps.py): the same CNN as a Python module spec, a
TorchScript file and a torch.export program gives the same layers, features and scores; a layer
the teacher lacks is one line naming those it has; TorchScript teachers get the feature-space
scores, through the score stage and `embed --embedder teacher`."""
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from curation import catalog
from curation.embed import embed
from curation.embedders import make_embedder
from curation.feature_taps import PENULTIMATE, LayerNotFound, feature_taps, pool
from curation.ingest import ingest
from curation.score import ScoreConfig, ScoreError, score
from curation.workspace import Workspace
from distill.model_files import save_exported_program
from distill.models import tiny_student
from distill.spec import load_model

from .conftest import encode, noise_image, run_cli, write_tar

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
SIZE = 32
PREP = {"input_size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def cnn() -> nn.Module:
    """tiny_student with BatchNorm statistics that are not the identity (so BN scores differ per sample)."""
    torch.manual_seed(0)
    model = tiny_student()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """One CNN three ways: a JSON spec (Python module + state_dict), TorchScript, torch.export."""
    root = tmp_path_factory.mktemp("formats")
    model = cnn()
    torch.save(model.state_dict(), root / "w.pt")
    (root / "module.json").write_text(json.dumps({"factory": "distill.models:tiny_student", "weights": "w.pt",
                                                  **PREP}))
    example = torch.zeros(2, 3, SIZE, SIZE)
    torch.jit.script(model).save(str(root / "scripted.pt"))
    save_exported_program(model, example, root / "exported.pt2")
    for stem in ("scripted", "exported"):  # the preprocessing sidecars
        (root / f"{stem}.json").write_text(json.dumps(PREP))
    return {"module": str(root / "module.json"), "torchscript": str(root / "scripted.pt"),
            "pt2": str(root / "exported.pt2")}


def test_the_three_formats_give_the_same_layers_and_features(specs):
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got = {}
    for kind, spec in specs.items():
        loaded = load_model(spec, trust_model_code=True)
        taps = feature_taps(loaded.module, SIZE)
        bn = taps.bn_layers()
        layers = taps.default_layers()
        with torch.no_grad():
            logits, pooled = taps(x, layers + list(bn), channels_first=bn)
        got[kind] = (taps, layers, bn, logits, pooled)
    taps, layers, bn, logits, pooled = got["module"]
    # the classifier's input and the last two stages (each width of tiny_student ends a resolution)
    assert layers == [PENULTIMATE, "features.12", "features.19"] and taps.stages() == [
        "features.5", "features.12", "features.19"]
    assert len(bn) == 6 and pooled[PENULTIMATE].shape == (4, 32) and pooled["features.12"].shape == (4, 16)
    with torch.no_grad():  # by hand: the second stage's map, globally averaged
        model = load_model(specs["module"]).module
        torch.testing.assert_close(pooled["features.12"], model.features[:13](x).mean((2, 3)))
        torch.testing.assert_close(pooled[PENULTIMATE], model.embed(x))
    for kind in ("torchscript", "pt2"):
        other_taps, other_layers, other_bn, other_logits, other_pooled = got[kind]
        assert other_layers == layers and other_taps.layers == taps.layers and list(other_bn) == list(bn), kind
        assert other_taps.classifier == "classifier"
        torch.testing.assert_close(other_logits, logits, rtol=1e-4, atol=1e-5)
        for name in pooled:  # BN outputs too: taken before the in-place ReLU that follows each of them
            torch.testing.assert_close(other_pooled[name], pooled[name], rtol=1e-4, atol=1e-5, msg=f"{kind} {name}")
        for a, b in zip(other_taps.linear_head(), taps.linear_head()):
            torch.testing.assert_close(a, b)


def test_an_unknown_layer_is_one_line_naming_the_layers(specs):
    for kind, spec in specs.items():
        taps = feature_taps(load_model(spec, trust_model_code=True).module, SIZE)
        with pytest.raises(LayerNotFound) as err:
            taps.resolve(["features.12", "layer9"])
        line = str(err.value)
        assert "\n" not in line and "'layer9'" in line and "features.12, " in line and "classifier" in line, kind
    with pytest.raises(ScoreError, match=r"^feature layers: the teacher has no layer 'layer9'; its layers: [^\n]*$"):
        from curation.score import BatchScorer
        BatchScorer(ScoreConfig(teacher=specs["torchscript"], feature_layers=("layer9",), trust_model_code=True))
    with pytest.raises(ScoreError, match="is not a layer name"):
        ScoreConfig(teacher="t", feature_layers="a b")


def test_pooling_and_stages_of_other_shapes():
    maps, tokens, bn1d = torch.randn(2, 3, 4, 5), torch.randn(2, 7, 6), torch.randn(2, 6, 9)
    torch.testing.assert_close(pool(maps), maps.mean((2, 3)))
    torch.testing.assert_close(pool(tokens), tokens.mean(1))  # (B, N, C) tokens: one C-vector
    torch.testing.assert_close(pool(bn1d, channels_first=True), bn1d.mean(2))  # BatchNorm1d's (B, C, L)
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    taps = feature_taps(resnet, 64)
    assert taps.default_layers() == [PENULTIMATE, "layer3", "layer4"] and taps.classifier == "fc"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    assert feature_taps(mlp, 2).default_layers() == [PENULTIMATE]  # no spatial map: no stage
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=3).eval()
    taps = feature_taps(vit, 32)
    assert taps.default_layers() == [PENULTIMATE] and taps.classifier == "heads.head"  # one map: no stage
    tokens = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # a block's (B, N, C) tokens: averaged over the tokens
        _, pooled = taps(tokens, ["encoder.layers.encoder_layer_1"])
        torch.testing.assert_close(pooled["encoder.layers.encoder_layer_1"],
                                   vit.encoder.layers[:2](vit.encoder.dropout(
                                       vit.encoder.pos_embedding + torch.cat(
                                           [vit.class_token.expand(2, -1, -1), vit._process_input(tokens)], 1))
                                   ).mean(1))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """48 small images: noise of several scales and flat colours, so that features spread."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(48):
        img = noise_image(i, (40, 40)) if i % 3 else np.full((40, 40, 3), rng.integers(0, 256, 3), np.uint8)
        if i % 4 == 0:
            img = (img // 4 + 96).astype(np.uint8)
        samples.append({"__key__": f"s{i:03d}", "png": encode(img, "PNG"), "json": b"{}"})
    root = tmp_path_factory.mktemp("taps_ws")
    write_tar(root / "in" / "00000.tar", samples)
    ws = Workspace(root / "ws")
    ingest(ws, [str(root / "in" / "00000.tar")], workers=1, progress=False)
    return ws


COLUMNS = ["mahalanobis", "rel_mahalanobis", "mahalanobis_layers", "knn_teacher", "bn_score", "scale", "ash",
           "react", "msp"]


@pytest.fixture(scope="module")
def scored(workspace, specs):
    frames = {}
    for kind, spec in specs.items():
        # every decoded sample in the reference set: the comparison does not hang on a pick
        score(workspace, ScoreConfig(teacher=spec, name=kind, batch_size=64, workers=0, odin=False,
                                     reference="confidence", reference_confidence=0.0, trust_model_code=True),
              progress=False)
    score(workspace, ScoreConfig(teacher=specs["torchscript"], name="penultimate", batch_size=64, workers=0,
                                 odin=False, reference="confidence", reference_confidence=0.0, trust_model_code=True,
                                 feature_layers=("penultimate",)), progress=False)
    catalog.refresh(workspace)
    for name in (*specs, "penultimate"):
        frames[name] = catalog.query(workspace, f"SELECT * FROM scores WHERE run = '{name}' ORDER BY row").to_pandas()
    return frames


def test_torchscript_and_pt2_teachers_get_the_feature_space_scores_of_the_module(scored, workspace):
    module = scored["module"]
    assert len(module) == 48
    for col in COLUMNS:
        assert module[col].notna().all(), col
    assert module["mahalanobis_layers"].std() > 0 and module["bn_score"].std() > 0
    for kind in ("torchscript", "pt2"):
        for col in COLUMNS:
            np.testing.assert_allclose(scored[kind][col], module[col], rtol=2e-3, atol=2e-3, err_msg=f"{kind} {col}")
    # the layers are stored per run; the penultimate one once, in features/
    run = workspace.root / "scores" / "torchscript"
    assert sorted(p.name for p in (run / "layers").iterdir()) == ["1", "2"]
    assert np.load(run / "layers" / "1" / "00000.npy").shape == (48, 16)
    assert np.load(run / "layers" / "2" / "00000.npy").shape == (48, 32)


def test_mahalanobis_layers_of_the_penultimate_layer_alone_is_mahalanobis_over_its_dimension(scored):
    one = scored["penultimate"]
    np.testing.assert_allclose(one["mahalanobis_layers"], one["mahalanobis"] / 32, rtol=1e-5)
    assert not np.allclose(scored["torchscript"]["mahalanobis_layers"], one["mahalanobis_layers"])


def test_embed_teacher_from_torchscript_through_the_cli(workspace, specs):
    res = run_cli("embed", "-w", str(workspace.root), "--embedder", "teacher", "--teacher", specs["torchscript"],
                  "--workers", "0", "--device", "cpu", "--trust-model-code")
    assert res.returncode == 0, res.stderr
    assert "vectors of dim 32" in res.stdout
    scripted = np.load(workspace.root / "embeddings" / "teacher" / "00000.npy").astype(np.float32)
    # the module spec's penultimate features, L2-normalised: the same vectors
    embed(workspace, make_embedder("teacher", teacher=specs["module"], device="cpu"), workers=0, progress=False)
    module = np.load(workspace.root / "embeddings" / "teacher" / "00000.npy").astype(np.float32)
    assert scripted.shape == (48, 32) and np.linalg.norm(scripted, axis=1) == pytest.approx(1, abs=1e-2)
    np.testing.assert_allclose(scripted, module, atol=2e-3)
    bad = run_cli("embed", "-w", str(workspace.root), "--embedder", "teacher", "--teacher", specs["pt2"],
                  "--workers", "0", "--device", "cpu", "--feature-layers", "features.12,nope")
    assert bad.returncode != 0 and "no layer 'nope'; its layers: features.0" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_embed_teacher_of_several_layers_concatenates_their_unit_vectors(specs):
    embedder = make_embedder("teacher", teacher=specs["pt2"], device="cpu", feature_layers="features.12,penultimate")
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    v = embedder.encode_images(x)
    assert embedder.dim == 16 + 32 and v.shape == (3, 48)
    # each layer's part carries the same weight: half the squared norm
    np.testing.assert_allclose((v[:, :16] ** 2).sum(1), 0.5, rtol=1e-4)
    assert embedder.config["feature_layers"] == ["features.12", "penultimate"]
