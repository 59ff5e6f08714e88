"""Many processes as one run: torchrun's process group, the collectives every rank reaches in the same order, the
per-rank RNG streams, and how the model is wrapped for them: --parallel ddp (DistributedDataParallel, a whole
copy per rank), --parallel fsdp (torch's FSDP2: parameters, gradients and optimizer states sharded over every
rank) or --parallel hsdp (FSDP2 on a 2-D mesh: sharded within a node, replicated across nodes).

DDP keeps a whole copy of the model, its gradients and both AdamW moments on every rank: 16 bytes per parameter.
FSDP keeps 16 / world_size and gathers each block's weights just before it runs, every micro step: over the
slow network between nodes once the ranks span several. HSDP keeps 16 / (ranks per replica) and gathers only
within its replica (one node's NVLink); between nodes travels one all-reduce of each gradient shard per step.
In a single process every collective here is a no-op, so the scripts call them unconditionally.

FSDP2, DTensor and distributed checkpointing are imported where a sharded run uses them: they take 1.4 s to
import, which every single-process or DDP start (each script, each test) would pay for nothing.
"""
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from hardware import pick_device
from errors import UserError, first_line


@dataclass
class World:
    """This process's place among the run's processes: rank, rank on its node, how many, and its device."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto", timeout_minutes: float = 30) -> World:
    """One process, or one of torchrun's: NCCL with a GPU per process on CUDA, gloo on CPU (same logic, testable).
    timeout_minutes: how long a collective waits for the slowest rank before the job fails (see --dist-timeout)."""
    if "RANK" not in os.environ:
        device = pick_device(device_name)
        if device.type == "cuda":  # cuda:N: kernels, caches and flash attention must run on N, not on GPU 0
            torch.cuda.set_device(device)
        return World(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(device_name)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)
    return World(rank, local_rank, world, device)


def teardown():
    if _initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---- collectives: every rank calls each of them, in the same order

def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place across processes when distributed; a no-op in a single process."""
    if _initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def any_rank(device: torch.device, *flags) -> list[bool]:
    """Each flag (a bool, or a 0-d tensor on device) true if it is true on any process: one collective for all.
    The values travel on device, as NCCL needs."""
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device) for f in flags])
    return [bool(v) for v in all_reduce(values, op=dist.ReduceOp.MAX).tolist()]


def smallest(value: int, device: torch.device) -> int:
    """The smallest of every process's value: a collective (on device, as NCCL needs)."""
    return int(all_reduce(torch.tensor(value, device=device), op=dist.ReduceOp.MIN))


def barrier():
    if _initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's obj on every rank (a picklable Python object); obj itself in a single process."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- RNG streams, one per rank

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- the model across ranks

SHARDED = ("fsdp", "hsdp")  # the --parallel modes whose ranks each hold a shard: every forward is a collective


def wrap(raw_model: torch.nn.Module, parallel: str, world: World, dtype: torch.dtype, compile_on: bool,
         mesh: Optional[tuple[int, ...]] = None) -> torch.nn.Module:
    """What forward and backward run through: raw_model itself, compiled, DDP-wrapped, or sharded in place over
    mesh (FSDP, HSDP: see mesh_shape)."""
    if parallel in SHARDED:
        if not _initialized():
            raise UserError(f"--parallel {parallel} shards over the processes of torchrun; start it with torchrun "
                            f"(even --nproc_per_node=1), or leave --parallel at ddp for one process")
        return shard(raw_model, mesh, world.device, dtype, compile_on)
    model = torch.compile(raw_model) if compile_on else raw_model
    if world.enabled:
        # Each gradient is copied into DDP's all-reduce bucket as backward makes it and then becomes a view of it,
        # so a whole set of gradients never exists beside the buckets: the peak holds one gradient-sized buffer
        # less. (Under accumulation the no_sync micro steps still build whole gradients: zero_grad sets them to None.)
        model = DDP(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model


def mesh_shape(parallel: str, world_size: int, replicate_degree: Optional[int] = None) -> Optional[tuple[int, ...]]:
    """The device mesh of a sharded run: (world_size,) for fsdp; (replicas, ranks per replica) for hsdp, replicas
    by default one per node (torchrun's LOCAL_WORLD_SIZE ranks each); None for ddp. train.py asks before it
    touches the run folder, so a bad --replicate-degree changes nothing."""
    if replicate_degree is not None and parallel != "hsdp":
        raise UserError(f"--replicate-degree is for --parallel hsdp, not {parallel}; drop it or pass --parallel hsdp")
    if parallel != "hsdp":
        return (world_size,) if parallel in SHARDED else None
    if replicate_degree is None:
        replicate_degree = max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if replicate_degree < 1 or world_size % replicate_degree:
        raise UserError(f"--replicate-degree {replicate_degree} must divide the {world_size} processes (each replica "
                        f"shards the model over world / replicas of them); pick a divisor, e.g. the number of nodes")
    return (replicate_degree, world_size // replicate_degree)


def gradient_sync(model, last_micro_step: bool):
    """Gradients are reduced across ranks once per step, on the last micro step only."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def shard(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, compile_on: bool):
    """Wrap each transformer block, then the root (the embedding, the head, tied or not, and the final norm), in place.
    shape: the device mesh, (world_size,) for FSDP or (replicas, ranks per replica) for HSDP, where FSDP2 shards
    over the second dimension and replicates over the first (a reduce-scatter within each replica, then an
    all-reduce of the shards across replicas).

    Mixed precision as under DDP: float32 master weights and gradient reduction, compute in `dtype` (the loop's
    autocast still keeps softmax, norms and the loss in float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile_on:  # compile per block: the collectives between blocks stay outside the graphs
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    """Whether FSDP2 wraps model (fully_shard made it an FSDPModule). Not its parameters' type: after a forward
    without backward the root keeps its own parameters gathered, as plain tensors."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by shard(): not yet, then nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (a shard of FSDP2's). None exists before torch.distributed.tensor is imported, so an
    unsharded run never imports it here."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP, everything otherwise."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def gathered(model):
    """The root's own parameters (embeddings, head, final norm) whole, for code that calls the model's parts
    directly (generation, the packed HellaSwag scorer) instead of forward(); the blocks gather themselves as they
    run. Every rank must enter it: the gathering is a collective."""
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- failures on some ranks only

def agree(error: Optional[BaseException]) -> Optional[BaseException]:
    """After work that may fail on some ranks only (a log write on a full disk, an out-of-memory in one GPU's
    evaluation), every rank calls this before the next collective: it returns this rank's error, or one naming
    the rank that failed and why, or None on every rank alike. So ranks never part ways: all take the same path,
    and the step's checkpoint can still be saved."""
    report = None if error is None else f"{type(error).__name__}: {first_line(error)}"
    failed = [(rank, r) for rank, r in enumerate(gather_objects(report)) if r is not None]
    if not failed:
        return None
    if error is not None:
        return error
    rank, report = failed[0]
    return RankFailure(f"rank {rank} failed: {report}")


def attempt(fn, *args) -> Optional[BaseException]:
    """fn(*args) on this rank, then agree(): None if it succeeded on every rank."""
    try:
        fn(*args)
        error = None
    except Exception as e:  # noqa: BLE001 (any failure: the ranks must hear of it before they part ways)
        error = e
    return agree(error)


class RankFailure(UserError):
    """Work failed on another rank; its message names the rank and the cause."""
