import json

import pytest
import torch

from distill.models import mnist_teacher
from distill.spec import load_model
from flows.demo.teacher import INPUT_SIZE, evaluate_on_shards, train_demo_teacher

pytestmark = pytest.mark.slow  # trains the demo teacher for 3 epochs


def test_demo_teacher_trains_saves_and_reloads_safely(small_crawl):
    spec = train_demo_teacher(small_crawl, epochs=3, log=lambda *_: None)
    teacher_dir = small_crawl / "teacher"
    assert json.loads((teacher_dir / "teacher.json").read_text())["test_accuracy"] == spec["test_accuracy"]
    assert spec["test_accuracy"] > 0.8  # chance is 0.1; 20 epochs (the demo's default) give about 0.97

    # the spec's format: module:factory + a state_dict that loads with weights_only=True
    model = mnist_teacher()
    model.load_state_dict(torch.load(teacher_dir / spec["weights"], weights_only=True))
    model.eval()
    assert evaluate_on_shards(model, str(small_crawl / "eval" / "mnist-test.tar")) == spec["test_accuracy"]

    # the torch.export program loads through the checked, untrusted path with the spec as its sidecar
    exported = load_model(str(teacher_dir / spec["program"]))
    assert exported.kind == "pt2" and exported.input_size == INPUT_SIZE and exported.classes == spec["classes"]
    x = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.inference_mode():
        assert torch.allclose(exported.module(x), model(x), atol=1e-5)
    assert model.embed(x).shape == (4, model.feature_dim)
