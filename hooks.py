"""What train.py does between optimizer steps besides training: validation loss, HellaSwag, samples, and the log.

Everything a hook needs is resolved before step 1, so a long run never dies at its first evaluation: the
tokenizer, the sample prompt's tokens and the HellaSwag rows. HellaSwag that cannot be had (an offline node, a
bad file) turns that hook off for the run with one warning, on every rank alike.
"""
import dataclasses
import time
from typing import Optional

import torch

import generate
import hellaswag
import parallel
import runtime
from config import GPTConfig, TrainConfig
from errors import UserError
from model import estimate_mfu
from run_folder import RunFolder
from tokenizer import load_tokenizer


def due(step: int, interval: int, max_steps: int) -> bool:
    """Every `interval` steps and at the end; never when interval is 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


class StepTimer:
    """Seconds per optimizer step over a log window. The clock leaves out the run's first step (compilation,
    warm-up) and what runs between windows (evaluations, saves): train.py restarts it after each window."""

    def __init__(self, device, first_step: int):
        self.device, self.first_step = device, first_step
        self.restart()

    def restart(self):
        self.start, self.steps = time.perf_counter(), 0

    def tick(self, step: int):
        self.steps += 1
        if step == self.first_step + 1:
            runtime.synchronize(self.device)
            self.restart()

    def per_step(self) -> Optional[float]:
        """None for a window that held only the warm-up step."""
        return (time.perf_counter() - self.start) / self.steps if self.steps else None


class RunLog:
    """log.jsonl (through the run folder), the console and wandb: rank 0 writes, the other ranks do nothing."""

    def __init__(self, folder: RunFolder, model_cfg: GPTConfig, cfg: TrainConfig, ctx: runtime.Dist,
                 peak_flops: float):
        self.folder, self.model_cfg, self.cfg, self.wandb = folder, model_cfg, cfg, None
        self.enabled, self.world_size, self.peak_flops = ctx.is_master, ctx.world_size, peak_flops
        if self.enabled and cfg.wandb:
            import wandb

            config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(cfg)}
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config,
                                    resume="allow")

    def training(self, step: int, losses: list, grad_norm, lr: float, seconds_per_step: Optional[float]):
        """One line for a log window: the loss averaged over its steps and all ranks (every rank calls this), the
        last step's gradient norm, and the speed."""
        mean_loss = runtime.all_reduce(torch.stack(losses).mean()) / self.world_size
        loss, norm = torch.stack([mean_loss, grad_norm.float()]).tolist()
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm}
        line = f"step {step:6d}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f}"
        if seconds_per_step is not None:
            tps = self.cfg.total_batch_size / seconds_per_step
            mfu = estimate_mfu(self.model_cfg, self.model_cfg.block_size, tps, self.peak_flops * self.world_size)
            record.update(tokens_per_sec=tps, ms_per_step=seconds_per_step * 1000, mfu=mfu)
            line += f" | {seconds_per_step * 1000:.0f} ms | {tps:,.0f} tok/s | mfu {mfu:.1%}"
        self.write(record, line)

    def write(self, record: dict, console: str = ""):
        if not self.enabled:
            return
        if console:
            print(console, flush=True)
        self.folder.append_log(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


@torch.no_grad()
def evaluate_loss(model, loader, steps: int, device, dtype) -> float:
    """Mean validation loss over the same `steps` batches every time, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = (t.to(device) for t in loader.next_batch())
        with runtime.autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    world = loader.world_size
    return (runtime.all_reduce(total) / (steps * world)).item()


class Hooks:
    """The evaluation, HellaSwag and sample hooks of one run, with what they need resolved up front."""

    def __init__(self, cfg: TrainConfig, model_cfg: GPTConfig, tokenizer: str, ctx: runtime.Dist, dtype,
                 val_loader, log: RunLog, sharded: bool = False):
        self.cfg, self.ctx, self.dtype, self.val_loader, self.log = cfg, ctx, dtype, val_loader, log
        # A sharded model's every forward is a collective: all ranks score all of HellaSwag and sample together.
        self.sharded = sharded
        self.enc = load_tokenizer(tokenizer) if cfg.hellaswag_interval or cfg.sample_interval else None
        if cfg.sample_interval:
            generate.encode_prompt(self.enc, cfg.sample_prompt, model_cfg.block_size)
        self.examples = self._hellaswag_rows(model_cfg.block_size) if cfg.hellaswag_interval else None

    def _hellaswag_rows(self, block_size: int):
        """The rows, loaded and checked on every rank, or None (hook off) if any rank cannot have them."""
        rows, problem = None, None
        for first in (True, False):  # each node's first process fills the node's cache, then the others read it
            if (self.ctx.local_rank == 0) == first:
                try:
                    rows = hellaswag.load_examples(self.cfg.hellaswag_data, self.cfg.hellaswag_limit)
                    for ex in rows:
                        hellaswag.encode(self.enc, ex, block_size)
                except UserError as e:
                    problem = str(e)
            runtime.barrier()
        problems = [(rank, p) for rank, p in enumerate(runtime.gather_objects(problem)) if p]
        if not problems:
            return rows
        if self.ctx.is_master:
            rank, reason = problems[0]
            where = f" (rank {rank})" if self.ctx.enabled else ""
            print(f"warning: HellaSwag is off for this run{where}: {reason}. To keep it on, pass --hellaswag-data "
                  f"PATH to a local hellaswag_val.jsonl(.gz); --hellaswag-interval 0 silences this", flush=True)
        return None

    def run(self, step: int, runner, model):
        """The hooks due at `step`. runner runs the validation forward (compiled and DDP-wrapped where training
        is), model the generation and the packed HellaSwag scorer, which need the plain GPT."""
        cfg, max_steps = self.cfg, self.cfg.max_steps
        if due(step, cfg.eval_interval, max_steps):
            val_loss = evaluate_loss(runner, self.val_loader, cfg.eval_steps, self.ctx.device, self.dtype)
            self.log.write({"step": step, "val_loss": val_loss}, f"step {step:6d} | val loss {val_loss:.4f}")
        if self.examples is not None and due(step, cfg.hellaswag_interval, max_steps):
            with parallel.gathered(model):
                result = hellaswag.evaluate(model, self.enc, self.examples, self.ctx.device, self.dtype,
                                            dist=None if self.sharded else self.ctx)
            self.log.write({"step": step, "hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"]},
                           f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['n']} examples)")
        if (self.ctx.is_master or self.sharded) and due(step, cfg.sample_interval, max_steps):
            # A private generator: sampling must not move the training RNG, or resume would not be exact.
            gen = torch.Generator(self.ctx.device).manual_seed(cfg.seed)
            with parallel.gathered(model):
                text = generate.complete(model, self.enc, cfg.sample_prompt, max_new_tokens=48, generator=gen,
                                         dtype=self.dtype)[0]
            if self.ctx.is_master:
                print(f"step {step:6d} | sample: {cfg.sample_prompt}{text}".replace("\n", " "), flush=True)

    def any_due(self, step: int) -> bool:
        cfg = self.cfg
        return any(due(step, interval, cfg.max_steps)
                   for interval in (cfg.eval_interval, cfg.hellaswag_interval, cfg.sample_interval))
