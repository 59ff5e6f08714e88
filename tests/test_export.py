"""export_hf.py: an exported checkpoint opens in transformers and computes our logits."""
import dataclasses
import json
import os

import pytest
import torch

import checkpoint
import export_hf
import generate
from config import TrainConfig
from errors import UserError, run_main
from helpers import hf_gpt2
from model import build_model
from tokenizer import load_tokenizer, train_tokenizer


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
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["n_ctx"] == config["n_positions"] == 64
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs = hf_gpt2(out)
    assert (theirs(idx).logits - model(idx)[0]).abs().max().item() < 1e-4
    again = checkpoint.load_gpt2(str(out)).eval()
    assert (again(idx)[0] - model(idx)[0]).abs().max().item() < 1e-5
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no leftovers beside out_dir


# ASCII, accents, emoji, code, whitespace runs and the end-of-text token: where byte-level BPEs differ.
SAMPLE = ("Hello, world! It's 2024; don't stop.  Café naïve façade Ünïcödé — 日本語 🤖🎉👍🏽\n"
          "def f(x):\n\treturn x ** 2   # squared\n\n\n    indented\t\ttabs   \r\n"
          "<|endoftext|>Next story 1234567 +-*/ {\"k\": [1, 2]} end   ")


def test_gpt2_ranks_export_a_tokenizer_equal_to_the_kits(random_gpt, tmp_path, gpt2_tiktoken):
    from transformers import AutoTokenizer

    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(vocab_size=50257), str(gpt2_tiktoken))
    assert checkpoint.SIDECAR not in os.listdir(ckpt) and "tokenizer.json" not in os.listdir(ckpt)
    out = tmp_path / "hf"
    export_hf.export(ckpt, str(out))
    assert (out / checkpoint.RANKS).read_bytes() == gpt2_tiktoken.read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    theirs = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(str(gpt2_tiktoken))
    ids = ours.encode(SAMPLE, allowed_special="all")
    assert theirs(SAMPLE)["input_ids"] == ids and ids.count(50256) == 1
    assert theirs.decode(ids) == SAMPLE and theirs.eos_token_id == 50256
    _, tokenizer = checkpoint.load_model(str(out))  # --init-from an export reads it with its own tokenizer
    assert tokenizer == str(out / checkpoint.RANKS)


def test_custom_bpe_export_a_tokenizer_equal_to_the_kits(random_gpt, tmp_path):
    from transformers import AutoTokenizer

    ranks = str(tmp_path / "tiny.tiktoken")
    train_tokenizer(["Once upon a time a café had 3 cats 🐈.\n\n  It's fine; def f(): pass\n"] * 50, 300, ranks)
    ours = load_tokenizer(ranks)
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(vocab_size=ours.n_vocab), ranks)
    out = tmp_path / "hf"
    export_hf.main([ckpt, str(out)])
    theirs = AutoTokenizer.from_pretrained(str(out))
    ids = ours.encode(SAMPLE, allowed_special="all")
    assert theirs(SAMPLE)["input_ids"] == ids and ids.count(ours.eot_token) == 1
    assert theirs.decode(ids) == SAMPLE
    _, tokenizer = checkpoint.load_model(str(out))
    assert load_tokenizer(tokenizer).encode(SAMPLE, allowed_special="all") == ids


def test_existing_out_dir_needs_overwrite(run, tmp_path):
    folder, _ = run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        export_hf.export(str(folder), str(out))
    export_hf.export(str(folder), str(out), overwrite=True)
    assert "old.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_model_without_biases_cannot_be_gpt2(random_gpt, tmp_path, capsys):
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(bias=False), "gpt2")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export_hf.main([ckpt, str(tmp_path / "hf")]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bias=False" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def bpe_export(random_gpt, tmp_path):
    """A run folder as train.py leaves it (a trained BPE, state.pt, log.jsonl), exported: (folder, ranks)."""
    ranks = str(tmp_path / "tiny.tiktoken")
    train_tokenizer(["Once upon a time a cat sat. The dog ran home, and the sun was warm.\n"] * 50, 300, ranks)
    n_vocab = load_tokenizer(ranks).n_vocab
    state = {"train_config": {**dataclasses.asdict(TrainConfig()), "total_batch_size": 4096, "data_dir": "data/tt"}}
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 30, random_gpt(vocab_size=n_vocab), ranks, state)
    log = [{"step": 10, "val_loss": 5.5}, {"step": 20, "val_loss": 4.25, "x": 1},
           {"step": 20, "hellaswag_acc_norm": 0.3125}, {"step": 40, "val_loss": 1.0}]  # step 40: a later save
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    export_hf.main([ckpt, str(tmp_path / "hf")])
    return tmp_path / "hf", ranks


def test_model_card_names_the_runs_numbers(bpe_export):
    out, _ = bpe_export
    card = (out / "README.md").read_text()
    params = sum(p.numel() for p in hf_gpt2(out).parameters())
    for fact in ("2 layers, 4 heads, width 64, context 64", f"| parameters | {params:,} |", "| steps | 30 |",
                 "| tokens seen | 122,880 |", "| data | data/tt |", "4.2500 (step 20)", "0.3125 (step 20)",
                 "--total-batch-size 4096", "lm_eval --model hf"):
        assert fact in card, fact
    assert f"lm_eval --model hf --model_args pretrained={out} --tasks hellaswag" in card


@pytest.fixture
def gpt2_export(random_gpt, tmp_path, gpt2_tiktoken):
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(vocab_size=50257), str(gpt2_tiktoken))
    export_hf.export(ckpt, str(tmp_path / "hf"))
    return tmp_path / "hf", str(gpt2_tiktoken)


