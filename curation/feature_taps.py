"""Named intermediate outputs of a teacher, whatever its format: an nn.Module built from Python, a
torch.export program (.pt2) or a TorchScript file. One forward pass gives the logits and, pooled to
one vector per sample, the outputs (or inputs) of the layers asked for.

A layer is named as in the model's `named_modules()` (`layer4`, `features.12`, `classifier`):

    NAME          the output of that module
    NAME:input    its input (the first tensor it reads that it did not compute)
    penultimate   the input of the classifier: `classifier` beside an `embed()`, else the last Linear

How each format is reached:
- nn.Module: forward hooks on the named modules.
- .pt2: the program's graph, run by a torch.fx Interpreter that keeps the values of the nodes asked
  for. Every node records the modules it was traced in (`nn_module_stack`): a module's output is the
  last value computed inside it that something outside it uses.
- TorchScript: its submodules are reachable, but hooks on them never fire (the compiled forward does
  not call back into Python). The forward graph, with every submodule call inlined, records each
  node's module hierarchy; the values asked for become extra outputs of a copy of that graph, which
  runs as a TorchScript function on the loaded module. (So this is as safe as running the file: only
  with --trust-model-code, as for loading it.)

Pooling: maps (B, C, H, W, ...) are averaged over their spatial positions; token sequences (B, N, C)
over the tokens (BatchNorm1d outputs (B, C, L) over L); vectors are kept. The classifier's input is
flattened, as the classifier sees it.

Stages (the default layers): the modules of one depth of the module tree, in the order they finish,
grouped into runs of equal spatial resolution; a stage is the last module of a run (the map just
before the resolution drops). The depth chosen is the shallowest one with the most runs: ResNet's
`layer1`..`layer4` (depth 1), a `features` Sequential's blocks (`features.12`, `features.19`), timm's
`stages.0`.. (depth 2). Maps of 1x1 (after global pooling) are no stage, and a model whose maps never
change resolution has none (a ViT: its patch embedding is its only map; an MLP): the default is then
the classifier's input alone.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .errors import WebdistillError

PENULTIMATE = "penultimate"
INPUT = ":input"
LINEAR_TYPES = {"Linear", "LazyLinear", "NonDynamicallyQuantizableLinear"}
BN_TYPES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}
_LAYER = re.compile(r"[A-Za-z0-9_.\-]{1,200}(:input)?")


class LayerNotFound(WebdistillError, ValueError):
    """A layer name that the teacher does not have (the message names those it has)."""


def check_layer_names(names: Iterable[str]) -> tuple[str, ...]:
    """Layer names as typed (NAME, NAME:input or penultimate), checked for form only; ValueError in
    one line otherwise. Whether the teacher has them is known once it is loaded (`FeatureTaps.resolve`)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    if not names:
        raise ValueError("feature layers: give at least one layer name")
    for n in names:
        if not isinstance(n, str) or not _LAYER.fullmatch(n):
            raise ValueError(f"feature layers: {str(n)[:60]!r} is not a layer name (NAME, NAME:input or penultimate)")
    if len(set(names)) != len(names):
        raise ValueError("feature layers: a layer is named twice")
    return names


