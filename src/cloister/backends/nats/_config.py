"""Parsing a ``nats://`` URL and the backend options into nats-py connect arguments."""

from __future__ import annotations

import importlib.util
import math
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cloister.errors import ConfigurationError

DEFAULT_PORT = 4222
_SCHEMES = ("nats", "tls")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]/?#@]+)(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True, slots=True)
class ParsedURL:
    """The servers of a ``nats://`` URL, and the credentials it carried (kept apart)."""

    scheme: str
    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def public(self) -> str:
        """The URL without credentials: ``scheme://host:port[,host:port...]``."""
        return f"{self.scheme}://" + ",".join(s.split("://", 1)[1] for s in self.servers)


def parse_url(url: str) -> ParsedURL:
    """Split ``nats://[user:pass@]host[:port][,host[:port]...]`` (or ``tls://``).

    Each comma-separated part may repeat the scheme (``nats://a:4222,nats://b:4222``) and
    may carry its own userinfo; credentials must agree between parts.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"invalid NATS URL {url!r}: use nats://host:port[,host:port...]")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigurationError(f"invalid NATS URL {url!r}: the scheme must be nats:// or tls://")
    servers: list[str] = []
    userinfos: set[str] = set()
    for raw in rest.split(","):
        part = raw.strip()
        if "://" in part:
            part_scheme, part = part.split("://", 1)
            if part_scheme.lower() not in _SCHEMES:
                raise ConfigurationError(
                    f"invalid server {raw!r} in NATS URL: use nats:// or tls://"
                )
            if part_scheme.lower() == "tls":
                scheme = "tls"
        part = part.rstrip("/")
        if "@" in part:
            info, part = part.rsplit("@", 1)
            userinfos.add(info)
        match = _HOSTPORT.match(part)
        if not part or match is None:
            raise ConfigurationError(
                f"invalid server {raw.strip()!r} in NATS URL {_redact(url)!r}: use host:port"
            )
        port = int(match["port"] or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise ConfigurationError(f"invalid port {port} in NATS URL {_redact(url)!r}")
        servers.append(f"{match['host']}:{port}")
    if len(userinfos) > 1:
        raise ConfigurationError("the servers of a NATS URL carry different credentials")
    user = password = token = None
    if userinfos:
        info = userinfos.pop()
        if ":" in info:
            user, password = (unquote(p) for p in info.split(":", 1))
        else:
            token = unquote(info)
    return ParsedURL(scheme, tuple(f"{scheme}://{s}" for s in servers), user, password, token)


def _redact(url: str) -> str:
    return re.sub(r"//[^@/,]*@", "//***@", url)


@dataclass(slots=True)
class NatsOptions:
    """Everything the backend was configured with (see :class:`NatsBackend`)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 2.0
    op_timeout: float = 2.0
    replicas: int = 1
    marker_ttl: float = 60.0
    watch_heartbeat: float = 1.0
    reconnect_wait: tuple[float, float] = (0.05, 1.0)
    client_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.aio.client.Client.connect`` (auth and TLS)."""
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["password"] = self.password
        if self.token is not None:
            kwargs["token"] = self.token
        if self.creds is not None:
            kwargs["user_credentials"] = self.creds
        if self.tls is not None:
            kwargs["tls"] = self.tls
        if self.tls_hostname is not None:
            kwargs["tls_hostname"] = self.tls_hostname
        return kwargs


def build_options(parsed: ParsedURL, options: dict[str, Any]) -> NatsOptions:
    """Validate the backend options (URL credentials fill in what options leave out)."""
    known = {
        "user",
        "password",
        "token",
        "creds",
        "tls",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "tls_hostname",
        "connect_timeout",
        "op_timeout",
        "replicas",
        "marker_ttl",
        "watch_heartbeat",
        "reconnect_wait",
        "name",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown NATS backend option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    opts = NatsOptions()
    opts.user = _str_opt(options, "user", parsed.user)
    opts.password = _str_opt(options, "password", parsed.password)
    opts.token = _str_opt(options, "token", parsed.token)
    opts.creds = _str_opt(options, "creds", None)
    if (opts.user is None) != (opts.password is None):
        raise ConfigurationError("NATS user and password go together: give both or neither")
    if opts.token is not None and opts.user is not None:
        raise ConfigurationError("give a NATS token or a user/password, not both")
    if opts.creds is not None:
        if not Path(opts.creds).is_file():
            raise ConfigurationError(f"NATS credentials file {opts.creds!r} does not exist")
        if importlib.util.find_spec("nkeys") is None:
            raise ConfigurationError(
                "a NATS credentials file needs the nkeys package: pip install 'nats-py[nkeys]'"
            )
    opts.tls = _tls_context(parsed.scheme, options)
    opts.tls_hostname = _str_opt(options, "tls_hostname", None)
    opts.connect_timeout = _positive(options, "connect_timeout", opts.connect_timeout)
    opts.op_timeout = _positive(options, "op_timeout", opts.op_timeout)
    opts.marker_ttl = float(math.ceil(_positive(options, "marker_ttl", opts.marker_ttl)))
    opts.watch_heartbeat = _positive(options, "watch_heartbeat", opts.watch_heartbeat)
    replicas = options.get("replicas", opts.replicas)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise ConfigurationError(f"replicas must be a whole number from 1 to 5, got {replicas!r}")
    opts.replicas = replicas
    wait = options.get("reconnect_wait", opts.reconnect_wait)
    if (
        not isinstance(wait, tuple | list)
        or len(wait) != 2
        or not all(isinstance(w, int | float) and w >= 0 for w in wait)
        or wait[0] > wait[1]
    ):
        raise ConfigurationError(
            f"reconnect_wait must be (first, longest) seconds, first <= longest, got {wait!r}"
        )
    opts.reconnect_wait = (float(wait[0]), float(wait[1]))
    opts.client_name = _str_opt(options, "name", None)
    return opts


def _str_opt(options: dict[str, Any], name: str, default: str | None) -> str | None:
    value = options.get(name, default)
    if value is not None and not isinstance(value, str | Path):
        raise ConfigurationError(f"NATS option {name} must be a string, got {type(value).__name__}")
    return None if value is None else str(value)


def _positive(options: dict[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"NATS option {name} must be a positive number, got {value!r}")
    return float(value)


def _tls_context(scheme: str, options: dict[str, Any]) -> ssl.SSLContext | None:
    given = options.get("tls")
    files = {k: options.get(k) for k in ("tls_ca", "tls_cert", "tls_key")}
    if given is not None and not isinstance(given, ssl.SSLContext | bool):
        raise ConfigurationError("NATS option tls must be an ssl.SSLContext (or True)")
    if isinstance(given, ssl.SSLContext):
        if any(files.values()):
            raise ConfigurationError("give either tls (an SSLContext) or tls_ca/tls_cert/tls_key")
        return given
    if not (scheme == "tls" or given is True or any(files.values())):
        return None
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ConfigurationError(f"NATS option {key}: file {path!r} does not exist")
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        raise ConfigurationError("tls_cert and tls_key go together: give both or neither")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if files["tls_ca"] is None else str(files["tls_ca"]),
        )
        if files["tls_cert"] is not None:
            context.load_cert_chain(str(files["tls_cert"]), str(files["tls_key"]))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"cannot load the TLS files for NATS: {exc}") from exc
    return context
