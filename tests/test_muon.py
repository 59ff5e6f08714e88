"""muon.py: one process is torch.optim.Muon exactly; GPT-2's fused QKV matrix is q, k and v orthogonalised apart; on
2 ranks (DDP's whole parameters, FSDP's row shards) each rank orthogonalises only its share, a matrix costs one
broadcast or one gather and one scatter, and every rank ends with torch.optim.Muon's result exactly; train.py with
Muon under DDP and FSDP follows one process."""
import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist

import muon
from helpers import COMMON, REPO, TORCHRUN, read_log, run_cli, run_train

SETTINGS = dict(lr=0.02, weight_decay=0.1, momentum=0.95)


def torch_muon(params):
    return torch.optim.Muon(params, **SETTINGS, nesterov=True, adjust_lr_fn="match_rms_adamw")


def train(optimizer, params, grads):
    """optimizer.step() once per list of grads."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def random_grads(shapes, steps: int) -> list:
    return [[torch.randn(s) for s in shapes] for _ in range(steps)]


def test_one_process_is_torch_muon_exactly():
    torch.manual_seed(0)
    shapes = [(48, 32), (32, 96), (40, 40)]  # tall, wide, square
    init, grads = [torch.randn(s) for s in shapes], random_grads(shapes, 3)
    ours, theirs = ([torch.nn.Parameter(w.clone()) for w in init] for _ in range(2))
    ours_opt, theirs_opt = muon.Muon(ours, **SETTINGS), torch_muon(theirs)
    train(ours_opt, ours, grads)
    train(theirs_opt, theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(ours_opt.state[a]["momentum_buffer"], theirs_opt.state[b]["momentum_buffer"])


def test_the_fused_qkv_matrix_is_q_k_v_orthogonalised_apart():
    """A group with split=3 (GPT-2's c_attn, 3C x C) steps as torch.optim.Muon does on three C x C matrices,
    scale 0.2 sqrt(C) included; not as it does on the one 3C x C matrix."""
    torch.manual_seed(0)
    C = 32
    init, grads = torch.randn(3 * C, C), random_grads([(3 * C, C)], 3)
    fused = torch.nn.Parameter(init.clone())
    train(muon.Muon([{"params": [fused], "split": 3}], **SETTINGS), [fused], grads)
    apart = [torch.nn.Parameter(w.clone()) for w in init.chunk(3)]
    train(torch_muon(apart), apart, [g[0].chunk(3) for g in grads])
    whole = torch.nn.Parameter(init.clone())
    train(torch_muon([whole]), [whole], grads)
    assert torch.equal(fused, torch.cat(apart))
    assert (fused - whole).abs().max() > 1e-3


# Odd row counts shard unevenly over 2 ranks (32 + 31, 11 + 10), a single row leaves rank 1 an empty shard, and
# the split matrix's q/k/v blocks straddle the shard boundary.
SHAPES, SPLITS = [(63, 21), (21, 63), (1, 16), (64, 64), (63, 21)], [1, 1, 1, 1, 3]


def on_each_rank():
    """Under torchrun (test_two_ranks_...): our Muon on 2 ranks, with whole parameters as under DDP and with row-
    sharded DTensors as under FSDP, against torch.optim.Muon on whole tensors in this process. One JSON line per
    rank and layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks = []  # the shapes this rank orthogonalised
    plain = muon.orthogonalise
    muon.orthogonalise = lambda g: blocks.append(list(g.shape)) or plain(g)
    torch.manual_seed(0)  # the same weights and gradients on every rank, as DDP's averaging leaves them
    init, grads = [torch.randn(s) for s in SHAPES], random_grads(SHAPES, 3)
    apart = [torch.nn.Parameter(b.clone()) for w, k in zip(init, SPLITS) for b in w.chunk(k)]
    train(torch_muon(apart), apart, [[b for g, k in zip(gs, SPLITS) for b in g.chunk(k)] for gs in grads])
    ends = list(itertools.accumulate(SPLITS))
    expected = [torch.cat(apart[end - k:end]) for end, k in zip(ends, SPLITS)]
    for layout in ("ddp", "fsdp"):
        blocks.clear()
        shard = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if layout == "fsdp" else (lambda t: t)
        params = [torch.nn.Parameter(shard(w.clone())) for w in init]
        optimizer = muon.Muon([{"params": [p], "split": k} for p, k in zip(params, SPLITS)], **SETTINGS)
        local_grads = [[shard(g) for g in gs] for gs in grads]
        with CommDebugMode() as comms:
            train(optimizer, params, local_grads)
        whole = [p.full_tensor() if layout == "fsdp" else p.detach() for p in params]
        print(json.dumps({"rank": dist.get_rank(), "layout": layout, "blocks": blocks,
                          "collectives": {str(k): v for k, v in comms.get_comm_counts().items()},
                          "equal": [torch.equal(a, b) for a, b in zip(whole, expected)]}), flush=True)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_newton_schulz_work_and_get_torch_muons_result():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = run_cli("tests/test_muon.py", launcher=(*TORCHRUN, "--nproc_per_node=2"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    every_block = sorted([s // k, c] for (s, c), k in zip(SHAPES, SPLITS) for _ in range(k))
    for layout in ("ddp", "fsdp"):
        ranks = sorted((r for r in lines if r["layout"] == layout), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(all(r["equal"]) for r in ranks), ranks
        # 3 steps of each rank's share: together every block once a step, and neither rank does it all
        assert sorted(ranks[0]["blocks"] + ranks[1]["blocks"]) == sorted(every_block * 3), ranks
        assert all(0 < len(r["blocks"]) < len(every_block) * 3 for r in ranks), ranks
        # a matrix a step: one broadcast of the update (DDP), or one gather and one scatter (FSDP), and nothing else
        per_step = {"ddp": {"c10d.broadcast_": 1}, "fsdp": {"c10d.gather_": 1, "c10d.scatter_": 1}}[layout]
        assert all(r["collectives"] == {k: 3 * len(SHAPES) * n for k, n in per_step.items()} for r in ranks), ranks


@pytest.mark.slow
def test_muon_under_ddp_and_fsdp_follows_one_process(tmp_path, markov_dir):
    """GPT-2 (its fused QKV split three ways) 63 wide, so that every matrix shards unevenly over 2 ranks; float32,
    20 steps: the losses of DDP and FSDP stay within 1e-3 of one process's."""
    flags = [*COMMON, "--optimizer", "muon", "--n-embd", 63, "--n-head", 3, "--data-dir", markov_dir,
             "--max-steps", 20, "--checkpoint-interval", 100]
    run_train(*flags, "--out-dir", tmp_path / "one")
    run_train(*flags, "--out-dir", tmp_path / "ddp", torchrun=2)
    run_train(*flags, "--out-dir", tmp_path / "fsdp", "--parallel", "fsdp", torchrun=2)
    one, ddp, fsdp = (read_log(tmp_path / name, "loss") for name in ("one", "ddp", "fsdp"))
    assert sorted(one) == sorted(ddp) == sorted(fsdp) == list(range(1, 21))
    for step in one:
        assert abs(ddp[step] - one[step]) < 1e-3 and abs(fsdp[step] - one[step]) < 1e-3, (step, one, ddp, fsdp)


if __name__ == "__main__":
    on_each_rank()
