"""Tokenize a corpus into uint16 shards: OUT/train_*.bin, OUT/val_*.bin and, written last, OUT/meta.json.

Every document is preceded by <|endoftext|>. The first whole documents, at least --val-tokens of them, form the
val split; the rest is train. The output depends only on the flags, never on --workers, and a run killed
partway resumes: it streams the source again and rewrites only the shards that are missing or differ.

    python prepare_data.py                          # tinytales, with its own 4,096-token tokenizer
    python prepare_data.py --dataset fineweb-edu    # GPT-2 tokens of fineweb-edu sample-10BT
    python prepare_data.py --input my_texts/ --out data/mine
"""
import argparse
import glob
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

import errors
from dataloader import MAGIC, VERSION, read_shard, write_shard
from errors import UserError
from tokenizer import check_uint16, check_vocab_size, load_tokenizer, save_tokenizer, train_tokenizer

HUB_REPOS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "bookcorpus": "bookcorpus/bookcorpus"}
DEFAULT_VAL_TOKENS = {"fineweb-edu": 10_000_000, "bookcorpus": 10_000_000, "tinytales": 250_000, "custom": 1_000_000}
DEFAULT_VOCAB_SIZE = {"tinytales": 4096}  # otherwise GPT-2's 50,257, the model's default
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_SAMPLE_CHARS = 100_000_000  # enough text to learn the merges; more only slows training down
TASK_CHARS = 1 << 20  # text per worker task: large enough to amortize the pickling, small enough to balance
# bookcorpus rows are single sentences without book boundaries; an <|endoftext|> after each would teach the
# model that context ends every sentence, so consecutive sentences are joined into longer documents.
BOOKCORPUS_SENTENCES_PER_DOC = 1000
# What --overwrite deletes: this tool's files only, since OUT may hold the user's own.
OUR_FILES = ("train_*.bin", "val_*.bin", "meta.json", "job.json", "tokenizer.tiktoken", "tokenizer.json")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    files = input_files(args.input) if args.input else None
    settings = job_settings(args)
    given_tokenizer = None
    if args.tokenizer:  # loaded before --overwrite could delete it, and checked before any work
        given_tokenizer = load_tokenizer(args.tokenizer)
        check_uint16(given_tokenizer)
    if not args.overwrite and finished(out, settings):
        print(f"{out} already holds this data (meta.json); nothing to do. Use --overwrite to prepare it again.")
        return
    prepare_folder(out, settings, args.overwrite)

    saved_tokenizer = out / "tokenizer.tiktoken"
    if given_tokenizer is None:
        enc = trained_tokenizer(args, files, saved_tokenizer)
    else:
        enc = given_tokenizer
        if args.tokenizer != "gpt2":  # a copy in OUT keeps the data folder self-contained
            save_tokenizer(enc, str(saved_tokenizer))
    worker_spec = "gpt2" if args.tokenizer == "gpt2" else str(saved_tokenizer)

    counts = Counter()
    started = time.time()
    splits = tokenize(documents(args, files, counts), worker_spec, enc.eot_token, out, args)
    seconds = time.time() - started
    if counts["invalid_utf8"]:
        print(f"warning: {counts['invalid_utf8']} documents had invalid UTF-8; the bad bytes were replaced "
              f"with U+FFFD", file=sys.stderr)
    meta = {
        "tokenizer": "gpt2" if args.tokenizer == "gpt2" else saved_tokenizer.name,
        "vocab_size": enc.n_vocab, "eot": enc.eot_token, "source": args.source, "splits": splits,
        # fineweb-edu's documents come shuffled; small or ordered corpora need their windows shuffled each epoch
        "shuffle": args.source != "fineweb-edu",
        "invalid_utf8_documents": counts["invalid_utf8"], "settings": settings,
        "shard_format": {"magic": MAGIC, "version": VERSION, "header_int32": 256, "dtype": "uint16"},
    }
    write_json_atomic(out / "meta.json", meta)
    (out / "job.json").unlink()  # meta.json now records the settings
    n_tokens = sum(s["tokens"] for s in splits.values())
    print(f"{out}: " + ", ".join(f"{k} {s['tokens']:,} tokens in {s['documents']:,} documents and {s['shards']} "
                                 f"shards" for k, s in splits.items())
          + f"; {n_tokens / seconds:,.0f} tokens/s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dataset", choices=["tinytales", "fineweb-edu", "bookcorpus"],
                      help="a built-in source (default: tinytales unless --input is given)")
    what.add_argument("--input", nargs="+", metavar="PATH",
                      help=".txt (one document per file), .jsonl (a 'text' field per line), .parquet (a 'text' "
                           "column) files, folders of them (searched recursively) or globs")
    p.add_argument("--out", help="output folder (default: data/<dataset>, or data/custom for --input)")
    p.add_argument("--tokenizer", help="'gpt2' or the path of a .tiktoken rank file (default: gpt2; tinytales "
                                       "trains its own)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help=f"train a byte-level BPE on the first {TOKENIZER_SAMPLE_CHARS:,} characters of the source, "
                        f"saved as OUT/tokenizer.tiktoken")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default: 4096 for "
                                                  "tinytales, else 50257 as GPT-2)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (default: 100M)")
    p.add_argument("--val-tokens", type=int, help="the first whole documents, at least this many tokens of them, "
                                                  "form the val split (default: 10M for fineweb-edu and bookcorpus, "
                                                  "250k for tinytales, 1M for --input)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="delete this tool's files in OUT and start over")
    p.add_argument("--limit-docs", type=int, help="stop after this many documents (default: all)")
    p.add_argument("--fineweb-name", default="sample-10BT",
                   help="fineweb-edu subset: sample-10BT (default), sample-100BT, sample-350BT, default (all)")
    p.add_argument("--hub-path", help="where fineweb-edu or bookcorpus load from: a Hub dataset id or a local "
                                      "folder in the same layout (default: "
                                      f"{' or '.join(HUB_REPOS.values())})")
    p.add_argument("--hub-revision", help="branch, tag or commit of the Hub dataset to read; meta.json records it "
                                          "(default: main; for bookcorpus refs/convert/parquet, the Hub's parquet "
                                          "export, since its loading script is refused by datasets>=4)")
    p.add_argument("--tinytales-tokens", type=int, default=5_000_000,
                   help="about how many tokens of stories to generate (default: 5M)")
    args = p.parse_args(argv)

    for flag in ("shard_size", "workers", "limit_docs", "tinytales_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.shard_size >= 2**31:
        raise UserError("--shard-size must be below 2**31 (the shard header stores it as int32)")
    if args.val_tokens is not None and args.val_tokens < 0:
        raise UserError("--val-tokens must be 0 or more")
    if args.tokenizer and args.train_tokenizer:
        raise UserError("--tokenizer and --train-tokenizer exclude each other: use a tokenizer or train one")

    # Resolve the source-dependent defaults, so the rest reads plain values.
    args.source = args.dataset or ("custom" if args.input else "tinytales")
    args.out = args.out or f"data/{args.source}"
    if args.val_tokens is None:
        args.val_tokens = DEFAULT_VAL_TOKENS[args.source]
    if args.source in HUB_REPOS:
        args.hub_path = args.hub_path or HUB_REPOS[args.source]
        args.hub_revision = args.hub_revision or ("refs/convert/parquet" if args.source == "bookcorpus" else None)
    if args.train_tokenizer or (args.source == "tinytales" and args.tokenizer is None):
        args.vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE.get(args.source, 50257)
        check_vocab_size(args.vocab_size)
    elif args.vocab_size is not None:
        raise UserError("--vocab-size is for a trained tokenizer; add --train-tokenizer or drop it")
    else:
        args.tokenizer = args.tokenizer or "gpt2"
    return args


def job_settings(args) -> dict:
    """Everything the output depends on. A resumed run must match it; meta.json records it."""
    tokenizer = f"trained:{args.vocab_size}" if args.tokenizer is None else (
        args.tokenizer if args.tokenizer == "gpt2" else os.path.abspath(args.tokenizer))
    settings = {"source": args.source, "tokenizer": tokenizer, "shard_size": args.shard_size,
                "val_tokens": args.val_tokens, "limit_docs": args.limit_docs}
    if args.source == "tinytales":
        settings["tinytales_tokens"] = args.tinytales_tokens
    elif args.source in HUB_REPOS:
        settings["hub_path"] = args.hub_path
        settings["hub_revision"] = args.hub_revision
        if args.source == "fineweb-edu":
            settings["fineweb_name"] = args.fineweb_name
    else:
        settings["input"] = [os.path.abspath(p) for p in args.input]
    return settings


# ---- the source: documents as strings, in a fixed order ----

def documents(args, files, counts: Counter):
    """Every non-empty document of the source, at most --limit-docs; an empty source is an error."""
    source = args.source
    if source == "tinytales":
        from tinytales import generate_stories

        texts = generate_stories(args.tinytales_tokens, seed=0)
    elif source in HUB_REPOS:
        texts = hub_texts(args)
    else:
        texts = file_texts(files, counts)
    n = 0
    for n, text in enumerate(itertools.islice(filter(None, texts), args.limit_docs), 1):
        yield text
    if n == 0:
        raise UserError(f"the {source} source has no documents (empty files or text fields?); give it some text")


def hub_texts(args):
    import datasets  # slow to import, and only these sources need it

    where = {"name": args.fineweb_name} if args.source == "fineweb-edu" else {}
    if args.hub_revision and not os.path.isdir(args.hub_path):  # a local copy has no revisions
        where["revision"] = args.hub_revision
    try:
        rows = datasets.load_dataset(args.hub_path, split="train", streaming=True, **where)
    except Exception as e:  # network, missing repo or subset: many exception types, one remedy
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot open dataset {args.hub_path}: {reason}; check the network and --fineweb-name, "
                        f"or point --hub-path at a local copy")
    texts = streamed_texts(rows, args.hub_path)
    if args.source == "bookcorpus":
        texts = (" ".join(group) for group in batched(texts, BOOKCORPUS_SENTENCES_PER_DOC))
    return texts


def streamed_texts(rows, hub_path: str):
    # datasets retries a dropped connection a few times and then raises ConnectionError (an OSError)
    try:
        for row in rows:
            yield row["text"]
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"reading {hub_path} failed mid-stream ({reason}); "
                        f"rerun the same command: finished shards are kept, and the stream starts again from its "
                        f"first document")


