"""The pipeline YAML is checked whole on load, each section against its stage's config, and the
stage configs (pydantic dataclasses) keep the hashes that finished workspaces were stamped with."""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from curation.crawl import CrawlConfig
from curation.index import IndexConfig
from curation.score import ScoreConfig, ScoreError
from curation.select import SelectConfig
from curation.synthesize import SynthConfig
from curation.validate import ValidationConfig, ValidationConfigError
from curation.workspace import config_hash
from flows.pipeline_config import SECTIONS, PipelineConfigError, load_pipeline_config

INFRA = Path(__file__).resolve().parents[1] / "infra" / "config" / "pipeline.yaml"
BASE = yaml.safe_load(INFRA.read_text())


def load(tmp_path, raw: dict):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_pipeline_config(path)


def with_key(keys: tuple, value) -> dict:
    raw = copy.deepcopy(BASE)
    at = raw
    for key in keys[:-1]:
        at = at.setdefault(key, {})
    at[keys[-1]] = value
    return raw


def test_a_valid_pipeline_loads_its_sections_as_written(tmp_path):
    cfg = load(tmp_path, BASE)
    assert cfg.sections == {k: BASE[k] for k in SECTIONS if k in BASE}
    assert (cfg.name, cfg.rounds, cfg.workers, cfg.workspace) == ("nightly", 2, 2, "/workspace")


def test_the_demo_pipeline_loads(tmp_path):
    from flows.demo.run import pipeline_config

    class Ws:
        root = tmp_path / "ws"

    clip = {"embedder": "open_clip:ViT-S-32", "path": str(tmp_path / "clip.pt")}
    path = pipeline_config(Ws(), tmp_path, clip, rounds=2, workers=2, distill_epochs=3)
    raw = yaml.safe_load(path.read_text())
    assert load_pipeline_config(path).sections == {k: raw[k] for k in SECTIONS if k in raw}


@pytest.mark.parametrize(("keys", "value", "line"), [
    (("distill", "epoch"), 3, "unknown key 'distill.epoch' (did you mean 'epochs'?)"),
    (("index", "dup_treshold"), 0.9, "unknown key 'index.dup_treshold' (did you mean 'dup_threshold'?)"),
    (("select", "polcy"), "dedup", "unknown key 'select.polcy' (did you mean 'policy'?)"),
    (("crawl", "url_lst"), "u.parquet", "unknown key 'crawl.url_lst' (did you mean 'url_list'?)"),
    (("score", "options", "odn"), True, "unknown key 'score.options.odn' (did you mean 'odin'?)"),
    (("embed", "batchsize"), 3, "unknown key 'embed.batchsize' (did you mean 'batch_size'?)"),
    (("ingest", "shard"), "x", "unknown key 'ingest.shard' (did you mean 'shards'?)"),
    (("synthesize", "per_clas"), 3, "unknown key 'synthesize.per_clas' (did you mean 'per_class'?)"),
    (("report", "ot"), "r.html", "unknown key 'report.ot' (did you mean 'out'?)"),
    (("knn_scores",), [{"name": "a", "promts": ["x"]}], "unknown key 'knn_scores[0].promts' (did you mean 'prompts'?)"),
    (("round",), 2, "unknown key 'round' (did you mean 'rounds'?)"),
    (("nonsense",), 1, "unknown key 'nonsense' (known: workspace"),
])
def test_a_typo_anywhere_is_one_line_naming_the_full_key(tmp_path, keys, value, line):
    with pytest.raises(PipelineConfigError) as err:
        load(tmp_path, with_key(keys, value))
    assert line in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("keys", "value", "line"), [
    (("distill", "epochs"), "3", "key 'distill.epochs' must be int, got '3'"),
    (("rounds",), 0, "key 'rounds' must be >= 1, got 0"),
    (("trust_model_code",), "yes", "key 'trust_model_code' must be bool, got 'yes'"),
    (("crawl", "concurrency"), 0, "crawl: concurrency must be > 0, got 0"),
    (("index", "verify"), "maybe", "index: verify must be one of pixels, none, not 'maybe'"),
    (("index", "dup_max_neighbors"), "many", "key 'index.dup_max_neighbors' must be int, got 'many'"),
    (("score", "options", "knn_k"), 0, "key 'score.options.knn_k' must be > 0, got 0"),
    (("score", "options", "feature_layers"), ["layer4", "a b"], "feature layers: 'a b' is not a layer name"),
    (("embed", "feature_layers"), [], "feature layers: give at least one layer name"),
    (("select", "limit"), 0, "select: limit must be an integer >= 1, got 0"),
    (("distill", "loss"), {"T": 4.0}, "config key 'loss' needs a 'method'"),
    (("select", "score_run"), "x", "select.score_run: each round reads the scoring run it made"),
    (("score", "options", "teacher"), "x", "score.options.teacher: the pipeline sets it"),
    (("distill", "selection"), "x", "distill.selection: the pipeline sets it"),
    (("select", "synthetic"), ["../x"], "synthetic set name '../x' is not allowed"),
    (("select", "policy"), "dedup | nonsense", "select.policy: unknown policy 'nonsense'"),
    (("select", "policy"), "topk:k=5;by=msp;tau=1", "select.policy:"),
])
def test_a_bad_value_is_one_line_before_any_stage_runs(tmp_path, keys, value, line):
    with pytest.raises(PipelineConfigError) as err:
        load(tmp_path, with_key(keys, value))
    assert line in str(err.value) and "\n" not in str(err.value)


