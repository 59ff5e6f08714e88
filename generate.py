"""Sample text from a trained model, streamed to stdout as it is produced.

    python generate.py --prompt "Once upon a time"           # newest checkpoint under out/
    python generate.py --checkpoint out/tiny --num-samples 3
    python generate.py --init-from gpt2 --greedy              # OpenAI's GPT-2 (a Hugging Face folder or hub name)

Other scripts import `complete` (whole samples as strings, e.g. train.py's periodic samples) or `stream`
(pieces of text as they arrive); both run the same decoding loop.
"""
import argparse
import codecs
import sys
from typing import Iterator, Optional

import torch

import checkpoint
from hardware import autocast, pick_device, pick_dtype
from errors import UserError, run_main
from model import CausalLM

RULE = "-" * 40  # between samples


def encode_prompt(enc, prompt: str, block_size: int) -> list[int]:
    """Token ids of prompt; an empty prompt is <|endoftext|>, as documents start after one in training."""
    ids = enc.encode(prompt, allowed_special="all") if prompt else [enc.eot_token]
    if len(ids) > block_size - 1:  # keep room for at least one new token inside the context
        print(f"warning: the prompt has {len(ids)} tokens, more than the context allows; "
              f"keeping its last {block_size - 1}", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def stream(model: CausalLM, enc, ids: list[int], num_samples: int = 1, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: Optional[int] = 200, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, use_cache: bool = True,
           stop_early: bool = True) -> Iterator[tuple[int, str]]:
    """Yield (sample index, text) pieces as tokens arrive, all samples continuing ids in one batch.

    A sample ends at <|endoftext|> (not printed) or after max_new_tokens. Each sample decodes through its own
    incremental UTF-8 decoder, so a character whose bytes span several tokens comes out whole. stop_early=False
    decodes all max_new_tokens steps even once every sample has ended: a sharded model's ranks must make the
    same number of forwards (each is a collective), whatever tokens each rank drew.
    """
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=model.lm_head.weight.device)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    done = [False] * num_samples
    steps = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=generator, use_cache=use_cache)
    for step in steps:
        for row, token in enumerate(step.tolist()):
            done[row] = done[row] or token == enc.eot_token
            if not done[row]:
                text = decoders[row].decode(enc.decode_single_token_bytes(token))
                if text:
                    yield row, text
        if stop_early and all(done):
            break
    for row, decoder in enumerate(decoders):  # bytes of an unfinished character become U+FFFD
        tail = decoder.decode(b"", final=True)
        if tail:
            yield row, tail


def complete(model: CausalLM, enc, prompt: str, num_samples: int = 1, max_new_tokens: int = 32,
             temperature: float = 0.8, top_k: Optional[int] = 200, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
             use_cache: bool = True, stop_early: bool = True) -> list[str]:
    """num_samples continuations of prompt (without the prompt), sampled together in one batch.

    Safe to call in the middle of training: the model is put in eval mode and restored afterwards.
    Pass an unwrapped GPT (not DDP or torch.compile's wrapper) and the autocast dtype training uses.
    """
    ids = encode_prompt(enc, prompt, model.config.block_size)
    texts = [""] * num_samples
    was_training = model.training
    model.eval()
    try:
        with autocast(model.lm_head.weight.device, dtype):
            for row, text in stream(model, enc, ids, num_samples, max_new_tokens, temperature, top_k, top_p,
                                    generator, use_cache, stop_early):
                texts[row] += text
    finally:
        model.train(was_training)
    return texts


def for_inference(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    """The model as generate.py decodes with it: the weights themselves in dtype (native bf16 halves the bytes
    each decode step reads, where autocast would cast them again every step), float32 otherwise."""
    return model.to(dtype).eval()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample text from a checkpoint or from GPT-2, streamed as it is produced.")
    checkpoint.add_model_args(p, dtype_help="the weights' dtype; auto is bfloat16 where the hardware has it natively "
                                            "(CUDA, AMX/AVX512-BF16 CPUs), else float32 (the choice that matches "
                                            "transformers token for token)")
    p.add_argument("--prompt", default="", help="text to continue; empty starts a new document")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples, decoded together as one batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="per sample, which also ends at <|endoftext|> (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=200,
                   help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1 = off")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same samples (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token (slow; to debug)")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}; 1 turns nucleus sampling off")
    if args.temperature < 0 or args.top_k < 0 or args.num_samples < 1 or args.max_new_tokens < 0:
        raise UserError("--temperature, --top-k and --max-new-tokens must be >= 0 and --num-samples >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, enc, source = checkpoint.load_from_args(args, device)
    model = for_inference(model, dtype)
    print(f"sampling from {source} on {device}, {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    ids = encode_prompt(enc, args.prompt, model.config.block_size)
    # One generator for all samples: a seed reproduces the whole run, and the samples differ from each other.
    generator = torch.Generator(device).manual_seed(args.seed)
    temperature = 0.0 if args.greedy else args.temperature
    pieces = stream(model, enc, ids, args.num_samples, args.max_new_tokens, temperature, args.top_k or None,
                    args.top_p, generator, use_cache=not args.no_cache)
    if args.num_samples == 1:  # one sample streams as it is produced
        print(args.prompt, end="", flush=True)
        for _, text in pieces:
            print(text, end="", flush=True)
        print()
        return
    texts = [""] * args.num_samples  # several decode as one batch, then print one after the other
    for row, text in pieces:
        texts[row] += text
    print(f"\n{RULE}\n".join(args.prompt + text for text in texts))

if __name__ == "__main__":
    run_main(main)
