"""Distributed QAT: two gloo processes on CPU train under DistributedDataParallel; every rank keeps
the same quantizer state, and the run equals a single process on the concatenated batch. `sync_bn` gives the
BN fold SyncBatchNorm statistics, forward and gradient; ranges are synced with or without it.

All scenarios run in one `torch.multiprocessing.spawn` (process start-up dominates the cost).
"""

from __future__ import annotations

import datetime
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import xqat
from tests.models import INPUT_SHAPE, make_model

WORLD, BATCH, STEPS, LR = 2, 8, 4, 0.05

# name -> model, QATConfig fields, how the global batch of 8 is split over the two ranks
SCENARIOS = {
    "sync_bn": ("plain", dict(sync_bn=True), (4, 4)),
    # uneven local batches, float BN statistics (tf.contrib's second conv), depthwise + residual, BN freeze
    "sync_bn_float_uneven": ("mobilenet_v2", dict(sync_bn=True, bn_stats="float", freeze_bn_delay=2), (3, 5)),
    "local_bn": ("plain", dict(sync_bn=False), (4, 4)),
    "unsynced": ("plain", dict(sync_ranges=False), (4, 4)),
}
SYNC_BN = ("sync_bn", "sync_bn_float_uneven")


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.rand(BATCH, *INPUT_SHAPE[1:], generator=g) * 2 - 0.5, torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _prepare(scenario: str) -> torch.nn.Module:
    name, cfg, _ = SCENARIOS[scenario]
    return xqat.prepare_qat(make_model(name), torch.zeros(INPUT_SHAPE), xqat.QATConfig(**cfg)).train()


def _train(model: torch.nn.Module, qat: torch.nn.Module, rows: slice, world: int) -> dict:
    """STEPS of SGD with momentum. The loss is the global batch mean (sum over local rows / BATCH, times the
    world size that DDP's gradient averaging divides by), so uneven splits give the single-process gradient."""
    opt = torch.optim.SGD(qat.parameters(), lr=LR, momentum=0.9)
    losses, grads = [], {}
    for i, (x, y) in enumerate(_batches()):
        loss = F.cross_entropy(model(x[rows]), y[rows], reduction="sum") / BATCH * world
        opt.zero_grad()
        loss.backward()
        if i == 0:
            grads = {n: p.grad.clone() for n, p in qat.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return {"state": {k: v.clone() for k, v in qat.state_dict().items()}, "grads": grads, "losses": losses}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for scenario, (_, _, split) in SCENARIOS.items():
            qat = _prepare(scenario)
            start = sum(split[:rank])
            ddp = DDP(qat, forward_sync_buffers=False)  # buffers stay rank-local: sync must come from xqat
            results[scenario] = _train(ddp, qat, slice(start, start + split[rank]), WORLD)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Results of every scenario on rank 0 and rank 1 (one spawn of two gloo processes)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


_single_cache: dict[str, dict] = {}


def _single(scenario: str) -> dict:
    """The same training in this process, on the whole (concatenated) batch."""
    if scenario not in _single_cache:
        qat = _prepare(scenario)
        _single_cache[scenario] = _train(qat, qat, slice(0, BATCH), 1)
    return _single_cache[scenario]


def _quantizer_keys(state: dict) -> list[str]:
    return [k for k in state if k.startswith("xqat_quantizers.")]


def _bn_stat_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(("bn.running_mean", "bn.running_var"))]


# -- every rank holds the same state ----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["sync_bn", "sync_bn_float_uneven", "local_bn"])
def test_ranks_keep_identical_ranges_counters_and_weights(ranks, scenario):
    a, b = ranks[0][scenario]["state"], ranks[1][scenario]["state"]
    assert a.keys() == b.keys()
    local_bn = () if scenario in SYNC_BN else _bn_stat_keys(a)
    differing = [k for k in a if k not in local_bn and not torch.equal(a[k], b[k])]
    assert differing == []  # quantizer min/max/EMA/step/nan_count/frozen, module steps, BN flags, weights
    assert all(int(a[k]) == STEPS for k in a if k.endswith(".step"))
    assert any(float(a[k]) > 0 for k in _quantizer_keys(a) if k.endswith(".max"))


