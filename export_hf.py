"""Export a checkpoint as a self-contained Hugging Face folder: AutoModelForCausalLM, AutoTokenizer and
pipeline("text-generation") open it offline, and lm-eval scores it.

    python export_hf.py out/my-run hf/my-model        # a run folder exports its newest checkpoint

A GPT-2 checkpoint becomes a GPT2LMHeadModel, a --arch modern one a Qwen3ForCausalLM. Our modules already carry
their names; the differences are that HF's GPT-2 stores the four projection matrices as Conv1D, (in, out), and
that HF's embedding (and an untied head) has exactly the real vocabulary (ours is padded).
"""
import argparse
import dataclasses
import json
import os
import sys

from safetensors.torch import save_file

import checkpoint
from atomic import atomic_write
from config import TrainConfig
from errors import UserError, first_line, run_main
from model import GPT
from log import LOG, read_log
from tokenizer import EOT, load_tokenizer

LM_EVAL_TASKS = "hellaswag,arc_easy,piqa,winogrande,lambada_openai"
GPT2_EOT = 50256  # <|endoftext|> of tiktoken's gpt2, known without downloading the tokenizer


def hf_config(model: GPT, eot: int) -> dict:
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "activation_function": "gelu_new",  # GPT-2's tanh approximation, as our MLP
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
    }


def hf_weights(model: GPT, embedding: str, transposed: tuple = ()) -> dict:
    """Our weights for transformers: the real vocabulary's rows of the embedding and of an untied head, a tied
    head left out (transformers ties it back), the matrices named in `transposed` as (in, out)."""
    tied, vocab = model.config.tie_embeddings, model.config.vocab_size
    weights = {}
    for key, tensor in model.state_dict().items():
        if key == checkpoint.HEAD and tied:
            continue
        if key.endswith(transposed):
            tensor = tensor.t()
        if key in (embedding, checkpoint.HEAD):
            tensor = tensor[:vocab]
        weights[key] = tensor.detach().float().cpu().contiguous()
    return weights


def gpt2_files(model: GPT, ckpt: str, eot: int) -> tuple[dict, dict]:
    """config.json and weights of a GPT2LMHeadModel."""
    if not model.config.bias:
        raise UserError(f"{ckpt} was trained with bias=False; GPT2LMHeadModel always has biases, "
                        f"so it cannot be exported as GPT-2")
    return hf_config(model, eot), hf_weights(model, "transformer.wte.weight", checkpoint.HF_CONV1D)


def qwen3_files(model: GPT, ckpt: str, eot: int) -> tuple[dict, dict]:
    """config.json and weights of a Qwen3ForCausalLM, with as many key-value heads as query heads."""
    cfg = model.config
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.swiglu_hidden_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta: both, so either opens the folder.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "use_sliding_window": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }
    return config, hf_weights(model, "model.embed_tokens.weight")


# One function per architecture the kit trains, (model, checkpoint, eot) -> (config.json, weights); the
# tokenizer, generation config and model card are the same for all.
ARCHITECTURES = {"gpt2": gpt2_files, "modern": qwen3_files}


