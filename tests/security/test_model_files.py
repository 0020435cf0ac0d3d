"""Model files and specs from elsewhere stay data: without --trust-model-code nothing that came with a
model runs (TorchScript, a factory outside the allowlist, a .pt2 that torch.export.load would execute),
and every bad file (zip bomb, truncated, wrong shapes, a spec of the wrong type, a FIFO) is one typed
error, one CLI line, exit code 2. Each hostile file is built for real and writes a marker if it runs;
the tests check the markers stay absent (and, for the main ones, that the file really does write them
once trusted or loaded by torch directly: the flag and the checks are the only gate)."""
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from curation.embedders import EmbedderError, make_embedder
from curation.ingest import ingest
from curation.score import ScoreConfig, ScoreError, score
from curation.workspace import Workspace
from distill.model_files import MAX_DEFLATED_BYTES, save_exported_program
from distill.models import mnist_teacher, tiny_student
from distill.spec import ModelSpecError, UntrustedModelCode, load_model
from distill.students import StudentError, build_student
from flows.cli import main

from ..conftest import encode, meta, noise_image, run_cli, write_tar

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.* is deprecated upstream

MARKERS: dict[str, Path] = {}  # where `touch_marker` writes, set by the test that uses it


# -- hostile and benign models -------------------------------------------------------------------
class SetStateWrites(nn.Module):
    """TorchScript whose __setstate__ (run by torch.jit.load) creates a file with torch.from_file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        written = torch.from_file(self.marker, shared=True, size=8).numel()
        self.training = state[1] if written >= 0 else False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)[:, :10]


class ForwardWrites(nn.Module):
    """TorchScript whose forward creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.marker, shared=True, size=8)
        return torch.flatten(x, 1)[:, :10] + written.sum() * 0


def touch_marker() -> nn.Module:
    """A factory that leaves a trace when it runs."""
    MARKERS["factory"].touch()
    return tiny_student()


def not_a_module():
    return {"weights": "not a model"}


def raises_value_error():
    raise ValueError("factory failed on purpose")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) + torch.full((2,), 0.0)


class _Quadratic(nn.Module):
    """Memory that grows with the square of the batch: an outer product over the whole batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        flat = x.reshape(-1)
        return self.lin(x) + (flat[:, None] * flat[None, :]).sum() * 0


class _Flops(nn.Module):
    """About 1.1e12 floating-point operations per call from a few bytes of file: a matrix product of
    two 8192 x 8192 tensors that the graph makes itself."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        a = torch.ones(8192, 8192)
        return self.lin(x) + (a @ a).sum() * 0


def one_line(exc: BaseException) -> bool:
    return "\n" not in str(exc).strip()


