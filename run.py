"""The run folder (--out-dir) and its one owner: fresh, resume or overwrite, the checkpoint a run starts from,
what a resume may change, each save, preemption, and the log (log.py). train.py asks it; nothing else writes
the folder.

    out/<run>/
        ckpt_0001000/ ...   checkpoints (checkpoint.py: one folder's format and name)
        log.jsonl           one JSON object per logged step or evaluation (log.py)
        wandb_id, wandb/    with --wandb: the run's wandb id (a resume continues it) and wandb's files
        .lock               held by the live run (an advisory lock the OS drops when the holder dies)

train.py settles the run's config, then drives a Run, in this order, each step needing the one before:
    model_cfg, cfg, source = configure(...)     the checkpoint a resume will start from, --init-from's source and
                                       the flags give the model config and the resolved recipe; nothing is
                                       written yet, so a refusal here leaves the folder as it was
    run = Run(...)                     rank 0 locks the folder and picks the start checkpoint, every rank checks
                                       that it reads the same one and that today's flags continue that run
    step = run.restore(raw_model, loader, source)   weights (the checkpoint's or the source's), data position,
                                       RNG: before the model is wrapped
    run.restore_optimizer(raw_model, optimizer, scaler)  the moments and float16's loss scale: after wrapping
                                       (FSDP's optimizer holds shards)
    run.save_due(step), run.save(...)  saves at the interval, the final step and the kept wsd one
"""
import dataclasses
import errno
import math
import os
import shutil
import signal
import socket
import uuid
from typing import Optional

import torch

import checkpoint
import distributed
import finetune
from config import GPTConfig, RunOptions, TrainConfig, fill_schedule_defaults, resolve
from errors import UserError
from model import CausalLM
from log import LOG, WANDB_ID, RunLog
from optimizer import load_optimizer_state
from schedule import decay_start, lr_at

try:
    import fcntl  # POSIX; Windows has none, and then the folder goes unlocked
except ImportError:
    fcntl = None

LOCK = ".lock"
DATA_FIELDS = ("total_batch_size", "seed", "shuffle")  # batch_size and world size resume exactly (see DataLoader)
SCHEDULE_FIELDS = ("max_steps", "learning_rate", "muon_lr", "min_lr", "warmup_steps", "lr_schedule",
                   "decay_fraction")
# flock's answers that mean "this file system cannot lock", not "another run holds the lock": NFS without lockd,
# Lustre mounted noflock. The run goes on unlocked, with a warning.
NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def configure(model_cfg: GPTConfig, cfg: TrainConfig, opts: RunOptions, explicit: set, meta: dict,
              world: distributed.World) -> tuple[GPTConfig, TrainConfig, Optional[CausalLM]]:
    """(model config, resolved recipe, source model or None) of the run the flags ask for, settled before anything
    is written: a resume's architecture and origin come from the checkpoint it will start from (looked up, not
    locked: Run locks the folder and chooses the same one), a fresh run's from --init-from's source if any
    (finetune.py; the source model is returned for Run.restore to copy), the rest from the flags (explicit: those
    given) and the data's meta.json (config.resolve)."""
    start = resume_checkpoint(cfg.out_dir, opts)
    state = checkpoint.load_train_state(start, mmap=True) if start else None  # mapped: only the recipe is read
    model_cfg, cfg, source = finetune.initial_model(model_cfg, cfg, explicit, meta, start, state, world.is_master)
    return (*resolve(model_cfg, cfg, explicit, meta, world.device.type), source)


