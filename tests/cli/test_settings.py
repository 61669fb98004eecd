"""Every option has a variable and a config key; the config file round-trips."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from cloister.cli import build_parser
from cloister.cli.options import BY_NAME, SETTINGS, UsageError, load_config, resolve
from tests.cli.support import cli_env, cloister

# Flags that are commands, not settings: they do something and exit.
_ACTIONS = {"--help", "--version", "--print-config"}
# The commands a deployment runs; their every option is a setting. (status, demo, bench,
# cast and call share the output, target and connection settings; their own display and
# per-message options are checked below to be the only ones without a variable.)
_DEPLOYED = ("run", "node", "dev")
_OWN_OPTIONS = {
    "status": {"--json", "--watch", "--timeout"},
    "demo": {"--nodes", "--keys", "--messages", "--backend", "--no-progress"},
    "bench": {"--list", "--rounds"},
    # one message of an operator's: how to read ID and JSON, its message id, its wait
    "cast": {"--json-id", "--timeout", "--partitions", "--msg-id"},
    "call": {"--json-id", "--timeout", "--partitions"},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not set(a.option_strings) & _ACTIONS]


def test_every_flag_of_every_command_has_a_variable() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(_DEPLOYED) <= set(commands)
    missing: list[str] = []
    for command, sub in {"cloister": parser, **commands}.items():
        for action in _options(sub):
            if isinstance(action, argparse._SubParsersAction):
                continue
            setting = BY_NAME.get(action.dest)
            flags = set(action.option_strings)
            declared = (
                setting is not None
                and (flags == {setting.flag} if setting.flag else not flags)
                and f"${setting.env}" in (action.help or "")
                and setting.name in sub.get_default("_settings")
            )
            if declared:
                continue
            if command not in _DEPLOYED and flags <= _OWN_OPTIONS.get(command, set()):
                continue  # a display or benchmark option of a command nothing deploys
            missing.append(f"{command} {'/'.join(flags) or action.dest}")
    assert not missing, f"options without a CLOISTER_* variable: {missing}"


def test_variables_and_keys_are_unique() -> None:
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)


def _parse(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    args = build_parser().parse_args(argv)
    resolve(args, cwd=cwd)
    return args


def test_a_flag_wins_over_its_variable_which_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cloister.toml").write_text(
        'cluster = "from-file"\nheartbeat = 0.7\nweight = 2\ngroup = ["a", "b"]\n'
        'backend = "nats://file:4222"\n'
    )
    monkeypatch.setenv("CLOISTER_HEARTBEAT", "0.4")
    args = build_parser().parse_args(["node", "--weight", "3"])
    resolve(args, cwd=tmp_path)
    assert (args.cluster, args.heartbeat, args.weight, args.group) == (
        "from-file",
        0.4,
        3.0,
        ["a", "b"],
    )
    assert args.sources["cluster"] == str(tmp_path / "cloister.toml")
    assert args.sources["heartbeat"] == "$CLOISTER_HEARTBEAT"
    assert args.sources["weight"] == "flag"
    assert args.sources["shutdown_timeout"] == "default" and args.shutdown_timeout == 8.0


def test_pyproject_tool_table_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.cloister]\nconsensus = 3\nmetrics-port = 9464\n'
    )
    args = _parse(["node"], tmp_path, monkeypatch)
    assert (args.consensus, args.metrics_port) == (3, 9464)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("heartbeat = -1\n", ["heartbeat = -1", "> 0"]),
        ("no-such-key = 1\n", ["unknown key 'no-such-key'", "heartbeat"]),
        ("group = 3\n", ["group = 3", "list"]),
        ("heartbeat = \n", ["cloister.toml"]),
    ],
)
def test_a_bad_config_file_names_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    (tmp_path / "cloister.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        load_config(None, tmp_path)
    for word in words:
        assert word in str(caught.value)


def test_print_config_round_trips(tmp_path: Path) -> None:
    env = cli_env(
        {
            "CLOISTER_BACKEND": "nats://10.0.0.1:4222,10.0.0.2:4222",
            "CLOISTER_HEARTBEAT": "0.5",
            "CLOISTER_GROUPS": "gpu, eu",
            "CLOISTER_NATS_PASSWORD": "hunter2",
            "CLOISTER_TLS_CA": "/etc/ca.pem",
            "CLOISTER_LOG_FORMAT": "json",
        }
    )
    argv = ["run", "app:Shop", "--cluster", "shop", "--metrics-port", "9464", "--print-config"]
    first = cloister(*argv, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "hunter2" not in first.stdout  # secrets are never printed
    assert "# password: set from $CLOISTER_NATS_PASSWORD, not shown" in first.stdout
    assert "heartbeat = 0.5  # $CLOISTER_HEARTBEAT" in first.stdout
    assert 'cluster = "shop"  # flag' in first.stdout
    printed = tomllib.loads(first.stdout)
    assert printed["group"] == ["gpu", "eu"] and printed["metrics-port"] == 9464
    assert printed["connect-timeout"] == 30.0  # defaults are printed as values too

    config = tmp_path / "printed.toml"
    config.write_text(first.stdout)
    again = cloister("run", "--config", str(config), "--print-config", env=cli_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert tomllib.loads(again.stdout) == printed
    assert f"heartbeat = 0.5  # {config}" in again.stdout


def test_an_empty_variable_turns_the_option_off_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cloister.toml").write_text("metrics-port = 9464\nhealth-port = 9465\n")
    args = _parse(["node"], tmp_path, monkeypatch)
    assert (args.metrics_port, args.health_port) == (9464, 9465)
    monkeypatch.setenv("CLOISTER_METRICS_PORT", "")
    args = build_parser().parse_args(["node"])
    resolve(args, cwd=tmp_path)
    assert (
        args.metrics_port is None
        and args.sources["metrics_port"] == "$CLOISTER_METRICS_PORT (empty)"
    )
    assert args.health_port == 9465


def test_the_readme_names_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    words = set(re.findall(r"CLOISTER_[A-Z_]+", section))
    # CLOISTER_TLS_CA/_CERT/_KEY and CLOISTER_NATS_USER/_PASSWORD/... are written short.
    for short in re.findall(r"`(CLOISTER_[A-Z_]+?)_[A-Z]+`((?:/`?_[A-Z]+`?)+)", section):
        words.update(f"{short[0]}{suffix}" for suffix in re.findall(r"_[A-Z]+", short[1]))
    for setting in SETTINGS:
        assert setting.env in words, f"{setting.env} is not in the README's Configuration"
