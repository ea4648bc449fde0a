"""pylux.distributed on 2 gloo processes (CPU): training equals one process on the concatenated batch,
DDP over a StatefulLayer agrees, NFE statistics are reduced, the loader shards, errors are clear."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pylux as lx
import pylux.distributed as lxd
from pylux import nn
from pylux.training import SGD, Adam, TrainState, single_train_step

DT = torch.float64
WORLD = 2
STEPS = 4


def model_and_data():
    model = nn.Chain(nn.Dense(4, 16, torch.tanh), nn.Dense(16, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def ce_loss(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"loss_copy": 1}


def shard(tensor, rank):
    n = tensor.shape[0] // WORLD
    return tensor[rank * n:(rank + 1) * n]


def node_model():
    return lx.NeuralODE(nn.Chain(nn.Dense(2, 8, torch.tanh), nn.Dense(8, 2)), (0.0, 1.0), reltol=1e-6,
                        abstol=1e-6)


def node_inputs():
    return torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=DT) * torch.tensor([[0.2], [0.2],
                                                                                                  [0.2], [3.0],
                                                                                                  [3.0], [3.0]],
                                                                                                 dtype=DT)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    lxd.initialize("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    # on an error no teardown: destroying the group while a peer sits in a collective deadlocks, and
    # the launcher ends the other ranks
    results = {}
    model, x, y = model_and_data()
    # each rank initialises differently: the train state starts from rank 0's parameters
    ps, st = lx.setup(torch.Generator().manual_seed(rank), model, dtype=DT)
    for name, optimizer in (("adam", Adam(0.05)), ("torch_sgd", None)):
        if optimizer is None:
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9)
        ts = lxd.DistributedTrainState(model, ps, st, optimizer)
        for _ in range(STEPS):
            _, loss, stats, ts = single_train_step(ce_loss, (shard(x, rank), shard(y, rank)), ts)
        results[name] = ts.params.clone()
    # DDP over the StatefulLayer bridge with torch.optim.SGD
    layer = lx.StatefulLayer(model, ps, st)
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(ddp(shard(x, rank)), shard(y, rank)).backward()
        opt.step()
    results["ddp"] = lx.flatten(layer.ps)[0].clone()
    # NFE statistics of a NeuralODE on this rank's shard, reduced across ranks
    node = node_model()
    nps, nst = lx.setup(torch.Generator().manual_seed(0), node, dtype=DT)
    _, nst = node(shard(node_inputs(), rank), nps, nst)
    results["nfe"] = nst["nfe"]
    results["reduced"] = {op: lxd.reduce_statistics({"nfe": nst["nfe"], "t": torch.tensor(nst["nfe"]),
                                                     "flag": True}, op) for op in ("mean", "sum", "max")}
    # the loader: disjoint shards per epoch, reshuffled from epoch to epoch
    loader = lxd.DistributedLoader(torch.utils.data.TensorDataset(torch.arange(10)), batch_size=2, seed=1)
    results["epochs"] = [[int(i) for (batch,) in loader for i in batch] for _ in range(2)]
    results["synced"] = lxd.synchronize({"w": torch.full((2,), float(rank), dtype=DT), "k": rank})
    with pytest.raises(ValueError, match="op must be one of"):
        lxd.reduce_statistics({"a": 1}, "median")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # every rank enters the teardown together: a destroy racing the peer's exit can hang (pytorch#75097)
    dist.barrier()
    dist.destroy_process_group()


#: seconds the two ranks get; they take a few
RANKS_DEADLINE_S = 240


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """The ranks' results, each saved by its rank; a rank that hangs is killed at the deadline (the test
    fails unless every rank saved its results first: a hang in the teardown does not change them)."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + RANKS_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            saved = [(out / f"rank{r}.pt").exists() for r in range(WORLD)]
            if not all(saved):
                pytest.fail(f"the {WORLD} gloo ranks did not finish within {RANKS_DEADLINE_S} s "
                            f"(results saved: {saved})")
            break
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(optimizer):
    model, x, y = model_and_data()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    ts = TrainState(model, ps, st, optimizer)
    for _ in range(STEPS):
        _, _, _, ts = single_train_step(ce_loss, (x, y), ts)
    return ts.params


def test_two_ranks_train_like_one_process_on_the_concatenated_batch(worker_results):
    for name, optimizer in (("adam", Adam(0.05)),
                            ("torch_sgd", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2,
                                                          momentum=0.9))):
        reference = single_process(optimizer)
        start, _ = lx.flatten(lx.setup(torch.Generator().manual_seed(0), model_and_data()[0], dtype=DT)[0])
        assert float((reference - start).abs().max()) > 1e-2  # the steps moved the parameters
        for r in range(WORLD):
            torch.testing.assert_close(worker_results[r][name], reference, rtol=1e-12, atol=1e-13)
        assert torch.equal(worker_results[0][name], worker_results[1][name])  # ranks stay bit-identical
    # DDP over a StatefulLayer with torch.optim.SGD lands on the same parameters
    for r in range(WORLD):
        torch.testing.assert_close(worker_results[r]["ddp"], worker_results[r]["torch_sgd"], rtol=1e-12,
                                   atol=1e-13)


def test_nfe_statistics_are_reduced(worker_results):
    node = node_model()
    ps, st = lx.setup(torch.Generator().manual_seed(0), node, dtype=DT)
    per_rank = [node(shard(node_inputs(), r), ps, st)[1]["nfe"] for r in range(WORLD)]
    assert [worker_results[r]["nfe"] for r in range(WORLD)] == per_rank
    assert per_rank[0] != per_rank[1]  # the shards need different numbers of steps
    for r in range(WORLD):
        reduced = worker_results[r]["reduced"]
        assert reduced["mean"]["nfe"] == pytest.approx(sum(per_rank) / WORLD)
        assert reduced["sum"]["nfe"] == sum(per_rank) and reduced["max"]["nfe"] == max(per_rank)
        assert reduced["sum"]["t"].dtype == torch.int64 and int(reduced["sum"]["t"]) == sum(per_rank)
        assert reduced["mean"]["flag"] is True


def test_loader_shards_and_synchronize(worker_results):
    for epoch in range(2):
        seen = [i for r in range(WORLD) for i in worker_results[r]["epochs"][epoch]]
        assert sorted(seen) == list(range(10))
    assert worker_results[0]["epochs"][0] != worker_results[0]["epochs"][1]
    for r in range(WORLD):
        synced = worker_results[r]["synced"]
        assert torch.equal(synced["w"], torch.zeros(2, dtype=DT)) and synced["k"] == r


def test_errors_without_a_process_group():
    model, x, y = model_and_data()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized; call pylux.distributed.initialize"):
        lxd.DistributedTrainState(model, ps, st, Adam())
    with pytest.raises(RuntimeError, match="not initialized"):
        lxd.synchronize(ps)
    with pytest.raises(TypeError, match="already distributed"):
        lxd.DistributedOptimizer(lxd.DistributedOptimizer(SGD(0.1)))
    with pytest.raises(TypeError, match="expected a pylux or torch optimizer"):
        lxd.DistributedOptimizer("sgd")
    assert lxd.rank() == 0 and lxd.world_size() == 1


@pytest.mark.slow
def test_example_script_under_torchrun(tmp_path):
    """examples/distributed_train.py launched as README says, on 2 gloo processes, one epoch."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(root / "examples" / "distributed_train.py"), "--epochs", "1"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es), backend gloo" in out.stdout
    assert "parameters agree across ranks to 0.0e+00" in out.stdout
    accuracy = float(out.stdout.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 70
