"""Data-parallel training of a neural-ODE digits classifier on torch.distributed.

    torchrun --nproc_per_node 2 examples/distributed_train.py            # 2 CPU processes (gloo)
    torchrun --nproc_per_node 4 examples/distributed_train.py --backend nccl   # 4 GPUs, one per process
    python examples/distributed_train.py                                 # one process, same code

Each process trains on its shard of every epoch (:class:`pylux.distributed.DistributedLoader`,
a ``DistributedSampler``) with ``batch_size`` images per process; the
:class:`~pylux.distributed.DistributedTrainState` starts every rank from rank 0's parameters
and its optimizer averages the flat gradient with one all-reduce per step, so all ranks hold
the same model throughout. Rank 0 prints the mean loss, the NFE of the forward solves
averaged over the ranks (:func:`pylux.distributed.reduce_statistics`) and the test accuracy.

With NCCL each process uses the GPU ``LOCAL_RANK`` (set by ``initialize``); the model's
parameters and every batch are moved there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pylux as lx
import pylux.distributed as lxd
from pylux import nn
from pylux.data import load_digits
from pylux.training import Adam, single_train_step


def build_model() -> nn.Chain:
    field = nn.Chain(nn.Dense(32, 32, torch.tanh), nn.Dense(32, 32))
    node = lx.NeuralODE(field, (0.0, 1.0), lx.Tsit5(), sensealg=lx.BacksolveAdjoint(seminorm=True),
                        reltol=1e-4, abstol=1e-4)
    return nn.Chain(encoder=nn.Dense(64, 32, torch.tanh), node=node, classifier=nn.Dense(32, 10))


def loss_fn(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"nfe": st["node"]["nfe"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training images (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per step (default 32)")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # outside torchrun: a world of one process, so the same script runs anywhere
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    rank, world = lxd.initialize(args.backend)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    start = time.perf_counter()
    # on an error no teardown: destroying the group while a peer sits in a collective deadlocks, and
    # the launcher ends the other ranks
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test", device=device)
    loader = lxd.DistributedLoader(torch.utils.data.TensorDataset(x_train, y_train), args.batch_size, seed=0)
    model = build_model()
    # a different seed per rank on purpose: DistributedTrainState broadcasts rank 0's parameters
    ps, st = lx.setup(torch.Generator().manual_seed(rank), model, device=device)
    ts = lxd.DistributedTrainState(model, ps, st, Adam(1e-2))
    if rank == 0:
        print(f"{world} process(es), backend {dist.get_backend()}, {len(loader)} steps per epoch of "
              f"{args.batch_size} images per process", flush=True)
    for epoch in range(args.epochs):
        losses, nfes = [], []
        for x, y in loader:
            _, loss, stats, ts = single_train_step(loss_fn, (x.to(device), y.to(device)), ts)
            losses.append(loss)
            nfes.append(stats["nfe"])
        summary = lxd.reduce_statistics({"loss": torch.stack(losses).mean(), "nfe": sum(nfes) / len(nfes)})
        with torch.no_grad():
            logits, _ = model(x_test, ts.ps, lx.testmode(ts.st))
            accuracy = (logits.argmax(dim=1) == y_test).double().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {float(summary['loss']):.4f}, forward NFE per step (mean over "
                  f"ranks) {summary['nfe']:.1f}, test accuracy {100 * accuracy:.1f}%", flush=True)
    # every rank holds the same parameters: check it once, cheaply
    checksum = lx.flatten(ts.ps)[0].double().sum()
    spread = lxd.reduce_statistics({"max": checksum}, "max")["max"] - \
        lxd.reduce_statistics({"min": checksum}, "min")["min"]
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"parameters agree across ranks to {float(spread):.1e}; time {elapsed:.1f} s")
    # every rank enters the teardown together: a destroy racing a peer's exit can hang (pytorch#75097)
    dist.barrier()
    dist.destroy_process_group()
    return {"test_accuracy": accuracy, "spread": float(spread), "time_s": elapsed}


if __name__ == "__main__":
    main()
