"""
Data parallel under torchrun: joining the process group, this process's rank, the collectives the
loop and the methods use (summing gradients and statistics; broadcasting a LIFT mask; gathering a
small value of every process), each a no-op in one process; and --fsdp's sharding (FSDP2).
"""
import os
from datetime import timedelta

import torch


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) unless torchrun's process group is up
    (start_distributed). The methods ask it where they compute from data before training."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensors) -> int:
    """Sum each tensor over every process, in place: one flat message per dtype (on the GPU for nccl,
    wherever the tensors live). A no-op in a single process. Returns the bytes this process sent."""
    if rank_world()[1] == 1:
        return 0
    dist, sent = torch.distributed, 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1).to(device) if device else t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))
    return sent


def broadcast_(tensors, src: int = 0):
    """Overwrite each tensor with process `src`'s copy (a LIFT mask: every process trains the same
    entries). A no-op in a single process."""
    if rank_world()[1] == 1:
        return
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for t in tensors:
        buf = t.to(device) if device else t
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MB (Linux /proc): VmRSS now, or VmHWM, its peak; elsewhere
    the peak from getrusage. What sharding is for: each process holds 1/N of the model's state."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held_mb(model, optimizer) -> float:
    """MB of the tensors this process holds for training: the model's parameters (under --fsdp its
    shard of each) and buffers, the optimizer's own (LIFT's values) and its state. Exact, where the
    resident memory also counts what the allocator kept of tensors already freed."""
    tensors = [*model.parameters(), *model.buffers(), *(p for g in optimizer.param_groups for p in g["params"]),
               *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
    local = {}
    for t in tensors:
        t = t.to_local() if is_sharded(t) else t
        local[t.data_ptr()] = t.numel() * t.element_size()  # (a tied lm_head counted once)
    return sum(local.values()) / 2**20


def per_process(value) -> list:
    """[value of process 0, 1, ...]: every process's `value` (a small Python object) on every
    process; [value] in a single process."""
    if rank_world()[1] == 1:
        return [value]
    out = [None] * rank_world()[1]
    torch.distributed.all_gather_object(out, value)
    return out


def free_port() -> int:
    """A TCP port free on this machine now: torchrun's --master-port for a launch of its own."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_distributed(device: str, timeout: float) -> tuple[int, str]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join its process group (nccl on CUDA, each
    process on its own GPU; gloo on CPU); (this process's rank, its device). Without torchrun: (0,
    device). A group that does not form within `timeout` seconds is a one-line error, not a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, device
    dist = torch.distributed
    if "cuda" in device:  # one GPU per process
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            dist.init_process_group("nccl" if "cuda" in device else "gloo", timeout=timedelta(seconds=timeout))
        except (RuntimeError, TimeoutError, ValueError) as e:  # dist's errors are RuntimeErrors
            raise ConnectionError(f"data parallel: process {os.environ.get('RANK')} of {world} could not meet the "
                                  f"others at {where} within --dist-timeout {timeout:g} s "
                                  f"({str(e).splitlines()[0][:200]}); start all of them (torchrun --nproc-per-node, "
                                  "--nnodes)") from None
    return dist.get_rank(), device

# -----------------------------------------------------------------------------
# sharded data parallel (FSDP2): each parameter, its gradient and its optimizer state held once across
# the processes, each process 1/N of every tensor (dim 0); a block's weights gathered while it runs


def shard(model, optimizer):
    """fully_shard every transformer block, then the root (embedding, final norm, lm_head: one group,
    so a tied lm_head stays one tensor), over torchrun's processes, and point the optimizer (not yet
    stepped) at the sharded parameters: fully_shard replaces each parameter with a DTensor of this
    process's rows, so its AdamW moments are born sharded too. An optimizer that holds model weights
    of its own (LIFT's) is handed the new ones by name (its sharded_weights). Gradients are summed over
    the processes, not averaged: train.py weighs each micro-batch's loss by its share of the targets."""
    from torch.distributed.fsdp import fully_shard
    assert not optimizer.state or hasattr(optimizer, "sharded_weights"), "shard before the first optimizer step"
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    for m in (*model.layers, model):
        m.set_gradient_divide_factor(1.0)  # a sum, sent as a plain SUM (gloo has no pre-scaled sum)
        m.set_force_sum_reduction_for_comms(True)
    params = dict(model.named_parameters())
    for g, group_names in zip(optimizer.param_groups, groups):  # (values that are no model parameter stay)
        g["params"] = [params[n] if n else p for n, p in zip(group_names, g["params"])]
    if hasattr(optimizer, "sharded_weights"):
        optimizer.sharded_weights(params)


def is_sharded(t) -> bool:
    """Whether t is a DTensor (--fsdp's shard of a tensor); False on a torch built without distributed."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every process (a collective: every process calls
    it, in the same order), a plain one as it is."""
    return t.full_tensor() if is_sharded(t) else t


def sharded_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor (every process holds it, e.g. read from a checkpoint) cut to `like`'s layout:
    this process's rows as a DTensor where `like` is one, else `t` itself. No communication."""
    if not is_sharded(like):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
