"""Plot a run's log.jsonl as a PNG: train and val loss against steps (and tokens), and HellaSwag when logged.

    python plot.py out/tiny                         # writes out/tiny/loss.png beside the log
    python plot.py out/tiny/log.jsonl --out run.png

Needs matplotlib (pip install matplotlib); the rest of the kit does not. Safe to run while training writes the log.
"""
import argparse
import math
import os
import statistics

from atomic import atomic_write
from errors import UserError, run_main
from log import read_log

CHANCE = 0.25  # HellaSwag has four endings


def find_log(path: str) -> str:
    """log.jsonl itself, or the one inside a run folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
        if not os.path.isfile(path):
            raise UserError(f"no log.jsonl in {os.path.dirname(path)}: train a run there first "
                            f"(python train.py --config tiny), or name a log.jsonl file")
    elif not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; give a run folder (e.g. out/tiny) or its log.jsonl")
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one key, sorted by step; a step logged twice keeps its last value."""
    points = {r["step"]: r[key] for r in records if _is_number(r.get(key))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def tokens_per_step(records: list[dict]):
    """Tokens per optimizer step, from tokens_per_sec x ms_per_step (both logged per step), or None."""
    estimates = [r["tokens_per_sec"] * r["ms_per_step"] / 1000 for r in records
                 if _is_number(r.get("tokens_per_sec")) and _is_number(r.get("ms_per_step"))]
    estimates = [e for e in estimates if math.isfinite(e) and e > 0]
    return round(statistics.median(estimates)) if estimates else None


def human(n: float) -> str:
    """1500 -> 1.5k, 2_000_000 -> 2M."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.4g}{suffix}"
    return f"{n:.4g}"


def figure(**kwargs):
    """A matplotlib Figure that draws to files only, never a window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: pip install matplotlib")
    return Figure(**kwargs)


def save_png(fig, out_path: str):
    """fig as a PNG at out_path, written to a temporary file and renamed over it."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with atomic_write(out_path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)  # the temporary name has no .png: give the format
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror or e}")


def plot(records: list[dict], out_path: str, title: str = ""):
    """Draw the records into a PNG at out_path."""
    fig = figure(figsize=(9, 7.5), layout="constrained")  # checks for matplotlib before anything else
    from matplotlib.ticker import FuncFormatter

    train = series(records, "loss")
    val = series(records, "val_loss")
    hellaswag = series(records, "hellaswag_acc_norm")
    if not train[0] and not val[0]:
        raise UserError("the log has no loss or val_loss yet: nothing to plot (is training still starting?)")

    fig.set_size_inches(9, 7.5 if hellaswag[0] else 5)
    axes = fig.subplots(2 if hellaswag[0] else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if train[0]:
        ax.plot(*train, label="train loss", color="tab:blue", linewidth=1.2)
    if val[0]:
        ax.plot(*val, label="val loss", color="tab:orange", marker="o", markersize=3.5, linewidth=1.2)
    ax.set_ylabel("loss (nats per token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    last = [f"{name} {values[-1]:.4f}" for name, (_, values) in (("train", train), ("val", val)) if values]
    ax.set_title((f"{title}: " if title else "") + f"step {max(train[0][-1:] + val[0][-1:])}, " + ", ".join(last))

    per_step = tokens_per_step(records)
    if per_step:  # tokens seen on a second axis along the top
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel(f"tokens ({per_step:,} per step)")
        top.xaxis.set_major_formatter(FuncFormatter(lambda t, _: human(t)))

    if hellaswag[0]:
        hs = axes[1]
        hs.plot(*hellaswag, label="HellaSwag acc_norm", color="tab:green", marker="o", markersize=3.5)
        hs.axhline(CHANCE, color="gray", linestyle="--", linewidth=1, label="chance (25%)")
        hs.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
        hs.set_ylabel("accuracy")
        hs.grid(True, alpha=0.3)
        hs.legend()
    axes[-1].set_xlabel("step")
    save_png(fig, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", metavar="OUT_DIR_or_LOG", help="a run folder (e.g. out/tiny) or its log.jsonl")
    parser.add_argument("--out", help="the PNG to write (default: loss.png beside the log)")
    args = parser.parse_args(argv)
    log_path = find_log(args.log)
    records = read_log(log_path)
    if not records:
        raise UserError(f"{log_path} is empty: nothing to plot yet (train.py writes a line every log_interval steps)")
    out_path = args.out or os.path.join(os.path.dirname(log_path), "loss.png")
    run_name = os.path.basename(os.path.dirname(os.path.abspath(log_path)))
    plot(records, out_path, title=run_name)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    run_main(main)
