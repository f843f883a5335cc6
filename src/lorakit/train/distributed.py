"""Several processes, one result: data-parallel LoRA training under torchrun.

    torchrun --nproc_per_node N -m lorakit train ...     (RANK, WORLD_SIZE, LOCAL_RANK set)

Every rank builds the same batch plan (same seed, same epoch) and reads the same global stream
of micro-batches. One optimizer step consumes N x grad_accum of them; rank k takes positions
k, k+N, k+2N ... of that group (`shard`), so no example is seen twice and none is skipped:

    global stream   b0 b1 b2 b3 | b4 b5 b6 b7 | ...      N=2, grad_accum=2
    rank 0          b0    b2    | b4    b6    |
    rank 1             b1    b3 |    b5    b7 |

The loss of each micro-batch is (sum of token cross-entropies) / T, where T is the number of
label tokens in the WHOLE global step (all-reduced before any backward), and the gradients are
SUMMED over ranks. Hence the gradient is exactly the one of a single process that accumulates
all N x grad_accum micro-batches, up to the order of floating-point additions.

Two ways to hold the frozen base:

    replicated ("DDP")  each GPU holds the whole base; after the last micro-batch of a step the
                        adapter gradients are summed with one all-reduce per dtype (the same
                        traffic as DistributedDataParallel with no_sync during accumulation; the
                        torch DDP wrapper itself is not used because the fused loss calls the
                        backbone directly, around the wrapper's forward)
    FSDP2               `fully_shard` on every decoder layer and on the backbone: each GPU keeps
                        1/N of the base and all-gathers one layer at a time; gradients are
                        reduce-scattered as sums. Tied or output embeddings stay replicated,
                        since the fused loss reads the head weight outside any forward.

Only rank 0 writes files (logs, metrics, checkpoints, the adapter); full tensors are gathered
first, so a sharded run saves the same adapter and checkpoint as a single process. A checkpoint
stores the data position as a global micro-batch index, so it resumes with any world size that
divides the global step's micro-batch count.
"""

from __future__ import annotations

import gc
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lorakit import host
from lorakit.errors import ConfigError, LorakitError

FSDP_MEMORY_FRACTION = 0.9  # auto mode shards when the estimate needs more of one GPU than this


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group


_world: World | None = None
_we_initialised = False


# ---- the process group ----------------------------------------------------------------------

def init_from_env() -> World:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (idempotent).

    Without those variables (or WORLD_SIZE=1) this is a single process and nothing is set up.
    Backend: nccl on CUDA (each process on GPU LOCAL_RANK), gloo on CPU.
    """
    global _world, _we_initialised
    if _world is not None:
        return _world
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: stop (as on SIGTERM: a checkpoint) when it dies
        host.stop_with_parent(signal.SIGTERM)
    size = host.torchrun_number("WORLD_SIZE", 1, least=1)
    if size <= 1:
        _world = World()
        return _world
    rank, local_rank = host.torchrun_number("RANK", None), host.torchrun_number("LOCAL_RANK", 0)
    if rank is None:
        raise ConfigError(f"WORLD_SIZE is {size} but RANK is not set; start the processes with torchrun (it sets "
                          "both), or unset WORLD_SIZE to run one process")
    if rank >= size:  # init_process_group would wait (30 minutes) for a rank that cannot join
        error = ConfigError(f"RANK is {rank} but WORLD_SIZE is {size}: ranks run from 0 to {size - 1}; start the "
                            "processes with torchrun (it sets both), or unset WORLD_SIZE to run one process")
        error.every_rank_alike = False  # this process's own: rank 0, which reports the others', may be fine
        raise error
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        _check_gpu(local_rank)
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # a group the caller made (a FileStore's) needs no address
        _check_rendezvous(size)
        extra = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend, **extra, **_store_of_this_attempt(rank, size))
        _we_initialised = True
    _world = World(rank, size, local_rank, dist.get_backend())
    return _world


def _store_of_this_attempt(rank: int, size: int) -> dict:
    """init_process_group's store where torchrun restarted the workers (--max-restarts): torchrun
    keeps one store for every attempt, and the new processes read the dead ones' addresses left
    in it (connection refused, or a hang). Keys under a prefix of the attempt's own keep them
    apart; a first attempt takes torchrun's store as it is, as do jobs over several nodes (each
    node's torchrun counts its own restarts: the prefixes would differ)."""
    restarts = host.torchrun_restarts()
    if restarts == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not host.one_node():
        return {}  # no attempt before, or one whose store died with its rank 0
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=default_pg_timeout)
    return {"store": dist.PrefixStore(f"lorakit.attempt.{restarts}", store), "rank": rank, "world_size": size}


