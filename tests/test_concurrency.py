"""Blocks in flight: the overlapped step (manlearn.concurrency) computes what the sequential step computes
— gradients, EMA units, BN statistics, losses — for every registered rule, and calls after_block in order."""
from __future__ import annotations

import copy

import pytest
import torch

from manlearn import ConfigError, LocalLearner
from manlearn.rules import get_rule_class

from test_contract import TASKS, _targets, build, rule_specs


def _trainable_specs():
    return [s for s in rule_specs() if not get_rule_class(s[0]).single_block]


def _state(learner):
    """Everything a step changes: gradients, and every buffer and parameter (EMA units, BN statistics)."""
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return grads, {k: v.clone() for k, v in learner.state_dict().items()}


def assert_same_state(seq, conc, nonempty=True):
    """Same gradients (same parameters having one) and same parameters and buffers, to float64 tolerance;
    returns the gradients' names."""
    (ga, sa), (gb, sb) = _state(seq), _state(conc)
    assert ga.keys() == gb.keys() and (ga or not nonempty)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-9, atol=1e-12, msg=name)
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-9, atol=1e-12, msg=name)
    return set(ga)


@pytest.mark.parametrize("task", ["classification", "detection"])
@pytest.mark.parametrize("method,base", _trainable_specs(), ids=lambda v: str(v))
@pytest.mark.parametrize("n", [2, 3])
def test_overlapped_step_equals_the_sequential_step(task, method, base, n):
    try:
        seq = build(task, method, base, K=4)
    except ConfigError:
        pytest.skip("the rule refuses this task (tests/test_contract.py checks the refusal)")
    if seq.momentum is not None:
        seq.momentum = 0.9
    conc = copy.deepcopy(seq)
    conc.blocks_in_flight = n
    size = TASKS[task][3]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).double()
    y = _targets(task, x)
    for _ in range(2):  # two steps: the second one reads EMA units the first one moved
        a, b = seq.train_step(x, y), conc.train_step(x, y)
        torch.testing.assert_close(b.loss_values, a.loss_values, rtol=1e-10, atol=1e-12)
        assert_same_state(seq, conc, nonempty=False)
        with torch.no_grad():  # an optimiser-like update, so the next step sees moved sources
            for p, q in zip(seq.parameters(), conc.parameters()):
                if p.grad is not None:
                    p.sub_(0.01 * p.grad)
                    q.sub_(0.01 * q.grad)


def test_after_block_is_called_in_block_order_and_threads_are_restored():
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="manpp", base="dgl", K=5, num_classes=3, image_size=16,
                           blocks_in_flight=3)
    calls = []
    threads = torch.get_num_threads()
    learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]), after_block=calls.append)
    assert calls == list(range(5)) and torch.get_num_threads() == threads
    with pytest.raises(ConfigError, match="blocks_in_flight"):
        learner.blocks_in_flight = 0


@pytest.mark.parametrize("n", [2, 3])
def test_at_most_n_blocks_live_forwards_in_order_and_every_thread_takes_blocks(n, monkeypatch):
    """The N bound (a block is live from its forward to the end of its local loss), the forwards in block
    order (the feature taps and BN statistics depend on it), and the caller's thread working too."""
    import threading

    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="manpp", base="dgl", K=7, num_classes=3, image_size=16,
                           blocks_in_flight=n)
    lock, live, peak, forwards, workers = threading.Lock(), [0], [0], [], set()
    real_forward, real_loss = learner.forward_block, learner.local_loss

    def forward_block(k, *a, **kw):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            forwards.append(k)
            workers.add(threading.current_thread().name)
        return real_forward(k, *a, **kw)

    def local_loss(k, *a, **kw):
        try:
            return real_loss(k, *a, **kw)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(learner, "forward_block", forward_block)
    monkeypatch.setattr(learner, "local_loss", local_loss)
    learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert forwards == list(range(6)) and live[0] == 0
    assert 2 <= peak[0] <= n, peak[0]
    assert "MainThread" in workers and len(workers) >= 2, workers


