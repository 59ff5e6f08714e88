"""Pre-train a GPT: one process, or many under torchrun (DDP), with exact resume.

    python train.py --config tiny --device cpu                  # the CPU demo
    python train.py                                              # GPT-2 124M on fineweb-edu 10B, one GPU
    torchrun --standalone --nproc_per_node=8 train.py            # the same on eight
    python train.py --resume                                     # continue from the newest checkpoint

Every config field is a flag (see --help); a step is one optimizer update of total_batch_size tokens.
"""
import argparse
import dataclasses

import torch

import parallel
import runtime
from config import GPTConfig, TrainConfig, add_config_args, check_values, count_params, parse_configs
from dataloader import DataLoader, DeviceBatches, read_meta
from errors import UserError, run_main
from hooks import Hooks, RunLog, StepTimer, due
from model import GPT
from optimizer import build_optimizer
from resume import Checkpoints
from run_folder import RunFolder
from schedule import lr_at


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    model_cfg, cfg, args = parse_configs(parser)
    check_values(model_cfg, cfg)
    ctx = runtime.setup_distributed(cfg.device)
    try:
        train(model_cfg, cfg, ctx, explicit=args.explicit)
    finally:
        runtime.teardown_distributed()


def train(model_cfg: GPTConfig, cfg: TrainConfig, ctx: runtime.Dist, explicit=frozenset()):
    # ---- setup: everything the run needs is resolved here, before step 1
    device, master = ctx.device, ctx.is_master
    dtype = runtime.pick_dtype(cfg.dtype, device)
    runtime.configure_matmul(device)
    meta = read_meta(cfg.data_dir)
    model_cfg, cfg = fit_to_data(model_cfg, cfg, meta, explicit)
    accum = grad_accum_steps(cfg, model_cfg.block_size, ctx.world_size)
    train_loader = DataLoader(cfg.data_dir, "train", cfg.batch_size, model_cfg.block_size, ctx.rank,
                              ctx.world_size, shuffle_seed=cfg.seed if cfg.shuffle else None,
                              vocab_size=model_cfg.vocab_size)
    val_loader = DataLoader(cfg.data_dir, "val", cfg.batch_size, model_cfg.block_size, ctx.rank, ctx.world_size,
                            vocab_size=model_cfg.vocab_size)

    folder = RunFolder(cfg.out_dir)
    checkpoints = Checkpoints(folder, cfg, ctx, meta["tokenizer"], train_loader.identity())
    checkpoints.check(model_cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)  # the module being trained: what is saved, evaluated and sampled
    step = checkpoints.restore(model, train_loader)
    batches = DeviceBatches(train_loader, device)
    compile_on = device.type == "cuda" if cfg.compile is None else cfg.compile
    runner = parallel.wrap(model, cfg.parallel, ctx, dtype, compile_on)  # what forward and backward run through
    optimizer = build_optimizer(model, cfg, device)  # after wrap: under FSDP it must hold the sharded parameters
    checkpoints.restore_optimizer(model, optimizer)

    if master:
        folder.start_log(step)
    log = RunLog(folder, model_cfg, cfg, ctx, cfg.peak_flops or runtime.peak_flops(device, dtype))
    hooks = Hooks(cfg, model_cfg, meta["tokenizer"], ctx, dtype, val_loader, log, sharded=cfg.parallel == "fsdp")
    stop = runtime.StopFlag()
    if master:
        print_setup(model, model_cfg, cfg, ctx, dtype, compile_on, accum, step, checkpoints.start)

    # ---- the loop. The loss stays on the device between logging steps: no host synchronisation there.
    losses, nonfinite, timer = [], torch.zeros((), device=device), StepTimer(device, first_step=step)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        loss, grad_norm = train_step(runner, optimizer, batches, accum, lr, cfg.grad_clip, dtype)
        step += 1
        losses.append(loss)
        nonfinite += ~torch.isfinite(loss)
        timer.tick(step)
        logged = due(step, cfg.log_interval, cfg.max_steps)
        saving = due(step, cfg.checkpoint_interval, cfg.max_steps) or step == cfg.max_steps or step in checkpoints.kept
        # One process reads its stop flag every step; ranks agree on it, and on a non-finite loss, only where they
        # meet anyway.
        if not (logged or saving or hooks.any_due(step) or (stop.signal and not ctx.enabled)):
            continue
        nan_seen, stopping = runtime.any_rank(device, nonfinite, stop.signal is not None)
        if nan_seen:
            raise checkpoints.nan_error(step)
        error = None
        try:
            if logged:
                log.training(step, losses, grad_norm, lr, timer.per_step())
            hooks.run(step, runner, model)
        except Exception as e:
            error = e
        # A failed hook never costs progress: the weights of this step are consistent, so every rank saves them.
        if runtime.any_rank(device, error is not None)[0]:
            path = checkpoints.save(step, model, optimizer, batches)
            if master:
                print(f"a hook failed after step {step}: saved {path}; fix the cause, then continue with --resume",
                      flush=True)
            raise error or UserError(f"a hook failed on another rank after step {step}; its message says why")
        if saving or stopping:
            path = checkpoints.save(step, model, optimizer, batches)
            if master and stopping:
                print(f"stopped by signal {stop.signal}: saved {path}; continue with --resume", flush=True)
        if stopping:
            return
        if logged:  # evaluations and saves are not training time: the clock restarts after them
            losses = []
            timer.restart()


