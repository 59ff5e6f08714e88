"""Fixtures shared by every test file: small random GPT-2s (ours, and in Hugging Face's format), and GPT-2's
rank file. Tests are offline: models come from random weights, the tokenizer from ../shared/data.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the kit is flat scripts at the repo root
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of waiting on the network
# The test models are tiny: one thread loses nothing, while OpenMP threads that spin-wait for each other stall
# badly (10x and more) when the cores are shared with other jobs. The variable reaches the CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough to run in milliseconds, with GPT-2's vocabulary so the real tokenizer fits.
HF_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
# Ours, where no tokenizer is needed: a small vocabulary keeps the head cheap.
GPT_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh LayerNorms are 1 and 0 and fresh biases 0: nudge every tensor so a mix-up of any of them shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


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
    from model import GPT

    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return perturb(GPT(GPTConfig(**{**GPT_SHAPE, **overrides})))

    return build


@pytest.fixture(scope="session")
def gpt2_tiktoken() -> Path:
    """OpenAI's GPT-2 ranks as a tiktoken file; with GPT-2's pattern and <|endoftext|> it is exactly gpt2."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
    if not path.is_file():
        pytest.skip(f"{path} is absent (it lives next to the repo, not in a fresh clone)")
    return path
