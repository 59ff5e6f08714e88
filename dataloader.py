"""The loader that streams (x, y) batches from a data folder's token shards (shards.py), split across ranks, and
the folder's meta.json (what prepare_data.py wrote: tokenizer, vocabulary, shuffle).
"""
import json
import os

import numpy as np

from errors import UserError
from shards import read_shard, shard_paths

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
