"""train.py with one failure planted on one rank, for tests/test_distributed.py: run under torchrun as
`inject_failure.py KIND RANK train.py-flags...`. KIND names what fails, as it fails on real clusters:

    log        rank RANK's log.jsonl write (a lost NFS handle)
    val        rank RANK's validation forward (an out-of-memory on one GPU)
    hellaswag  rank RANK's HellaSwag scoring (the same)
    sample     rank RANK's sample (the same)
    eot        rank RANK draws the vocabulary's last token at once when sampling: <|endoftext|> for a tokenizer
               trained by prepare_data.py (its samples end before the others')
    overflow   not a failure, and on every rank: float16's gradient scaler starts at 2**30 (its default is
               2**16), so the first steps' gradients overflow float16 and those steps are skipped
"""
import errno
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import evaluate  # noqa: E402
import generate  # noqa: E402
import hellaswag  # noqa: E402
import log  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from errors import run_main  # noqa: E402


def fail(*args, **kwargs):
    raise RuntimeError("CUDA out of memory (injected)")


def stale_handle(*args, **kwargs):
    raise OSError(errno.ESTALE, "Stale file handle (injected)")


def main():
    kind, rank = sys.argv[1], int(sys.argv[2])
    sys.argv = ["train.py", *sys.argv[3:]]
    if kind == "overflow":
        torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=2.0**30)
    if int(os.environ.get("RANK", 0)) == rank:
        if kind == "log":
            log.RunLog.write = stale_handle
        elif kind == "val":
            evaluate.loss_sum = fail
        elif kind == "hellaswag":
            hellaswag.tally = fail
        elif kind == "sample":
            generate.complete = fail
        elif kind == "eot":
            model.sample = lambda logits, *args, **kwargs: logits.new_full(logits.shape[:1], logits.shape[1] - 1,
                                                                           dtype=int)
    run_main(train.main)


if __name__ == "__main__":
    main()