def _check_rendezvous(size: int) -> None:
    """The address torchrun gives its processes to meet at: init_process_group's own error
    without it is a traceback that does not say that WORLD_SIZE came without torchrun."""
    unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if unset:
        error = ConfigError(f"WORLD_SIZE is {size} but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} "
                            "not set; start the processes with torchrun (it sets them), or unset WORLD_SIZE to run "
                            "one process")
        error.every_rank_alike = False  # no torchrun: no rank 0 that is sure to speak for this process
        raise error


def _check_gpu(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        error = ConfigError(f"LOCAL_RANK is {local_rank} but this node has {count} GPU(s); "
                            f"pass --nproc_per_node {count} (or fewer) to torchrun")
        error.every_rank_alike = False
        raise error


def shutdown() -> None:
    """Leave the process group if we created it.

    Garbage is collected first: FSDP's device mesh and DTensors sit in reference cycles, and
    left for the interpreter's exit they tear down gloo's threads out of order; the process
    then aborts ("terminate called without an active exception") after a finished run, and
    torchrun reports the job as failed (in a 2-rank gloo test, 13 of 30 runs without this)."""
    global _world, _we_initialised
    if _we_initialised and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _world, _we_initialised = None, False


def world() -> World:
    return _world if _world is not None else World()


def rank() -> int:
    return world().rank


def world_size() -> int:
    return world().size


def is_main() -> bool:
    return world().rank == 0


def device_of_rank() -> torch.device:
    """This process's compute device: its own GPU under torchrun, else the default."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world().local_rank) if world().size > 1 else torch.device("cuda")


def _comm_device() -> torch.device:
    return torch.device("cuda", world().local_rank) if world().backend == "nccl" else torch.device("cpu")


# ---- small collectives ----------------------------------------------------------------------

def all_reduce_sum(value):
    """Sum a number, or a list of numbers, over all ranks (ints stay ints)."""
    if world_size() == 1:
        return value
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    summed = [round(s) if isinstance(v, int) else s for v, s in zip(values, tensor.tolist())]
    return summed if isinstance(value, (list, tuple)) else summed[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one (e.g. a stop signal)."""
    return bool(all_reduce_sum(int(bool(flag)))) if world_size() > 1 else bool(flag)


def max_int(value: int) -> int:
    """The largest of the ranks' values, on every rank."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_int(value: int) -> int:
    """Rank 0's value, on every rank."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def main_first(action, others_too: bool = False):
    """Run `action` on rank 0, share whether it worked, then (with `others_too`) on the others.

    For work that must happen once (claim the output folder) or that fills a cache the others
    then read (tokenising with `datasets`). A user error on rank 0 is re-raised there; the other
    ranks raise a short pointer to it, so no rank waits forever for a peer that has stopped.
    Returns the action's result (None on the other ranks without `others_too`).
    """
    if world_size() == 1:
        return action()
    result, error = None, None
    if is_main():
        try:
            result = action()
        except LorakitError as exc:
            error = exc
    if broadcast_int(0 if error else 1) == 0:
        if error is not None:
            raise error
        raise LorakitError("rank 0 stopped with the error shown above; fix it and run again")
    if is_main() or not others_too:
        return result
    try:
        return action()
    except LorakitError as exc:  # rank 0 got through: this rank's own problem (its node's files)
        exc.every_rank_alike = False
        raise


# ---- the data split -------------------------------------------------------------------------

def shard(items: Sequence[Any], rank_: int, world: int) -> list[Any]:
    """Positions rank, rank+world, rank+2*world ... of `items`: disjoint, together all of them."""
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} outside a world of {world}")
    return list(items)[rank_::world]