def test_an_error_in_any_thread_reaches_the_caller_and_nothing_hangs(monkeypatch):
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="dgl", K=6, num_classes=3, image_size=16, blocks_in_flight=2)
    real_loss = learner.local_loss
    threads = torch.get_num_threads()

    def local_loss(k, *a, **kw):
        if k == 3:
            raise RuntimeError("block 3 failed")
        return real_loss(k, *a, **kw)

    monkeypatch.setattr(learner, "local_loss", local_loss)
    with pytest.raises(RuntimeError, match="block 3 failed"):
        learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(learner, "local_loss", real_loss)  # and the next step works
    assert len(learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])).losses) == 6


def test_workers_run_under_the_callers_saved_tensor_hooks():
    """The activation tracker (saved_tensors_hooks, thread-local) also sees what the workers keep."""
    import threading

    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="dgl", K=4, num_classes=3, image_size=16, blocks_in_flight=2)
    seen = set()

    def pack(t):
        seen.add(threading.current_thread().name.split("_")[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert "MainThread" in seen and any(name.startswith("manlearn-block") for name in seen), seen


@pytest.mark.parametrize("blocks", [range(0, 3), range(2, 5), range(1, 4)])
def test_a_range_of_blocks_overlapped_equals_the_same_blocks_in_sequence(blocks, monkeypatch):
    """A pipeline worker's share (train_blocks on a range of blocks) overlapped gives what its blocks' local
    steps in sequence give: the range's output, losses, gradients, EMA units and BN statistics."""
    from manlearn.rules import LocalBatch

    torch.manual_seed(0)
    seq = LocalLearner("resnet20", method="manpp", base="dgl", K=5, num_classes=3, image_size=16).double()
    if seq.momentum is not None:
        seq.momentum = 0.9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g).double()
    y = torch.randint(0, 3, (4,), generator=g)
    with torch.no_grad():
        h = x
        for k in range(blocks.start):
            h = seq.blocks[k](h)
    conc = copy.deepcopy(seq)  # after the earlier blocks' forward moved BN statistics: both start alike
    conc.blocks_in_flight = 2
    import manlearn.learner as learner_module

    overlapped = []
    real = learner_module.overlapped_step
    monkeypatch.setattr(learner_module, "overlapped_step", lambda *a, **kw: overlapped.append(a[0]) or real(*a, **kw))
    outs = []
    for learner in (seq, conc):
        batch = LocalBatch(x, y, learner.norm_mean, learner.norm_std)
        outs.append(learner.train_blocks(blocks, h.clone(), batch))
    assert overlapped == [conc]  # the overlapped path ran, for the learner with 2 blocks in flight only
    (ha, la), (hb, lb) = outs
    assert len(la) == len(lb) == len(blocks)
    torch.testing.assert_close(hb, ha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack(lb), torch.stack(la), rtol=1e-10, atol=1e-12)
    ga = assert_same_state(seq, conc)
    owned = {f"blocks.{k}." for k in blocks} | {f"auxes.{k}." for k in blocks} | ({"head."} if blocks.stop == 5 else set())
    assert all(any(n.startswith(o) for o in owned) for n in ga)  # only the range's blocks learned


class RecordingStreams:
    """A stand-in for concurrency.CudaStreams where no GPU is present: it runs everything on the CPU at once
    and logs every stream operation, so the order the GPU scheduler issues work in can be checked."""

    def __init__(self, n, log):
        self.n, self.log, self.current, self.events = n, log, None, 0

    def __len__(self):
        return self.n

    def fork(self):
        self.log.append(("fork",))

    def use(self, i):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.current = i
            try:
                yield
            finally:
                self.current = None
        return ctx()

    def mark(self, i):
        self.events += 1
        self.log.append(("mark", i, self.events))
        return self.events

    def wait(self, i, event):
        self.log.append(("wait", i, event))

    def keep(self, t, i):
        self.log.append(("keep", i, t.data_ptr()))

    def hand_back(self, t):
        self.log.append(("hand_back", t.data_ptr()))

    def join(self):
        self.log.append(("join",))


@pytest.mark.parametrize("spec", [("manpp", "dgl"), ("man", "infopro"), ("auglocal", None)], ids=str)
@pytest.mark.parametrize("n", [2, 3])
def test_stream_step_order_of_work_and_result(spec, n):
    """The GPU scheduler (concurrency.stream_step), with a recording stand-in for the streams: block k runs
    on stream k mod n, waits only for the event marked right after block k-1's forward (not for its
    auxiliary work), marks its input as read on its own stream, and the caller's stream joins every stream
    at the end; and it computes the sequential step's gradients, EMA units and BN statistics."""
    from manlearn.concurrency import stream_step
    from manlearn.rules import LocalBatch

    method, base = spec
    torch.manual_seed(0)
    seq = LocalLearner("resnet20", method=method, base=base, K=5, num_classes=3, image_size=16).double()
    if seq.momentum is not None:
        seq.momentum = 0.9
    conc = copy.deepcopy(seq)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g).double()
    y = torch.randint(0, 3, (4,), generator=g)
    log = []
    streams = RecordingStreams(n, log)
    real_forward, real_loss = conc.forward_block, conc.local_loss
    outputs = {}

    def forward_block(k, inp, batch):
        log.append(("forward", k, streams.current, inp.data_ptr()))
        outputs[k] = real_forward(k, inp, batch)
        return outputs[k]

    def local_loss(k, h, batch, grad_scale=None):
        log.append(("aux", k, streams.current))
        return real_loss(k, h, batch, grad_scale)

    conc.forward_block, conc.local_loss = forward_block, local_loss
    after = []
    a = seq.train_step(x, y)
    conc.zero_grad(set_to_none=True)
    batch = LocalBatch(conc.prepare_input(x), y, conc.norm_mean, conc.norm_std)
    out, losses = stream_step(conc, batch.x, batch, None, after.append, streams)
    assert after == list(range(5))
    torch.testing.assert_close(torch.stack(losses), a.loss_values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, a.logits, rtol=1e-10, atol=1e-12)
    assert_same_state(seq, conc)

    assert log[0] == ("fork",) and ("join",) in log
    joined = log.index(("join",))
    assert all(entry[0] == "hand_back" for entry in log[joined + 1:]) and len(log) - joined - 1 >= 5
    forwards = {e[1]: i for i, e in enumerate(log) if e[0] == "forward"}
    auxes = {e[1]: i for i, e in enumerate(log) if e[0] == "aux"}
    assert sorted(forwards) == list(range(4)) and sorted(auxes) == list(range(4))  # block 4 is the last
    for k in range(4):
        assert log[forwards[k]][2] == k % n and log[auxes[k]][2] == k % n  # all of block k on stream k mod n
        mark = log[forwards[k] + 1]
        assert mark[:2] == ("mark", k % n) and forwards[k] < log.index(mark) < auxes[k]
        if k + 1 < 5:
            waits = [i for i, e in enumerate(log) if e == ("wait", (k + 1) % n, mark[2])]
            # block k+1 waits for block k's forward, and its wait is issued before its own work
            assert len(waits) == 1 and waits[0] < forwards.get(k + 1, len(log))
            ptr = outputs[k].data_ptr()
            keeps = [i for i, e in enumerate(log) if e == ("keep", (k + 1) % n, ptr)]
            assert len(keeps) == 1 and keeps[0] < forwards.get(k + 1, joined)
    assert not any(e[0] == "keep" and e[2] == batch.x.data_ptr() for e in log)  # the input needs no mark


