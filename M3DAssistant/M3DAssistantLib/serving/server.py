"""``m3d serve``: the inference worker. One loaded model, reached over HTTP by :class:`.client.M3DClient`.

Slicer starts it with its own Python (``python -m M3DAssistantLib.serving --port 0``), reads the one line that
announces it is ready, and talks to it on loopback with a token::

    M3D_SERVER_READY {"url": "http://127.0.0.1:41733", "host": "127.0.0.1", "port": 41733, "protocol": 1,
                      "pid": 12345, "server_version": "0.1.0", "token": "..."}

That line is printed once to stdout (flushed) when the server accepts connections; everything else goes to stderr.
``port`` is the port really bound (the OS picks one for ``--port 0``). ``token`` is present only when the server
generated it (no ``--token``, ``--token-file`` or ``$M3D_SERVER_TOKEN``), so that the parent process that started the
worker can read it; a token the user gave is never printed.

Security: the server binds 127.0.0.1 unless told otherwise; a non-loopback host needs ``allow_remote=True``
(``--allow-remote``) *and* an explicit token as strong as a generated one (:func:`.trust.weak_remote_token`), else it
refuses to start. Every token holder is equally trusted (:mod:`.trust`). Every route needs
the token (compared in constant time); uploads are size-checked from their headers before anything is allocated;
volumes stay in memory (no request reaches the filesystem). Traffic is plain HTTP: for a remote GPU box prefer an SSH
tunnel to a loopback server over ``--allow-remote``.

This module imports only the standard library and numpy at import time (the CLI registers its arguments without loading
FastAPI or torch); the app itself is :mod:`.app`.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, TextIO

from .. import __version__
from ..errors import InputError, M3DError
from ..results import MAX_NEW_TOKENS
from .protocol import PROTOCOL_VERSION, READY_PREFIX, TOKEN_ENV, parse_ready_line
from .trust import GENERATE_TOKEN, is_loopback, weak_remote_token

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in an HTTP header

__all__ = ["PROTOCOL_VERSION", "READY_PREFIX", "create_app", "serve", "add_serve_arguments", "run_serve", "main",
           "is_loopback", "parse_ready_line"]


def create_app(engine: Any, token: str, **kwargs: Any) -> "FastAPI":
    """The FastAPI app for ``engine``; see :func:`.app.create_app` for the limits."""
    from .app import create_app as _create_app

    return _create_app(engine, token, **kwargs)


def _check_token(host: str, token: Optional[str], allow_remote: bool) -> tuple[str, bool]:
    """(token to use, whether it was generated); refuses unsafe combinations with a message that says what to do."""
    if token is not None and not _TOKEN_RE.fullmatch(token):
        raise InputError("the token must be non-empty visible ASCII without spaces (it is sent in an HTTP header)")
    if not is_loopback(host):
        if not allow_remote:
            raise InputError(
                f"refusing to listen on {host!r}: it is reachable from other machines. Use the default 127.0.0.1 "
                f"(and an SSH tunnel for remote use), or pass --allow-remote together with a token "
                f"(--token-file or ${TOKEN_ENV})"
            )
        if token is None:
            raise InputError(
                f"refusing to listen on {host!r} without an explicit token: a remote bind needs one that you chose "
                f"and share (--token-file FILE or ${TOKEN_ENV}); generate one with {GENERATE_TOKEN}"
            )
        weak = weak_remote_token(token)
        if weak:
            raise InputError(weak)
    if token is None:
        return secrets.token_urlsafe(32), True
    return token, False


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket (not yet listening), so that a taken port fails before the model is loaded."""
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port {port} is not a TCP port; use 0 (the OS picks a free one) or 1-65535")
    address = "127.0.0.1" if host.strip().lower() == "localhost" else host.strip().strip("[]")
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host!r}: {e.strerror}; give an IP address or a known host name") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise M3DError(f"port {port} on {host} is already in use (another m3d serve or program listens there); "
                           f"choose another with --port, or --port 0 to let the OS pick a free one") from None
        if e.errno in (errno.EACCES, getattr(errno, "WSAEACCES", -1)):
            raise M3DError(f"not allowed to listen on port {port} of {host} (ports below 1024 need admin rights); "
                           f"use --port 0 or a port above 1024") from None
        raise M3DError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(sock: socket.socket, scheme: str = "http") -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"), int(port)


