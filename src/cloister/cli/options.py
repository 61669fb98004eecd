"""Options shared by the subcommands, and the one table every setting is declared in.

Every setting of ``run``, ``node`` and ``dev`` — and the target, connection and output
options every command shares — is one :class:`Setting` of :data:`SETTINGS`: its flag,
its environment variable, its key in a config file, its type and default. The flags are
added from the table (:func:`add_settings`) and :func:`resolve` fills in whatever the
command line left out, each value from the first place that has it:

1. the flag on the command line;
2. the environment variable (``CLOISTER_*``), as container deployments expect (set but
   empty: the default, whatever the file says);
3. the config file: ``--config PATH`` (``$CLOISTER_CONFIG``), else ``cloister.toml`` in
   the current directory, else the ``[tool.cloister]`` table of ``pyproject.toml`` there.
   Keys are the flags' names without ``--`` (``metrics-port = 9464``; ``app`` for APP);
4. the default.

``cloister run --print-config`` prints the result as a config file, each value with where
it came from (:func:`render_config`); feed it back with ``--config``. The table, as
``cloister run --help`` and ``README.md`` show it, is :func:`settings_table`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cloister.backends import check_url
from cloister.errors import CloisterError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

CONFIG_FILE = "cloister.toml"
PYPROJECT = "pyproject.toml"


class UsageError(CloisterError):
    """The command line, an environment variable or the config file asks for something
    invalid: exit 2."""


# -- value types ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a number of seconds (or a weight) > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def seconds(text: str) -> float:
    """An argparse ``type``: a number of seconds >= 0 (0: do not wait)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 (any free port) to 65535."""
    value = whole_number(text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def whole_number(text: str, what: str = "a whole number") -> int:
    """An argparse ``type``: any whole number (a seed)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def groups(text: str) -> list[str]:
    """``CLOISTER_GROUPS``: comma-separated group names."""
    return [g.strip() for g in text.split(",") if g.strip()]


# -- the table --------------------------------------------------------------------------------

Kind = Literal["value", "list", "switch"]


