"""Checkpoints: one folder per save, written under a temporary name and renamed, so a crash never leaves a
half-written checkpoint that could be taken for the newest.

    ckpt_0001000/
        model.safetensors   weights (never pickle)
        config.json         model config, tokenizer identity, step
        kit_tokenizer.tiktoken  (+ kit_tokenizer.json) when the tokenizer is a file, so the folder is self-contained
                            (older checkpoints: tokenizer.tiktoken + tokenizer.json, still read)
        state.pt            optimizer, data position, RNG: loaded with torch.load(weights_only=True)
"""
import argparse
import dataclasses
import json
import os
import shutil
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import atomic
import runtime
from atomic import atomic_write
from config import GPTConfig
from errors import UserError, first_line
from model import GPT
from run_folder import find_checkpoint, list_checkpoints, prune  # noqa: F401 (the scripts' way to a checkpoint)
from tokenizer import load_tokenizer

# Not "tokenizer.json": that is Hugging Face's fast-tokenizer file, and transformers would misread our sidecar.
RANKS, SIDECAR = "kit_tokenizer.tiktoken", "kit_tokenizer.json"
HEAD = "lm_head.weight"


def staging_folder(out_dir: str, step: int, tag: str) -> str:
    """The temporary folder a save fills before its rename: ranks that all write into it agree on `tag`."""
    return os.path.join(out_dir, f".ckpt_{step:07d}.tmp-{tag}")


def save_checkpoint(out_dir: str, step: int, model: GPT, tokenizer: str, train_state: Optional[dict] = None,
                    keep: int = 0, protect: tuple = (), run_id: Optional[str] = None, weights: Optional[dict] = None,
                    staged: Optional[str] = None) -> str:
    """Write ckpt_<step> into out_dir atomically; keep only the newest `keep` (0 keeps all) and those at the steps
    in `protect`. Returns its path. weights replaces model.state_dict() (gathered from shards, say); staged is
    a staging_folder() that other ranks already wrote into (a sharded optimizer), renamed with the rest."""
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = staged or staging_folder(out_dir, step, str(os.getpid()))
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not staged:
            atomic.remove(tmp)  # a killed save of the same pid's name
        with atomic_write(final, tmp=tmp, durable=True):
            os.makedirs(tmp, exist_ok=True)
            weights = model.state_dict() if weights is None else weights
            tied = model.config.tie_embeddings  # a tied head is the embedding: saved once, under its name
            weights = {k: v.detach().contiguous().cpu() for k, v in weights.items() if not (tied and k == HEAD)}
            save_file(weights, os.path.join(tmp, "model.safetensors"))
            if os.path.isfile(tokenizer):  # copy a file tokenizer (and its sidecar) in; a name like "gpt2" is enough
                copy_tokenizer(tokenizer, tmp)
                tokenizer = RANKS
            meta = {"model": dataclasses.asdict(model.config), "tokenizer": tokenizer, "step": step}
            if run_id is not None:  # which run wrote it: ranks of a multi-node resume check they read the same one
                meta["run_id"] = run_id
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=2)
            if train_state is not None:
                # Through our own file: on a full disk torch raises a vague RuntimeError chained to its OSError.
                with open(os.path.join(tmp, "state.pt"), "wb") as f:
                    torch.save(train_state, f)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors wrap a full disk in their own types
        raise UserError(f"cannot write checkpoint {final}: {_os_reason(e)}; make room or choose another --out-dir "
                        f"(earlier checkpoints are intact)")
    prune(out_dir, keep, protect)
    return final


def copy_tokenizer(ranks: str, folder: str) -> None:
    """A rank file and its sidecar into folder under the kit's names."""
    shutil.copyfile(ranks, os.path.join(folder, RANKS))
    sidecar = os.path.splitext(ranks)[0] + ".json"
    if os.path.isfile(sidecar):
        shutil.copyfile(sidecar, os.path.join(folder, SIDECAR))


