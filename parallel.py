"""How the model trains across processes: --parallel ddp (DistributedDataParallel, a whole copy per rank) or
--parallel fsdp (torch's FSDP2: parameters, gradients and optimizer states sharded over the ranks, the sharded
optimizer state saved and loaded with torch.distributed.checkpoint, which reshards to any world size).

DDP keeps a whole copy of the model, its gradients and both AdamW moments on every rank: 16 bytes per parameter.
FSDP keeps 16 / world_size and gathers each block's weights just before it runs. Checkpoints stay one folder:
the full weights in model.safetensors (gathered to rank 0, so every script reads them as usual) and the
optimizer shards in optimizer/ (every rank writes its own).
"""
import contextlib
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from errors import UserError

OPTIMIZER_DIR = "optimizer"


def wrap(model: torch.nn.Module, parallel: str, ctx, dtype: torch.dtype, compile_on: bool) -> torch.nn.Module:
    """What forward and backward run through: model itself, compiled, DDP-wrapped, or sharded in place (FSDP)."""
    if parallel == "fsdp":
        if not torch.distributed.is_initialized():
            raise UserError("--parallel fsdp shards over the processes of torchrun; start it with torchrun (even "
                            "--nproc_per_node=1), or leave --parallel at ddp for one process")
        return shard(model, ctx.device, ctx.world_size, dtype, compile_on)
    runner = torch.compile(model) if compile_on else model
    if ctx.enabled:
        runner = DDP(runner, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    return runner


def gradient_sync(runner, last_micro_step: bool):
    """Gradients are reduced across ranks once per step, on the last micro step only."""
    if isinstance(runner, DDP):
        return contextlib.nullcontext() if last_micro_step else runner.no_sync()
    if is_sharded(runner):
        runner.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def shard(model: torch.nn.Module, device: torch.device, world_size: int, dtype: torch.dtype, compile_on: bool):
    """Wrap each transformer block, then the root (the embedding, the head, tied or not, and the final norm), in place.

    Mixed precision as under DDP: float32 master weights and gradient reduction, compute in `dtype` (the loop's
    autocast still keeps softmax, norms and the loss in float32)."""
    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile_on:  # compile per block: the collectives between blocks stay outside the graphs
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP, everything otherwise."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def gathered(model):
    """The root's own parameters (embeddings, head, ln_f) whole, for code that calls the model's parts directly
    (generation, the packed HellaSwag scorer) instead of forward(); the blocks gather themselves as they run.
    Every rank must enter it: the gathering is a collective."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        # Eager here: compiled blocks would recompile for every new length that decoding and scoring feed them.
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.reshard()


def full_weights(model) -> dict:
    """The whole state dict on CPU at rank 0 (empty on the others): a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model, optimizer, folder: str):
    """Every rank writes its shard of the optimizer state into folder/optimizer: a collective."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=os.path.join(folder, OPTIMIZER_DIR))


def has_sharded_optimizer(ckpt: str) -> bool:
    return os.path.isdir(os.path.join(ckpt, OPTIMIZER_DIR))


def load_optimizer(model, optimizer, ckpt: str):
    """The optimizer state of ckpt, resharded for this run's ranks (or whole, for an unsharded model)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to fill, this run's shards
    dcp.load(state, checkpoint_id=os.path.join(ckpt, OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
