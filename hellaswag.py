"""HellaSwag accuracy: pick the right one of four endings for a short context (Zellers et al. 2019), validation split.

Completion-style scoring: the model reads the context, then an ending; its cross-entropy over the ending's tokens
ranks the four. acc picks the lowest total loss, acc_norm the lowest mean loss per token (which does not favour
short endings). Scored this way on all 10,042 examples, GPT-2 124M has acc 0.2859, acc_norm 0.2955 and GPT-2 XL
acc 0.3842, acc_norm 0.4893, as reported in the hellaswag.py of karpathy's llm.c and build-nanogpt. The
lm-evaluation-harness numbers they quote beside them (124M: acc 0.2892, acc_norm 0.3114) come from its own
multiple-choice scoring, so they do not compare with these.

Speed: each example is one row of a single forward. The row holds the context once, then the four endings, each
ending at the positions that follow the context and masked to see only the context and its own earlier tokens,
so each scores exactly as if it alone followed the context. The context is computed once instead of four times,
and the LM head (a third of GPT-2's FLOPs, most of a small model's) runs only where a next token is scored.

    python hellaswag.py                                  # newest checkpoint under out/
    python hellaswag.py --init-from gpt2 --limit 1000    # OpenAI's GPT-2 (needs the hub once)
    torchrun --nproc_per_node=8 hellaswag.py --checkpoint out/run/ckpt_0019073
"""
import argparse
import gzip
import http.client
import json
import os
import time
import urllib.error
import urllib.request
import zlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import distributed
from hardware import autocast, pick_dtype
from atomic import atomic_write, write_json
from errors import UserError, run_main

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_LINES = 10042  # the validation file's examples: a shorter file is a damaged download
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gpt-kit", "hellaswag")
N_ENDINGS = 4
CPU_BUDGET = 256 << 20  # bytes of logits and activations per forward on a CPU
MAX_EXAMPLES = 256  # per forward: past this a GPU is busy anyway, and the last batch's padding grows


def download(url: str, dest: str, lines: int = 0) -> str:
    """Fetch url to dest once (later calls reuse the file). Written under a temporary name, so a download that
    dies half-way is never taken for the whole file."""
    if os.path.isfile(dest):
        return dest
    try:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        with atomic_write(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                if getattr(response, "length", None):  # read(n) gives b"" on a cut body, so check the length
                    raise http.client.IncompleteRead(b"", response.length)
            with open(tmp, "rb") as f:
                got = sum(1 for _ in f)
            if lines and got != lines:
                raise UserError(f"{url} gave {got} lines, not the {lines} expected; it was not kept; rerun to try "
                                f"again or pass --data PATH to a local hellaswag_val.jsonl(.gz)")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # IncompleteRead is an HTTPException
        raise UserError(f"cannot download {url} to {dest}: {getattr(e, 'reason', None) or e}; "
                        f"go online once or pass --data PATH to a local hellaswag_val.jsonl(.gz)")
    return dest


def load_examples(path: Optional[str] = None, limit: int = 0, cache_dir: str = DEFAULT_CACHE) -> list[dict]:
    """The first `limit` (0 = all) examples as {"ctx", "endings", "label"}, from a local .jsonl or .jsonl.gz,
    or (path None) from the official validation file, downloaded once into cache_dir."""
    if path is None:
        path = download(DATA_URL, os.path.join(cache_dir, os.path.basename(DATA_URL)), DATA_LINES)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        examples = []
        with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit and len(examples) == limit:
                    break
                if line.strip():
                    examples.append(_parse(line, f"{path}:{lineno}"))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # EOFError, zlib.error: a damaged .gz
        raise UserError(f"cannot read HellaSwag data {path}: {getattr(e, 'strerror', None) or e}")
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def _parse(line: str, where: str) -> dict:
    try:
        ex = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where}: not a JSON line")
    if not isinstance(ex, dict) or not {"ctx", "endings", "label"} <= ex.keys():
        raise UserError(f"{where}: want an object with keys ctx, endings, label")
    ctx, endings, label = ex["ctx"], ex["endings"], ex["label"]
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: ctx must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: endings must be a list of {N_ENDINGS} strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: label must be an integer 0..{N_ENDINGS - 1}, got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def encode(enc, ex: dict, block_size: int) -> tuple[list[int], list[list[int]]]:
    """(context tokens, tokens of each " " + ending). A context too long for the model loses its oldest tokens."""
    ends = [enc.encode(" " + e) for e in ex["endings"]]
    keep = block_size - max(map(len, ends))
    if keep < 1:
        raise UserError(f"an ending of {max(map(len, ends))} tokens does not fit block_size {block_size}")
    return enc.encode(ex["ctx"])[-keep:], ends


