"""Config models checked by pydantic, reported in one line that names the key: the helper itself, the
distill job config, the loss parameters and the selection policies' parameters."""
from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from curation.config_errors import did_you_mean, key_path, validation_line
from curation.policies import PolicyError, parse_policy
from distill.config import ConfigError, DistillConfig, config_from_dict
from distill.losses import LOSSES, LossConfigError, build_distiller
from distill.models import tiny_student


# -- the helper, on a model of its own --------------------------------------------------------------
class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rate: float = 1.0
    steps: PositiveInt = 3


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1)]
    inner: Inner = Inner()
    shards: str | list[str] | None = None
    sizes: Annotated[list[int], Field(min_length=2, max_length=2)] = [1, 2]


def line(raw, **kw) -> str:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(raw)
    return validation_line(info.value, Outer, **kw)


@pytest.mark.parametrize("raw, expected", [
    ({"name": "a", "nmae": "b"}, "unknown key 'nmae' (did you mean 'name'?)"),
    ({"name": "a", "zzz": 1}, "unknown key 'zzz' (known: name, inner, shards, sizes)"),
    ({"name": "a", "inner": {"rte": 2.0}}, "unknown key 'inner.rte' (did you mean 'rate'?)"),
    ({"name": "a", "inner": {"Steps": 2}}, "unknown key 'inner.Steps' (did you mean 'steps'?)"),
    ({}, "missing key 'name'"),
    ({"nam": "a"}, "unknown key 'nam' (did you mean 'name'?)"),  # the typo, not the missing key it causes
    ({"name": ""}, "key 'name' must be a non-empty string, got ''"),
    ({"name": 3}, "key 'name' must be a string, got 3"),
    ({"name": "a", "inner": {"rate": "fast"}}, "key 'inner.rate' must be float, got 'fast'"),
    ({"name": "a", "inner": {"rate": True}}, "key 'inner.rate' must be float, got True"),
    ({"name": "a", "inner": {"steps": 2.0}}, "key 'inner.steps' must be int, got 2.0"),
    ({"name": "a", "inner": {"steps": 0}}, "key 'inner.steps' must be > 0, got 0"),
    ({"name": "a", "inner": []}, "key 'inner' must be a mapping, got []"),
    ({"name": "a", "shards": 3}, "key 'shards' must be a string or a list, got 3"),
    ({"name": "a", "shards": ["x", 3]}, "key 'shards[1]' must be a string, got 3"),
    ({"name": "a", "sizes": [1]}, "key 'sizes' must have at least 2 items, got [1]"),
    ({"name": "a", "sizes": [1, 2, 3]}, "key 'sizes' must have at most 2 items, got [1, 2, 3]"),
])
def test_a_validation_error_is_one_line_naming_the_key(raw, expected):
    assert line(raw) == expected


def test_where_and_noun_frame_the_line():
    assert line({"name": "a", "inner": {"stpes": 1}}, where="job.yaml: ", noun="setting") == \
        "job.yaml: unknown setting 'inner.stpes' (did you mean 'steps'?)"
    with pytest.raises(ValidationError) as info:
        Outer.model_validate([1])
    assert validation_line(info.value, Outer, where="job.yaml: ") == "job.yaml: must be a mapping, got list"


def test_key_paths_and_hints():
    assert key_path(("loss", "extra", 0, "T")) == "loss.extra[0].T"
    assert key_path(()) == ""
    assert did_you_mean("epoch", ["epochs", "lr"]) == " (did you mean 'epochs'?)"
    assert did_you_mean("x", []) == " (known: none)"


# -- the distill job config ------------------------------------------------------------------------
BASE = {"selection": "s/manifest.json", "student": "tiny_cnn", "out": "o"}


