"""Tokenizers as tiktoken encodings: GPT-2's, or a byte-level BPE trained here and saved as a tiktoken rank file.

A rank file X.tiktoken holds one line per token, "base64(bytes) rank", in merge order. An optional sidecar
X.json beside it gives {"pat_str": ..., "special_tokens": {"<|endoftext|>": id}}; without it the file is read
with GPT-2's split pattern and <|endoftext|> right after the last rank, which makes OpenAI's gpt2.tiktoken
exactly tiktoken's "gpt2" encoding.
"""
import base64
import hashlib
import binascii
import json
from pathlib import Path
from typing import Iterable, Optional

import tiktoken

from atomic import write_file
from errors import UserError, first_line

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split, in tiktoken's faster but equivalent possessive spelling.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
MAX_UINT16_VOCAB = 65536  # shards store token ids as uint16
# GPT-2's 50,256 ranks written as a rank file (save_tokenizer's format, as ../shared/data/gpt2.tiktoken), and its
# <|endoftext|>: what makes a file the same tokenizer as the name "gpt2" without downloading that.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256


def load_tokenizer(spec: str) -> tiktoken.Encoding:
    """'gpt2' (tiktoken's, downloaded once and cached) or the path of a tiktoken rank file."""
    if spec == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # the download can fail in many ways (DNS, proxy, HTTP status)
            raise UserError(f"cannot download tiktoken's gpt2 tokenizer ({type(e).__name__}); go online once "
                            f"(it is then cached) or pass the path of a gpt2.tiktoken rank file instead")
    ranks = _read_ranks(spec)
    pat_str, special_tokens = _read_sidecar(spec, n_ranks=len(ranks))
    try:
        return tiktoken.Encoding(name=Path(spec).stem, pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens=special_tokens)
    except ValueError as e:  # e.g. a pat_str that is not a valid regex
        raise UserError(f"{_sidecar(spec)}: {first_line(e)}; fix or delete it")


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two specs (as load_tokenizer takes them) are one tokenizer: the same name, rank files whose
    contents, sidecar included, are equal wherever they lie, or "gpt2" and a file holding exactly its ranks."""
    a_file, b_file = Path(a).is_file(), Path(b).is_file()
    if a_file != b_file:
        name, path = (b, a) if a_file else (a, b)
        return name == "gpt2" and is_gpt2(path)
    if not a_file:
        return a == b
    return all(_read_or_none(p) == _read_or_none(q) for p, q in ((a, b), (_sidecar(a), _sidecar(b))))


def is_gpt2(path: str) -> bool:
    """Whether a rank file is tiktoken's gpt2: OpenAI's ranks (as a rank file, byte for byte), GPT-2's split
    pattern and <|endoftext|> after them, whether a sidecar says so or none does."""
    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != GPT2_RANKS_SHA256:
        return False
    return _read_sidecar(path, n_ranks=GPT2_EOT) == (GPT2_PATTERN, {EOT: GPT2_EOT})


def _read_or_none(path) -> Optional[bytes]:
    return Path(path).read_bytes() if Path(path).is_file() else None


def _sidecar(path) -> Path:
    return Path(path).with_suffix(".json")


def _read_ranks(path: str) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that function caches local files by
    # path in a temp folder, so a tokenizer retrained at the same path would load stale.
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read tokenizer {path}: {e.strerror}; pass 'gpt2' or the path of a .tiktoken file")
    ranks = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path}:{lineno}: not a tiktoken rank file line (want 'base64token rank'); "
                            f"retrain the tokenizer or pass 'gpt2'")
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path}: ranks must be 0..N-1 and include all 256 single bytes; "
                        f"the file is corrupt, retrain the tokenizer")
    return ranks


def _read_sidecar(path: str, n_ranks: int) -> tuple[str, dict[str, int]]:
    sidecar = _sidecar(path)
    if not sidecar.exists():
        return GPT2_PATTERN, {EOT: n_ranks}
    want = f"want JSON {{\"pat_str\": regex, \"special_tokens\": {{\"{EOT}\": id, ...}}}} with ids after the ranks"
    try:
        spec = json.loads(sidecar.read_text(encoding="utf-8"))
        pat_str, special_tokens = spec["pat_str"], dict(spec["special_tokens"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{sidecar}: {want}; fix or delete it (without it GPT-2's pattern is used)")
    ids_ok = all(isinstance(i, int) and i >= n_ranks for i in special_tokens.values())
    if not isinstance(pat_str, str) or EOT not in special_tokens or not ids_ok:
        raise UserError(f"{sidecar}: {want}; fix or delete it (without it GPT-2's pattern is used)")
    return pat_str, special_tokens


def check_vocab_size(vocab_size: int):
    """A tokenizer to train needs the 256 bytes plus <|endoftext|>, and must fit uint16 shards."""
    if not 257 <= vocab_size <= MAX_UINT16_VOCAB:
        raise UserError(f"vocab size {vocab_size} must be between 257 (256 bytes + {EOT}) and {MAX_UINT16_VOCAB} "
                        f"(shards store uint16 ids)")


def check_uint16(enc: tiktoken.Encoding):
    """Shards store uint16 token ids, so the vocabulary must fit in 65,536."""
    if enc.n_vocab > MAX_UINT16_VOCAB:
        raise UserError(f"tokenizer {enc.name} has {enc.n_vocab} tokens, more than the {MAX_UINT16_VOCAB} "
                        f"that uint16 shards can hold; use a smaller vocabulary")


def save_tokenizer(enc: tiktoken.Encoding, out_path: str):
    """Write enc as a rank file plus its sidecar. The sidecar goes first, so a rank file that exists is complete."""
    # tiktoken has no public accessor for its parts; these attributes are what its own pickling uses.
    sidecar = {"pat_str": enc._pat_str, "special_tokens": enc._special_tokens}
    write_file(_sidecar(out_path), json.dumps(sidecar, indent=1).encode("utf-8"))
    ranked = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    write_file(Path(out_path), b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranked))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> tiktoken.Encoding:
    """Train a byte-level BPE with GPT-2's split on texts; save it at out_path with <|endoftext|> last.

    The vocabulary is vocab_size tokens, or fewer when the text runs out of pairs to merge first (every
    pre-tokenized piece already one token, as in a small, narrow corpus); callers see it in n_vocab.
    """
    check_vocab_size(vocab_size)
    try:
        import rustbpe  # only needed to train, so not a dependency of everything that loads a tokenizer
    except ImportError:
        raise UserError("training a tokenizer needs the rustbpe package: pip install rustbpe")
    trainer = rustbpe.Tokenizer()
    # rustbpe ranks the 256 single bytes first, by byte value, then its merges in the order it learned them,
    # which is exactly the ranking tiktoken's BPE needs to reproduce them.
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=GPT2_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name=Path(out_path).stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: len(ranks)})
    save_tokenizer(enc, out_path)
    return enc

