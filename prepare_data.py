"""Tokenize a corpus into uint16 shards: OUT/train_*.bin, OUT/val_*.bin and, written last, OUT/meta.json.

Every document is preceded by <|endoftext|>. The first whole documents, at least --val-tokens of them, form the
val split; the rest is train. The output depends only on the flags, never on --workers. Sources are read file by
file in a fixed order; Hub files, sorted by path, are downloaded one at a time and tokenized as they arrive. A run
killed partway resumes: files whose tokens are already in finished shards are neither downloaded nor read again,
and the shards come out byte-identical to an uninterrupted run.

    python prepare_data.py                          # tinytales, with its own 4,096-token tokenizer
    python prepare_data.py --dataset fineweb-edu    # GPT-2 tokens of fineweb-edu sample-10BT
    python prepare_data.py --dataset fineweb-edu --dry-run   # its files and the commit they come from
    python prepare_data.py --input my_texts/ --out data/mine
"""
import argparse
import fnmatch
import functools
import glob
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

import errors
from atomic import write_json
from shards import MAGIC, VERSION, ShardWriter
from errors import UserError, first_line
from tokenizer import check_uint16, check_vocab_size, load_tokenizer, save_tokenizer, train_tokenizer

HUB_REPOS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "bookcorpus": "bookcorpus/bookcorpus"}
# bookcorpus's parquet export: its one config's train split (partial-train where the Hub's export stops short)
BOOKCORPUS_FILES = "plain_text/*train/*.parquet"
DEFAULT_VAL_TOKENS = {"fineweb-edu": 10_000_000, "bookcorpus": 10_000_000, "tinytales": 250_000, "custom": 1_000_000}
DEFAULT_VOCAB_SIZE = {"tinytales": 4096}  # otherwise GPT-2's 50,257, the model's default
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_SAMPLE_CHARS = 100_000_000  # enough text to learn the merges; more only slows training down
TASK_CHARS = 1 << 20  # text per worker task: large enough to amortize the pickling, small enough to balance
# bookcorpus rows are single sentences without book boundaries; an <|endoftext|> after each would teach the
# model that context ends every sentence, so consecutive sentences of a file are joined into longer documents.
BOOKCORPUS_SENTENCES_PER_DOC = 1000
# What --overwrite deletes: this tool's files only, since OUT may hold the user's own.
OUR_FILES = ("train_*.bin", "val_*.bin", "meta.json", "job.json", "tokenizer.tiktoken", "tokenizer.json")
DOWNLOADS = "downloads"  # OUT/downloads/<path in the repo>: Hub files, kept until their tokens are in shards


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    settings = job_settings(args)
    if args.dry_run:
        print_source(resolve_source(args))
        return
    if not args.overwrite and finished(out, settings):
        print(f"{out} already holds this data (meta.json); nothing to do. Use --overwrite to prepare it again.")
        return
    job = unfinished_job(out, settings, args.overwrite)
    source = job_source(args, out, job)
    given_tokenizer = None
    if args.tokenizer:  # loaded before --overwrite could delete it, and checked before OUT is touched
        given_tokenizer = load_tokenizer(args.tokenizer)
        check_uint16(given_tokenizer)
    claim_folder(out, args.overwrite)
    keep = args.keep_downloads or not from_hub(source)
    release = None if keep else functools.partial(delete_downloads, source, out)
    progress = Progress(out / "job.json", settings, source, job["resume"] if job else None, release)

    saved_tokenizer = out / "tokenizer.tiktoken"
    if given_tokenizer is None:
        enc = trained_tokenizer(args, source, out, saved_tokenizer)
    else:
        enc = given_tokenizer
        if args.tokenizer != "gpt2":  # a copy in OUT keeps the data folder self-contained
            save_tokenizer(enc, str(saved_tokenizer))
    worker_spec = "gpt2" if args.tokenizer == "gpt2" else str(saved_tokenizer)

    counts = Counter()
    started = time.time()
    splits = tokenize(args, source, out, worker_spec, enc.eot_token, progress, counts)
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
        # what was read: the Hub repo, revision and commit, and the files (all but those --limit-docs left unread)
        "provenance": {**source, "files": source["files"][:counts["files_read"]]},
        "shard_format": {"magic": MAGIC, "version": VERSION, "header_int32": 256, "dtype": "uint16"},
    }
    write_json(out / "meta.json", meta)
    (out / "job.json").unlink()  # meta.json now records the settings
    if release:
        shutil.rmtree(out / DOWNLOADS, ignore_errors=True)
    print(f"{out}: " + ", ".join(f"{k} {s['tokens']:,} tokens in {s['documents']:,} documents and {s['shards']} "
                                 f"shards" for k, s in splits.items())
          + f"; {counts['new_tokens'] / seconds:,.0f} tokens/s")


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
    p.add_argument("--overwrite", action="store_true", help="delete this tool's files in OUT and start over "
                                                            "(OUT/downloads stays, to be reused)")
    p.add_argument("--limit-docs", type=int, help="stop after this many documents (default: all)")
    p.add_argument("--fineweb-name", default="sample-10BT",
                   help="fineweb-edu subset: sample-10BT (default; the files sample/10BT/*.parquet), sample-100BT, "
                        "sample-350BT, a dump such as CC-MAIN-2024-10 (data/CC-MAIN-2024-10/*.parquet), or default "
                        "(all of data/)")
    p.add_argument("--hub-path", help="where fineweb-edu or bookcorpus load from: a Hub dataset id or a local "
                                      "folder in the same layout (default: "
                                      f"{' or '.join(HUB_REPOS.values())})")
    p.add_argument("--hub-revision", help="branch, tag or commit of the Hub dataset to read; meta.json records it "
                                          "and the commit it resolved to (default: main; for bookcorpus "
                                          "refs/convert/parquet, the Hub's parquet export of it)")
    p.add_argument("--keep-downloads", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the Hub's parquet files in OUT/downloads once their tokens are in shards, for a "
                        "later run with another tokenizer (default: no, each is deleted as soon as its tokens are "
                        "in finished shards: fineweb-edu sample-10BT is ~30 GB of parquet on top of ~20 GB of "
                        "shards)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files the source would read, their sizes and, for the Hub, the commit the "
                        "revision resolves to now; download and write nothing")
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


