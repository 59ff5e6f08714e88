"""Export a checkpoint as a Hugging Face GPT-2 folder that transformers' GPT2LMHeadModel.from_pretrained opens.

    python export_hf.py out/my-run hf/my-model        # a run folder exports its newest checkpoint

Our modules already carry GPT-2's names; the differences are that HF stores the four projection matrices
as Conv1D, (in, out), and its embedding has exactly the real vocabulary (ours is padded).
"""
import argparse
import json
import os
import shutil
import sys

from safetensors.torch import save_file

import checkpoint
from errors import UserError, run_main
from model import GPT
from tokenizer import EOT, load_tokenizer

GPT2_EOT = 50256  # <|endoftext|> of tiktoken's gpt2, known without downloading the tokenizer
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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


def hf_state_dict(model: GPT) -> dict:
    """Our weights under HF's names and layouts; the head is left out, as HF ties it to wte too."""
    weights = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.endswith(CONV1D):
            tensor = tensor.t()
        if key == "transformer.wte.weight":
            tensor = tensor[:model.config.vocab_size]
        weights[key] = tensor.detach().float().cpu().contiguous()
    return weights


def write_hf_tokenizer(enc, folder: str, max_len: int) -> None:
    """A fast-tokenizer tokenizer.json (+ its config files) equal to the tiktoken encoding enc, via the
    converter transformers ships for tiktoken files, so AutoTokenizer needs nothing from the hub."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    n_ranks = enc.n_vocab - len(specials)
    # The converter numbers added specials right after the ranks; ours must sit there too to keep their ids.
    if [i for _, i in specials] != list(range(n_ranks, enc.n_vocab)):
        raise UserError(f"tokenizer {enc.name}: special token ids {dict(specials)} do not follow its {n_ranks} "
                        f"ranks without gaps, which a Hugging Face tokenizer.json cannot express")
    converter = TikTokenConverter(pattern=enc._pat_str, extra_special_tokens=[t for t, _ in specials])
    ranks = enc._mergeable_ranks
    converter.load_tiktoken_bpe = lambda _: ranks  # ours, not re-read (tiktoken's reader caches by path)
    fast = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, model_max_length=max_len)
    fast.save_pretrained(folder)
    # transformers 5 no longer writes this file; older transformers and other tools still look for it.
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, f, indent=2)


def export(source: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the newest checkpoint under source (or source itself) to out_dir; returns the checkpoint exported."""
    ckpt = checkpoint.find_checkpoint(source)
    model, tokenizer = checkpoint.load_model(ckpt, "cpu")
    if not model.config.bias:
        raise UserError(f"{ckpt} was trained with bias=False; GPT2LMHeadModel always has biases, "
                        f"so it cannot be exported as GPT-2")
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists; choose a new folder or pass --overwrite to replace it")
    eot = GPT2_EOT if tokenizer == "gpt2" else load_tokenizer(tokenizer).eot_token
    # Built beside out_dir under another name and renamed at the end: an interrupted export leaves no half folder.
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model, eot), f, indent=2)
        save_file(hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, f, indent=2)
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
        old = f"{tmp}.old"
        if os.path.exists(out_dir):  # moved aside, and deleted only once the new folder is in place
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}")
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face GPT-2 folder (GPT2LMHeadModel).")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder to take its newest checkpoint from")
    p.add_argument("out_dir", help="the Hugging Face folder to write (config.json, model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = p.parse_args(argv)
    ckpt = export(args.checkpoint, args.out_dir, args.overwrite)
    print(f"exported {ckpt} to {args.out_dir}; open it with transformers.GPT2LMHeadModel.from_pretrained")


if __name__ == "__main__":
    run_main(main)
