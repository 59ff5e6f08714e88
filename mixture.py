"""Training on several data folders at once, mixed by weight: --data-dir A,B --data-weights 3,1.

Which folder each window of the global sequence comes from is fixed by the weights alone, not drawn at random: a
cycle of C windows in which folder s has c_s, the weights as the smallest integers in the same ratio (3,1 and
0.75,0.25 both give c = 3, 1 and C = 4), repeated forever. Within the cycle the folders take turns smoothly (the
smooth weighted round-robin nginx balances servers with: 3,1 gives A A B A), so any stretch of windows is within
one window per folder of its share, and every C consecutive windows are exactly in proportion: 3:1 is 3:1 in each
step, at any batch size and on any number of processes.

Each folder reads its own windows in its own order (shuffled per epoch as a lone folder would be) and runs through
its epochs at its own pace: a small folder starts its second epoch while a large one is still in its first. Where
each folder stands is a function of the global position G = q*C + r alone: folder s has read q*c_s windows plus
its windows among the first r of the cycle. So G in tokens resumes every folder exactly, with another batch size
or number of processes as well, just as for one folder.
"""
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

import dataloader
from dataloader import DataLoader, WindowSequence
from errors import UserError
from tokenizer import same_tokenizer

MAX_CYCLE = 100_000  # windows; a few bytes each, built once at start-up


@dataclass(frozen=True)
class Source:
    folder: str
    share: int  # its windows in each cycle: its weight in the smallest integer ratio with the others

    @property
    def name(self) -> str:
        """What log records and val losses call it: the folder's own name."""
        return os.path.basename(os.path.normpath(self.folder))


def parse_sources(data_dir: str, data_weights: Optional[str]) -> list[Source]:
    """--data-dir's comma-separated folders with --data-weights' weights (equal when not given)."""
    folders = data_dir.split(",")
    if not all(f.strip() for f in folders):
        raise UserError(f"--data-dir {data_dir!r} has an empty entry; give one folder or several separated by "
                        f"commas, e.g. --data-dir data/fineweb-edu,data/bookcorpus")
    texts = data_weights.split(",") if data_weights is not None else ["1"] * len(folders)
    if len(texts) != len(folders):
        raise UserError(f"--data-weights {data_weights} gives {len(texts)} weight(s) for {len(folders)} --data-dir "
                        f"folder(s); give one weight per folder, in the same order")
    weights = [_positive(text) for text in texts]
    scale = math.lcm(*(w.denominator for w in weights))
    counts = [int(w * scale) for w in weights]
    shares = [c // math.gcd(*counts) for c in counts]
    if sum(shares) > MAX_CYCLE:
        raise UserError(f"--data-weights {data_weights}: those exact proportions repeat only every {sum(shares):,} "
                        f"windows (at most {MAX_CYCLE:,}); give a simpler ratio, e.g. 3,1 or 0.7,0.3")
    sources = [Source(f.strip(), share) for f, share in zip(folders, shares)]
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"--data-dir names two folders called {name}; logs and val losses tell sources apart by "
                            f"folder name: rename or link one")
    return sources


def _positive(text: str) -> Fraction:
    try:
        weight = Fraction(text.strip())  # exact: 0.1 is 1/10, not the float nearest it
    except (ValueError, ZeroDivisionError):
        weight = None
    if weight is None or weight <= 0:
        raise UserError(f"--data-weights: {text!r} is not a positive number; give one per folder, e.g. 3,1")
    return weight


def common_meta(sources: list[Source]) -> dict:
    """The folders' meta.json (dataloader.read_data_meta), which must name one tokenizer: the first's, with shuffle on
    if any folder asks for it (windows of an already shuffled corpus lose nothing by being shuffled again)."""
    metas = [dataloader.read_data_meta(s.folder) for s in sources]
    first = metas[0]
    for source, meta in zip(sources[1:], metas[1:]):
        if meta["vocab_size"] != first["vocab_size"]:
            differ = f"a vocabulary of {meta['vocab_size']} tokens, not {first['vocab_size']}"
        elif not same_tokenizer(meta["tokenizer"], first["tokenizer"]):
            its, theirs = os.path.basename(meta["tokenizer"]), os.path.basename(first["tokenizer"])
            differ = f"tokenizer {its}, not {theirs}" if its != theirs else f"its {its} has other contents"
        else:
            continue
        raise UserError(f"{source.folder} was prepared with another tokenizer than {sources[0].folder} ({differ}); "
                        f"all --data-dir folders must share one: prepare them with the same --tokenizer")
    return {**first, "shuffle": any(m.get("shuffle", False) for m in metas)}


