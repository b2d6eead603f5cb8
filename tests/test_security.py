"""fxquant.load of hostile and damaged archives: nothing is unpickled, imported or run, and the
error names the member; a file that fxquant.save wrote still loads."""

import json
import os
import sys
import zipfile

import pytest
import torch
from models import mlp, tensor_batches

from fxquant import QuantConfig, load, quantize_graph, save
from fxquant.cli import main

CONFIG = QuantConfig(rotation_steps=4, block_size=16, calib_tokens=256)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized MLP saved once, and its output on a probe batch."""
    data = tensor_batches(2)
    gm = quantize_graph(mlp(), data, CONFIG)
    path = tmp_path_factory.mktemp("saved") / "mlp.pt2"
    save(gm, path, data[0])
    probe = torch.randn(3, 64)
    with torch.no_grad():
        return path, probe, gm(probe)


class MakeDir:
    """A pickle whose unpickling creates the folder ``path`` (the harmless stand-in for os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _rewrite(source, target, replace):
    """Copy the zip ``source`` to ``target``, member names ending in a key of ``replace`` taking its bytes."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            key = next((k for k in replace if info.filename.endswith(k)), None)
            new.writestr(info, replace[key] if key else old.read(info.filename))


def _member(path, suffix):
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith(suffix))


def test_a_file_written_by_save_loads(saved):
    path, probe, expected = saved
    with torch.no_grad():
        torch.testing.assert_close(load(path)(probe), expected)


def test_pickled_sample_inputs_are_refused_without_running_them(saved, tmp_path, capsys):
    import pickle

    marker = tmp_path / "ran"
    hostile = tmp_path / "evil.pt2"
    _rewrite(saved[0], hostile, {"data/sample_inputs/model.pt": pickle.dumps(MakeDir(marker), protocol=2)})
    with pytest.raises(ValueError, match=r"member '[^']*data/sample_inputs/model.pt'.*weights_only=True"):
        load(hostile)
    assert not marker.exists(), "the pickle in the archive ran"
    # the command line loads through the same check: exit status 1, one line naming the member
    assert main(["dump", str(hostile), "--format", "code"]) == 1
    assert "data/sample_inputs/model.pt" in capsys.readouterr().err and not marker.exists()


def test_weights_stored_as_pickles_are_refused_without_running_them(saved, tmp_path):
    import pickle

    marker = tmp_path / "ran"
    config_name = _member(saved[0], "data/weights/model_weights_config.json")
    with zipfile.ZipFile(saved[0]) as archive:
        config = json.loads(archive.read(config_name))
    fqn, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True  # torch.export.load would torch.load(weights_only=False) this payload
    hostile = tmp_path / "evil.pt2"
    _rewrite(saved[0], hostile, {"model_weights_config.json": json.dumps(config).encode(),
                                 f"data/weights/{entry['path_name']}": pickle.dumps(MakeDir(marker), protocol=2)})
    with pytest.raises(ValueError, match=rf"model_weights_config.json'.*{fqn}.*not raw tensor bytes"):
        load(hostile)
    assert not marker.exists(), "the pickle in the archive ran"


def test_members_save_never_writes_are_refused(saved, tmp_path):
    hostile = tmp_path / "evil.pt2"
    with zipfile.ZipFile(saved[0]) as old, zipfile.ZipFile(hostile, "w") as new:
        for info in old.infolist():
            new.writestr(info, old.read(info.filename))
        root = old.namelist()[0].split("/")[0]
        new.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")  # torch.export.load would dlopen it
    with pytest.raises(ValueError, match=r"data/aotinductor/model/model.so' is not part of an archive"):
        load(hostile)


def test_modules_named_by_the_archive_are_imported_only_from_the_allow_list(saved, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil_mod.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as the current directory is on sys.path
    hostile = tmp_path / "evil.pt2"
    _rewrite(saved[0], hostile, {"extra/fxquant/imports.json": json.dumps(["evil_mod"]).encode()})
    with pytest.raises(ValueError, match=r"module 'evil_mod'.*does not import.*import evil_mod"):
        load(hostile)
    assert not marker.exists() and "evil_mod" not in sys.modules
    # a module already imported runs nothing when named again: the archive loads
    named = tmp_path / "named.pt2"
    _rewrite(saved[0], named, {"extra/fxquant/imports.json": json.dumps(["json", "fxquant.ops"]).encode()})
    path, probe, expected = saved
    with torch.no_grad():
        torch.testing.assert_close(load(named)(probe), expected)


def test_a_damaged_archive_is_refused_naming_the_member(saved, tmp_path):
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(saved[0].read_bytes())
    name = _member(damaged, "data/weights/weight_0")
    with zipfile.ZipFile(damaged) as archive:
        info = archive.getinfo(name)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 64
    with open(damaged, "r+b") as file:  # flip bytes in the middle of the stored weight data
        file.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(file.read(2), "little"), int.from_bytes(file.read(2), "little")
        file.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = file.read(4)
        file.seek(-4, os.SEEK_CUR)
        file.write(bytes(b ^ 0x40 for b in byte))
    with pytest.raises(ValueError, match=rf"damaged\.pt2'.*damaged: member '{name}' fails its CRC check"):
        load(damaged)


def test_sample_inputs_that_weights_only_accepts_still_load(tmp_path):
    # a plain torch.export archive stores its example inputs as a pickle of tensors: that one is fine
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(3, 8)
    path = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo(_member(path, "data/sample_inputs/model.pt")).file_size > 0
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), model(x))
