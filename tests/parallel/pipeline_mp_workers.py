"""Process entry points and a tiny staged model for the pipeline tests (imported by spawned children).

Kept out of ``test_*.py`` so pytest does not collect it, and importable by name in a spawned child
because pytest puts this folder on ``sys.path`` and spawn passes ``sys.path`` on.
"""

from __future__ import annotations

import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ = 11, 16, 3


class EmbedStage(nn.Module):
    """First stage: token ids -> hidden, the shape a decoder's "embedding + layers 0..k" stage has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.embed(ids)))


class BlockStage(nn.Module):
    """A residual MLP block with a norm: stands in for "layers i..j"."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class HeadStage(BlockStage):
    """Last stage: a block, then norm + LM head (logits go to the criterion)."""

    def __init__(self) -> None:
        super().__init__()
        self.final_norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(super().forward(h)))


def build_stage(stage: int, num_stages: int) -> nn.Module:
    """Identical weights in every process: the seed depends only on the stage index."""
    torch.manual_seed(1234 + stage)
    if stage == 0:
        return EmbedStage()
    return HeadStage() if stage == num_stages - 1 else BlockStage()


def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def make_batch(batch: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return ids, labels


def reference(num_stages: int, batch: int) -> tuple[float, dict[int, dict[str, torch.Tensor]]]:
    """Single-process loss and gradients of the same stages on the same (whole) batch."""
    stages = [build_stage(s, num_stages) for s in range(num_stages)]
    ids, labels = make_batch(batch)
    h = ids
    for stage in stages:
        h = stage(h)
    loss = criterion(h, labels)
    loss.backward()
    grads = {s: {n: p.grad.clone() for n, p in stage.named_parameters()} for s, stage in enumerate(stages)}
    return loss.item(), grads


def _init(rank: int, world: int, store: str, timeout_s: float, device: torch.device) -> None:
    from frugalm.parallel.pipeline import backend_for

    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def equivalence_worker(rank: int, world: int, store: str, out_dir: str, cases: list[tuple[str, int, int]],
                       device_type: str = "cpu") -> None:
    """Per (schedule, micro, steps) case, accumulate ``steps`` pipeline steps; save loss + stage grads."""
    from frugalm.parallel.pipeline import PipelineRunner
    from frugalm.parallel.schedules import build_schedule

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    try:
        _init(rank, world, store, timeout_s=60, device=device)
        for name, micro, steps in cases:
            # "<schedule>+overlap": F&B slots run their forward and backward on two threads at once
            sched = build_schedule(name.removesuffix("+overlap"), world, micro)
            stages = {s: build_stage(s, sched.num_stages).to(device) for s in sched.stages_on(rank)}
            batch = 2 * micro
            ids, labels = make_batch(batch)
            runner = PipelineRunner(sched, stages, hidden_shape=(batch // micro, SEQ, DIM),
                                    hidden_dtype=torch.float32, device=device, timeout_s=60,
                                    overlap=name.endswith("+overlap"))
            for _ in range(steps):  # no zero_grad in between: gradients accumulate like a backward()
                loss = runner.step(ids, labels, criterion)
            runner.close()
            grads = {s: {n: p.grad.cpu() for n, p in m.named_parameters()} for s, m in stages.items()}
            torch.save({"loss": loss.item(), "grads": grads, "overlapped_slots": len(runner.last_overlap)},
                       Path(out_dir) / f"{name}-{micro}-{steps}-rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(out_dir) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


class _Stuck(nn.Module):
    """A stage that stops answering once: its first forward sleeps past the pipeline's timeout."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        self.seconds = 0.0
        return self.inner(h)


def _faulty_step(rank: int, world: int, store: str, out_dir: str, schedule: str, timeout_s: float,
                 faulty: type, *fault_args, reraise: bool = False) -> None:
    """One pipeline step whose last rank runs its stages wrapped in ``faulty``; every rank writes its
    elapsed time and outcome to ``rank{r}.txt``. With ``reraise`` the faulty rank's process dies with its
    error (as under torchrun); the others must fail, not hang."""
    from frugalm.parallel.pipeline import run_pipeline_step
    from frugalm.parallel.schedules import build_schedule

    _init(rank, world, store, timeout_s=timeout_s, device=torch.device("cpu"))
    sched = build_schedule(schedule, world, 2 * world)
    stages = {s: build_stage(s, sched.num_stages) for s in sched.stages_on(rank)}
    if rank == world - 1:
        stages = {s: faulty(m, *fault_args) for s, m in stages.items()}
    ids, labels = make_batch(4 * world)
    start = time.perf_counter()
    try:
        run_pipeline_step(sched, stages, ids, labels, criterion, hidden_shape=(2, SEQ, DIM),
                          hidden_dtype=torch.float32, device="cpu", timeout_s=timeout_s)
        outcome = "finished"
    except Exception as e:  # the error under test
        outcome = f"{type(e).__name__}: {e}"
        if reraise and rank == world - 1:
            (Path(out_dir) / f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.3f}\n{outcome}")
            raise
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.3f}\n{outcome}")


def stuck_rank_worker(rank: int, world: int, store: str, out_dir: str, timeout_s: float, stall_s: float) -> None:
    """Last rank stalls in its forward; every other rank must fail with a timeout error, not hang."""
    _faulty_step(rank, world, store, out_dir, "1f1b", timeout_s, _Stuck, stall_s)


class _Crash(nn.Module):
    """A stage whose second forward raises (a bug or an OOM on that rank, mid-schedule)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected failure in the stage forward")
        return self.inner(h)


def crash_rank_worker(rank: int, world: int, store: str, out_dir: str, schedule: str, timeout_s: float) -> None:
    """The last rank raises in its second forward and its process exits; the others must fail, not hang."""
    _faulty_step(rank, world, store, out_dir, schedule, timeout_s, _Crash, reraise=True)
