"""DistributedDataParallel over dwsep.MobileNetV1: gloo on CPU, 2 processes.

What must be equal, and why:

* **Eval mode** (BN uses its running statistics, so every sample is independent): DDP on two
  half-batches, loss = mean over each rank's half, gradients averaged by DDP's all-reduce, equals
  one process on the concatenated batch with the loss averaged over the whole batch (the halves
  have equal size, so the mean of the two half-means is the full mean).

* **Train mode** (no SyncBatchNorm): each rank normalizes with its own half-batch statistics, so
  DDP's gradient is the average of the gradients of two single-process runs, one per half, from
  the same parameters; a run on the concatenated batch would use different (whole-batch)
  statistics and legitimately differ. The test emulates DDP exactly in one process: two replicas
  A and B, each step A runs half 0 and B half 1, their gradients are averaged and applied to
  both, and before each forward B's buffers are overwritten with A's (DDP's
  ``broadcast_buffers=True`` sends rank 0's running statistics to the others at every forward).
  After two SGD steps each rank's gradients, parameters and running statistics must match its
  replica, and the two ranks' parameters must be identical.

Everything runs in float64, so the only differences are the order of the all-reduce sums.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dwsep
from dwsep.models import MobileNetV1

WORLD = 2
HALF = 2  # samples per rank
RES = 48
STEPS = 2
LR = 0.05
TOL = 1e-9


def _backends():
    out = []
    for b in dwsep.available_backends("cpu"):
        marks = ()
        if b == "triton":
            marks = pytest.mark.skip(
                reason="the Triton interpreter is too slow for 2 processes x 3 steps (1 eval, 2 train); "
                "the DDP mechanics are backend-independent and covered by the other backends"
            )
        out.append(pytest.param(b, marks=marks))
    return out


def _initial_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = MobileNetV1(alpha=0.25, num_classes=10).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(STEPS + 1, WORLD * HALF, 3, RES, RES, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (STEPS + 1, WORLD * HALF), generator=g)
    return {"state": model.state_dict(), "x": x, "t": t}


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, backend: str, init_file: str, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dwsep.set_backend(backend)
        data = torch.load(data_file, weights_only=True)
        mine = slice(rank * HALF, (rank + 1) * HALF)
        result = {}

        # Eval mode: one backward step.
        model = MobileNetV1(alpha=0.25, num_classes=10).double()
        model.load_state_dict(data["state"])
        model.eval()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss = F.cross_entropy(ddp(data["x"][0, mine]), data["t"][0, mine])
        loss.backward()
        result["eval_grads"] = _grads(model)

        # Train mode: STEPS SGD steps.
        model = MobileNetV1(alpha=0.25, num_classes=10).double()
        model.load_state_dict(data["state"])
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        result["train_grads"] = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(data["x"][step, mine]), data["t"][step, mine])
            loss.backward()
            result["train_grads"].append(_grads(model))
            opt.step()
        result["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_expectations(data: dict, backend: str) -> dict:
    with dwsep.use_backend(backend):
        # Eval: the concatenated batch in one process.
        model = MobileNetV1(alpha=0.25, num_classes=10).double()
        model.load_state_dict(data["state"])
        model.eval()
        F.cross_entropy(model(data["x"][0]), data["t"][0]).backward()
        eval_grads = _grads(model)

        # Train: one replica per rank, averaged gradients, rank 0's buffers broadcast.
        reps = []
        for _ in range(WORLD):
            m = MobileNetV1(alpha=0.25, num_classes=10).double()
            m.load_state_dict(data["state"])
            m.train()
            reps.append(m)
        train_grads = [[] for _ in range(WORLD)]
        for step in range(STEPS):
            for r in range(1, WORLD):
                for b_src, b_dst in zip(reps[0].buffers(), reps[r].buffers()):
                    b_dst.copy_(b_src)
            per_rank = []
            for r, m in enumerate(reps):
                m.zero_grad()
                xs = data["x"][step, r * HALF : (r + 1) * HALF]
                ts = data["t"][step, r * HALF : (r + 1) * HALF]
                F.cross_entropy(m(xs), ts).backward()
                per_rank.append(_grads(m))
            avg = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
            with torch.no_grad():
                for r, m in enumerate(reps):
                    train_grads[r].append(avg)
                    for n, p in m.named_parameters():
                        p -= LR * avg[n]
    return {
        "eval_grads": eval_grads,
        "train_grads": train_grads,
        "states": [copy.deepcopy(m.state_dict()) for m in reps],
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


@pytest.mark.parametrize("backend", _backends())
def test_ddp_gloo_two_processes(backend, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    data = _initial_state()
    data_file = str(tmp_path / "data.pt")
    torch.save(data, data_file)
    mp.spawn(
        _worker,
        args=(backend, str(tmp_path / "init"), data_file, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expect = _single_process_expectations(data, backend)

    for r, res in enumerate(results):
        for n, g in expect["eval_grads"].items():
            assert _rel(res["eval_grads"][n], g) < TOL, (r, "eval", n)
        for step in range(STEPS):
            for n, g in expect["train_grads"][r][step].items():
                assert _rel(res["train_grads"][step][n], g) < TOL, (r, step, n)
        for k, v in expect["states"][r].items():
            assert _rel(res["state"][k], v) < TOL, (r, k)
    # Parameters stay in sync across ranks (buffers differ: each rank's last batch statistics).
    params = [n for n, _ in MobileNetV1(alpha=0.25, num_classes=10).named_parameters()]
    for n in params:
        assert torch.equal(results[0]["state"][n], results[1]["state"][n]), n
    # The training really moved the weights and the running statistics.
    assert _rel(results[0]["state"]["conv_stem.weight"], data["state"]["conv_stem.weight"]) > 1e-4
    key = "blocks.4.1.bn2.running_mean"
    assert not torch.equal(results[1]["state"][key], results[0]["state"][key])