def smooth_round_robin(shares: list[int]) -> np.ndarray:
    """The source of each window of one cycle: each turn every source gains its share of credit, and the one with
    the most (the first on a tie) takes the window and pays the cycle's length."""
    credit, cycle = [0] * len(shares), []
    for _ in range(sum(shares)):
        credit = [c + s for c, s in zip(credit, shares)]
        best = credit.index(max(credit))
        credit[best] -= sum(shares)
        cycle.append(best)
    return np.array(cycle)


class Mixture(WindowSequence):
    """The global sequence of windows drawn from several folders by their shares (see the module docstring); one
    folder of share 1 is exactly its DataLoader's sequence. announce: print a line when a folder starts an epoch."""

    def __init__(self, sources: list[Source], split, batch_size, block_size, rank=0, world_size=1,
                 shuffle_seed=None, vocab_size=None, announce=False):
        super().__init__(batch_size, block_size, rank, world_size)
        self.sources, self.announce = sources, announce
        # Each folder's own windows, read one at a time (window()); their batching is this sequence's.
        self.folders = [DataLoader(s.folder, split, batch_size, block_size, shuffle_seed=shuffle_seed,
                                   vocab_size=vocab_size) for s in sources]
        self.shares = np.array([s.share for s in sources])
        self.cycle = smooth_round_robin([s.share for s in sources])
        # before_in_cycle[i, s]: folder s's windows among the cycle's first i
        one_hot = np.eye(len(sources), dtype=np.int64)[self.cycle]
        self.before_in_cycle = np.concatenate([np.zeros((1, len(sources)), np.int64), one_hot.cumsum(axis=0)])

    def windows_read(self, window: int) -> np.ndarray:
        """How many of each folder's windows the global sequence holds before global window `window`."""
        cycles, rest = divmod(window, len(self.cycle))
        return cycles * self.shares + self.before_in_cycle[rest]

    def window(self, index: int) -> np.ndarray:
        s = int(self.cycle[index % len(self.cycle)])
        return self.folders[s].window(int(self.windows_read(index)[s]))

    def positions(self) -> dict:
        """Each folder's own position: the tokens read from it so far, and the epoch its next window is in."""
        return {source.name: {"tokens": int(n) * self.T, "epoch": int(n) // folder.windows_per_epoch}
                for source, folder, n in zip(self.sources, self.folders, self.windows_read(self.next_window))}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sources": self.positions()}

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        saved = state.get("sources")  # absent in a one-folder checkpoint of an earlier version
        if saved is not None and list(saved.values()) != list(self.positions().values()):
            raise UserError(f"the checkpoint puts its data folders at {saved}, but this version's mixture schedule "
                            f"at {self.positions()}: resume with the kit version that wrote it, or start afresh")

    def next_batch(self):
        epochs = [p["epoch"] for p in self.positions().values()]
        batch = super().next_batch()
        for (name, now), before, folder in zip(self.positions().items(), epochs, self.folders):
            if self.announce and now["epoch"] > before:
                print(f"data: {name} finished epoch {now['epoch']} ({folder.windows_per_epoch * self.T:,} tokens "
                      f"each), starting epoch {now['epoch'] + 1}", flush=True)
        return batch

    def identity(self):
        """What the data is, whatever folders it sits in. One folder: its shards (DataLoader.identity), as before
        mixtures, so its older checkpoints still resume; several: each folder's name, share and shards."""
        if len(self.sources) == 1:
            return self.folders[0].identity()
        return [{"folder": source.name, "share": source.share, "shards": folder.identity()}
                for source, folder in zip(self.sources, self.folders)]
