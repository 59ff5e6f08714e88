"""train.py --init-from (finetune.py): fine-tuning a transformers-saved GPT-2 or Qwen3, continued pre-training from
a run of ours, checked against transformers and against an uninterrupted run; bad sources in one line."""
import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import markov
import prepare_data
import train
from helpers import (SMALL, assert_one_line_error, in_process, kill_and_resume, perturb, read_log, run_train,
                     shared_data, write_jsonl)
from shards import read_shard, shard_paths

# The HF models' shape is SMALL's (2 x 64, 2 heads), so SMALL's shape flags agree with the source; their
# vocabulary is GPT-2's, the windows 32 tokens of the 64 positions (a crop).
HF_LAYERS, HF_HEADS, HF_EMBD, HF_POSITIONS = 2, 2, 64, 64
B, T, EVAL_STEPS = 4, 32, 3
FLAGS = [*SMALL, "--batch-size", B, "--total-batch-size", B * T, "--eval-steps", EVAL_STEPS,
         "--eval-interval", 1000]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    """Random, perturbed transformers models saved with save_pretrained: {"gpt2": folder, "qwen3": folder}."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=HF_LAYERS, n_head=HF_HEADS, n_embd=HF_EMBD, n_positions=HF_POSITIONS,
                                      vocab_size=50257))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=50257, hidden_size=HF_EMBD, intermediate_size=256,  # 8/3 x 64, rounded up to 128s: modern's width
        num_hidden_layers=HF_LAYERS, num_attention_heads=HF_HEADS, num_key_value_heads=HF_HEADS,
        head_dim=HF_EMBD // HF_HEADS, max_position_embeddings=HF_POSITIONS, tie_word_embeddings=False))
    folders = {}
    for name, model in (("gpt2", gpt2), ("qwen3", qwen3)):
        folders[name] = tmp_path_factory.mktemp(f"hf_{name}")
        perturb(model).save_pretrained(folders[name])
    return folders


def prepare(root, tokenizer: str, n_docs: int = 600):
    """English the kit has never trained on (HellaSwag's contexts and right endings), tokenized by `tokenizer`."""
    with gzip.open(shared_data("hellaswag_val.jsonl.gz"), "rt", encoding="utf-8") as f:
        examples = [json.loads(line) for _, line in zip(range(n_docs), f)]
    texts = [ex["ctx"] + " " + ex["endings"][int(ex["label"])] for ex in examples]
    corpus = write_jsonl(root / "text.jsonl", texts, text=True)
    prepare_data.main(["--input", corpus, "--tokenizer", tokenizer, "--out", str(root / "data"),
                       "--val-tokens", "2000", "--workers", "1"])
    return root / "data"


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, gpt2_tiktoken):
    return prepare(tmp_path_factory.mktemp("english_gpt2"), str(gpt2_tiktoken))


def val_batches(data_dir):
    """The val windows train.py evaluates on, read here from the shard: EVAL_STEPS batches of B windows of T + 1
    tokens from the start of the val split."""
    tokens = torch.from_numpy(read_shard(shard_paths(data_dir, "val")[0]).astype(np.int64))
    windows = [tokens[i * T:i * T + T + 1] for i in range(EVAL_STEPS * B)]
    return [torch.stack(windows[b * B:(b + 1) * B]) for b in range(EVAL_STEPS)]


def reference_val_loss(logits_of, data_dir) -> float:
    """Mean over the batches of each batch's mean cross-entropy, with logits_of(x) from the reference model."""
    with torch.no_grad():
        losses = [F.cross_entropy(logits_of(w[:, :-1]).flatten(0, 1).float(), w[:, 1:].flatten())
                  for w in val_batches(data_dir)]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("layout", ["gpt2", "qwen3"])
