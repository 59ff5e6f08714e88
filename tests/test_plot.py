"""plot.py: log.jsonl in, a PNG out; bad input is one line and exit code 2."""
import json
from pathlib import Path

import pytest

import plot
from errors import UserError
from helpers import assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(folder: Path, steps=range(10, 101, 10), eval_every=50, hellaswag=False) -> Path:
    """A log.jsonl shaped like train.py's: a record per logged step, one per evaluation."""
    path = folder / "log.jsonl"
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 8.0 - step / 20, "lr": 1e-3, "grad_norm": 0.7,
                                "tokens_per_sec": 20480.0, "ms_per_step": 200.0, "mfu": 0.01}) + "\n")
            if step % eval_every == 0:
                f.write(json.dumps({"step": step, "val_loss": 8.2 - step / 20}) + "\n")
                if hellaswag:
                    f.write(json.dumps({"step": step, "hellaswag_acc_norm": 0.25 + step / 1000}) + "\n")
    return path


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_cli_writes_png_beside_log(tmp_path):
    write_log(tmp_path, hellaswag=True)
    result = run_cli("plot.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "loss.png")
    assert str(tmp_path / "loss.png") in result.stdout
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []  # the temporary file was renamed


def test_log_file_and_out_flag(tmp_path):
    log = write_log(tmp_path)
    out = tmp_path / "plots" / "curve.png"  # a folder that does not exist yet
    plot.main([str(log), "--out", str(out)])
    assert_png(out)
    plot.main([str(log), "--out", str(out)])  # overwriting works too
    assert_png(out)


def test_val_only_and_partial_last_line(tmp_path):
    """An evaluation-only log plots; a last line still being written (no newline) is skipped."""
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 5, "val_loss": 3.0}) + "\n" + '{"step": 6, "lo')
    plot.main([str(tmp_path)])
    assert_png(tmp_path / "loss.png")


def test_series_and_tokens_per_step():
    records = [{"step": 2, "loss": 2.0, "tokens_per_sec": 1000.0, "ms_per_step": 4096.0},
               {"step": 1, "loss": 3.0, "tokens_per_sec": 2000.0, "ms_per_step": 2048.0},
               {"step": 2, "val_loss": 2.5}, {"step": 2, "loss": 1.5}]
    assert plot.series(records, "loss") == ([1, 2], [3.0, 1.5])  # sorted; a repeated step keeps the last
    assert plot.series(records, "val_loss") == ([2], [2.5])
    assert plot.series(records, "hellaswag_acc_norm") == ([], [])
    assert plot.tokens_per_step(records) == 4096
    assert plot.tokens_per_step([{"step": 1, "loss": 1.0}]) is None


@pytest.mark.parametrize("content, words", [
    (None, ["no log.jsonl"]),
    ("", ["empty"]),
    ("\n\n", ["empty"]),
    ('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n', ["log.jsonl:2", "JSON"]),
    ('[1, 2]\n', ["log.jsonl:1"]),
    ('{"loss": 2.0}\n', ["step"]),
    ('{"step": 1, "lr": 0.001}\n', ["nothing to plot"]),
])
def test_bad_logs_are_one_line(tmp_path, content, words):
    if content is not None:
        (tmp_path / "log.jsonl").write_text(content)
    with pytest.raises(UserError) as err:
        plot.main([str(tmp_path)])
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_cli_bad_input_exit_2(tmp_path):
    assert_one_line_error(run_cli("plot.py", tmp_path / "missing.jsonl"), "no such file")
    (tmp_path / "log.jsonl").write_text("{oops\n")
    assert_one_line_error(run_cli("plot.py", tmp_path), "log.jsonl:1")
    assert not (tmp_path / "loss.png").exists()


def test_missing_matplotlib_says_how(tmp_path):
    write_log(tmp_path)
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', sys.argv[1]]; "
            "runpy.run_path('plot.py', run_name='__main__')")
    assert_one_line_error(run_cli("-c", code, tmp_path), "pip install matplotlib")


def test_help():
    result = run_cli("plot.py", "--help")
    assert result.returncode == 0 and "--out" in result.stdout
