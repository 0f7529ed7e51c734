"""Block pipeline: the K local blocks spread over P worker processes.

Local learning's promise is that block k never waits for a backward pass of a later block.  Here
worker w owns a contiguous range of blocks (with their auxiliary networks; the last worker owns the
head) and, for every micro-batch, runs its blocks' forward, local loss, backward, EMA update and its
own optimiser step, then sends the *detached* block output (with the targets, and the input image
when an InfoPro decoder needs it) to worker w+1.  While w+1 works on micro-batch t, w already works
on t+1: with P workers, P micro-batches are processed at once.

Exactly what is computed
    Worker w's step t uses its own weights after t updates, and receives h_t computed by worker
    w-1 with *its* weights after t updates: the same as the sequential step of SPEC §1.  So for
    every rule without momentum units (greedy, dgl, infopro, ...) the pipeline computes exactly what
    one process computes (tests/test_pipeline.py checks it against the Trainer).  The one difference
    is MAN/MAN++'s EMA across a worker boundary, below.

MAN/MAN++ parameter back-sync and its staleness
    The auxiliary network of worker w's last block tracks u, the first unit of worker w+1's first
    block.  Worker w keeps a local copy of u (the "shadow"), and worker w+1 sends u's parameters
    back every ``n = pipeline_param_sync_every`` steps.  To stay deterministic (and deadlock-free)
    the version is fixed, not "whatever has arrived": at step t worker w uses u as of
    ``v(t) = n·floor((t − d)/n)`` updates (the initial u while t − d < n), where
    ``d = pipeline_param_delay ≥ 1``.  The sequential algorithm uses v(t) = t, so the staleness is
    ``t − v(t) ∈ [d, d + n − 1]`` steps.  With the EMA momentum 0.995 (an average over ~200 steps)
    a few steps of staleness are negligible; d should be at least the number of micro-batches
    worker w may run ahead of w+1 (about ``pipeline_queue_depth``) so that waiting for a version
    rarely stalls worker w.  EMA updates of boundaries inside one worker are exact.

Transport: torch.distributed point-to-point (gloo on CPU, nccl on CUDA)
    ``isend``/``irecv`` from the worker's main thread: non-blocking, so sends and receives overlap
    compute without extra threads, and the same code spans devices and nodes (torch.multiprocessing
    queues would be simpler on one CPU host but cannot cross nodes and need CUDA IPC on GPUs).  A
    gloo send completes only when the receiver has posted the matching receive, which gives
    back-pressure for free.

Bounded queues (flat memory)
    A worker has at most ``pipeline_queue_depth`` (D) sends outstanding per link: before sending
    micro-batch t it waits for the send of t − D to complete; a receiver posts at most D receives
    ahead.  So at most about 2·D micro-batches are in flight on a link and worker w can run at most
    ~D+1 micro-batches ahead of w+1, whatever their speeds.

Failures
    Every wait has a timeout (``pipeline_timeout_s``): a worker that hears nothing from a live but
    stuck neighbour raises :class:`WorkerTimeout` naming it.  A worker that dies closes its sockets,
    so its neighbours fail at once (:class:`WorkerGone`), and the launching process, which watches
    every worker's exit, stops the others and raises :class:`PipelineError` naming the first worker
    that died (and the signal that killed it).

Evaluation and checkpoints
    At the end of an epoch every worker sends its part of the state (blocks, auxiliary networks,
    head) and its loss statistics to worker 0 (one ``gather_object`` on a control group: this is
    also a pipeline flush); worker 0 assembles the whole learner, evaluates the whole backbone and
    writes ``metrics.jsonl`` and an atomic ``last.pt`` that ``manlearn eval`` reads, holding also every
    worker's state (optimiser, RNG, running figures, MAN's shadow unit and versions in flight), so that
    ``--resume`` continues exactly.  Ctrl-C and SIGTERM stop every worker after one agreed step, saved
    (exit status 130 / 143; see :mod:`.worker` and :mod:`.launcher`).

Modules
    :mod:`.planner` (which worker owns which blocks: FLOP-balanced contiguous ranges, the
    :class:`PipelinePlan`; MAN's sync versions), :mod:`.transport` (bounded point-to-point links,
    MAN's parameter back-sync, typed timeouts), :mod:`.worker` (one worker's loop), :mod:`.launcher`
    (:func:`run_pipeline`: spawn, watch, summarise), :mod:`.errors`.
"""

from __future__ import annotations

from .errors import PipelineError, WorkerGone, WorkerTimeout
from .launcher import run_pipeline
from .planner import PipelinePlan, block_costs, make_plan, needs_image, param_version, partition

__all__ = ["PipelineError", "WorkerTimeout", "WorkerGone", "run_pipeline", "PipelinePlan", "make_plan",
           "partition", "block_costs", "param_version", "needs_image"]