def push_to_hub(folder: str, repo: str) -> str:
    """Upload folder to the hub repository repo (created if need be); returns its address."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install huggingface_hub")
    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, commit_message="Upload from gpt-pretrain export_hf.py")
    except Exception as e:  # network, authentication and naming errors all come from here
        raise UserError(f"cannot push {folder} to the hub repository {repo}: {first_line(e)}; the export "
                        f"itself is complete. Check the name and your login (hf auth login or HF_TOKEN)")
    return str(url)


def write_hf_tokenizer(enc, folder: str, max_len: int) -> None:
    """A fast-tokenizer tokenizer.json (+ its config files) equal to the tiktoken encoding enc, via the
    converter transformers ships for tiktoken files, so AutoTokenizer needs nothing from the hub."""
    try:
        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise UserError("exporting a tokenizer needs transformers 4.45 or later: pip install 'transformers>=4.45'")

    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    n_ranks = enc.n_vocab - len(specials)
    # The converter numbers added specials right after the ranks; ours must sit there too to keep their ids.
    if [i for _, i in specials] != list(range(n_ranks, enc.n_vocab)):
        raise UserError(f"tokenizer {enc.name}: special token ids {dict(specials)} do not follow its {n_ranks} "
                        f"ranks without gaps, which a Hugging Face tokenizer.json cannot express")
    converter = TikTokenConverter(pattern=enc._pat_str)
    ranks = enc._mergeable_ranks
    converter.load_tiktoken_bpe = lambda _: ranks  # ours, not re-read (tiktoken's reader caches by path)
    converted = converter.converted()
    # Added here, not through the converter, whose keyword for them changed name between transformers 4 and 5.
    converted.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, model_max_length=max_len,
                                   clean_up_tokenization_spaces=False)  # decode must give back the text as is
    fast.save_pretrained(folder)
    # transformers 5 no longer writes this file; older transformers and other tools still look for it.
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, f, indent=2)


def run_facts(ckpt: str) -> dict:
    """What the model card reports about training, from the checkpoint's state.pt and its run's log.jsonl;
    a fact that is missing (a weights-only checkpoint, no log) is simply left out."""
    facts = {"step": checkpoint.read_checkpoint_meta(ckpt)["step"]}
    if os.path.isfile(os.path.join(ckpt, "state.pt")):
        train_cfg = checkpoint.load_train_state(ckpt).get("train_config", {})
        facts["train_config"] = train_cfg
        if "total_batch_size" in train_cfg:
            facts["tokens"] = facts["step"] * train_cfg["total_batch_size"]
    log = os.path.join(os.path.dirname(os.path.abspath(ckpt)), LOG)
    if os.path.isfile(log):
        for record in read_log(log):  # the last value at or before the exported step
            if record.get("step", 0) <= facts["step"]:
                for key in ("val_loss", "hellaswag_acc_norm"):
                    if key in record:
                        facts[key] = (record[key], record["step"])
    return facts


def train_command(train_cfg: dict) -> str:
    defaults = dataclasses.asdict(TrainConfig())
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in train_cfg.items() if k in defaults and v != defaults[k]]
    return " ".join(["python train.py", *flags])


def lm_eval_command(out_dir: str) -> str:
    return f"lm_eval --model hf --model_args pretrained={out_dir} --tasks {LM_EVAL_TASKS} --batch_size 8"


def model_card(model: GPT, ckpt: str, out_dir: str, tokenizer: str, n_params: int) -> str:
    cfg, facts = model.config, run_facts(ckpt)
    tokens = f"{facts['tokens']:,}" if "tokens" in facts else "unknown (the checkpoint holds no training state)"
    train_cfg = facts.get("train_config", {})

    def logged(key, fmt):
        if key not in facts:
            return "not logged"
        value, step = facts[key]
        return f"{value:{fmt}} (step {step})"

    shape = f"{cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.block_size}"
    arch = f"GPT-2 (`GPT2LMHeadModel`): {shape}" if cfg.arch == "gpt2" else \
        f"rotary, RMSNorm, SwiGLU, QK-norm, no biases, {'tied' if cfg.tie_embeddings else 'untied'} head, laid " \
        f"out as Qwen3 (`Qwen3ForCausalLM`): {shape}"
    tok_name = "GPT-2's BPE" if tokenizer == "gpt2" else f"byte-level BPE (tiktoken ranks in {checkpoint.RANKS})"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# {os.path.basename(os.path.abspath(out_dir))}

A language model pre-trained from scratch with this kit, exported from `{ckpt}`.

| | |
|---|---|
| architecture | {arch} |
| parameters | {n_params:,} |
| vocabulary | {cfg.vocab_size} tokens, {tok_name} |
| steps | {facts['step']:,} |
| tokens seen | {tokens} |
| data | {train_cfg.get('data_dir', 'unknown')} |
| final validation loss | {logged('val_loss', '.4f')} |
| HellaSwag acc_norm | {logged('hellaswag_acc_norm', '.4f')} |

Made with `{train_command(train_cfg) if train_cfg else 'train.py (flags unknown)'}`, then
`python export_hf.py {ckpt} {out_dir}`.

## Use

```python
from transformers import pipeline
pipe = pipeline("text-generation", model="{out_dir}")
print(pipe("Once upon a time", max_new_tokens=40, do_sample=False)[0]["generated_text"])
```

## Evaluation

```
{lm_eval_command(out_dir)}
```

## Intended use and limits

For research and teaching on language-model pre-training. It is a small base model: it continues text, it does
not follow instructions, and it is often wrong. It has no safety tuning and reproduces the biases of its
training data. Not for any use where its output is relied on.
"""


def export(source: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the newest checkpoint under source (or source itself) to out_dir; returns the checkpoint exported."""
    ckpt = checkpoint.find_checkpoint(source)
    model, tokenizer = checkpoint.load_model(ckpt, "cpu")
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists; choose a new folder or pass --overwrite to replace it")
    eot = GPT2_EOT if tokenizer == "gpt2" else load_tokenizer(tokenizer).eot_token
    config, weights = ARCHITECTURES[model.config.arch](model, ckpt, eot)
    try:  # built beside out_dir and renamed at the end: whatever stops it (a full disk, Ctrl-C) leaves no half folder
        with atomic_write(out_dir) as tmp:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, f, indent=2)
            with open(os.path.join(tmp, "README.md"), "w") as f:
                # Counted as exported: the real vocabulary, and a tied head once.
                f.write(model_card(model, ckpt, out_dir, tokenizer, sum(t.numel() for t in weights.values())))
            if tokenizer == "gpt2":
                try:
                    write_hf_tokenizer(load_tokenizer("gpt2"), tmp, model.config.block_size)
                except UserError as e:  # offline and never cached: the model is still usable with the hub's gpt2
                    print(f"warning: no tokenizer files written ({e}); AutoTokenizer 'gpt2' is the same tokenizer",
                          file=sys.stderr)
            else:
                write_hf_tokenizer(load_tokenizer(tokenizer), tmp, model.config.block_size)
                # The kit's own files keep names no Hugging Face tool reads, so --init-from can rebuild it exactly.
                checkpoint.copy_tokenizer(tokenizer, tmp)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}; choose a folder you can write to")
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as a self-contained Hugging Face folder: model, "
                                            "tokenizer, generation config and model card.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder to take its newest checkpoint from")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository "
                                                         "(user/name; needs huggingface_hub and a login)")
    args = p.parse_args(argv)
    ckpt = export(args.checkpoint, args.out_dir, args.overwrite)
    print(f"exported {ckpt} to {args.out_dir}; it opens with transformers' AutoModelForCausalLM and AutoTokenizer.\n"
          f"Standard evaluations (pip install lm_eval accelerate):\n  {lm_eval_command(args.out_dir)}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(args.out_dir, args.push_to_hub)}")


if __name__ == "__main__":
    run_main(main)
