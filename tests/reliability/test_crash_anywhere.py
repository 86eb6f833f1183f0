"""Crash anywhere: SIGKILL the sharding job at random moments, re-run it, get the same bytes.

Each run is a real process killed with SIGKILL (no ``finally``, no cleanup, exactly what the OOM
killer or a lost node does). Processes fork from a forkserver that has already imported the
pipeline, so a kill lands in the job's work, not in interpreter start-up, and 24 kills stay cheap.
Rounds of several kills on one output folder are followed by a run to completion, whose files
must equal an uninterrupted run's: same bytes, nothing missing, no ``_tmp/`` leftovers.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.ray_shard import run_serial, run_sharding
from tests.reliability.conftest import files_of, tiny_config

pytestmark = pytest.mark.slow
MIN_KILLS = 24
KILLS_PER_ROUND = 2
SHARD_BYTES = 15_000  # one canvas per shard: 9 shards, so kills land between and inside many commits


def shard_job(dst: str) -> None:
    """The job a child process runs: the in-process (serial) path of jobs/shard.py, same bytes as Ray."""
    run_sharding(tiny_config(dst, shard_bytes=SHARD_BYTES), runner=run_serial)


def snapshot(dst: Path) -> str:
    """Where the job was when it died, by what it had written: the kill point's phase."""
    tars = len(list(dst.glob("*/shard-*.tar")))
    tmp = len(list((dst / "_tmp").glob("*"))) if (dst / "_tmp").exists() else 0
    done = (dst / "dataset.json").exists()
    return f"tars={tars} tmp={tmp} dataset_json={done}"


def tars(dst: Path) -> int:
    """Committed shards so far. The job removes ``_tmp/`` while we look: a folder vanishing
    under the glob means "look again", not an error."""
    while True:
        try:
            return len(list(dst.glob("*/shard-*.tar")))
        except FileNotFoundError:
            continue


def run_to_end(ctx: Any, dst: Path) -> list[float]:
    """Run the job in a child to completion; when each tar was committed (seconds from the start):
    the timeline the kill points are drawn from."""
    proc = ctx.Process(target=shard_job, args=(str(dst),))
    started = time.monotonic()
    proc.start()
    times: list[float] = []
    while proc.is_alive() and time.monotonic() - started < 120:
        while tars(dst) > len(times):
            times.append(time.monotonic() - started)
        time.sleep(0.002)
    proc.join(1)
    if proc.exitcode != 0:
        proc.kill()
        raise AssertionError(f"{dst}: the run to completion exited with {proc.exitcode}")
    times += [time.monotonic() - started] * (tars(dst) - len(times))
    return times


def run_killed(ctx: Any, dst: Path, committed: int, delay: float) -> bool:
    """Run the job in a child and SIGKILL it ``delay`` seconds after the ``committed``-th tar.
    True if it was still alive when killed (a real kill point)."""
    proc = ctx.Process(target=shard_job, args=(str(dst),))
    proc.start()
    deadline = time.monotonic() + 60
    while proc.is_alive() and tars(dst) < committed and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.join(delay)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    proc.join(30)
    return alive


def test_killed_at_random_points_the_rerun_is_byte_identical(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.ray_shard", "tests.reliability.conftest"])
    run_to_end(ctx, tmp_path / "warm")  # warms the forkserver (its imports happen here)
    timeline = run_to_end(ctx, tmp_path / "timed")  # the uninterrupted run: its bytes are the reference
    reference = files_of(tmp_path / "timed")
    shards = len([p for p in reference if p.endswith(".tar")])
    assert files_of(tmp_path / "warm") == reference and shards >= 8
    start_up = timeline[0]
    gaps = sorted(b - a for a, b in zip(timeline, timeline[1:]) if b > a)
    gap = gaps[len(gaps) // 2] if gaps else start_up / shards  # a typical shard's time

    rng = random.Random(8)
    kills: list[dict[str, Any]] = []
    rounds = 0
    while len(kills) < MIN_KILLS and rounds < 30:
        dst = tmp_path / f"round{rounds}"
        for kill in range(KILLS_PER_ROUND):
            # The first kill of a round goes after 0, 1, ... committed shards in turn, so the
            # kills cover every phase of the job whatever the machine's speed; within a phase the
            # moment is random (a slice of start-up or of one shard's time). Later kills hit the
            # resumed job at random points.
            committed = rounds % (shards + 1) if kill == 0 else rng.randint(tars(dst), shards)
            at = (committed, rng.uniform(0.0, start_up if committed == 0 else gap))
            if run_killed(ctx, dst, *at):
                kills.append({"round": rounds, "after_tars": at[0], "delay_s": round(at[1], 3),
                              "state": snapshot(dst)})
        run_to_end(ctx, dst)  # the re-run that must finish the same dataset
        assert files_of(dst) == reference, f"round {rounds}: differs after kills {kills[-KILLS_PER_ROUND:]}"
        rounds += 1
    phases = sorted({k["state"] for k in kills})
    figures = {"kills": len(kills), "rounds": rounds, "last_commit_s": round(timeline[-1], 2), "distinct_states": len(phases)}
    print(f"\nFIGURES crash-anywhere: {json.dumps(figures)}")
    for k in kills:
        print("  kill", k)
    assert len(kills) >= MIN_KILLS
    assert len(phases) >= 4  # the kills landed in different phases of the job, not all at start-up