def batched(items, n: int):
    it = iter(items)
    while group := list(itertools.islice(it, n)):
        yield group


def input_files(patterns) -> list[Path]:
    """The files behind --input: files as given, folders searched recursively, globs expanded; each sorted."""
    files = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            if Path(pattern).suffix not in INPUT_SUFFIXES:
                raise UserError(f"--input {pattern}: unsupported file type; use .txt (one document per file), "
                                f".jsonl (a 'text' field per line) or .parquet (a 'text' column)")
            files.append(Path(pattern))
            continue
        matches = [pattern] if os.path.isdir(pattern) else glob.glob(pattern, recursive=True)
        if not matches:
            raise UserError(f"--input {pattern}: no such file or folder")
        # In folders and globs, other files (READMEs, ...) are passed over.
        found = sorted(f for m in map(Path, matches) for f in ([m] if m.is_file() else m.rglob("*"))
                       if f.suffix in INPUT_SUFFIXES and f.is_file())
        if not found:
            raise UserError(f"--input {pattern}: no {', '.join(INPUT_SUFFIXES)} files there")
        files += found
    return files


def file_texts(files, counts: Counter):
    readers = {".txt": txt_texts, ".jsonl": jsonl_texts, ".parquet": parquet_texts}
    for path in files:
        try:
            yield from readers[path.suffix](path, counts)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}")


