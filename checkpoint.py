"""One checkpoint folder: its name, what it holds, how it is written (whole or not at all) and read, and the one
way every script gets a model from a checkpoint, a run folder, a Hugging Face folder or a hub name.

    ckpt_0001000/           the name (built and parsed only here); "newest" always means the highest step
        model.safetensors   weights (never pickle)
        config.json         model config, tokenizer identity, step, run id
        kit_tokenizer.tiktoken  (+ kit_tokenizer.json) when the tokenizer is a file, so the folder is self-contained
                            (older checkpoints: tokenizer.tiktoken + tokenizer.json, still read)
        state.pt            data position, RNG, recipe, optimizer (unsharded runs), float16's loss scale:
                            torch.load(weights_only=True)
        optimizer/          the optimizer's shards of an FSDP run, torch.distributed.checkpoint's format (every
                            rank writes its own; it reshards to any world size on load)

A save fills a temporary folder and renames it, so a crash never leaves a half-written checkpoint that could be
taken for the newest.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import atomic
from atomic import atomic_write
from config import GPTConfig
from hardware import DTYPES
from errors import UserError, first_line
from model import GPT, CausalLM, build_model
from tokenizer import load_tokenizer

# The projections OpenAI's (and transformers') GPT-2 stores as Conv1D, (in, out): ours are nn.Linear, (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Not "tokenizer.json": that is Hugging Face's fast-tokenizer file, and transformers would misread our sidecar.
RANKS, SIDECAR = "kit_tokenizer.tiktoken", "kit_tokenizer.json"
HEAD = "lm_head.weight"
OPTIMIZER_DIR = "optimizer"
NAME_RE = re.compile(r"^ckpt_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:07d}"


def checkpoint_step(path: str) -> int:
    return int(NAME_RE.match(os.path.basename(path)).group(1))


def staging_folder(out_dir: str, step: int, tag: str) -> str:
    """The temporary folder a save fills before its rename: ranks that all write into it agree on `tag`. Its name
    never matches NAME_RE, so a half-written save is never listed."""
    return os.path.join(out_dir, f".{checkpoint_name(step)}.tmp-{tag}")


def is_staging_folder(name: str) -> bool:
    return name.startswith(".ckpt_")


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in out_dir, lowest step first."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if NAME_RE.match(n)]
    return [os.path.join(out_dir, n) for n in sorted(names, key=checkpoint_step)]


def find_checkpoint(path: str, flag: str = "--checkpoint") -> str:
    """path itself if it is a checkpoint, else the newest checkpoint of the run folder path, else of the one run
    folder inside path that has checkpoints (two or more are ambiguous: the user names one)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    runs = [os.path.join(path, sub) for sub in sorted(os.listdir(path))] if os.path.isdir(path) else []
    runs = [run for run in runs if list_checkpoints(run)]
    if len(runs) > 1:
        raise UserError(f"{path} holds several runs ({', '.join(runs)}); name one with {flag} DIR")
    if not runs:
        raise UserError(f"no checkpoint in {path}: train one with train.py, or name one with {flag} DIR")
    return list_checkpoints(runs[0])[-1]


def prune(out_dir: str, keep: int, protect: tuple = ()):
    """Keep the newest `keep` checkpoints (0 keeps all) and those at the steps in `protect`; drop the leftovers
    of saves killed half-way."""
    if keep > 0:
        for path in list_checkpoints(out_dir)[:-keep]:
            if checkpoint_step(path) not in protect:
                shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(out_dir):
        if is_staging_folder(name):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def save_checkpoint(out_dir: str, step: int, model: GPT, tokenizer: str, train_state: Optional[dict] = None,
                    keep: int = 0, protect: tuple = (), run_id: Optional[str] = None, weights: Optional[dict] = None,
                    staged: Optional[str] = None) -> str:
    """Write ckpt_<step> into out_dir atomically; keep only the newest `keep` (0 keeps all) and those at the steps
    in `protect`. Returns its path. weights replaces model.state_dict() (gathered from shards, say); staged is
    a staging_folder() that other ranks already wrote into (a sharded optimizer), renamed with the rest."""
    final = os.path.join(out_dir, checkpoint_name(step))
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


def load_model(source: str, device="cpu") -> tuple[CausalLM, str]:
    """The one way every script gets a model: (model in eval mode, tokenizer spec).

    source: a checkpoint folder, a run folder (its newest checkpoint), a Hugging Face folder of GPT-2 or Qwen3
    layout, or a hub name (gpt2 ... gpt2-xl). A checkpoint's tokenizer is its own; a Hugging Face folder's is the
    kit's tokenizer file in it (export_hf.py puts it there), else GPT-2's, "gpt2".
    """
    arch = hf_arch(source) if os.path.isdir(source) else "gpt2"  # a name is one of OpenAI's GPT-2s
    if arch is None:
        model, tokenizer = _load_ours(find_checkpoint(source))
    else:
        model, tokenizer = load_gpt2(source) if arch == "gpt2" else _load_qwen3(source), "gpt2"
        if os.path.isfile(os.path.join(source, RANKS)):  # an export of ours keeps its own tokenizer
            tokenizer = os.path.join(source, RANKS)
    return model.to(device).eval(), tokenizer