@pytest.mark.parametrize("exported", ["bpe_export", "gpt2_export"])
def test_pipeline_greedy_equals_generate_greedy(exported, request, capsys):
    from transformers import pipeline

    out, _ = request.getfixturevalue(exported)
    capsys.readouterr()
    prompt = "Once upon a time"
    generate.main(["--init-from", str(out), "--greedy", "--prompt", prompt, "--max-new-tokens", "12"])
    ours = capsys.readouterr().out
    pipe = pipeline("text-generation", model=str(out), device="cpu")
    theirs = pipe(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert ours == theirs + "\n" and len(ours) > len(prompt) + 1


def damaged_weights(run):
    ckpt = checkpoint.find_checkpoint(str(run[0]))
    weights = os.path.join(ckpt, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    return ckpt


@pytest.mark.parametrize("case", ["exists", "under a file", "damaged weights"])
def test_bad_export_is_one_line_and_leaves_nothing(case, run, tmp_path, capsys):
    source, out = str(run[0]), tmp_path / "hf"
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "under a file":  # unwritable even as root
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "hf"
    else:
        source = damaged_weights(run)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export_hf.main([source, str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before  # no new or half-written folder
    assert case != "exists" or os.listdir(out) == ["mine.txt"]


TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_an_export_on_a_local_task(bpe_export, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the task's data and the model are both local
        monkeypatch.setenv(var, "1")
    out, _ = bpe_export
    rows = [{"query": f"The cat sat {i}.", "choices": [" home", " away", " down"], "gold": i % 3} for i in range(4)]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out}", tasks=["tiny_choice"],
                                      task_manager=TaskManager(include_path=str(tasks)), device="cpu",
                                      batch_size=4)
    acc = results["results"]["tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["tiny_choice"]["effective"] == 4


def test_push_to_hub_uploads_the_exported_folder(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:  # the hub itself is never reached from tests
        def create_repo(self, repo, exist_ok):
            calls.append(("create", repo, exist_ok))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "hf"
    export_hf.main([str(run[0]), str(out), "--push-to-hub", "me/tiny"])
    assert calls == [("create", "me/tiny", True), ("upload", sorted(os.listdir(out)), "me/tiny")]
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out


def test_push_to_hub_offline_is_one_line_and_keeps_the_export(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export_hf.main([str(run[0]), str(tmp_path / "hf"), "--push-to-hub", "me/tiny"]))
    err = capsys.readouterr().err
    lines = err.splitlines()  # a warning may come first: this gpt2 model's tokenizer is not cached offline
    assert e.value.code == 2 and lines[-1].startswith("error: cannot push") and err.count("error") == 1, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_old_checkpoint_tokenizer_names_still_load(random_gpt, tmp_path):
    ranks = str(tmp_path / "tiny.tiktoken")
    enc = train_tokenizer(["a cat sat on a mat\n"] * 20, 280, ranks)
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(vocab_size=enc.n_vocab), ranks)
    for new, old in ((checkpoint.RANKS, "tokenizer.tiktoken"), (checkpoint.SIDECAR, "tokenizer.json")):
        os.rename(os.path.join(ckpt, new), os.path.join(ckpt, old))  # as checkpoints were written before
    meta = json.loads(open(os.path.join(ckpt, "config.json")).read())
    meta["tokenizer"] = "tokenizer.tiktoken"
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(meta, f)
    _, tokenizer = checkpoint.load_model(ckpt)
    assert load_tokenizer(tokenizer).encode("a cat sat") == enc.encode("a cat sat")


@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_modern_exports_as_qwen3_with_equal_logits_and_greedy_tokens(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config import GPTConfig

    ranks = str(tmp_path / "tiny.tiktoken")
    enc = train_tokenizer(["Once upon a time a cat sat. The dog ran home, and the sun was warm.\n"] * 50, 300, ranks)
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="modern", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=enc.n_vocab,
                          tie_embeddings=tied, rope_theta=5000.0)).eval()
    for p in model.parameters():  # zero-initialised projections would hide mistakes
        p.normal_(0, 0.1)
    out = tmp_path / "hf"
    export_hf.export(checkpoint.save_checkpoint(str(tmp_path / "run"), 5, model, ranks), str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["vocab_size"] == enc.n_vocab < 320
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4 and config["head_dim"] == 16
    assert config["tie_word_embeddings"] is tied
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM" and theirs.config.rope_parameters["rope_theta"] == 5000.0
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) is tied
    idx = torch.tensor([AutoTokenizer.from_pretrained(str(out))("The dog ran home")["input_ids"]])
    assert idx.tolist()[0] == enc.encode("The dog ran home")
    assert (theirs(idx).logits - model(idx)[0]).abs().max().item() < 1e-4
    theirs.generation_config.eos_token_id = None  # random weights may well pick <|endoftext|>: keep going
    hf_tokens = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                                pad_token_id=enc.eot_token)[0, idx.shape[1]:]
    ours = torch.stack(list(model.generate(idx, 20, temperature=0)), 1)[0]
    assert hf_tokens.tolist() == ours.tolist()
    params = sum(p.numel() for p in theirs.parameters())
    assert f"| parameters | {params:,} |" in (out / "README.md").read_text()
    back, tokenizer = checkpoint.load_model(str(out))  # --init-from the export: the Qwen3 loader reads it back
    assert back.config == model.config and tokenizer == str(out / checkpoint.RANKS)
    assert torch.equal(back(idx)[0], model(idx)[0])
