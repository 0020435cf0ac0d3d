import os
import pickle

import pytest
import torch

from distill.models import mnist_teacher
from distill.spec import ModelSpecError, load_model

from .conftest import run_cli


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_specs_load_every_supported_way(tmp_path):
    model = mnist_teacher()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.randn(2, 3, 32, 32)
    want = model.eval()(x)
    by_factory = load_model(f"distill.models:mnist_teacher@{tmp_path / 'w.pt'}")
    assert torch.allclose(by_factory.module(x), want)
    (tmp_path / "spec.json").write_text('{"factory": "distill.models:mnist_teacher", "weights": "w.pt", '
                                        '"input_size": 32, "mean": [0.5,0.5,0.5], "std": [0.5,0.5,0.5]}')
    by_json = load_model(str(tmp_path / "spec.json"))
    assert by_json.input_size == 32 and torch.allclose(by_json.module(x), want)
    torch.jit.trace(model, x).save(str(tmp_path / "m.torchscript.pt"))
    assert torch.allclose(load_model(str(tmp_path / "m.torchscript.pt")).module(x), want, atol=1e-6)
    assert load_model("torchvision:resnet18").module.fc.out_features == 1000


def test_unsafe_or_wrong_specs_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(ModelSpecError, match="need code to unpickle, which is refused"):
        load_model(f"distill.models:mnist_teacher@{tmp_path / 'evil.pt'}")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelSpecError, match="do not fit"):
        load_model(f"distill.models:mnist_teacher@{tmp_path / 'other.pt'}")
    for bad in ("no.such.module:factory", "missing.json", "torchvision:not_a_net", str(tmp_path / "evil.pt")):
        with pytest.raises(ModelSpecError):
            load_model(bad)


def test_bad_teacher_spec_on_the_command_line(tmp_path):
    res = run_cli("embed", "-w", str(tmp_path), "--embedder", "teacher", "--teacher", "no.such:thing")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
