"""The pipeline executor: runs a schedule's action lists over torch.distributed point-to-point.

Each rank walks its own list from `frugalm.parallel.schedules` with the same communication rule the
simulator models (see `frugalm.parallel.schedules.actions`): receives and sends posted since the last
compute are launched as one ``batch_isend_irecv`` before the next compute; F, B and F&B wait for all
launched batches first, W runs while they are in flight. An F&B slot runs its forward then its
backward, or, with ``overlap``, both at once: the backward on a worker thread (`_run_overlapped`). gloo on CPU, NCCL on GPU: the backend is
chosen from the device by `backend_for`, and every wait is bounded by a timeout so a dead or stuck rank
ends the step with an error naming what was awaited instead of hanging.

Stage interface (what the trainer plugs in): a stage is any ``nn.Module`` with ``forward(x) -> hidden``.
The first stage receives the micro-batch input (e.g. ``input_ids``, so it can be "embedding + layers
0..k"); every other stage receives the previous stage's hidden tensor, whose per-micro-batch shape and
dtype are fixed (``hidden_shape``/``hidden_dtype``, they size the receive buffers). The last stage's
output goes to ``criterion(output, labels)``, which must return the micro-batch's mean loss. The
step's loss is the mean over micro-batches, so with equal micro-batches the gradients equal those of
one ``criterion`` over the whole batch. Parameters the loss uses (LM head, MTP modules) must be
parameters of the last stage module: only those get deferred weight gradients and the DualPipe
copy exchange. A loss that needs more than the hidden state (MTP needs the token ids) can be a
method of the last stage module bound to this rank's copy, with ``labels`` carrying what it needs.

DualPipe holds every stage twice (rank r and rank PP-1-r, one copy per direction). After the step the
two copies exchange their gradients and both end with the sum, so identical optimizer steps keep them
identical; gradients accumulated before the step are kept out of the exchange.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Literal, Mapping

import torch
import torch.distributed as dist
from torch import nn

from frugalm.parallel.schedules import Comm, Compute, Overlapped, PipelineSchedule, build_schedule
from frugalm.parallel.sim import Span
from frugalm.parallel.split_backward import DeferredWeightGrad, backward_input_only


@dataclass
class PipelineConfig:
    """The ``[pipeline]`` section: which schedule, how many micro-batches, how long to wait for a peer."""

    schedule: Literal["1f1b", "zb1p", "dualpipe", "dualpipev"] = "1f1b"
    micro_batches: int = 8
    timeout_s: float = 300.0
    # Run the two halves of each F&B slot (DualPipe(V)'s overlapped forward of one micro-batch and
    # backward of another) concurrently: the backward on a worker thread, the forward on the caller's.
    # Expert-parallel all-to-alls of the two go over separate process groups, so one chunk's
    # communication waits while the other computes. Off = the two run one after the other.
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def build(self, pp: int) -> PipelineSchedule:
        return build_schedule(self.schedule, pp, self.micro_batches)


class PipelineError(RuntimeError):
    """A pipeline step that cannot run or did not finish (bad inputs, a peer that timed out or died)."""


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(device: torch.device | str, timeout_s: float, **kwargs: object) -> None:
    """``dist.init_process_group`` with the backend for ``device`` and a bounded timeout (env:// init)."""
    dist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout_s), **kwargs)


def _tag(payload: str, micro: int, src_stage: int, num_stages: int) -> int:
    return (micro * num_stages + src_stage) * 2 + (1 if payload == "grad" else 0)


class _StepState:
    """Tensors of one step, keyed by (micro, stage); emptied as the schedule consumes them."""

    def __init__(self) -> None:
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # hidden, or the scaled loss at the last stage
        self.out_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.in_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.deferred: dict[tuple[int, int], DeferredWeightGrad] = {}
        self.losses: list[torch.Tensor] = []

    def leftovers(self) -> list[str]:
        return [name for name in ("inputs", "outputs", "out_grads", "in_grads", "deferred") if getattr(self, name)]


