"""The loader that streams (x, y) batches from data folders' token shards (shards.py), split across ranks: one
folder (DataLoader), or several mixed by weight (Mixture: --data-dir A,B --data-weights 3,1); and a folder's
meta.json (what prepare_data.py wrote: tokenizer, vocabulary, shuffle).

Mixing. Which folder each window of the global sequence comes from is fixed by the weights alone, not drawn at
random: a cycle of C windows in which folder s has c_s, the weights as the smallest integers in the same ratio (3,1 and
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
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

from errors import UserError
from shards import read_shard, shard_paths
from tokenizer import same_tokenizer

def read_data_meta(data_dir: str) -> dict:
    """meta.json of prepare_data.py, with the tokenizer as a usable spec (a name or an absolute path)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir} (no meta.json): run prepare_data.py first, "
                        f"e.g. python prepare_data.py --dataset tinytales, or point --data-dir at its output")
    try:
        with open(path) as f:
            meta = json.load(f)
        tokenizer = meta["tokenizer"]
        meta["vocab_size"] = int(meta["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e!r}; rerun prepare_data.py")
    if os.path.exists(os.path.join(data_dir, tokenizer)):
        meta["tokenizer"] = os.path.abspath(os.path.join(data_dir, tokenizer))
    return meta


class WindowSequence:
    """Streams (x, y) batches of B windows of T tokens (+1 for the targets) from one global sequence of windows,
    forever; a subclass says what window g is (window()).

    Rank r of w takes windows G + r*B ... G + r*B + B-1 and G advances by w*B, so the ranks of one step together
    read what a single process reads in w calls. The position G counts windows, not batches: a resumed run with
    another batch size or another number of processes continues at the same token.
    """

    def __init__(self, batch_size, block_size, rank=0, world_size=1):
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.next_window = 0

    def window(self, index: int) -> np.ndarray:
        """The T + 1 tokens of window `index` of the global sequence."""
        raise NotImplementedError

    def reset(self):
        self.next_window = 0

    def state_dict(self) -> dict:
        """The position in tokens of the global sequence: independent of batch size and world size."""
        return {"tokens": self.next_window * self.T}

    def load_state_dict(self, state: dict):
        if "tokens" not in state:
            raise UserError("the checkpoint's data position is in an older format that cannot be continued exactly; "
                            "start a fresh run (or resume it with the kit version that wrote it)")
        window, rest = divmod(int(state["tokens"]), self.T)
        if rest:
            raise UserError(f"the checkpoint's data position ({state['tokens']} tokens) is not a multiple of "
                            f"block_size {self.T}: it was written with another block size")
        self.next_window = window

    def next_batch(self):
        """(x, y): int64 tensors of shape (B, T), y being x shifted left by one token."""
        import torch  # only here: the loader's numpy side needs no torch (and --help stays fast)

        first = self.next_window + self.rank * self.B
        self.next_window += self.world_size * self.B
        rows = torch.from_numpy(np.stack([self.window(first + i) for i in range(self.B)]).astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class DataLoader(WindowSequence):
    """The windows of one data folder's split: an epoch is every shard's windows, in order or (shuffle_seed set) in
    a permutation over all shards seeded by (shuffle_seed, epoch), and epochs repeat."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, shuffle_seed=None,
                 vocab_size=None):
        super().__init__(batch_size, block_size, rank, world_size)
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} does not exist; run prepare_data.py to create it")
        self.paths = shard_paths(data_dir, split)
        if not self.paths:
            raise UserError(f"no {split}_*.bin shards in {data_dir}; run prepare_data.py to create them")
        self.shards = [read_shard(p) for p in self.paths]
        self.shuffle_seed, self.vocab_size = shuffle_seed, vocab_size
        # The +1 is the target of a window's last position; a shard's tokens beyond its last window go unused.
        self.windows_per_shard = np.array([max(0, len(s) - 1) // self.T for s in self.shards])
        self.window_starts = np.concatenate([[0], np.cumsum(self.windows_per_shard)])
        self.windows_per_epoch = int(self.window_starts[-1])
        if self.windows_per_epoch < self.B:
            n_tokens = sum(len(s) for s in self.shards)
            raise UserError(f"the {split} split in {data_dir} has {n_tokens} tokens, fewer than one batch of "
                            f"batch_size windows of block_size+1 = {self.B} x {self.T + 1}; lower --batch-size or "
                            f"--block-size, or prepare more data (--val-tokens for the val split)")
        self._order = (None, None)  # (epoch, permutation) of the last shuffled epoch used

    def identity(self) -> list:
        """What the data is, whatever folder it sits in: each shard's name and token count."""
        return [[os.path.basename(p), len(s)] for p, s in zip(self.paths, self.shards)]

    def window(self, index: int) -> np.ndarray:
        shard, start = self._locate(index)
        row = self.shards[shard][start:start + self.T + 1]
        if self.vocab_size is not None and row.max() >= self.vocab_size:
            raise UserError(f"token id {row.max()} >= vocab size {self.vocab_size} in {self.paths[shard]}: "
                            f"the data was prepared with a different tokenizer")
        return row

    def _locate(self, window: int) -> tuple[int, int]:
        """The shard and the token offset of a global window index."""
        epoch, position = divmod(window, self.windows_per_epoch)
        if self.shuffle_seed is not None:
            position = int(self._permutation(epoch)[position])
        shard = int(np.searchsorted(self.window_starts, position, side="right")) - 1
        return shard, int(position - self.window_starts[shard]) * self.T

    def _permutation(self, epoch: int) -> np.ndarray:
        """This epoch's order of all windows (int32: 40 MB for fineweb-edu 10B's ten million windows)."""
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.shuffle_seed, epoch])
            self._order = (epoch, rng.permutation(self.windows_per_epoch).astype(np.int32))
        return self._order[1]


class DeviceBatches:
    """The loader's batches on the device, one batch ahead: on CUDA the next batch is copied from pinned memory
    while the current step runs. state_dict() is the position after the batches handed out, not the one held."""

    def __init__(self, loader: WindowSequence, device):
        self.loader, self.device = loader, device
        self._state = loader.state_dict()
        self._next = self._load()

    def _load(self):
        x, y = self.loader.next_batch()
        if self.device.type != "cuda":
            return x.to(self.device), y.to(self.device)
        # From pinned memory the copy is asynchronous: it overlaps the step still running on the GPU.
        return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self):
        batch, self._state = self._next, self.loader.state_dict()
        self._next = self._load()
        return batch

    def state_dict(self) -> dict:
        return self._state


# ---- several folders mixed by weight

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
    metas = [read_data_meta(s.folder) for s in sources]
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
