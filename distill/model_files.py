"""Model files read as data: nothing in them runs unless the user says they trust it.

- `read_model_file`: a regular file of at most MAX_MODEL_BYTES, read once into memory (what is
  checked is what torch loads).
- `check_zip`: torch stores tensors uncompressed (TorchScript deflates its code). Stored members whose
  declared sizes do not fit in the file (lying headers, overlapping members), compressed members that
  declare more than MAX_DEFLATED_BYTES unpacked, and other compressions are refused from the zip
  directory alone, before torch reads anything (a zip bomb).
- `load_state_dict`: torch.load with weights_only=True.
- `load_exported_program`: a torch.export archive (.pt2). torch.export.load is not safe on its own in
  this torch (2.14): it unpickles pickled weights, constants and sample inputs with weights_only=False,
  loads AOTInductor shared libraries, hands shape expressions to sympify (eval) and guard code to exec,
  and torch.fx writes names from the file into Python source. So the archive is checked first:
  the member layout torch.export.save writes (no AOTInductor, no legacy members), no pickled payload or
  custom object, tensor payloads that fit their records, shape expressions from a small grammar, names
  that are plain identifiers, guard code from a small grammar, and graph nodes that call only aten
  operators that open no file and take no storage (plus a few integer operators on shapes). Then its
  cost is bounded: run on fake tensors for 1 and 2 images, it may compute at most MAX_ACTIVATIONS
  elements and MAX_FLOPS operations per image, and grow no faster than the batch.
- `save_exported_program`: the .pt2 the project writes (any batch size).
- `load_torchscript`: torch.jit.load, which the caller allows only when trusted: a TorchScript file
  runs its own code (it can read and write files when loaded and when run).
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import stat
import zipfile
from pathlib import Path

import torch
from torch import nn

from curation.errors import WebdistillError, first_line
from curation.files import atomic_path

MAX_MODEL_BYTES = 4 * 2**30   # one model file, read into memory
MAX_SPEC_BYTES = 2**20        # a JSON spec or sidecar
MAX_ZIP_MEMBERS = 200_000
MAX_ACTIVATIONS = 2**30  # elements a .pt2 graph may compute per image (4 GiB of float32)
MAX_FLOPS = 10**12        # and floating-point operations per image (ViT-H/14 at 224 px: about 3.3e11)
MAX_DEFLATED_BYTES = 256 * 2**20  # declared unpacked size of compressed members (code, pickles)


class ModelSpecError(WebdistillError, ValueError):
    """The spec names nothing loadable, or its files are unsafe, corrupt or do not fit."""


class UntrustedModelCode(ModelSpecError):
    """The spec would run code from a model file or a module, and the user did not trust it."""


def trust_hint() -> str:
    return "pass --trust-model-code (trust_model_code: true in a pipeline YAML) only if you trust its author"


def regular_file(path: str | Path, what: str, limit: int) -> Path:
    """`path` if it is a regular file of at most `limit` bytes (not a directory, FIFO or device)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelSpecError(f"{what} not found: {path}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ModelSpecError(f"{what} {path} is not a regular file")
    if st.st_size > limit:
        raise ModelSpecError(f"{what} {path} is {st.st_size} bytes, over the limit of {limit}")
    return path


def read_model_file(path: str | Path, what: str = "model file") -> bytes:
    path = regular_file(path, what, MAX_MODEL_BYTES)
    with open(path, "rb") as fh:
        data = fh.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:  # grew since stat
        raise ModelSpecError(f"{what} {path} is over the limit of {MAX_MODEL_BYTES} bytes")
    return data


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from a small regular file."""
    path = regular_file(path, what, MAX_SPEC_BYTES)
    try:
        cfg = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ModelSpecError(f"{what} {path} is not valid JSON: {first_line(exc, 200)}") from exc
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"{what} {path} must be a JSON object, got {type(cfg).__name__}")
    return cfg


def check_zip(data: bytes, what: str) -> zipfile.ZipFile:
    """The archive, if its directory is one torch could have written: stored members that fit in the
    file, and deflated ones (TorchScript compresses its code) of bounded declared size. Torch allocates
    what a member declares, so declared sizes bound what reading the archive costs."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelSpecError(f"{what} is not a torch archive (a zip): truncated or corrupt ({exc})") from exc
    if len(infos) > MAX_ZIP_MEMBERS:
        raise ModelSpecError(f"{what} has {len(infos)} zip members, over the limit of {MAX_ZIP_MEMBERS}")
    stored = deflated = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size == info.compress_size:
            stored += info.file_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            deflated += info.file_size
        else:
            raise ModelSpecError(f"{what}: zip member {info.filename[:100]!r} declares a compression or sizes "
                                 "torch never writes; refused (zip bomb guard)")
        if info.header_offset + info.compress_size > len(data):
            raise ModelSpecError(f"{what}: zip member {info.filename[:100]!r} lies outside the file: truncated "
                                 "or corrupt")
    if stored > len(data):
        raise ModelSpecError(f"{what}: its zip members declare more bytes than the file holds; refused "
                             "(zip bomb guard)")
    if deflated > MAX_DEFLATED_BYTES:
        raise ModelSpecError(f"{what}: its compressed zip members declare {deflated} bytes unpacked, over the "
                             f"limit of {MAX_DEFLATED_BYTES}; refused (zip bomb guard)")
    return zf


def archive_kind(zf: zipfile.ZipFile) -> str:
    """'pt2' (torch.export), 'torchscript', or 'state_dict' (torch.save), from the member names."""
    names = zf.namelist()
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails:
        return "pt2"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "state_dict"


# -- state_dicts ---------------------------------------------------------------------------------
def load_state_dict(path: str | Path) -> dict:
    """A state_dict from disk, refusing any pickle that carries code."""
    data = read_model_file(path, "weights file")
    kind = archive_kind(check_zip(data, f"weights file {path}"))
    if kind != "state_dict":  # torch.load would hand a TorchScript archive to torch.jit.load
        raise ModelSpecError(f"weights file {path} is a {'TorchScript' if kind == 'torchscript' else kind} archive, "
                             "not a state_dict")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelSpecError(f"{path} is not a plain state_dict: it would need code to unpickle, which is "
                             "refused (torch.load weights_only=True)") from exc
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelSpecError(f"cannot read weights {path}: {first_line(exc, 200)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint layout
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


# -- TorchScript (trusted only) ------------------------------------------------------------------
def load_torchscript(data: bytes, path) -> nn.Module:
    """A TorchScript module from the file's bytes. Runs the file's code: only for trusted files."""
    check_zip(data, f"TorchScript file {path}")
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises anything on a broken archive
        raise ModelSpecError(f"cannot load TorchScript {path}: {first_line(exc, 200)}") from exc


# -- torch.export archives -----------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.]{0,1024}")
# Members torch.export.save writes for one program named "model" (extra/ holds text files).
_PT2_MEMBER = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                         r"models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+|"
                         r"data/constants/model_constants_config\.json|data/constants/tensor_\d+|"
                         r"data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]{1,200}")
# Free text that torch keeps as text (or quotes with repr) and never evaluates.
_TEXT_KEYS = {"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "torch_version",
              "in_spec", "out_spec", "as_string", "as_strings"}
_REFUSED_KEYS = {"as_custom_obj", "custom_obj", "as_graph", "as_operator"}
_SYM_OPERATORS = {"_operator." + n for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                              "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
_SYM_OPERATORS |= {"torch.sym_float", "torch.sym_int", "torch.sym_max", "torch.sym_min", "torch.sym_not",
                   "math.ceil", "math.floor", "math.trunc"}
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_FILE_ARG = re.compile(r"file|path|dir|^f$")
# Shape expressions (sympy srepr / str): names from this list, symbols, numbers, quoted symbol names and
# arithmetic. No attribute access, no subscripts, no `**` or Pow (10**10**10 would not finish).
_EXPR_TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|'[A-Za-z0-9_.+-]{1,40}'"
                         r"|\d{1,20}(?:\.\d{1,20})?(?:[eE][+-]?\d{1,3})?|[()+\-*/,=<>!%]")
# Guards (Python source, exec'd by torch): sizes and strides of named inputs, integers, arithmetic and
# comparisons. No names but L, no calls but size()/stride()/storage_offset(), no quotes but L['input'].
_GUARD_TOKEN = re.compile(r" +|L\['[A-Za-z_][A-Za-z0-9_]{0,100}'\]|\.(?:size|stride)\(\)|\.storage_offset\(\)"
                          r"|\[\d{1,3}\]|\d{1,20}|//|==|!=|<=|>=|[-+*%<>()]|\b(?:and|or|not|True|False)\b")
_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "true", "false", "True", "False", "oo", "precision", "integer", "positive", "negative",
    "nonnegative", "nonpositive", "real", "finite", "zero", "nonzero", "even", "odd", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IntTrueDiv", "FloatTrueDiv",
    "IsNonOverlappingAndDenseIndicator",
}
_SYMBOL = re.compile(r"[a-z]{1,3}\d{1,7}")