class PipelineRunner:
    """Runs one rank's share of a schedule; one instance per (schedule, stages) and reusable across steps."""

    def __init__(
        self,
        schedule: PipelineSchedule,
        stages: Mapping[int, nn.Module],
        *,
        hidden_shape: tuple[int, ...],
        hidden_dtype: torch.dtype,
        device: torch.device | str,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = 300.0,
        overlap: bool = False,
    ) -> None:
        if not dist.is_initialized():
            raise PipelineError("torch.distributed is not initialised; call init_process_group first")
        self.schedule = schedule
        self.group = group
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if world != schedule.num_ranks:
            raise PipelineError(f"schedule {schedule.name} is for {schedule.num_ranks} ranks, the group has {world}")
        needed = set(schedule.stages_on(self.rank))
        if set(stages) != needed:
            raise PipelineError(f"rank {self.rank} must hold stages {sorted(needed)}, got {sorted(stages)}")
        self.stages = dict(stages)
        self.hidden_shape = tuple(hidden_shape)
        self.hidden_dtype = hidden_dtype
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        self._loss_scale = 1.0
        self._bounded_wait = backend_for(self.device) != "nccl"  # NCCL: the group's watchdog enforces it
        self.overlap = overlap
        self._worker: ThreadPoolExecutor | None = None  # runs the backward half of F&B slots (overlap)
        # per F&B slot of the last step with overlap on: (forward start, end, backward start, end), seconds
        self.last_overlap: list[tuple[float, float, float, float]] = []

    def _global(self, pp_rank: int) -> int:
        return pp_rank if self.group is None else dist.get_global_rank(self.group, pp_rank)

    # ---------------------------------------------------------------- communication
    def _launch(self, pending: list[tuple[dist.P2POp, str]]) -> list[tuple[dist.Work, str, object]]:
        """Start one batch; each entry keeps its op(s), hence the tensors, alive until waited for."""
        ops = [op for op, _ in pending]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # a peer that already died fails the post itself
            raise PipelineError(
                f"pipeline rank {self.rank}: could not post {', '.join(w for _, w in pending)}: {e}"
            ) from e
        if len(works) == len(pending):
            return [(w, what, op) for w, (op, what) in zip(works, pending)]
        everything = ", ".join(what for _, what in pending)  # a coalesced batch has one handle
        return [(w, everything, ops) for w in works]

    def _collective(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except RuntimeError as e:
            raise PipelineError(f"pipeline rank {self.rank}: {what} failed: {e}") from e

    def _wait(self, works: list[tuple[dist.Work, str, object]], during: str) -> None:
        for work, what, _ in works:
            try:
                ok = work.wait(self.timeout) if self._bounded_wait else work.wait()
            except RuntimeError as e:  # peer died, connection closed, or timed out
                raise PipelineError(
                    f"pipeline rank {self.rank}: {what} failed before {during} "
                    f"(timeout {self.timeout.total_seconds():g}s): {e}"
                ) from e
            if ok is False:
                raise PipelineError(f"pipeline rank {self.rank}: {what} did not complete before {during}")

    def _p2p_op(self, op: Comm, st: _StepState) -> tuple[dist.P2POp, str]:
        S = self.schedule.num_stages
        tag = _tag(op.payload, op.micro, op.src_stage, S)
        if op.kind == "send":
            src = (op.micro, op.src_stage)
            tensor = (st.outputs[src] if op.payload == "act" else st.in_grads.pop(src)).detach().contiguous()
            return dist.P2POp(dist.isend, tensor, self._global(op.peer), self.group, tag), str(op)
        buf = torch.empty(self.hidden_shape, dtype=self.hidden_dtype, device=self.device)
        if op.payload == "act":
            st.inputs[(op.micro, op.dst_stage)] = buf
        else:
            st.out_grads[(op.micro, op.dst_stage)] = buf
        return dist.P2POp(dist.irecv, buf, self._global(op.peer), self.group, tag), str(op)

    # ---------------------------------------------------------------- compute
    def _forward(self, c: Compute, st: _StepState, labels: list[torch.Tensor] | None,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        key = (c.micro, c.stage)
        x = st.inputs[key]
        if c.stage > 0:
            x.requires_grad_(True)
        y = self.stages[c.stage](x)
        S, M = self.schedule.num_stages, self.schedule.num_micro
        if c.stage == S - 1:
            if labels is None:
                raise PipelineError(f"pipeline rank {self.rank} computes the loss but got no labels")
            loss = criterion(y, labels[c.micro])
            st.losses.append(loss.detach())
            st.outputs[key] = loss * (self._loss_scale / M)
            return
        if y.shape != self.hidden_shape or y.dtype != self.hidden_dtype:
            raise PipelineError(
                f"stage {c.stage} returned {tuple(y.shape)} {y.dtype}; the pipeline was set up for "
                f"{self.hidden_shape} {self.hidden_dtype}"
            )
        st.outputs[key] = y
        if self.schedule.rank_of(c.micro, c.stage + 1) == self.rank:  # DualPipeV's turn: hand over locally
            st.inputs[(c.micro, c.stage + 1)] = y.detach()

    def _backward(self, c: Compute, st: _StepState) -> None:
        key = (c.micro, c.stage)
        out = st.outputs.pop(key)
        grad = st.out_grads.pop(key, None) if c.stage < self.schedule.num_stages - 1 else None
        x = st.inputs.pop(key)
        needs_input_grad = c.stage > 0
        if c.split_weight:
            params = list(self.stages[c.stage].parameters())
            grads, st.deferred[key] = backward_input_only(out, grad, [x] if needs_input_grad else [], params)
            dx = grads[0] if needs_input_grad else None
        else:
            torch.autograd.backward(out, grad)
            dx = x.grad if needs_input_grad else None
        if needs_input_grad:
            if dx is None:
                dx = torch.zeros_like(x)
            if self.schedule.rank_of(c.micro, c.stage - 1) == self.rank:
                st.out_grads[(c.micro, c.stage - 1)] = dx
            else:
                st.in_grads[key] = dx

    def _run_compute(self, action: Compute | Overlapped, st: _StepState, labels: list[torch.Tensor] | None,
                     criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        if isinstance(action, Overlapped) and self.overlap and action.forward.micro != action.backward.micro:
            self._run_overlapped(action, st, labels, criterion)
            return
        chunks = (action.forward, action.backward) if isinstance(action, Overlapped) else (action,)
        for c in chunks:
            if c.kind == "F":
                self._forward(c, st, labels, criterion)
            elif c.kind == "B":
                self._backward(c, st)
            else:
                st.deferred.pop((c.micro, c.stage)).run()

    def _run_overlapped(self, action: Overlapped, st: _StepState, labels: list[torch.Tensor] | None,
                        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Forward here while the backward runs on the worker thread; both finish before the slot ends.

        The two chunks touch different micro-batches' entries of ``st`` (the schedule pairs independent
        chunks), only the backward accumulates into ``.grad``, and autograd runs a CPU graph on the
        thread that calls it, so the result equals running them one after the other. Collectives inside
        the chunks must not share a process group across the two threads (ranks could otherwise pair
        them up in different orders): expert parallelism sends backward all-to-alls over its own group.
        """
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-bwd-r{self.rank}",
                                              initializer=_bind_device, initargs=(self.device,))
        times: list[float] = []

        def backward() -> None:
            times.append(time.perf_counter())
            try:
                self._backward(action.backward, st)
            finally:
                times.append(time.perf_counter())

        pending = self._worker.submit(backward)
        f0 = time.perf_counter()
        try:
            self._forward(action.forward, st, labels, criterion)
        finally:
            f1 = time.perf_counter()
            error = pending.exception()  # waits; a failed forward still lets the backward finish or time out
        if error is not None:
            raise error
        self.last_overlap.append((f0, f1, times[0], times[1]))

    def close(self) -> None:
        """Stop the backward worker thread, if one was started."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    # ---------------------------------------------------------------- step
    def step(
        self,
        inputs: torch.Tensor | None,
        labels: torch.Tensor | None,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        batch_dim: int = 0,
        trace: list[Span] | None = None,
        loss_scale: float = 1.0,
    ) -> torch.Tensor:
        """One forward+backward of the whole batch; returns the mean micro-batch loss on every rank.

        Gradients are *added* to ``.grad`` (zero them before the step as usual); they are those of
        ``loss_scale`` times the mean loss (``1/grad_accum`` when several steps make one update).
        ``inputs`` is needed only on ranks running stage 0 and ``labels`` only on ranks running the
        last stage; other ranks may pass None. If ``trace`` is given, one `Span` per compute slot is
        appended (times in seconds of ``time.perf_counter``, comparable across processes of one machine).
        """
        sched = self.schedule
        M = sched.num_micro
        self._loss_scale = float(loss_scale)
        in_micro = self._split(inputs, "inputs", sched.input_ranks(), batch_dim)
        label_micro = self._split(labels, "labels", sched.loss_ranks(), batch_dim)
        mirrored = [s for s in sorted(self.stages) if len(sched.holders(s)) > 1]
        saved = self._stash_grads(mirrored)

        st = _StepState()
        self.last_overlap = []
        if in_micro is not None:
            for m in range(M):
                if sched.rank_of(m, 0) == self.rank:
                    st.inputs[(m, 0)] = in_micro[m]
        # NCCL needs every rank of the group in its first P2P batch; it also lines the ranks up
        self._collective(lambda: dist.barrier(group=self.group), "the barrier before the step")

        pending: list[tuple[dist.P2POp, str]] = []
        in_flight: list[tuple[dist.Work, str, object]] = []
        for action in sched.actions[self.rank]:
            if isinstance(action, Comm):
                pending.append(self._p2p_op(action, st))
                continue
            if pending:
                in_flight.extend(self._launch(pending))
                pending = []
            is_weight = isinstance(action, Compute) and action.kind == "W"
            if not is_weight and in_flight:
                self._wait(in_flight, str(action))
                in_flight = []
            t0 = time.perf_counter()
            self._run_compute(action, st, label_micro, criterion)
            if trace is not None:
                first = action.forward if isinstance(action, Overlapped) else action
                kind = "FB" if isinstance(action, Overlapped) else action.kind
                trace.append(Span(self.rank, str(action), kind, t0, time.perf_counter(), first.micro, first.stage))
        if pending:
            in_flight.extend(self._launch(pending))
        self._wait(in_flight, "the end of the step")
        left = st.leftovers()
        if left:
            raise PipelineError(f"pipeline rank {self.rank}: schedule {sched.name} left unconsumed {left}")

        self._sum_mirrored_grads(mirrored)
        self._restore_grads(saved)
        total = torch.stack(st.losses).sum() if st.losses else torch.zeros((), device=self.device)
        total = total.to(device=self.device, dtype=torch.float32)
        self._collective(lambda: dist.all_reduce(total, group=self.group), "the loss all-reduce")
        return total / M

    def _split(self, batch: torch.Tensor | None, what: str, ranks: tuple[int, ...], dim: int) -> list[torch.Tensor] | None:
        if self.rank not in ranks:
            return None
        if batch is None:
            raise PipelineError(f"pipeline rank {self.rank} runs the {'first' if what == 'inputs' else 'last'} stage and needs {what}")
        M = self.schedule.num_micro
        if batch.shape[dim] % M:
            raise PipelineError(f"{what}: batch size {batch.shape[dim]} is not divisible by {M} micro-batches")
        return list(batch.to(self.device).tensor_split(M, dim=dim))

    def _stash_grads(self, stages: list[int]) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """Set aside gradients accumulated before this step so only this step's are exchanged."""
        saved = []
        for s in stages:
            for p in self.stages[s].parameters():
                saved.append((p, p.grad))
                p.grad = None
        return saved

    @staticmethod
    def _restore_grads(saved: list[tuple[nn.Parameter, torch.Tensor | None]]) -> None:
        for p, g in saved:
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def _sum_mirrored_grads(self, stages: list[int]) -> None:
        """Both holders of a stage end with the sum of their gradients (DualPipe's two directions)."""
        if not stages:
            return
        ops: list[tuple[dist.P2POp, str]] = []
        bufs = []
        base = 2 * self.schedule.num_micro * self.schedule.num_stages
        for s in stages:  # same stage order on both holders keeps the per-peer message order aligned
            peer = next(r for r in self.schedule.holders(s) if r != self.rank)
            params = [p for p in self.stages[s].parameters() if p.requires_grad]
            mine = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            theirs = torch.empty_like(mine)
            what = f"gradient exchange of stage {s} with rank {peer}"
            ops.append((dist.P2POp(dist.isend, mine, self._global(peer), self.group, base + s), what))
            ops.append((dist.P2POp(dist.irecv, theirs, self._global(peer), self.group, base + s), what))
            bufs.append((params, mine, theirs))
        self._wait(self._launch(ops), "the optimizer step")
        for params, mine, theirs in bufs:
            total = mine + theirs
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = total[offset:offset + n].view_as(p).clone()
                offset += n


def _bind_device(device: torch.device) -> None:
    """Make ``device`` the worker thread's current accelerator (the current device is per thread)."""
    if device.type != "cpu" and device.index is not None and hasattr(torch, "accelerator"):
        torch.accelerator.set_device_index(device.index)


def run_pipeline_step(
    schedule: PipelineSchedule,
    stages: Mapping[int, nn.Module],
    inputs: torch.Tensor | None,
    labels: torch.Tensor | None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    hidden_shape: tuple[int, ...],
    hidden_dtype: torch.dtype,
    device: torch.device | str,
    group: dist.ProcessGroup | None = None,
    timeout_s: float = 300.0,
    batch_dim: int = 0,
    trace: list[Span] | None = None,
    loss_scale: float = 1.0,
    overlap: bool = False,
) -> torch.Tensor:
    """Run one pipelined forward+backward on this rank; returns the mean loss (same on every rank).

    ``stages`` maps global stage index -> module for exactly the stages this rank holds
    (``schedule.stages_on(rank)``). See `PipelineRunner.step` for the data each rank needs.
    """
    runner = PipelineRunner(schedule, stages, hidden_shape=hidden_shape, hidden_dtype=hidden_dtype,
                            device=device, group=group, timeout_s=timeout_s, overlap=overlap)
    try:
        return runner.step(inputs, labels, criterion, batch_dim=batch_dim, trace=trace, loss_scale=loss_scale)
    finally:
        runner.close()
