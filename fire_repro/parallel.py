"""Devices and the one multi-GPU path: torchrun (DDP, one process per GPU) when launched by it,
otherwise one process over all visible GPUs (DataParallel). Used by the training loop and by
eval_autoattack.py."""
import os
from collections import namedtuple

import torch
import torch.distributed as dist

from fire_repro.common import UserError


def setup_device(args, timeout=None):
    """torchrun -> one process per GPU (DDP; gloo on the CPU); otherwise one process over all
    visible GPUs. `timeout`: how long a process may wait for the others (torch's default if None)."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def is_main():
    """Whether this is the process that logs and writes files (rank 0, or the only one)."""
    return rank_and_world()[0] == 0


def rank_and_world():
    """(this process's rank, the number of processes): torch.distributed's once it is set up, else
    what torchrun gives the process (RANK, WORLD_SIZE), else (0, 1)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def over_all_gpus(model, device):
    """`model` over every GPU this process sees (DataParallel) when it sees several and is not one
    of torchrun's processes (those have one GPU each); else `model` itself."""
    if device.type == "cuda" and torch.cuda.device_count() > 1 and not dist.is_initialized():
        return torch.nn.DataParallel(model)
    return model


Networks = namedtuple("Networks", "train attack")
Networks.__doc__ = """One network's two views: `train` for the training forward (wrapped in DDP
under torchrun), `attack` for the attacks (no gradient synchronisation: under DDP each rank
attacks its own shard)."""


def training_networks(model, args, device):
    """Networks(train, attack) of `model`: compiled with --compile, in DDP under torchrun, else
    over all visible GPUs."""
    net = torch.compile(model) if args.compile else model
    if dist.is_initialized():
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        return Networks(ddp, net)
    net = over_all_gpus(net, device)
    return Networks(net, net)
