"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temp dir, 127.0.0.1 only.

initdb refuses to run as root, so under root (CI) the server runs as the ``postgres`` user that
Debian's package creates (or ``nobody``) through ``runuser``. Debian keeps the server binaries in
/usr/lib/postgresql/<version>/bin, off PATH; both places are searched. Where no server can be
found, or psycopg2 is missing, the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mupfast.distributed.engine import free_port


def pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl (PATH first, then Debian's versioned dirs)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name.split(".")[0] or 0)
    )
    for d in reversed(dirs):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


def _as_user(cmd: list[str]) -> tuple[list[str], str | None]:
    """The command run as a non-root user when we are root; (command, that user)."""
    if os.geteuid() != 0:
        return cmd, None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", user, "--", *cmd], user
        return ["su", user, "-s", "/bin/sh", "-c", " ".join(map(repr, cmd))], user
    pytest.skip("PostgreSQL cannot run as root and there is no postgres or nobody user")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its SQLAlchemy URL; stop it and remove its files afterwards."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary, or mupfast[hpo])")
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="mupfast-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    _, user = _as_user(["true"])
    if user is not None:
        entry = pwd.getpwnam(user)
        for p in (root, sock):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    port = free_port()

    def run(cmd: list[str]) -> None:
        full, _ = _as_user(cmd)
        proc = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr + (log.read_text() if log.exists() else ""))[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")

    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "mupfast", "--auth=trust", "-E", "UTF8"]
        run([*initdb, "--no-locale"])
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=50"
        run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start"])
        try:
            yield f"postgresql://mupfast@127.0.0.1:{port}/postgres"
        finally:
            run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