def decode(data: bytes, counts: Counter) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one bad byte should not sink a corpus; main() reports the count
        counts["invalid_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def txt_texts(path: Path, counts: Counter):
    yield decode(path.read_bytes(), counts)


def jsonl_texts(path: Path, counts: Counter):
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(decode(line, counts))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object with "
                                f"a 'text' field")
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{lineno}: no 'text' string field; each line must be an object with one")
            yield row["text"]


def parquet_texts(path: Path, counts: Counter):
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})")
    if "text" not in table.schema_arrow.names:
        raise UserError(f"{path}: no 'text' column (it has {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row} has no text string; every row needs one")
            yield text


def trained_tokenizer(args, files, path: Path):
    """The tokenizer trained for this job, reused if an interrupted run of the same job already saved it."""
    if path.exists():  # written atomically after its sidecar, so it is complete
        return load_tokenizer(str(path))
    print(f"training a {args.vocab_size:,}-token tokenizer on up to {TOKENIZER_SAMPLE_CHARS:,} characters "
          f"of {args.source}")
    sample = documents(args, files, Counter())  # the tokenizing pass counts invalid UTF-8 again, once
    enc = train_tokenizer(first_chars(sample, TOKENIZER_SAMPLE_CHARS), args.vocab_size, str(path))
    if enc.n_vocab < args.vocab_size:
        print(f"note: the text has nothing left to merge after {enc.n_vocab:,} tokens (each word is one token "
              f"by then), so the tokenizer has {enc.n_vocab:,}, not {args.vocab_size:,}; meta.json says so")
    return enc


def first_chars(texts, max_chars: int):
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return


