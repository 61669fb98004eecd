"""Options shared by the subcommands: logging, the cluster to reach, how to connect.

Every cluster setting can also come from the environment, as container deployments
expect; a flag given on the command line wins over its variable:

=========================  ======================  ==========================================
variable                   flag                    meaning
=========================  ======================  ==========================================
``CLOISTER_BACKEND``       ``--backend``           ``nats://host:port[,host:port]`` or
                                                   ``memory://NAME``
``CLOISTER_CLUSTER``       ``--cluster``           the cluster's name
``CLOISTER_NODE``          ``--name``              this node's name (``node``, ``run``)
``CLOISTER_CONSENSUS``     ``--consensus``         members needed before ``ready``
``CLOISTER_GROUPS``        ``--group``             comma-separated group names
``CLOISTER_METRICS_PORT``  ``--metrics-port``      Prometheus endpoint (``node``, ``run``)
``CLOISTER_APP``           ``APP``                 ``module:Class`` (``run``, ``dev``)
``CLOISTER_LOG_LEVEL``     ``--log-level``         debug, info (``run``'s default), warning
                                                   (the others' default), error
``CLOISTER_NATS_USER``     ``--user``              NATS user
``CLOISTER_NATS_PASSWORD`` ``--password``          NATS password (keeps it out of ``ps``)
``CLOISTER_NATS_TOKEN``    ``--token``             NATS token
``CLOISTER_NATS_CREDS``    ``--creds``             NATS credentials file
=========================  ======================  ==========================================
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from cloister.backends import check_url
from cloister.errors import CloisterError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")

# dest -> environment variable, for the connection options.
_CONNECTION_ENV = {
    "user": "CLOISTER_NATS_USER",
    "password": "CLOISTER_NATS_PASSWORD",
    "token": "CLOISTER_NATS_TOKEN",
    "creds": "CLOISTER_NATS_CREDS",
}


class UsageError(CloisterError):
    """The command line (or an environment variable) asks for something invalid: exit 2."""


def add_common(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--log-level`` and ``--debug``, accepted before and after the subcommand.

    Subcommand copies default to "not given", so they never undo the top-level value.
    """
    group = parser.add_argument_group("output")
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=None if top_level else argparse.SUPPRESS,
        help="log messages of this level and above go to stderr (default "
        "$CLOISTER_LOG_LEVEL, else info for run and warning for the other commands)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="print the full traceback of a failure",
    )


def log_level(args: argparse.Namespace) -> str:
    """The level to log at: ``--log-level``, else ``$CLOISTER_LOG_LEVEL``, else the
    command's own default (``args.default_log_level``, set by the command), else warning.

    ``args.log_level`` stays None when no flag was given (``dev`` passes only an
    explicit level on to its nodes).
    """
    given = getattr(args, "log_level", None)
    if given:
        return str(given)
    variable = os.environ.get("CLOISTER_LOG_LEVEL", "").strip().lower()
    if variable in LOG_LEVELS:
        return variable
    return str(getattr(args, "default_log_level", "warning"))


def configure_logging(level: str) -> None:
    """Send log records of ``level`` and above to stderr, one line each."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--cluster``: which cluster, reached through what."""
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--backend",
        metavar="URL",
        help="nats://host:port[,host:port...] (or memory://NAME); default $CLOISTER_BACKEND",
    )
    group.add_argument(
        "--cluster", metavar="NAME", help="the cluster's name; default $CLOISTER_CLUSTER"
    )


def add_connection(parser: argparse.ArgumentParser) -> None:
    """How to connect to NATS: credentials, TLS, replicas of the buckets."""
    group = parser.add_argument_group("NATS connection")
    group.add_argument("--user", help="NATS user (default $CLOISTER_NATS_USER)")
    group.add_argument(
        "--password", help="NATS password (default $CLOISTER_NATS_PASSWORD; prefer the variable)"
    )
    group.add_argument("--token", help="NATS authentication token (default $CLOISTER_NATS_TOKEN)")
    group.add_argument(
        "--creds", metavar="FILE", help="NATS credentials file (default $CLOISTER_NATS_CREDS)"
    )
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the servers")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", metavar="FILE", help="client certificate's private key")
    group.add_argument(
        "--replicas",
        type=positive_int,
        metavar="N",
        help="replicas of the cluster's JetStream buckets (3 on a 3-server NATS cluster)",
    )


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a number of seconds (or a weight) > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def from_env(
    args: argparse.Namespace,
    dest: str,
    variable: str,
    convert: Callable[[str], T] | None = None,
    *,
    required: str | None = None,
) -> Any:
    """The value of option ``dest``, or of ``variable`` when the flag was not given.

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
        raise UsageError(f"{required} is required (or set ${variable})")
    setattr(args, dest, value)
    return value


def groups(text: str) -> list[str]:
    """``CLOISTER_GROUPS``: comma-separated group names."""
    return [g.strip() for g in text.split(",") if g.strip()]


def resolve_target(args: argparse.Namespace) -> tuple[str, str]:
    """The backend URL and cluster name, from flags or the environment, checked."""
    backend = from_env(args, "backend", "CLOISTER_BACKEND", required="--backend")
    cluster = from_env(args, "cluster", "CLOISTER_CLUSTER", required="--cluster")
    check_url(backend)  # ConfigurationError (exit 2) for an unknown scheme
    return backend, cluster


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """Backend options from the connection flags (and their variables); only those given."""
    for dest, variable in _CONNECTION_ENV.items():
        from_env(args, dest, variable)
    return {
        name: getattr(args, name)
        for name in (*_CONNECTION_ENV, "tls_ca", "tls_cert", "tls_key", "replicas")
        if getattr(args, name, None) is not None
    }


def redact_url(url: str) -> str:
    """``url`` without credentials: ``nats://user:pass@host`` becomes ``nats://host``."""
    return re.sub(r"(//|,)[^/@,]*@", r"\1", url)
