"""Who may reach an ``m3d serve`` and what protects the traffic: loopback addresses, the strength a token needs for a
remote bind, and the warning for a remote server reached over plain ``http://``.

The server's trust model (README, "Server"): the bearer token is the only credential, and every holder is equally
trusted -- any token holder may run tasks, read the volumes it knows the ids of, cancel any request (also other
clients') and delete any volume. Share it only with people who may do all of that; bind to loopback (the default) and
reach a remote GPU box through an SSH tunnel, or use ``--allow-remote`` with a generated token and TLS.

Standard library only: the client side (Slicer's process) imports this too.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import urllib.parse
from typing import Optional

GENERATE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
MIN_REMOTE_TOKEN_CHARS = 32
MIN_REMOTE_TOKEN_BITS = 128.0
"""A token for a non-loopback bind must be at least this strong (``secrets.token_urlsafe(32)``: 43 characters, about
256 bits; ``secrets.token_hex(16)``: 32 characters, 128 bits)."""
_MIN_BITS_PER_CHAR = 2.5  # how varied its characters must be: 'aaaa...' or 'abababab...' are not random


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def token_strength_bits(token: str) -> float:
    """An upper estimate of a token's entropy: its length times the bits of the smallest alphabet that holds it
    (lower case, upper case, digits, other visible ASCII), but no more than its characters' observed variety allows
    (``len * Shannon entropy per character`` when that is below ``_MIN_BITS_PER_CHAR``), and a token that repeats a
    shorter one counts as that one."""
    if not token:
        return 0.0
    period = next(k for k in range(1, len(token) + 1) if all(c == token[i % k] for i, c in enumerate(token)))
    if period < len(token):  # 'abcabcabc...': no stronger than one repetition
        return token_strength_bits(token[:period])
    alphabet = sum(size for present, size in (
        (any(c.islower() for c in token), 26), (any(c.isupper() for c in token), 26),
        (any(c.isdigit() for c in token), 10), (any(not c.isalnum() for c in token), 32)) if present)
    counts = collections.Counter(token)
    shannon = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    per_char = math.log2(max(alphabet, 2)) if shannon >= _MIN_BITS_PER_CHAR else shannon
    return len(token) * per_char


def weak_remote_token(token: str) -> Optional[str]:
    """Why ``token`` is too weak for a server reachable from other machines, or None when it is strong enough."""
    bits = token_strength_bits(token)
    if len(token) >= MIN_REMOTE_TOKEN_CHARS and bits >= MIN_REMOTE_TOKEN_BITS:
        return None
    return (f"the token for a remote bind must be as strong as a generated one: at least {MIN_REMOTE_TOKEN_CHARS} "
            f"random characters, about {MIN_REMOTE_TOKEN_BITS:.0f} bits (this one: {len(token)} characters, about "
            f"{bits:.0f} bits); generate one with {GENERATE_TOKEN} and pass it with --token-file")


def plain_http_warning(url: str) -> Optional[str]:
    """The warning for a server URL whose traffic travels in clear to another machine (``http://`` and not
    loopback), or None (https, or this machine)."""
    parts = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http" or is_loopback(parts.hostname or ""):
        return None
    return (f"{parts.scheme}://{parts.netloc} is another machine reached over plain http: the token, the images and "
            f"the answers travel unencrypted and anyone on the network can read them (and reuse the token). Use "
            f"https (m3d serve --ssl-certfile/--ssl-keyfile) or an SSH tunnel to a loopback server "
            f"(ssh -L 8765:127.0.0.1:8765 gpu-box, then http://127.0.0.1:8765).")


__all__ = ["GENERATE_TOKEN", "MIN_REMOTE_TOKEN_BITS", "MIN_REMOTE_TOKEN_CHARS", "is_loopback", "plain_http_warning",
           "token_strength_bits", "weak_remote_token"]