def add_model_args(parser: argparse.ArgumentParser, dtype_help: str):
    """The flags that name a model and where it runs, the same for every script that reads one."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="out",
                        help="a checkpoint, or a run folder to take its newest checkpoint from (default: %(default)s)")
    source.add_argument("--init-from", metavar="NAME_OR_DIR",
                        help="a Hugging Face folder instead (GPT-2 or Qwen3 layout), or OpenAI's GPT-2 by hub name "
                             "(gpt2 ... gpt2-xl, with or without openai-community/; downloaded once)")
    parser.add_argument("--tokenizer", help="gpt2 or a .tiktoken file (default: the one the model names)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=dtype_help)


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


def load_train_state(ckpt: str, mmap: bool = True) -> dict:
    """Optimizer, step, data position and RNG of a checkpoint; tensors and plain types only, never code. mmap:
    tensors are pages of the file, read as they are used (by a copy to a GPU, say) and shared by the processes
    of a node, so no process holds the whole file in its own memory; else read whole."""
    path = os.path.join(ckpt, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{ckpt} has no state.pt: it holds weights only and cannot be resumed; move it out "
                        f"of the run folder to resume from an earlier checkpoint")
    except Exception as e:  # an unpickling error here means a corrupt or hostile file; either way, refuse it
        raise UserError(f"refusing {path}: {first_line(e)}")


def read_checkpoint_meta(ckpt: str) -> dict:
    """config.json of a checkpoint: its model config (as a GPTConfig), tokenizer, step and run id."""
    path, meta = read_config(ckpt, "the checkpoint is incomplete or corrupt")
    try:
        meta["model"] = GPTConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: no model config ({e!r}); the checkpoint is incomplete or corrupt")
    return meta


def read_config(folder: str, hint: str) -> tuple[str, dict]:
    """(path, contents) of folder/config.json, ours or a Hugging Face one; unreadable, one line ending in hint."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return path, json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}; {hint}")


def _load_ours(ckpt: str) -> tuple[GPT, str]:
    meta = read_checkpoint_meta(ckpt)
    model = build_model(meta["model"])
    load_weights(model, ckpt)
    tokenizer = meta["tokenizer"]
    if tokenizer in (RANKS, "tokenizer.tiktoken"):
        tokenizer = os.path.join(ckpt, tokenizer)
    return model, tokenizer


def load_weights(model, ckpt: str):
    """ckpt's weights into model (on any device), one tensor at a time: a resuming rank holds no second copy of
    the model in host memory."""
    path = os.path.join(ckpt, "model.safetensors")
    own = model.state_dict()
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key not in own or tuple(own[key].shape) != shape:
                    raise UserError(f"{path}: weight {key} {shape} does not fit the model in config.json; the "
                                    f"checkpoint is corrupt, use another one")
            missing = set(own) - set(f.keys()) - ({HEAD} if model.config.tie_embeddings else set())
            if missing:
                raise UserError(f"{path} lacks weights {', '.join(sorted(missing)[:3])}: the checkpoint is incomplete")
            with torch.no_grad():
                for key in f.keys():
                    own[key].copy_(f.get_tensor(key))
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error types for a corrupt header or body
        raise UserError(f"cannot read {path}: {e}; the file is corrupt, use another checkpoint")


def save_optimizer_shards(model, optimizer, folder: str):
    """Every rank writes its shard of the optimizer state into folder/optimizer: a collective."""
    import torch.distributed.checkpoint as dcp  # only sharded runs: a second to import (distributed.py)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
               checkpoint_id=os.path.join(folder, OPTIMIZER_DIR))


def has_optimizer_shards(ckpt: str) -> bool:
    return os.path.isdir(os.path.join(ckpt, OPTIMIZER_DIR))