def _refuse(path, why: str) -> ModelSpecError:
    return UntrustedModelCode(f"exported program {path} refused: {why}; to load it unchecked, {trust_hint()}")


def _check_expr(expr: str, path) -> None:
    if len(expr) > 4096 or "**" in expr:
        raise _refuse(path, f"shape expression {expr[:60]!r} is outside the safe grammar")
    depth, at = 0, 0
    for m in _EXPR_TOKEN.finditer(expr):
        if m.start() != at:
            break
        at, tok = m.end(), m.group()
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in _EXPR_NAMES and not _SYMBOL.fullmatch(tok):
                raise _refuse(path, f"shape expression uses {tok[:40]!r}, outside the safe grammar")
        depth += (tok == "(") - (tok == ")")
        if depth > 64:
            raise _refuse(path, "shape expression nests too deeply")
    if at != len(expr):
        raise _refuse(path, f"shape expression {expr[:60]!r} is outside the safe grammar")


def _check_guard(guard, path) -> None:
    """Guard code is Python that torch execs: only comparisons of input sizes, from a small grammar."""
    if not isinstance(guard, str) or len(guard) > 4096 or "**" in guard:
        raise _refuse(path, f"guard {str(guard)[:60]!r} is outside the safe grammar")
    depth, at = 0, 0
    for m in _GUARD_TOKEN.finditer(guard):
        if m.start() != at:
            break
        at = m.end()
        depth += (m.group() == "(") - (m.group() == ")")
        if depth > 64:
            raise _refuse(path, "guard nests too deeply")
    if at != len(guard):
        raise _refuse(path, f"guard {guard[:60]!r} is outside the safe grammar (it is Python that torch runs)")