def shard_padded(items: Sequence[Any], rank_: int, world: int) -> tuple[list[Any], int]:
    """`shard`, plus how many extra forward passes this rank must run (weighted zero).

    Sharded models need the same number of forwards on every rank (each forward all-gathers),
    so a rank with one item fewer repeats a dummy one.
    """
    mine = shard(items, rank_, world)
    per_rank = -(-len(items) // world)
    return mine, per_rank - len(mine) if items else 0


# ---- choosing and applying the parallel layout --------------------------------------------

def requested_fsdp(config) -> bool | None:
    """train.fsdp as choose_fsdp takes it: on True, off False, auto None."""
    return {"auto": None, "on": True, "off": False}[config.train.fsdp]


def choose_fsdp(requested: bool | None, config, device: torch.device) -> tuple[bool, list[str]]:
    """Shard the base (FSDP) or replicate it; None means decide from the memory estimate."""
    n = world_size()
    if n == 1:
        return False, (["--fsdp: one process, nothing to shard"] if requested else [])
    if requested and config.model.quantize != "none":
        raise ConfigError(f"--fsdp cannot shard a --quantize {config.model.quantize} base; "
                          "drop --fsdp (each GPU then holds the whole quantised base) or --quantize")
    if requested is not None:
        layout = "FSDP (base sharded" if requested else "DDP (base replicated"
        return requested, [f"parallel: {layout} over {n} processes, --fsdp {'on' if requested else 'off'})"]
    if device.type != "cuda" or config.model.quantize != "none":
        return False, [f"parallel: DDP (base replicated on each of {n} processes)"]
    need = estimated_step_bytes(config)
    if need is None:
        return False, [f"parallel: DDP over {n} processes (no memory estimate for this model; "
                       "pass --fsdp to shard the base)"]
    room, where = _room_per_rank(config, device)
    fsdp = need > room
    layout = "FSDP (base sharded" if fsdp else "DDP (base replicated"
    sharded = estimated_step_bytes(config, fsdp=True) if fsdp else None
    per_rank = f", {sharded / 2**30:.1f} GiB per rank sharded" if sharded is not None else ""
    return fsdp, [f"parallel: {layout} over {n} processes; estimated {need / 2**30:.1f} GiB per step replicated"
                  f"{per_rank} {where})"]


def _room_per_rank(config, device: torch.device) -> tuple[float, str]:
    """Bytes a replicated step may take on one GPU before auto mode shards, and where that
    limit comes from: FSDP_MEMORY_FRACTION of the GPU, or of --memory-budget when smaller."""
    capacity = torch.cuda.get_device_properties(device).total_memory
    budget = config.train.memory_budget
    if budget is not None and budget * 2**30 < capacity:
        return FSDP_MEMORY_FRACTION * budget * 2**30, f"within --memory-budget {budget:g} GiB"
    return FSDP_MEMORY_FRACTION * capacity, f"on one {capacity / 2**30:.0f} GiB GPU"


def global_batch_notice(train) -> list[str]:
    """How many sequences one optimizer step trains on, across all processes."""
    n = world_size()
    if n == 1:
        return []
    total = n * train.grad_accum * train.batch_size
    return [f"global batch: {n} processes x {train.grad_accum} micro-batch(es) x {train.batch_size} sequences "
            f"= {total} sequences per step"]


def estimated_step_bytes(config, fsdp: bool = False) -> int | None:
    """lorakit estimate's peak for this config on one device, or None when it cannot tell.

    Replicated by default (what auto mode compares with the GPU); `fsdp`: one rank's share of a
    sharded run (None in a single process, where nothing is sharded)."""
    from lorakit.models import training_dtype
    from lorakit.plan.estimate import TrainShape, estimate_memory
    from lorakit.plan.model_shapes import model_shape

    t, lora = config.train, config.lora
    dtype = training_dtype(config.model.dtype, "cuda")  # the weights: fp16 on a GPU without bf16
    try:
        targets = lora.targets if lora.targets in ("all", "all-linear", "attention", "mlp", "qv") else "all-linear"
        shape = TrainShape(batch_size=t.batch_size, seq_len=config.data.seq_len, r=lora.r, targets=targets,
                           grad_checkpointing=t.grad_checkpointing != "off",
                           offload_checkpoints=t.grad_checkpointing == "offload", dtype=dtype, fused_loss=t.fast_paths,
                           fused_mlp=t.fast_paths, fused_attention=t.fast_paths,  # as `estimate --fast-paths` models it
                           lora_dropout=lora.dropout,
                           world_size=world_size(), fsdp=fsdp)  # replicated (the all-reduce buffer too) or one rank's shard
        return estimate_memory(model_shape(config.model.name or "smollm2-135m"), shape).total
    except (LorakitError, KeyError, ValueError, TypeError, OSError):
        return None


def wrap_model(model: nn.Module, fsdp: bool, device: torch.device) -> nn.Module:
    """Make the model ready for this world: identical adapters everywhere, then shard or not.

    Replicated: the model is already on `device`; rank 0's trainable tensors are broadcast (as
    DDP does at construction). FSDP: the model comes on the CPU and each layer's shard moves to
    `device` as it is sharded, so no GPU ever holds the whole base.
    """
    if world_size() == 1:
        return model
    _broadcast_trainable(model)
    if fsdp:
        from lorakit.kernels.adapter_casts import cast_afresh_every_forward

        cast_afresh_every_forward(model)
        _fully_shard(model, device)
    return model


def _broadcast_trainable(model: nn.Module) -> None:
    with torch.no_grad():
        for _, param in sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda np: np[0]):
            buffer = param.detach().to(_comm_device())
            dist.broadcast(buffer, src=0)
            param.copy_(buffer.to(param.device))