# ---- the source: its files, in a fixed order, and the documents in them ----

def resolve_source(args) -> dict:
    """The source's files in reading order, each with its size, and where they come from."""
    if args.source == "tinytales":
        return {"files": []}  # generated, not read
    if args.source not in HUB_REPOS:
        return {"files": [{"path": os.path.abspath(p), "size": p.stat().st_size} for p in input_files(args.input)]}
    pattern = BOOKCORPUS_FILES if args.source == "bookcorpus" else fineweb_files(args.fineweb_name)
    subset = args.fineweb_name if args.source == "fineweb-edu" else "plain_text"
    if os.path.isdir(args.hub_path):  # a local copy: the same layout, no revisions
        root = Path(args.hub_path)
        entries = [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size}
                   for p in root.rglob("*.parquet")]
        source, where = {"folder": os.path.abspath(root), "subset": subset}, args.hub_path
    else:
        info = hub_info(args)
        entries = [hub_entry(s) for s in info.siblings or []]
        source = {"repo": args.hub_path, "revision": args.hub_revision or "main", "commit": info.sha,
                  "subset": subset}
        where = f"{args.hub_path} at {source['revision']}"
    source["files"] = sorted((f for f in entries if matches(f["path"], pattern)), key=lambda f: f["path"])
    if not source["files"]:
        raise UserError(f"no files {pattern} in {where}; check --fineweb-name and --hub-path")
    return source


def fineweb_files(name: str) -> str:
    """The files of a fineweb-edu subset, as its dataset card's configs lay them out."""
    if name == "default":
        return "data/*/*.parquet"
    if name.startswith("sample-"):
        return f"sample/{name.removeprefix('sample-')}/*.parquet"
    return f"data/{name}/*.parquet"  # one Common Crawl dump