def cli(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process, as `webdistill ...` would run it: exit code and its stderr alone."""
    capsys.readouterr()  # drop what came before (torch's own log lines)
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """Six ingested images: enough for `webdistill score` to load its models and run."""
    root = tmp_path_factory.mktemp("model-files")
    samples = [{"__key__": f"{i:04d}", "png": encode(noise_image(i, (40, 40)), "PNG"), "json": meta(f"{i:04d}")}
               for i in range(6)]
    write_tar(root / "crawl" / "00000.tar", samples)
    ws = Workspace(root / "ws")
    summary = ingest(ws, [str(root / "crawl" / "00000.tar")], workers=1, progress=False)
    assert summary.accepted == 6
    return ws


# -- TorchScript ---------------------------------------------------------------------------------
def test_torchscript_runs_only_with_trust(tmp_path, workspace, capsys):
    markers = {n: tmp_path / f"marker-{n}" for n in ("load", "forward")}
    files = {"setstate.torchscript.pt": SetStateWrites(str(markers["load"])),
             "forward.torchscript.pt": ForwardWrites(str(markers["forward"]))}
    for name, module in files.items():
        torch.jit.script(module).save(str(tmp_path / name))
    # disguised: a .pt2 name, a spec's weights, a .json sidecar beside it
    (tmp_path / "disguised.pt2").write_bytes((tmp_path / "setstate.torchscript.pt").read_bytes())
    (tmp_path / "setstate.torchscript.json").write_text(json.dumps({"input_size": 32}))
    specs = [str(tmp_path / "setstate.torchscript.pt"), str(tmp_path / "forward.torchscript.pt"),
             str(tmp_path / "disguised.pt2")]
    x = torch.zeros(2, 3, 32, 32)
    for spec in specs:
        with pytest.raises(UntrustedModelCode, match="--trust-model-code") as err:
            load_model(spec)
        assert one_line(err.value)
        with pytest.raises(EmbedderError, match="TorchScript"):
            make_embedder("teacher", teacher=spec, device="cpu")
        with pytest.raises(ScoreError, match="TorchScript"):
            score(workspace, ScoreConfig(teacher="distill.models:tiny_student", student=spec, name="ts"),
                  progress=False)
    with pytest.raises(ModelSpecError, match="not a state_dict"):  # as weights: never handed to torch.jit.load
        load_model(f"distill.models:tiny_student@{specs[0]}")
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", specs[0], "--name", "ts",
                    "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust-model-code" in err, err
    code, err = cli(capsys, "embed", "-w", str(workspace.root), "--embedder", "teacher", "--teacher", specs[1])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust-model-code" in err, err
    assert not any(m.exists() for m in markers.values())
    assert not (workspace.root / "scores" / "ts").exists()
    # the flag is the only gate: trusted, these files do write
    load_model(specs[0], trust_model_code=True)
    assert markers["load"].exists()
    load_model(specs[1], trust_model_code=True).module(x)
    assert markers["forward"].exists()


# -- factories -----------------------------------------------------------------------------------
FACTORIES = ["os:abort", "code:interact", "builtins:exec", "subprocess:Popen", "os:system", "pty:spawn",
             "importlib:import_module", "no.such.module:factory", "tests.security.test_model_files:touch_marker",
             "distill.models:SmallCNN.__init__", "distill.spec:load_model", ":", "os:"]


def test_factories_outside_the_allowlist_need_trust(tmp_path, workspace, capsys):
    MARKERS["factory"] = tmp_path / "factory-ran"
    torch.save(tiny_student().state_dict(), tmp_path / "w.pt")
    for i, factory in enumerate(FACTORIES):
        spec = tmp_path / f"spec{i}.json"
        spec.write_text(json.dumps({"factory": factory, "weights": "w.pt"}))
        student = tmp_path / f"student{i}.json"
        student.write_text(json.dumps({"factory": factory, "num_classes": 10, "weights": "w.pt"}))
        for attempt in (str(spec), str(student), factory, f"{factory}@{tmp_path / 'w.pt'}"):
            with pytest.raises(ModelSpecError) as err:
                load_model(attempt)
            assert one_line(err.value)
        with pytest.raises(StudentError):  # `webdistill distill --student` / a job config's student
            build_student(factory, 10)
    assert not MARKERS["factory"].exists()
    # through the CLI: os:abort would kill the process (exit -6), code:interact would wait on stdin
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", str(tmp_path / "spec0.json"),
                    "--name", "f")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'os'" in err and "--trust-model-code" in err, err
    code, err = cli(capsys, "synthesize", "-w", str(workspace.root), "--teacher", "code:interact", "--name", "f")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'code'" in err, err
    # the allowlist needs no trust: the project's registry and factories, torchvision and timm names
    for spec in ("distill.models:tiny_student", "torchvision:resnet18"):
        assert isinstance(load_model(spec).module, nn.Module)
    (tmp_path / "registry.json").write_text(json.dumps({"factory": "tiny_cnn", "num_classes": 10, "weights": "w.pt"}))
    assert hasattr(load_model(str(tmp_path / "registry.json")).module, "embed")
    # trusted, a factory runs: the refusal above was the gate
    load_model(f"tests.security.test_model_files:touch_marker@{tmp_path / 'w.pt'}", trust_model_code=True)
    assert MARKERS["factory"].exists()


# -- torch.export programs -------------------------------------------------------------------------
def _pt2(path: Path) -> Path:
    save_exported_program(_Small().eval(), torch.zeros(2, 3), path)
    return path


def _rewrite(src: Path, dst: Path, edit=None, members: dict | None = None) -> Path:
    """A copy of a .pt2 archive with models/model.json edited and members replaced or added."""
    members = dict(members or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for name in zin.namelist():
            tail, data = name[len(root) + 1:], zin.read(name)
            if tail == "models/model.json" and edit:
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            zout.writestr(name, members.pop(tail, data))
        for tail, data in members.items():
            zout.writestr(f"{root}/{tail}", data)
    return dst


def _nodes(program):
    return program["graph_module"]["graph"]["nodes"]


def _hostile_programs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (.pt2, its marker). The first five run code or write a file under plain torch.export.load."""
    base = _pt2(tmp_path / "base.pt2")
    m = {n: tmp_path / f"marker-{n}" for n in ("expr", "guard", "weight", "sample", "from_file", "misc")}
    with zipfile.ZipFile(base) as z:
        root = z.namelist()[0].split("/")[0]
        weights = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    fqn = next(iter(weights["config"]))
    pickled = json.loads(json.dumps(weights))
    pickled["config"][fqn]["use_pickle"] = True
    huge = json.loads(json.dumps(weights))
    huge["config"][fqn]["tensor_meta"]["sizes"] = [{"as_int": 10**6}, {"as_int": 10**6}]

    def expr(p):
        value = p["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        value["expr_str"] = (f"Symbol('s77', positive=True, integer=True) + "
                             f"0*len(str(__import__('os').system('touch {m['expr']}')))")

    def guard(p):
        p["guards_code"] = [f"__import__('os').system('touch {m['guard']}') == 0"]

    def from_file(p):
        node = next(n for n in _nodes(p) if n["target"] == "torch.ops.aten.full.default")
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [{"name": "filename", "arg": {"as_string": str(m["from_file"])}, "kind": 1},
                          {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                          {"name": "size", "arg": {"as_int": 2}, "kind": 1}]

    def huge_full(p):  # fine on fake tensors, 4 TB when run
        node = next(n for n in _nodes(p) if n["target"] == "torch.ops.aten.full.default")
        node["inputs"][0]["arg"] = {"as_ints": [10**6, 10**6]}

    def target(name):
        def edit(p):
            _nodes(p)[0]["target"] = name
        return edit

    def placeholder(p):  # fx writes placeholder names into the Python source of forward()
        injected = f"x):\n import os; os.system('touch {m['misc']}')\n def f(y"
        p["graph_module"]["graph"]["inputs"][-1]["as_tensor"]["name"] = injected

    def stack_trace(p):
        injected = f'File "a\rimport os; os.system(\'touch {m["misc"]}\')#", line 1, in f\n  x'
        _nodes(p)[0]["metadata"]["stack_trace"] = injected

    evil_sample = io.BytesIO()
    torch.save(((_Evil(m["sample"]),), {}), evil_sample)
    out = {
        "expr": (_rewrite(base, tmp_path / "expr.pt2", expr), m["expr"]),
        "guard": (_rewrite(base, tmp_path / "guard.pt2", guard), m["guard"]),
        "weight": (_rewrite(base, tmp_path / "weight.pt2", members={
            "data/weights/model_weights_config.json": json.dumps(pickled).encode(),
            f"data/weights/{weights['config'][fqn]['path_name']}": pickle.dumps(_Evil(m["weight"]))}), m["weight"]),
        "sample": (_rewrite(base, tmp_path / "sample.pt2", members={
            "data/sample_inputs/model.pt": evil_sample.getvalue()}), m["sample"]),
        "from_file": (_rewrite(base, tmp_path / "from_file.pt2", from_file), m["from_file"]),
        "torch.save target": (_rewrite(base, tmp_path / "save.pt2", target("torch.save")), m["misc"]),
        "builtins target": (_rewrite(base, tmp_path / "exec.pt2", target("builtins.exec")), m["misc"]),
        "higher-order op": (_rewrite(base, tmp_path / "hop.pt2", target("torch.ops.higher_order.cond")), m["misc"]),
        "placeholder injection": (_rewrite(base, tmp_path / "placeholder.pt2", placeholder), m["misc"]),
        "stack trace \\r": (_rewrite(base, tmp_path / "trace.pt2", stack_trace), m["misc"]),
        "AOTInductor library": (_rewrite(base, tmp_path / "aoti.pt2", members={
            "data/aotinductor/model/model.so": b"\x7fELF"}), m["misc"]),
        "legacy pickle member": (_rewrite(base, tmp_path / "legacy.pt2", members={
            "serialized_state_dict.pt": pickle.dumps(_Evil(m["misc"]))}), m["misc"]),
        "custom object": (_rewrite(base, tmp_path / "custom.pt2", members={
            "data/constants/model_constants_config.json": json.dumps({"config": {"obj": {
                "path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode(),
            "data/constants/custom_obj_0": pickle.dumps(_Evil(m["misc"]))}), m["misc"]),
        "a 10^12-element full()": (_rewrite(base, tmp_path / "full.pt2", huge_full), m["misc"]),
        "quadratic in the batch": (save_exported_program(_Quadratic().eval(), torch.zeros(2, 3),
                                                         tmp_path / "quadratic.pt2") or tmp_path / "quadratic.pt2",
                                   m["misc"]),
        "1.1e12 operations": (save_exported_program(_Flops().eval(), torch.zeros(2, 3), tmp_path / "flops.pt2")
                              or tmp_path / "flops.pt2", m["misc"]),
        "zeros bomb": (_rewrite(base, tmp_path / "zeros.pt2", members={
            "data/weights/model_weights_config.json": json.dumps(huge).encode()}), m["misc"]),
    }
    return out


def test_exported_programs_that_would_run_code_are_refused(tmp_path, workspace, capsys):
    hostile = _hostile_programs(tmp_path)
    x = torch.zeros(2, 3)
    # the holes are real: plain torch.export.load runs the first five
    for name in ("expr", "guard", "weight", "sample", "from_file"):
        path, marker = hostile[name]
        try:
            torch.export.load(str(path)).module()(x)
        except Exception:  # noqa: BLE001 - some fail after their code ran
            pass
        assert marker.exists(), name
        marker.unlink()
    for name, (path, marker) in hostile.items():
        with pytest.raises(ModelSpecError) as err:
            load_model(str(path)).module(x)
        assert one_line(err.value) and "refused" in str(err.value), (name, err.value)
        assert not marker.exists(), name
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", str(hostile["expr"][0]), "--name", "p")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused" in err, err
    assert not any(marker.exists() for _, marker in hostile.values())
    # the untouched program loads and runs; one that only fails the checks loads unchecked when trusted
    assert load_model(str(tmp_path / "base.pt2")).module(x).shape == (2, 2)
    assert load_model(str(hostile["quadratic in the batch"][0]), trust_model_code=True).module(x).shape == (2, 2)


# -- zip bombs and corrupt files -------------------------------------------------------------------
def _deflate_bomb(path: Path, unpacked: int, method=zipfile.ZIP_DEFLATED) -> Path:
    """A torch-like archive whose tensor member is `unpacked` zero bytes, compressed to almost nothing."""
    chunk = bytes(2**24)
    info = zipfile.ZipInfo("w/data/0")
    info.compress_type = method
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("w/data.pkl", pickle.dumps({}))
        with zf.open(info, "w", force_zip64=True) as fh:
            for _ in range(unpacked // len(chunk)):
                fh.write(chunk)
    return path


def _stored_zip(path: Path, size: int = 2**20) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("w/data/000", bytes(size))
    return path.read_bytes()


def _patch_central_sizes(data: bytes, compressed: int, unpacked: int) -> bytes:
    at = data.index(b"PK\x01\x02")
    return data[:at + 20] + struct.pack("<II", compressed, unpacked) + data[at + 28:]


def _overlapping(data: bytes, copies: int) -> bytes:
    """The same stored member listed `copies` times in the central directory (an overlapping bomb)."""
    cd = data.index(b"PK\x01\x02")
    eocd = data.index(b"PK\x05\x06")
    record = data[cd:eocd]
    name_len = struct.unpack("<H", record[28:30])[0]
    assert name_len == len("w/data/000")
    records = b"".join(record[:46] + f"w/data/{i:03d}".encode() + record[46 + name_len:] for i in range(copies))
    tail = data[eocd:eocd + 8] + struct.pack("<HHII", copies, copies, len(records), cd) + data[eocd + 20:]
    return data[:cd] + records + tail


def test_zip_bombs_and_corrupt_archives_are_refused_before_torch_reads_them(tmp_path, workspace, capsys):
    good = tmp_path / "good.pt"
    torch.save(tiny_student().state_dict(), good)
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("s/data/0", bytes(MAX_DEFLATED_BYTES + 2**20))
    stored = _stored_zip(tmp_path / "stored.zip")
    variants = {
        "deflated past the cap": _deflate_bomb(tmp_path / "deflate.pt", MAX_DEFLATED_BYTES + 2**24).read_bytes(),
        "bzip2 member": _deflate_bomb(tmp_path / "bz2.pt", 2**24, zipfile.ZIP_BZIP2).read_bytes(),
        "stored, lying size": _patch_central_sizes(stored, 2**20, 2**32 - 1),
        "stored, 4 GiB outside the file": _patch_central_sizes(stored, 2**32 - 2, 2**32 - 2),
        "overlapping members x64": _overlapping(stored, 64),
        "truncated": good.read_bytes()[: len(good.read_bytes()) // 2],
        "random bytes": os.urandom(4096),
        "empty": b"",
    }
    base = _pt2(tmp_path / "base.pt2")
    variants["pt2 with a nested deflate bomb"] = _rewrite(base, tmp_path / "nested.pt2", members={
        "data/sample_inputs/model.pt": nested.getvalue()}).read_bytes()
    variants["truncated pt2"] = base.read_bytes()[:-200]
    for i, (name, data) in enumerate(variants.items()):
        path = tmp_path / f"bomb{i}.pt"
        path.write_bytes(data)
        for spec in (f"distill.models:tiny_student@{path}", str(path)):
            with pytest.raises(ModelSpecError) as err:
                load_model(spec)
            assert one_line(err.value), (name, err.value)
        pt2 = tmp_path / f"bomb{i}.pt2"
        pt2.write_bytes(data)
        with pytest.raises(ModelSpecError):
            load_model(str(pt2))
    (tmp_path / "bomb.json").write_text(json.dumps({"factory": "tiny_cnn", "num_classes": 10, "weights": "bomb0.pt"}))
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", str(tmp_path / "bomb.json"), "--name", "z")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "zip bomb" in err, err


# -- specs of the wrong shape -----------------------------------------------------------------------
def test_bad_specs_and_weights_are_one_typed_error(tmp_path, workspace, capsys):
    torch.save(tiny_student().state_dict(), tmp_path / "w.pt")
    torch.save({**tiny_student().state_dict(), "classifier.weight": "text"}, tmp_path / "text.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    good = {"factory": "distill.models:tiny_student", "weights": "w.pt"}
    bad_json = [b"[]", b'"spec"', b"1", b"null", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b" " * (2**20 + 1)]
    bad_values = [{"factory": 5}, {"factory": ""}, {"factory": ["os:system"]}, {"weights": 5}, {"weights": ""},
                  {"weights": "missing.pt"}, {"weights": "."}, {"input_size": "32"}, {"input_size": True},
                  {"input_size": 0}, {"input_size": 10**9}, {"mean": [1, 2]}, {"mean": ["a", 1, 2]},
                  {"std": [0, 1, 1]}, {"std": [float("nan")] * 3}, {"classes": "abc"}, {"classes": [1, 2]},
                  {"num_classes": 0}, {"num_classes": "10"}, {"factory": "tiny_cnn", "num_classes": 10, "kd3": "x"},
                  {"factory": "tiny_cnn", "num_classes": 10, "kd3": {"teacher_channels": -1, "factor": 2}},
                  {"factory": "distill.models:mnist_teacher"},  # tiny_student's weights: shapes do not fit
                  {"weights": "text.pt"}, {"weights": "list.pt"}]
    specs = []
    for i, text in enumerate(bad_json):
        (tmp_path / f"bad{i}.json").write_bytes(text)
        specs.append(str(tmp_path / f"bad{i}.json"))
    for i, change in enumerate(bad_values):
        (tmp_path / f"value{i}.json").write_text(json.dumps(good | change))
        specs.append(str(tmp_path / f"value{i}.json"))
    (tmp_path / "folder.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    os.mkfifo(tmp_path / "fifo.pt2")
    (tmp_path / "zero.pt2").symlink_to("/dev/zero")
    specs += [str(tmp_path / n) for n in ("folder.json", "fifo.json", "fifo.pt2", "zero.pt2")] + [str(tmp_path)]
    specs += [f"distill.models:mnist_teacher@{tmp_path / 'w.pt'}",
              f"distill.models:tiny_student@{tmp_path / 'fifo.pt2'}"]

    def wrong_arguments(program):  # passes the safety checks, does not deserialize
        _nodes(program)[0]["inputs"] = [{"name": "nope", "arg": {"as_int": 3}, "kind": 1}]

    malformed = str(_rewrite(_pt2(tmp_path / "base.pt2"), tmp_path / "malformed.pt2", wrong_arguments))
    specs.append(malformed)
    for spec in specs:
        with pytest.raises(ModelSpecError) as err:
            load_model(spec)
        assert one_line(err.value), (spec[:60], err.value)
    # a factory that gives no module, or fails: typed too (it runs only trusted)
    for factory, message in (("not_a_module", "not a torch nn.Module"), ("raises_value_error", "failed")):
        with pytest.raises(ModelSpecError, match=message):
            load_model(f"tests.security.test_model_files:{factory}", trust_model_code=True)
    # through the CLI: a FIFO does not hang it, a trusted non-module factory is one line
    proc = run_cli("score", "-w", str(workspace.root), "--teacher", str(tmp_path / "fifo.json"), "--name", "b")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    code, err = cli(capsys, "score", "-w", str(workspace.root),
                    "--teacher", "tests.security.test_model_files:not_a_module", "--trust-model-code", "--name", "b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nn.Module" in err, err
    not_fitting = len(bad_json) + bad_values.index({"factory": "distill.models:mnist_teacher"})
    for i in (1, 4, not_fitting, -1):  # not an object, invalid JSON, weights that do not fit, a malformed .pt2
        code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", specs[i], "--name", "b")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err


# -- the safe formats work end to end ----------------------------------------------------------------
def test_exported_teacher_and_student_json_score_without_trust(tmp_path, workspace, capsys):
    prep = {"input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "classes": [str(c) for c in range(10)]}
    torch.manual_seed(0)
    teacher = mnist_teacher().eval()
    save_exported_program(teacher, torch.zeros(2, 3, 32, 32), tmp_path / "teacher.pt2")
    (tmp_path / "teacher.json").write_text(json.dumps({"factory": "distill.models:mnist_teacher", **prep}))
    torch.save(tiny_student().state_dict(), tmp_path / "student.pt")
    (tmp_path / "student.json").write_text(json.dumps({"factory": "tiny_cnn", "num_classes": 10,
                                                       "weights": "student.pt", **prep}))
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", str(tmp_path / "teacher.pt2"), "--student",
                    str(tmp_path / "student.json"), "--name", "e2e", "--workers", "0", "--device", "cpu")
    assert code == 0, err
    from curation import catalog

    row = catalog.query(workspace, "SELECT count(*) AS n, count(agreement) AS a, count(teacher_conf) AS t "
                                   "FROM scores WHERE run = 'e2e'").to_pylist()[0]
    assert row["n"] == row["a"] == row["t"] == 6
    # a benign TorchScript teacher still loads when the user trusts it
    torch.jit.trace(teacher, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "teacher.torchscript.pt"))
    (tmp_path / "teacher.torchscript.json").write_text(json.dumps(prep))
    code, err = cli(capsys, "score", "-w", str(workspace.root), "--teacher", str(tmp_path / "teacher.torchscript.pt"),
                    "--trust-model-code", "--name", "trusted", "--workers", "0", "--device", "cpu")
    assert code == 0, err
