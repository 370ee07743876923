"""Run a module (``python Testing/helpers/audited.py LOG MODULE ARGS...``) with a CPython audit hook that records, as
JSON lines in LOG, every network lookup or connection to a host that is not this machine, every file opened for writing
and every file-system change (remove, rename, mkdir, ...), with the time.

Used by ``test_security.py`` to prove that nothing leaves the machine unless the user configured a remote server, and
that no request to the server reaches the file system. Audit events come from the interpreter itself, so every
library (urllib3, httpx, huggingface_hub, requests, sockets opened in C extensions through Python's socket module) is
seen, not only our code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import runpy
import sys
import time

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}
FS_CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink", "os.link", "os.chmod",
              "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.replace"}


def is_local_host(host) -> bool:
    """True for loopback names and addresses (and for ``None``, which getaddrinfo resolves to loopback)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    if isinstance(flags, int):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
    return False


def install(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # before the hook: not logged

    def record(kind: str, event: str, detail) -> None:
        """One JSON line: time, kind (network / write / read), the event, and the host or the paths involved."""
        if kind == "network":
            entry = {"host": repr(detail)[:500]}
        else:
            entry = {"paths": [os.fsdecode(p) for p in detail if isinstance(p, (str, bytes, os.PathLike))]}
        line = json.dumps({"t": time.time(), "kind": kind, "event": event, **entry})
        os.write(fd, (line + "\n").encode())

    def hook(event: str, args: tuple) -> None:
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and not is_local_host(address[0]):
                record("network", event, address)
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                       "socket.gethostbyaddr"):
            if not is_local_host(args[0]):
                record("network", event, args[0])
        elif event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            record("write" if _writes(mode, flags) else "read", event, (path,))
        elif event in FS_CHANGES:
            record("write", event, args[:2])

    sys.addaudithook(hook)


if __name__ == "__main__":
    log, module, *rest = sys.argv[1:]
    install(log)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