def test_bn_freeze_flags_and_synced_moving_statistics_match_across_ranks(ranks):
    a, b = ranks[0]["sync_bn_float_uneven"]["state"], ranks[1]["sync_bn_float_uneven"]["state"]
    frozen = [k for k in a if k.endswith("bn_frozen") and k.replace("bn_frozen", "bn.running_mean") in a]
    assert frozen and all(bool(a[k]) and bool(b[k]) for k in frozen)  # freeze_bn_delay=2 passed on both
    assert all(torch.equal(a[k], b[k]) for k in _bn_stat_keys(a))


# -- equal to one process on the concatenated batch ---------------------------------------------------------
@pytest.mark.parametrize("scenario", SYNC_BN)
def test_sync_bn_run_equals_single_process_on_concatenated_batch(ranks, scenario):
    ddp, ref = ranks[0][scenario], _single(scenario)
    assert ddp["state"].keys() == ref["state"].keys()
    for k, v in ref["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        else:  # step counters, freeze flags, nan counts, num_batches_tracked
            assert torch.equal(ddp["state"][k], v), k
    # first-step gradients (DDP-averaged) equal the single-process ones: the BN statistics' gradient is synced
    for n, g in ref["grads"].items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")
    torch.testing.assert_close(sum(r[scenario]["losses"][0] for r in ranks) / WORLD, ref["losses"][0],
                               rtol=1e-5, atol=1e-6)
    # the input range sees no BN at all: min of mins / max of maxes is the concatenated batch's, bit for bit
    assert torch.equal(ddp["state"]["xqat_quantizers.x.max"], ref["state"]["xqat_quantizers.x.max"])
    assert torch.equal(ddp["state"]["xqat_quantizers.x.min"], ref["state"]["xqat_quantizers.x.min"])


def test_ranges_are_synced_without_sync_bn_while_bn_statistics_stay_local(ranks):
    a, b = ranks[0]["local_bn"]["state"], ranks[1]["local_bn"]["state"]
    assert all(torch.equal(a[k], b[k]) for k in _quantizer_keys(a))
    assert torch.equal(a["xqat_quantizers.x.max"], _single("local_bn")["state"]["xqat_quantizers.x.max"])
    # without sync_bn each rank folds with its own half batch's statistics, like BatchNorm2d under DDP
    assert all(not torch.equal(a[k], b[k]) for k in _bn_stat_keys(a))
    ref = _single("sync_bn")["state"]  # same model and data, global statistics
    assert not torch.allclose(a["stem.0.bn.running_var"], ref["stem.0.bn.running_var"], rtol=1e-3)


def test_without_sync_ranges_the_ranks_drift_apart(ranks):
    """Control: the comparisons above can fail. sync_ranges=False leaves each rank its own ranges."""
    a, b = ranks[0]["unsynced"]["state"], ranks[1]["unsynced"]["state"]
    maxes = [k for k in _quantizer_keys(a) if k.endswith(".max")]
    assert sum(not torch.equal(a[k], b[k]) for k in maxes) == len(maxes)


def test_sync_bn_without_a_process_group_changes_nothing():
    x = _batches()[0][0]
    plain = xqat.prepare_qat(make_model("plain"), x[:1]).train()
    synced = xqat.prepare_qat(make_model("plain"), x[:1], xqat.QATConfig(sync_bn=True)).train()
    assert synced.get_submodule("stem.0").sync_bn and not plain.get_submodule("stem.0").sync_bn
    assert torch.equal(plain(x), synced(x))
    assert all(torch.equal(v, synced.state_dict()[k]) for k, v in plain.state_dict().items())
