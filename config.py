"""Configuration: the recipe (GPTConfig + TrainConfig: what is trained, saved with every checkpoint), the run
options (RunOptions: how this invocation treats the run folder, never saved), named presets, overrides from
files and the command line, and resolve(): every default that depends on something else, decided in one place.

Precedence, lowest first: dataclass defaults < preset or JSON file named by --config < command-line flags.
Every field is a flag; `--n-layer 6` and `--n_layer=6` are the same.
"""
import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Optional

from errors import UserError


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length, the size of the position table
    vocab_size: int = 50257  # real vocabulary; the embedding is padded, the logits are not
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    pad_vocab_multiple: int = 64  # pad the embedding rows to a multiple of this for faster matmuls; 1 = no padding
    layer_norm_eps: float = 1e-5
    arch: str = "gpt2"  # gpt2 | modern (rotary, RMSNorm, SwiGLU, QK-norm, as Qwen3 lays them out)
    rope_theta: float = 10000.0  # modern only
    norm_eps: float = 1e-6  # modern only: RMSNorm epsilon (Qwen3's default)
    tie_embeddings: bool = True  # the head is the embedding, as GPT-2; false (modern only) gives it its own matrix
    doc_mask: bool = False  # attention never crosses <|endoftext|> in a packed window; positions restart there
    eot_token: Optional[int] = None  # the data's <|endoftext|> id; train.py takes it from meta.json for --doc-mask

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def swiglu_hidden_size(self) -> int:
        """modern's MLP width: 8/3 n_embd keeps SwiGLU's three matrices at the parameters of GPT-2's two (4x)
        ones; rounded up to a multiple of 128."""
        return (8 * self.n_embd // 3 + 127) // 128 * 128


@dataclass
class TrainConfig:
    data_dir: str = "data/fineweb-edu"  # shards and meta.json written by prepare_data.py; A,B mixes several folders
    data_weights: Optional[str] = None  # with several --data-dir folders: their weights, e.g. 3,1; default equal
    init_from: Optional[str] = None  # start from trained weights: gpt2 ... gpt2-xl, an HF folder, a run (finetune.py)
    out_dir: str = "out"  # checkpoints, log.jsonl, loss.png
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # autocast: auto (bfloat16 where native, float16 on older CUDA GPUs), float32, bfloat16, float16
    compile: Optional[bool] = None  # torch.compile; default (resolve) on for CUDA, off elsewhere
    parallel: str = "ddp"  # under torchrun: ddp (a full copy per rank), fsdp (parameters and AdamW states sharded)
    # or hsdp (sharded within a node, replicated across nodes; see --replicate-degree)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    seed: int = 1337
    batch_size: int = 64  # micro batch, sequences per forward per process
    total_batch_size: int = 524288  # tokens per optimizer step, over all processes and micro steps
    max_steps: int = 19073  # one epoch of fineweb-edu 10B at 524,288 tokens per step
    learning_rate: float = 6e-4
    min_lr: Optional[float] = None  # where the decay ends; default (resolve) 10% of learning_rate
    warmup_steps: int = 715
    lr_schedule: str = "cosine"  # cosine (GPT-2, nanoGPT) or wsd: warmup, stable, then a linear decay at the end
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays; a run extends from before that
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW (above) for everything else
    muon_lr: Optional[float] = None  # Muon's peak learning rate; default (resolve) learning_rate
    muon_momentum: float = 0.95
    log_interval: int = 10
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; default: a known GPU's datasheet, measured on a
    # CPU; none (no MFU logged) on a GPU that hardware.GPU_PEAK_BF16 does not name
    eval_interval: int = 250
    eval_steps: int = 20  # validation batches per evaluation (per process)
    hellaswag_interval: int = 250  # 0 turns it off
    hellaswag_limit: int = 0  # examples per evaluation; 0 = all 10,042
    hellaswag_data: Optional[str] = None  # local .jsonl(.gz); default: download once and cache
    sample_interval: int = 250  # 0 turns sampling off
    sample_prompt: str = "Once upon a time"
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2
    shuffle: Optional[bool] = None  # a seeded order of all block-sized windows each epoch; default (resolve): meta.json's
    wandb: bool = False
    wandb_project: str = "gpt-pretrain"
    wandb_run_name: Optional[str] = None


@dataclass
class RunOptions:
    """How this invocation treats the run folder and the cluster: not part of the recipe, never saved."""
    resume: bool = False  # continue from the newest checkpoint in out_dir
    resume_step: Optional[int] = None  # with --resume: from this step's checkpoint; later ones are moved aside
    overwrite: bool = False  # a fresh run into a folder holding an older run deletes that run's checkpoints and log
    allow_lr_change: bool = False  # resume although the new schedule moves the learning rate at the resume step
    dist_timeout: float = 30.0  # minutes a collective waits for the slowest rank (a checkpoint write, say)
    replicate_degree: Optional[int] = None  # --parallel hsdp: model replicas, each sharded over world / replicas
    # ranks; default one per node (torchrun's LOCAL_WORLD_SIZE ranks)


def resolve(model_cfg: GPTConfig, cfg: TrainConfig, explicit: set, data_meta: dict,
            device_type: str) -> tuple[GPTConfig, TrainConfig]:
    """Every default that depends on something else, decided once before step 1: the vocabulary is the data's
    (a preset's yields; an explicit --vocab-size must agree), so is --doc-mask's <|endoftext|> (an error if meta.json
    names none), shuffle is what meta.json asks for, compile is on for CUDA, and the schedule's and Muon's learning
    rates (fill_schedule_defaults)."""
    if "vocab_size" in explicit and model_cfg.vocab_size != data_meta["vocab_size"]:
        raise UserError(f"--vocab-size {model_cfg.vocab_size} disagrees with the data's tokenizer "
                        f"({data_meta['vocab_size']} tokens, {cfg.data_dir}/meta.json); drop the flag or prepare the "
                        f"data with the tokenizer you mean")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data_meta["vocab_size"])
    if model_cfg.doc_mask:
        if "eot" not in data_meta:
            raise UserError(f"--doc-mask splits windows at <|endoftext|>, but {cfg.data_dir}/meta.json names no "
                            f"\"eot\" token; prepare the data again with prepare_data.py")
        if "eot_token" in explicit and model_cfg.eot_token != data_meta["eot"]:
            raise UserError(f"--eot-token {model_cfg.eot_token} disagrees with the data's <|endoftext|> "
                            f"({data_meta['eot']}, {cfg.data_dir}/meta.json); drop the flag")
        model_cfg = dataclasses.replace(model_cfg, eot_token=data_meta["eot"])
    cfg = dataclasses.replace(
        fill_schedule_defaults(cfg),
        shuffle=bool(data_meta.get("shuffle", False)) if cfg.shuffle is None else cfg.shuffle,
        compile=device_type == "cuda" if cfg.compile is None else cfg.compile)
    return model_cfg, cfg