def load_model(source: str, device="cpu") -> tuple[GPT, str]:
    """The one way every script gets a model: (model in eval mode, tokenizer spec).

    source: a checkpoint folder, a run folder (its newest checkpoint), a Hugging Face GPT-2 folder,
    or a hub name (gpt2 ... gpt2-xl). A checkpoint's tokenizer is its own; GPT-2's is "gpt2".
    """
    if os.path.isdir(source) and not _is_hf_folder(source):
        model, tokenizer = _load_ours(find_checkpoint(source))
    else:
        model, tokenizer = GPT.from_pretrained(source), "gpt2"
        if os.path.isfile(os.path.join(source, RANKS)):  # an export of ours keeps its own tokenizer
            tokenizer = os.path.join(source, RANKS)
    return model.to(device).eval(), tokenizer


def add_model_args(parser: argparse.ArgumentParser, dtype_help: str):
    """The flags that name a model and where it runs, the same for every script that reads one."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="out",
                        help="a checkpoint, or a run folder to take its newest checkpoint from (default: %(default)s)")
    source.add_argument("--init-from", metavar="NAME_OR_DIR",
                        help="OpenAI GPT-2 instead: a Hugging Face folder, or a hub name (gpt2 ... gpt2-xl, with or "
                             "without openai-community/; downloaded once)")
    parser.add_argument("--tokenizer", help="gpt2 or a .tiktoken file (default: the one the model names)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *runtime.DTYPES], help=dtype_help)


def load_from_args(args, device) -> tuple[GPT, object, str]:
    """(model in eval mode, its tokenizer, where it came from) for add_model_args' flags."""
    # find_checkpoint first: its error names the folder, where load_model would try "out" as a hub name.
    source = args.init_from or find_checkpoint(args.checkpoint)
    model, spec = load_model(source, device)
    enc = load_tokenizer(args.tokenizer or spec)
    if enc.n_vocab != model.config.vocab_size:
        raise UserError(f"tokenizer {args.tokenizer or spec} has {enc.n_vocab} tokens but the model {source} has "
                        f"{model.config.vocab_size}; pass the tokenizer it was trained with")
    return model, enc, source


def load_train_state(ckpt: str) -> dict:
    """Optimizer, step, data position and RNG of a checkpoint; tensors and plain types only, never code."""
    path = os.path.join(ckpt, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{ckpt} has no state.pt: it holds weights only and cannot be resumed; move it out "
                        f"of the run folder to resume from an earlier checkpoint")
    except Exception as e:  # an unpickling error here means a corrupt or hostile file; either way, refuse it
        raise UserError(f"refusing {path}: {first_line(e)}")


def read_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, "config.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        meta["model"] = GPTConfig(**meta["model"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e}; the checkpoint is incomplete or corrupt")


def _load_ours(ckpt: str) -> tuple[GPT, str]:
    meta = read_meta(ckpt)
    model = GPT(meta["model"])
    path = os.path.join(ckpt, "model.safetensors")
    try:
        weights = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a corrupt header or body
        raise UserError(f"cannot read {path}: {e}; the file is corrupt, use another checkpoint")
    own = model.state_dict()
    for key, tensor in weights.items():
        if key not in own or own[key].shape != tensor.shape:
            raise UserError(f"{path}: weight {key} {tuple(tensor.shape)} does not fit the model in config.json; "
                            f"the checkpoint is corrupt, use another one")
    missing, _ = model.load_state_dict(weights, strict=False)
    if set(missing) - ({HEAD} if model.config.tie_embeddings else set()):
        raise UserError(f"{path} lacks weights {', '.join(sorted(missing)[:3])}: the checkpoint is incomplete")
    tokenizer = meta["tokenizer"]
    if tokenizer in (RANKS, "tokenizer.tiktoken"):
        tokenizer = os.path.join(ckpt, tokenizer)
    return model, tokenizer


def _is_hf_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "n_layer" in json.load(f)  # HF GPT-2 keeps fields at the top; ours nest them under "model"
    except (OSError, ValueError):
        return False


def _os_reason(e: BaseException) -> str:
    """The OS's reason (e.g. No space left on device), found where torch wrapped it, else e's first line."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    return first_line(e)