class Packed(NamedTuple):
    tokens: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T), True where a query may attend to a key
    rows: torch.Tensor  # (M,) the row and column of the hidden state that predicts each scored token
    cols: torch.Tensor
    targets: torch.Tensor  # (M,) the scored tokens
    candidate: torch.Tensor  # (M,) which of the batch's 4B candidates each belongs to


def pack(batch: list, device) -> Packed:
    """One right-padded row per example: context, ending 1, ..., ending 4; every ending at the positions right
    after the context. Built on the CPU and copied without waiting: on a GPU from pinned memory (a plain copy to
    the GPU would wait for the queued forwards to finish)."""
    tokens, positions, segments = [], [], []  # per row; segment 0 is the context, k + 1 ending k
    rows, cols, targets, candidate = [], [], [], []
    for b, (ctx, ends) in enumerate(batch):
        n = len(ctx)
        tok, pos, seg = list(ctx), list(range(n)), [0] * n
        for k, end in enumerate(ends):
            # The first token of an ending is predicted by the context's last, the others by their predecessor.
            cols += [n - 1] + list(range(len(tok), len(tok) + len(end) - 1))
            rows += [b] * len(end)
            targets += end
            candidate += [N_ENDINGS * b + k] * len(end)
            tok += end
            pos += range(n, n + len(end))
            seg += [k + 1] * len(end)
        tokens.append(tok)
        positions.append(pos)
        segments.append(seg)
    T = max(map(len, tokens))

    device = torch.device(device)

    def on_device(values: list) -> torch.Tensor:
        t = torch.tensor(values)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    def padded(per_row, value):
        return on_device([r + [value] * (T - len(r)) for r in per_row])

    seg = padded(segments, -1)
    i = torch.arange(T, device=device)
    causal = i[None, :] <= i[:, None]
    q, k = seg[:, :, None], seg[:, None, :]
    # Everything sees the context; an ending also sees itself, never another ending. Padding sees earlier padding
    # (at least itself, so no softmax row is empty) and nothing real ever sees padding.
    mask = (causal & ((k == 0) | (k == q)))[:, None]
    flat = [on_device(x) for x in (rows, cols, targets, candidate)]
    return Packed(padded(tokens, 0), padded(positions, 0), mask, *flat)


def examples_per_forward(cfg, encoded: list, device, dtype) -> int:
    """Examples one forward packs: as many as keep the logits and activations of a batch of the longest example
    within a quarter of the GPU's free memory (memory PyTorch holds cached counts as free), or CPU_BUDGET on a CPU;
    at most MAX_EXAMPLES. The quarter leaves room for the estimate's roughness, fragmentation and, under FSDP, a
    gathered block. Sized on the longest example, so every batch fits, whichever examples it holds."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 4
    else:
        budget = CPU_BUDGET
    width = torch.finfo(dtype).bits // 8
    row = max((len(ctx) + sum(map(len, ends)) for ctx, ends in encoded), default=1)  # tokens in a packed row
    scored = max((sum(map(len, ends)) for _, ends in encoded), default=1)
    per_example = (scored * cfg.padded_vocab_size * width  # the head's logits where a next token is scored
                   + row * cfg.n_embd * 16 * width  # one block's activations: q, k, v, MLP hidden, residuals
                   + row * row * (1 + 4 * cfg.n_head))  # the mask, and attention scores where they are materialised
    return max(1, min(MAX_EXAMPLES, budget // per_example))


@torch.no_grad()
def score(model, enc, examples: list, device, dtype, batch_size: int = 0, progress: bool = False):
    """Summed loss and token count of every candidate ending, both (N, 4) on the CPU, batch_size examples per
    forward (0: examples_per_forward). The losses stay on the device until the end: one wait, not one a batch."""
    encoded = [encode(enc, ex, model.config.block_size) for ex in examples]
    counts = torch.tensor([[len(end) for end in ends] for _, ends in encoded], dtype=torch.float32)
    counts = counts.view(-1, N_ENDINGS)  # (0, 4) when a process has no examples
    batch_size = batch_size or examples_per_forward(model.config, encoded, device, dtype)
    # Examples of similar length share a batch, so little of a forward is padding; results go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + counts[i].sum().item())
    # The float32 logits a slice at a time. On a CPU a few rows, still in cache when the softmax reads them back
    # (several times faster than one pass over the whole); on a GPU larger slices, for fewer kernel launches
    # (1,024 rows of GPT-2's vocabulary: 206 MB).
    slice_rows = 32 if torch.device(device).type == "cpu" else 1024
    sums = []
    # One autocast around the loop: it keeps the low-precision copies of the weights from batch to batch.
    with tqdm(total=len(examples), unit="ex", disable=not progress) as bar, autocast(device, dtype):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            p = pack([encoded[i] for i in idx], device)
            h = model.hidden(p.tokens, positions=p.positions, attn_mask=p.mask)
            logits = model.logits(h[p.rows, p.cols])
            loss = torch.cat([F.cross_entropy(part.float(), want, reduction="none")
                              for part, want in zip(logits.split(slice_rows), p.targets.split(slice_rows))])
            sums.append(torch.zeros(N_ENDINGS * len(idx), device=device).index_add_(0, p.candidate, loss))
            bar.update(len(idx))
    losses = torch.zeros_like(counts)
    if sums:
        losses[order] = torch.cat(sums).view(-1, N_ENDINGS).cpu()
    return losses, counts


@torch.no_grad()
def score_plain(model, enc, examples: list, device, dtype):
    """The plain way, one forward per candidate over context + ending with logits everywhere: the reference
    that score() is checked and timed against. Same return as score()."""
    losses = torch.zeros(len(examples), N_ENDINGS)
    counts = torch.zeros(len(examples), N_ENDINGS)
    with autocast(device, dtype):
        for i, ex in enumerate(examples):
            ctx, ends = encode(enc, ex, model.config.block_size)
            for k, end in enumerate(ends):
                logits, _ = model(torch.tensor([ctx + end], device=device))
                scored = logits[0, len(ctx) - 1:-1].float()
                losses[i, k] = F.cross_entropy(scored, torch.tensor(end, device=device), reduction="sum").item()
                counts[i, k] = len(end)
    return losses, counts


def evaluate(model, enc, examples: list, device, dtype, batch_size: int = 0,
             world: Optional[distributed.World] = None, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n"} of model (an unwrapped GPT) on examples. Under torchrun pass world: each process
    scores examples[rank::world_size] and the counts are summed over processes."""
    counts = tally(model, enc, examples, device, dtype, batch_size, world, progress)
    return accuracy(distributed.all_reduce(counts) if world is not None and world.enabled else counts)