class Run:
    """One training run in cfg.out_dir on this rank: `start` is the checkpoint it resumes from (None: fresh),
    `log` its RunLog. data is the training data's identity (Mixture.identity): a resume checks it and every
    save records it."""

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, opts: RunOptions, world: distributed.World,
                 tokenizer: str, data: list):
        self.model_cfg, self.cfg, self.world, self.tokenizer, self.data = model_cfg, cfg, world, tokenizer, data
        self.start, self.run_id = choose_start(cfg.out_dir, opts, world)
        # A CPU run keeps the optimizer moments in its own memory: read whole, they are its moments. On a GPU they
        # are copied to the device from the mapped file, and host memory holds no copy of its own.
        mapped = world.device.type != "cpu"
        self.state = checkpoint.load_train_state(self.start, mmap=mapped) if self.start else None
        if self.state is not None:
            check_resume(self.start, self.state, model_cfg, cfg, opts, data)
        # A wsd run keeps the checkpoint where its decay starts: a longer run (larger --max-steps) extends from it.
        self.kept = (decay_start(cfg),) if cfg.lr_schedule == "wsd" else ()
        self.log = RunLog(cfg.out_dir, world.is_master, cfg.max_steps)

    def restore(self, raw_model, loader, source=None) -> int:
        """Weights, data position and RNG streams of the start checkpoint into raw_model and loader; the step to go
        on from (0 for a fresh run, whose RNG streams are seeded per rank). A fresh run from trained weights
        (--init-from, configure) takes source's. Starts the log at that step."""
        rank, world_size = self.world.rank, self.world.world_size
        if self.state is None:
            if source is not None:
                checkpoint.copy_weights(source.state_dict(), raw_model, self.cfg.init_from)
            torch.manual_seed(self.cfg.seed + rank)  # dropout differs per rank
            step = 0
        else:
            checkpoint.load_weights(raw_model, self.start)
            loader.load_state_dict(self.state["train_loader"])
            step = self.state["step"]
            # Per-rank RNG streams continue exactly on the same world size; on another, each rank starts a new one.
            if len(self.state["rng"]) == world_size:
                distributed.set_rng_state(self.state["rng"][rank])
            else:
                torch.manual_seed(self.cfg.seed + rank + step * world_size)
        self.log.start(step)
        if self.cfg.wandb:
            config = {**dataclasses.asdict(raw_model.config), **dataclasses.asdict(self.cfg)}
            self.log.start_wandb(self.cfg.wandb_project, self.cfg.wandb_run_name, config, fresh=self.start is None)
        return step

    def restore_optimizer(self, raw_model, optimizer, scaler):
        """The start checkpoint's optimizer moments, whole or from the shards of an FSDP run (resharded), and
        float16's loss scale where the checkpoint has one (a run that changes --dtype to float16 starts a new scale).
        The start's state is dropped here: its tensors may map state.pt, which must not stay open for the run."""
        state, self.state = self.state, None
        if state is None:
            return
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if checkpoint.has_optimizer_shards(self.start):
            load_optimizer_state(optimizer, lambda: checkpoint.load_optimizer_shards(raw_model, optimizer, self.start))
        elif self.cfg.parallel in distributed.SHARDED:
            raise UserError(f"--resume: {self.start} was written by a --parallel ddp run; resume it with --parallel "
                            f"ddp (a {self.cfg.parallel} run saves its optimizer in shards, a ddp run whole)")
        else:
            load_optimizer_state(optimizer, lambda: optimizer.load_state_dict(state["optimizer"]))

    def save_due(self, step: int) -> bool:
        """At the checkpoint interval, at the final step, and at the wsd checkpoint that is kept."""
        cfg = self.cfg
        return due(step, cfg.checkpoint_interval, cfg.max_steps) or step == cfg.max_steps or step in self.kept

    def save(self, step: int, raw_model, optimizer, scaler, batches) -> str:
        """ckpt_<step> with everything an exact resume needs; every rank calls it (RNG states and optimizer
        shards are gathered), rank 0 writes and returns the path. float16's loss scale is alike on every rank."""
        cfg = self.cfg
        state = {"step": step, "train_loader": batches.state_dict(),
                 "rng": distributed.gather_objects(distributed.rng_state()),
                 "train_config": dataclasses.asdict(cfg), "data": self.data, "scaler": scaler.state_dict()}
        weights = staged = None
        if distributed.is_sharded(raw_model):  # every rank writes its optimizer shard, rank 0 the rest, then renames
            weights = distributed.full_weights(raw_model)
            staged = checkpoint.staging_folder(cfg.out_dir, step, self.run_id)
            checkpoint.save_optimizer_shards(raw_model, optimizer, staged)
        else:
            state["optimizer"] = optimizer.state_dict()
        path = ""
        if self.world.is_master:
            path = checkpoint.save_checkpoint(cfg.out_dir, step, raw_model, self.tokenizer, state, run_id=self.run_id,
                                              keep=cfg.keep_checkpoints, protect=self.kept, weights=weights,
                                              staged=staged)
        distributed.barrier()  # no rank runs on (or exits) while the checkpoint is still being renamed
        return path

    def nan_error(self, step: int) -> UserError:
        last = checkpoint.list_checkpoints(self.cfg.out_dir) if self.world.is_master else []
        return UserError(f"the loss became nan or inf by step {step}; stopping without saving. The last good "
                         f"checkpoint is {last[-1] if last else 'none'}: resume from it with a lower "
                         f"--learning-rate and --allow-lr-change")


