"""The shard reader's batches: one shard per batch, the same batches for a shard whatever else is read
with it. A rerun after a crash skips finished shards, so this is what makes its outputs bit for bit
those of an uninterrupted run (a model's kernels differ in their last bits with a batch's mix)."""
import numpy as np
import pytest
import torch

from curation.ingest import ingest
from curation.shard_reader import load_images, per_shard_outputs, shard_jobs
from curation.workspace import Workspace

from .conftest import encode, meta, noise_image, write_tar

SIZES = {"a": 7, "b": 12, "c": 3, "d": 10}  # shards of uneven sizes, none a multiple of the batch size


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("reader")
    seed = 0
    for shard, n in SIZES.items():
        samples = []
        for i in range(n):
            seed += 1
            samples.append({"__key__": f"{shard}{i:03d}", "jpg": encode(noise_image(seed, (16, 16)), "JPEG"),
                            "json": meta(f"{shard}{i:03d}")})
        write_tar(root / "crawl" / f"{shard}.tar", samples)
    ws = Workspace(root / "ws")
    ingest(ws, [str(root / "crawl")], workers=1, progress=False)
    return ws


def _pixel_mean(img) -> torch.Tensor:
    return torch.as_tensor(np.asarray(img.convert("L").resize((4, 4)), dtype=np.float32))


def _batches(jobs, batch_size, workers):
    return [(jobs[int(j[0])].shard, rows.tolist())
            for j, rows, _, _ in load_images(jobs, _pixel_mean, batch_size, workers, progress=False)]


@pytest.mark.parametrize("batch_size", [1, 4, 5, 64])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_holds_one_shard_and_a_shard_is_batched_alike_alone_or_with_others(ws, batch_size, workers):
    jobs = shard_jobs(ws)
    together = _batches(jobs, batch_size, workers)
    for j, job in enumerate(jobs):
        mine = [rows for shard, rows in together if shard == job.shard]
        assert sorted(r for rows in mine for r in rows) == list(range(SIZES[job.shard]))
        assert mine == [rows for _, rows in _batches(jobs[j:j + 1], batch_size, 0)], job.shard
        assert all(len(rows) <= batch_size for rows in mine)


@pytest.mark.parametrize("skipped", [["a"], ["a", "b"], ["b", "d"]])
def test_outputs_that_depend_on_the_batch_equal_for_a_rerun_that_skips_finished_shards(ws, skipped):
    """A compute that sees its whole batch (each sample's output is its batch's mean) gives every
    shard the same outputs in the full run and in a rerun of what was not finished."""
    def batch_mean(x):
        return {"m": np.full(len(x), float(x.mean()), np.float32), "own": x.flatten(1).mean(1).numpy()}

    jobs = shard_jobs(ws)
    full = {jobs[j].shard: out for j, out, _ in per_shard_outputs(jobs, _pixel_mean, batch_mean, 5, 1, False)}
    rest = [job for job in jobs if job.shard not in skipped]
    rerun = {rest[j].shard: out for j, out, _ in per_shard_outputs(rest, _pixel_mean, batch_mean, 5, 1, False)}
    assert set(rerun) == set(SIZES) - set(skipped)
    for shard, out in rerun.items():
        assert out["m"].tobytes() == full[shard]["m"].tobytes(), shard
        assert out["own"].tobytes() == full[shard]["own"].tobytes(), shard
