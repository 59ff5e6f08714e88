"""The run's log: log.jsonl in the run folder (one JSON object per logged step or evaluation), the console line,
and wandb. Rank 0 writes; the other ranks' RunLog does nothing. No torch here, so plot.py and --help stay fast.
"""
import json
import os
import uuid
from typing import Optional

from atomic import write_file
from errors import UserError

LOG = "log.jsonl"
WANDB_ID = "wandb_id"  # the run folder's wandb run: a resumed run continues it


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl in order. A last line without its newline was cut short (a kill or a full disk
    mid-write, or a write still under way): it is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                continue
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); is it a log.jsonl written by train.py?")
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise UserError(f"{path}:{lineno}: not a log record (a JSON object with a numeric 'step'); "
                            f"is it a log.jsonl written by train.py?")
        records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunLog:
    """log.jsonl, the console and wandb for one run, written by rank 0 (enabled)."""

    def __init__(self, out_dir: str, enabled: bool, max_steps: int):
        self.out_dir, self.enabled, self.max_steps = out_dir, enabled, max_steps
        self.path = os.path.join(out_dir, LOG)
        self.wandb = None

    def start(self, step: int):
        """Keep the records up to `step` (a resumed run redoes the steps logged after its checkpoint; a fresh run
        keeps none), dropping a line cut short by a kill or a full disk, with a note."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            print(f"note: the last line of {self.path} was cut short (killed mid-write?); dropped", flush=True)
        keep = [r for r in read_log(self.path) if step > 0 and r["step"] <= step]
        write_file(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def start_wandb(self, project: str, name: Optional[str], config: dict, fresh: bool):
        """One wandb run per run folder: its id is kept there, so a resumed run (another process, another node)
        continues the same wandb run; wandb's own files go under the run folder (not the current directory) unless
        WANDB_DIR says where."""
        if not self.enabled:
            return
        import wandb

        id_path = os.path.join(self.out_dir, WANDB_ID)
        run_id = None if fresh or not os.path.isfile(id_path) else open(id_path).read().strip()
        if not run_id:
            run_id = uuid.uuid4().hex[:16]
            write_file(id_path, run_id + "\n")
        self.wandb = wandb.init(project=project, name=name, config=config, id=run_id, resume="allow",
                                dir=os.environ.get("WANDB_DIR", self.out_dir))

    def training(self, step: int, loss: float, grad_norm: float, lr: float, seconds_per_step: Optional[float],
                 tokens_per_step: int, flops_per_token: float, peak_flops: Optional[float], peak_memory: float,
                 **extra):
        """One line for a log window: loss and gradient norm (already agreed across ranks), speed, MFU (where the
        peak FLOP/s is known), the peak memory so far (bytes) and the time left at this window's speed."""
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **extra}
        line = f"step {step:6d}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f}"
        if "skipped_steps" in extra:  # float16: steps the gradient scaler skipped in this window
            line += f" | skipped {extra['skipped_steps']}"
        if seconds_per_step is not None:
            tps = tokens_per_step / seconds_per_step
            left = (self.max_steps - step) * seconds_per_step
            record.update(tokens_per_sec=tps, ms_per_step=seconds_per_step * 1000, seconds_left=left)
            line += f" | {seconds_per_step * 1000:.0f} ms | {tps:,.0f} tok/s"
            if peak_flops:
                record["mfu"] = flops_per_token * tps / peak_flops
                line += f" | mfu {record['mfu']:.1%}"
            line += f" | {format_duration(left)} left"
        record["peak_memory_mb"] = peak_memory / 2**20
        line += f" | mem {peak_memory / 2**30:.2f} GiB"
        self.write(record, line)

    def write(self, record: dict, console: str = ""):
        if not self.enabled:
            return
        if console:
            print(console, flush=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, a lost NFS handle: name the file (a failed write does not)
            raise UserError(f"cannot append to {self.path}: {e.strerror or e}; make room, then continue with "
                            f"--resume")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


def format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"
