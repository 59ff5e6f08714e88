"""The run folder (--out-dir) and its one owner: every rule about what lives there is here.

    out/<run>/
        ckpt_0001000/ ...   checkpoints (checkpoint.py writes one); "newest" always means the highest step
        log.jsonl           one JSON object per logged step or evaluation
        .lock               held by the live run (an advisory lock the OS drops when the holder dies)

A fresh run never writes over an older one: it stops and offers --resume or --overwrite. No torch here, so
plot.py and --help stay fast.
"""
import fcntl
import json
import os
import re
import shutil
import socket
from typing import Optional

from atomic import write_file
from errors import UserError

CKPT_RE = re.compile(r"^ckpt_(\d+)$")
LOG = "log.jsonl"
LOCK = ".lock"


def checkpoint_step(path: str) -> int:
    return int(CKPT_RE.match(os.path.basename(path)).group(1))


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in out_dir, lowest step first. Temporary folders never match the name pattern."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if CKPT_RE.match(n)]
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(CKPT_RE.match(n).group(1)))]


def find_checkpoint(path: str) -> str:
    """path itself if it is a checkpoint, else the newest checkpoint of the run folder path, else of the one run
    folder inside path that has checkpoints (two or more are ambiguous: the user names one)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    runs = [os.path.join(path, sub) for sub in sorted(os.listdir(path))] if os.path.isdir(path) else []
    runs = [run for run in runs if list_checkpoints(run)]
    if len(runs) > 1:
        raise UserError(f"{path} holds several runs ({', '.join(runs)}); name one with --checkpoint DIR")
    if not runs:
        raise UserError(f"no checkpoint in {path}: train one with train.py, or name one with --checkpoint DIR")
    return list_checkpoints(runs[0])[-1]


def prune(out_dir: str, keep: int, protect: tuple = ()):
    """Keep the newest `keep` checkpoints (0 keeps all) and those at the steps in `protect`; drop the leftovers
    of saves killed half-way."""
    if keep > 0:
        for path in list_checkpoints(out_dir)[:-keep]:
            if checkpoint_step(path) not in protect:
                shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(out_dir):
        if name.startswith(".ckpt_"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


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


class RunFolder:
    """The owner of one run folder, on the rank that writes it (rank 0)."""

    def __init__(self, path: str):
        self.path = path
        self.log_path = os.path.join(path, LOG)
        self._lock = None

    def hold(self):
        """One live run per folder: a second train.py on it (a requeued job while the old one still runs, a typo in
        a launch script) stops here, naming the holder. flock dies with its process, so kill -9 leaves no stale lock."""
        os.makedirs(self.path, exist_ok=True)
        f = open(os.path.join(self.path, LOCK), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().split() or ["?", "?"]
            f.close()
            raise UserError(f"{self.path} is in use by a live run (host {holder[0]}, pid {holder[-1]}); wait for it "
                            f"to end or stop it, or choose another --out-dir")
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
        self._lock = f  # held until this process ends

    def checkpoints(self) -> list[str]:
        return list_checkpoints(self.path)

    def choose(self, resume: bool, overwrite: bool, resume_step: Optional[int] = None) -> Optional[str]:
        """The checkpoint to resume from, or None for a fresh run, after making the folder fit for it."""
        found = self.checkpoints()
        if resume and resume_step is not None:
            return self._branch_at(found, resume_step)
        if resume:
            if found:
                return found[-1]
            print(f"no checkpoint in {self.path}: starting from scratch", flush=True)
        elif found or os.path.exists(self.log_path):
            what = f"{len(found)} checkpoint(s) up to {os.path.basename(found[-1])}" if found else "a log.jsonl"
            if not overwrite:
                raise UserError(f"{self.path} holds an earlier run ({what}); continue it with --resume, or start "
                                f"over with --overwrite (deletes its checkpoints and log), or choose another --out-dir")
            for path in found:
                shutil.rmtree(path)
            if os.path.exists(self.log_path):
                os.remove(self.log_path)
            print(f"--overwrite: deleted the earlier run in {self.path} ({what})", flush=True)
        return None

    def _branch_at(self, found: list[str], step: int) -> str:
        """Resume from an earlier checkpoint (to extend a run from before its decay, say): the later checkpoints and
        the log are moved into a subfolder, so the newest checkpoint here is again this run's and nothing is lost."""
        chosen = [p for p in found if checkpoint_step(p) == step]
        if not chosen:
            steps = ", ".join(str(checkpoint_step(p)) for p in found) or "none"
            raise UserError(f"--resume-step {step}: no ckpt_{step:07d} in {self.path} (checkpoints at steps: {steps})")
        later = [p for p in found if checkpoint_step(p) > step]
        if later:
            aside = os.path.join(self.path, f"after_{step:07d}")
            n = 1
            while os.path.exists(aside):
                n += 1
                aside = os.path.join(self.path, f"after_{step:07d}.{n}")
            os.makedirs(aside)
            for p in later:
                os.rename(p, os.path.join(aside, os.path.basename(p)))
            if os.path.exists(self.log_path):
                shutil.copyfile(self.log_path, os.path.join(aside, LOG))
            print(f"--resume-step {step}: moved the {len(later)} later checkpoint(s) and a copy of the log to "
                  f"{aside}", flush=True)
        return chosen[0]

    def start_log(self, step: int):
        """Keep the records up to `step` (a resumed run redoes the steps logged after its checkpoint; a fresh run
        keeps none), dropping a line cut short by a kill or a full disk, with a note."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            print(f"note: the last line of {self.log_path} was cut short (killed mid-write?); dropped", flush=True)
        keep = [r for r in read_log(self.log_path) if step > 0 and r["step"] <= step]
        write_file(self.log_path, "".join(json.dumps(r) + "\n" for r in keep))

    def append_log(self, record: dict):
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file (a failed write does not)
            raise UserError(f"cannot append to {self.log_path}: {e.strerror or e}; make room, then continue with "
                            f"--resume")