@pytest.mark.parametrize("change, expected", [
    ({"epoch": 3}, "unknown config key 'epoch' (did you mean 'epochs'?)"),
    ({"batchsize": 3}, "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ({"Seed": 3}, "unknown config key 'Seed' (did you mean 'seed'?)"),
    ({"epochs": "3"}, "config key 'epochs' must be int, got '3'"),
    ({"epochs": 2.5}, "config key 'epochs' must be int, got 2.5"),
    ({"batch_size": True}, "config key 'batch_size' must be int, got True"),
    ({"lr": "fast"}, "config key 'lr' must be float, got 'fast'"),
    ({"progress": "yes"}, "config key 'progress' must be bool, got 'yes'"),
    ({"epochs": 0}, "config key 'epochs' must be > 0, got 0"),
    ({"lr": -0.1}, "config key 'lr' must be > 0, got -0.1"),
    ({"workers": -1}, "config key 'workers' must be >= 0, got -1"),
    ({"optimizer": "lion"}, "config key 'optimizer' must be 'sgd' or 'adamw', got 'lion'"),
    ({"teacher_mode": "cached"}, "config key 'teacher_mode' must be 'stored' or 'live', got 'cached'"),
    ({"mean": [0.5, 0.5]}, "config key 'mean' must have at least 3 items, got [0.5, 0.5]"),
    ({"std": [0.2, 0, 0.2]}, "config key 'std[1]' must be > 0, got 0"),
    ({"eval": 7}, "config key 'eval' must be a string or a list, got 7"),
    ({"eval": []}, "config key 'eval' must not be empty, got []"),
    ({"eval": ["a.tar", ""]}, "config key 'eval[1]' must be a non-empty string, got ''"),
    ({"loss": "kd"}, "config key 'loss' must be a mapping, got 'kd'"),
    ({"student": None}, "config key 'student' must be a string, got None"),
    ({"samples_per_epoch": 10, "batch_size": 32},
     "config key 'samples_per_epoch' (10) is below 'batch_size' (32): an epoch would have no step"),
])
def test_distill_config_errors_name_the_key(change, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **change})
    assert str(info.value) == expected


def test_distill_config_errors_from_its_validators():
    with pytest.raises(ConfigError, match=r"^config key 'loss' needs a 'method' \(kd, ") as info:
        config_from_dict({**BASE, "loss": {"T": 4}})
    assert all(method in str(info.value) for method in LOSSES)  # the names come from the registry
    with pytest.raises(ConfigError, match=r"^config key 'student': unknown student 'resnet' \(known: tiny_cnn"):
        config_from_dict({**BASE, "student": "resnet"})
    missing = dict(BASE)
    del missing["out"]
    with pytest.raises(ConfigError, match=r"^missing config key 'out'$"):
        config_from_dict(missing)


def test_distill_config_types_and_hash_are_the_dataclass_ones():
    cfg = DistillConfig.model_validate({**BASE, "lr": 1, "mean": [0.5, 0.5, 1], "loss": {"method": "kd", "T": 2}})
    assert isinstance(cfg.lr, float) and cfg.mean == [0.5, 0.5, 1.0] and isinstance(cfg.mean[2], float)
    # the hash the dataclass version gave for the same config: a run resumes its checkpoint across the change
    assert cfg.trajectory_hash() == "51223e0d12a01a00"
    assert cfg.to_dict()["epochs"] == 10 and cfg.run_name == "o"


@pytest.mark.parametrize("change, same", [
    ({}, True),  # the same files elsewhere, another selection path and out folder: the same run
    ({"init.pt": b"other weights"}, False),  # other bytes under the same name
    ({"teacher.pt": b"other teacher"}, False),
    ({"epochs": 2}, False),
])
def test_content_hash_names_files_by_their_bytes_not_their_place(tmp_path, change, same):
    def config(root, files, **kw):
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        return DistillConfig.model_validate({**BASE, "selection": str(root / "manifest.json"), "out": str(root / "o"),
                                             "init_from": str(root / "init.pt"), "teacher": str(root / "teacher.pt"),
                                             **kw})
    files = {"init.pt": b"weights", "teacher.pt": b"teacher"}
    first = config(tmp_path / "a", files)
    second = config(tmp_path / "b", files | {k: v for k, v in change.items() if k.endswith(".pt")},
                    **{k: v for k, v in change.items() if not k.endswith(".pt")})
    assert (first.content_hash() == second.content_hash()) is same
    assert first.trajectory_hash() != second.trajectory_hash()  # paths as spelled: what old checkpoints carry


# -- loss parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [
    ({"method": "kd", "Tx": 2}, "loss 'kd': unknown parameter 'Tx' (did you mean 'T'?)"),
    ({"method": "kd", "t": 2}, "loss 'kd': unknown parameter 't' (did you mean 'T'?)"),
    ({"method": "kd", "alpha": 2}, "loss 'kd': unknown parameter 'alpha' (known: T, mse)"),
    ({"method": "ce", "T": 2}, "loss 'ce': unknown parameter 'T' (known: none)"),
    ({"method": "kd", "T": "hot"}, "loss 'kd': parameter 'T' must be float, got 'hot'"),
    ({"method": "kd", "T": None}, "loss 'kd': parameter 'T' must be float, got None"),
    ({"method": "kd", "mse": 1}, "loss 'kd': parameter 'mse' must be bool, got 1"),
    ({"method": "kd", "T": -1}, "loss 'kd': T must be > 0, got -1.0"),
    ({"method": "confidence_weighted", "T": 0}, "loss 'confidence_weighted': T must be > 0, got 0.0"),
    ({"method": "kd", "weights": {"kd": "x"}}, "loss 'kd': weights: term 'kd' must be float, got 'x'"),
    ({"method": "kd", "weights": {"kd": -1}}, "loss 'kd': weights: term 'kd' must be >= 0, got -1"),
    ({"method": "kd", "weights": {"kdd": 1}}, "loss 'kd': weights: unknown term 'kdd' (did you mean 'kd'?)"),
    ({"method": "kd", "weights": [1]}, "loss 'kd': weights: must be a mapping, got list"),
    ({"method": "kd", "extra": [{"method": "ce", "T": 2}]}, "loss 'ce': unknown parameter 'T' (known: none)"),
])
def test_loss_parameter_errors_name_the_parameter(config, expected):
    with pytest.raises(LossConfigError) as info:
        build_distiller(config, tiny_student(10), None, 10)
    assert str(info.value) == expected


