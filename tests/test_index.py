import io
import json
import tarfile
from collections import Counter, defaultdict

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from curation import catalog
from curation.dup_verify import (
    MAX_RESIDUAL,
    PixelCheckError,
    load_thumbnails,
    pair_residuals,
    thumbnail,
    verify_pairs,
)
from curation.embed import embed
from curation.embedders import EmbedderError, make_embedder
from curation.errors import WouldOverwrite
from curation.index import (
    BadIndexConfig,
    IndexConfig,
    build_index,
    kmeans_clusters,
    knn_score,
    leader_clusters,
    make_index,
    near_duplicates,
    search,
    similar_pairs,
    top_k_per_sample,
    vectors_of,
)
from curation.ingest import ingest
from curation.select import SelectConfig, select
from curation.workspace import Workspace, read_parquet_metadata
from flows.cli import main
from flows.stage_runner import run_knn_score

from .conftest import encode, noise_image, run_cli, write_tar

SPEC = "tests.models_for_tests:thumbnail"  # a real module:factory teacher spec, fast and meaningful (ours: trusted)
EMB = "teacher"


def _field(seed: int) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((160, 160), Image.BICUBIC)


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dup_crawl(tmp_path_factory):
    """300 distinct images in 3 shards, then 20 exact and 20 near-duplicates (crop, resize, re-encode)."""
    root = tmp_path_factory.mktemp("dupcrawl")
    rng = np.random.default_rng(0)
    family, samples = {}, []
    for i in range(300):
        samples.append({"__key__": f"{i:04d}", "jpg": _jpeg(_field(i))})
        family[f"{i:04d}"] = i
    for d in range(40):
        orig, key = int(rng.integers(300)), f"{300 + d:04d}"
        if d % 2 == 0:
            data = samples[orig]["jpg"]
        else:
            im = _field(orig)
            w, h = im.size
            c = [int(w * rng.uniform(0, 0.06)) for _ in range(4)]
            side = int(150 * rng.uniform(0.7, 1.3))
            data = _jpeg(im.crop((c[0], c[1], w - c[2], h - c[3])).resize((side, side)), int(rng.integers(55, 85)))
        samples.append({"__key__": key, "jpg": data})
        family[key] = orig
    order = rng.permutation(len(samples))
    for s in range(3):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in order[s::3]:
                sink.write(samples[i])
    ws = Workspace(root / "ws")
    ingest(ws, [str(root)], workers=1, progress=False)
    embed(ws, make_embedder("teacher", teacher=SPEC, trust_model_code=True), batch_size=64, workers=1, progress=False)
    catalog.refresh(ws)
    return ws, family


def _clusters(ws: Workspace) -> dict[str, str]:
    rows = catalog.query(ws, "SELECT key, cluster_id FROM dups JOIN samples USING (sample_id) "
                             f"WHERE embedder = '{EMB}'")
    return {r["key"]: r["cluster_id"] for r in rows.to_pylist()}