def load_optimizer_shards(model, optimizer, ckpt: str):
    """The optimizer state of ckpt, resharded for this run's ranks (or whole, for an unsharded model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to fill, this run's shards
    dcp.load(state, checkpoint_id=os.path.join(ckpt, OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


# ---- Hugging Face folders: GPT-2 (OpenAI's, by hub name or folder) and Qwen3

def hf_arch(path: str) -> Optional[str]:
    """"gpt2" or "qwen3" for a Hugging Face model folder of that layout, None for anything else (ours among them)."""
    try:
        _, config = read_config(path, "")
    except UserError:
        return None
    if "n_layer" in config:  # HF GPT-2 keeps fields at the top; ours nest them under "model"
        return "gpt2"
    return "qwen3" if config.get("model_type") == "qwen3" else None


def load_gpt2(name_or_dir: str) -> GPT:
    """OpenAI's GPT-2 from a Hugging Face folder, or by hub name (gpt2 ... gpt2-xl; downloaded once, then cached)."""
    folder = name_or_dir if os.path.isdir(name_or_dir) else _download(name_or_dir)
    path, hf = read_config(folder, "not a Hugging Face GPT-2 folder")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation {hf['activation_function']} is not GPT-2's tanh GELU")
    try:
        cfg = GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                        vocab_size=hf["vocab_size"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True)
    except (KeyError, TypeError) as e:
        raise UserError(f"cannot read a GPT-2 config from {path}: {e!r}")
    weights = {}
    for key, tensor in hf_state_dict(folder).items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key  # older: bare keys
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == HEAD:
            continue  # causal-mask buffers of older folders; the head is tied to wte
        weights[key] = tensor.t() if key.endswith(HF_CONV1D) else tensor
    model = GPT(cfg)
    copy_weights(weights, model, folder)
    return model


def _download(name: str) -> str:
    names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    name = name.removeprefix("openai-community/")  # today's canonical hub name; the short names still resolve
    if name not in names:
        raise UserError(f"{name!r} is neither a folder nor one of {', '.join(names)}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:  # offline, proxy, HTTP status: the hub raises many kinds; the fix is the same
        raise UserError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); go online once "
                        f"(it is then cached) or pass a local Hugging Face folder")


def _load_qwen3(folder: str) -> CausalLM:
    """A Qwen3ForCausalLM folder as --arch modern, whose modules carry Qwen3's names: the weights map one to one."""
    path, hf = read_config(folder, "not a Hugging Face Qwen3 folder")
    try:
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}  # transformers 5, 4.x
        cfg = GPTConfig(arch="modern", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                        n_embd=hf["hidden_size"], vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope["rope_theta"],
                        tie_embeddings=hf.get("tie_word_embeddings", False))
        # What --arch modern fixes, where Qwen3 lets a config choose.
        fixed = {"num_key_value_heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu",
                 "intermediate_size": cfg.swiglu_hidden_size, "attention_bias": False, "rope_scaling": None,
                 "use_sliding_window": False}
        unfit = [f"{key} {hf[key]} (not {want})" for key, want in fixed.items() if hf.get(key, want) != want]
    except (KeyError, TypeError) as e:
        raise UserError(f"cannot read a Qwen3 config from {path}: {e!r}")
    if unfit or rope.get("rope_type", "default") != "default":
        raise UserError(f"{path}: {', '.join(unfit) or 'rope scaling'}: --arch modern has one key-value head per "
                        f"query head, SwiGLU at its own width and plain rotary positions, so this Qwen3 does not fit")
    model = build_model(cfg)
    copy_weights(hf_state_dict(folder), model, folder)
    return model




def hf_state_dict(folder: str) -> dict:
    """The weights of a Hugging Face folder (safetensors, or a .bin read without unpickling code)."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.exists(st):
            from safetensors.torch import load_file

            return load_file(st)
        if os.path.exists(pt):
            return torch.load(pt, map_location="cpu", weights_only=True)  # never full pickle
    except Exception as e:  # corrupt files raise many kinds of errors; all mean the same to the user
        raise UserError(f"cannot load weights from {folder}: {e}")
    raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# Tables indexed by token or position: a padded vocabulary, a position table cropped to a shorter block.
ROW_TABLES = ("transformer.wte.weight", "transformer.wpe.weight", "model.embed_tokens.weight", HEAD)


def copy_weights(weights: dict, model: CausalLM, source: str) -> None:
    """weights into model, key by key and shape by shape, except that only the leading rows of the ROW_TABLES are
    copied (the real vocabulary of a padded table, or the first block_size positions)."""
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in weights.items():
            target = own.pop(key, None)
            if target is not None and key in ROW_TABLES:
                rows = min(len(target), len(tensor))
                target, tensor = target[:rows], tensor[:rows]
            if target is None or target.shape != tensor.shape:
                raise UserError(f"{source}: weight {key} of shape {tuple(tensor.shape)} does not fit the model its "
                                f"config.json describes; the folder is corrupt or of another architecture")
            target.copy_(tensor)
    missing = sorted(set(own) - ({HEAD} if model.config.tie_embeddings else set()))
    if missing:
        raise UserError(f"{source} lacks weights {', '.join(missing[:3])}: it is incomplete")


def _os_reason(e: BaseException) -> str:
    """The OS's reason (e.g. No space left on device), found where torch wrapped it, else e's first line."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    return first_line(e)
