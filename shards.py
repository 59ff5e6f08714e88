"""Token shards: the format on disk (llm.c's), written by prepare_data.py and read by the loader.

    <data>/train_000000.bin, train_000001.bin, ..., val_000000.bin, ...
    a header of 256 little-endian int32 [magic, version, n_tokens, 0, ...], then n_tokens little-endian uint16 ids

A shard is written whole or not at all (atomic.py), so a reader never sees half of one.
"""
import glob
import os
from pathlib import Path

import numpy as np

from atomic import atomic_write
from errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
REDO = "re-run prepare_data.py with --overwrite"


def shard_path(folder, split: str, index: int) -> Path:
    return Path(folder) / f"{split}_{index:06d}.bin"


def shard_paths(folder, split: str) -> list[str]:
    """The shards of one split in folder, in order."""
    return sorted(glob.glob(os.path.join(glob.escape(str(folder)), f"{split}_*.bin")))


def write_shard(path: str, tokens: np.ndarray):
    """Write tokens (uint16) as a shard, atomically: a reader sees the whole shard or none."""
    if tokens.dtype != np.uint16:
        raise TypeError(f"shard tokens must be uint16, got {tokens.dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    try:
        with atomic_write(path, durable=True) as tmp, open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
    except OSError as e:  # a full disk, say: no half shard left behind, and one line that names the file
        raise UserError(f"cannot write shard {path}: {e.strerror or e}; make room and rerun prepare_data.py "
                        f"(it resumes, keeping the shards already written)")


def read_shard(path: str) -> np.ndarray:
    """The shard's tokens as a read-only memory map (uint16), after checking the header against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror}")
    if len(header) < 3 or header[0] != MAGIC:
        raise UserError(f"{path} is not a token shard (wrong magic number); {REDO}")
    if header[1] != VERSION:
        raise UserError(f"{path} has shard version {header[1]}, this code reads version {VERSION}; {REDO}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size < expected:
        raise UserError(f"{path} is truncated: its header says {n_tokens} tokens but it holds "
                        f"{max(0, size - HEADER_BYTES) // 2}; {REDO}")
    if size > expected:
        raise UserError(f"{path} is {size} bytes but its header says {n_tokens} tokens ({expected} bytes); {REDO}")
    if n_tokens == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


class ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_size tokens, the last one shorter."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split = out, split
        self.buffer = np.empty(shard_size, dtype=np.uint16)  # memory is committed only as it fills
        self.fill = 0
        self.documents = self.tokens = self.shards = 0

    def add(self, tokens: np.ndarray, n_documents: int):
        self.documents += n_documents
        self.tokens += len(tokens)
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self._flush()

    def close(self):
        if self.fill:
            self._flush()

    def counts(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def state(self) -> dict:
        return {**self.counts(), "fill": self.fill}

    def holds(self, state: dict) -> bool:
        """Whether every token up to an earlier state is in finished shards."""
        return state["fill"] == 0 or self.shards > state["shards"]

    def resume(self, state: dict) -> bool:
        """Take up from a state the shards on disk hold: the shards before it whole, and the next one beginning
        with the tokens the state had in memory. False, changing nothing, if they do not."""
        size, fill = len(self.buffer), state["fill"]
        written = state["tokens"] - fill
        if not all(self._tokens_on_disk(i) == min(size, written - i * size) for i in range(state["shards"])):
            return False
        if fill:
            tail = whole_shard(self._path(state["shards"]))
            if tail is None or len(tail) < fill:
                return False
            self.buffer[:fill] = tail[:fill]
        self.documents, self.tokens, self.shards = state["documents"], state["tokens"], state["shards"]
        self.fill = fill
        return True

    def _tokens_on_disk(self, index: int) -> int:
        """How many tokens shard index holds by its file's size (shards are renamed in place whole); -1: none."""
        path = self._path(index)
        return (path.stat().st_size - HEADER_BYTES) // 2 if path.is_file() else -1

    def _path(self, index: int) -> Path:
        return shard_path(self.out, self.split, index)

    def _flush(self):
        path = self._path(self.shards)
        tokens = self.buffer[:self.fill]
        # A resumed run writes again the shards after its resume point: ones a killed run finished need not be.
        old = whole_shard(path)
        if old is None or not np.array_equal(old, tokens):
            write_shard(str(path), tokens)
        self.shards += 1
        self.fill = 0


def whole_shard(path: Path):
    """The shard's tokens, or None if it is missing or damaged (then it is simply written again)."""
    if not path.exists():
        return None
    try:
        return read_shard(str(path))
    except UserError:
        return None
