"""Token shards on disk and the loader that streams (x, y) batches from them, split across DDP ranks.

Shard layout (llm.c's): a header of 256 little-endian int32 [magic, version, n_tokens, 0, ...], then n_tokens
little-endian uint16 token ids.
"""
import glob
import os

import numpy as np

from errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
REDO = "re-run prepare_data.py with --overwrite"


def write_shard(path: str, tokens: np.ndarray):
    """Write tokens (uint16) as a shard, atomically: a reader sees the whole shard or none."""
    if tokens.dtype != np.uint16:
        raise TypeError(f"shard tokens must be uint16, got {tokens.dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say: no half shard left behind, and one line that names the file
        if os.path.exists(tmp):
            os.remove(tmp)
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


class DataLoader:
    """Streams batches of B*T+1-token chunks from the shards of one split, forever.

    The chunks form one global sequence: an epoch is every shard's chunks, shards in order (or in a permutation
    seeded by (shuffle_seed, epoch)), and epochs repeat. Each call, rank r takes chunk G + r and G advances by
    world_size, so the ranks of one step together read what a single process reads in world_size calls.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, shuffle_seed=None,
                 vocab_size=None):
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} does not exist; run prepare_data.py to create it")
        self.paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}_*.bin")))
        if not self.paths:
            raise UserError(f"no {split}_*.bin shards in {data_dir}; run prepare_data.py to create them")
        self.shards = [read_shard(p) for p in self.paths]
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed, self.vocab_size = shuffle_seed, vocab_size
        # The +1 is the target of the last position; a shard's leftover tokens beyond its last chunk go unused.
        self.chunks_per_shard = np.array([max(0, len(s) - 1) // (self.B * self.T) for s in self.shards])
        self.chunks_per_epoch = int(self.chunks_per_shard.sum())
        if self.chunks_per_epoch == 0:
            n_tokens = sum(len(s) for s in self.shards)
            raise UserError(f"the {split} split in {data_dir} has {n_tokens} tokens, fewer than one batch of "
                            f"batch_size*block_size+1 = {self.B * self.T + 1}; lower --batch-size or "
                            f"--block-size, or prepare more data (--val-tokens for the val split)")
        self.next_chunk = 0

    def reset(self):
        self.next_chunk = 0

    def state_dict(self) -> dict:
        return {"next_chunk": self.next_chunk}

    def load_state_dict(self, state: dict):
        self.next_chunk = int(state["next_chunk"])

    def next_batch(self):
        """(x, y): int64 tensors of shape (B, T), y being x shifted left by one token."""
        import torch  # only here: prepare_data.py imports this module for the shard format, not for torch

        shard, start = self._locate(self.next_chunk + self.rank)
        self.next_chunk += self.world_size
        chunk = np.array(self.shards[shard][start:start + self.B * self.T + 1], dtype=np.int64)
        if self.vocab_size is not None and chunk.max() >= self.vocab_size:
            raise UserError(f"token id {chunk.max()} >= vocab size {self.vocab_size} in {self.paths[shard]}: "
                            f"the data was prepared with a different tokenizer")
        tokens = torch.from_numpy(chunk)
        return tokens[:-1].view(self.B, self.T), tokens[1:].view(self.B, self.T)

    def _locate(self, chunk_index: int) -> tuple[int, int]:
        """The shard and the token offset of a global chunk index."""
        epoch, position = divmod(chunk_index, self.chunks_per_epoch)
        order = np.arange(len(self.shards))
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, epoch]).permutation(order)
        ends = np.cumsum(self.chunks_per_shard[order])
        i = int(np.searchsorted(ends, position, side="right"))
        first_chunk = ends[i] - self.chunks_per_shard[order[i]]
        return int(order[i]), int(position - first_chunk) * self.B * self.T
