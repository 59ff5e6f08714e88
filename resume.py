"""A training run's checkpoints, as train.py uses them: the one it starts from (chosen by rank 0, checked by every
rank), whether today's flags continue the same run, the restore of weights, optimizer, data position and RNG, and
each save. The run folder's own rules (fresh or resume, newest, prune, the log) are run_folder.py's.
"""
import dataclasses
import math
import socket
import uuid
from typing import Optional

import torch

import checkpoint
import parallel
import runtime
from config import GPTConfig, TrainConfig
from errors import UserError
from optimizer import load_optimizer_state, muon_lr
from run_folder import RunFolder
from schedule import decay_start, lr_at

DATA_FIELDS = ("total_batch_size", "seed", "shuffle")  # batch_size and world size resume exactly (see DataLoader)
SCHEDULE_FIELDS = ("max_steps", "learning_rate", "muon_lr", "min_lr", "warmup_steps", "lr_schedule",
                   "decay_fraction")


class Checkpoints:
    """The checkpoints of the run in cfg.out_dir: `start` is the one this process resumes from (None: fresh).
    data is the training data's identity (DataLoader.identity), which a resume checks and every save records."""

    def __init__(self, folder: RunFolder, cfg: TrainConfig, ctx: runtime.Dist, tokenizer: str, data: list):
        self.folder, self.cfg, self.ctx, self.tokenizer, self.data = folder, cfg, ctx, tokenizer, data
        self.start, self.run_id = choose(folder, cfg, ctx)
        self.state = checkpoint.load_train_state(self.start) if self.start else None
        # A wsd run keeps the checkpoint where its decay starts: a longer run (larger --max-steps) extends from it.
        self.kept = (decay_start(cfg),) if cfg.lr_schedule == "wsd" else ()

    def check(self, model_cfg: GPTConfig):
        """Refuse, in one line, flags that would silently change what the resumed run trains on."""
        if self.state is not None:
            check_resume(self.start, self.state, model_cfg, self.cfg, self.data)

    def restore(self, model, loader) -> int:
        """Weights, data position and RNG streams of the start checkpoint into model and loader; the step to go on
        from (0 for a fresh run, whose RNG streams are seeded per rank)."""
        rank, world = self.ctx.rank, self.ctx.world_size
        if self.state is None:
            torch.manual_seed(self.cfg.seed + rank)  # dropout differs per rank
            return 0
        model.load_state_dict(checkpoint.load_model(self.start)[0].state_dict())
        loader.load_state_dict(self.state["train_loader"])
        step = self.state["step"]
        # Per-rank RNG streams continue exactly on the same world size; on another, each rank starts a new one.
        if len(self.state["rng"]) == world:
            runtime.set_rng_state(self.state["rng"][rank])
        else:
            torch.manual_seed(self.cfg.seed + rank + step * world)
        return step

    def restore_optimizer(self, model, optimizer):
        """The start checkpoint's optimizer moments, whole or from the shards of an FSDP run (resharded)."""
        if self.state is None:
            return
        if parallel.has_sharded_optimizer(self.start):
            load_optimizer_state(optimizer, lambda: parallel.load_optimizer(model, optimizer, self.start))
        elif self.cfg.parallel == "fsdp":
            raise UserError(f"--resume: {self.start} was written by a --parallel ddp run; resume it with --parallel "
                            f"ddp (an fsdp run saves its optimizer in shards, a ddp run whole)")
        else:
            load_optimizer_state(optimizer, lambda: optimizer.load_state_dict(self.state["optimizer"]))

    def save(self, step: int, model, optimizer, batches) -> str:
        """ckpt_<step> with everything an exact resume needs; every rank calls it (RNG states and optimizer
        shards are gathered), rank 0 writes and returns the path."""
        cfg = self.cfg
        state = {"step": step, "train_loader": batches.state_dict(), "rng": runtime.gather_objects(runtime.rng_state()),
                 "train_config": dataclasses.asdict(cfg), "data": self.data}
        weights = staged = None
        if parallel.is_sharded(model):  # every rank writes its optimizer shard, rank 0 the rest, then renames
            weights = parallel.full_weights(model)
            staged = checkpoint.staging_folder(cfg.out_dir, step, self.run_id)
            parallel.save_optimizer(model, optimizer, staged)
        else:
            state["optimizer"] = optimizer.state_dict()
        path = ""
        if self.ctx.is_master:
            path = checkpoint.save_checkpoint(cfg.out_dir, step, model, self.tokenizer, state, run_id=self.run_id,
                                              keep=cfg.keep_checkpoints, protect=self.kept, weights=weights,
                                              staged=staged)
        runtime.barrier()  # no rank runs on (or exits) while the checkpoint is still being renamed
        return path

    def nan_error(self, step: int) -> UserError:
        last = checkpoint.list_checkpoints(self.cfg.out_dir) if self.ctx.is_master else []
        return UserError(f"the loss became nan or inf by step {step}; stopping without saving. The last good "
                         f"checkpoint is {last[-1] if last else 'none'}: resume from it with a lower "
                         f"--learning-rate and --allow-lr-change")


