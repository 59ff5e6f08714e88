"""Fixtures shared by every test file: small random GPT-2s (ours, and in Hugging Face's format), GPT-2's rank
file, and a small Markov data folder. Tests are offline: models come from random weights, the tokenizer from
../shared/data. The plain functions the tests share are in helpers.py.
"""
import os
from pathlib import Path

import pytest
import torch

import markov
from helpers import perturb, shared_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of waiting on the network
# The test models are tiny: one thread loses nothing, while OpenMP threads that spin-wait for each other stall
# badly (10x and more) when the cores are shared with other jobs. The variable reaches the CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough to run in milliseconds, with GPT-2's vocabulary so the real tokenizer fits.
HF_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
# Ours, where no tokenizer is needed: a small vocabulary keeps the head cheap.
GPT_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """A folder written by transformers' save_pretrained: config.json and model.safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    perturb(GPT2LMHeadModel(GPT2Config(**HF_SHAPE))).save_pretrained(folder)
    return folder


@pytest.fixture
def random_gpt():
    """A factory of small random GPTs in eval mode: random_gpt(), random_gpt(seed=1, bias=False, ...)."""
    from config import GPTConfig
    from model import build_model

    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return perturb(build_model(GPTConfig(**{**GPT_SHAPE, **overrides})))

    return build


@pytest.fixture(scope="session")
def gpt2_tiktoken() -> Path:
    """OpenAI's GPT-2 ranks as a tiktoken file; with GPT-2's pattern and <|endoftext|> it is exactly gpt2."""
    return shared_data("gpt2.tiktoken")


@pytest.fixture(scope="session")
def enc(gpt2_tiktoken):
    """GPT-2's tokenizer as the kit loads it from the rank file."""
    from tokenizer import load_tokenizer

    return load_tokenizer(str(gpt2_tiktoken))


@pytest.fixture(scope="session")
def markov_dir(tmp_path_factory) -> Path:
    """A Markov data folder of 30,000 training tokens (vocabulary 8), for the runs that only read their data."""
    folder = tmp_path_factory.mktemp("markov")
    markov.write_data(folder, n_train=30_000, n_val=5_000)
    return folder


@pytest.fixture(scope="session")
def english_dir(tmp_path_factory) -> Path:
    """Real English: HellaSwag's contexts with their right endings, about 400,000 tokens of a 2,048-token BPE
    trained on them (a small head keeps runs fast). Its frequent tokens ("the", ",", ".") repeat in every batch,
    as in any real corpus."""
    import gzip
    import json

    import prepare_data
    from helpers import write_jsonl

    root = tmp_path_factory.mktemp("english")
    with gzip.open(shared_data("hellaswag_val.jsonl.gz"), "rt", encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    texts = [ex["ctx"] + " " + ex["endings"][int(ex["label"])] for ex in examples]
    corpus = write_jsonl(root / "english.jsonl", texts, text=True)
    prepare_data.main(["--input", corpus, "--train-tokenizer", "--vocab-size", "2048", "--out", str(root / "data"),
                       "--val-tokens", "20000", "--workers", "2"])
    return root / "data"
