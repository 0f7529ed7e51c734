"""Data parallelism on CPU: gloo over loopback, 2 spawned ranks, 1 thread each.

The central check is the identity that data parallelism must keep: N ranks each training on 1/N of
every batch end with the same parameters (and EMA units) as one process training on the whole
batch.  It holds exactly only without batch statistics, so the models here use GroupNorm.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from manlearn.distributed import gloo_available

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed gloo backend not available")


# ------------------------------------------------------------------ a backbone without batch statistics

class GNUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.GroupNorm(2, cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.n2(self.conv2(torch.relu(self.n1(self.conv1(x))))) + self.short(x))


def gn_net(num_classes: int = 10, in_channels: int = 3, **_):
    from manlearn.models import Backbone

    stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False), nn.GroupNorm(2, 8), nn.ReLU())
    units = [GNUnit(8, 8), GNUnit(8, 16, 2), GNUnit(16, 16)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return Backbone(stem, units, head, unit_ids=[(1, 0), (2, 0), (2, 1)])


@contextlib.contextmanager
def registered_gn_net():
    """Register ``gn_net`` for the duration (other tests enumerate the registry)."""
    from manlearn.models import registry

    registry.register_model(gn_net)
    try:
        yield "gn_net"
    finally:
        registry._MODELS.pop("gn_net", None)
        getattr(registry, "_TAGS", {}).pop("gn_net", None)


def make_learner(seed: int = 0):
    from manlearn import LocalLearner

    torch.manual_seed(seed)
    # MAN++ on the greedy base: ema/lb units and the scale, and no BatchNorm anywhere.
    return LocalLearner(gn_net(num_classes=4), method="manpp", base="greedy", K=4, num_classes=4,
                        image_size=8, stem_module=True, split=[1, 2, 3], momentum=0.9)


def batches(steps: int, n: int = 8):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


# ------------------------------------------------------------------ spawning

def _spawn(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes; raise if any fails."""
    from manlearn.distributed import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    errq = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, errq, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    assert not alive, f"ranks still running after {timeout} s"
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _entry(fn, rank, world, port, errq, args):
    torch.set_num_threads(1)
    try:
        fn(rank, world, port, *args)
    except BaseException:
        errq.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _init(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


# ------------------------------------------------------------------ the identity, at the learner level

STEPS = 3


def _dp_learner_worker(rank, world, port, out):
    import torch.distributed as dist

    from manlearn.distributed import GradReducer, broadcast_state

    _init(rank, world, port)
    learner = make_learner(seed=rank)  # different init on purpose: the broadcast must fix it
    broadcast_state(learner)
    reducer = GradReducer(learner, world)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    for x, y in batches(STEPS):
        shard = x.shape[0] // world
        xs, ys = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
        out_ = learner.train_step(xs, ys, after_block=reducer.block_done)
        stats = reducer.finish(torch.tensor(out_.losses, dtype=torch.float64))
        assert stats is not None and stats.shape == (learner.K,)
        opt.step()
    torch.save(learner.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_equals_single_process_on_the_whole_batch(tmp_path):
    _spawn(_dp_learner_worker, 2, str(tmp_path))
    ref = make_learner(seed=0)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for x, y in batches(STEPS):
        ref.train_step(x, y)
        opt.step()
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    want = ref.state_dict()
    assert r0.keys() == want.keys()
    ema_keys = [k for k in want if ".ema." in k]
    assert ema_keys, "the test model must have EMA units"
    for k in want:
        # the ranks agree bit for bit (EMA units included) ...
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        # ... and equal the single-process run up to float summation order
        torch.testing.assert_close(r0[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs from single-process")
    # the run really moved the parameters (otherwise the identity proves nothing)
    start = make_learner(seed=0).state_dict()
    assert any(not torch.allclose(start[k], want[k]) for k in ema_keys)
    assert any(not torch.allclose(start[k], want[k]) for k in want if k.startswith("blocks.0"))


# ------------------------------------------------------------------ the trainer under "torchrun"

def tiny_cfg(out_dir, **kw):
    from manlearn.config import TrainConfig

    base = dict(dataset="digits", model="gn_net", method="greedy", K=4, split=[1, 2, 3], train_limit=128,
                eval_limit=100, batch_size=32, eval_batch_size=16, epochs=2, lr=0.05, device="cpu",
                out_dir=str(out_dir), log_every=1, progress=False, channels_last=False)
    base.update(kw)
    return TrainConfig(**base)


def _dp_trainer_worker(rank, world, port, out_dir, summaries):
    from manlearn.distributed import cleanup
    from manlearn.train import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with registered_gn_net():
        tr = Trainer.from_config(tiny_cfg(out_dir))
        summary = tr.fit()
        assert tr.dist.world_size == world and tr.dist.rank == rank
        torch.save({"summary": summary, "model": tr.learner.state_dict()}, Path(summaries) / f"rank{rank}.pt")
        del tr
    cleanup()  # as `manlearn train` does: a barrier, then leave


def _dp_sigterm_worker(rank, world, port, out_dir, sums):
    import signal

    from manlearn.distributed import cleanup
    from manlearn.train import Trainer
    from manlearn.train.interrupt import TrainingInterrupted

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def preempt_rank1(trainer):  # only rank 1 is told to stop, after its step 3
        if rank == 1 and trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with registered_gn_net():
        tr = Trainer.from_config(tiny_cfg(out_dir), callbacks=[preempt_rank1], out=open(os.devnull, "w"))
        try:
            tr.fit()
            stopped = None
        except TrainingInterrupted as e:
            stopped = (tr.step, e.exit_code, str(e))
        torch.save({"stopped": stopped}, Path(sums) / f"rank{rank}.pt")
        del tr
    cleanup()


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_saves(tmp_path):
    from manlearn.train import load_checkpoint

    sums = tmp_path / "sums"
    sums.mkdir()
    _spawn(_dp_sigterm_worker, 2, str(tmp_path / "dp"), str(sums))
    r0, r1 = (torch.load(sums / f"rank{r}.pt")["stopped"] for r in (0, 1))
    assert r0 is not None and r1 is not None
    assert r0[0] == r1[0] == 4 and r0[1] == r1[1] == 143  # the signal travels with step 4's all-reduce
    assert "terminated (SIGTERM): saved" in r0[2]
    assert load_checkpoint(tmp_path / "dp" / "last.pt")["step"] == 4


def _cleanup_worker(rank, world, port, out):
    import time

    from manlearn.distributed import cleanup

    _init(rank, world, port)
    if rank == 0:
        time.sleep(1.5)  # rank 0 still busy (writing the last checkpoint, say)
    arrived = time.time()
    cleanup()
    Path(out, f"rank{rank}.txt").write_text(f"{arrived} {time.time()}")


def test_cleanup_waits_for_every_rank_before_leaving_the_group(tmp_path):
    """A rank that is done must not tear down its connections while another still works."""
    _spawn(_cleanup_worker, 2, str(tmp_path))
    arrived0, _ = map(float, (tmp_path / "rank0.txt").read_text().split())
    _, left1 = map(float, (tmp_path / "rank1.txt").read_text().split())
    assert left1 >= arrived0, "rank 1 left the group before rank 0 reached cleanup"


def test_cleanup_on_the_error_path_leaves_without_waiting(monkeypatch):
    """sync=False (a run that raised: the other ranks may never arrive) skips the barrier; a barrier
    that fails (a rank has died) still leaves the group. Calls recorded, no processes spawned (a rank
    leaving early for real is the exit-time abort this barrier is there to prevent)."""
    import torch.distributed as dist

    from manlearn.distributed import cleanup

    calls = []

    def barrier(*a, **k):
        calls.append("barrier")
        if fail:
            raise RuntimeError("rank 1 failed to pass monitoredBarrier")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "monitored_barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    fail = False
    cleanup(sync=False)
    assert calls == ["destroy"]
    calls.clear()
    cleanup()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    fail = True
    cleanup()
    assert calls == ["barrier", "destroy"]


def test_trainer_data_parallel_matches_single_process_and_only_rank0_writes(tmp_path):
    from manlearn.train import Trainer, load_checkpoint, read_jsonl

    dp_dir, sp_dir, sums = tmp_path / "dp", tmp_path / "sp", tmp_path / "sums"
    sums.mkdir()
    _spawn(_dp_trainer_worker, 2, str(dp_dir), str(sums))
    with registered_gn_net():
        single = Trainer.from_config(tiny_cfg(sp_dir), out=open(os.devnull, "w"))
        s_sum = single.fit()
    r0, r1 = torch.load(sums / "rank0.pt"), torch.load(sums / "rank1.pt")
    want = single.learner.state_dict()
    for k in want:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"{k} differs between ranks"
        torch.testing.assert_close(r0["model"][k], want[k], rtol=1e-4, atol=1e-5, msg=f"{k}")
    # evaluation is sharded and reduced: every rank reports the full test set's accuracy
    assert r0["summary"]["test_acc"] == r1["summary"]["test_acc"]
    assert abs(r0["summary"]["test_acc"] - s_sum["test_acc"]) <= 0.02
    # one writer: a single checkpoint and one metrics line per record (not one per rank)
    ck = load_checkpoint(dp_dir / "last.pt")
    assert ck["step"] == s_sum["steps"] == 8
    recs = read_jsonl(dp_dir / "metrics.jsonl")
    srecs = read_jsonl(sp_dir / "metrics.jsonl")
    assert [r["type"] for r in recs] == [r["type"] for r in srecs]
    for a, b in zip(recs, srecs):  # logged losses are the global-batch losses
        if a["type"] == "train":
            assert a["losses"] == pytest.approx(b["losses"], rel=1e-4, abs=1e-5)
            assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-9)


def test_sync_bn_is_refused_on_cpu_and_batch_must_divide(tmp_path, monkeypatch):
    from manlearn.train.data_parallel import ShardedLoader
    from manlearn.errors import ConfigError

    class L:
        batch_size = 30

    with pytest.raises(ConfigError, match="divisible"):
        ShardedLoader(L(), 0, 4)
    from manlearn.config import TrainConfig, validate

    with pytest.raises(ConfigError, match="pipeline_workers"):
        validate(TrainConfig(pipeline_workers=1))
    with pytest.raises(ConfigError, match="dist_backend"):
        validate(TrainConfig(dist_backend="mpi"))


def test_sharded_loader_gives_each_rank_its_rows_of_the_global_batch(tmp_path):
    """In-memory and streamed (ImageNet-style, sharded by sample keys) loaders alike."""
    from manlearn.data import BatchLoader, StreamingLoader, index_image_folder, load_dataset
    from manlearn.train.data_parallel import ShardedLoader

    def check(full, make):
        whole = list(full.epoch(1, start_batch=1))
        shards = [list(ShardedLoader(make(), r, 2).epoch(1, start_batch=1)) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == len(whole) > 0
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([shards[0][i][0], shards[1][i][0]]), x)
            assert torch.equal(torch.cat([shards[0][i][1], shards[1][i][1]]), y)

    digits = load_dataset("digits", split="train", limit=64)
    check(BatchLoader(digits, 16, train=True, seed=3), lambda: BatchLoader(digits, 16, train=True, seed=3))

    from PIL import Image

    for c in range(2):
        for i in range(4):
            g = torch.Generator().manual_seed(10 * c + i)
            arr = torch.randint(0, 256, (30 + i, 28, 3), generator=g, dtype=torch.uint8).numpy()
            (tmp_path / "train" / f"n{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "train" / f"n{c}" / f"{i}.png")
    data = index_image_folder("train", data_dir=tmp_path, image_size=16)
    check(StreamingLoader(data, 4, train=True, seed=5, workers=0),
          lambda: StreamingLoader(data, 4, train=True, seed=5, workers=0))


def test_distributed_holds_primitives_only():
    """``manlearn.distributed`` imports no loop code (train, cli) beyond what ``import manlearn`` brings."""
    import subprocess
    import sys

    code = ("import sys, manlearn; before = set(sys.modules); import manlearn.distributed; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('manlearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not any(m.startswith(("manlearn.train", "manlearn.cli", "manlearn.learner")) for m in eval(out)), out


def _unsynced_worker(rank, world, port):
    import torch.distributed as dist

    from manlearn import ConfigError
    from manlearn.distributed import GradReducer

    _init(rank, world, port)
    learner = make_learner()
    (x, y), = batches(1, n=4)
    try:
        learner.train_step(x, y)  # what wrapping in DistributedDataParallel would amount to
    except ConfigError as e:
        assert "unsynced" in str(e) and "GradReducer" in str(e), str(e)
    else:
        raise AssertionError("train_step ran unsynced under a 2-rank process group")
    ddp = torch.nn.parallel.DistributedDataParallel(learner)
    try:
        ddp.module.train_step(x, y)
    except ConfigError:
        pass
    else:
        raise AssertionError("a DDP-wrapped learner's train_step ran unsynced")
    reducer = GradReducer(learner, world)
    learner.train_step(x, y, after_block=reducer.block_done)
    reducer.finish()
    learner.train_step(x, y, local_only=True)  # on purpose
    dist.barrier()
    dist.destroy_process_group()


def test_train_step_refuses_to_run_unsynced_under_a_process_group():
    """Two gloo ranks: a plain (or DDP-wrapped) train_step refuses; the GradReducer path runs."""
    _spawn(_unsynced_worker, 2)