def _check_tls(certfile: Optional[str], keyfile: Optional[str]) -> bool:
    """Whether to serve https; the certificate and key are loaded once here, so a bad file fails before the model
    loads, with a message naming it."""
    if not certfile and not keyfile:
        return False
    if not certfile:
        raise InputError("--ssl-keyfile needs --ssl-certfile (the certificate that goes with the key)")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise InputError(f"cannot use the TLS certificate {certfile!r} / key {keyfile!r}: {e}; give a PEM certificate "
                         f"and its unencrypted private key (--ssl-certfile, --ssl-keyfile)") from None
    return True


def _watch_parent(pid: int, stop: Callable[[], None]) -> None:
    """Stop the server when the process that started it is gone (Slicer crashed or was killed)."""
    from ..processes import pid_exists

    def watch() -> None:
        while pid_exists(pid):
            if stopped.wait(2.0):
                return
        logger.warning("the parent process %s is gone; stopping", pid)
        stop()

    stopped = threading.Event()
    threading.Thread(target=watch, name="m3d-parent-watch", daemon=True).start()


def serve(
    model: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: Optional[str] = None,
    allow_remote: bool = False,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    clip_model: Any = None,
    engine: Any = None,
    max_upload_bytes: Optional[int] = None,
    max_queue: Optional[int] = None,
    limits: Optional[dict[str, Any]] = None,
    parent_pid: Optional[int] = None,
    ssl_certfile: Optional[str] = None,
    ssl_keyfile: Optional[str] = None,
    log_level: str = "warning",
    ready_stream: Optional[TextIO] = None,
    on_ready: Optional[Callable[[dict[str, Any]], None]] = None,
) -> None:
    """Load the model, listen, print the ready line, and serve until interrupted (Ctrl+C / SIGTERM).

    ``model``/``device``/``dtype``/``revision``/``clip_model`` as :class:`~M3DAssistantLib.engine.InferenceEngine` (or
    pass a ready ``engine``). ``token``: default ``$M3D_SERVER_TOKEN``, else generated and put in the ready line.
    ``limits``: other :class:`~.guard.ServerLimits` fields. ``parent_pid``: stop when that process
    exits. ``ssl_certfile``/``ssl_keyfile``: serve https with this PEM certificate and key. ``on_ready`` receives
    the ready line's dict (in-process use).
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    token, generated = _check_token(host, token, allow_remote)
    tls = _check_tls(ssl_certfile, ssl_keyfile)
    if not is_loopback(host) and not tls:
        print(f"m3d serve: WARNING: listening on {host}, reachable from other machines; traffic (token, images, "
              f"answers) is not encrypted -- give --ssl-certfile/--ssl-keyfile, or use an SSH tunnel to a loopback "
              f"server", file=sys.stderr)
    sock = _bind(host, port)
    try:
        try:
            import uvicorn

            from .connections import uvicorn_config
            from .guard import ServerLimits
        except ImportError as e:
            raise M3DError(f"m3d serve needs FastAPI and uvicorn ({e}); install them with "
                           f"pip install -e '.[server]' in the clone") from None

        if engine is None:
            from ..engine import InferenceEngine

            engine = InferenceEngine(model, device=device, dtype=dtype, revision=revision, clip_model=clip_model)
        options = dict(limits or {})
        options["max_upload_bytes"] = ServerLimits.max_upload_bytes if max_upload_bytes is None else max_upload_bytes
        options["max_queue"] = max_queue if max_queue is not None else ServerLimits.max_queue
        app = create_app(engine, token, **options)
        url, real_port = _url(sock, "https" if tls else "http")
        ready = {"url": url, "host": sock.getsockname()[0], "port": real_port, "protocol": PROTOCOL_VERSION,
                 "pid": os.getpid(), "server_version": __version__}
        if generated:
            ready["token"] = token

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if self.started and not self.should_exit:
                    stream = ready_stream if ready_stream is not None else sys.stdout
                    print(f"{READY_PREFIX} {json.dumps(ready)}", file=stream, flush=True)
                    print(f"m3d serve: {engine.info().get('model')} on {url} (protocol {PROTOCOL_VERSION}); "
                          f"Ctrl+C to stop", file=sys.stderr, flush=True)
                    if on_ready is not None:
                        on_ready(dict(ready))

        config = uvicorn_config(app, app.state.m3d.limits, log_level=log_level,
                                access_log=log_level in ("debug", "info"), timeout_graceful_shutdown=5,
                                ssl_certfile=ssl_certfile if tls else None, ssl_keyfile=ssl_keyfile if tls else None)
        server = Server(config)
        if parent_pid is not None:
            _watch_parent(int(parent_pid), lambda: setattr(server, "should_exit", True))
        server.run(sockets=[sock])
    finally:
        sock.close()


# ----------------------------------------------------------------------------------------------------------- CLI
def add_serve_arguments(parser: argparse.ArgumentParser, *, model_args: bool = True) -> argparse.ArgumentParser:
    """The ``m3d serve`` options. ``model_args=False`` when the caller adds --model/--device/--dtype/--revision."""
    if model_args:
        parser.add_argument("--model", default=None,
                            help="HF hub id or local checkpoint folder (default: $M3D_MODEL, else "
                                 "GoodBaiBai88/M3D-LaMed-Phi-3-4B)")
        parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
        parser.add_argument("--dtype", default=None,
                            help="bfloat16, float16 or float32 (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--clip-model", default=None,
                        help="M3D-CLIP hub id or folder for retrieval (default GoodBaiBai88/M3D-CLIP, loaded on first "
                             "use)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 (default): the OS picks a free one, "
                                                            "reported in the M3D_SERVER_READY line")
    parser.add_argument("--token", default=None,
                        help=f"bearer token clients must send (default: ${TOKEN_ENV}, else generated and printed in "
                             f"the ready line). Visible to other users in the process list: prefer --token-file")
    parser.add_argument("--token-file", default=None, help="read the token from this file (first line)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host reachable from other machines (needs an explicit token as strong as a "
                             "generated one: secrets.token_urlsafe(32))")
    parser.add_argument("--ssl-certfile", default=None,
                        help="serve https with this PEM certificate (clients of a self-signed one pass it as their "
                             "CA file)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM, unencrypted)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload body (default 1024)")
    parser.add_argument("--max-volume-mb", type=float, default=2048.0,
                        help="largest volume after decompression (default 2048)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="requests that may wait while one runs; more get HTTP 503 (default 8)")
    parser.add_argument("--max-volumes", type=int, default=8, help="uploaded volumes kept in memory (default 8)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=MAX_NEW_TOKENS,
                        help=f"largest max_new_tokens a request may ask for (default {MAX_NEW_TOKENS}, as m3d's "
                             f"--max-new-tokens)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers; slower ones are closed (default 10)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request body (an upload) may stall; stalled ones are closed and their upload "
                             "space freed (default 30)")
    parser.add_argument("--max-connections", type=int, default=64, help="open connections in all (default 64)")
    parser.add_argument("--max-connections-per-client", type=int, default=32,
                        help="open connections from one address (default 32)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Run ``m3d serve`` with parsed :func:`add_serve_arguments` options; returns the exit status. Raises
    :class:`~M3DAssistantLib.errors.M3DError` for problems the user can fix (port taken, unsafe bind, ...)."""
    token = args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise InputError(f"cannot read the token file {args.token_file}: {e.strerror}") from None
    mb = 1 << 20
    serve(
        args.model, host=args.host, port=args.port, token=token, allow_remote=args.allow_remote, device=args.device,
        dtype=args.dtype, revision=args.revision, clip_model=args.clip_model,
        max_upload_bytes=int(args.max_upload_mb * mb), max_queue=args.max_queue, parent_pid=args.parent_pid,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level=args.log_level,
        limits={"max_volume_bytes": int(args.max_volume_mb * mb), "max_volumes": args.max_volumes,
                "max_new_tokens": args.max_new_tokens_limit, "header_timeout_s": args.header_timeout,
                "body_timeout_s": args.body_timeout, "max_connections": args.max_connections,
                "max_connections_per_client": args.max_connections_per_client},
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(
        prog="m3d serve", description="Serve M3D-LaMed over HTTP for the Slicer module and M3DClient."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s %(message)s")
    try:
        return run_serve(args)
    except M3DError as e:
        print(f"m3d serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
