"""Pre-train a GPT: one process, or many under torchrun (DDP, FSDP or HSDP), with exact resume.

    python train.py --config tiny --device cpu                  # the CPU demo
    python train.py                                              # GPT-2 124M on fineweb-edu 10B, one GPU
    torchrun --standalone --nproc_per_node=8 train.py            # the same on eight
    python train.py --resume                                     # continue from the newest checkpoint

Every config field is a flag (see --help); a step is one optimizer update of total_batch_size tokens.
"""
import argparse
import functools
import time
from typing import Optional

import torch

import hardware
import distributed
from config import GPTConfig, RunOptions, TrainConfig, add_config_args, check_values, count_params, parse_configs
from dataloader import DataLoader, DeviceBatches, Mixture, common_meta, parse_sources
from errors import UserError, run_main
from evaluate import Evaluator
from model import build_model, flops_per_token
from optimizer import build_optimizer, build_scaler
from run import Run, StopFlag, configure, due
from schedule import lr_at


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    model_cfg, cfg, opts, args = parse_configs(parser)
    check_values(model_cfg, cfg)
    world = distributed.setup(cfg.device, opts.dist_timeout)
    try:
        train(model_cfg, cfg, opts, world, explicit=args.explicit)
    finally:
        distributed.teardown()


def train(model_cfg: GPTConfig, cfg: TrainConfig, opts: RunOptions, world: distributed.World, explicit=frozenset()):
    # ---- setup: everything the run needs is resolved here, before step 1
    device, master = world.device, world.is_master
    dtype = hardware.pick_dtype(cfg.dtype, device)
    hardware.configure(device)
    sources = parse_sources(cfg.data_dir, cfg.data_weights)
    meta = common_meta(sources)
    model_cfg, cfg, source = configure(model_cfg, cfg, opts, explicit, meta, world)  # nothing written yet
    accum = grad_accum_steps(cfg, model_cfg.block_size, world.world_size)
    train_loader = Mixture(sources, "train", cfg.batch_size, model_cfg.block_size, world.rank, world.world_size,
                           shuffle_seed=cfg.seed if cfg.shuffle else None, vocab_size=model_cfg.vocab_size,
                           announce=master)
    val_loaders = [(source, DataLoader(source.folder, "val", cfg.batch_size, model_cfg.block_size, world.rank,
                                       world.world_size, vocab_size=model_cfg.vocab_size)) for source in sources]

    mesh = distributed.mesh_shape(cfg.parallel, world.world_size, opts.replicate_degree)
    run = Run(model_cfg, cfg, opts, world, meta["tokenizer"], train_loader.identity())  # see run.py for the order
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = build_model(model_cfg).to(device)  # the module itself: what is saved, evaluated and sampled
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    step = run.restore(raw_model, train_loader, source)
    from_weights, source = source is not None, None  # a fresh run from trained weights; its copy's memory is freed
    batches = DeviceBatches(train_loader, device)
    model = distributed.wrap(raw_model, cfg.parallel, world, dtype, cfg.compile, mesh)  # what forward/backward run
    optimizer = build_optimizer(raw_model, cfg, device)  # after wrap: under FSDP it must hold the sharded parameters
    scaler = build_scaler(dtype, device)
    run.restore_optimizer(raw_model, optimizer, scaler)
    evaluator = Evaluator(cfg, model_cfg, meta["tokenizer"], world, dtype, val_loaders, run.log,
                          sharded=cfg.parallel in distributed.SHARDED)
    peak_flops = cfg.peak_flops or hardware.peak_flops(device, dtype)
    stop = StopFlag()
    if master:
        print_setup(raw_model, model_cfg, cfg, world, dtype, accum, step, run.start)

    if from_weights and cfg.eval_interval:  # where the source stands on this data, logged as step 0
        error = evaluator.val_loss(0, model)
        if error:
            raise error

    # ---- the loop. The loss stays on the device between logging steps: no host synchronisation there.
    window = Window(device, step, scaler.is_enabled())
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        loss, grad_norm = train_step(model, optimizer, scaler, batches, accum, lr, cfg.grad_clip, dtype)
        step += 1
        window.add(step, loss, grad_norm)
        logged, saving = due(step, cfg.log_interval, cfg.max_steps), run.save_due(step)
        # One process reads its stop flag every step; ranks agree on it, and on a non-finite loss, only where they
        # meet anyway.
        if not (logged or saving or evaluator.due(step) or (stop.signal and not world.enabled)):
            continue
        nan_seen, stopping = distributed.any_rank(device, window.nonfinite, stop.signal is not None)
        if nan_seen:
            raise run.nan_error(step)
        error = log_window(run, step, window, grad_norm, lr, peak_flops, batches) if logged else None
        error = error or evaluator.maybe_run(step, model, raw_model)
        if error:  # every rank failed alike (distributed.agree): the weights of this step are sound, so save them
            path = run.save(step, raw_model, optimizer, scaler, batches)
            if master:
                print(f"a hook failed after step {step}: saved {path}; fix the cause, then continue with --resume",
                      flush=True)
            raise error
        if saving or stopping:
            path = run.save(step, raw_model, optimizer, scaler, batches)
            if master and stopping:
                print(f"stopped by signal {stop.signal}: saved {path}; continue with --resume", flush=True)
        if stopping:
            return
        if logged:  # evaluations and saves are not training time: the clock restarts after them
            window.restart()