def fill_schedule_defaults(cfg: TrainConfig) -> TrainConfig:
    """min_lr 10% of learning_rate, muon_lr equal to it: also applied to a checkpoint's saved recipe, so a resume
    compares like with like."""
    return dataclasses.replace(cfg, min_lr=cfg.learning_rate * 0.1 if cfg.min_lr is None else cfg.min_lr,
                               muon_lr=cfg.learning_rate if cfg.muon_lr is None else cfg.muon_lr)


def count_params(cfg: GPTConfig, include_embeddings: bool = True) -> int:
    """Parameters as published: real vocabulary (no padding), tied head counted once; without the tables that are
    looked up, not multiplied (positions; an untied input embedding) when include_embeddings is False (the count
    that scales FLOPs)."""
    C = cfg.n_embd
    if cfg.arch == "modern":  # no position table; q/k norms per head
        per_layer = 2 * C + 2 * (C // cfg.n_head) + 4 * C * C + 3 * C * cfg.swiglu_hidden_size
        n = cfg.vocab_size * C + cfg.n_layer * per_layer + C
        return n + cfg.vocab_size * C if include_embeddings and not cfg.tie_embeddings else n
    ln = 2 * C if cfg.bias else C
    per_layer = 2 * ln + 12 * C * C + ((3 + 1 + 4 + 1) * C if cfg.bias else 0)
    n = cfg.vocab_size * C + cfg.n_layer * per_layer + ln
    return n + cfg.block_size * C if include_embeddings else n



# Each preset sets model fields and, where the preset implies a kind of run, training fields.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    # GPT-1's shape (Radford et al. 2018) with GPT-2's pre-LayerNorm blocks; 40,478 BPE tokens.
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478),
    "toygpt-small": dict(n_layer=12, n_head=8, n_embd=768, block_size=512),
    "toygpt-medium": dict(n_layer=16, n_head=8, n_embd=1024, block_size=512),
    "toygpt-large": dict(n_layer=24, n_head=16, n_embd=2048, block_size=512),
    # GPT-2's four sizes in the modern architecture: same width and depth, parameters within 5% (no position table,
    # SwiGLU at 8/3 width).
    **{f"modern-{size}": dict(PRESET_SHAPES, arch="modern") for size, PRESET_SHAPES in (
        ("124m", dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)),
        ("350m", dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)),
        ("774m", dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024)),
        ("1558m", dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024)))},
    # The CPU demo: the built-in tinytales corpus with its own tokenizer (4,096 asked for; its BPE stops at 2,290
    # tokens, which meta.json then says), minutes on a laptop.
    "tiny": dict(
        n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096,
        data_dir="data/tinytales", out_dir="out/tiny", batch_size=16, total_batch_size=16 * 256,
        max_steps=250, learning_rate=2e-3, warmup_steps=25, eval_interval=50, eval_steps=10,
        hellaswag_interval=0, sample_interval=125, checkpoint_interval=50, log_interval=25,
    ),
}