def tally(model, enc, examples: list, device, dtype, batch_size: int = 0,
          world: Optional[distributed.World] = None, progress: bool = False, even: bool = False) -> torch.Tensor:
    """[correct, correct_norm, n] of this process's share of examples (all of them when world is None): local
    work, no collective. even: every rank scores as many rows as the largest share (repeats of the first example
    fill the rest, not counted), so that with one batch_size on all ranks each runs the same number of forwards,
    as the ranks of a sharded model must: each forward is a collective."""
    rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
    was_training = model.training
    model.eval()  # dropout off; train.py calls this mid-training
    mine = examples[rank::world_size]
    filler = examples[:1] * (-(-len(examples) // world_size) - len(mine)) if even else []
    losses, counts = score(model, enc, mine + filler, device, dtype, batch_size, progress)
    losses, counts = losses[:len(mine)], counts[:len(mine)]
    model.train(was_training)
    labels = torch.tensor([ex["label"] for ex in mine], dtype=torch.long)
    correct = (losses.argmin(dim=1) == labels).sum().item()
    correct_norm = ((losses / counts).argmin(dim=1) == labels).sum().item()
    return torch.tensor([correct, correct_norm, len(mine)], dtype=torch.long, device=device)


def accuracy(counts: torch.Tensor) -> dict:
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def save_result(path: str, result: dict):
    """The result as JSON at path, atomically; a path that cannot be written is one line."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(path, result, indent=2)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")


def main():
    parser = argparse.ArgumentParser(description="HellaSwag validation accuracy (acc, acc_norm) of a model.")
    checkpoint.add_model_args(parser, dtype_help="autocast dtype: auto is bfloat16 where the hardware has it natively "
                                                  "(CUDA, AMX/AVX512-BF16 CPUs), else float32")
    parser.add_argument("--data", default=None, help="local hellaswag_val.jsonl(.gz) (default: download once)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"where the download is kept (default: "
                        f"{DEFAULT_CACHE})")
    parser.add_argument("--batch-size", type=int, default=0, help="examples per forward (default: 0, as many as fit "
                        "a quarter of the free GPU memory, or 256 MB on a CPU)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N examples (default: all)")
    parser.add_argument("--out", default=None, help="also write {acc, acc_norm, n} to this JSON file")
    args = parser.parse_args()
    if args.batch_size < 0 or args.limit < 0:
        raise UserError("--batch-size and --limit must be at least 0")

    world = distributed.setup(args.device)
    try:
        examples = load_examples(args.data, args.limit, args.cache_dir)
        model, enc, _ = checkpoint.load_from_args(args, world.device)
        dtype = pick_dtype(args.dtype, world.device)
        t0 = time.perf_counter()
        result = evaluate(model, enc, examples, world.device, dtype, args.batch_size, world, progress=world.is_master)
        rate = result["n"] / (time.perf_counter() - t0)
        if world.is_master:
            print(f"hellaswag: n {result['n']} | acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | "
                  f"{rate:.1f} examples/s")
            if args.out:
                save_result(args.out, result)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_main(main)
