"""A throwaway PostgreSQL server for tests: Debian's binaries, a temporary cluster, loopback only.

.ci/run installs Debian's `postgresql` package; locally, any initdb/pg_ctl on PATH or under
/usr/lib/postgresql/*/bin works. As root, the server runs as the `postgres` user (PostgreSQL refuses root).
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pg_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold links to some tools only
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster on 127.0.0.1 with trust auth; yields a SQLAlchemy URL; stops and deletes it at the end."""
    bindir = pg_bin_dir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="ease-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        root.chmod(0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "ease", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
        try:
            pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ease", "ease")
            yield f"postgresql+psycopg://ease@127.0.0.1:{port}/ease"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def require_postgres() -> None:
    """Skip the calling test without the driver or the server binaries; fail instead under EASE_REQUIRE_POSTGRES=1
    (CI installs both, so a missing one there is a broken install, not a reason to skip)."""
    import pytest

    pytest.importorskip("psycopg", reason="the PostgreSQL driver is the optional extra: pip install -e '.[postgres]'")
    if pg_bin_dir() is None:
        if os.environ.get("EASE_REQUIRE_POSTGRES") == "1":
            pytest.fail("EASE_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
