"""Files and folders that appear whole or not at all: written under a temporary name beside the target, then
renamed over it. A reader, or a rerun after kill -9, sees the old version or the new one, never half of one.

    with atomic_write("out/meta.json") as tmp:
        Path(tmp).write_text(...)
"""
import contextlib
import json
import os
import shutil
from typing import Optional


@contextlib.contextmanager
def atomic_write(path, tmp: Optional[str] = None, durable: bool = False):
    """Yield a temporary path to write a file or a folder at; when the block ends, rename it to `path` (an
    existing folder there is swapped out, then deleted). If the block raises, the temporary path is removed.

    tmp: the temporary name, when others must find it (ranks writing into one checkpoint); default path.tmp-PID.
    durable: fsync what was written before the rename and the folder after it, so that a power cut cannot leave
    a renamed file whose data never reached the disk (shards, checkpoints)."""
    path = os.fspath(path).rstrip(os.sep)
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if os.path.isdir(path):  # os.replace cannot put a folder over a folder: swap, then drop the old one
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        if durable:
            _fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        remove(tmp)
        raise


def write_file(path, data):
    """A whole file of text (str, as UTF-8) or bytes, atomically."""
    with atomic_write(path) as tmp, open(tmp, "w" if isinstance(data, str) else "wb",
                                         **({"encoding": "utf-8"} if isinstance(data, str) else {})) as f:
        f.write(data)


def write_json(path, obj, indent: int = 1):
    """obj as a JSON file, atomically."""
    write_file(path, json.dumps(obj, indent=indent) + "\n")


def remove(path: str):
    """A file or folder, if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_tree(path: str):
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
