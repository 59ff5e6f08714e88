"""What train.py measures between optimizer steps: validation loss, HellaSwag, and a text sample.

Everything an evaluation needs is resolved before step 1, so a long run never dies at its first evaluation: the
tokenizer, the sample prompt's tokens and the HellaSwag rows. HellaSwag that cannot be had (an offline node, a
bad file) turns that evaluation off for the run with one warning, on every rank alike.

Each evaluation is local work, then an agreement of all ranks that it succeeded (distributed.agree), then the
one collective that sums the results: a failure on one rank (an out-of-memory on one GPU, rank 0's log write)
never leaves the others waiting in a collective it will not reach. Under --parallel fsdp or hsdp every forward is
itself a collective (each block all-gathers its weights), so there the local work cannot fail alone without a
hang until --dist-timeout; the same holds for DDP's and FSDP's training steps themselves.
"""
from typing import Optional

import torch

import distributed
import generate
import hellaswag
from config import GPTConfig, TrainConfig
from hardware import autocast
from errors import UserError
from log import RunLog
from run import due
from tokenizer import load_tokenizer


class Evaluator:
    """The evaluations of one run, with what they need resolved up front. val_loaders: (mixture.Source, DataLoader
    of its val split) for each data folder. sharded: the model is sharded (FSDP, HSDP), so every rank runs every
    forward of HellaSwag and sampling together."""

    def __init__(self, cfg: TrainConfig, model_cfg: GPTConfig, tokenizer: str, world: distributed.World, dtype,
                 val_loaders: list, log: RunLog, sharded: bool = False):
        self.cfg, self.world, self.dtype, self.val_loaders, self.log = cfg, world, dtype, val_loaders, log
        self.sharded = sharded
        self.enc = load_tokenizer(tokenizer) if cfg.hellaswag_interval or cfg.sample_interval else None
        if cfg.sample_interval:
            generate.encode_prompt(self.enc, cfg.sample_prompt, model_cfg.block_size)
        self.model_cfg, self.encoded = model_cfg, []
        self.examples = self._hellaswag_rows(model_cfg.block_size) if cfg.hellaswag_interval else None

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return any(due(step, interval, cfg.max_steps)
                   for interval in (cfg.eval_interval, cfg.hellaswag_interval, cfg.sample_interval))

    def maybe_run(self, step: int, model, raw_model) -> Optional[BaseException]:
        """The evaluations due at `step`; the first failure, agreed on every rank (None: all went well). model
        runs the validation forward (compiled and DDP-wrapped where training is), raw_model generation and the
        packed HellaSwag scorer, which call the model's parts."""
        cfg, max_steps = self.cfg, self.cfg.max_steps
        if due(step, cfg.eval_interval, max_steps):
            error = self.val_loss(step, model)
            if error:
                return error
        if self.examples is not None and due(step, cfg.hellaswag_interval, max_steps):
            error = self._hellaswag(step, raw_model)
            if error:
                return error
        if due(step, cfg.sample_interval, max_steps):
            # Under DDP rank 0 samples alone and the others only hear whether it worked; sharded ranks decode together.
            sampling = self.sharded or self.world.is_master
            return distributed.attempt(self._sample, step, raw_model) if sampling else distributed.agree(None)
        return None

    def val_loss(self, step: int, model) -> Optional[BaseException]:
        """Each data folder's val loss, and as val_loss their mean weighted as the training mixture is: every
        folder's local sum first, then one collective for all of them."""
        totals = torch.zeros(len(self.val_loaders), device=self.world.device)

        def local():
            for i, (_, loader) in enumerate(self.val_loaders):
                totals[i] += loss_sum(model, loader, self.cfg.eval_steps, self.world.device, self.dtype)
        error = distributed.attempt(local)
        if error:
            return error
        means = (distributed.all_reduce(totals) / (self.cfg.eval_steps * self.world.world_size)).tolist()
        losses = {source.name: loss for (source, _), loss in zip(self.val_loaders, means)}
        shares = {source.name: source.share for source, _ in self.val_loaders}
        val_loss = sum(shares[name] * loss for name, loss in losses.items()) / sum(shares.values())
        line = f"step {step:6d} | val loss {val_loss:.4f}"
        if len(losses) > 1:
            line += " (" + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()) + ")"
        record = {"step": step, "val_loss": val_loss, **{f"val_loss_{n}": v for n, v in losses.items()}}
        return distributed.attempt(self.log.write, record, line)

    def _hellaswag(self, step: int, raw_model) -> Optional[BaseException]:
        """Each rank scores its share of the rows. Sharded ranks run every forward together (each is a
        collective), so they agree first on the smallest batch any rank's memory allows, then pad their shares to
        one length: the same number of forwards on every rank."""
        counts, device = [], self.world.device
        batch = hellaswag.examples_per_forward(self.model_cfg, self.encoded, device, self.dtype)
        if self.sharded:
            batch = distributed.smallest(batch, device)

        def score():
            with distributed.gathered(raw_model):
                counts.append(hellaswag.tally(raw_model, self.enc, self.examples, device, self.dtype, batch,
                                              world=self.world, even=self.sharded))
        error = distributed.attempt(score)
        if error:
            return error
        totals = distributed.all_reduce(counts[0])
        result = hellaswag.accuracy(totals)
        return distributed.attempt(
            self.log.write, {"step": step, "hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"]},
            f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['n']} examples)")

    def _sample(self, step: int, raw_model):
        # A private generator: sampling must not move the training RNG, or resume would not be exact. Sharded
        # ranks decode all 48 steps (stop_early off): each forward is a collective, whatever tokens a rank drew.
        gen = torch.Generator(self.world.device).manual_seed(self.cfg.seed)
        with distributed.gathered(raw_model):
            text = generate.complete(raw_model, self.enc, self.cfg.sample_prompt, max_new_tokens=48, generator=gen,
                                     dtype=self.dtype, stop_early=not self.sharded)[0]
        if self.world.is_master:
            print(f"step {step:6d} | sample: {self.cfg.sample_prompt}{text}".replace("\n", " "), flush=True)

    def _hellaswag_rows(self, block_size: int):
        """The rows, loaded and checked on every rank, or None (evaluation off) if any rank cannot have them."""
        rows, problem = None, None
        for first in (True, False):  # each node's first process fills the node's cache, then the others read it
            if (self.world.local_rank == 0) == first:
                try:
                    rows = hellaswag.load_examples(self.cfg.hellaswag_data, self.cfg.hellaswag_limit)
                    self.encoded = [hellaswag.encode(self.enc, ex, block_size) for ex in rows]
                except UserError as e:
                    problem = str(e)
            distributed.barrier()
        problems = [(rank, p) for rank, p in enumerate(distributed.gather_objects(problem)) if p]
        if not problems:
            return rows
        if self.world.is_master:
            rank, reason = problems[0]
            where = f" (rank {rank})" if self.world.enabled else ""
            print(f"warning: HellaSwag is off for this run{where}: {reason}. To keep it on, pass --hellaswag-data "
                  f"PATH to a local hellaswag_val.jsonl(.gz); --hellaswag-interval 0 silences this", flush=True)
        return None


@torch.no_grad()
def loss_sum(model, loader, steps: int, device, dtype) -> torch.Tensor:
    """Summed validation loss of this rank over the same `steps` batches every time: local work, no collective."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return total


def evaluate_loss(model, loader, steps: int, device, dtype) -> float:
    """Mean validation loss over the same `steps` batches every time, averaged over ranks: a collective."""
    total = distributed.all_reduce(loss_sum(model, loader, steps, device, dtype))
    return (total / (steps * loader.world_size)).item()
