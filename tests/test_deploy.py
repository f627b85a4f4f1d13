"""The deploy recipes are validated, not just written: the YAML parses into what the docs
say, every `pipecat-roark` command they run exists with those options (click's own parser
on the real CLI), the files the Dockerfile copies exist, and the health checks run
against a real database on what starts as an empty volume."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pipecat_roark.cli import main
from test_cli import cli_env, start_cli
from test_drain import record

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DATA = "/var/lib/pipecat-roark"
BIN = str(Path(sys.executable).parent)

pytestmark = pytest.mark.anyio


SIDECAR = ["pipecat-roark", "drain", "--follow", "--metrics-port", "9464"]
"""The sidecar both recipes run: it delivers, and serves Prometheus metrics."""


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def kubernetes() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))


def pod_containers() -> dict[str, dict[str, Any]]:
    [deployment] = [d for d in kubernetes() if d["kind"] == "Deployment"]
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def probes(container: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: container[name]["exec"]["command"]
        for name in ("readinessProbe", "livenessProbe", "startupProbe")
        if "exec" in container.get(name, {})
    }


def argvs() -> list[list[str]]:
    """Every command line the recipes run (exec arrays, and the lines inside ``sh -c``)."""
    lines: list[list[str]] = []
    for service in compose()["services"].values():
        if "command" in service:
            lines.append(service["command"])
        test = service.get("healthcheck", {}).get("test")
        if test:
            lines.append(test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]])
    for container in pod_containers().values():
        lines.append(container.get("command", []) + container.get("args", []))
        lines.extend(probes(container).values())
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    lines.extend(json.loads(m) for m in re.findall(r"^CMD (\[.*\])$", dockerfile, re.M))
    doc = (DEPLOY / "README.md").read_text()
    for body in re.findall(r"```bash\n(.*?)```", doc, re.S):
        lines.extend(shlex.split(line) for line in body.splitlines() if line.strip())
    lines.extend(shlex.split(span) for span in re.findall(r"`(pipecat-roark [^`]+)`", doc))
    return lines


def pipecat_roark_commands(argv: list[str]) -> list[list[str]]:
    """The `pipecat-roark …` invocations in one command line, through ``sh -c`` pipelines."""
    if argv[:2] == ["sh", "-c"]:
        words = shlex.split(argv[2], posix=True)
        found, current = [], []
        for word in [*words, ";"]:
            if word in ("|", ";", "&&", "||") or word.startswith(">"):
                if current[:1] == ["pipecat-roark"]:
                    found.append(current)
                current = [] if word in ("|", ";", "&&", "||") else ["<redirected>", *current]
                continue
            current.append(word)
        return found
    for start, word in enumerate(argv):
        if word == "pipecat-roark":
            return [argv[start:]]
    return []


def test_the_recipes_parse_into_a_bot_and_a_sidecar_on_one_volume() -> None:
    services = compose()["services"]
    assert set(services) == {"bot", "roark-drain"}
    for service in services.values():
        assert service["volumes"] == [f"roark-data:{DATA}"]
        assert service["environment"]["PIPECAT_ROARK_DIR"] == DATA
    assert services["roark-drain"]["command"] == SIDECAR
    assert services["roark-drain"]["healthcheck"]["test"][1:3] == ["pipecat-roark", "status"]
    assert "roark-data" in compose()["volumes"]

    containers = pod_containers()
    assert set(containers) == {"bot", "roark-drain"}
    for container in containers.values():
        assert {"name": "PIPECAT_ROARK_DIR", "value": DATA} in container["env"]
        assert [m["mountPath"] for m in container["volumeMounts"]] == [DATA]
    assert containers["roark-drain"]["args"] == SIDECAR
    assert set(probes(containers["roark-drain"])) == {"readinessProbe", "livenessProbe"}
    [deployment] = [d for d in kubernetes() if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["roark-data"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] > 5, "calls get time to finish after SIGTERM"


def test_every_pipecat_roark_command_in_the_recipes_exists_with_its_options() -> None:
    commands = [c for argv in argvs() for c in pipecat_roark_commands(argv)]
    assert len(commands) >= 10
    assert SIDECAR in commands
    for command in commands:
        assert command[0] == "pipecat-roark", command
        sub = main.get_command(click.Context(main), command[1])
        assert sub is not None, f"no command {command[1]!r}: {command}"
        try:
            sub.make_context(command[1], command[2:])
        except click.ClickException as exc:
            pytest.fail(f"{shlex.join(command)}: {exc.format_message()}")


def test_the_dockerfile_copies_what_exists_and_agrees_with_the_manifests() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    sources = [
        source
        for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
        for source in line.split()[:-1]
    ]
    assert "src" in sources and "migrations" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies a missing path: {source}"
    extras = re.findall(r"pipecat-roark\[(\w+)\]", dockerfile)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras and set(extras) <= set(project["optional-dependencies"])
    assert f"PIPECAT_ROARK_DIR={DATA}" in dockerfile
    assert "--uid 10001" in dockerfile
    [cmd] = [json.loads(m) for m in re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)]
    assert pod_containers()["bot"]["args"] == cmd
    assert compose()["services"]["bot"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_every_variable_the_recipes_set_is_one_the_code_reads() -> None:
    read = set()
    for path in (ROOT / "src" / "pipecat_roark").glob("*.py"):
        read |= set(re.findall(r"[\"']((?:PIPECAT_)?ROARK_[A-Z_]+)[\"']", path.read_text()))
    named = set()
    for service in compose()["services"].values():
        named |= set(service.get("environment", {}))
    for container in pod_containers().values():
        named |= {e["name"] for e in container.get("env", [])}
    doc = (DEPLOY / "README.md").read_text()
    named |= set(re.findall(r"`((?:PIPECAT_)?ROARK_[A-Z_]+)`", doc))
    assert named and named <= read, named - read


def run_probe(command: list[str], directory: Path) -> subprocess.CompletedProcess[str]:
    """A health check as the container runs it: our entry point and python on PATH."""
    environment = cli_env(directory, "http://127.0.0.1:9")
    environment["PATH"] = BIN + os.pathsep + environment.get("PATH", "")
    return subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=120, check=False
    )


async def test_the_sidecar_starts_on_an_empty_volume_and_its_health_checks_pass(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "volume"  # nothing recorded yet, as when a pod starts
    sidecar = start_cli(directory, "drain", "--follow", base_url="http://127.0.0.1:9")
    try:
        assert sidecar.stdout is not None
        line = sidecar.stdout.readline()
        assert line.startswith("draining"), line + (sidecar.stderr.read() if sidecar.stderr else "")
        assert stat.S_IMODE((directory / "wal.sqlite").stat().st_mode) == 0o600
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        checks = {
            "readiness": probes(pod_containers()["roark-drain"])["readinessProbe"],
            "liveness": probes(pod_containers()["roark-drain"])["livenessProbe"],
            "compose": compose()["services"]["roark-drain"]["healthcheck"]["test"][1:],
        }
        for name, command in checks.items():
            done = run_probe(command, directory)
            assert done.returncode == 0, f"{name}: {done.stdout} {done.stderr}"
        await record(directory, "probe-call")  # something pending, nothing stuck yet
        for name, command in checks.items():
            done = run_probe(command, directory)
            assert done.returncode == 0, f"{name} with a pending call: {done.stderr}"
    finally:
        sidecar.terminate()
        _, err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, err


async def test_the_liveness_check_fails_when_deliveries_are_stuck(tmp_path: Path) -> None:
    directory = tmp_path / "volume"
    await record(directory, "stuck-call")
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        conn.execute("UPDATE deliveries SET created_at = created_at - 3600 * 1000000")
    conn.close()
    liveness = probes(pod_containers()["roark-drain"])["livenessProbe"]
    readiness = probes(pod_containers()["roark-drain"])["readinessProbe"]
    assert run_probe(liveness, directory).returncode == 1, "stuck for an hour: restart"
    assert run_probe(readiness, directory).returncode == 0, "still ready: calls go on"
    assert run_probe(readiness, tmp_path / "missing").returncode == 1, "no database: not ready"
