"""A random first-order Markov chain with a known entropy rate: the learnable data of the tests and benchmarks.

Each token depends only on the one before it, through a transition matrix P drawn at random, so the best
possible next-token loss is known exactly: the chain's entropy rate H = -sum_i pi_i sum_j P_ij log P_ij nats,
pi its stationary distribution. A model's validation loss against H says how well it trained, whatever the data.

    chain = write_data("data/markov", vocab=8)   # train/val shards and meta.json, as prepare_data.py writes them
    chain.entropy_rate
"""
import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import write_shard


@dataclass(frozen=True)
class MarkovChain:
    P: np.ndarray  # (vocab, vocab): P[i, j] is the probability that token j follows token i
    pi: np.ndarray  # (vocab,) the stationary distribution: pi @ P == pi

    @classmethod
    def random(cls, vocab: int, seed: int = 0, concentration: float = 0.3) -> "MarkovChain":
        """Rows drawn from a Dirichlet: a smaller concentration gives peakier rows, a lower entropy rate."""
        P = np.random.default_rng(seed).dirichlet(np.full(vocab, concentration), size=vocab)
        evals, evecs = np.linalg.eig(P.T)
        pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
        return cls(P, pi / pi.sum())

    @property
    def entropy_rate(self) -> float:
        """Nats per token: the least mean loss of any predictor that has seen the previous token."""
        return float(-(self.pi[:, None] * self.P * np.log(self.P)).sum())

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n tokens (uint16) of one run of the chain, started from pi, so every stretch of it is stationary."""
        rng = np.random.default_rng(seed)
        state = int(rng.choice(len(self.pi), p=self.pi))
        cum = self.P.cumsum(axis=1).tolist()  # Python lists: a bisect per token is several times numpy's speed
        last = len(self.pi) - 1  # a rounding error can leave a row's total just under 1
        out = []
        for u in rng.random(n).tolist():
            out.append(state)
            state = min(bisect.bisect_left(cum[state], u), last)
        return np.array(out, dtype=np.uint16)


def write_data(folder, vocab: int = 8, n_train: int = 200_000, n_val: int = 20_000, seed: int = 0,
               concentration: float = 0.3, tokenizer: str = "gpt2") -> MarkovChain:
    """A data folder train.py reads (train_000000.bin, val_000000.bin, meta.json) of a random chain, returned."""
    chain = MarkovChain.random(vocab, seed, concentration)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(str(folder / "train_000000.bin"), chain.sample(n_train, seed + 1))
    write_shard(str(folder / "val_000000.bin"), chain.sample(n_val, seed + 2))
    meta = {"tokenizer": tokenizer, "vocab_size": vocab, "eot": vocab - 1, "source": "markov"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return chain
