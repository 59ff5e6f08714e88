"""hardware.py: the datasheet peak a GPU's name selects (whole model names, the most specific one), no MFU for a
GPU the table does not name, TF32 switched on through the API the installed torch wants, and a CPU allocator that
reuses freed memory instead of faulting in fresh pages every step."""
import platform
import subprocess
import sys

import pytest
import torch

import hardware
from helpers import REPO
from log import RunLog


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),  # L40 is not an L4
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H800", 989e12), ("NVIDIA H20", 148e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("AMD Instinct MI300X", 1307e12),
    ("NVIDIA A10G", None), ("Tesla T4", None), ("NVIDIA GeForce RTX 4080", None), ("NVIDIA H100X", None),
])
def test_datasheet_peak_matches_whole_model_names(name, peak):
    assert hardware.datasheet_peak(name) == peak


def test_an_unknown_gpu_gets_no_peak_and_its_log_line_no_mfu(monkeypatch, tmp_path, capsys):
    """No guessed or timed figure for a GPU the table does not name: the log line leaves MFU out."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12
    log = RunLog(str(tmp_path), True, max_steps=10)
    log.start(0)
    for peak in (None, 1e12):
        log.training(1, 2.0, 1.0, 1e-3, 0.5, tokens_per_step=1000, flops_per_token=1e6, peak_flops=peak,
                     peak_memory=0)
    without, with_peak = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "mfu" not in without and "mfu 0.2%" in with_peak, (without, with_peak)


@pytest.mark.parametrize("new_torch", [True, False])
def test_tf32_through_fp32_precision_where_torch_has_it_else_allow_tf32(monkeypatch, new_torch):
    """torch 2.9+ deprecates allow_tf32 for fp32_precision; older torch has only allow_tf32. Stand-ins for the two
    backends record which switch was thrown."""
    class Backend:
        def __init__(self):
            if new_torch:
                self.fp32_precision = "ieee"
    matmul, cudnn = Backend(), Backend()
    cudnn.conv = Backend()
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    hardware.configure(torch.device("cuda"))
    if new_torch:
        assert (matmul.fp32_precision, cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert not hasattr(matmul, "allow_tf32") and not hasattr(cudnn, "allow_tf32")
    else:
        assert matmul.allow_tf32 and cudnn.allow_tf32


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_cpu_training_step_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    """train.train_step of a model whose logits, gradients and their temporaries are tens of MB (GPT-2's vocabulary),
    in a fresh process: the pages faulted in during its fourth step, with and without hardware.configure. glibc
    maps such blocks anew each time by default, so every step pays for zeroed pages from the kernel again."""
    code = ("import resource, sys, torch, hardware\n"
            "from config import GPTConfig, TrainConfig, fill_schedule_defaults\n"
            "from model import GPT\n"
            "from optimizer import build_optimizer, build_scaler\n"
            "from train import train_step\n"
            "cpu = torch.device('cpu')\n"
            "if sys.argv[1] == 'configured': hardware.configure(cpu)\n"
            "model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64, vocab_size=50257))\n"
            "optimizer = build_optimizer(model, fill_schedule_defaults(TrainConfig()), cpu)\n"
            "scaler, data = build_scaler(torch.float32, cpu), torch.randint(0, 50257, (8, 65))\n"
            "batches = iter(lambda: (data[:, :-1], data[:, 1:]), None)\n"
            "faults = []\n"
            "for _ in range(4):\n"
            "    train_step(model, optimizer, scaler, batches, 1, 1e-3, 1.0, torch.float32)\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)\n"
            "print(faults[-1] - faults[-2])\n")
    per_step = {how: int(subprocess.run([sys.executable, "-c", code, how], cwd=REPO, capture_output=True, text=True,
                                        check=True).stdout) for how in ("default", "configured")}
    logits_pages = 8 * 64 * 50304 * 4 // 4096
    assert per_step["default"] > logits_pages and per_step["configured"] < logits_pages / 10, per_step
