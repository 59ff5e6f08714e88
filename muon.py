"""Muon, distributed: every rank orthogonalises its share of the matrices, and the results are shared.

torch.optim.Muon loops over the matrices in Python on every rank. Under DDP each rank repeats all of the
Newton-Schulz work; under FSDP the matmuls of the iteration on a row-sharded DTensor redistribute their operands:
13.5 collectives per matrix and step (7.5 all-gathers, 6 all-reduces; CommDebugMode, torch 2.13). Here each matrix has one owner, chosen once so
that the ranks' Newton-Schulz FLOPs are as even as can be (largest matrix first, each to the least loaded rank):

    one process  the process owns everything: torch.optim.Muon's arithmetic exactly (tests/test_muon.py)
    DDP          every rank holds the averaged gradient and the momentum; the owner orthogonalises and
                 broadcasts the update (bfloat16), and every rank applies it
    FSDP         the owner gathers the momentum-updated gradient's row shards (one gather), orthogonalises,
                 and scatters the update's rows back (one scatter); every rank applies its own rows

A Newton-Schulz step on an m x n matrix (m <= n) costs 4 m^2 n + 2 m^3 FLOPs; with W ranks each rank does 1/W of
them. Under FSDP a matrix costs one gather (float32 shards to the owner) and one scatter (bfloat16 rows back) a
step instead of 13.5 collectives; under DDP one broadcast of its bfloat16 update. The collectives are asynchronous:
a rank orthogonalises its next matrix while the last one travels.

Every rank keeps the momentum of what it holds (all of it under DDP, its shards under FSDP): an elementwise update,
cheap, and checkpoints save it the way they save AdamW's moments (whole, or with torch.distributed.checkpoint).

GPT-2's fused attention matrix c_attn (3C x C) stacks the maps of q, k and v; its parameter group has split=3, and
each C x C block is orthogonalised and scaled on its own, as modded-nanogpt does.
"""
import math

import torch
import torch.distributed as dist

from distributed import is_dtensor

# Keller Jordan's quintic (torch.optim.Muon's defaults): coefficients that maximise the slope at zero, so that five
# steps bring every singular value into roughly [0.5, 1.5], which trains as well as exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


def orthogonalise(g: torch.Tensor) -> torch.Tensor:
    """About U V^T of g = U S V^T, in bfloat16: Newton-Schulz on the wide orientation, so the Gram matrix is the
    small one."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=EPS)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def newton_schulz_flops(shape, split: int) -> float:
    rows, cols = shape[0] // split, shape[1]
    m, n = min(rows, cols), max(rows, cols)
    return split * NS_STEPS * (4 * m * m * n + 2 * m**3)


def assign_owners(costs: list, ranks: int) -> list:
    """The rank that orthogonalises each matrix: largest first, each to the least loaded rank (ties: the lowest)."""
    load, owners = [0.0] * ranks, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(ranks), key=load.__getitem__)
        load[owners[i]] += costs[i]
    return owners


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t: the tensor itself, or a DTensor's shard (which in-place updates write through)."""
    return t.to_local() if is_dtensor(t) else t