def matches(path: str, pattern: str) -> bool:
    """A glob of the Hub's data_files kind: * stays within one folder level."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))


def hub_info(args):
    from huggingface_hub import HfApi  # only the Hub sources need it

    try:  # one request: the commit the revision points to, and every file's size and sha256
        return HfApi().dataset_info(args.hub_path, revision=args.hub_revision, files_metadata=True)
    except Exception as e:  # network, missing repo or revision: many exception types, one remedy
        raise UserError(f"cannot open dataset {args.hub_path} at revision {args.hub_revision or 'main'}: "
                        f"{first_line(e)}; check the network and --hub-revision, or point --hub-path at a local copy")


def hub_entry(sibling) -> dict:
    entry = {"path": sibling.rfilename, "size": sibling.size}
    if sibling.lfs:  # parquet files are in LFS, which knows their sha256
        entry["sha256"] = sibling.lfs.sha256
    return entry


def from_hub(source: dict) -> bool:
    return "commit" in source


def print_source(source: dict):
    files = source["files"]
    for f in files:
        print(f"{f['size']:>15,}  {f['path']}")
    where = (f"{source['repo']} at {source['revision']} = commit {source['commit']}" if from_hub(source)
             else source.get("folder", "the input"))
    print(f"{where}: {len(files)} files, {sum(f['size'] for f in files) / 1e9:.2f} GB" if files
          else "tinytales: generated, no files to read")


def job_source(args, out: Path, job) -> dict:
    """The source's files. Resuming from the Hub, the unfinished job's list: the same commit, without asking the
    Hub again. Local files must still be what the unfinished job began to read."""
    if job and from_hub(job["source"]):
        return job["source"]
    source = resolve_source(args)
    if job and job["source"] != source:
        raise UserError(f"the source's files changed since the unfinished job in {out} began (see "
                        f"{out / 'job.json'}); restore them, or add --overwrite to start over")
    return source


def file_documents(args, source: dict, out: Path, start: int, counts: Counter):
    """(i, the non-empty documents of file i) for each source file from start on, downloading Hub files as they
    are reached; tinytales' stories are one file."""
    if args.source == "tinytales":
        if start == 0:
            from tinytales import generate_stories

            yield 0, filter(None, generate_stories(args.tinytales_tokens, seed=0))
        return
    for i in range(start, len(source["files"])):
        path = local_path(source, i, out)
        counts["files_read"] = i + 1
        texts = read_texts(path, counts)
        if args.source == "bookcorpus":  # a file's sentences; documents never span files, so resumes can start there
            texts = (" ".join(group) for group in batched(texts, BOOKCORPUS_SENTENCES_PER_DOC))
        yield i, filter(None, texts)


def local_path(source: dict, i: int, out: Path) -> Path:
    path = source["files"][i]["path"]
    if not from_hub(source):
        return Path(source.get("folder", "")) / path
    from huggingface_hub import hf_hub_download

    try:  # it retries and resumes a dropped connection itself, and returns at once a file it already has
        return Path(hf_hub_download(source["repo"], path, repo_type="dataset", revision=source["commit"],
                                    local_dir=out / DOWNLOADS))
    except Exception as e:  # what is left after its retries: many exception types, one remedy
        raise UserError(f"downloading {path} from {source['repo']} failed ({first_line(e)}); rerun the same "
                        f"command: it goes on from the files already tokenized")


def delete_downloads(source: dict, out: Path, upto: int):
    """Delete the Hub files before upto: their tokens are in finished shards, and a rerun starts after them."""
    for f in source["files"][:upto]:
        (out / DOWNLOADS / f["path"]).unlink(missing_ok=True)


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
        raise UserError(f"{path}: not a readable parquet file ({first_line(e)})")
    if "text" not in table.schema_arrow.names:
        raise UserError(f"{path}: no 'text' column (it has {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row} has no text string; every row needs one")
            yield text


def read_texts(path: Path, counts: Counter):
    readers = {".txt": txt_texts, ".jsonl": jsonl_texts, ".parquet": parquet_texts}
    try:
        yield from readers[path.suffix](path, counts)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}")


