"""save / load a rewritten graph as a torch.export archive (.pt2): no pickle, plan kept.

``save`` re-exports the GraphModule with torch.export (every dim dynamic, as capture does) and
writes it with ``torch.export.save``. What survives where:
- node meta: torch.export keeps ``node.meta["custom"]`` (JSON) through export, save and load,
  and nothing else of ours. So each node's ``meta["fxquant"]`` (site, group, role, bits, ...) is
  copied there as JSON before export; the aten nodes an fxquant node becomes all carry it (the
  ``quantize`` step is div/round/clamp/mul after export). ``load`` puts it back in
  ``meta["fxquant"]``, with ``stats`` pointing at the restored plan's statistics again.
- the plan (config, sites, groups, calibration statistics) is written into the archive as
  ``extra_files`` ``fxquant/plan.json`` (and ``fxquant/plan.txt``, the table, readable with
  any zip tool); ``load`` rebuilds ``gm.meta["fxquant"] = {"config", "plan"}`` from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
import zipfile
from typing import Any

import torch
from torch import fx

from .capture import TORCH_LOCK, batch_to_call, dynamic_dims
from .config import QuantConfig
from .passes.common import META
from .plan import Group, QuantPlan, Site

PLAN_JSON = "fxquant/plan.json"
PLAN_TEXT = "fxquant/plan.txt"
IMPORTS = "fxquant/imports.json"  # modules that register the pytree types of the inputs/outputs


def save(gm: fx.GraphModule, path: str | os.PathLike, example_inputs: Any) -> None:
    """Export ``gm`` (called with ``example_inputs``, a loader batch) and write it to ``path``.

    The file is written next to ``path`` first and moved into place once complete, so an
    existing file is replaced only by a whole new one. Use a batch of at least 2 rows (and 2
    tokens): torch.export specializes a dim of size 1, and the saved graph keeps that.
    """
    args, kwargs = batch_to_call(example_inputs)
    with TORCH_LOCK, torch.no_grad():  # export traces: one thread at a time (capture.TORCH_LOCK)
        program = torch.export.export(_with_custom_meta(gm), args, kwargs, dynamic_shapes=dynamic_dims(args, kwargs),
                                      strict=False)
    # no example inputs in the archive: torch.export.save would pickle them (torch.save)
    program.example_inputs = None
    info = gm.meta.get(META, {})
    extra = {IMPORTS: json.dumps(_spec_modules(program))}
    if "plan" in info:
        extra[PLAN_JSON] = json.dumps({"config": _encode(info.get("config")), "plan": _encode(info["plan"])})
        extra[PLAN_TEXT] = info["plan"].table()
    _write_atomic(os.fspath(path), lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def _write_atomic(path: str, write: Any) -> None:
    """``write(tmp)`` into a private folder beside ``path`` (same file system, same file name, which
    torch uses as the archive's root folder), then move the file into place."""
    folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".fxquant-save-")
    tmp = os.path.join(folder, os.path.basename(path))
    try:
        write(tmp)
        umask = os.umask(0)  # mkdtemp is private; give the file the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(folder)


def load(path: str | os.PathLike) -> fx.GraphModule:
    """The module saved by ``save``: called like the original graph, fxquant meta restored."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fxquant archive at {path!r}")
    _import_spec_modules(path)
    extra = {PLAN_JSON: "", PLAN_TEXT: ""}
    gm = torch.export.load(path, extra_files=extra).module()
    plan = None
    if extra[PLAN_JSON]:
        stored = json.loads(extra[PLAN_JSON])
        plan = _decode(stored["plan"])
        gm.meta[META] = {"config": _decode(stored["config"]), "plan": plan}
    for node in gm.graph.nodes:
        info = (node.meta.get("custom") or {}).get(META)
        if info is not None:
            node.meta[META] = _with_stats(_decode(info), plan)
    return gm


def _spec_modules(program: torch.export.ExportedProgram) -> list[str]:
    """Modules defining the container types of the call's inputs and outputs (a Hugging Face model
    returns a ModelOutput): torch.export.load can rebuild them only once they are registered."""
    modules: set[str] = set()
    specs = [s for entry in program.module_call_graph[:1] for s in (entry.signature.in_spec, entry.signature.out_spec)
             if entry.signature is not None]
    while specs:
        spec = specs.pop()
        if spec is None:
            continue
        module = getattr(spec.type, "__module__", "builtins")
        if module.split(".")[0] not in ("builtins", "collections", "torch"):
            modules.add(module)
        specs.extend(spec.children() if hasattr(spec, "children") else spec.children_specs)
    return sorted(modules)


def _import_spec_modules(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{IMPORTS}")), None)
            modules = json.loads(archive.read(name)) if name else []
    except zipfile.BadZipFile:
        raise ValueError(f"{path!r} is not a .pt2 archive written by fxquant.save / torch.export.save") from None
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{path!r} returns types from {module!r}, which cannot be imported ({err}); "
                              "install the package the model came from") from err


def _with_custom_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its tensors) whose nodes carry meta["fxquant"] as JSON in
    meta["custom"], the one node meta key torch.export carries into the nodes it produces."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    mapping: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, mapping, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    for old, new in mapping.items():
        if META in old.meta:
            summary = {k: v for k, v in old.meta[META].items() if k != "stats"}  # stats: in the plan
            new.meta = {**new.meta, "custom": {**(old.meta.get("custom") or {}), META: _encode(summary)}}
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    return copy


def _with_stats(info: dict, plan: QuantPlan | None) -> dict:
    """Point a restored node's ``stats`` at the plan's statistics, as before saving."""
    if plan is None:
        return info
    if info.get("role") == "linear" and info.get("site") in plan.sites:
        info["stats"] = plan.sites[info["site"]].stats
    elif info.get("group") in plan.groups:
        info["stats"] = plan.groups[info["group"]].stats
    return info


# JSON encoding of the plan: dataclasses and tensors are tagged so that _decode rebuilds them.
_MAX_ELEMENTS = 1 << 16  # statistics are per channel; bigger tensors are not statistics
_CLASSES = {"QuantConfig": QuantConfig, "QuantPlan": QuantPlan, "Site": Site, "Group": Group}


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() > _MAX_ELEMENTS:  # e.g. a kept float weight: the graph holds the weights
            return f"<tensor {tuple(value.shape)} {value.dtype} not stored>"
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _CLASSES:
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__class__": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)  # anything else is kept for reading, not rebuilt


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    fields = {k: _decode(v) for k, v in value.items() if k != "__class__"}
    cls = _CLASSES.get(value.get("__class__", ""))
    return cls(**fields) if cls is not None else fields