class Pending:
    """value() once the collective `work` has finished (None: no collective)."""

    def __init__(self, work, value):
        self.work, self.value = work, value

    def result(self):
        if self.work is not None:
            self.work.wait()
        return self.value()


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, decoupled weight decay and Moonshot's scale (torch.optim.Muon with
    nesterov=True and adjust_lr_fn="match_rms_adamw"), for plain parameters (one process or DDP) or row-sharded
    DTensors (FSDP2). A group's split=k orthogonalises k stacked row blocks of each matrix separately."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, split=1))
        matrices = [(p, group["split"]) for group in self.param_groups for p in group["params"]]
        for p, split in matrices:
            if p.dim() != 2 or p.shape[0] % split:
                raise ValueError(f"Muon takes matrices whose rows split evenly; got {tuple(p.shape)}, split {split}")
            if is_dtensor(p) and (p.device_mesh.ndim != 1 or not p.placements[0].is_shard(0)):
                raise ValueError(f"Muon takes DTensors sharded by rows over one mesh dimension, got {p.placements}")
        first = matrices[0][0]
        if is_dtensor(first):
            self.group = first.device_mesh.get_group()
        else:
            self.group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        self.rank, ranks = (dist.get_rank(self.group), dist.get_world_size(self.group)) if self.group else (0, 1)
        owners = assign_owners([newton_schulz_flops(p.shape, split) for p, split in matrices], ranks)
        self.owner = {p: owner for (p, _), owner in zip(matrices, owners)}

    @torch.no_grad()
    def step(self, closure=None):
        """Momentum everywhere, Newton-Schulz on the owner, the update shared, then applied by every rank."""
        loss = None
        if closure is not None:  # torch's optimizer protocol: re-evaluate the loss first
            with torch.enable_grad():
                loss = closure()
        todo = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    todo.append((p, group, self.momentum_update(p, group["momentum"])))
        gathered = [self.gather(update, p) for p, _, update in todo]  # all in flight before anyone computes
        shared = []
        for (p, group, _), full in zip(todo, gathered):
            whole, ortho = full.result(), None
            if self.rank == self.owner[p]:
                ortho = torch.cat([orthogonalise(block) for block in whole.chunk(group["split"])])
            shared.append(self.share(ortho, p))
        for (p, group, _), part in zip(todo, shared):
            lr, split = group["lr"], group["split"]
            scale = 0.2 * math.sqrt(max(p.shape[0] // split, p.shape[1]))  # the update's RMS becomes AdamW's
            weights = local(p)
            weights.mul_(1 - lr * group["weight_decay"])
            weights.add_(part.result(), alpha=-(lr * scale))
        return loss

    def momentum_update(self, p, momentum: float) -> torch.Tensor:
        """This rank's part of the Nesterov update g + mu B, after B <- mu B + (1 - mu) g."""
        state = self.state[p]
        if "momentum_buffer" not in state:  # shaped like the gradient: a DTensor of shards under FSDP
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        grad, buf = local(p.grad), local(state["momentum_buffer"])
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum)

    def gather(self, update: torch.Tensor, p) -> Pending:
        """The whole update on p's owner (elsewhere: None). Row shards of FSDP (torch.chunk's split: ceil(rows / W)
        rows each, the last ones fewer or none) are padded to one size for the gather."""
        if not is_dtensor(p):
            return Pending(None, lambda: update)  # one process or DDP: every rank holds it whole
        ranks, rows, chunk = self.sizes(p)
        padded = update.new_zeros(chunk, p.shape[1])
        padded[:len(update)] = update
        owner = self.owner[p] == self.rank
        shards = [torch.empty_like(padded) for _ in range(ranks)] if owner else None
        work = dist.gather(padded, shards, group=self.group, group_dst=self.owner[p], async_op=True)
        return Pending(work, lambda: torch.cat(shards)[:rows] if owner else None)

    def share(self, ortho, p) -> Pending:
        """This rank's part of the owner's orthogonalised update: all of it (one process, DDP) or its rows (FSDP)."""
        if self.group is None:
            return Pending(None, lambda: ortho)
        if not is_dtensor(p):
            whole = ortho if ortho is not None else torch.empty(p.shape, dtype=torch.bfloat16, device=p.device)
            return Pending(dist.broadcast(whole, group=self.group, group_src=self.owner[p], async_op=True),
                           lambda: whole)
        ranks, rows, chunk = self.sizes(p)
        mine = torch.empty(chunk, p.shape[1], dtype=torch.bfloat16, device=p.device)
        blocks = None
        if ortho is not None:
            blocks = list(torch.cat([ortho, ortho.new_zeros(chunk * ranks - rows, p.shape[1])]).split(chunk))
        work = dist.scatter(mine, blocks, group=self.group, group_src=self.owner[p], async_op=True)
        return Pending(work, lambda: mine[:len(local(p))])

    def sizes(self, p) -> tuple:
        ranks, rows = dist.get_world_size(self.group), p.shape[0]
        return ranks, rows, -(-rows // ranks)