def test_step_0_val_loss_is_the_transformers_models(tmp_path, hf_dirs, gpt2_data, layout):
    """A fine-tune evaluates the source before its first step: on the same windows, its loss is transformers'
    (GPT-2's positions cropped to 32, or Qwen3's rotary ones), and the architecture is the source's."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_train(*FLAGS, "--init-from", hf_dirs[layout], "--data-dir", gpt2_data, "--out-dir", out, "--max-steps", 2)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dirs[layout]).eval()
    expected = reference_val_loss(lambda x: theirs(x).logits, gpt2_data)
    assert read_log(out, "val_loss")[0] == pytest.approx(expected, abs=1e-5)
    saved = checkpoint.read_checkpoint_meta(str(out / "ckpt_0000002"))["model"]
    assert (saved.arch, saved.n_layer, saved.block_size) == ({"gpt2": "gpt2", "qwen3": "modern"}[layout], 2, T)
    assert not saved.tie_embeddings if layout == "qwen3" else saved.bias


def test_crop_keeps_the_first_positions(tmp_path, hf_dirs, gpt2_data):
    """--block-size 32 of 64 positions keeps GPT-2's first 32 rows of wpe (the learning rate is 0: weights as
    loaded)."""
    from transformers import GPT2LMHeadModel

    out = tmp_path / "out"
    run_train(*FLAGS, "--init-from", hf_dirs["gpt2"], "--data-dir", gpt2_data, "--out-dir", out, "--max-steps", 1,
              "--learning-rate", 0, "--min-lr", 0)
    ours, _ = checkpoint.load_model(str(out))
    wpe = GPT2LMHeadModel.from_pretrained(hf_dirs["gpt2"]).transformer.wpe.weight
    assert ours.transformer.wpe.weight.shape == (T, HF_EMBD)
    torch.testing.assert_close(ours.transformer.wpe.weight, wpe[:T], rtol=0, atol=0)


def test_fine_tune_resumes_exactly_after_kill_9(tmp_path, hf_dirs, gpt2_data):
    """kill -9 in a fine-tune of a transformers folder, then the same command with --resume (the checkpoint
    wins over --init-from): the loss curve equals a run never stopped, and the step-0 evaluation stays."""
    common = [*FLAGS, "--init-from", hf_dirs["gpt2"], "--data-dir", gpt2_data, "--max-steps", 16,
              "--checkpoint-interval", 4, "--dropout", 0.1]
    run_train(*common, "--out-dir", tmp_path / "full")
    out = tmp_path / "killed"
    result = kill_and_resume(out, 8, *common)
    assert "the checkpoint wins" in result.stdout
    assert read_log(out, "loss") == read_log(tmp_path / "full", "loss")
    assert read_log(out, "val_loss") == read_log(tmp_path / "full", "val_loss")
    # Plain --resume, without the source: the architecture is the checkpoint's, init_from stays in the recipe.
    run_train(*[f for f in common if f not in ("--init-from", hf_dirs["gpt2"])], "--out-dir", out, "--resume",
              "--max-steps", 16)
    state = checkpoint.load_train_state(str(out / "ckpt_0000016"))
    assert state["train_config"]["init_from"] == str(hf_dirs["gpt2"])


def test_continued_pretraining_from_a_run_on_other_data(tmp_path, markov_dir):
    """A run of ours on one Markov chain, continued on another: architecture and tokenizer from the run (no
    shape flags given, so the defaults would be GPT-2 124M), its step-0 val loss is its model's on the new data,
    and it learns the new chain from there."""
    other = tmp_path / "other"
    markov.write_data(other, n_train=30_000, n_val=5_000, seed=7)
    run_train(*FLAGS, "--data-dir", markov_dir, "--out-dir", tmp_path / "first", "--max-steps", 30)
    flags = ["--device", "cpu", "--dtype", "float32", "--batch-size", B, "--total-batch-size", B * T,
             "--eval-steps", EVAL_STEPS, "--eval-interval", 10, "--hellaswag-interval", 0, "--sample-interval", 0,
             "--log-interval", 1, "--learning-rate", 3e-3, "--warmup-steps", 2, "--peak-flops", 1e12]
    out = tmp_path / "continued"
    run_train(*flags, "--init-from", tmp_path / "first", "--data-dir", other, "--out-dir", out, "--max-steps", 30)
    source, _ = checkpoint.load_model(str(tmp_path / "first"))
    assert read_log(out, "val_loss")[0] == pytest.approx(reference_val_loss(lambda x: source(x)[0], other), abs=1e-5)
    assert checkpoint.read_checkpoint_meta(str(out / "ckpt_0000030"))["model"] == source.config
    losses = read_log(out, "val_loss")
    assert losses[30] < losses[0] - 0.05, losses


def test_a_transformers_folder_of_another_vocabulary_takes_the_datas_tokenizer(tmp_path, markov_dir):
    """No tokenizer file and not GPT-2's 50,257 tokens: the data's tokenizer is assumed, with a note, and the
    vocabulary sizes must agree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    theirs = perturb(GPT2LMHeadModel(GPT2Config(n_layer=HF_LAYERS, n_head=HF_HEADS, n_embd=HF_EMBD, n_positions=T,
                                                vocab_size=8)))
    theirs.save_pretrained(tmp_path / "hf")
    data = tmp_path / "data"
    markov.write_data(data, n_train=5_000, n_val=2_000, tokenizer="my-bpe")
    result = run_train(*FLAGS, "--init-from", tmp_path / "hf", "--data-dir", data, "--out-dir", tmp_path / "out",
                       "--max-steps", 1)
    assert "assuming it was trained with the data's tokenizer, my-bpe" in result.stdout
    expected = reference_val_loss(lambda x: theirs(x).logits, data)
    assert read_log(tmp_path / "out", "val_loss")[0] == pytest.approx(expected, abs=1e-5)