def pool(t: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """One vector per sample: spatial maps averaged over positions, (B, N, C) tokens over N (over
    the last axis when `channels_first`, as BatchNorm1d lays out (B, C, L)). Always a new tensor."""
    t = t.detach()
    if t.dim() <= 2:
        return t.reshape(len(t), -1).clone()
    if t.dim() == 3 and not channels_first:
        return t.mean(1)
    return t.flatten(2).mean(-1)


# How a tapped value is kept: reduced the moment it is computed, so a forward pass holds one vector
# per layer and sample, not the layers' maps, and an in-place op that follows (ReLU) cannot change it.
RAW, FLAT, CHANNELS, FEATURES = "raw", "flat", "channels", "features"


def reduce(t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == RAW:  # the probe's, one image: the shape is what matters
        return t.detach().clone()
    if mode == FLAT:  # the classifier's input, as the classifier reads it
        return torch.flatten(t.detach(), 1).clone()
    return pool(t, mode == CHANNELS)


class FeatureTaps:
    """The layers of one teacher and a forward pass that returns them. Subclasses give `_layers`
    (module name -> type name, in the order their outputs are computed), `_run` and `_param`."""

    def __init__(self):
        self._stages: list[str] | None = None

    # -- what a backend provides -------------------------------------------------------------------
    def _layers(self) -> dict[str, str]:
        raise NotImplementedError

    def _run(self, x: torch.Tensor, wants: set[tuple[str, str]]) -> tuple[torch.Tensor, dict]:
        """The logits, and {(point, mode): `reduce`d value} for each point (NAME or NAME:input) and mode."""
        raise NotImplementedError

    def _param(self, module: str, name: str) -> torch.Tensor | None:
        raise NotImplementedError

    def _classifier_name(self) -> str | None:
        linears = [n for n, t in self._layers().items() if t in LINEAR_TYPES]
        return linears[-1] if linears else None

    # -- the layers --------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self._layers())

    @property
    def classifier(self) -> str | None:
        """The module whose input is the penultimate feature vector."""
        return self._classifier_name()

    def resolve(self, names: Sequence[str] | None) -> list[str]:
        """The layers asked for (None: `default_layers()`), each one the teacher has; LayerNotFound
        in one line otherwise."""
        if names is None:
            return self.default_layers()
        known = self._layers()
        for n in names:
            if n == PENULTIMATE:
                if self.classifier is None:
                    raise LayerNotFound("the teacher has no Linear classifier, so no penultimate features (name others "
                                        "with --feature-layers); its layers: "
                                        + _listing(known))
            elif n.removesuffix(INPUT) not in known:
                raise LayerNotFound(f"the teacher has no layer {n.removesuffix(INPUT)!r}; "
                                    f"its layers: {_listing(known)}")
        return list(names)

    def default_layers(self) -> list[str]:
        """The classifier's input plus the last two stages (see the module doc)."""
        return ([PENULTIMATE] if self.classifier is not None else []) + self.stages()[-2:]

    def stages(self, input_size: int | None = None) -> list[str]:
        if self._stages is None:
            self._stages = _stage_ends(self._probe_shapes(input_size))
        return self._stages

    def bn_layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """BatchNorm layers with learnt affine parameters and running statistics: name -> (gamma, beta)."""
        out = {}
        for name, kind in self._layers().items():
            if kind in BN_TYPES:
                gamma, beta = self._param(name, "weight"), self._param(name, "bias")
                if gamma is not None and beta is not None and self._param(name, "running_mean") is not None:
                    out[name] = (gamma.detach(), beta.detach())
        return out

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W, b) of the classifier (b = 0 without a bias); None without a 2-D weight."""
        if self.classifier is None:
            return None
        weight, bias = self._param(self.classifier, "weight"), self._param(self.classifier, "bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        bias = bias if isinstance(bias, torch.Tensor) else torch.zeros(weight.shape[0], dtype=weight.dtype)
        return weight.detach(), bias.detach()

    # -- a forward pass ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, names: Sequence[str],
                 channels_first: Iterable[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits and {name: (B, d) pooled features} of the layers `names` (resolved names;
        those in `channels_first` are pooled as BatchNorm lays out its channels)."""
        firsts = set(channels_first)
        wants = {n: (f"{self.classifier}{INPUT}", FLAT) if n == PENULTIMATE
                 else (n, CHANNELS if n in firsts else FEATURES) for n in names}
        logits, kept = self._run(x, set(wants.values()))
        return logits, {n: kept[w] for n, w in wants.items()}

    def _probe_shapes(self, input_size: int | None) -> list[tuple[str, torch.Size]]:
        """(name, output shape) of every layer for one image, in the order the layers finish."""
        size = input_size or getattr(self, "input_size", None) or 224
        x = torch.zeros(1, 3, size, size, device=self.device)
        with torch.no_grad():
            _, raw = self._run(x, {(n, RAW) for n in self.layers})
        return [(n, raw[n, RAW].shape) for n in self.layers if (n, RAW) in raw]

    device = torch.device("cpu")


def _listing(known: Iterable[str], limit: int = 40) -> str:
    names = list(known)
    shown = ", ".join(names[:limit])
    return (shown + f", ... ({len(names) - limit} more)" if len(names) > limit else shown) or "none"


def _stage_ends(shapes: list[tuple[str, torch.Size]]) -> list[str]:
    """Stage ends (see the module doc) from the layers' output shapes in completion order."""
    spatial = [(n, tuple(s[2:])) for n, s in shapes if len(s) >= 4 and torch.Size(s[2:]).numel() > 1]
    best: list[tuple[str, tuple]] = []
    for depth in sorted({n.count(".") for n, _ in spatial}):
        ends: list[tuple[str, tuple]] = []
        for n, res in spatial:
            if n.count(".") != depth:
                continue
            if ends and ends[-1][1] == res:
                ends[-1] = (n, res)
            else:
                ends.append((n, res))
        if len(ends) > len(best):
            best = ends
    return [n for n, _ in best] if len(best) >= 2 else []  # one resolution (a ViT's patch embedding): no stages


# -- nn.Module: forward hooks ---------------------------------------------------------------------

class HookTaps(FeatureTaps):
    def __init__(self, model: nn.Module, input_size: int | None = None):
        super().__init__()
        self.model, self.input_size = model, input_size
        self.modules = {n: m for n, m in model.named_modules() if n}
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self._order: dict[str, str] | None = None

    def _layers(self) -> dict[str, str]:
        # named_modules order is registration order; a probe gives the order outputs are computed
        # (what stages need), with modules the forward never calls left at the end
        if self._order is None:
            return {n: type(m).__name__ for n, m in self.modules.items()}
        return self._order

    def _classifier_name(self) -> str | None:
        if hasattr(self.model, "embed") and isinstance(getattr(self.model, "classifier", None), nn.Module):
            return "classifier"  # our CNNs: forward = classifier(embed(x))
        linears = [n for n, m in self.modules.items() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def _param(self, module: str, name: str) -> torch.Tensor | None:
        m = self.modules.get(module)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (m.affine and m.track_running_stats):
            return None
        value = getattr(m, name, None)
        return value if isinstance(value, torch.Tensor) else None

    def _run(self, x, wants):
        captured: dict = {}
        finished: list[str] = []
        by_module: dict[str, list[tuple[str, str]]] = {}
        for point, mode in wants:
            by_module.setdefault(point.removesuffix(INPUT), []).append((point, mode))

        def hook(name: str):
            def fn(_mod, inp, out):
                finished.append(name)
                for point, mode in by_module[name]:
                    value = (inp[0] if inp else None) if point.endswith(INPUT) else out
                    if isinstance(value, torch.Tensor):
                        captured[point, mode] = reduce(value, mode)
            return fn

        handles = [self.modules[n].register_forward_hook(hook(n)) for n in by_module]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if self._order is None and len(by_module) == len(self.modules):  # the probe: completion order
            seen = dict.fromkeys(finished)
            names = [*seen, *(m for m in self.modules if m not in seen)]
            self._order = {n: type(self.modules[n]).__name__ for n in names}
        return logits, captured


# -- graphs: .pt2 and TorchScript -----------------------------------------------------------------

class _GraphScopes:
    """Which values of a graph are a module's output and input, from each node's module path.
    `nodes`: (scopes: the module names the node runs in, inputs, outputs), top-level nodes in order;
    values are hashable keys; `tensor(v)` says whether a value is a tensor worth returning."""

    def __init__(self, nodes: list[tuple[set[str], list, list]], graph_inputs: set, graph_outputs: set, tensor):
        self.producer: dict = {}
        self.users: dict = {}
        for i, (scopes, ins, outs) in enumerate(nodes):
            for v in outs:
                self.producer[v] = (i, scopes)
            for v in ins:
                self.users.setdefault(v, []).append(scopes)
        self.nodes, self.tensor, self.graph_inputs = nodes, tensor, graph_inputs
        # a module's output: the last tensor computed inside it that something outside it uses (one
        # pass over the values, in graph order: a later one replaces an earlier one)
        self.outputs: dict[str, object] = {}
        self.order: dict[str, int] = {}
        for v, (i, scopes) in self.producer.items():
            if not tensor(v):
                continue
            users = self.users.get(v, ())
            for module in scopes:
                if v in graph_outputs or any(module not in s for s in users):
                    self.outputs[module], self.order[module] = v, i

    def output(self, module: str):
        return self.outputs.get(module)

    def input(self, module: str):
        """The first tensor a node inside `module` reads that was computed outside it (or is the graph's input)."""
        for scopes, ins, _ in self.nodes:
            if module in scopes:
                for v in ins:
                    src = self.producer.get(v)  # None: a graph input, or a parameter or constant
                    if self.tensor(v) and (v in self.graph_inputs if src is None else module not in src[1]):
                        return v
        return None

    def value(self, point: str):
        name = point.removesuffix(INPUT)
        return self.input(name) if point.endswith(INPUT) else self.output(name)


def _ordered(scopes: _GraphScopes, types: dict[str, str]) -> dict[str, str]:
    # inner modules finish first: with the same output, the outer one is listed after
    names = sorted(scopes.order, key=lambda n: (scopes.order[n], -n.count(".")))
    return {n: types.get(n, "") for n in names}


class FxTaps(FeatureTaps):
    """A torch.export program's module (a torch.fx GraphModule)."""

    def __init__(self, gm: torch.fx.GraphModule, input_size: int | None = None):
        super().__init__()
        self.gm, self.input_size = gm, input_size
        types: dict[str, str] = {}
        nodes = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            stack = node.meta.get("nn_module_stack") or {}
            scopes = {path for path, _ in stack.values() if path}
            for path, kind in stack.values():
                if path:
                    types.setdefault(path, str(getattr(kind, "__name__", kind)).rsplit(".", 1)[-1])
            ins = [a for a in node.all_input_nodes if a.op in ("call_function", "placeholder")]
            nodes.append((scopes, ins, [node]))
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
        self.scopes = _GraphScopes(nodes, inputs, set(out_node.all_input_nodes), lambda v: isinstance(
            v.meta.get("val"), torch.Tensor) if "val" in v.meta else True)
        self.types = _ordered(self.scopes, types)
        self.params = dict(gm.named_parameters()) | dict(gm.named_buffers())
        p = next(iter(self.params.values()), None)
        self.device = p.device if p is not None else torch.device("cpu")

    def _layers(self):
        return self.types

    def _param(self, module, name):
        return self.params.get(f"{module}.{name}")

    def _run(self, x, wants):
        at_node: dict = {}
        for point, mode in wants:
            v = self.scopes.value(point)
            if v is not None:
                at_node.setdefault(v, []).append((point, mode))
        captured: dict = {}

        class Keep(torch.fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                for want in at_node.get(node, ()):
                    captured[want] = reduce(out, want[1])
                return out

        out = Keep(self.gm).run(x)
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        return out, captured


class ScriptTaps(FeatureTaps):
    """A loaded TorchScript module (scripted or traced)."""

    _ENTRY = re.compile(r"([^.()]+)\(([^()]*)\)")

    def __init__(self, module: torch.jit.ScriptModule, input_size: int | None = None):
        super().__init__()
        self.module, self.input_size = module, input_size
        self.submodules = dict(module.named_modules())
        self.scopes, types, _ = self._index(module.inlined_graph)
        self.types = _ordered(self.scopes, types)
        self._cache: dict[tuple, object] = {}
        self._ranks: dict[str, int] = {}  # of the tapped values, from a probe
        p = next(iter(module.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")

    def _path(self, node) -> tuple[list[str], dict[str, str]]:
        """The module names a node runs in (outermost first) and their types, from its hierarchy
        string `SELF(Net).features(Sequential).3(Conv2d).SELF(Conv2d)` (SELF: a method of the same
        module, UNKNOWN_INSTANCE: a function)."""
        parts, types = [], {}
        for instance, kind in self._ENTRY.findall(node.getModuleHierarchy()):
            if instance in ("SELF", "UNKNOWN_INSTANCE", "TOP"):
                continue
            parts.append(instance)
            types[".".join(parts)] = kind
        return [".".join(parts[:i + 1]) for i in range(len(parts))], types

    def _index(self, graph) -> tuple[_GraphScopes, dict[str, str], dict]:
        """The graph's scopes, the modules' types, and its values by their unique number. Nodes
        inside control flow (an `if self.use_res_connect:` kept in the graph) read values too; the
        control node itself has no hierarchy and takes the modules all its inner nodes share (its
        outputs are what the branch computed: a residual sum is the block's output)."""
        types: dict[str, str] = {}
        entries, values = [], {}

        def inner(node) -> list:
            return [n for b in node.blocks() for m in b.nodes() for n in (m, *inner(m))]

        def scopes_of(node) -> set[str]:
            paths, kinds = self._path(node)
            types.update({k: v for k, v in kinds.items() if k not in types})
            return set(paths)

        for node in graph.nodes():
            scopes, nested = scopes_of(node), inner(node)
            nested_scopes = [scopes_of(n) for n in nested]
            if nested and not scopes:
                shared = [s for s in nested_scopes if s]
                scopes = set.intersection(*shared) if shared else set()
            constant = node.kind() in ("prim::GetAttr", "prim::Constant")  # parameters, submodules, literals
            for v in node.outputs():
                values[v.unique()] = v
            entries.append((scopes, [v.unique() for v in node.inputs()],
                            [] if constant else [v.unique() for v in node.outputs()]))
            entries += [(s, [v.unique() for v in n.inputs()], []) for n, s in zip(nested, nested_scopes)]
            entries += [(scopes, [v.unique() for v in b.outputs()], []) for n in (node, *nested) for b in n.blocks()]
        values |= {v.unique(): v for v in graph.inputs()}
        tensors = {u for u, v in values.items() if v.type().kind() == "TensorType"}
        inputs, outputs = {v.unique() for v in graph.inputs()}, {v.unique() for v in graph.outputs()}
        return _GraphScopes(entries, inputs, outputs, lambda u: u in tensors), types, values

    def _layers(self):
        return self.types

    def _param(self, module, name):
        m = self.submodules.get(module)
        value = getattr(m, name, None) if m is not None else None
        return value if isinstance(value, torch.Tensor) else None

    def _function(self, wants: tuple[tuple[str, str], ...]):
        """A TorchScript function (self, x) -> (logits, *the wanted values, reduced in the graph), from a
        copy of the forward graph."""
        graph = self.module.inlined_graph  # a fresh copy each time
        scopes, _, values = self._index(graph)
        kept = []
        for point, mode in wants:
            v = values[scopes.value(point)]
            rank = self._ranks.get(point, 0)
            if mode == FLAT:
                v = _insert_after(graph, v, "aten::flatten", [1, -1])
            if mode in (RAW, FLAT) or rank <= 2:
                kept.append(_insert_after(graph, v, "aten::clone", []))
            else:
                dims = [1] if rank == 3 and mode == FEATURES else list(range(2, rank))
                kept.append(_insert_after(graph, v, "aten::mean", [dims, False]))
        logits = list(graph.outputs())[0]
        graph.eraseOutput(0)
        for v in [logits, *kept]:
            graph.registerOutput(v)
        graph.makeMultiOutputIntoTuple()
        return torch._C._create_function_from_graph("webdistill_feature_taps", graph)

    def _run(self, x, wants):
        wants = tuple(sorted(w for w in wants if self.scopes.value(w[0]) is not None))
        unknown = sorted({p for p, m in wants if m not in (RAW, FLAT) and p not in self._ranks})
        if unknown:  # the graph carries no ranks: the batch's first image through it tells them
            with torch.no_grad():
                _, raw = self._run(x[:1], {(p, RAW) for p in unknown})
            self._ranks |= {p: raw[p, RAW].dim() for p in unknown}
        fn = self._cache.get(wants)
        if fn is None:
            fn = self._cache[wants] = self._function(wants)
        logits, *values = fn(self.module._c, x)
        return logits, dict(zip(wants, values))


def _insert_after(graph, v, op: str, constants: list):
    """The value of `op(v, *constants)`, computed right after v is (before an in-place op changes v)."""
    with graph.insert_point_guard(graph.return_node()):
        out = graph.insert(op, [v, *(graph.insertConstant(c) for c in constants)])
    node = out.node()
    node.moveAfter(v.node() if v.node().kind() != "prim::Param" else graph.param_node())
    for arg in node.inputs():  # its constants, inserted beside it
        if arg.unique() != v.unique():
            arg.node().moveBefore(node)
    return out


def feature_taps(module: nn.Module, input_size: int | None = None) -> FeatureTaps:
    """The taps of a loaded teacher (distill.spec.LoadedModel.module)."""
    from distill.model_files import ExportedModule

    if isinstance(module, torch.jit.ScriptModule):
        return ScriptTaps(module, input_size)
    if isinstance(module, ExportedModule):
        return FxTaps(module.program, input_size)
    if isinstance(module, torch.fx.GraphModule):
        return FxTaps(module, input_size)
    return HookTaps(module, input_size)
