"""Issue 11: careless input never destroys a file, and gets a clear error or warning, not an internal one.

Data loss: the CLI never writes over its own inputs (or one output over another), checks that it
can write before any work, and save / dump keep the mode of a file they replace and refuse a
read-only one. Clear errors: each message names the argument and what to do.
"""

import logging
import os
import stat
import textwrap

import pytest
import torch
from models import mlp, tensor_batches
from test_cli import hf_dir  # noqa: F401  (a module fixture: a tiny local Llama directory)

import fxquant.cli as cli
from fxquant import QuantConfig, dump, quantize_graph, save
from fxquant.cli import main

FAST = QuantConfig(rotation_steps=2, block_size=16, calib_tokens=64)
DATA = tensor_batches(2)


@pytest.fixture(scope="module")
def gm():
    return quantize_graph(mlp(), DATA, FAST)


@pytest.fixture(scope="module")
def saved(gm, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m.pt2"
    save(gm, path, DATA[0])
    return path


def _fails_with_one_line(argv, capsys, *words):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _no_work(monkeypatch):
    """The commands below must stop before loading or quantizing anything."""
    def work(*args, **kwargs):
        raise AssertionError("the command started work before checking its output paths")

    monkeypatch.setattr(cli, "_model_and_batches", work)
    monkeypatch.setattr("fxquant.serialize.load", work)


# --- 10: the CLI never writes over its inputs or one output over another --------------------------
@pytest.mark.parametrize("name", ["same", "relative", "symlink", "hardlink"])
def test_dump_refuses_an_output_that_is_its_model(saved, tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(saved.parent)
    before = saved.read_bytes()
    out = {"same": str(saved), "relative": f"../{saved.parent.name}/m.pt2", "symlink": str(tmp_path / "link"),
           "hardlink": str(tmp_path / "hard.pt2")}[name]
    if name == "symlink":
        os.symlink(saved, out)
    if name == "hardlink":
        os.link(saved, out)
    _no_work(monkeypatch)
    _fails_with_one_line(["dump", "m.pt2", "--format", "html", "-o", out], capsys, "same file as the input model")
    assert saved.read_bytes() == before


def test_quantize_refuses_an_output_that_is_the_calibration_text(hf_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    calib = hf_dir / "calib.txt"
    text = calib.read_text()
    monkeypatch.chdir(hf_dir)
    _no_work(monkeypatch)
    _fails_with_one_line(["quantize", "--hf", str(hf_dir), "--calib", "calib.txt", "--out", str(calib)], capsys,
                         "--out", "same file as --calib")
    # an output that is a model file of --hf DIR (the loader reads them) is refused too
    config = (hf_dir / "config.json").read_bytes()
    _fails_with_one_line(["quantize", "--hf", str(hf_dir), "--calib", "calib.txt", "--out", str(tmp_path / "q.pt2"),
                          "--summary", "config.json"], capsys, "--summary", "--hf model directory")
    assert calib.read_text() == text and (hf_dir / "config.json").read_bytes() == config


def test_quantize_refuses_a_summary_that_is_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    _fails_with_one_line(["quantize", "--factory", "m:f", "--out", "q.pt2", "--summary", str(tmp_path / "q.pt2")],
                         capsys, "--summary", "same file as --out")


def test_quantize_refuses_an_output_that_is_the_factory_module(tmp_path, monkeypatch, capsys):
    source = textwrap.dedent("""
        def build():
            raise AssertionError("the factory ran although the output overwrites its module")
    """)
    (tmp_path / "my_factory.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    _fails_with_one_line(["quantize", "--factory", "my_factory.py:build", "--out", "my_factory.py"], capsys,
                         "same file as the --factory module")
    assert (tmp_path / "my_factory.py").read_text() == source


# --- 11: save and dump keep the mode of the file they replace, and refuse a read-only one -----------
def _writers(gm, folder):
    return [(folder / "m.pt2", lambda p: save(gm, p, DATA[0])), (folder / "m.txt", lambda p: dump(gm, p))]


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_save_and_dump_keep_the_mode_of_a_replaced_file(gm, tmp_path, mode):
    for path, write in _writers(gm, tmp_path):
        path.write_text("old")
        path.chmod(mode)
        write(path)
        assert path.read_bytes() != b"old" and stat.S_IMODE(path.stat().st_mode) == mode
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_save_and_dump_refuse_a_read_only_file(gm, tmp_path):
    for path, write in _writers(gm, tmp_path):
        path.write_text("keep me")
        path.chmod(0o444)
        with pytest.raises(PermissionError, match=r"is read-only \(mode 0444\).*chmod u\+w"):
            write(path)
        assert path.read_text() == "keep me" and stat.S_IMODE(path.stat().st_mode) == 0o444


# --- 12: unwritable CLI outputs: one line, before any work --------------------------------------------
def test_cli_unwritable_outputs_fail_first_with_one_line(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "locked.pt2").write_text("keep me")
    (tmp_path / "locked.pt2").chmod(0o444)
    _no_work(monkeypatch)
    _fails_with_one_line(["quantize", "--factory", "m:f", "--out", "folder"], capsys, "--out", "is a directory")
    _fails_with_one_line(["quantize", "--factory", "m:f", "--out", "locked.pt2"], capsys, "--out", "read-only")
    _fails_with_one_line(["quantize", "--factory", "m:f", "--out", "q.pt2", "--summary", "no/such/dir/plan.txt"],
                         capsys, "--summary", "directory not found")
    _fails_with_one_line(["dump", str(saved), "-o", "folder"], capsys, "-o", "is a directory")
    assert (tmp_path / "locked.pt2").read_text() == "keep me"


def test_cli_write_failure_after_work_is_one_line(saved, tmp_path, monkeypatch, capsys):
    """A write that fails anyway (disk full) is reported in one line naming the user's file."""
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    out = tmp_path / "report.html"
    err = _fails_with_one_line(["dump", str(saved), "-o", str(out)], capsys, "No space left", str(out))
    assert ".fxquant" not in err and list(tmp_path.iterdir()) == []


# --- clear errors instead of internal ones ------------------------------------------------------------
@pytest.mark.parametrize("config,words", [({"w_bits": 4}, "QuantConfig(**config)"),
                                          (QuantConfig, "an instance, not the class")])
def test_config_must_be_a_quantconfig_instance(config, words):
    with pytest.raises(TypeError, match=r"config must be a fxquant\.QuantConfig") as err:
        quantize_graph(mlp(), DATA, config)
    assert words in str(err.value)


def test_include_must_be_regexes_and_seed_must_fit():
    with pytest.raises(TypeError, match=r"QuantConfig\.include=123 is invalid: use a regex string"):
        QuantConfig(include=123)
    with pytest.raises(ValueError, match=r"QuantConfig\.seed=.* 2\*\*32 - 1"):  # at once, not after capture
        QuantConfig(seed=2**70)


def test_group_size_not_dividing_a_layer_fails_in_the_plan_naming_it():
    with pytest.raises(ValueError, match=r"w_group_size=48 does not divide the 64 input features of layer '0'.*"
                                         r"e\.g\. 16, 32, 64"):
        quantize_graph(mlp(), DATA, QuantConfig(w_group_size=48), dry_run=True)  # before any calibration


@pytest.mark.parametrize("loader,words", [(None, "calib_loader must be an iterable of batches"),
                                          (torch.randn(8, 64), "calib_loader is a Tensor")])
def test_calib_loader_must_be_batches(loader, words):
    with pytest.raises(TypeError, match=words):
        quantize_graph(mlp(), loader, FAST)


class Once:
    """An iterable that gives its batches on the first iter() only (as a stream reader might)."""

    def __init__(self, batches):
        self.batches, self.used = batches, False

    def __iter__(self):
        if self.used:
            return iter(())
        self.used = True
        return iter(self.batches)


def test_one_shot_iterable_is_named_as_such():
    with pytest.raises(ValueError, match=r"yielded 0 batches when iterated again, after 1 before.*Pass a list"):
        quantize_graph(mlp(), Once(DATA), FAST)


def test_batch_dtype_mismatch_says_so_about_batch_0():
    with pytest.raises(RuntimeError, match=r"batch 0 .*the batch holds float64 on cpu but the model's weights are "
                                           r"float32 on cpu") as err:
        quantize_graph(mlp(), [b.double() for b in DATA], FAST)
    assert "same way as the first one" not in str(err.value)


def test_meta_device_model_is_refused():
    with pytest.raises(ValueError, match=r"meta device \('0\.weight', \.\.\.\).*load the real weights"):
        quantize_graph(mlp().to("meta"), DATA, FAST)


@pytest.mark.parametrize("model,config,words", [
    (mlp, QuantConfig(include="attn"), "nothing is quantized: every linear layer is skipped"),
    (torch.nn.ReLU, FAST, "no linear layer (nn.Linear or F.linear), so nothing is quantized"),
])
def test_nothing_quantized_warns(model, config, words, caplog):
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        quantize_graph(model(), DATA, config, dry_run=True)
    assert words in caplog.text


def test_all_zero_calibration_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        quantize_graph(mlp(), [torch.zeros(8, 64)] * 2, FAST)
    assert "every calibration input of 0 is zero" in caplog.text


def test_activations_out_of_float32_range_are_named():
    with pytest.raises(ValueError, match=r"read by 0 reaches \|x\| = .*e\+2\d: its X\^T X .* out of range"):
        quantize_graph(mlp(), [b * 1e19 for b in DATA], FAST)


@pytest.mark.parametrize("writer", ["save", "dump"])
@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_write_errors_name_the_users_path(gm, tmp_path, writer, where):
    path = tmp_path / "nope" / "m.pt2" if where == "missing folder" else tmp_path
    with pytest.raises(OSError) as err:
        save(gm, path, DATA[0]) if writer == "save" else dump(gm, path)
    assert f"{writer} path: " in str(err.value) and ".fxquant" not in str(err.value) and ".tmp" not in str(err.value)
    assert str(path) in str(err.value) or str(path.parent) in str(err.value)


def test_save_warns_about_a_size_one_example(gm, tmp_path):
    with pytest.warns(UserWarning, match=r"fxquant\.save: example_inputs has a dim of size 1 .*at least 2"):
        save(gm, tmp_path / "m.pt2", DATA[0][:1])


def test_save_and_dump_of_a_plain_module_say_to_quantize_first(tmp_path):
    with pytest.raises(TypeError, match=r"save\(gm=\.\.\.\) takes the GraphModule .* got Sequential"):
        save(mlp(), tmp_path / "m.pt2", DATA[0])
    with pytest.raises(TypeError, match=r"dump\(gm=\.\.\.\) takes a GraphModule .* got Sequential"):
        dump(mlp())
    assert list(tmp_path.iterdir()) == []