def test_a_missing_section_names_it(tmp_path):
    raw = copy.deepcopy(BASE)
    del raw["score"]
    with pytest.raises(PipelineConfigError, match="missing key 'score'"):
        load(tmp_path, raw)


def test_the_select_section_and_its_policy_are_optional(tmp_path):
    # without a policy (or without the section) the select stage applies the default policy
    raw = copy.deepcopy(BASE)
    raw["select"] = {"limit": 1500}
    assert load(tmp_path, raw).sections["select"] == {"limit": 1500}
    del raw["select"]
    assert "select" not in load(tmp_path, raw).sections


def test_stage_configs_raise_their_own_one_line_errors():
    with pytest.raises(ScoreError, match=r"^score config: unknown key 'odn' \(did you mean 'odin'\?\)$"):
        ScoreConfig(teacher="t", odn=True)
    with pytest.raises(ValidationConfigError, match=r"^validation config: key 'max_pixels' must be > 0, got 0$"):
        ValidationConfig(max_pixels=0)


# The hashes below were computed before the configs became pydantic dataclasses: a float key given
# as an int (`dup_threshold: 1`) must hash as it did, or a finished stage would be redone.
PINNED = {
    "crawl": (lambda: CrawlConfig(timeout_s=10, allowed_formats=("jpeg", "png"), min_side=16).acceptance(),
              "e1534cb5d8cd7dc3"),
    "index": (lambda: IndexConfig(dup_threshold=1, dup_max_crop=0.06).dups_part() | IndexConfig(nlist=64).index_part(),
              "1370d76041626d4d"),
    "select": (lambda: asdict(SelectConfig("sel", policy="dedup | kd3", limit=10, synthetic=("syn",))),
               "dd9bb21188b5bbcb"),
    "synth": (lambda: asdict(SynthConfig("t.json", "syn", weight=1, per_class=5, conf_threshold=0)),
              "3cde96b8c6907ab4"),
    "score": (lambda: ScoreConfig("t", odin_temperature=1000, kd3_alpha=1, batch_size=64).pass2_part()
              | asdict(ScoreConfig("t", odin_temperature=1000, kd3_alpha=1)),
              "3e425568d8ede9b4"),  # + reference fields, + feature_layers (None: the default layers)
    "validation": (lambda: ValidationConfig(max_pixels=1_000_000, formats=("jpeg",)).as_dict(), "fc9281fad65a73de"),
}


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_config_hashes_are_unchanged(stage):
    build, pinned = PINNED[stage]
    assert config_hash(build()) == pinned
