"""Two gloo processes give the same losses and gradients as one process on the same global batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlbridge.objectives.stage1 import stage1_losses
from vlbridge.training.distributed import id_codes

DEC = 59
B = 3  # per rank


def global_batch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2 * B, 5, 20, generator=g)
    ids = torch.randint(3, 58, (2 * B, 7), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(2 * B, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[4, 2:] = 0  # different token counts on the two ranks
    names = ["a", "b", "a", "c", "d", "e"]  # string ids, one image shared across the ranks
    return feats, ids.masked_fill(mask == 0, 0), mask, names


def run(model, feats, ids, mask, names):
    out = stage1_losses(
        model, feats, ids, mask, id_codes(names), dec_token_id=DEC, generator=torch.Generator().manual_seed(9)
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def worker(rank: int, init: str, result: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from stage1_factory import tiny_stage1

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = tiny_stage1()
    feats, ids, mask, names = global_batch()
    part = slice(rank * B, (rank + 1) * B)
    out, grads = run(model, feats[part], ids[part], mask[part], names[part])
    for g in grads.values():  # what DistributedDataParallel does
        dist.all_reduce(g)
        g /= 2
    losses = torch.stack([out.itc_loss, out.itm_loss, out.itg_loss])
    dist.all_reduce(losses)
    if rank == 0:
        torch.save({"losses": losses / 2, "grads": grads}, result)
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    from stage1_factory import tiny_stage1

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = str(tmp_path / "result.pt")
    mp.spawn(worker, args=(f"file://{tmp_path / 'init'}", result), nprocs=2, join=True)
    two = torch.load(result, weights_only=True)

    model = tiny_stage1()
    out, grads = run(model, *global_batch())
    one = torch.stack([out.itc_loss, out.itm_loss, out.itg_loss])
    torch.testing.assert_close(two["losses"], one, atol=1e-5, rtol=1e-5)
    assert two["grads"].keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