def pair_precision_recall(clusters: dict[str, str], family: dict[str, int]) -> tuple[float, float]:
    members = defaultdict(list)
    for key, cid in clusters.items():
        members[cid].append(family[key])
    predicted = sum(len(m) * (len(m) - 1) // 2 for m in members.values())
    correct = sum(c * (c - 1) // 2 for m in members.values() for c in Counter(m).values())
    true = sum(c * (c - 1) // 2 for c in Counter(family.values()).values())
    return correct / max(predicted, 1), correct / true


def test_planted_duplicates_are_recovered(dup_crawl):
    ws, family = dup_crawl
    config = IndexConfig(dup_threshold=0.9)
    assert build_index(ws, EMB, config)["kind"] == "flat"
    summary = near_duplicates(ws, EMB, config)
    catalog.refresh(ws)
    clusters = _clusters(ws)
    precision, recall = pair_precision_recall(clusters, family)
    assert precision > 0.95 and recall > 0.95, (precision, recall)
    assert summary["clusters"] == 300
    # identical bytes always share a cluster, and each cluster has exactly one representative
    same_bytes = catalog.query(ws, "SELECT sha256, count(DISTINCT cluster_id) AS n "
                                   "FROM samples JOIN dups USING (sample_id) "
                                   "GROUP BY sha256 HAVING count(*) > 1").to_pylist()
    assert same_bytes and all(r["n"] == 1 for r in same_bytes)
    reps = catalog.query(ws, "SELECT cluster_id, count(*) FILTER (WHERE is_representative) AS reps, "
                             "bool_or(is_representative AND sample_id = cluster_id) AS named "
                             "FROM dups GROUP BY ALL").to_pylist()
    assert len(reps) == 300 and all(r["reps"] == 1 and r["named"] for r in reps)


@pytest.mark.slow  # trains IVF and IVF-PQ indexes
def test_ivf_and_ivfpq_paths_match_the_exact_clusters(dup_crawl):
    ws, family = dup_crawl
    exact = IndexConfig(dup_threshold=0.9)
    build_index(ws, EMB, exact)
    near_duplicates(ws, EMB, exact)
    want = _clusters(ws)
    for ivf in (IndexConfig(dup_threshold=0.9, ivf_threshold=100, nlist=8, nprobe=8),
                IndexConfig(dup_threshold=0.9, ivf_threshold=100, nlist=8, nprobe=8, pq_m=12)):
        meta = build_index(ws, EMB, ivf)
        assert meta["kind"] == ("ivfpq" if ivf.pq_m else "ivf")
        near_duplicates(ws, EMB, ivf)
        got = _clusters(ws)
        # tolerance: candidates come from the approximate index, the exact similarity decides;
        # with 8 of 8 lists probed the partition must be identical
        assert sorted(Counter(got.values()).values()) == sorted(Counter(want.values()).values())
        assert pair_precision_recall(got, family) == pair_precision_recall(want, family)


def _crop_resize(im: Image.Image, sides: tuple[float, float, float, float], scale: float) -> Image.Image:
    """A planted near-duplicate: crop a share of each side (left, top, right, bottom), then resize."""
    w, h = im.size
    box = (int(w * sides[0]), int(h * sides[1]), w - int(w * sides[2]), h - int(h * sides[3]))
    im = im.crop(box)
    return im.resize((int(im.width * scale), int(im.height * scale)), Image.BILINEAR)


def _garment(pattern: str) -> Image.Image:
    """A T-shirt silhouette; only the print differs between patterns (a class-level look-alike)."""
    im = Image.new("L", (280, 280), 0)
    draw = ImageDraw.Draw(im)
    draw.polygon([(70, 40), (210, 40), (260, 110), (220, 130), (215, 260), (65, 260), (60, 130), (20, 110)], fill=190)
    if pattern == "stripes":
        for y in range(60, 250, 24):
            draw.rectangle((75, y, 205, y + 8), fill=120)
    else:
        draw.ellipse((110, 90, 170, 150), fill=60)
        draw.rectangle((100, 190, 180, 205), fill=240)
    return im.convert("RGB")


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float).ravel(), b.astype(float).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_pixel_check_accepts_a_crop_and_rejects_distinct_look_alikes():
    photo = Image.fromarray(skimage.data.astronaut()).resize((320, 320), Image.BICUBIC)
    original = thumbnail(_jpeg(photo, 90))
    near = thumbnail(_jpeg(_crop_resize(photo, (0.05, 0.02, 0.04, 0.06), 0.75), 60))
    reframed = thumbnail(_jpeg(_crop_resize(photo, (0.15, 0.0, 0.0, 0.15), 1.0), 90))  # same photo, cropped far more
    shirt = _garment("stripes")
    stripes, logo = thumbnail(_jpeg(shirt, 90)), thumbnail(_jpeg(_garment("logo"), 90))
    stripes_near = thumbnail(_jpeg(_crop_resize(shirt, (0.03, 0.02, 0.04, 0.05), 0.7), 55))
    assert pair_residuals(original[None], original[None])[0] == pytest.approx(0.0, abs=1e-6)
    # either side may be the crop
    accepted = pair_residuals(np.stack([original, near, stripes, stripes_near]),
                              np.stack([near, original, stripes_near, stripes]))
    assert (accepted <= MAX_RESIDUAL).all(), accepted
    # the two shirts correlate like duplicates on the whole thumbnail (what a class-level embedding sees) ...
    assert _ncc(stripes, logo) > 0.9
    rejected = pair_residuals(np.stack([original, reframed, stripes, logo]),
                              np.stack([reframed, original, logo, stripes]))
    assert (rejected > 2 * MAX_RESIDUAL).all(), rejected  # ... but they are far from near-duplicates


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # tqdm hides its bar on anything else
        return True


def test_verify_pairs_is_the_same_in_any_chunking_and_shows_its_progress(monkeypatch):
    # pairs drop out of the coarse levels at different points: the survivors of each chunk must be
    # kept apart from the rest whatever the chunk size (the pairs become float only while alive)
    photo = Image.fromarray(skimage.data.astronaut()).resize((320, 320), Image.BICUBIC)
    shirt = _garment("stripes")
    thumbs = np.stack([thumbnail(_jpeg(photo, 90)),
                       thumbnail(_jpeg(_crop_resize(photo, (0.05, 0.02, 0.04, 0.06), 0.75), 60)),
                       thumbnail(_jpeg(shirt, 90)),
                       thumbnail(_jpeg(_crop_resize(shirt, (0.03, 0.02, 0.04, 0.05), 0.7), 55)),
                       thumbnail(_jpeg(_garment("logo"), 90)),
                       thumbnail(_jpeg(_crop_resize(photo, (0.15, 0.0, 0.0, 0.15), 1.0), 90)),
                       np.zeros((64, 64), np.uint8)])
    ok = np.array([True] * 6 + [False])  # the last one could not be read
    i = np.array([0, 2, 0, 2, 1, 3, 0, 4, 6, 0, 5, 1])
    j = np.array([1, 3, 2, 4, 0, 2, 5, 3, 0, 3, 1, 4])
    want = [True, True, False, False, True, True, False, False, False, False, False, False]
    for chunk in (1, 2, 3, 5, 512):
        assert verify_pairs(thumbs, ok, i, j, chunk=chunk).tolist() == want, chunk
    stderr = _Terminal()
    monkeypatch.setattr("sys.stderr", stderr)
    verify_pairs(thumbs, ok, i, j, chunk=4, progress=True)
    assert "pixel check" in stderr.getvalue() and "11/11" in stderr.getvalue()  # the unreadable pair is skipped
    for quiet in ({"progress": False}, {"progress": True, "env": "0"}):
        stderr = _Terminal()
        monkeypatch.setattr("sys.stderr", stderr)
        if "env" in quiet:
            monkeypatch.setenv("WEBDISTILL_PROGRESS", quiet["env"])  # what `webdistill -q` sets
        verify_pairs(thumbs, ok, i, j, progress=quiet["progress"])
        assert stderr.getvalue() == ""


def test_thumbnails_flag_what_cannot_be_read(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    tar = write_tar(tmp_path / "00000.tar", [{"__key__": "a", "png": png.getvalue()},
                                              {"__key__": "junk", "jpg": b"<html>not an image</html>"}])
    cut = write_tar(tmp_path / "00001.tar", [{"__key__": k, "png": png.getvalue()} for k in ("a", "b")])
    with tarfile.open(cut) as t:
        second = next(m for m in t.getmembers() if m.name.startswith("b."))
    with open(cut, "r+b") as fh:  # an interrupted copy: the tar ends inside sample b
        fh.truncate(second.offset_data + 10)
    with pytest.raises(PixelCheckError):
        thumbnail(b"<html>not an image</html>")
    thumbs, ok = load_thumbnails([(str(tar), "a", "png"), (str(tar), "junk", "jpg"), None,
                                  (str(tmp_path / "gone.tar"), "a", "png"), (str(tar), "a", "png"),
                                  (str(cut), "a", "png"), (str(cut), "b", "png")], side=16)
    assert ok.tolist() == [True, False, False, False, True, True, False]
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((16, 16), Image.BILINEAR, reducing_gap=2.0))
    assert np.array_equal(thumbs[0], grey) and np.array_equal(thumbs[4], grey) and not thumbs[1].any()
    with pytest.raises(PixelCheckError):
        pair_residuals(thumbs[:2], thumbs[:3])


def test_star_clusters_and_top_k_by_hand():
    # a chain 0-1-2-3 and a loner 4: components would give one cluster of four
    i, j = np.array([0, 1, 2]), np.array([1, 2, 3])
    assert leader_clusters(5, i, j, np.array([0, 1, 2, 3, 4])).tolist() == [0, 0, 2, 2, 4]
    assert leader_clusters(5, i, j, np.array([1, 3, 0, 2, 4])).tolist() == [1, 1, 1, 3, 4]
    # pairs (0,1) .9, (0,2) .8, (0,3) .7, (1,2) .1: with k=1 sample 0 keeps (0,1), 1 keeps (0,1),
    # 2 keeps (0,2), 3 keeps (0,3); (1,2) is nobody's best
    i, j, s = np.array([0, 0, 0, 1]), np.array([1, 2, 3, 2]), np.array([0.9, 0.8, 0.7, 0.1])
    assert top_k_per_sample(i, j, s, 1).tolist() == [True, True, True, False]
    assert top_k_per_sample(i, j, s, 2).tolist() == [True, True, True, True]
    with pytest.raises(BadIndexConfig):
        IndexConfig(verify="maybe")
    with pytest.raises(BadIndexConfig):
        IndexConfig(dup_max_crop=0.4)


def test_pixel_check_keeps_apart_what_the_embedding_chains(dup_crawl):
    ws, family = dup_crawl
    loose = 0.2  # distinct fields reach this cosine with ~5% of the others: the embedding alone chains them
    build_index(ws, EMB, IndexConfig(dup_threshold=loose))
    near_duplicates(ws, EMB, IndexConfig(dup_threshold=loose, verify="none"))
    catalog.refresh(ws)
    chained, _ = pair_precision_recall(_clusters(ws), family)
    summary = near_duplicates(ws, EMB, IndexConfig(dup_threshold=loose))
    assert not summary["skipped"]  # the verify setting is part of the stamp
    catalog.refresh(ws)
    precision, recall = pair_precision_recall(_clusters(ws), family)
    assert chained < 0.5 and precision > 0.95 and recall > 0.95, (chained, precision, recall)
    assert summary["clusters"] == 300 and summary["unreadable"] == 0


def test_artifacts_open_with_plain_faiss_numpy_and_pyarrow(dup_crawl):
    ws, _ = dup_crawl
    build_index(ws, EMB, IndexConfig())
    index = faiss.read_index(str(ws.root / "index" / EMB / "index.faiss"))
    ids = pq.read_table(ws.root / "index" / EMB / "ids.parquet")
    assert index.ntotal == ids.num_rows == 340
    vec = np.load(ws.root / "embeddings" / EMB / "00000.npy")
    id_map = pq.read_table(ws.root / "embeddings" / EMB / "00000.parquet")
    assert vec.dtype == np.float16 and vec.shape[0] == id_map.num_rows
    assert np.allclose(np.linalg.norm(vec.astype(np.float32), axis=1), 1.0, atol=1e-2)
    # the first vector of shard 00000 finds itself through the plain index and the id map
    _, rows = index.search(vec[:1].astype(np.float32), 1)
    assert ids.column("sample_id")[int(rows[0, 0])].as_py() == id_map.column("sample_id")[0].as_py()


def test_reruns_are_idempotent(dup_crawl):
    ws, _ = dup_crawl
    again = embed(ws, make_embedder("teacher", teacher=SPEC, trust_model_code=True), progress=False)
    assert again.embedded == [] and len(again.skipped) == 3
    config = IndexConfig(dup_threshold=0.9)
    build_index(ws, EMB, config)
    near_duplicates(ws, EMB, config)
    mtimes = {p: p.stat().st_mtime_ns for p in (ws.root / "index").rglob("*")} | {
        p: p.stat().st_mtime_ns for p in (ws.root / "dups").glob("*")}
    assert build_index(ws, EMB, config)["skipped"] and near_duplicates(ws, EMB, config)["skipped"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}


def test_knn_kmeans_and_knn_scores(dup_crawl):
    ws, family = dup_crawl
    build_index(ws, EMB, IndexConfig())
    ids = catalog.query(ws, "SELECT sample_id, key FROM samples ORDER BY key").to_pylist()
    key_of = {r["sample_id"]: r["key"] for r in ids}
    # a near-duplicate's nearest neighbour (after itself) is its original
    near_key = "0301"
    near_id = next(r["sample_id"] for r in ids if r["key"] == near_key)
    hits = search(ws, EMB, vectors_of(ws, EMB, [near_id]), k=2)[0]
    assert key_of[hits[0][0]] == near_key and family[key_of[hits[1][0]]] == family[near_key]

    result = kmeans_clusters(ws, EMB, IndexConfig(kmeans_k=5))
    assert result["k"] == 5 and sum(result["sizes"]) == 340
    catalog.refresh(ws)
    counts = catalog.query(ws, "SELECT count(DISTINCT cluster) AS k, count(*) AS n FROM clusters").to_pylist()
    assert counts == [{"k": 5, "n": 340}]

    ref = vectors_of(ws, EMB, [near_id])
    knn_score(ws, EMB, "near_0301", ref, k=1)
    catalog.refresh(ws)
    top = catalog.query(ws, "SELECT key FROM knn_scores JOIN samples USING (sample_id) WHERE name = 'near_0301' "
                            "ORDER BY knn_sim DESC LIMIT 2").to_pylist()
    assert {family[r["key"]] for r in top} == {family[near_key]}


FIRST_KEYS = "SELECT sample_id FROM samples WHERE key < '0005'"
# another definition under a taken name: (the run's arguments, how the refusal names the change)
OTHER_KNN = {
    "another query": ({"sql": "SELECT sample_id FROM samples WHERE key < '0009'"}, "reference {'sql'"),
    "another k": ({"sql": FIRST_KEYS, "k": 3}, "k 5 -> 3"),
    "prompts instead": ({"prompts": ["a photo"]}, "reference {'sql': .* -> {'prompts'"),
}


@pytest.mark.parametrize("case", OTHER_KNN)
def test_a_knn_score_of_another_reference_set_is_refused_unless_overwrite(dup_crawl, case):
    ws, _ = dup_crawl
    name = f"taken{list(OTHER_KNN).index(case)}"
    run_knn_score(ws, name, EMB, sql=FIRST_KEYS)
    path = ws.root / "knn_scores" / f"{name}.parquet"
    before = path.read_bytes()
    args, named = OTHER_KNN[case]
    kw = {"k": 5, "trust_model_code": True} | args
    with pytest.raises(WouldOverwrite, match=rf"kNN score '{name}' exists.*{named}.*--overwrite"):
        run_knn_score(ws, name, EMB, **kw)
    with pytest.raises(WouldOverwrite):  # the library call refuses alike
        knn_score(ws, EMB, name, vectors_of(ws, EMB, [catalog.query(ws, "SELECT min(sample_id) AS s FROM samples")
                                                       ["s"][0].as_py()]), description="something else")
    assert path.read_bytes() == before
    assert run_knn_score(ws, name, EMB, sql=FIRST_KEYS)["reference"] == 5  # the same one: recomputed, not refused
    if "prompts" in args:  # past the name, the teacher embedder itself refuses prompts: it has no text tower
        with pytest.raises(EmbedderError, match="no text tower"):
            run_knn_score(ws, name, EMB, **kw, overwrite=True)
        return
    replaced = run_knn_score(ws, name, EMB, **kw, overwrite=True)
    assert read_parquet_metadata(path)["definition"]["k"] == replaced["k"] == kw["k"]
    with pytest.raises(WouldOverwrite):
        run_knn_score(ws, name, EMB, sql=FIRST_KEYS)


def test_a_knn_score_of_images_is_known_by_their_bytes_not_their_folder(dup_crawl, tmp_path):
    ws, _ = dup_crawl
    folder = tmp_path / "targets"
    (folder / "seven").mkdir(parents=True)
    _field(7).save(folder / "seven" / "a.png")
    _field(8).save(folder / "b.png")
    run_knn_score(ws, "by-images", EMB, images=str(folder), trust_model_code=True)
    moved = folder.rename(tmp_path / "moved")
    assert run_knn_score(ws, "by-images", EMB, images=str(moved), trust_model_code=True)["reference"] == 2
    _field(9).save(moved / "b.png")  # other pixels under the same name: another reference set
    with pytest.raises(WouldOverwrite, match="images_sha256"):
        run_knn_score(ws, "by-images", EMB, images=str(moved), trust_model_code=True)


def test_a_knn_score_from_before_definitions_is_judged_by_its_description(dup_crawl):
    ws, _ = dup_crawl
    run_knn_score(ws, "old", EMB, sql=FIRST_KEYS)
    path = ws.root / "knn_scores" / "old.parquet"
    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"definition"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    assert "definition" not in read_parquet_metadata(path)
    assert run_knn_score(ws, "old", EMB, sql=FIRST_KEYS)["reference"] == 5
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(WouldOverwrite, match="another reference set"):
        run_knn_score(ws, "old", EMB, sql="SELECT sample_id FROM samples WHERE key = '0001'")


def test_knn_score_cli_refuses_in_one_line_and_overwrite_replaces(dup_crawl, capsys):
    ws, _ = dup_crawl
    base = ["knn-score", "-w", str(ws.root), "--embedder", EMB, "--name", "cli-taken"]
    assert main([*base, "--sql", FIRST_KEYS]) == 0
    capsys.readouterr()
    other = [*base, "--sql", "SELECT sample_id FROM samples WHERE key = '0002'"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'cli-taken' exists" in err and "--overwrite" in err
    assert main([*other, "--overwrite"]) == 0
    assert "against 1 reference" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["knn-score", "--help"])
    assert "--overwrite" in capsys.readouterr().out


@pytest.mark.slow  # a dozen CLI processes, each loading torch
def test_knn_and_knn_score_from_the_command_line(dup_crawl, tmp_path):
    ws, family = dup_crawl
    build_index(ws, EMB, IndexConfig())
    target = tmp_path / "targets"
    target.mkdir()
    _field(7).save(target / "seven.png")
    (target / "notes.txt").write_text("not an image")
    # the workspace's embedder is the tests' own module:factory: loading it again needs the user's trust
    untrusted = run_cli("knn", "-w", str(ws.root), "--embedder", "teacher", "--image", str(target / "seven.png"))
    assert untrusted.returncode == 2 and "--trust-model-code" in untrusted.stderr, untrusted.stderr
    res = run_cli("knn", "-w", str(ws.root), "--embedder", "teacher", "--image", str(target / "seven.png"), "-k", "2",
                  "--format", "json", "--trust-model-code")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [family[r["key"]] for r in rows][0] == 7 and rows[0]["similarity"] > 0.9
    res = run_cli("knn-score", "-w", str(ws.root), "--embedder", "teacher", "--name", "sevens", "--images", str(target),
                  "--trust-model-code")
    assert res.returncode == 0 and "skipping" in res.stderr, res.stderr
    res = run_cli("knn-score", "-w", str(ws.root), "--embedder", "teacher", "--name", "first",
                  "--sql", "SELECT sample_id FROM samples WHERE key = '0000'")
    assert res.returncode == 0, res.stderr
    out = run_cli("sql", "-w", str(ws.root), "SELECT name, count(*) AS n FROM knn_scores GROUP BY ALL ORDER BY name",
                  "--format", "csv").stdout.strip().splitlines()
    assert {'"first",340', '"sevens",340'} <= set(out[1:])
    bad = run_cli("knn-score", "-w", str(ws.root), "--embedder", "teacher", "--name", "x", "--sql", "SELECT 1 AS a")
    assert bad.returncode == 2 and "sample_id" in bad.stderr


def test_open_clip_embedder_loads_a_user_checkpoint(dup_crawl, tmp_path):
    import open_clip

    from curation.embedders import MODEL_CONFIGS

    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(1)
    model = open_clip.create_model("webdistill-tiny-clip")
    ckpt = tmp_path / "mine.pt"
    torch.save(model.state_dict(), ckpt)
    embedder = make_embedder("open_clip:webdistill-tiny-clip", pretrained=str(ckpt))
    x = torch.stack([embedder.preprocess(_field(i)) for i in range(4)])
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    got = embedder.encode_images(x)
    model.eval()
    with torch.no_grad():
        mean, std = torch.tensor(embedder.mean).view(1, 3, 1, 1), torch.tensor(embedder.std).view(1, 3, 1, 1)
        norm = (x.float() / 255 - mean) / std
        want = torch.nn.functional.normalize(model.encode_image(norm), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)
    text = embedder.encode_text(["a photo of the digit 3", "a shoe"])
    assert text.shape == (2, embedder.dim) and torch.allclose(text.norm(dim=1), torch.ones(2), atol=1e-4)
    with pytest.raises(EmbedderError):
        make_embedder("open_clip:webdistill-tiny-clip", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(EmbedderError):
        make_embedder("open_clip:no-such-model")
    with pytest.raises(EmbedderError):
        make_embedder("clip-retrieval")


# ---------------------------------------------------------------- a pool of look-alikes

def _look_alike_workspace(root):
    """3,000 vectors (dim 64): 90% in one tight cluster (every pair at cosine ~0.98), 5% exact copies,
    and 5 planted near-copies among the spread ones. Written in the real layout by the benchmark's helper."""
    from bench.dedup_blowup import tight_pool, write_workspace

    x, source = tight_pool(3000, 64, share=0.9, copies=0.05, seed=3)
    spread = np.setdiff1d(np.arange(2700, 3000), np.concatenate([source[source != np.arange(3000)],
                                                                 np.flatnonzero(source != np.arange(3000))]))
    originals, near = spread[:5], spread[5:10]
    noise = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32) * 0.01 / 8
    x[near] = x[originals] + noise
    x[near] /= np.linalg.norm(x[near], axis=1, keepdims=True)
    write_workspace(root, x, source, shard_size=1000)
    return Workspace(root), source, originals, near


@pytest.mark.slow  # a pool built to be quadratic
def test_a_pool_of_look_alikes_costs_the_cap_not_the_square(tmp_path):
    ws, source, originals, near = _look_alike_workspace(tmp_path / "ws")
    images, tight = len(np.unique(source)), source < 2700  # rows 0..2699 are the tight cluster
    ids = np.concatenate([pq.read_table(f).column("sample_id").to_numpy(zero_copy_only=False)
                          for f in sorted((ws.root / "samples").glob("*.parquet"))])
    want = None
    for config in (IndexConfig(verify="none", dup_max_neighbors=8),
                   IndexConfig(verify="none", dup_max_neighbors=8, ivf_threshold=1000, nlist=16, nprobe=16)):
        assert build_index(ws, "bench", config)["kind"] == ("flat" if config.ivf_threshold > 3000 else "ivf")
        summary = near_duplicates(ws, "bench", config)
        # 2,700 alike rows are 3.6M pairs above the threshold; at most 8 per distinct image are looked at
        assert summary["images"] == images
        assert 0 < summary["embedding_pairs"] <= summary["pairs_examined"] <= images * 8
        dups = pq.read_table(ws.root / "dups" / "bench.parquet").to_pandas().set_index("sample_id").loc[ids]
        cluster = dups["cluster_id"].to_numpy()
        # the images that hit the cap are exactly the tight cluster's, and the summary counts them
        assert dups["candidates_capped"].to_numpy().tolist() == tight.tolist()
        assert summary["capped_images"] == len(np.unique(source[tight]))
        assert len(set(cluster[tight])) == 1  # the look-alikes still form one cluster
        for a, b in zip(originals, near):  # planted near-copies pair up, apart from everything else
            assert cluster[a] == cluster[b] and (cluster == cluster[a]).sum() == 2
        assert (cluster == cluster[source]).all()  # identical bytes share a cluster
        assert want is None or (cluster == want).all()  # the IVF path finds the same clusters
        want = cluster
    # from the command line: one line says how many images hit the cap
    res = run_cli("index", "-w", str(ws.root), "--embedder", "bench", "--verify", "none", "--dup-max-neighbors", "8",
                  "--kmeans-k", "4", env={"WEBDISTILL_PROGRESS": "1"})  # as on a terminal
    assert res.returncode == 0, res.stderr
    assert f"{summary['capped_images']} of {images} images have more than 8 look-alikes" in res.stderr
    phases = [line for line in res.stderr.splitlines() if line.startswith("index bench: ")]
    assert [p.split()[2] for p in phases] == ["1/3", "2/3", "3/3"]  # never silent for minutes
    quiet = run_cli("-q", "index", "-w", str(ws.root), "--embedder", "bench", "--verify", "none",
                    "--dup-max-neighbors", "8", "--kmeans-k", "4", env={"WEBDISTILL_PROGRESS": "1"})
    assert quiet.returncode == 0 and "1/3" not in quiet.stderr
    with pytest.raises(BadIndexConfig, match="dup_max_neighbors must be at least 1"):
        IndexConfig(dup_max_neighbors=0)


def test_the_pixel_check_keeps_its_clusters_when_every_pair_is_a_candidate(dup_crawl):
    ws, family = dup_crawl
    config = IndexConfig(dup_threshold=-1.0, dup_max_neighbors=8)  # every pair is above the threshold
    build_index(ws, EMB, config)
    summary = near_duplicates(ws, EMB, config)
    assert summary["capped_images"] == summary["images"] == 320  # 340 samples, 20 exact copies
    assert summary["pairs_examined"] <= 320 * 8 and summary["candidates_from_embedding"] <= 320 * 8
    catalog.refresh(ws)
    precision, recall = pair_precision_recall(_clusters(ws), family)
    assert precision > 0.95 and recall > 0.95, (precision, recall)
    capped = catalog.query(ws, "SELECT count(*) FILTER (WHERE candidates_capped) AS n FROM dups").column("n")[0].as_py()
    assert capped == 340


@pytest.mark.slow  # embeds and indexes twice
def test_dedup_without_an_index_keeps_one_sample_per_sha256(tmp_path):
    images = [encode(noise_image(seed), "PNG") for seed in range(4)]
    with_copies = [{"__key__": f"k{i}", "png": images[i % 4]} for i in range(7)]  # k4, k5, k6 copy k0, k1, k2
    for name, samples in (("copies", with_copies), ("distinct", with_copies[:4])):
        ws = Workspace(tmp_path / name)
        ingest(ws, [str(write_tar(tmp_path / f"{name}-shards" / "00000.tar", samples))], workers=1, progress=False)
        catalog.refresh(ws)
        if name == "copies":  # as a user would, from the command line: one line says what dedup did
            res = run_cli("select", "-w", str(ws.root), "--name", "one-each", "--policy", "dedup")
            assert res.returncode == 0, res.stderr
            assert "note: dedup: no near-duplicate clusters" in res.stderr and "one sample per sha256" in res.stderr
            manifest = json.loads((ws.root / "selections" / "one-each" / "manifest.json").read_text())
        else:
            manifest = select(ws, SelectConfig(name="one-each", policy="dedup")).manifest
        assert manifest["total"] == 4 and any("one sample per sha256" in note for note in manifest["notes"])
        rows = catalog.query(ws, "SELECT sample_id, sha256 FROM samples").to_pandas()
        assert len(rows) == len(samples)
        lowest = set(rows.sort_values("sample_id").groupby("sha256")["sample_id"].first())
        tars = [str(t) for t in sorted((ws.root / "selections" / "one-each").glob("*.tar"))]
        assert {s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)} == lowest


def test_similar_pairs_caps_each_vector_and_says_which_were_capped():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    x[:6] = x[0] + 0.01 * rng.standard_normal((6, 16)).astype(np.float32)  # six alike, six apart
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(x)
    every = similar_pairs(index, x, 0.95, max_neighbors=32)  # more slots than vectors: all 15 pairs, none capped
    assert sorted(zip(every.i.tolist(), every.j.tolist())) == [(a, b) for a in range(6) for b in range(a + 1, 6)]
    assert len(every.capped) == 0 and np.allclose(every.sim, np.einsum("ij,ij->i", x[every.i], x[every.j]))
    two = similar_pairs(index, x, 0.95, max_neighbors=2)
    assert sorted(two.capped.tolist()) == [0, 1, 2, 3, 4, 5] and two.examined <= 12 * 2
    assert set(zip(two.i.tolist(), two.j.tolist())) <= set(zip(every.i.tolist(), every.j.tolist()))
    assert np.bincount(np.concatenate([two.i, two.j]), minlength=12)[6:].sum() == 0
    # the IVF path: every list probed, the same pairs as the exact index
    ivf, _ = make_index(x, IndexConfig(ivf_threshold=1, nlist=2))
    ivf.add(x)
    ivf.nprobe = 2
    again = similar_pairs(ivf, x, 0.95, max_neighbors=32)
    assert (again.i == every.i).all() and (again.j == every.j).all()