@pytest.mark.parametrize("method, params, expected", [
    ("kd3", {"epochs": 0}, "loss 'kd3': epochs must be > 0, got 0"),
    ("kd3", {"embed_dim": 1.5}, "loss 'kd3': parameter 'embed_dim' must be int, got 1.5"),
    ("kd3", {"tau": 1.0}, "loss 'kd3': tau must be in (0, 1), got 1.0"),
    ("kd3", {"selct": False}, "loss 'kd3': unknown parameter 'selct' (did you mean 'select'?)"),
    ("kd3", {"variant": "paper"}, "loss 'kd3': parameter 'variant' must be 'official' or 'webdistill', got 'paper'"),
    ("kd3", {"count": "some"}, "loss 'kd3': parameter 'count' must be 'all' or 'confident', got 'some'"),
    ("sakd", {"variant": 3}, "loss 'sakd': parameter 'variant' must be 'official' or 'webdistill', got 3"),
    ("sakd", {"wraps": "kd"}, "loss 'sakd': parameter 'wraps' must be a list, got 'kd'"),
    ("sakd", {"wraps": ["kd", 3]}, "loss 'sakd': parameter 'wraps[1]' must be a string, got 3"),
    ("sakd", {"wraps": ["kd", "kd"]}, "loss 'sakd': wraps must list distinct methods among fitnet, at, kd, "
                                      "got ['kd', 'kd']"),
])
def test_feature_loss_parameter_errors(method, params, expected):
    with pytest.raises(LossConfigError) as info:
        LOSSES[method].resolve_params(params)
    assert str(info.value) == expected


def test_loss_parameters_are_typed_with_their_defaults():
    assert LOSSES["kd"].resolve_params({"T": 2}) == {"T": 2.0, "mse": False}
    assert LOSSES["kd3"].resolve_params({"epochs": None})["epochs"] is None
    assert LOSSES["sakd"].resolve_params({})["wraps"] == ["at", "kd"]
    assert LOSSES["sakd"].resolve_weights({"at": 10}) == {"fitnet": 1.0, "at": 10.0, "kd": 1.0, "policy": 1.0,
                                                          "ce": 1.0}
    # a variant's preset changes defaults only: what the config gives wins
    earlier = LOSSES["sakd"].resolve_params({"variant": "webdistill", "gamma": 3})
    assert earlier["wraps"] == ["fitnet", "at", "kd"] and earlier["gamma"] == 3.0 and earlier["last_stage"] is False
    assert LOSSES["sakd"].resolve_weights({"ce": 0.5}, earlier)["ce"] == 0.5
    assert LOSSES["sakd"].resolve_weights({}, earlier)["ce"] == 0.0


# -- selection policy parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("topk:k=3;bye=msp", "policy step 'topk': unknown parameter 'bye' (did you mean 'by'?)"),
    ("softmax:k=3;by=msp;Tau=2", "policy step 'softmax': unknown parameter 'Tau' (did you mean 'tau'?)"),
    ("balance:per_clas=3", "policy step 'balance': unknown parameter 'per_clas' (did you mean 'per_class'?)"),
    ("dedup:x=1", "policy step 'dedup': unknown parameter 'x' (known: by)"),
    ("topk:k=3;by=msp;order=asc", "policy step 'topk': unknown parameter 'order' (known: k, by)"),
    ("topk:by=msp", "policy step 'topk': missing parameter 'k'"),
    ("diversity:by=msp", "policy step 'diversity': missing parameter 'max_per_cluster'"),
    ("topk:k=three;by=msp", "policy parameter k='three' must be a positive integer"),
    ("threshold:by=msp;max=high", "policy parameter max='high' must be a number"),
    ("kd3:tau=0", "policy parameter tau='0' must be in (0, 1]"),
    ("softmax:k=3;by=msp;replace=maybe", "policy parameter replace='maybe' must be true or false"),
])
def test_policy_parameter_errors_keep_their_shape(spec, expected):
    with pytest.raises(PolicyError) as info:
        parse_policy(spec)
    assert str(info.value) == expected
