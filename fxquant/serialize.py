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
import io
import json
import os
import re
import sys
import warnings
import zipfile
import zlib
from typing import Any

import torch
from torch import fx

from . import torch_private
from .capture import TORCH_LOCK, batch_to_call, dynamic_dims
from .config import QuantConfig
from .files import check_writable, write_atomic
from .passes.common import META, copy_graph_module
from .passes.lower import pack_weights, unpack_weights
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
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"save(gm=...) takes the GraphModule that quantize_graph returns, got {type(gm).__name__}; "
                        "quantize the model first: save(quantize_graph(model, loader), path, batch)")
    check_writable(path, "save path")  # before the export, which takes a while
    args, kwargs = batch_to_call(example_inputs)
    _warn_size_one(args, kwargs)
    with TORCH_LOCK, torch.no_grad():  # export traces: one thread at a time (capture.TORCH_LOCK)
        program = torch.export.export(_export_form(gm), args, kwargs, dynamic_shapes=dynamic_dims(args, kwargs),
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
    """``write(tmp)`` then move into place: files.write_atomic (whole file, mode kept, errors name ``path``)."""
    write_atomic(path, write, what="save path")


def _warn_size_one(args: tuple, kwargs: dict) -> None:
    """As capture warns: torch.export fixes a dim whose example size is 1, and the saved graph keeps it."""
    shapes = [tuple(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and 1 in t.shape]
    if shapes:
        warnings.warn(f"fxquant.save: example_inputs has a dim of size 1 (shapes {shapes}); torch.export fixes "
                      "such a dim, so the saved graph accepts only size 1 there. If it varies at run time (batch, "
                      "tokens), save with an example of at least 2 there.", stacklevel=3)


def load(path: str | os.PathLike) -> fx.GraphModule:
    """The module saved by ``save``: called like the original graph, fxquant meta restored.

    What load reads, so that a hostile or damaged file runs no code (checked before torch sees it):
    - every member's CRC (``zipfile.ZipFile.testzip``): a damaged file is refused, naming the member;
    - only JSON (graph, plan, payload configs), raw tensor bytes and text ``extra`` files; a member
      torch would unpickle is refused, naming it: weights or constants stored as pickles, custom
      (torchbind / opaque) objects, AOTInductor libraries, any member fxquant.save does not write.
      Sample inputs (``save`` writes none) are read only if they load with
      ``torch.load(weights_only=True)``, which torch then tries first, so its pickle fallback never runs;
    - modules named in ``extra/fxquant/imports.json`` (the types of the call's inputs and outputs)
      are imported only if they are part of fxquant, or Hugging Face transformers modules that
      define output types (``transformers.modeling_outputs``, ``transformers.cache_utils``,
      ``transformers.models.<name>.modeling_<name>``), imported as ``import`` finds them. Any other
      module must already be imported by you: load raises a ValueError naming it rather than import it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fxquant archive at {path!r}")
    # one open file for the checks and the load: a file swapped in at ``path`` meanwhile is not read
    with open(path, "rb") as file:
        modules = _check_archive(file, path)
        _import_spec_modules(modules, path)
        extra = {PLAN_JSON: "", PLAN_TEXT: ""}
        file.seek(0)
        program = torch.export.load(file, extra_files=extra)
    gm = program.module()
    unpack_weights(gm)  # 4-bit weights are stored packed: unpack them once, not on every call
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


# Members of a torch.export archive (below its root folder) that load reads as text, JSON or raw
# tensor bytes; anything else is refused. Raw payloads are named weight_<n> / tensor_<n>.
_PLAIN = re.compile(r"archive_format|archive_version|byteorder|\.data/[^/]+|models/[^/]+\.json|extra/.+"
                    r"|data/weights/[^/]+_weights_config\.json|data/constants/[^/]+_constants_config\.json"
                    r"|data/weights/weight_\d+|data/constants/tensor_\d+")
# torch.save files that torch reads with torch.load(weights_only=True), falling back to
# weights_only=False (any pickle) when that fails: the sample inputs, and weights / constants of
# the archive layout before torch 2.8
_TORCH_SAVE = re.compile(r"data/sample_inputs/[^/]+\.pt|data/weights/[^/]+\.pt|data/constants/[^/]+\.pt")
_RAW_PAYLOAD = {"data/weights/": "weight_", "data/constants/": "tensor_"}


def _check_archive(file: Any, path: str) -> list[str]:
    """Refuse an archive that is damaged or holds anything torch.export.load would unpickle or
    run; return the modules named in its imports.json."""
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise ValueError(f"{path!r} is not a .pt2 archive written by fxquant.save / torch.export.save") from None
    with archive:
        try:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
            raise ValueError(f"{path!r} is damaged ({err}); write it again with fxquant.save") from None
        if damaged is not None:
            raise ValueError(f"{path!r} is damaged: member {damaged!r} fails its CRC check (its bytes changed "
                             "after it was written); write the file again with fxquant.save")
        names = archive.namelist()
        root = names[0].split("/")[0] + "/" if names else ""
        seen: set[str] = set()
        for name in names:
            # torch's zip reader finds members ignoring case: two names differing only in case are
            # two candidates for one read, and the one checked here might not be the one torch reads
            if name.lower() in seen:
                raise ValueError(f"{path!r}: member {name!r} appears twice (names compared ignoring case); "
                                 "fxquant.save never writes that, so the file is not loaded")
            seen.add(name.lower())
            _check_member(archive, name, root, path)
        imports = root + "extra/" + IMPORTS
        try:
            modules = json.loads(archive.read(imports)) if imports in names else []
        except ValueError:
            modules = None
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{path!r}: member {imports!r} must be a JSON list of module names")
    return modules


def _check_member(archive: zipfile.ZipFile, name: str, root: str, path: str) -> None:
    refuse = f"{path!r}: member {name!r}"
    never = ("fxquant.load reads only JSON, raw tensor bytes and text, never a pickle (unpickling runs "
             "code); was the file written by fxquant.save?")
    if not root or not name.startswith(root):
        raise ValueError(f"{refuse} lies outside the archive's folder {root!r}; {never}")
    member = name[len(root):]
    if _PLAIN.fullmatch(member):  # read as text, JSON or raw bytes
        if member.startswith(tuple(_RAW_PAYLOAD)) and member.endswith("_config.json"):
            _check_payload_config(archive.read(name), member, f"{refuse}:")
        return
    if _TORCH_SAVE.fullmatch(member):
        data = archive.read(name)
        if not data:  # save writes empty sample inputs; torch reads empty as "none"
            return
        try:
            loaded = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:
            raise ValueError(f"{refuse} is a pickle that torch.load(weights_only=True) refuses "
                             f"({type(err).__name__}); {never}") from None
        if not isinstance(loaded, (tuple, dict)):  # torch would then fail after its fallback
            raise ValueError(f"{refuse} holds a {type(loaded).__name__}, not a tuple or dict; {never}")
        return
    raise ValueError(f"{refuse} is not part of an archive fxquant.save writes; {never}")


def _check_payload_config(text: bytes, member: str, refuse: str) -> None:
    """Weights and constants must be raw tensor bytes: torch unpickles an entry with use_pickle
    (torch.load with weights_only=False) and custom or opaque objects (pickle.loads)."""
    folder = member[:member.rindex("/") + 1]
    try:
        entries = json.loads(text)["config"]
        stored = [(fqn, bool(e.get("use_pickle")), str(e.get("path_name"))) for fqn, e in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{refuse} is not a torch.export payload config (JSON)") from None
    for fqn, pickled, name in stored:
        if pickled or not re.fullmatch(_RAW_PAYLOAD[folder] + r"\d+", name):
            raise ValueError(f"{refuse} stores {fqn!r} as {name!r}, a pickle or object, not raw tensor bytes; "
                             "fxquant.load never unpickles (that runs code). Was the file written by fxquant.save?")


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
        specs.extend(torch_private.pytree_children(spec))
    return sorted(modules)


# Modules load may import to register the types of the call's inputs and outputs: fxquant's own,
# and the Hugging Face modules defining ModelOutput and cache types (a transformers model's output)
_IMPORTABLE = re.compile(r"fxquant(\.\w+)*|transformers\.(modeling_outputs|cache_utils|models\.\w+\.modeling_\w+)")


def _import_spec_modules(modules: list[str], path: str) -> None:
    """Import what the archive's pytree types need, from the allow-list only: importing runs the
    module's code, and the names come from the file."""
    for module in modules:
        if module in sys.modules:  # imported already: importing again runs nothing
            continue
        if not _IMPORTABLE.fullmatch(module):
            raise ValueError(f"{path!r} returns types from module {module!r}, which fxquant.load does not import "
                             "(it imports only fxquant and Hugging Face transformers output modules, since importing "
                             f"runs code named by the file); if you trust the file, `import {module}` before loading")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{path!r} returns types from {module!r}, which cannot be imported ({err}); "
                              "install the package the model came from") from err


def _export_form(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its tensors) as it is saved: 4-bit integer weights packed two per
    byte (lower.pack_weights), and each node's meta["fxquant"] as JSON in meta["custom"], the one
    node meta key torch.export carries into the nodes it produces."""
    copy, _ = copy_graph_module(gm)
    pack_weights(copy)
    for node in copy.graph.nodes:
        if META in node.meta:
            summary = {k: v for k, v in node.meta[META].items() if k != "stats"}  # stats: in the plan
            node.meta["custom"] = {**(node.meta.get("custom") or {}), META: _encode(summary)}
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
