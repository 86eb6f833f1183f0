"""A Ray head on this machine that can be stopped alone.

`ray stop` stops every Ray node of the machine, including clusters that belong to someone else;
the demo and the tests instead run ``ray start --head --block`` in a session of its own and stop
exactly that process tree. Its dashboard (the job server) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

# the ports `ray start --head` opens; each gets a free one, so two heads never collide
HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")


def start_head(ray_bin: str, temp_dir: str, ports: dict[str, int], num_cpus: int, log: Path,
               env: dict[str, str], timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start the head and wait for its job server; returns the process and the job server's URL.

    ``temp_dir`` must be short (Ray's socket paths live under it). The head's output goes to ``log``.
    """
    missing = [name for name in HEAD_PORTS if name not in ports]
    if missing:
        raise ValueError(f"start_head: no port given for {', '.join(missing)}")
    args = [ray_bin, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            "--disable-usage-stats"] + [f"--{name}={ports[name]}" for name in HEAD_PORTS]
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # on SIGTERM stop now, not in 30 s
    with open(log, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(address, proc, timeout, log)
    except BaseException:
        stop_tree(proc)
        raise
    return proc, address


def wait_for_http(address: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Until ``address`` answers (any HTTP status: a 401 without a token means it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{address}: no Ray dashboard after {timeout:.0f} s" + (f"; see {log}" if log else ""))


def stop_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop ``proc`` gracefully, then kill whatever of its descendants is left, by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)  # gone (or a zombie awaiting its reaper) when this returns


def free_ports(names: tuple[str, ...] = HEAD_PORTS) -> dict[str, int]:
    """A free 127.0.0.1 port for each name (held apart until all are chosen, so they differ)."""
    import socket

    socks, ports = [], {}
    try:
        for name in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports[name] = s.getsockname()[1]
    finally:
        for s in socks:
            s.close()
    return ports