def choose(folder: RunFolder, cfg: TrainConfig, ctx: runtime.Dist) -> tuple[Optional[str], str]:
    """(checkpoint or None, run id). Rank 0 holds the folder and chooses; every rank then checks that it reads
    the same checkpoint, since a node-local --out-dir would otherwise let ranks resume from different steps."""
    choice = None
    if ctx.is_master:
        try:
            folder.hold()
            ckpt = folder.choose(cfg.resume, cfg.overwrite, cfg.resume_step)
            run_id = checkpoint.read_meta(ckpt).get("run_id") if ckpt else uuid.uuid4().hex
            choice = {"ckpt": ckpt, "run_id": run_id}
        except UserError as e:
            choice = {"error": str(e)}
    choice = runtime.broadcast_object(choice)
    if "error" in choice:
        raise UserError(choice["error"])
    ckpt, run_id = choice["ckpt"], choice["run_id"]
    if ckpt is not None:
        problem = None  # rank 0 read it above; a damaged file is then the same error on every rank, later
        if not ctx.is_master:
            try:
                if checkpoint.read_meta(ckpt).get("run_id") != run_id:
                    problem = "another run's checkpoint of that name"
            except UserError:
                problem = "no such checkpoint"
        problems = [p for p in runtime.gather_objects((ctx.rank, socket.gethostname(), problem)) if p[2]]
        if problems:
            rank, host, problem = problems[0]
            raise UserError(f"rank {rank} on host {host} cannot read {ckpt}, which rank 0 resumes from ({problem} "
                            f"there): --out-dir must be one shared file system for all nodes")
    return ckpt, run_id


def check_resume(ckpt: str, state: dict, model_cfg: GPTConfig, cfg: TrainConfig, data: list):
    """Refuse, in one line, new flags that would silently change what the resumed run trains on or jump its
    learning rate; batch size and process count may change (the data position is in tokens)."""
    saved_model = checkpoint.read_meta(ckpt)["model"]
    if saved_model != model_cfg:
        diff = [f"{k}: {v} there, {getattr(model_cfg, k)} now" for k, v in dataclasses.asdict(saved_model).items()
                if getattr(model_cfg, k) != v]
        raise UserError(f"--resume: {ckpt} was trained with a different model config ({', '.join(diff)}); "
                        f"use the same flags or another --out-dir")
    saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    for name in DATA_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise UserError(f"--resume: {name} was {getattr(saved, name)} in {ckpt}, now {getattr(cfg, name)}; that "
                            f"changes which data the run reads. Use the saved value, or start a new --out-dir")
    if saved.optimizer != cfg.optimizer:
        raise UserError(f"--resume: {ckpt} was trained with --optimizer {saved.optimizer}, now {cfg.optimizer}; its "
                        f"optimizer state does not fit another optimizer. Use --optimizer {saved.optimizer}, or start "
                        f"a new --out-dir")
    if state.get("data", data) != data:
        raise UserError(f"--resume: the training data in {cfg.data_dir} is not the data {ckpt} was trained on "
                        f"(shards or their sizes differ; it read {saved.data_dir}); point --data-dir at that data")
    step = state["step"]
    old, new = lrs_at(step, saved), lrs_at(step, cfg)
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(old, new)) and not cfg.allow_lr_change:
        changed = [f"{n} {getattr(saved, n)} -> {getattr(cfg, n)}" for n in SCHEDULE_FIELDS
                   if getattr(saved, n) != getattr(cfg, n)]
        hint = ("a cosine schedule cannot be extended: train with --lr-schedule wsd, which extends from any "
                "checkpoint before its decay" if saved.lr_schedule == "cosine" and saved.max_steps != cfg.max_steps
                else f"a wsd run extends from a checkpoint before its decay began (step {decay_start(saved)}): "
                     f"--resume --resume-step N" if saved.lr_schedule == "wsd" else "use the saved values")
        old, new = (" and ".join(f"{lr:.3e}" for lr in lrs) for lrs in (old, new))
        raise UserError(f"--resume: the learning rate at step {step} would jump from {old} to {new} "
                        f"({', '.join(changed)}); {hint}, or pass --allow-lr-change to accept the jump")


def lrs_at(step: int, cfg: TrainConfig) -> list:
    """AdamW's learning rate at step, then Muon's when the run uses it: the schedule scales both alike."""
    lr = lr_at(step, cfg)
    return [lr] + ([lr * muon_lr(cfg) / cfg.learning_rate] if cfg.optimizer == "muon" else [])
