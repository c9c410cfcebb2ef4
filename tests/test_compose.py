"""The deployment files agree with the code: docker-compose.yml, Dockerfile, Procfiles, .env.example, docs/.

There is no Docker engine here, so the compose files (docker-compose.yml and, for Prometheus and
Grafana, docker-compose.monitoring.yml) are checked by reading them: services, images, healthchecks,
the dependency graph, volumes, environment names (fields of `Settings`) and commands (real `collector`
sub-commands parsed by the real CLI parser, the real Celery app and queues). When a Docker Compose v2
binary is available, `docker compose config` runs on the real files as the README's steps leave them.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from collector import cli
from collector.queue import keys
from collector.schedule import QUEUE_INGEST, QUEUE_REST, QUEUES
from collector.settings import Settings, load_settings
from tests.markdown import DOCS, code_blocks, documents, section

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR_SERVICES = ("streams", "worker-ingest", "worker-rest", "beat", "web", "flower")
WORKERS = ("worker-ingest", "worker-rest")
ONE_SHOT_SERVICES = ("init-db",)
BACKING_SERVICES = ("timescaledb", "redis")
MONITORING_SERVICES = ("prometheus", "grafana")  # docker-compose.monitoring.yml
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.monitoring.yml")
# The secrets `docker compose config` must refuse to go without; the monitoring file's only with it.
SECRETS = ("FLOWER_PASSWORD", "POSTGRES_PASSWORD")
MONITORING_SECRETS = ("GRAFANA_ADMIN_PASSWORD",)
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
# Variables of .env.example that only docker-compose.yml reads (interpolation), not the collector.
COMPOSE_ONLY_VARIABLES = {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "GRAFANA_PORT", "PROMETHEUS_PORT"}
# Read by the docker compose command itself (from .env too), not interpolated into the files.
COMPOSE_CLI_VARIABLES = {"COMPOSE_FILE"}
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}")
SAMPLE_SECRET = "sample-secret"  # what a required `${VAR:?message}` stands for in these readings


def _compose() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.monitoring.yml's services and volumes added (no overlaps)."""
    merged: dict[str, Any] = yaml.safe_load((ROOT / COMPOSE_FILES[0]).read_text())
    for name in COMPOSE_FILES[1:]:
        extra = yaml.safe_load((ROOT / name).read_text())
        for part in ("services", "volumes"):
            overlap = set(merged.get(part) or {}) & set(extra.get(part) or {})
            assert not overlap, f"{name} redefines {part} {overlap}"
            merged.setdefault(part, {}).update(extra.get(part) or {})
    return merged


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with an empty environment: the default; a required `${VAR:?...}`
    as if set to SAMPLE_SECRET."""
    return _INTERPOLATION.sub(lambda m: SAMPLE_SECRET if m.group(4) else m.group(3) or "", value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: _interpolate(str(value)) for name, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _healthcheck(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    return shlex.split(test) if isinstance(test, str) else [str(part) for part in test]


def _seconds(duration: str) -> float:
    """A compose duration such as `90s`, `2m` or `1m30s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _cli_commands() -> set[str]:
    """The keys of `COMMANDS` in collector/cli.py, read from the source."""
    tree = ast.parse((ROOT / "collector" / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in targets):
                assert isinstance(node.value, ast.Dict)
                return {
                    k.value
                    for k in node.value.keys
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)
                }
    raise AssertionError("collector/cli.py has no COMMANDS dict")


def _check_collector_argv(argv: list[str], where: str) -> None:
    assert argv[1] in _cli_commands(), f"{where}: {argv[1]!r} is not a collector sub-command"
    try:
        cli._parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{where}: the collector CLI rejects {shlex.join(argv)}") from None


def _check_celery_argv(argv: list[str], where: str) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-A", "--app", required=True)
    parser.add_argument("subcommand", choices=["worker", "beat", "inspect", "call", "flower"])
    parser.add_argument("-Q", "--queues")
    parser.add_argument("-n", "--hostname")
    parser.add_argument("--schedule")
    known, _ = parser.parse_known_args(argv[1:])
    assert known.app == "collector", f"{where}: celery app must be 'collector' (collector/celery.py)"
    if known.subcommand == "worker":
        assert known.queues is not None, f"{where}: the worker must name its queues"
        unknown = set(known.queues.split(",")) - set(QUEUES)
        assert not unknown, f"{where}: worker queues {unknown} are not among {QUEUES}"
        assert known.hostname, f"{where}: each worker pool needs a node name of its own (-n)"
    if known.subcommand == "beat":
        assert known.schedule, f"{where}: beat needs --schedule (its state file)"


def check_command(argv: list[str], where: str) -> None:
    """Fail unless `argv` is a collector sub-command, the project's Celery app, or a script here."""
    if argv[0] == "collector":
        _check_collector_argv(argv, where)
    elif argv[0] == "celery":
        _check_celery_argv(argv, where)
    elif argv[0] == "python":
        script = ROOT / argv[1]
        assert script.is_file(), f"{where}: {argv[1]} does not exist"
        compile(script.read_text(), str(script), "exec")
        if "--" in argv:  # a script that runs a command (scripts/wait_for_port.py): check that too
            check_command(argv[argv.index("--") + 1 :], where)
    else:
        raise AssertionError(f"{where}: unexpected program {argv[0]!r}")


def test_required_services_exist() -> None:
    """docker-compose.yml defines TimescaleDB, Redis, init-db and the collector processes; the
    monitoring file Prometheus and Grafana only, without profiles (compose checks required variables
    before profiles, so a profile could not make GRAFANA_ADMIN_PASSWORD optional)."""
    core = yaml.safe_load((ROOT / COMPOSE_FILES[0]).read_text())["services"]
    assert set(core) == {*BACKING_SERVICES, *ONE_SHOT_SERVICES, *COLLECTOR_SERVICES}
    monitoring = yaml.safe_load((ROOT / COMPOSE_FILES[1]).read_text())["services"]
    assert set(monitoring) == set(MONITORING_SERVICES)
    assert not any("profiles" in service for service in (*core.values(), *monitoring.values()))


def test_images_and_builds_are_valid() -> None:
    """Backing services use the official pinned images; ours build from the project's Dockerfile."""
    services = _services()
    timescale = services["timescaledb"]["image"]
    assert re.fullmatch(r"timescale/timescaledb:(latest|2\.\d+\.\d+)-pg15", timescale), timescale
    assert re.fullmatch(r"redis:7(\.\d+)*", services["redis"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])
    images = set()
    for name in (*ONE_SHOT_SERVICES, *COLLECTOR_SERVICES):
        service = services[name]
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        images.add(service["image"])
    assert len(images) == 1, f"the collector services should share one image tag, got {images}"


def test_long_running_services_have_healthchecks_and_restart() -> None:
    """Every long-running service has a healthcheck and restarts; init-db runs once."""
    for name, service in _services().items():
        if name in ONE_SHOT_SERVICES:
            assert str(service.get("restart", "no")) == "no", f"{name} is a one-shot service"
            assert "healthcheck" not in service
            continue
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
        assert _healthcheck(service)[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test"
        for key in ("interval", "timeout"):
            assert _seconds(service["healthcheck"][key]) > 0, f"{name}: healthcheck {key}"


def test_depends_on_refers_to_existing_services_without_cycles() -> None:
    """Every dependency names a service and a condition it can meet, and the graph has no cycle."""
    services = _services()
    graph: dict[str, list[str]] = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: use the long depends_on form with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            assert condition in CONDITIONS, f"{name} -> {target}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} health it never reports"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOT_SERVICES, f"{target} never completes"
        graph[name] = list(depends)

    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in visiting, f"dependency cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        visiting.add(node)
        for target in graph[node]:
            visit(target, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])


def test_services_wait_for_what_they_use() -> None:
    """init-db waits for a healthy database; what writes to the database waits for init-db."""
    services = _services()
    assert services["init-db"]["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    for name in ("worker-ingest", "beat", "web"):
        assert services[name]["depends_on"]["init-db"]["condition"] == "service_completed_successfully"
    for name in COLLECTOR_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_named_volumes_are_declared_and_hold_the_data() -> None:
    """Named volumes are declared; database, Redis and the alert log live on volumes."""
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source, target = str(volume).split(":")[:2]
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"
            mounts.setdefault(name, {})[target] = source
    assert "/var/lib/postgresql/data" in mounts["timescaledb"]
    assert "/data" in mounts["redis"]
    worker_log = Path(_environment(compose["services"]["worker-ingest"])["ALERT_LOG"])
    assert str(worker_log.parent) in mounts["worker-ingest"], "alert.log must be on a volume"
    unused = declared - {source for targets in mounts.values() for source in targets.values()}
    assert not unused, f"declared but unused volumes: {unused}"


def test_environment_names_are_settings_and_valid() -> None:
    """The collector services set only variables that are `Settings` fields, with valid values."""
    services = _services()
    for name in (*ONE_SHOT_SERVICES, *COLLECTOR_SERVICES):
        env = _environment(services[name])
        unknown = set(env) - SETTING_NAMES
        assert not unknown, f"{name}: {unknown} are not fields of collector.settings.Settings"
        settings = load_settings(**{key.lower(): value for key, value in env.items()})
        assert settings.redis_url == "redis://redis:6379/0"


def test_urls_point_at_the_compose_services() -> None:
    """REDIS_URL and DATABASE_URL name the redis and timescaledb services and their credentials."""
    services = _services()
    database = _environment(services["timescaledb"])
    for name in (*ONE_SHOT_SERVICES, *COLLECTOR_SERVICES):
        env = _environment(services[name])
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
        url = urlsplit(env["DATABASE_URL"])
        assert (url.hostname, url.port) == ("timescaledb", 5432)
        assert url.path.lstrip("/") == database["POSTGRES_DB"]
        assert url.password == database["POSTGRES_PASSWORD"]


def test_commands_are_real_cli_commands_and_the_celery_app() -> None:
    """Each service runs a real `collector` sub-command or `celery -A collector` with our queues."""
    services = _services()
    expected = {"init-db": "init-db", "streams": "streams", "web": "web", "flower": "flower"}
    for name, sub_command in expected.items():
        argv = _command(services[name])
        assert argv[:2] == ["collector", sub_command], f"{name}: {argv}"
        check_command(argv, f"docker-compose.yml {name}")
    for name, sub_command in (("worker-ingest", "worker"), ("worker-rest", "worker"), ("beat", "beat")):
        argv = _command(services[name])
        assert argv[:4] == ["celery", "-A", "collector", sub_command], f"{name}: {argv}"
        check_command(argv, f"docker-compose.yml {name}")
    from collector.celery import app

    assert app.main == "collector"


def test_healthchecks_match_the_commands() -> None:
    """Health probes use the ports, pid file and node name that the services really use."""
    services = _services()
    for name, port_var, path in (("web", "WEB_PORT", "/health"), ("flower", "FLOWER_PORT", "/healthcheck")):
        port = _environment(services[name])[port_var]
        probe = " ".join(_healthcheck(services[name]))
        assert f"http://127.0.0.1:{port}{path}" in probe, f"{name}: probe does not hit {port_var}"
        assert "timeout=" in probe
        published = [str(mapping).rsplit(":", 1)[-1] for mapping in services[name]["ports"]]
        assert port in published, f"{name}: port {port} is not published"
        compile(_healthcheck(services[name])[-1], name, "exec")
    for name in WORKERS:
        argv = _command(services[name])
        node = argv[argv.index("-n") + 1].replace("%h", "$$HOSTNAME")
        probe = " ".join(_healthcheck(services[name]))
        assert f"celery -A collector inspect ping -d {node}" in probe, f"{name} pings another node"
    beat_argv = _command(services["beat"])
    pidfile = beat_argv[beat_argv.index("--pidfile") + 1]
    assert pidfile in " ".join(_healthcheck(services["beat"]))
    assert "pg_isready" in " ".join(_healthcheck(services["timescaledb"]))
    assert _healthcheck(services["redis"])[1:] == ["redis-cli", "ping"]


def test_streams_healthcheck_reports_connected_connections(redis_url: str) -> None:
    """The streams probe fails until a connection reports itself connected in Redis with a recent
    message, then passes; a connected record whose last message is old (left by a crashed run) fails."""
    probe = _healthcheck(_services()["streams"])
    assert probe[:3] == ["CMD", "python", "-c"]
    env = {**os.environ, "REDIS_URL": redis_url}

    def run_probe() -> int:
        return subprocess.run([sys.executable, "-c", probe[3]], env=env, timeout=60, cwd=ROOT).returncode

    assert run_probe() == 1
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.CONNECTIONS, "spot-0", '{"state": "backoff"}')
    assert run_probe() == 1
    stale_us = int((time.time() - 2 * Settings.model_fields["health_max_message_age_s"].default) * 1e6)
    client.hset(
        keys.CONNECTIONS, "futures-market-0", json.dumps({"state": "connected", "last_message_us": stale_us})
    )
    assert run_probe() == 1
    fresh_us = int(time.time() * 1e6)
    client.hset(
        keys.CONNECTIONS, "futures-market-0", json.dumps({"state": "connected", "last_message_us": fresh_us})
    )
    client.close()
    assert run_probe() == 0


def test_stop_grace_periods_leave_time_to_finish() -> None:
    """Streams get time to flush their buffers and the ingest worker time to finish a drain."""
    services = _services()
    assert _seconds(services["streams"]["stop_grace_period"]) >= 20
    drain_run_max_s = Settings.model_fields["drain_run_max_s"].default
    assert _seconds(services["worker-ingest"]["stop_grace_period"]) > drain_run_max_s


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to the repository)."""
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes") or []}


def _repo_file(service: dict[str, Any], container_path: str) -> Path:
    """The repository path mounted at `container_path`, directly or inside a mounted directory."""
    for target, source in _mounts(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            assert source.startswith("./"), f"{container_path} comes from volume {source}, not the repository"
            path = ROOT / source / Path(container_path).relative_to(target)
            assert path.exists(), f"{source} (mounted at {target}) has no {path.relative_to(ROOT)}"
            return path
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_prometheus_scrapes_the_web_service() -> None:
    """Prometheus loads the repository's config, which scrapes /metrics of `web` on the port it listens on."""
    services = _services()
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in _command(prometheus))
    config = yaml.safe_load(_repo_file(prometheus, flags["--config.file"]).read_text())
    assert not _mounts(prometheus)[flags["--storage.tsdb.path"]].startswith("."), "keep the TSDB on a volume"
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == [f"web:{_environment(services['web'])['WEB_PORT']}"]
    assert _command(services["web"])[:2] == ["collector", "web"]
    # Prometheus rejects a scrape_timeout longer than the scrape_interval.
    assert _seconds(job["scrape_timeout"]) <= _seconds(config["global"]["scrape_interval"])
    # No authentication in front of it: reachable from this host only.
    assert all(str(mapping).startswith("127.0.0.1:") for mapping in prometheus["ports"])


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    """Grafana's datasource is the prometheus service; its dashboard provider reads the repository's JSON."""
    services = _services()
    grafana = services["grafana"]
    provisioning = _repo_file(grafana, "/etc/grafana/provisioning")
    datasources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.yml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    assert [source["type"] for source in datasources] == ["prometheus"]
    url = urlsplit(datasources[0]["url"])
    published = {str(mapping).rsplit(":", 1)[-1] for mapping in services["prometheus"]["ports"]}
    assert url.hostname == "prometheus" and str(url.port) in published
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert list(_repo_file(grafana, provider["options"]["path"]).glob("*.json"))
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _repo_file(grafana, home).is_file()
    assert not _mounts(grafana)["/var/lib/grafana"].startswith("."), "keep Grafana's database on a volume"


def test_grafana_refuses_to_start_without_a_password_of_its_own() -> None:
    """Grafana's entrypoint stops with one line while GRAFANA_ADMIN_PASSWORD is unset or a known default."""
    grafana = _services()["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    shell, flag, script = grafana["entrypoint"]
    script = script.replace("$$", "$")  # compose's escape for a literal `$`
    assert (shell, flag) == ("/bin/sh", "-c") and script.endswith("exec /run.sh")  # the image's entrypoint
    guard = script.replace("exec /run.sh", "exit 0")
    for password, code in (("", 78), ("admin", 78), ("change-me", 78), ("a-password-of-mine", 0)):
        done = subprocess.run(
            ["/bin/sh", "-c", guard],
            env={"GF_SECURITY_ADMIN_PASSWORD": password},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == code, password
        assert ("GRAFANA_ADMIN_PASSWORD" in done.stderr) == (code != 0)
    assert "GRAFANA_ADMIN_PASSWORD" in section(DOCS / "operations.md", "Monitoring: Prometheus and Grafana")
    assert "GRAFANA_ADMIN_PASSWORD" in (ROOT / ".env.example").read_text()


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_existing_sources_and_runs_as_non_root() -> None:
    """The Dockerfile starts from python:3.11-slim, COPYs files that exist and are not ignored, drops root."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[[line.startswith("FROM") for line in lines].index(True)] == "FROM python:3.11-slim"
    ignored = _dockerignore_patterns()
    copied: list[str] = []
    for line in lines:
        if line.startswith("COPY"):
            sources = [part for part in shlex.split(line)[1:-1] if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
                excluded = any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored)
                assert not excluded, f"COPY source {source} is excluded by .dockerignore"
                copied.append(source.rstrip("/").removeprefix("./"))
    # What `pip install .` needs: pyproject, its dynamic dependencies, the package and py-modules.
    for needed in ("requirements.txt", "pyproject.toml", "celeryconfig.py", "collector"):
        assert needed in copied, f"the image lacks {needed}"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"


def _compose_binary() -> list[str] | None:
    """A Docker Compose v2 client: the docker plugin, `docker-compose` beside python or on PATH."""
    docker = shutil.which("docker")
    if docker:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if plugin.returncode == 0:
            return [docker, "compose"]
    for candidate in (Path(sys.executable).with_name("docker-compose"), shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([str(candidate), "version"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and "v2." in probe.stdout:
                return [str(candidate)]
    return None


@pytest.fixture
def compose() -> list[str]:
    """The Docker Compose v2 client, or a skip."""
    found = _compose_binary()
    if found is None:
        pytest.skip("no Docker Compose v2 client here (make test fetches one into .venv/bin)")
    return found


def _dotenv(secrets: dict[str, str], monitoring: bool) -> str:
    """.env as the README's steps leave it: .env.example copied, each secret's `# NAME=` line set, and
    with `monitoring` its `# COMPOSE_FILE=` line uncommented."""
    text = (ROOT / ".env.example").read_text()
    for name, value in secrets.items():
        text, count = re.subn(rf"^# {name}=$", f"{name}={value}", text, flags=re.MULTILINE)
        assert count == 1, f".env.example has no `# {name}=` line to set"
    if monitoring:
        text, count = re.subn(r"^# (COMPOSE_FILE=\S+)$", r"\1", text, flags=re.MULTILINE)
        assert count == 1, ".env.example has no `# COMPOSE_FILE=` line naming the monitoring file"
    return text


def _compose_config(
    compose: list[str], where: Path, dotenv: str | None, environ: dict[str, str], files: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`docker compose [-f FILE...] config --format json` on a copy of the real files in `where`, with
    `dotenv` as .env (None: no .env) and nothing of the developer's own environment or .env."""
    for name in (*COMPOSE_FILES, "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, where / name)
    (where / ".env").unlink(missing_ok=True)
    if dotenv is not None:
        (where / ".env").write_text(dotenv)
    hidden = SETTING_NAMES | COMPOSE_ONLY_VARIABLES  # and COMPOSE_FILE, COMPOSE_PROFILES...
    env = {k: v for k, v in os.environ.items() if k not in hidden and not k.startswith("COMPOSE_")}
    flags = [arg for name in files for arg in ("-f", name)]
    return subprocess.run(
        [*compose, *flags, "config", "--format", "json"],
        cwd=where,
        env={**env, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("monitoring", [False, True], ids=["core", "monitoring"])
@pytest.mark.parametrize("dotenv", ["no-dotenv", "dotenv-from-example"])
def test_compose_config_names_every_missing_secret(
    compose: list[str], tmp_path: Path, dotenv: str, monitoring: bool
) -> None:
    """With no .env, or .env copied from .env.example unchanged, `docker compose config` fails with one
    line naming a missing secret and what to do; with all but one set, it names that one."""
    required = SECRETS + (MONITORING_SECRETS if monitoring else ())

    def run(names: set[str]) -> subprocess.CompletedProcess[str]:
        secrets = {name: f"pw-{name.lower()}" for name in sorted(names)}
        if dotenv == "no-dotenv":  # the secrets exported in the shell, the files named with -f
            return _compose_config(compose, tmp_path, None, secrets, COMPOSE_FILES if monitoring else ())
        return _compose_config(compose, tmp_path, _dotenv(secrets, monitoring), {})

    if dotenv == "dotenv-from-example" and not monitoring:
        assert _dotenv({}, monitoring=False) == (ROOT / ".env.example").read_text()
    nothing_set = run(set())
    assert nothing_set.returncode != 0
    assert len(nothing_set.stderr.strip().splitlines()) == 1, nothing_set.stderr
    assert any(f"required variable {name} is missing a value" in nothing_set.stderr for name in required)
    # Compose stops at the first missing variable it meets: leave out one at a time.
    for missing in required:
        done = run(set(required) - {missing})
        assert done.returncode != 0, f"{missing} unset, yet docker compose config passed"
        assert f"required variable {missing} is missing a value: set {missing} in .env" in done.stderr


@pytest.mark.parametrize("monitoring", [False, True], ids=["core", "monitoring"])
def test_compose_config_accepts_the_readme_steps(
    compose: list[str], tmp_path: Path, monitoring: bool
) -> None:
    """`cp .env.example .env`, then the named secrets set there: `docker compose config` passes, each
    secret reaches the services that use it, and the monitoring file needs its own only when used."""
    secrets = {name: f"pw-{name.lower()}" for name in SECRETS + (MONITORING_SECRETS if monitoring else ())}
    done = _compose_config(compose, tmp_path, _dotenv(secrets, monitoring), {})
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    expected = {*BACKING_SERVICES, *ONE_SHOT_SERVICES, *COLLECTOR_SERVICES}
    assert set(services) == expected | (set(MONITORING_SERVICES) if monitoring else set())
    password = secrets["POSTGRES_PASSWORD"]
    assert services["timescaledb"]["environment"]["POSTGRES_PASSWORD"] == password
    for name in (*ONE_SHOT_SERVICES, *COLLECTOR_SERVICES):
        assert urlsplit(services[name]["environment"]["DATABASE_URL"]).password == password, name
    assert services["flower"]["environment"]["FLOWER_PASSWORD"] == secrets["FLOWER_PASSWORD"]
    if monitoring:
        grafana = services["grafana"]["environment"]
        assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == secrets["GRAFANA_ADMIN_PASSWORD"]


def _procfile(name: str) -> dict[str, list[str]]:
    processes = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)  # honcho's Procfile grammar
        if match:
            processes[match.group(1)] = shlex.split(match.group(2))
    return processes


@pytest.mark.parametrize(
    ("procfile", "required"),
    [
        ("Procfile", {"streams", *WORKERS, "beat", "web", "flower"}),
        ("Procfile.demo", {"exchange", "streams", *WORKERS, "beat", "web", "flower", "watch"}),
    ],
)
def test_procfile_commands_are_valid_sub_commands(procfile: str, required: set[str]) -> None:
    """Every Procfile process runs a real collector sub-command, the Celery app or a script here."""
    processes = _procfile(procfile)
    assert set(processes) == required
    for name, argv in processes.items():
        check_command(argv, f"{procfile} {name}")


def _worker_pools(commands: dict[str, list[str]]) -> dict[str, tuple[set[str], str]]:
    """Name -> (queues, node name) of each Celery worker among the processes' `commands`."""
    return {
        name: (set(argv[argv.index("-Q") + 1].split(",")), argv[argv.index("-n") + 1])
        for name, argv in commands.items()
        if argv[:4] == ["celery", "-A", "collector", "worker"]
    }


@pytest.mark.parametrize("where", ["docker-compose.yml", "Procfile", "Procfile.demo"])
def test_worker_pools_keep_rest_apart_from_the_drains(where: str) -> None:
    """Each queue is served by exactly one pool, `rest` by a pool of its own, each with its node name."""
    if where == "docker-compose.yml":
        commands = {name: _command(service) for name, service in _services().items() if "command" in service}
    else:
        commands = _procfile(where)
    pools = _worker_pools(commands)
    assert set(pools) == set(WORKERS), f"{where}: worker pools {sorted(pools)}"
    served = sorted(queue for queues, _ in pools.values() for queue in queues)
    assert served == sorted(QUEUES), f"{where}: each of {QUEUES} must be served by exactly one pool"
    assert pools["worker-rest"][0] == {QUEUE_REST}, f"{where}: REST work must never hold a drain's slot"
    assert QUEUE_INGEST in pools["worker-ingest"][0]
    assert len({node for _, node in pools.values()}) == len(pools), f"{where}: node names collide"


def test_demo_workers_have_node_names_of_their_own() -> None:
    """The demo's worker nodes are never mistaken for a live run's (Flower, `celery inspect`)."""
    live = {node for _, node in _worker_pools(_procfile("Procfile")).values()}
    demo = {node for _, node in _worker_pools(_procfile("Procfile.demo")).values()}
    assert live and demo and not live & demo


def test_demo_points_at_its_fake_exchange() -> None:
    """The demo's Binance URLs use the port its fake exchange listens on."""
    argv = _procfile("Procfile.demo")["exchange"]
    port = argv[argv.index("--port") + 1]
    script = (ROOT / "scripts" / "stack.sh").read_text()
    assert f"DEMO_EXCHANGE_PORT={port}" in script
    for variable in ("SPOT_WS", "FUTURES_WS", "SPOT_REST", "FUTURES_REST"):
        assert f"BINANCE_{variable}_URL=" in script
    streams = _procfile("Procfile.demo")["streams"]
    assert streams[:3] == ["python", "scripts/wait_for_port.py", port], "streams must wait for the fake"
    schedules = set()
    for name in ("Procfile", "Procfile.demo"):
        beat = _procfile(name)["beat"]
        schedules.add(beat[beat.index("--schedule") + 1])
    assert len(schedules) == 2, "demo and live beat must keep separate schedule files"


def test_env_example_names_only_settings() -> None:
    """.env.example lists only real settings (plus compose's own), and its active values are valid."""
    active: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if not match:
            continue
        name = match.group(2)
        known = SETTING_NAMES | COMPOSE_ONLY_VARIABLES | COMPOSE_CLI_VARIABLES
        assert name in known, f".env.example: {name} is not a setting"
        if not match.group(1) and name in SETTING_NAMES:
            active[name.lower()] = match.group(3)
    for name in ("redis_url", "database_url"):
        assert name not in active, f"an active {name.upper()} would stop make run from starting its own"
    load_settings(**active)


def test_docs_document_every_setting() -> None:
    """docs/configuration.md's tables name every environment variable of `Settings`, and no unknown one."""
    text = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, flags=re.MULTILINE))
    missing = SETTING_NAMES - documented
    assert not missing, f"docs/configuration.md does not document {sorted(missing)}"
    extra = {name for name in documented - SETTING_NAMES if not name.startswith("LOCAL_")}
    assert extra <= COMPOSE_ONLY_VARIABLES, f"configuration.md documents unknown variables {sorted(extra)}"
    assert COMPOSE_ONLY_VARIABLES <= documented, "docs/configuration.md must name compose's own variables"