def due(step: int, interval: int, max_steps: int) -> bool:
    """Every `interval` steps and at the end; never when interval is 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


# ---- the start checkpoint: chosen by rank 0, checked by all

def choose_start(out_dir: str, opts: RunOptions, world: distributed.World) -> tuple[Optional[str], str]:
    """(checkpoint or None, run id). Rank 0 locks the folder and chooses; every rank then checks that it reads
    the same checkpoint, since a node-local --out-dir would otherwise let ranks resume from different steps."""
    choice = None
    if world.is_master:
        try:
            lock(out_dir)
            ckpt = choose_checkpoint(out_dir, opts)
            run_id = checkpoint.read_checkpoint_meta(ckpt).get("run_id") if ckpt else uuid.uuid4().hex
            choice = {"ckpt": ckpt, "run_id": run_id}
        except UserError as e:
            choice = {"error": str(e)}
    choice = distributed.broadcast_object(choice)
    if "error" in choice:
        raise UserError(choice["error"])
    ckpt, run_id = choice["ckpt"], choice["run_id"]
    if ckpt is not None:
        problem = None  # rank 0 read it above; a damaged file is then the same error on every rank, later
        if not world.is_master:
            try:
                if checkpoint.read_checkpoint_meta(ckpt).get("run_id") != run_id:
                    problem = "another run's checkpoint of that name"
            except UserError:
                problem = "no such checkpoint"
        problems = [p for p in distributed.gather_objects((world.rank, socket.gethostname(), problem)) if p[2]]
        if problems:
            rank, host, problem = problems[0]
            raise UserError(f"rank {rank} on host {host} cannot read {ckpt}, which rank 0 resumes from ({problem} "
                            f"there): --out-dir must be one shared file system for all nodes")
    return ckpt, run_id


_held = []  # the open lock files of this process: a lock lives as long as its file stays open


def lock(out_dir: str):
    """One live run per folder: a second train.py on it (a requeued job while the old one still runs, a typo in a
    launch script) stops here, naming the holder. flock dies with its process, so kill -9 leaves no stale lock.
    Where the file system cannot lock (NFS without lockd, Lustre mounted noflock) or Python has no fcntl
    (Windows), one warning, and the run goes on unlocked."""
    os.makedirs(out_dir, exist_ok=True)
    if fcntl is None:
        print(f"warning: no fcntl on this platform: {out_dir} is not locked against a second run", flush=True)
        return
    f = open(os.path.join(out_dir, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in NO_LOCKING:
            f.close()
            print(f"warning: the file system of {out_dir} cannot lock files ({os.strerror(e.errno)}; NFS without "
                  f"lockd, or Lustre mounted noflock/localflock?): nothing stops a second run on this folder",
                  flush=True)
            return
        f.seek(0)
        holder = f.read().split() or ["?", "?"]
        f.close()
        raise UserError(f"{out_dir} is in use by a live run (host {holder[0]}, pid {holder[-1]}); wait for it "
                        f"to end or stop it, or choose another --out-dir")
    f.seek(0)
    f.truncate()
    f.write(f"{socket.gethostname()} {os.getpid()}\n")
    f.flush()
    _held.append(f)  # held until this process ends


def resume_checkpoint(out_dir: str, opts: RunOptions) -> Optional[str]:
    """The checkpoint choose_checkpoint will resume from, looked up without touching the folder (None: a fresh
    run), for what must be settled before the Run exists (configure: the architecture)."""
    found = checkpoint.list_checkpoints(out_dir) if opts.resume else []
    if opts.resume_step is not None:
        found = [p for p in found if checkpoint.checkpoint_step(p) == opts.resume_step]
    return found[-1] if found else None


def choose_checkpoint(out_dir: str, opts: RunOptions) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run, after making the folder fit for it."""
    found = checkpoint.list_checkpoints(out_dir)
    log_path = os.path.join(out_dir, LOG)
    if opts.resume and opts.resume_step is not None:
        return branch_at(out_dir, found, opts.resume_step)
    if opts.resume:
        if found:
            return found[-1]
        print(f"no checkpoint in {out_dir}: starting from scratch", flush=True)
    elif found or os.path.exists(log_path):
        what = f"{len(found)} checkpoint(s) up to {os.path.basename(found[-1])}" if found else "a log.jsonl"
        if not opts.overwrite:
            raise UserError(f"{out_dir} holds an earlier run ({what}); continue it with --resume, or start "
                            f"over with --overwrite (deletes its checkpoints and log), or choose another --out-dir")
        for path in found:
            shutil.rmtree(path)
        for name in (LOG, WANDB_ID):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        print(f"--overwrite: deleted the earlier run in {out_dir} ({what})", flush=True)
    return None


