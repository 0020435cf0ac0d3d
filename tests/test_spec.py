import os
import pickle

import pytest
import torch

from distill.model_files import save_exported_program
from distill.models import mnist_teacher
from distill.spec import ModelSpecError, UntrustedModelCode, load_model

from .conftest import run_cli


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
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
    save_exported_program(model, x, tmp_path / "m.pt2")  # no m.json beside it: default preprocessing
    exported = load_model(str(tmp_path / "m.pt2"))
    assert exported.kind == "pt2" and exported.input_size == 224 and torch.allclose(exported.module(x), want, atol=1e-6)
    # TorchScript runs its own code: only with the user's trust
    torch.jit.trace(model, x).save(str(tmp_path / "m.torchscript.pt"))
    with pytest.raises(UntrustedModelCode, match="trust-model-code"):
        load_model(str(tmp_path / "m.torchscript.pt"))
    scripted = load_model(str(tmp_path / "m.torchscript.pt"), trust_model_code=True)
    assert scripted.kind == "torchscript" and torch.allclose(scripted.module(x), want, atol=1e-6)
    assert load_model("torchvision:resnet18").module.fc.out_features == 1000
    # a module:factory outside the allowlist: only with trust
    with pytest.raises(UntrustedModelCode):
        load_model("tests.models_for_tests:thumbnail")
    assert load_model("tests.models_for_tests:thumbnail", trust_model_code=True).module.classifier.out_features == 10


def test_unsafe_or_wrong_specs_are_refused(tmp_path):
    torch.save({"w": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelSpecError, match="need code to unpickle, which is refused"):
        load_model(f"distill.models:mnist_teacher@{tmp_path / 'evil.pt'}")
    with open(tmp_path / "raw.pt", "wb") as fh:  # a bare pickle (torch's legacy format) is not read at all
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(ModelSpecError, match="not a torch archive"):
        load_model(f"distill.models:mnist_teacher@{tmp_path / 'raw.pt'}")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelSpecError, match="do not fit"):
        load_model(f"distill.models:mnist_teacher@{tmp_path / 'other.pt'}")
    for bad in ("no.such.module:factory", "missing.json", "torchvision:not_a_net", "timm:hf-hub:x/y",
                str(tmp_path / "evil.pt"), str(tmp_path / "other.pt")):
        with pytest.raises(ModelSpecError):
            load_model(bad)
    with pytest.raises(ModelSpecError, match="cannot import"):
        load_model("no.such.module:factory", trust_model_code=True)


@pytest.mark.slow  # two CLI embed processes, each loading torch
def test_bad_teacher_spec_on_the_command_line(tmp_path):
    for trust in ([], ["--trust-model-code"]):
        res = run_cli("embed", "-w", str(tmp_path), "--embedder", "teacher", "--teacher", "no.such:thing", *trust)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert ("cannot import" if trust else "--trust-model-code") in res.stderr