def shardable_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of layers to shard; run without --fsdp")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = shardable_layers(model)
    _move_outside(model, layers, device)
    mesh = init_device_mesh(device.type, (world_size(),))
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    # the fused loss reads the head weight outside any forward: keep it (and a tied input embedding) whole
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ignored = {head.weight} if head is not None and getattr(head, "weight", None) is not None else set()
    sharded = []
    for layer in layers:
        sharded.append(fully_shard(layer, mesh=mesh))
    if isinstance(backbone, nn.Module):
        sharded.append(fully_shard(backbone, mesh=mesh, ignored_params=ignored & set(backbone.parameters())))
    for module in sharded:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already divided by the global token count
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def _move_outside(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move what is not in the sharded layers (embeddings, final norm, head) to `device`."""
    inside = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in inside and param.device != device:
                    param.data = param.data.to(device)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and id(buffer) not in inside:
                    module._buffers[name] = buffer.to(device)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# ---- gradients --------------------------------------------------------------------------------

def sync_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the replicated parameters' gradients over ranks, one all-reduce per dtype.

    Sharded (FSDP) gradients are already reduce-scattered as sums in backward and are skipped.
    """
    if world_size() == 1:
        return
    plain = [p for p in params if not is_sharded(p)]
    for param in plain:
        if param.grad is None:  # keep the collective the same size on every rank
            param.grad = torch.zeros_like(param)
    for dtype in sorted({p.grad.dtype for p in plain}, key=str):
        group = [p for p in plain if p.grad.dtype == dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(_comm_device())
        dist.all_reduce(flat)
        for param, piece in zip(group, flat.split([p.grad.numel() for p in group])):
            param.grad.copy_(piece.view_as(param.grad))


# ---- full tensors for saving, shards for loading ----------------------------------------------

def whole_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a sharded one is gathered (every rank must call this)."""
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()


def full_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU}, in the given order on every rank."""
    return {name: whole_cpu(tensor) for name, tensor in named}


def _like(template: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out like `template` (sharded the same way when it is a DTensor)."""
    if not is_sharded(template):
        return whole.to(template.device)
    from torch.distributed.tensor import distribute_tensor

    mesh = template.device_mesh
    return distribute_tensor(whole.to(mesh.device_type), mesh, template.placements)


@torch.no_grad()
def load_full_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (from a checkpoint) into parameters, sharded or not. In sorted order:
    each sharded copy is a scatter from rank 0, so every rank must take the names in the same
    order, and a safetensors file loads its keys in a different order in each process."""
    for name in sorted(tensors):
        whole, target = tensors[name], params[name]
        target.copy_(_like(target, whole.to(target.dtype)))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with whole tensors: the format of a single-process checkpoint."""
    state_dict = optimizer.state_dict()
    state = {index: {key: whole_cpu(v) if isinstance(v, torch.Tensor) else v for key, v in per_param.items()}
             for index, per_param in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A whole-tensor optimizer state laid out like this run's parameters (for load_state_dict)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index in sorted(state_dict["state"], key=int):  # the same order on every rank: see load_full_tensors
        per_param, param = state_dict["state"][index], params[int(index)]
        state[index] = {key: _state_like(param, per_param[key]) for key in sorted(per_param)}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def _state_like(param: torch.Tensor, value):
    """An optimizer state entry laid out like its parameter (a scalar such as `step` stays as it is)."""
    return _like(param, value) if isinstance(value, torch.Tensor) and value.dim() > 0 else value


@contextmanager
def whole_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, sharded trainable parameters are whole (gathered) tensors, so
    `save_adapter(model, ...)` writes the complete adapter; the shards return afterwards.

    Only the adapters are gathered, never the frozen base: this fits where FSDP was needed.
    """
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and is_sharded(param):
                module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


# ---- per-rank random state --------------------------------------------------------------------

def gather_rank_rng() -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (CPU, and this rank's GPU), named rank.{k}.cpu / rank.{k}.cuda,
    for rank 0 to save next to its own: dropout masks differ per rank."""
    if world_size() == 1:
        return {}
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state(world().local_rank)
    out = {}
    for kind, state in states.items():
        gathered = _all_gather_bytes(state)
        out.update({f"rank.{k}.{kind}": g.cpu() for k, g in enumerate(gathered)})
    return out


def _all_gather_bytes(state: torch.Tensor) -> list[torch.Tensor]:
    device = _comm_device()
    buffers = [torch.empty_like(state, device=device) for _ in range(world_size())]
    dist.all_gather(buffers, state.to(device))
    return buffers


def diverge_rank_rng() -> None:
    """From one random state shared by every rank, a different one per rank, so that dropout
    masks differ between ranks (a run starts from one seed; a resume with another number of
    processes restores rank 0's state everywhere). Deterministic for a given number of ranks."""
    if world_size() == 1:
        return
    shared = int(torch.randint(2**62, (1,)))  # the same draw on every rank
    torch.manual_seed(shared + rank())  # the CPU and every GPU generator


def restore_rank_rng(tensors: dict[str, torch.Tensor]) -> bool:
    """Put this rank's own RNG state back when the checkpoint has one for it (same world size)."""
    key = f"rank.{rank()}.cpu"
    saved_world = sum(1 for name in tensors if name.startswith("rank.") and name.endswith(".cpu"))
    if world_size() == 1 or saved_world != world_size() or key not in tensors:
        return False
    torch.set_rng_state(tensors[key])
    cuda_key = f"rank.{rank()}.cuda"
    if torch.cuda.is_available() and cuda_key in tensors:
        torch.cuda.set_rng_state(tensors[cuda_key], world().local_rank)
    return True