@dataclass(frozen=True, slots=True)
class Setting:
    """One option: its flag, variable, config key, type and default.

    ``name`` is the attribute of the parsed ``args``; ``flag`` None is the positional
    ``APP``. ``kind`` ``list`` is a repeatable flag (a comma-separated variable, a TOML
    list), ``switch`` a flag without a value (a variable ``1``/``true``/``yes``).
    ``secret`` values are never printed. ``default`` None leaves the choice to the
    library (``unset`` says what it then is).
    """

    name: str
    env: str
    help: str
    flag: str | None = None
    convert: Callable[[str], Any] = str
    default: Any = None
    unset: str = "not set"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    kind: Kind = "value"
    secret: bool = False
    config_key: str | None = None
    """Its key in a config file when the flag's would clash with another setting's."""

    @property
    def key(self) -> str:
        """Its key in a config file: ``config_key``, else the flag without ``--`` (``app``
        for APP)."""
        if self.config_key is not None:
            return self.config_key
        return self.flag.removeprefix("--") if self.flag else self.name

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and the docs show it."""
        if self.default is None:
            return self.unset
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def parse(self, text: str) -> Any:
        """The value ``text`` (from a variable) stands for."""
        if self.kind == "switch":
            return _switch(text)
        if self.kind == "list":
            return [self.convert(part) for part in groups(text)]
        value = self.convert(text)
        if self.choices is not None and value not in self.choices:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(self.choices)}, got {text!r}"
            )
        return value


def _switch(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (1/0, yes/no), got {text!r}")


def _s(name: str, env: str, flag: str | None, help: str, **more: Any) -> Setting:
    return Setting(name=name, env=env, flag=flag, help=help, **more)


SETTINGS: tuple[Setting, ...] = (
    # output: every command
    _s(
        "log_level",
        "CLOISTER_LOG_LEVEL",
        "--log-level",
        "log messages of this level and above (to stderr)",
        choices=LOG_LEVELS,
        convert=str.lower,
        unset="info for run, warning for the other commands",
    ),
    _s(
        "log_format",
        "CLOISTER_LOG_FORMAT",
        "--log-format",
        "text: one line per record; json: one JSON object per line (ts, level, logger, "
        "message, node, cluster, epoch, event), and run/node event lines go there too",
        choices=LOG_FORMATS,
        convert=str.lower,
        default="text",
    ),
    _s(
        "debug",
        "CLOISTER_DEBUG",
        "--debug",
        "print the full traceback of a failure",
        kind="switch",
        default=False,
    ),
    _s(
        "config",
        "CLOISTER_CONFIG",
        "--config",
        f"read settings from this TOML file (else ./{CONFIG_FILE}, else [tool.cloister] "
        f"in ./{PYPROJECT})",
        metavar="PATH",
        unset="none",
    ),
    # which cluster
    _s("app", "CLOISTER_APP", None, "module:Class or path/to/file.py:Class", metavar="APP"),
    _s(
        "backend",
        "CLOISTER_BACKEND",
        "--backend",
        "nats://host:port[,host:port...] (or memory://NAME)",
        metavar="URL",
    ),
    _s("cluster", "CLOISTER_CLUSTER", "--cluster", "the cluster's name", metavar="NAME"),
    # NATS connection
    _s("user", "CLOISTER_NATS_USER", "--user", "NATS user"),
    _s(
        "password",
        "CLOISTER_NATS_PASSWORD",
        "--password",
        "NATS password (prefer the variable: a flag shows in ps)",
        secret=True,
    ),
    _s("token", "CLOISTER_NATS_TOKEN", "--token", "NATS authentication token", secret=True),
    _s("creds", "CLOISTER_NATS_CREDS", "--creds", "NATS credentials file", metavar="FILE"),
    _s(
        "tls_ca",
        "CLOISTER_TLS_CA",
        "--tls-ca",
        "CA certificate to verify the servers",
        metavar="FILE",
    ),
    _s(
        "tls_cert",
        "CLOISTER_TLS_CERT",
        "--tls-cert",
        "client certificate (mutual TLS)",
        metavar="FILE",
    ),
    _s(
        "tls_key",
        "CLOISTER_TLS_KEY",
        "--tls-key",
        "the client certificate's private key",
        metavar="FILE",
    ),
    _s(
        "replicas",
        "CLOISTER_REPLICAS",
        "--replicas",
        "replicas of the cluster's JetStream buckets and logs (3 on a 3-server NATS cluster)",
        convert=positive_int,
        metavar="N",
        unset="1",
    ),
    # one node
    _s(
        "name",
        "CLOISTER_NODE",
        "--name",
        "this node's name (in Kubernetes: the pod's name)",
        unset="generated",
    ),
    _s(
        "consensus",
        "CLOISTER_CONSENSUS",
        "--consensus",
        "members needed before any node is ready",
        convert=positive_int,
        metavar="K",
        unset="1",
    ),
    _s(
        "group",
        "CLOISTER_GROUPS",
        "--group",
        "a named ring this node also joins; repeat for several (the variable: comma-separated)",
        kind="list",
        metavar="G",
        unset="none",
    ),
    _s(
        "heartbeat",
        "CLOISTER_HEARTBEAT",
        "--heartbeat",
        "seconds between membership renewals",
        convert=positive_float,
        metavar="S",
        unset="1.0",
    ),
    _s(
        "failure_timeout",
        "CLOISTER_FAILURE_TIMEOUT",
        "--failure-timeout",
        "seconds after which a silent member is removed",
        convert=positive_float,
        metavar="S",
        unset="3 heartbeats",
    ),
    _s(
        "weight",
        "CLOISTER_WEIGHT",
        "--weight",
        "this node's share of the ring, relative to the others'",
        convert=positive_float,
        metavar="W",
        unset="1.0",
    ),
    _s(
        "max_concurrent_requests",
        "CLOISTER_MAX_CONCURRENT_REQUESTS",
        "--max-concurrent-requests",
        "requests from other nodes run at once; more are refused at once as busy",
        convert=positive_int,
        metavar="N",
        unset="256",
    ),
    _s(
        "metrics_port",
        "CLOISTER_METRICS_PORT",
        "--metrics-port",
        "serve /metrics (Prometheus; needs pip install 'pycloister[metrics]'), /healthz "
        "and /readyz on this port",
        convert=port_number,
        metavar="PORT",
        unset="none",
    ),
    _s(
        "health_port",
        "CLOISTER_HEALTH_PORT",
        "--health-port",
        "serve only /healthz and /readyz on this port (when metrics are off)",
        convert=port_number,
        metavar="PORT",
        unset="none",
    ),
    _s(
        "metrics_host",
        "CLOISTER_METRICS_HOST",
        "--metrics-host",
        "the address the metrics and probe endpoint listens on: 0.0.0.0 (every interface, "
        "as a container must be probed and scraped from outside) or 127.0.0.1 (this host only)",
        metavar="ADDR",
        default="0.0.0.0",
    ),
    _s(
        "connect_timeout",
        "CLOISTER_CONNECT_TIMEOUT",
        "--connect-timeout",
        "seconds to keep trying to reach the medium at startup, with backoff (0: try once)",
        convert=seconds,
        metavar="S",
        default=30.0,
    ),
    _s(
        "shutdown_timeout",
        "CLOISTER_SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        "seconds SIGTERM may take to hand work over and leave; then the node leaves anyway "
        "(what was not handed over stays stored for the next owner); keep it below the "
        "orchestrator's grace period",
        convert=positive_float,
        metavar="S",
        default=8.0,
    ),
    # cloister dev
    _s(
        "nodes",
        "CLOISTER_DEV_NODES",
        "--nodes",
        "nodes to start",
        convert=positive_int,
        metavar="N",
        default=3,
    ),
    _s(
        "chaos",
        "CLOISTER_DEV_CHAOS",
        "--chaos",
        "every SECONDS, kill -9 a random node or add one",
        convert=positive_float,
        metavar="SECONDS",
        unset="off",
    ),
    _s(
        "nats_port",
        "CLOISTER_DEV_NATS_PORT",
        "--nats-port",
        "the nats-server's client port",
        convert=port_number,
        metavar="PORT",
        unset="a free one",
    ),
    _s(
        "grace",
        "CLOISTER_DEV_GRACE",
        "--grace",
        "seconds a node may take to leave before it is killed",
        convert=positive_float,
        metavar="S",
        default=10.0,
    ),
    _s("seed", "CLOISTER_DEV_SEED", "--seed", "seed of --chaos's choices", convert=whole_number),
    _s(
        "dev_metrics_port",
        "CLOISTER_DEV_METRICS_PORT",
        "--metrics-port",
        "serve each node's metrics and probes on consecutive ports: node1 on BASE, node2 on "
        "BASE+1, ... (needs pip install 'pycloister[metrics]')",
        convert=port_number,
        metavar="BASE",
        unset="none",
        config_key="dev-metrics-port",
    ),
)
"""Every setting, in the order ``--print-config`` and the docs show them."""

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}

OUTPUT = ("log_level", "log_format", "debug", "config")
TARGET = ("backend", "cluster")
CONNECTION = ("user", "password", "token", "creds", "tls_ca", "tls_cert", "tls_key", "replicas")
NODE = (
    "name",
    "consensus",
    "group",
    "heartbeat",
    "failure_timeout",
    "weight",
    "max_concurrent_requests",
    "metrics_port",
    "health_port",
    "metrics_host",
    "connect_timeout",
    "shutdown_timeout",
)
DEV = ("nodes", "chaos", "cluster", "consensus", "nats_port", "grace", "seed", "dev_metrics_port")

# The backend options the connection settings become (cloister.backends.nats).
_BACKEND_OPTIONS = CONNECTION


def add_settings(
    parser: argparse.ArgumentParser | Any,
    names: Iterable[str],
    *,
    title: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    keep_unset: bool = False,
) -> None:
    """Add the flags of settings ``names`` to ``parser`` (in a group ``title``).

    Every flag defaults to "not given" (None), so that :func:`resolve` can tell a flag from
    a variable. ``defaults`` overrides a setting's default for this command (``dev``'s
    cluster is ``dev``). ``keep_unset`` (the subcommand copies of the output options)
    leaves the attribute out when the flag is not given, so it never undoes the same flag
    given before the subcommand.
    """
    names = tuple(names)
    # Which settings this command has: resolve() fills in those, and only those.
    parser.set_defaults(_settings=(*(parser.get_default("_settings") or ()), *names))
    target = parser.add_argument_group(title) if title else parser
    for name in names:
        setting = BY_NAME[name]
        default = (defaults or {}).get(name, setting.default)
        shown = setting.shown_default if default is setting.default else str(default)
        help_text = f"{setting.help} (${setting.env}; default {shown})"
        options: dict[str, Any] = {
            "help": help_text.replace("%", "%%"),
            "default": argparse.SUPPRESS if keep_unset else None,
        }
        if setting.kind == "switch":
            options["action"] = "store_true"
        else:
            options["type"] = setting.convert
            options["metavar"] = setting.metavar
            if setting.choices is not None:
                options["choices"] = setting.choices
            if setting.kind == "list":
                options["action"] = "append"
        if setting.flag is None:
            target.add_argument(setting.name, nargs="?", **options)
        else:
            target.add_argument(setting.flag, dest=setting.name, **options)
        if defaults and name in defaults:
            parser.set_defaults(**{f"_default_{name}": defaults[name]})


def add_common(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """The output options (``--log-level``, ``--log-format``, ``--debug``, ``--config``),
    accepted before and after the subcommand."""
    add_settings(parser, OUTPUT, title="output", keep_unset=not top_level)


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--cluster``: which cluster, reached through what."""
    add_settings(parser, TARGET, title="cluster")