def branch_at(out_dir: str, found: list[str], step: int) -> str:
    """Resume from an earlier checkpoint (to extend a run from before its decay, say): the later checkpoints and
    the log are moved into a subfolder, so the newest checkpoint here is again this run's and nothing is lost."""
    chosen = [p for p in found if checkpoint.checkpoint_step(p) == step]
    if not chosen:
        steps = ", ".join(str(checkpoint.checkpoint_step(p)) for p in found) or "none"
        raise UserError(f"--resume-step {step}: no {checkpoint.checkpoint_name(step)} in {out_dir} (checkpoints at "
                        f"steps: {steps})")
    later = [p for p in found if checkpoint.checkpoint_step(p) > step]
    if later:
        aside = os.path.join(out_dir, f"after_{step:07d}")
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = os.path.join(out_dir, f"after_{step:07d}.{n}")
        os.makedirs(aside)
        for p in later:
            os.rename(p, os.path.join(aside, os.path.basename(p)))
        if os.path.exists(os.path.join(out_dir, LOG)):
            shutil.copyfile(os.path.join(out_dir, LOG), os.path.join(aside, LOG))
        print(f"--resume-step {step}: moved the {len(later)} later checkpoint(s) and a copy of the log to "
              f"{aside}", flush=True)
    return chosen[0]


# ---- what a resume may change

def check_resume(ckpt: str, state: dict, model_cfg: GPTConfig, cfg: TrainConfig, opts: RunOptions, data: list):
    """Refuse, in one line, new flags that would silently change what the resumed run trains on or jump its
    learning rate; batch size and process count may change (the data position is in tokens)."""
    saved_model = checkpoint.read_checkpoint_meta(ckpt)["model"]
    if saved_model != model_cfg:
        diff = [f"{k}: {v} there, {getattr(model_cfg, k)} now" for k, v in dataclasses.asdict(saved_model).items()
                if getattr(model_cfg, k) != v]
        raise UserError(f"--resume: {ckpt} was trained with a different model config ({', '.join(diff)}); "
                        f"use the same flags or another --out-dir")
    fields = TrainConfig.__dataclass_fields__  # older checkpoints also saved the run options: not recipe
    saved = fill_schedule_defaults(TrainConfig(**{k: v for k, v in state["train_config"].items() if k in fields}))
    for name in DATA_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise UserError(f"--resume: {name} was {getattr(saved, name)} in {ckpt}, now {getattr(cfg, name)}; that "
                            f"changes which data the run reads. Use the saved value, or start a new --out-dir")
    if saved.optimizer != cfg.optimizer:
        raise UserError(f"--resume: {ckpt} was trained with --optimizer {saved.optimizer}, now {cfg.optimizer}; its "
                        f"optimizer state does not fit another optimizer. Use --optimizer {saved.optimizer}, or start "
                        f"a new --out-dir")
    if state.get("data", data) != data:
        weights = f" weighted {saved.data_weights}" if saved.data_weights else ""
        raise UserError(f"--resume: the training data in {cfg.data_dir} is not the data {ckpt} was trained on "
                        f"(folders, weights, shards or their sizes differ; it read {saved.data_dir}{weights}); point "
                        f"--data-dir and --data-weights at that data")
    step = state["step"]
    old, new = lrs_at(step, saved), lrs_at(step, cfg)
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(old, new)) and not opts.allow_lr_change:
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
    return [lr] + ([lr * cfg.muon_lr / cfg.learning_rate] if cfg.optimizer == "muon" else [])


class StopFlag:
    """SIGTERM (a preempted cloud job) or Ctrl-C: the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
