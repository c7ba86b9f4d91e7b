"""Multi-process training with PyTorch's own engine: `torchrun --nproc_per_node=N run.py ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op for one process. NCCL on
GPUs, gloo on CPUs. Each rank trains on its shard of every global batch; only rank 0 writes files.
"""
import datetime
import os

import torch
import torch.distributed as dist


def setup(device):
    """(rank, world size, device): joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, use_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # a long timeout: the other ranks wait at a barrier while rank 0 builds a feature cache (hours for COCO);
    # if a rank fails, torchrun stops them all, so a long timeout never leaves a run hanging
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=24))
    return rank, world, torch.device(device)


def use_device(name):
    """torch.device(name) for one process: "cuda" becomes cuda:<current>, and a CUDA device is made the
    current one, so that what runs on "the" CUDA device (the DataLoader's pin-memory thread) uses it too; cpu
    as it is."""
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def wrap(module, device):
    """`module` in DistributedDataParallel under torchrun (its gradients averaged over the ranks at each
    backward), `module` itself for one process."""
    if world_size() == 1:
        return module
    device = torch.device(device)
    ids = [device.index] if device.type == "cuda" else None  # the GPU of this rank; none for gloo on CPUs
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def all_sum(tensor):
    """The sum over ranks (the tensor itself with one process)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_lists(items):
    """Every rank's list `items`, concatenated in rank order, on every rank (`items` itself for one
    process)."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def first_error(error):
    """The exception (or None) each rank brings -> its own, or if it has none, the first other rank's (the
    same type and message), so that every rank raises a one-line error where one of them failed: a rank left
    waiting at a barrier for a failed one would die with a traceback of the lost connection instead. A
    collective call: every rank must make it. For one process, `error` itself."""
    if world_size() == 1:
        return error
    parts = [None] * world_size()
    dist.all_gather_object(parts, None if error is None else (type(error), str(error)))
    kind, message = next((p for p in parts if p is not None), (None, None))
    return error if kind is None or error is not None else kind(message)


def shard(n):
    """This rank's contiguous share of the indices 0..n-1 (all of them with one process)."""
    return torch.tensor_split(torch.arange(n), world_size())[rank()]


def gather_rows(rows, n):
    """Every rank's (indices, values) -> the (n, ...) tensor in index order, on every rank."""
    if world_size() == 1:
        return rows[1]
    parts = [None] * world_size()
    dist.all_gather_object(parts, (rows[0].cpu(), rows[1].cpu()))
    index = torch.cat([p[0] for p in parts])
    values = torch.cat([p[1] for p in parts])
    assert len(index) == n and index.unique().numel() == n, "every test image must be scored exactly once"
    return values[index.argsort()]