def add_connection(parser: argparse.ArgumentParser) -> None:
    """How to connect to NATS: credentials, TLS, replicas of the buckets."""
    add_settings(parser, CONNECTION, title="NATS connection")


# -- resolving --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The settings a config file holds, by setting name (already converted)."""

    path: Path | None
    values: dict[str, Any]

    @property
    def label(self) -> str:
        """How ``--print-config`` names it."""
        return "no file" if self.path is None else str(self.path)


def load_config(explicit: str | None, cwd: Path | None = None) -> ConfigFile:
    """The config file ``explicit`` names, else ``cloister.toml`` or ``pyproject.toml``'s
    ``[tool.cloister]`` in ``cwd`` (default: the current directory), else none.

    Raises:
        UsageError: the file is missing (when named), not TOML, or holds an unknown key
            or an invalid value.
    """
    folder = cwd or Path.cwd()
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UsageError(f"--config {explicit}: no such file (from {folder})")
        table = _read_toml(path)
        if path.name == PYPROJECT:
            table = table.get("tool", {}).get("cloister", {})
        return ConfigFile(path, _settings_of(table, path))
    found = folder / CONFIG_FILE
    if found.is_file():
        return ConfigFile(found, _settings_of(_read_toml(found), found))
    project = folder / PYPROJECT
    if project.is_file():
        table = _read_toml(project).get("tool", {}).get("cloister")
        if isinstance(table, dict):
            return ConfigFile(project, _settings_of(table, project, "[tool.cloister] "))
    return ConfigFile(None, {})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path}: {exc}") from None


_BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS if setting.key}


def _settings_of(table: Mapping[str, Any], path: Path, where: str = "") -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in table.items():
        setting = _BY_KEY.get(key)
        if setting is None or setting.name == "config":
            known = ", ".join(sorted(k for k in _BY_KEY if k != "config"))
            raise UsageError(f"config file {path}: {where}unknown key {key!r} (known: {known})")
        try:
            values[setting.name] = _from_toml(setting, raw)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise UsageError(f"config file {path}: {where}{key} = {raw!r}: {exc}") from None
    return values


def _from_toml(setting: Setting, raw: Any) -> Any:
    if setting.kind == "switch":
        if not isinstance(raw, bool):
            raise TypeError("expected true or false")
        return raw
    if setting.kind == "list":
        items = groups(raw) if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise TypeError("expected a list of names")
        return [setting.convert(item) for item in items]
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise TypeError("expected a string or a number")
    return setting.parse(str(raw))


def resolve(args: argparse.Namespace, *, cwd: Path | None = None) -> None:
    """Fill in every setting ``args`` has that the command line left out: from the
    environment, else the config file, else the default (see the module's docstring).

    Records where each value came from in ``args.sources`` (setting name -> ``flag``,
    ``$VARIABLE``, the file's path, or ``default``) and the file in ``args.config_file``.

    Raises:
        UsageError: a variable or the config file holds an invalid value.
    """
    config_flag = getattr(args, "config", None)
    explicit = config_flag or os.environ.get(BY_NAME["config"].env, "").strip() or None
    config = load_config(explicit, cwd)
    sources: dict[str, str] = {}
    scope = {*getattr(args, "_settings", ()), *OUTPUT}
    for setting in SETTINGS:
        if setting.name not in scope:
            continue  # not an option of this command
        value = getattr(args, setting.name, None)
        if value is not None and value is not False:
            sources[setting.name] = "flag"
            continue
        found = os.environ.get(setting.env)
        raw = "" if found is None else found.strip()
        if found is not None and not raw:
            # Set but empty: the option is off, whatever the file says (``cloister dev``
            # turns its nodes' metrics off this way).
            value = getattr(args, f"_default_{setting.name}", setting.default)
            sources[setting.name] = f"${setting.env} (empty)"
        elif raw:
            try:
                value = setting.parse(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"${setting.env}={raw!r}: {exc}") from None
            sources[setting.name] = f"${setting.env}"
        elif setting.name in config.values:
            value = config.values[setting.name]
            sources[setting.name] = str(config.path)
        else:
            value = getattr(args, f"_default_{setting.name}", setting.default)
            sources[setting.name] = "default"
        setattr(args, setting.name, value)
    if config.path is not None and "config" in sources and sources["config"] == "default":
        args.config = str(config.path)
        sources["config"] = "found"
    args.sources = sources
    args.config_file = config


