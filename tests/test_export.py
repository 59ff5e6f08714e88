"""export_hf.py: an exported checkpoint opens in transformers and computes our logits."""
import json
import os

import pytest
import torch

import checkpoint
import export_hf
from errors import UserError, run_main
from model import GPT


def hf_model(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).eval()


@pytest.fixture
def run(random_gpt, tmp_path):
    """A run folder with two checkpoints; the newer one (step 20) is the one to export."""
    checkpoint.save_checkpoint(str(tmp_path / "run"), 10, random_gpt(seed=1), "gpt2")
    model = random_gpt(seed=2)  # vocabulary 300, padded to 320
    checkpoint.save_checkpoint(str(tmp_path / "run"), 20, model, "gpt2")
    return tmp_path / "run", model


@torch.no_grad()
def test_export_opens_in_transformers_with_equal_logits(run, tmp_path):
    folder, model = run
    out = tmp_path / "hf"
    export_hf.main([str(folder), str(out)])  # the run folder: its newest checkpoint
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["n_ctx"] == config["n_positions"] == 64
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs = hf_model(out)
    assert (theirs(idx).logits - model(idx)[0]).abs().max().item() < 1e-4
    again = GPT.from_pretrained(str(out)).eval()
    assert (again(idx)[0] - model(idx)[0]).abs().max().item() < 1e-5
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no leftovers beside out_dir


def test_tokenizer_file_travels_with_the_export(random_gpt, tmp_path, gpt2_tiktoken):
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(vocab_size=50257), str(gpt2_tiktoken))
    export_hf.export(ckpt, str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.tiktoken").read_bytes() == gpt2_tiktoken.read_bytes()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256


def test_existing_out_dir_needs_overwrite(run, tmp_path):
    folder, _ = run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        export_hf.export(str(folder), str(out))
    export_hf.export(str(folder), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_model_without_biases_cannot_be_gpt2(random_gpt, tmp_path, capsys):
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(bias=False), "gpt2")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export_hf.main([ckpt, str(tmp_path / "hf")]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bias=False" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()