def _aten_op_allowed(target: str) -> bool:
    """An aten operator that exists, opens no file by name and takes no storage."""
    m = _ATEN_TARGET.fullmatch(target)
    if not m or m[1] == "_print":
        return False
    try:
        schema = getattr(getattr(torch.ops.aten, m[1]), m[2])._schema
    except (AttributeError, RuntimeError):
        return False
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Storage" in kind or ("str" in kind and _FILE_ARG.search(arg.name)):
            return False
    return True


def _text_ok(text: str) -> bool:
    return all(c == "\n" or c.isprintable() for c in text)


def _check_program_json(program, path) -> None:
    """Walk the serialized program (iteratively: its nesting is the file's to choose)."""
    if not isinstance(program, dict):
        raise _refuse(path, "models/model.json is not an object")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise _refuse(path, "guards_code is not a list")
    for guard in guards:
        _check_guard(guard, path)
    stack: list[tuple[object, str]] = [(program, "")]
    while stack:
        value, key = stack.pop()
        if isinstance(value, dict):
            if {"target", "inputs", "outputs"} <= value.keys():  # a graph node
                target = value["target"]
                if not isinstance(target, str) or not (target in _SYM_OPERATORS or _aten_op_allowed(target)):
                    raise _refuse(path, f"a node calls {str(target)[:80]!r}, not an allowed aten operator")
            if value.get("custom_obj_values"):
                raise _refuse(path, "it holds custom (pickled) objects")
            for k, v in value.items():
                if k in _REFUSED_KEYS:
                    raise _refuse(path, f"it holds {k!r} values (custom objects, subgraphs or operators)")
                if not _NAME.fullmatch(k):
                    raise _refuse(path, f"name {k[:60]!r} is not a plain identifier")
                if (k == "target" and isinstance(v, str) and {"inputs", "outputs"} <= value.keys()) or \
                        (k == "guards_code" and value is program):  # checked above
                    continue
                stack.append((v, k))
        elif isinstance(value, list):
            stack.extend((v, key) for v in value)
        elif isinstance(value, str):
            if key == "expr_str":
                _check_expr(value, path)
            elif key in _TEXT_KEYS:
                if not _text_ok(value):
                    raise _refuse(path, f"{key} holds control characters")
            elif not _NAME.fullmatch(value):
                raise _refuse(path, f"{key or 'a value'} {value[:60]!r} is not a plain identifier")


