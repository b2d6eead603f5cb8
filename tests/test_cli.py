"""The fxquant command line end to end on tiny models in tmp_path, and save/load round trips."""

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from models import mlp, tensor_batches, tiny_llama, token_batches

from fxquant import QuantConfig, quantize_graph
from fxquant.cli import main
from fxquant.passes.common import META
from fxquant.serialize import load, save

FLAGS = ["--rotation-steps", "2", "--block-size", "16", "--calib-tokens", "128"]
CONFIG = QuantConfig(rotation_steps=2, block_size=16, calib_tokens=128)
TEXT = ("the quick brown fox jumps over the lazy dog while a stitch in time saves nine "
        "and all that glitters is not gold so the early bird catches the worm ") * 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 1-layer LlamaForCausalLM and a word-level tokenizer trained here (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "calib.txt").write_text(TEXT)
    return folder


def _hf_args(hf_dir):
    return ["--hf", str(hf_dir), "--calib", str(hf_dir / "calib.txt"), "--seq-len", "8", "--batch-size", "2",
            "--calib-samples", "4", *FLAGS]


@torch.no_grad()
def test_quantize_hf_writes_a_graph_equal_to_quantize_graph(hf_dir, tmp_path, capsys):
    out = tmp_path / "llama.pt2"
    assert main(["quantize", *_hf_args(hf_dir), "--out", str(out), "--summary", str(tmp_path / "plan.txt")]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in printed and f"wrote {out}" in printed
    assert "7 of 8 linear layers quantized" in (tmp_path / "plan.txt").read_text()

    # the same windows through the Python API give the same graph
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:32]).view(4, 8)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    expected = quantize_graph(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}], CONFIG)
    loaded = load(out)
    probe = torch.randint(0, 20, (3, 11))  # another batch size and length: the saved graph is dynamic
    torch.testing.assert_close(loaded(input_ids=probe).logits, expected(input_ids=probe).logits)


def test_quantize_factory_and_quiet_prints_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
            g = torch.Generator().manual_seed(1)
            return model, [torch.randn(8, 64, generator=g) for _ in range(2)]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    assert main(["quantize", "--factory", "my_models:build", "--out", "mlp.pt2", "--quiet", *FLAGS]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "fxquant calibrate" not in captured.err
    import my_models

    model, batches = my_models.build()
    expected = quantize_graph(model, batches, CONFIG)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "mlp.pt2")(x), expected(x))


def test_plan_dry_run_prints_the_plan_and_writes_nothing(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *_hf_args(hf_dir), "--dry-run", "--exclude", "down_proj"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    # --exclude replaces the default exclusion of lm_head
    assert "excluded" in rows["model.layers.0.mlp.down_proj"] and "excluded" not in rows["lm_head"]
    assert "7 of 8 linear layers quantized" in printed
    assert list(tmp_path.iterdir()) == []


def test_dump_html_of_a_saved_graph(tmp_path, capsys):
    data = tensor_batches(2)
    save(quantize_graph(mlp(), data, CONFIG), tmp_path / "mlp.pt2", data[0])
    report = tmp_path / "report.html"
    assert main(["dump", str(tmp_path / "mlp.pt2"), "--format", "html", "-o", str(report)]) == 0
    assert f"wrote {report}" in capsys.readouterr().out
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "fxquant report" in page and "quantized" in page
    assert main(["dump", str(tmp_path / "mlp.pt2"), "--format", "table"]) == 0
    assert "quantized" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["quantize", "--factory", "m:f", "--out", "x.pt2", "--w-bits", "3.5"], "--w-bits: invalid _bits value"),
    (["quantize", "--factory", "m:f", "--out", "x.pt2", "--block-size", "96"], "block_size=96 is invalid"),
    (["quantize", "--factory", "m:f"], "the following arguments are required: --out"),
    (["quantize", "--hf", "no-such-dir", "--calib", "c.txt", "--out", "x.pt2"], "directory not found: no-such-dir"),
    (["plan", "--factory", "no_such_module_here:build"], "cannot import 'no_such_module_here'"),
    (["dump", "missing.pt2"], "model file not found: missing.pt2"),
    (["dump", "missing.pt2", "--format", "pdf"], "invalid choice: 'pdf'"),
])
def test_bad_flags_and_missing_files_exit_with_a_message(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_missing_calibration_text_is_named(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--hf", str(hf_dir), "--calib", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert f"--calib: file not found: {tmp_path / 'nope.txt'}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["quantize"], ["plan"], ["dump"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fxquant {' '.join(command)}".rstrip())


def test_python_dash_m_and_console_script():
    done = subprocess.run([sys.executable, "-m", "fxquant", "plan", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--dry-run" in done.stdout, done.stderr[-2000:]
    script = os.path.join(os.path.dirname(sys.executable), "fxquant")
    if not os.path.exists(script):
        pytest.skip("fxquant is not installed in this environment (pip install -e .): no console script")
    done = subprocess.run([script, "dump", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--format" in done.stdout, done.stderr[-2000:]


@torch.no_grad()
def test_save_load_keeps_outputs_plan_and_node_meta(tmp_path):
    data = token_batches(2)
    gm = quantize_graph(tiny_llama(layers=1), data, CONFIG)
    path = tmp_path / "llama.pt2"
    save(gm, path, data[0])
    save(gm, path, data[0])  # replacing an existing file: atomic, no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.pt2"]
    with zipfile.ZipFile(path) as archive:  # no pickle: the example inputs are not stored
        samples = [archive.getinfo(n).file_size for n in archive.namelist() if n.endswith("sample_inputs/model.pt")]
    assert samples in ([], [0]), samples
    loaded = load(path)
    ids = torch.randint(0, 128, (3, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, gm(input_ids=ids).logits)

    plan = loaded.meta[META]["plan"]
    assert plan.table() == gm.meta[META]["plan"].table()
    assert loaded.meta[META]["config"] == CONFIG
    roles = {n.meta[META]["role"] for n in loaded.graph.nodes if META in n.meta}
    assert {"smooth", "quantize", "linear"} <= roles, roles
    # restored node stats point at the restored plan, as in the graph that was saved
    node = next(n for n in loaded.graph.nodes if n.meta.get(META, {}).get("role") == "quantize")
    assert node.meta[META]["stats"] is plan.groups[node.meta[META]["group"]].stats


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt2"):
        load(tmp_path / "nope.pt2")