def log_level(args: argparse.Namespace) -> str:
    """The level to log at: the resolved ``log_level``, else the command's own default
    (``args.default_log_level``, set by the command), else warning."""
    given = getattr(args, "log_level", None)
    if given:
        return str(given)
    return str(getattr(args, "default_log_level", "warning"))


def from_env(
    args: argparse.Namespace,
    dest: str,
    variable: str,
    convert: Callable[[str], Any] | None = None,
    *,
    required: str | None = None,
) -> Any:
    """The value of option ``dest``, or of ``variable`` when the flag was not given.

    For options outside :data:`SETTINGS` (those in it are resolved by :func:`resolve`).
    Sets it on ``args`` and returns it. ``required`` is the flag's name, when one is needed.

    Raises:
        UsageError: the variable holds an invalid value, or neither flag nor variable given.
    """
    value = getattr(args, dest, None)
    if value is None:
        raw = os.environ.get(variable, "").strip()
        if raw:
            try:
                value = raw if convert is None else convert(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"${variable}={raw!r}: {exc}") from None
    if value is None and required is not None:
        raise UsageError(
            f"{required} is required (or set ${variable} or {required.lstrip('-')} "
            f"in {CONFIG_FILE})"
        )
    setattr(args, dest, value)
    return value


def required(args: argparse.Namespace, name: str) -> Any:
    """The resolved value of setting ``name``; a :class:`UsageError` saying where to set it
    when there is none."""
    value = getattr(args, name, None)
    if value is None:
        setting = BY_NAME[name]
        flag = setting.flag or setting.metavar or name
        raise UsageError(
            f"{flag} is required (or set ${setting.env}, or {setting.key} = ... in {CONFIG_FILE})"
        )
    return value


def resolve_target(args: argparse.Namespace) -> tuple[str, str]:
    """The backend URL and cluster name (resolved by :func:`resolve`), checked."""
    backend = required(args, "backend")
    cluster = required(args, "cluster")
    check_url(backend)  # ConfigurationError (exit 2) for an unknown scheme
    return str(backend), str(cluster)


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """Backend options from the connection settings; only those given."""
    return {
        name: getattr(args, name)
        for name in _BACKEND_OPTIONS
        if getattr(args, name, None) is not None
    }


def redact_url(url: str) -> str:
    """``url`` without credentials: ``nats://user:pass@host`` becomes ``nats://host``."""
    return re.sub(r"(//|,)[^/@,]*@", r"\1", url)


# -- showing ----------------------------------------------------------------------------------


def render_config(args: argparse.Namespace, command: str) -> str:
    """The resolved settings of ``args`` as a TOML config file, each value with where it
    came from (``--print-config``). Unset values and secrets are comments, so that the
    output fed back with ``--config`` gives the same configuration."""
    sources: dict[str, str] = getattr(args, "sources", {})
    lines = [
        f"# cloister {command}: the settings and where each came from (flag, $VARIABLE, "
        "file, default).",
        "# Feed it back with --config FILE; flags and CLOISTER_* variables still win over it.",
    ]
    for setting in SETTINGS:
        if setting.name not in sources or setting.name == "config":
            continue
        value = getattr(args, setting.name, None)
        where = sources[setting.name]
        if setting.secret and value is not None:
            lines.append(f"# {setting.key}: set from {where}, not shown")
        elif value is None or value == []:
            lines.append(f"# {setting.key} = ...  # {setting.shown_default}")
        else:
            lines.append(f"{setting.key} = {_toml(value)}  # {where}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: the same escapes


def settings_table(names: Iterable[str]) -> str:
    """``VARIABLE (--flag)`` for each of ``names``, for ``--help`` epilogues."""
    rows = [BY_NAME[name] for name in names]
    return "; ".join(f"{s.env} ({s.flag or 'APP'})" for s in rows)
