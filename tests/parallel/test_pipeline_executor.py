"""Multi-process (gloo, CPU) equivalence of pipelined steps with a single-process reference.

For every schedule and 2 and 4 ranks, one pipeline step's mean loss and every parameter gradient
(both copies of a stage under DualPipe) must match plain sequential training of the same stages on
the same batch. Tolerance: fp32, ``rtol=1e-5, atol=1e-6``; the only differences are summation order
(micro-batch gradient accumulation, the mirrored-copy sum), so anything larger is a schedule bug.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

import pipeline_mp_workers as workers

pytestmark = pytest.mark.multiproc

# (schedule, micro-batches, accumulated steps): two steps check that gradients held before a step
# survive DualPipe's mirrored-copy exchange exactly once
# "+overlap": each F&B slot's forward and backward run concurrently on two threads (`PipelineConfig.overlap`)
CASES = {
    2: [("1f1b", 4, 1), ("zb1p", 4, 1), ("dualpipe", 4, 1), ("dualpipev", 4, 1), ("1f1b", 1, 1), ("dualpipe", 6, 2),
        ("dualpipev+overlap", 4, 1), ("dualpipe+overlap", 6, 2)],
    4: [("1f1b", 8, 1), ("zb1p", 6, 1), ("dualpipe", 8, 1), ("dualpipev", 8, 1), ("dualpipe", 8, 2),
        ("dualpipe+overlap", 8, 1)],
}


def _launch(target, world: int, args: tuple, tmp: Path, join_s: float) -> list[int]:
    """Start ``world`` processes and wait; kill the ones still alive after ``join_s``.

    A forkserver that has imported torch once forks each rank in milliseconds; spawning would import
    torch again in every rank (~3-10 s each on the 2-core CI machine). Unlike plain fork, the children
    inherit no OpenMP or distributed state from the pytest process.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "pipeline_mp_workers", "frugalm.parallel.pipeline"])
    store = str(tmp / "store")
    procs = [ctx.Process(target=target, args=(rank, world, store, str(tmp), *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_s)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def _check_against_reference(world: int, cases: list[tuple[str, int, int]], tmp_path: Path,
                             rtol: float, atol: float) -> None:
    from frugalm.parallel.schedules import Overlapped, build_schedule

    for name, micro, steps in cases:
        sched = build_schedule(name.removesuffix("+overlap"), world, micro)
        ref_loss, ref_grads = workers.reference(sched.num_stages, 2 * micro)
        checked = set()
        for rank in range(world):
            got = torch.load(tmp_path / f"{name}-{micro}-{steps}-rank{rank}.pt", weights_only=True)
            assert got["loss"] == pytest.approx(ref_loss, rel=rtol, abs=atol), (name, rank)
            # with overlap on, every F&B slot of the rank's last step ran on two threads
            slots = sum(isinstance(a, Overlapped) for a in sched.actions[rank])
            assert got["overlapped_slots"] == (slots if name.endswith("+overlap") else 0), (name, rank)
            if name.endswith("+overlap"):
                assert slots > 0, name
            for stage, grads in got["grads"].items():
                for pname, g in grads.items():
                    torch.testing.assert_close(g, steps * ref_grads[stage][pname], rtol=rtol, atol=atol,
                                               msg=lambda m: f"{name} pp={world} stage {stage} {pname}: {m}")
                checked.add((stage, rank))
        # every stage copy was compared: DualPipe holds each stage on two ranks
        copies = 2 if name.removesuffix("+overlap") == "dualpipe" else 1
        assert len(checked) == sched.num_stages * copies


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_matches_single_process(world: int, tmp_path: Path) -> None:
    codes = _launch(workers.equivalence_worker, world, (CASES[world],), tmp_path, join_s=150)
    errors = "\n".join(p.read_text() for p in tmp_path.glob("error-rank*.txt"))
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"
    _check_against_reference(world, CASES[world], tmp_path, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL pipeline needs two CUDA devices (one per rank)")
def test_pipeline_nccl_matches_single_process(tmp_path: Path) -> None:
    codes = _launch(workers.equivalence_worker, 2, (CASES[2], "cuda"), tmp_path, join_s=300)
    errors = "\n".join(p.read_text() for p in tmp_path.glob("error-rank*.txt"))
    assert codes == [0, 0], f"exit codes {codes}\n{errors}"
    # GPU kernels reduce in other orders than the CPU reference (TF32 stays off for fp32 matmuls)
    _check_against_reference(2, CASES[2], tmp_path, rtol=1e-4, atol=1e-5)


def test_stuck_rank_ends_with_error_not_hang(tmp_path: Path) -> None:
    timeout_s, stall_s = 1.5, 5.0
    _launch(workers.stuck_rank_worker, 2, (timeout_s, stall_s), tmp_path, join_s=60)
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome.startswith("PipelineError"), outcome
    assert "pipeline rank 0" in outcome and "r1" in outcome, outcome  # names the message it waited for
    assert float(elapsed) < stall_s, f"rank 0 waited {elapsed}s: it hung until the peer came back"
    # the stalled rank, once awake, finds its peer gone and fails too instead of hanging
    _, outcome1 = (tmp_path / "rank1.txt").read_text().split("\n", 1)
    assert outcome1.startswith("PipelineError"), outcome1


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_crashed_rank_ends_its_peer_with_error_not_hang(schedule: str, tmp_path: Path) -> None:
    """A rank raising mid-schedule (its process exits) ends the peer blocked in a P2P receive at once,
    well before the (deliberately long) timeout: gloo reports the closed connection."""
    timeout_s = 30.0
    codes = _launch(workers.crash_rank_worker, 2, (schedule, timeout_s), tmp_path, join_s=60)
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome.startswith("PipelineError"), outcome
    assert "pipeline rank 0" in outcome, outcome
    assert float(elapsed) < 10.0, f"rank 0 needed {elapsed}s to notice"
    assert "injected failure" in (tmp_path / "rank1.txt").read_text()
    assert codes[1] != 0, codes
