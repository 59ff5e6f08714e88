"""bench.py: --quick runs every section end to end and writes BENCHMARKS.md; --only keeps the other sections.
No figure is checked: timings prove nothing on a shared machine."""
from pathlib import Path

import pytest

import bench
from helpers import run_cli


def test_only_replaces_its_sections_and_keeps_the_others(tmp_path):
    out = str(tmp_path / "B.md")
    bench.write_report(out, {"train": "train v1\n", "memory": "memory v1\n"})
    bench.write_report(out, {"memory": "memory v2\n", "data": "data v1\n"})
    text = Path(out).read_text()
    assert "train v1" in text and "memory v2" in text and "data v1" in text and "memory v1" not in text
    assert text.index("train v1") < text.index("data v1") < text.index("memory v2")  # in SECTIONS order


def quick(tmp_path, *only) -> tuple[str, str]:
    """(stdout, report) of bench.py --quick on one thread, the sections named in only (all when none)."""
    out = tmp_path / "B.md"
    result = run_cli("bench.py", "--quick", *(("--only", ",".join(only)) if only else ()), "--threads", 1, "--out",
                     out, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, out.read_text()


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path, gpt2_tiktoken):
    stdout, text = quick(tmp_path)
    for name in bench.SECTIONS:
        if name in ("nanogpt", "stepmem"):  # they need a nanoGPT work tree (--nanogpt PATH): without, they skip
            assert f"{name}: skipped" in stdout and f"<!-- bench:{name} -->" not in text
        elif name in bench.OPT_IN:  # only when --only names it
            assert f"<!-- bench:{name} -->" not in text
        else:
            assert f"<!-- bench:{name} -->" in text
    assert "FAILED" not in text and "tok/s" in text


@pytest.mark.slow
def test_quick_recipe_trains_every_recipe_on_both_corpora_and_draws_them(tmp_path, gpt2_tiktoken):
    _, text = quick(tmp_path, "recipe")
    for corpus in ("tinytales", "real English"):
        for recipe in bench.RECIPES:
            assert f"| {corpus}: {recipe} | val loss " in text
    assert "FAILED" not in text and (tmp_path / "B-recipe.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_muon_times_each_run(tmp_path):
    _, text = quick(tmp_path, "muon")
    assert all(f": {name} | " in text for name in bench.MUON_RUNS) and "FAILED" not in text


def test_gpu_section_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "B.md"
    result = run_cli("bench.py", "--only", "gpu", "--device", "cpu", "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("no CUDA GPU here") == 1
    assert not out.exists() and "Traceback" not in result.stderr