# ---- tokenizing: worker processes, in order ----

def tokenize(docs, tokenizer_spec: str, eot: int, out: Path, args) -> dict:
    """Tokenize docs into the val then train shards; return each split's counts for meta.json."""
    from tqdm import tqdm

    splits = {"val": ShardWriter(out, "val", args.shard_size), "train": ShardWriter(out, "train", args.shard_size)}
    started = time.time()
    # spawn on every platform, so Linux runs exercise the same worker start-up as Windows and macOS.
    pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=init_worker,
                                                     initargs=(tokenizer_spec, eot))
    with pool, tqdm(unit=" docs", disable=None) as bar:
        for tokens, lengths in ordered_map(pool, encode_documents, batched_by_chars(docs, TASK_CHARS),
                                           depth=2 * args.workers):
            # A document goes to val while val still has fewer than --val-tokens before it.
            before = splits["val"].tokens + np.cumsum(lengths) - lengths
            n_val = int(np.searchsorted(before, args.val_tokens))
            cut = int(lengths[:n_val].sum())
            splits["val"].add(tokens[:cut], n_val)
            splits["train"].add(tokens[cut:], len(lengths) - n_val)
            bar.update(len(lengths))
            n_tokens = splits["val"].tokens + splits["train"].tokens
            bar.set_postfix_str(f"{n_tokens / (time.time() - started):,.0f} tokens/s", refresh=False)
    for writer in splits.values():
        writer.close()
    if splits["train"].documents == 0:
        raise UserError(f"all {splits['val'].documents} documents ({splits['val'].tokens:,} tokens) went to the "
                        f"val split; lower --val-tokens (now {args.val_tokens:,}) or give more text")
    return {name: writer.counts() for name, writer in splits.items()}


def batched_by_chars(texts, max_chars: int):
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def ordered_map(pool, fn, items, depth: int):
    """pool.imap without its eager reading of the whole input: at most depth tasks in flight, results in order."""
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


_worker = {}


def init_worker(tokenizer_spec: str, eot: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the pool
    _worker["enc"], _worker["eot"] = load_tokenizer(tokenizer_spec), eot


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one uint16 array, each preceded by <|endoftext|>, and each one's length in it."""
    # Processes are the parallelism here: encode_ordinary_batch would only add a thread pool hop per text
    # (measured about 20% slower with one thread, and slower still with more).
    ids = [_worker["enc"].encode_ordinary(text) for text in texts]
    lengths = np.array([len(doc) + 1 for doc in ids], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    start = 0
    for doc in ids:
        tokens[start] = _worker["eot"]
        tokens[start + 1:start + 1 + len(doc)] = doc
        start += len(doc) + 1
    return tokens, lengths


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

    def _flush(self):
        path = self.out / f"{self.split}_{self.shards:06d}.bin"
        tokens = self.buffer[:self.fill]
        # A resumed run streams the same tokens again; a complete shard from before need not be rewritten.
        if not same_shard(path, tokens):
            write_shard(str(path), tokens)
        self.shards += 1
        self.fill = 0


def same_shard(path: Path, tokens: np.ndarray) -> bool:
    if not path.exists():
        return False
    try:
        return bool(np.array_equal(read_shard(str(path)), tokens))
    except UserError:  # a damaged shard is simply written again
        return False


# ---- the output folder's state: finished, resumable, or fresh ----

def finished(out: Path, settings: dict) -> bool:
    """True if out holds a finished job with these settings; an error if it holds one with others."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return False
    if read_json(meta_path).get("settings") != settings:
        raise UserError(f"{out} already holds data prepared with other settings (see {meta_path}); add "
                        f"--overwrite to replace it or choose another --out")
    return True


def prepare_folder(out: Path, settings: dict, overwrite: bool):
    """Empty out of our files (--overwrite) or check that its unfinished job is this one; then claim it."""
    job_path = out / "job.json"
    if overwrite:
        remove(out, OUR_FILES)
    elif job_path.exists() and read_json(job_path) != settings:
        raise UserError(f"{out} holds an unfinished job with other settings (see {job_path}); rerun it with "
                        f"those flags to resume it, or add --overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)
    remove(out, [pattern + ".tmp" for pattern in OUR_FILES])  # half-written by a killed run: never trusted
    write_json_atomic(job_path, settings)


def remove(folder: Path, patterns):
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink()


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); add --overwrite to prepare {path.parent} again")
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object; add --overwrite to prepare {path.parent} again")
    return obj


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    errors.run_main(main)