def train_step(model, optimizer, scaler, batches, accum: int, lr: float, grad_clip: float, dtype):
    """One optimizer step over `accum` micro batches at learning rate lr (each group at its own multiple of it);
    returns (mean loss, gradient norm) as device tensors, so that nothing here waits for the device. scaler: float16's
    loss scaling (optimizer.build_scaler); the step is skipped, as its norm is inf or nan, where a gradient
    overflowed. bench.py times exactly this function."""
    loss_sum = None
    for micro in range(accum):
        x, y = next(batches)
        with distributed.gradient_sync(model, micro == accum - 1):
            with hardware.autocast(x.device, dtype):
                _, loss = model(x, y)
            scaler.scale(loss / accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    scaler.unscale_(optimizer)  # the clipping threshold is for the true gradients
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is already global, as a DTensor
        grad_norm = grad_norm.full_tensor()
    return loss_sum.float() / accum, grad_norm


def log_window(run: Run, step: int, window: "Window", grad_norm, lr: float, peak_flops: Optional[float], batches):
    """The log line of a window: its mean loss over steps and ranks (a collective every rank reaches), the steps
    float16's scaler skipped in it (alike on every rank, whose gradients are reduced) and the tokens read from each
    data folder (batches: the Mixture's position), then rank 0's write, which may fail alone (a full disk): the
    failure, agreed on every rank, or None."""
    world, model_cfg, skipped = run.world, run.model_cfg, window.skipped
    mean_loss = distributed.all_reduce(torch.stack(window.losses).mean()) / world.world_size
    extra = {"source_tokens": {name: p["tokens"] for name, p in batches.state_dict()["sources"].items()}}
    loss, norm, *rest = torch.stack([mean_loss, grad_norm.float(), *([] if skipped is None else [skipped])]).tolist()
    if rest:
        extra["skipped_steps"] = int(rest[0])
    write = functools.partial(run.log.training, **extra)
    return distributed.attempt(write, step, loss, norm, lr, window.per_step(), run.cfg.total_batch_size,
                               flops_per_token(model_cfg, model_cfg.block_size),
                               peak_flops and peak_flops * world.world_size,
                               hardware.peak_memory(world.device))


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro steps per optimizer step, so that each step sees exactly total_batch_size tokens."""
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size % per_micro:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {block_size} x {world_size} = {per_micro}; "
                        f"change one of them")
    return cfg.total_batch_size // per_micro


class Window:
    """What the loop keeps between two log lines, on the device so that no step waits for it: the losses, whether
    one was not finite, the steps float16's scaler skipped (a gradient overflowed: routine, not a diverged run), and
    the seconds per step. The clock leaves out the run's first step (compilation, warm-up) and what runs between
    windows (evaluations, saves): train.py restarts it after each window."""

    def __init__(self, device, first_step: int, count_skipped: bool):
        self.device, self.first_step = device, first_step
        self.nonfinite = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device) if count_skipped else None
        self.restart()

    def add(self, step: int, loss, grad_norm):
        self.losses.append(loss)
        self.nonfinite += ~torch.isfinite(loss)
        if self.skipped is not None:
            self.skipped += ~torch.isfinite(grad_norm)
        self.steps += 1
        if step == self.first_step + 1:  # the clock starts after the warm-up step; its loss still counts
            hardware.synchronize(self.device)
            self.start, self.steps = time.perf_counter(), 0

    def restart(self):
        self.losses, self.start, self.steps = [], time.perf_counter(), 0
        if self.skipped is not None:
            self.skipped.zero_()

    def per_step(self) -> Optional[float]:
        """None for a window that held only the warm-up step."""
        return (time.perf_counter() - self.start) / self.steps if self.steps else None


def print_setup(raw_model, model_cfg: GPTConfig, cfg: TrainConfig, world, dtype, accum: int, step: int, start):
    print(f"model {count_params(model_cfg) / 1e6:.1f}M params | {world.world_size} process(es) on {world.device}, "
          f"{str(dtype).removeprefix('torch.')}, compile {'on' if cfg.compile else 'off'} | "
          f"{cfg.total_batch_size:,} tokens/step = {cfg.batch_size} x {model_cfg.block_size} x "
          f"{world.world_size} x {accum} accum | " + (f"resumed at step {step} from {start}" if start else "fresh") +
          (f", from the weights of {cfg.init_from}" if cfg.init_from and not start else ""),
          flush=True)
    # Parameters, gradients and AdamW's two moments, all float32: 4x the parameters this rank holds (Muon keeps
    # one moment for its matrices, so a little less there).
    state_mb = 4 * distributed.local_param_bytes(raw_model) / 2**20
    print(f"{cfg.parallel}: model state per rank {state_mb:,.1f} MB (parameters, gradients, optimizer moments)",
          flush=True)


if __name__ == "__main__":
    run_main(main)
