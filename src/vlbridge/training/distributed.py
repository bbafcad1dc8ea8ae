"""The few collective operations stage 1 needs, all no-ops on one process.

Runs on torch.distributed as started by `torchrun` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group `torchrun` describes in the environment; False when not launched by it."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_with_local_grad(x: Tensor) -> Tensor:
    """Concatenate `x` [B, ...] from every rank; gradient flows only into this rank's own slice."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank with gradient flowing back to every rank's slice."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather  # differentiable: backward reduce-scatters

    return torch.cat(all_gather(x.contiguous()))


def gather_no_grad(x: Tensor) -> Tensor:
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: Tensor) -> Tensor:
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def id_codes(ids: list[str | None], *, offset: int = 0) -> Tensor:
    """Stable 63-bit codes of string image ids, equal on every rank; a missing id is unique to its sample."""
    codes = []
    for i, ident in enumerate(ids):
        text = f"\0sample:{rank()}:{offset + i}" if ident is None else str(ident)
        codes.append(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1)
    return torch.tensor(codes, dtype=torch.long)
