"""Run a real nginx as a subprocess for one test.

::

    port = free_port()
    block = f"server {{ listen 127.0.0.1:{port}; root {root}; }}"
    with run_nginx(block, tmp_path / "nginx") as server:
        ...  # fetch f"http://127.0.0.1:{port}/..."
        assert any("GET /demo/noarch/repodata.json" in l for l in server.access_log_lines())

Everything nginx writes (pid, logs, temp dirs) stays in ``workdir``; nothing
in /etc/nginx or /var is touched, so tests can run in parallel.  When the
tests run as root, nginx would drop its workers to ``nobody``, who cannot
write the temp dirs under a root-owned tmp_path, so the config then says
``user root;``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NginxServer", "NginxStartError", "find_nginx", "free_port", "render_config", "run_nginx"]

_NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
_MIME_TYPES = Path("/etc/nginx/mime.types")
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxStartError(RuntimeError):
    """nginx exited or never listened; the message carries its error log."""


def find_nginx() -> str:
    """Path of the nginx binary; PATH first, then the usual Debian location."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("nginx not found (apt-get install nginx-light or nginx)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    There is an unavoidable race between closing this socket and nginx binding
    the port; it is small enough for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class NginxServer:
    """A running nginx; ``port``/``base_url`` come from the ``listen`` line."""

    workdir: Path
    config_path: Path
    pid: int
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def access_log_lines(self) -> list[str]:
        """Lines of the access log so far (combined format: ``"GET /x HTTP/1.1" 200 ...``).

        nginx appends a line right after it finishes sending the response,
        so a client can (rarely) see its response before the line exists; use
        :meth:`wait_for_request` when asserting right after a single request.
        """
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def requested_paths(self, method: str | None = None) -> list[str]:
        """``"GET /demo/noarch/repodata.json 200"`` per access log line."""
        result: list[str] = []
        for line in self.access_log_lines():
            try:
                request = line.split('"', 2)[1]
                status = line.split('"', 2)[2].split()[0]
                verb, path, _proto = request.split(" ", 2)
            except (IndexError, ValueError):
                continue
            if method is None or verb == method:
                result.append(f"{verb} {path} {status}")
        return result

    def wait_for_request(self, fragment: str, timeout: float = 2.0) -> bool:
        """True once a :meth:`requested_paths` entry contains ``fragment``."""
        deadline = time.monotonic() + timeout
        while True:
            if any(fragment in line for line in self.requested_paths()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def error_log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


def render_config(server_block: str, workdir: Path) -> str:
    """A complete, self-contained nginx.conf around ``server_block``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"    {name}_temp_path {workdir / 'temp' / name};" for name in _TEMP_DIRS
    )
    mime = f"    include {_MIME_TYPES};\n" if _MIME_TYPES.exists() else ""
    return (
        f"{user}"
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} notice;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"{mime}"
        "    default_type application/octet-stream;\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"{temp_paths}\n"
        f"{server_block}\n"
        "}\n"
    )


def _listen_port(server_block: str) -> int:
    for raw in server_block.splitlines():
        for statement in raw.split(";"):
            words = statement.replace("{", " ").split()
            if "listen" in words:
                address = words[words.index("listen") + 1]
                return int(address.rsplit(":", 1)[-1])
    raise ValueError("server_block needs a 'listen 127.0.0.1:PORT;' line")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], workdir: Path) -> None:
    # A connectable port alone proves nothing (another process may own it
    # while nginx is still retrying bind()).  nginx writes its pid file only
    # after binding every listen socket, so wait for *our* pid in it first.
    pid_file, error_log = workdir / "nginx.pid", workdir / "error.log"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NginxStartError(_failure_message(f"nginx exited with {proc.returncode}", proc, error_log))
        try:
            ours = pid_file.read_text().strip() == str(proc.pid)
        except OSError:
            ours = False
        if ours:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise NginxStartError(_failure_message(f"nginx did not listen on {port} within {_START_TIMEOUT_S}s", proc, error_log))


def _failure_message(what: str, proc: subprocess.Popen[bytes], error_log: Path) -> str:
    stderr = b""
    if proc.poll() is not None and proc.stderr is not None:
        stderr = proc.stderr.read()
    log = error_log.read_text(errors="replace") if error_log.exists() else "(no error log)"
    return f"{what}\n--- stderr ---\n{stderr.decode(errors='replace')}\n--- error.log ---\n{log}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # SIGQUIT is nginx's graceful shutdown; SIGTERM is fast shutdown, and
    # SIGKILL only if it hangs (orphaned workers then exit on their own when
    # the master's channel closes).
    for sig, wait_s in ((signal.SIGQUIT, _STOP_TIMEOUT_S / 2), (signal.SIGTERM, _STOP_TIMEOUT_S / 2)):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()


def _base_args(binary: str, config_path: Path, workdir: Path) -> list[str]:
    # -e: nginx opens its compiled-in error log before reading the config;
    # point that at workdir too so no /var/log access is needed.
    return [binary, "-c", str(config_path), "-p", f"{workdir}/", "-e", str(workdir / "error.log")]


@contextmanager
def run_nginx(server_block: str, workdir: Path) -> Iterator[NginxServer]:
    """Start nginx with ``server_block``, wait until it listens, stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in _TEMP_DIRS:
        (workdir / "temp" / name).mkdir(parents=True, exist_ok=True)
    port = _listen_port(server_block)
    (workdir / "nginx.pid").unlink(missing_ok=True)  # stale from an earlier run
    config_path = workdir / "nginx.conf"
    config_path.write_text(render_config(server_block, workdir))
    binary = find_nginx()

    # Validate first: `nginx -t` gives a precise message for config mistakes.
    check = subprocess.run(
        [*_base_args(binary, config_path, workdir), "-t", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise NginxStartError(f"nginx -t rejected {config_path}:\n{check.stderr}\n--- config ---\n{config_path.read_text()}")

    proc = subprocess.Popen(
        _base_args(binary, config_path, workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(port, proc, workdir)
        yield NginxServer(workdir=workdir, config_path=config_path, pid=proc.pid, port=port)
    finally:
        _stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()