def trained_tokenizer(args, source: dict, out: Path, path: Path):
    """The tokenizer trained for this job, reused if an interrupted run of the same job already saved it."""
    if path.exists():  # written atomically after its sidecar, so it is complete
        return load_tokenizer(str(path))
    print(f"training a {args.vocab_size:,}-token tokenizer on up to {TOKENIZER_SAMPLE_CHARS:,} characters "
          f"of {args.source}")
    # the tokenizing pass counts invalid UTF-8 again, once
    texts = itertools.chain.from_iterable(texts for _, texts in file_documents(args, source, out, 0, Counter()))
    sample = first_chars(itertools.islice(texts, args.limit_docs), TOKENIZER_SAMPLE_CHARS)
    if (first := next(sample, None)) is None:
        raise no_documents(args)
    enc = train_tokenizer(itertools.chain([first], sample), args.vocab_size, str(path))
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


def no_documents(args) -> UserError:
    return UserError(f"the {args.source} source has no documents (empty files or text fields?); give it some text")


# ---- tokenizing: worker processes, in order; a resume point at each file boundary ----

def tokenize(args, source: dict, out: Path, tokenizer_spec: str, eot: int, progress, counts: Counter) -> dict:
    """Tokenize the source into the val then train shards, from the job's resume point if it has one; return
    each split's counts for meta.json."""
    from tqdm import tqdm

    splits, start = resumed_writers(out, args.shard_size, progress.job["resume"], counts)
    done = sum(w.documents for w in splits.values())
    resumed_tokens = sum(w.tokens for w in splits.values())
    limit = None if args.limit_docs is None else args.limit_docs - done
    work = tasks(file_documents(args, source, out, start, counts), counts, TASK_CHARS, limit)
    started = time.time()
    # spawn on every platform, so Linux runs exercise the same worker start-up as Windows and macOS.
    pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=init_worker,
                                                     initargs=(tokenizer_spec, eot))
    with pool, tqdm(unit=" docs", initial=done, disable=None) as bar:
        for ends, (tokens, lengths) in ordered_map(pool, encode_documents, work, depth=2 * args.workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            first = 0
            for last, point in ends + [(len(lengths), None)]:
                add_documents(splits, tokens[offsets[first]:offsets[last]], lengths[first:last], args.val_tokens)
                if point:
                    progress.boundary(point, splits)
                first = last
            progress.advance(splits)
            bar.update(len(lengths))
            counts["new_tokens"] = sum(w.tokens for w in splits.values()) - resumed_tokens
            bar.set_postfix_str(f"{counts['new_tokens'] / (time.time() - started):,.0f} tokens/s", refresh=False)
    for writer in splits.values():
        writer.close()
    if splits["val"].documents + splits["train"].documents == 0:
        raise no_documents(args)
    if splits["train"].documents == 0:
        raise UserError(f"all {splits['val'].documents} documents ({splits['val'].tokens:,} tokens) went to the "
                        f"val split; lower --val-tokens (now {args.val_tokens:,}) or give more text")
    return {name: writer.counts() for name, writer in splits.items()}


def resumed_writers(out: Path, shard_size: int, point, counts: Counter):
    """The split writers at the resume point, and the first file still to read; at the start if there is no
    point, or if the shards on disk no longer hold it."""
    def writers():
        return {name: ShardWriter(out, name, shard_size) for name in ("val", "train")}

    splits = writers()
    if point is None:
        return splits, 0
    if all(writer.resume(point[name]) for name, writer in splits.items()):
        counts["files_read"], counts["invalid_utf8"] = point["file"], point["invalid_utf8"]
        print(f"resuming at file {point['file']} of the source, after {point['train']['shards']} train shards")
        return splits, point["file"]
    print(f"note: the shards in {out} do not hold the unfinished job's resume point (deleted or changed?); "
          f"reading the source again from its first file", file=sys.stderr)
    return writers(), 0  # the first writer may have taken up the point already


def tasks(files, counts: Counter, max_chars: int, limit):
    """Worker tasks of about max_chars of text, at most limit texts in all (None: no limit), each as (texts,
    ends): ends lists the files that end in it, as (how many of its texts precede the end, the resume point
    there: the next file and the invalid UTF-8 so far)."""
    if limit == 0:  # resumed at the limit: nothing more to read (or download)
        return
    batch, ends, chars = [], [], 0
    try:
        for i, texts in files:
            taken = 0
            for text in itertools.islice(texts, limit):
                batch.append(text)
                chars += len(text)
                taken += 1
                if chars >= max_chars:
                    yield batch, ends
                    batch, ends, chars = [], [], 0
            ends.append((len(batch), {"file": i + 1, "invalid_utf8": counts["invalid_utf8"]}))
            if limit is not None:
                limit -= taken
                if limit == 0:
                    break
    except UserError:  # a file that cannot be downloaded or read: the texts before it are still tokenized
        yield batch, ends
        raise
    if batch or ends:
        yield batch, ends


def add_documents(splits: dict, tokens: np.ndarray, lengths: np.ndarray, val_tokens: int):
    # A document goes to val while val still has fewer than --val-tokens before it.
    before = splits["val"].tokens + np.cumsum(lengths) - lengths
    n_val = int(np.searchsorted(before, val_tokens))
    cut = int(lengths[:n_val].sum())
    splits["val"].add(tokens[:cut], n_val)
    if n_val < len(lengths):
        splits["val"].close()  # val is complete: written out now, resume points need none of it in memory
        splits["train"].add(tokens[cut:], len(lengths) - n_val)


def ordered_map(pool, fn, tasks, depth: int):
    """pool.imap without its eager reading of the whole input: at most depth tasks in flight, results in order.
    tasks are (argument, tag) pairs; yields (tag, fn(argument)), the tags staying in this process."""
    pending, failure = deque(), None
    try:
        for argument, tag in tasks:
            pending.append((tag, pool.apply_async(fn, (argument,))))
            if len(pending) >= depth:
                tag, result = pending.popleft()
                yield tag, result.get()
    except UserError as e:  # the source failed: what is in flight is still taken in, so a rerun need not redo it
        failure = e
    while pending:
        tag, result = pending.popleft()
        yield tag, result.get()
    if failure:
        raise failure


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


class Progress:
    """job.json: the settings, the source's files, and where a rerun resumes: the latest file boundary whose
    tokens are all in finished shards. Those a split still had in memory there begin its next shard, which is
    read back on resuming, so a boundary counts once that shard is written."""

    def __init__(self, path: Path, settings: dict, source: dict, resume, release):
        self.path, self.release = path, release  # release(n): the first n files are no longer needed
        self.job = {"settings": settings, "source": source, "resume": resume}
        self.pending = deque()  # boundaries passed, in order, whose tokens are not all in shards yet
        write_json(path, self.job)

    def boundary(self, point: dict, splits: dict):
        self.pending.append({**point, **{name: writer.state() for name, writer in splits.items()}})
        self.advance(splits)

    def advance(self, splits: dict):
        latest = None
        while self.pending and all(w.holds(self.pending[0][name]) for name, w in splits.items()):
            latest = self.pending.popleft()
        if latest:
            self.job["resume"] = latest
            write_json(self.path, self.job)
            if self.release:
                self.release(latest["file"])


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


def unfinished_job(out: Path, settings: dict, overwrite: bool):
    """job.json of the unfinished job in out, to resume; None if there is none or --overwrite starts over."""
    job_path = out / "job.json"
    if overwrite or not job_path.exists():
        return None
    job = read_json(job_path)
    if job.get("settings") != settings:
        raise UserError(f"{out} holds an unfinished job with other settings (see {job_path}); rerun it with "
                        f"those flags to resume it, or add --overwrite to start over")
    return job


def claim_folder(out: Path, overwrite: bool):
    """Empty out of our files (--overwrite) and of what a killed run left half-written: never trusted."""
    if overwrite:
        remove_matching(out, OUR_FILES)
    out.mkdir(parents=True, exist_ok=True)
    remove_matching(out, [pattern + ".tmp-*" for pattern in OUR_FILES])
    # huggingface_hub names a partial download uniquely per process, so it never takes up a killed run's
    remove_matching(out / DOWNLOADS / ".cache", ["**/*.incomplete"])


def remove_matching(folder: Path, patterns):
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



if __name__ == "__main__":
    errors.run_main(main)