def train_step(runner, optimizer, batches, accum: int, lr: float, grad_clip: float, dtype):
    """One optimizer step over `accum` micro batches at learning rate lr (each group at its own multiple of it);
    returns (mean loss, gradient norm) as device tensors, so that nothing here waits for the device. bench.py
    times exactly this function."""
    loss_sum = None
    for micro in range(accum):
        x, y = next(batches)
        with parallel.gradient_sync(runner, micro == accum - 1):
            with runtime.autocast(x.device, dtype):
                _, loss = runner(x, y)
            (loss / accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is already global, as a DTensor
        grad_norm = grad_norm.full_tensor()
    return loss_sum.float() / accum, grad_norm


def fit_to_data(model_cfg: GPTConfig, cfg: TrainConfig, meta: dict, explicit) -> tuple[GPTConfig, TrainConfig]:
    """The vocabulary is the data's (a preset's yields; an explicit --vocab-size must agree), and --shuffle
    defaults to what meta.json asks for."""
    if "vocab_size" in explicit and model_cfg.vocab_size != meta["vocab_size"]:
        raise UserError(f"--vocab-size {model_cfg.vocab_size} disagrees with the data's tokenizer "
                        f"({meta['vocab_size']} tokens, {cfg.data_dir}/meta.json); drop the flag or prepare the data "
                        f"with the tokenizer you mean")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    if cfg.shuffle is None:
        cfg = dataclasses.replace(cfg, shuffle=bool(meta.get("shuffle", False)))
    return model_cfg, cfg


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro steps per optimizer step, so that each step sees exactly total_batch_size tokens."""
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size % per_micro:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {block_size} x {world_size} = {per_micro}; "
                        f"change one of them")
    return cfg.total_batch_size // per_micro


def print_setup(model, model_cfg: GPTConfig, cfg: TrainConfig, ctx, dtype, compile_on: bool, accum: int, step: int,
                start):
    print(f"model {count_params(model_cfg) / 1e6:.1f}M params | {ctx.world_size} process(es) on {ctx.device}, "
          f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_on else 'off'} | "
          f"{cfg.total_batch_size:,} tokens/step = {cfg.batch_size} x {model_cfg.block_size} x "
          f"{ctx.world_size} x {accum} accum | " + (f"resumed at step {step} from {start}" if start else "fresh"),
          flush=True)
    # Parameters, gradients and AdamW's two moments, all float32: 4x the parameters this rank holds (Muon keeps
    # one moment for its matrices, so a little less there).
    state_mb = 4 * parallel.local_param_bytes(model) / 2**20
    print(f"{cfg.parallel}: model state per rank {state_mb:,.1f} MB (parameters, gradients, optimizer moments)",
          flush=True)


if __name__ == "__main__":
    run_main(main)