def _key_patterns(text: str) -> set[str]:
    """The key column of a Markdown table of Redis keys (rows starting with | `collector:)."""
    return set(re.findall(r"^\| `(collector:[^`]+)` \|", text, flags=re.MULTILINE))


def _key_matcher(pattern: str) -> re.Pattern[str]:
    """`collector:queue:<table>` -> a regex where each `<...>` stands for one key segment."""
    parts = re.split(r"<[^>]+>", pattern)
    return re.compile(r"[^:\s]+".join(re.escape(part) for part in parts) + "$")


def test_docs_reproduce_the_redis_key_layout() -> None:
    """docs/architecture.md lists exactly the keys of collector/queue/keys.py; redis-cli uses real keys."""
    layout = _key_patterns(keys.__doc__ or "")
    assert layout, "collector/queue/keys.py lost its key table"
    assert _key_patterns(section(DOCS / "architecture.md", "Redis key layout")) == layout
    matchers = [_key_matcher(pattern) for pattern in layout]
    recipes = section(DOCS / "operations.md", "Looking into Redis with redis-cli")
    block = "".join(part.split("```", 1)[0] for part in recipes.split("```sh")[1:])
    used = re.findall(r"\b(collector:[\w:<>]+)", block)
    assert len(used) >= 10
    # Any other shell line of README.md or docs/ that names a key (a fault's dead letter, say) too.
    for path in documents():
        used += re.findall(r"\b(collector:[\w:<>]+)", "".join(code_blocks(path.read_text(), "sh")))
    for key in used:
        assert any(m.match(key) for m in matchers), f"docs: a redis-cli line uses unknown key {key}"
