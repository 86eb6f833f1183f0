"""The demo's own Ray head: distinct ports, clear errors, and a stop that reaches only its tree.

Starting a real head is covered by tests/training/test_cluster.py (``ray job submit`` end to end).
"""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from training.local_head import HEAD_PORTS, free_ports, start_head, stop_tree


def test_free_ports_gives_one_distinct_port_per_head_port() -> None:
    ports = free_ports()
    assert set(ports) == set(HEAD_PORTS)
    assert len(set(ports.values())) == len(HEAD_PORTS)


def test_missing_ports_are_named(tmp_path: Path) -> None:
    ports = free_ports()
    del ports["dashboard-port"]
    with pytest.raises(ValueError, match="dashboard-port"):
        start_head("ray", str(tmp_path), ports, 1, tmp_path / "head.log", {})


def test_a_head_that_exits_says_where_its_log_is(tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    log = tmp_path / "head.log"
    with pytest.raises(RuntimeError, match=rf"exited with 3; see {log}"):
        start_head(str(fake), str(tmp_path), free_ports(), 1, log, {}, timeout=20)
    assert "cannot start" in log.read_text()


def test_stop_tree_stops_the_process_and_its_descendants_only(tmp_path: Path) -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        parent = psutil.Process(proc.pid)
        for _ in range(200):  # until the child is spawned
            if parent.children():
                break
            time.sleep(0.05)
        children = parent.children(recursive=True)
        assert children
        stop_tree(proc, timeout=5)
        assert proc.poll() is not None
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