CONFIG_CLASSES = (GPTConfig, TrainConfig, RunOptions)
_FIELDS = {f.name: (cls, f) for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}


def _base_type(annotation):
    """int for int, float for Optional[float], ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _check_keys(overrides: dict, where: str):
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(_FIELDS)}")


def load_preset(name_or_file: str) -> dict:
    """The overrides of a named preset or of a JSON file of {field: value}."""
    if name_or_file in PRESETS:
        return dict(PRESETS[name_or_file])
    if not os.path.isfile(name_or_file):
        raise UserError(f"--config {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        with open(name_or_file) as f:
            overrides = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read config file {name_or_file}: {e}; it must be a JSON object of field: value")
    if not isinstance(overrides, dict):
        raise UserError(f"config file {name_or_file} must hold a JSON object of field: value")
    _check_keys(overrides, name_or_file)
    return overrides


def make_configs(overrides: dict) -> tuple[GPTConfig, TrainConfig, RunOptions]:
    """Split flat {field: value} overrides into the three dataclasses, checking names and types."""
    _check_keys(overrides, "overrides")
    parts = {cls: {} for cls in CONFIG_CLASSES}
    for key, value in overrides.items():
        cls, field = _FIELDS[key]
        typ = _base_type(field.type)
        if value is not None and typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is a subclass of int, so JSON true would otherwise pass as n_layer=1.
        if value is not None and (not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool)):
            raise UserError(f"config key {key} must be {typ.__name__}, got {value!r}")
        parts[cls][key] = value
    return tuple(cls(**parts[cls]) for cls in CONFIG_CLASSES)


def check_values(model_cfg: GPTConfig, train_cfg: TrainConfig):
    """Values no training run can use: one clear line, not a ZeroDivisionError or an assert deep in the model."""
    for cfg, names in ((model_cfg, ("block_size", "vocab_size", "n_head", "n_embd")),
                       (train_cfg, ("batch_size", "total_batch_size", "eval_steps"))):
        for name in names:
            if getattr(cfg, name) < 1:
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(cfg, name)}")
    if model_cfg.n_embd % model_cfg.n_head:
        raise UserError(f"n_embd {model_cfg.n_embd} is not a multiple of n_head {model_cfg.n_head}: each head "
                        f"gets n_embd / n_head channels; change one of them")
    if model_cfg.arch not in ("gpt2", "modern"):
        raise UserError(f"arch must be gpt2 or modern, got {model_cfg.arch!r}")
    if not 0 <= model_cfg.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {model_cfg.dropout}")
    if not model_cfg.tie_embeddings and model_cfg.arch == "gpt2":
        raise UserError("--no-tie-embeddings is for --arch modern; GPT-2's head is its embedding")
    if train_cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer must be adamw or muon, got {train_cfg.optimizer!r}")
    if train_cfg.parallel not in ("ddp", "fsdp", "hsdp"):
        raise UserError(f"parallel must be ddp, fsdp or hsdp, got {train_cfg.parallel!r}")
    if train_cfg.optimizer == "muon" and train_cfg.parallel == "hsdp":  # muon.py gathers over one mesh dimension
        raise UserError("--optimizer muon runs under --parallel ddp or fsdp, not yet hsdp; use fsdp (sharded over "
                        "every rank) or adamw")
    if train_cfg.lr_schedule not in ("cosine", "wsd"):
        raise UserError(f"lr_schedule must be cosine or wsd, got {train_cfg.lr_schedule!r}")
    if not 0 <= train_cfg.decay_fraction <= 1:
        raise UserError(f"decay_fraction must be in [0, 1], got {train_cfg.decay_fraction}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser):
    """Add --config and one flag per config field (dashes or underscores) to parser."""
    parser.add_argument("--config", default=None, help=f"a preset ({', '.join(PRESETS)}) or a JSON file of field: value")
    for cls in CONFIG_CLASSES:
        group = parser.add_argument_group(f"{cls.__name__} fields")
        for f in dataclasses.fields(cls):
            flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            typ = _base_type(f.type)
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"default: {f.default}")
            if typ is bool:
                # --resume, --no-resume and --resume=false all work.
                group.add_argument(*flags, nargs="?", const=True, type=_parse_bool, **kwargs)
                group.add_argument(*[fl.replace("--", "--no-", 1) for fl in flags], dest=f.name,
                                   action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                group.add_argument(*flags, type=typ, metavar=typ.__name__.upper(), **kwargs)


def parse_configs(parser: argparse.ArgumentParser, argv=None):
    """Parse argv into (GPTConfig, TrainConfig, RunOptions, args); unknown options are one clear error.
    args.explicit names the fields the user set by a flag or a JSON file (a named preset's values are defaults,
    not requests)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown option(s) {' '.join(unknown)}; see --help for the valid ones")
    overrides = load_preset(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in _FIELDS}
    args.explicit = set(flags) | (set(overrides) if args.config and args.config not in PRESETS else set())
    overrides.update(flags)
    return (*make_configs(overrides), args)


def main():
    """List the presets with their parameter counts."""
    argparse.ArgumentParser(description="List the model presets and their parameter counts.").parse_args()
    print(f"{'preset':<14} {'layers':>6} {'heads':>5} {'n_embd':>6} {'block':>5} {'vocab':>6} {'params':>9}")
    for name, preset in PRESETS.items():
        cfg = make_configs({k: v for k, v in preset.items() if k in GPTConfig.__dataclass_fields__})[0]
        n = count_params(cfg)
        print(f"{name:<14} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>6} {cfg.block_size:>5} "
              f"{cfg.vocab_size:>6} {n / 1e6:>8.1f}M")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
