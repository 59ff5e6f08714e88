"""Start a run from trained weights (--init-from): OpenAI's GPT-2 by name (gpt2 ... gpt2-xl), a Hugging Face
folder of GPT-2 or Qwen3 layout, or a checkpoint or run folder of this kit. Fine-tuning, or continued
pre-training on other data.

The source gives the architecture and the tokenizer; everything else is a fresh run: step 0, its own schedule,
optimizer and data. All of it is settled before step 1: the source is loaded once, a flag that contradicts its
shape or data of another tokenizer is refused in one line, and a --block-size below its positions crops them (as
nanoGPT's crop_block_size). The recipe records init_from; a resume takes its weights from its checkpoint and
never reads the source again.
"""
import dataclasses
import os
from typing import Optional

import checkpoint
from config import GPTConfig, TrainConfig
from errors import UserError
from model import CausalLM
from tokenizer import GPT2_EOT, same_tokenizer

# Model fields a flag may set for the new run: how the weights are trained (dropout, document masking) or laid out
# in memory (padding), not what they are; unset, they are the source's. block_size may shrink; the rest is the
# source's.
FREE = ("dropout", "pad_vocab_multiple", "doc_mask", "eot_token")


def initial_model(model_cfg: GPTConfig, cfg: TrainConfig, explicit: set, meta: dict, start: Optional[str],
                  state: Optional[dict], announce: bool) -> tuple[GPTConfig, TrainConfig, Optional[CausalLM]]:
    """(model config, recipe, source model or None) of a run that starts at checkpoint `start` with its train
    state (None: a fresh run). The source model is returned only for a fresh run with --init-from: run.py copies it
    into the model it trains. A resume of a run that began from weights takes its architecture from its checkpoint
    (the flags need not repeat it); the recipe keeps the source's name."""
    if start:
        return (*continued(start, state, model_cfg, cfg, explicit, announce), None)
    if not cfg.init_from:
        return model_cfg, cfg, None
    source, tokenizer = load_source(cfg.init_from)
    if tokenizer == "gpt2" and source.config.vocab_size != GPT2_EOT + 1 and checkpoint.hf_arch(cfg.init_from):
        # A transformers folder of another vocabulary and no tokenizer file of ours: its tokenizer is unknown here,
        # so the data's is taken on trust (its size is still checked).
        tokenizer = meta["tokenizer"]
        if announce:
            print(f"note: --init-from {cfg.init_from} has {source.config.vocab_size} tokens and no kit_tokenizer file: "
                  f"assuming it was trained with the data's tokenizer, {os.path.basename(tokenizer)}", flush=True)
    check_data(source.config, tokenizer, meta, cfg)
    return fitted_config(source.config, model_cfg, explicit, cfg.init_from), cfg, source


def continued(ckpt: str, state: dict, model_cfg: GPTConfig, cfg: TrainConfig, explicit: set,
              announce: bool) -> tuple[GPTConfig, TrainConfig]:
    saved = state["train_config"].get("init_from")
    if cfg.init_from and cfg.init_from != saved:
        raise UserError(f"--init-from {cfg.init_from} with --resume: {ckpt} continues a run that began from "
                        f"{saved or 'random weights'}, and a resume's weights are its checkpoint's; drop --init-from "
                        f"to resume it, or start from {cfg.init_from} in a new --out-dir")
    if saved is None:
        return model_cfg, cfg
    if announce and cfg.init_from:
        print(f"--init-from {saved}: not read again, the checkpoint wins: resuming {ckpt}", flush=True)
    flags = {k: getattr(model_cfg, k) for k in explicit if k in GPTConfig.__dataclass_fields__}
    return (dataclasses.replace(checkpoint.read_checkpoint_meta(ckpt)["model"], **flags),
            dataclasses.replace(cfg, init_from=saved))


def load_source(name: str) -> tuple[CausalLM, str]:
    """(model, tokenizer spec) of --init-from; a name other than OpenAI's four is refused before any download
    (checkpoint._download)."""
    if os.path.isdir(name) and checkpoint.hf_arch(name) is None:
        try:
            checkpoint.find_checkpoint(name, flag="--init-from")
        except UserError as e:
            raise UserError(f"--init-from {name} is neither a Hugging Face model folder (config.json of GPT-2 or "
                            f"Qwen3) nor a checkpoint or run folder of this kit: {e}") from None
    return checkpoint.load_model(name)


def check_data(source: GPTConfig, tokenizer: str, meta: dict, cfg: TrainConfig):
    """The data must be tokenized as the source was: the same tokenizer (by name or file content), the same
    vocabulary."""
    if not same_tokenizer(meta["tokenizer"], tokenizer) or meta["vocab_size"] != source.vocab_size:
        theirs, ours = (os.path.basename(t) for t in (tokenizer, meta["tokenizer"]))
        raise UserError(f"--init-from {cfg.init_from} reads tokenizer {theirs} ({source.vocab_size} tokens), but "
                        f"{cfg.data_dir} was prepared with {ours} ({meta['vocab_size']} tokens); prepare the data "
                        f"with the source's tokenizer (prepare_data.py --tokenizer "
                        f"{'gpt2' if tokenizer == 'gpt2' else tokenizer})")


def fitted_config(source: GPTConfig, model_cfg: GPTConfig, explicit: set, name: str) -> GPTConfig:
    """The source's architecture, with the FREE fields set by flags and a block_size at most the source's."""
    for field in dataclasses.fields(GPTConfig):
        k = field.name
        if k in explicit and k not in FREE and k != "block_size" and getattr(model_cfg, k) != getattr(source, k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(model_cfg, k)} conflicts with --init-from {name}, "
                            f"whose {k} is {getattr(source, k)}; the architecture comes from the source: drop the "
                            f"flag")
    block_size = source.block_size
    if "block_size" in explicit:
        if model_cfg.block_size > source.block_size:
            raise UserError(f"--block-size {model_cfg.block_size} is longer than the {source.block_size} positions "
                            f"of --init-from {name}; use at most {source.block_size} (a shorter one crops them)")
        block_size = model_cfg.block_size
    return dataclasses.replace(source, block_size=block_size,
                               **{k: getattr(model_cfg, k) for k in FREE if k in explicit})
