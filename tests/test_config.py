"""config.py: preset sizes match the published GPT-2 models, and flags, files and presets combine as documented."""
import argparse
import json

import pytest

import config
from config import GPTConfig
from errors import UserError
from model import GPT, count_params


@pytest.mark.parametrize("preset, published", [
    ("gpt2", 124_439_808),
    ("gpt2-medium", 354_823_168),  # "355M"
    ("gpt2-large", 774_030_080),  # "774M"
    ("gpt2-xl", 1_557_611_200),  # "1.5B"
])
def test_preset_parameter_counts_match_published(preset, published):
    model_cfg = config.make_configs(config.PRESETS[preset])[0]
    assert count_params(model_cfg) == published


@pytest.mark.parametrize("bias", [True, False])
def test_count_params_equals_built_model_without_padding(bias):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, pad_vocab_multiple=64, bias=bias)
    model = GPT(cfg)
    built = sum(p.numel() for p in model.parameters())  # parameters() yields the tied head once
    padding_rows = cfg.padded_vocab_size - cfg.vocab_size
    assert padding_rows == 28
    assert count_params(cfg) == built - padding_rows * cfg.n_embd
    # Without the tables that are looked up: here the position table, since wte is also the head.
    positions = model.transformer.wpe.weight.numel()
    assert count_params(cfg, include_embeddings=False) == built - padding_rows * cfg.n_embd - positions


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_config_args(parser)
    return config.parse_configs(parser, argv)


def test_dashes_and_underscores_are_the_same_flag():
    for argv in (["--n-layer", "6"], ["--n_layer=6"], ["--n-layer=6"], ["--n_layer", "6"]):
        model_cfg, _, _, _ = parse(argv)
        assert model_cfg.n_layer == 6


def test_defaults_without_flags():
    model_cfg, train_cfg, opts, _ = parse([])
    assert model_cfg == GPTConfig()
    assert train_cfg == config.TrainConfig()
    assert opts == config.RunOptions()


@pytest.mark.parametrize("argv, expected", [
    ([], False), (["--resume"], True), (["--no-resume"], False), (["--resume=false"], False),
    (["--resume", "yes"], True),
])
def test_bool_flags(argv, expected):
    _, _, opts, _ = parse(argv)
    assert opts.resume is expected


def test_optional_and_float_flags():
    _, train_cfg, _, _ = parse(["--min-lr", "3e-5", "--compile", "--learning_rate", "1e-3"])
    assert train_cfg.min_lr == 3e-5 and train_cfg.compile is True and train_cfg.learning_rate == 1e-3


def test_preset_then_file_then_flags(tmp_path):
    model_cfg, train_cfg, _, _ = parse(["--config", "tiny", "--n-layer", "2"])
    assert (model_cfg.n_layer, model_cfg.vocab_size, train_cfg.out_dir) == (2, 4096, "out/tiny")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"n_layer": 3, "n_embd": 96, "learning_rate": 1}))
    model_cfg, train_cfg, _, _ = parse(["--config", str(path), "--n-embd", "128"])
    assert (model_cfg.n_layer, model_cfg.n_embd) == (3, 128)
    assert train_cfg.learning_rate == 1.0 and isinstance(train_cfg.learning_rate, float)  # JSON int → float


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(UserError) as e:
        parse(["--config", str(path)])
    message = str(e.value)
    assert "n_layers" in message and "n_layer" in message.split("valid keys")[1] and "\n" not in message


def test_unknown_cli_option_is_a_user_error():
    with pytest.raises(UserError, match="--n-layers"):
        parse(["--n-layers", "6"])


def test_missing_config_file_or_preset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither a preset"):
        parse(["--config", str(tmp_path / "nope.json")])
    broken = tmp_path / "broken.json"
    broken.write_text("{n_layer: 3")
    with pytest.raises(UserError, match="JSON"):
        parse(["--config", str(broken)])


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's own one-line error, exit code 2
        parse(["--n-layer", "six"])
    assert e.value.code == 2
    path = tmp_path / "typed.json"
    path.write_text(json.dumps({"n_layer": "6"}))
    with pytest.raises(UserError, match="n_layer must be int"):
        parse(["--config", str(path)])
    with pytest.raises(UserError, match="resume must be bool"):
        config.make_configs({"resume": "yes"})
    with pytest.raises(UserError, match="n_layer must be int"):  # JSON true is not 1
        config.make_configs({"n_layer": True})