def test_the_cpu_never_takes_the_stream_path(monkeypatch):
    import manlearn.concurrency as concurrency

    monkeypatch.setattr(concurrency, "stream_step", lambda *a, **kw: pytest.fail("stream_step on the CPU"))
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="dgl", K=4, num_classes=3, image_size=16, blocks_in_flight=2)
    learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))


def test_an_interrupt_while_waiting_stops_the_workers_before_returning(monkeypatch):
    """Ctrl-C reaches the caller's thread while it waits for a worker: it propagates only once the worker
    has stopped (no graph is dropped under a running backward)."""
    import os
    import signal
    import threading
    import time

    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="dgl", K=6, num_classes=3, image_size=16, blocks_in_flight=2)
    real_loss = learner.local_loss
    running = [0]

    def local_loss(k, *a, **kw):
        if threading.current_thread() is threading.main_thread():
            return real_loss(k, *a, **kw)
        running[0] += 1
        try:
            time.sleep(0.5)  # the caller meanwhile runs every other block and waits for this one
            os.kill(os.getpid(), signal.SIGINT)  # a real signal: it breaks the caller's wait
            time.sleep(0.3)
            return real_loss(k, *a, **kw)
        finally:
            running[0] -= 1

    monkeypatch.setattr(learner, "local_loss", local_loss)
    with pytest.raises(KeyboardInterrupt):
        learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert running[0] == 0