def test_data_of_another_tokenizer_is_refused(tmp_path, monkeypatch, capsys, hf_dirs, gpt2_tiktoken):
    """GPT-2's rank file with two ranks swapped: the same name and size, another tokenizer."""
    lines = gpt2_tiktoken.read_bytes().splitlines(keepends=True)
    lines[300], lines[301] = lines[301].split()[0] + b" 300\n", lines[300].split()[0] + b" 301\n"
    (tmp_path / "gpt2.tiktoken").write_bytes(b"".join(lines))
    data = prepare(tmp_path, str(tmp_path / "gpt2.tiktoken"), n_docs=100)
    out = tmp_path / "out"
    result = in_process(monkeypatch, capsys, train, *FLAGS, "--init-from", hf_dirs["gpt2"], "--data-dir", data,
                        "--out-dir", out)
    assert_one_line_error(result, "tokenizer gpt2 (50257 tokens)", "tokenizer.tiktoken (50257 tokens)", data)
    assert not out.exists()


@pytest.mark.parametrize("source, flags, needles", [
    ("gpt3", [], ["'gpt3' is neither a folder nor one of gpt2, gpt2-medium"]),
    ("empty", [], ["is neither a Hugging Face model folder", "nor a checkpoint or run folder", "no checkpoint in"]),
    ("gpt2", ["--n-layer", 3], ["--n-layer 3 conflicts with --init-from", "whose n_layer is 2"]),
    ("gpt2", ["--arch", "modern"], ["--arch modern conflicts", "whose arch is gpt2"]),
    ("gpt2", ["--block-size", 128], ["--block-size 128 is longer than the 64 positions", "use at most 64"]),
])
def test_bad_sources_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, hf_dirs, gpt2_data, source,
                                                     flags, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a model")
    name = {"gpt2": hf_dirs["gpt2"], "empty": tmp_path / "empty"}.get(source, source)
    out = tmp_path / "out"
    result = in_process(monkeypatch, capsys, train, *FLAGS, *flags, "--init-from", name, "--data-dir", gpt2_data,
                        "--out-dir", out)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_init_from_with_resume_of_another_run_is_refused(tmp_path, monkeypatch, capsys, hf_dirs, gpt2_data):
    """A folder holding a run from random weights: --resume with --init-from names the conflict and keeps it."""
    out = tmp_path / "out"
    run_train(*FLAGS, "--data-dir", gpt2_data, "--out-dir", out, "--max-steps", 1)
    before = (out / "log.jsonl").read_text(), checkpoint.list_checkpoints(str(out))
    result = in_process(monkeypatch, capsys, train, *FLAGS, "--init-from", hf_dirs["gpt2"], "--data-dir", gpt2_data,
                        "--out-dir", out, "--resume", "--max-steps", 2)
    assert_one_line_error(result, "with --resume", "began from random weights", "drop --init-from")
    assert ((out / "log.jsonl").read_text(), checkpoint.list_checkpoints(str(out))) == before
