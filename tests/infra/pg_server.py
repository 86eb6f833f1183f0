"""A throwaway PostgreSQL server on 127.0.0.1, from the machine's PostgreSQL binaries (Debian's package).

initdb refuses to run as root, so as root every server command runs as the "postgres" user that
Debian's package creates (``runuser -u postgres``), in a temporary folder owned by that user. The
cluster has a password (scram-sha-256 over TCP) so the MLflow URI carries credentials as the
manifests' does; fsync is off: nothing here needs to survive a crash.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER, DATABASE = "mlflow", "mlflow"
INSTALL_HINT = "apt-get install -y postgresql"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(re.sub(r"\D", "", p.parts[-3]) or 0))
    return found[-1].parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgServer:
    bin_dir: Path
    root: Path
    port: int
    password: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, *cmd: str) -> None:
        """A server command as the cluster's owner; its output is in the error when it fails."""
        done = subprocess.run(_as_owner([str(self.bin_dir / cmd[0]), *cmd[1:]]), capture_output=True, text=True,
                              timeout=180)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{log[-2000:]}")

    @classmethod
    def start(cls, bin_dir: Path) -> PgServer:
        """initdb + pg_ctl start on a free port, then CREATE DATABASE mlflow."""
        root = Path(tempfile.mkdtemp(prefix="tnet-pg-"))
        server = cls(bin_dir, root, free_port(), secrets.token_hex(12))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("as root, PostgreSQL must run as the 'postgres' user Debian's package creates; "
                                   f"there is none ({INSTALL_HINT})") from None
            os.chown(root, owner.pw_uid, owner.pw_gid)
        pwfile = root / "password"
        pwfile.write_text(server.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            server.run("initdb", "-D", str(server.data), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
                       "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
            options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
                       "-c fsync=off -c full_page_writes=off")
            server.run("pg_ctl", "-D", str(server.data), "-l", str(root / "server.log"), "-w", "-t", "120", "-o", options,
                       "start")
            server.execute(f"CREATE DATABASE {DATABASE}", database="postgres")
        except BaseException:
            server.stop()
            raise
        return server

    def connect(self, database: str = DATABASE):
        import psycopg  # the driver the MLflow server uses too (postgresql+psycopg://)

        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database)

    def execute(self, sql: str, database: str = DATABASE) -> list[tuple]:
        conn = self.connect(database)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(_as_owner([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)