def _check_payloads(zf: zipfile.ZipFile, root: str, config_name: str, prefix: str, path) -> None:
    """Weights or constants: plain tensors (no pickle, no custom object) that fit their records."""
    member = f"{root}/{config_name}"
    if member not in zf.namelist():
        raise _refuse(path, f"{config_name} is missing")
    try:
        config = json.loads(zf.read(member))["config"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _refuse(path, f"{config_name} is not valid") from exc
    if not isinstance(config, dict):
        raise _refuse(path, f"{config_name} is not valid")
    folder = config_name.rsplit("/", 1)[0]
    for fqn, payload in config.items():
        if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
            raise _refuse(path, f"payload {str(fqn)[:60]!r} is pickled (torch unpickles it with weights_only=False)")
        name, meta = payload.get("path_name"), payload.get("tensor_meta")
        if not isinstance(name, str) or not re.fullmatch(prefix + r"\d+", name) or not isinstance(meta, dict):
            raise _refuse(path, f"payload {str(fqn)[:60]!r} is not a plain tensor")
        try:
            nbytes = zf.getinfo(f"{root}/{folder}/{name}").file_size
            sizes = [s["as_int"] for s in meta["sizes"]]
            strides = [s["as_int"] for s in meta["strides"]]
            offset = meta["storage_offset"]["as_int"]
        except (KeyError, TypeError) as exc:
            raise _refuse(path, f"payload {str(fqn)[:60]!r} has no record or no concrete shape") from exc
        numel = 1
        for s in sizes:
            numel *= s if isinstance(s, int) and s >= 0 else -1
        if (numel < 0 or numel > nbytes or not all(isinstance(s, int) and s >= 0 for s in strides)
                or not isinstance(offset, int) or offset < 0):
            raise _refuse(path, f"payload {str(fqn)[:60]!r} declares a shape that its record does not hold")


def check_exported_program(data: bytes, path) -> None:
    """Refuse an archive that torch.export.load could be made to run code from (see the module doc)."""
    zf = check_zip(data, f"exported program {path}")
    names = zf.namelist()
    root = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", root):
        raise _refuse(path, "its members are not under one archive folder")
    for name in names:
        if not name.startswith(root + "/") or not _PT2_MEMBER.fullmatch(name[len(root) + 1:]):
            raise _refuse(path, f"member {name[:100]!r} is not one torch.export.save writes for a program "
                          "(AOTInductor libraries, pickles and legacy members are refused)")
    try:
        if zf.read(f"{root}/archive_format") != b"pt2":
            raise _refuse(path, "archive_format is not pt2")
        program = json.loads(zf.read(f"{root}/models/model.json"))
    except KeyError as exc:
        raise _refuse(path, "archive_format or models/model.json is missing") from exc
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, "models/model.json is not valid JSON") from exc
    _check_program_json(program, path)
    _check_payloads(zf, root, "data/weights/model_weights_config.json", "weight_", path)
    _check_payloads(zf, root, "data/constants/model_constants_config.json", "tensor_", path)
    # torch reads the sample inputs with weights_only=True and, if that fails, again without: make
    # sure the first read succeeds.
    sample = f"{root}/data/sample_inputs/model.pt"
    if sample in names:
        inner = zf.read(sample)
        if inner:
            check_zip(inner, f"exported program {path}: sample inputs")
            try:
                torch.load(io.BytesIO(inner), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - whatever torch raises, torch's own retry would be unsafe
                raise _refuse(path, "its sample inputs are not plain tensors") from exc


def save_exported_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The .pt2 the project writes: `model` exported for any batch size, saved atomically."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buf.getvalue())


class ExportedModule(nn.Module):
    """A torch.export program as a module. It runs in the mode it was exported in (the project exports
    in eval mode) and its module refuses train()/eval(): here they only set the flag."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _cost(program, batch: int, input_size: int) -> tuple[int, int]:
    """(elements of every tensor the graph computes, floating-point operations) for one input of
    `batch` images, counted on fake tensors: no memory is used, no data read, nothing computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export.graph_signature import InputKind
    from torch.fx import Interpreter
    from torch.utils import _pytree as pytree
    from torch.utils.flop_counter import FlopCounterMode

    specs = program.graph_signature.input_specs
    users = [s for s in specs if s.kind == InputKind.USER_INPUT]
    if len(users) != 1:
        raise ModelSpecError(f"the program takes {len(users)} inputs, not one image batch")
    placeholder = next(n for n in program.graph_module.graph.nodes
                       if n.op == "placeholder" and n.name == users[0].arg.name)
    dims = getattr(placeholder.meta.get("val"), "shape", None)
    if dims is None:
        raise ModelSpecError("the program does not describe its input")
    shape = [batch if i == 0 else (d if isinstance(d, int) else input_size) for i, d in enumerate(dims)]
    elements = 0
    flops = FlopCounterMode(display=False)

    class Count(Interpreter):
        def run_node(self, node):
            nonlocal elements
            out = super().run_node(node)
            if node.op == "call_function":
                elements += sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
                if elements > MAX_ACTIVATIONS * batch:
                    raise ModelSpecError(f"its graph computes over {MAX_ACTIVATIONS} elements per image")
                if flops.get_total_flops() > MAX_FLOPS * batch:
                    raise ModelSpecError(f"its graph takes over {MAX_FLOPS:.0e} floating-point operations per image")
            return out

    values = {**program.state_dict, **program.constants}
    with FakeTensorMode(allow_non_fake_inputs=True), flops:
        args = [torch.empty(shape) if s.kind == InputKind.USER_INPUT else values[s.target] for s in specs]
        Count(program.graph_module).run(*args)
    return elements, flops.get_total_flops()


def _check_forward_cost(program, input_size: int, path) -> None:
    """What running the program costs is bounded: per image at most MAX_ACTIVATIONS elements and
    MAX_FLOPS operations, growing no faster than the batch (a graph can be built to blow up on its
    own, or with the batch size)."""
    try:
        one, two = _cost(program, 1, input_size), _cost(program, 2, input_size)
    except ModelSpecError as exc:  # fx adds the node's traceback as further lines
        raise _refuse(path, first_line(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - shapes that do not propagate: the cost cannot be bounded
        raise _refuse(path, f"its cost cannot be bounded ({type(exc).__name__}: "
                      f"{first_line(exc, 120)})") from exc
    if two[0] > 2 * one[0] or two[1] > 2 * one[1]:
        raise _refuse(path, "its graph grows faster than the batch")


def load_exported_program(data: bytes, path, input_size: int = 224, checked: bool = True) -> nn.Module:
    """The module of a torch.export archive (the file's bytes), once checked (unless the user trusts
    it: `checked=False`); `input_size` is the side of the images it will get (for the cost bound)."""
    if checked:
        check_exported_program(data, path)
    else:
        check_zip(data, f"exported program {path}")
    quiet = logging.getLogger("torch.export")  # it logs a traceback, then raises: the error says enough
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - a checked but malformed program fails in many ways
        raise ModelSpecError(f"cannot load exported program {path}: it does not deserialize in this torch "
                             f"({type(exc).__name__})") from exc
    finally:
        quiet.disabled = was_disabled
    if checked:
        _check_forward_cost(program, input_size, path)
    try:
        module = program.module()
    except Exception as exc:  # noqa: BLE001
        raise ModelSpecError(f"cannot load exported program {path}: "
                             f"{first_line(exc, 200)}") from exc
    return ExportedModule(module).eval()
