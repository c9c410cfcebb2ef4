"""`collector flower`: replace this process with Flower on FLOWER_PORT, behind basic auth from settings."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from collector.errors import ConfigError
from collector.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_PASSWORD = "change-me"  # the shipped default of FLOWER_PASSWORD (collector/settings.py)

# Our settings that share Flower's `FLOWER_` prefix without being Flower options. Flower reads every
# FLOWER_* variable as one of its options and stops with a KeyError on an unknown name
# (flower/command.py, apply_env_options), so they must not reach it.
OWN_VARIABLES = ("FLOWER_USER", "FLOWER_PASSWORD", "FLOWER_HOST")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def flower_command(
    settings: Settings, python: str, environ: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start Flower. Pure apart from looking for the `celery` script.

    The credentials travel in FLOWER_BASIC_AUTH (Flower's own variable for `--basic-auth`) rather
    than on the command line: /proc/<pid>/cmdline is readable by every local user, the
    environment only by the process owner.
    """
    user = settings.flower_user
    password = settings.flower_password.get_secret_value()
    # Flower splits the option on "," (a list of credentials) and HTTP basic auth on the first ":".
    if not user or ":" in user or "," in user:
        raise ConfigError("configuration error: FLOWER_USER: must be non-empty, without ':' or ','")
    if not password or "," in password:
        raise ConfigError("configuration error: FLOWER_PASSWORD: must be non-empty, without ','")
    if settings.flower_host not in LOOPBACK_HOSTS and password == DEFAULT_PASSWORD:
        # Flower can revoke tasks and shut workers down: never on a reachable address with a known password.
        raise ConfigError(
            f"configuration error: FLOWER_PASSWORD: still the default while FLOWER_HOST is "
            f"{settings.flower_host} (reachable from other machines); set a password of your own"
        )
    argv = [_celery_script(python), "-A", "collector", "flower", f"--port={settings.flower_port}"]
    argv.append(f"--address={settings.flower_host}")
    env = {name: value for name, value in environ.items() if name not in OWN_VARIABLES}
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    return argv, env


def _celery_script(python: str) -> str:
    beside = Path(python).with_name("celery")  # the venv's own celery, whatever PATH says
    if beside.exists():
        return str(beside)
    found = shutil.which("celery")
    if found is None:
        raise ConfigError(f"celery is not installed (not beside {python} nor on PATH)")
    return found


def run(settings: Settings) -> int:
    """Exec Flower; returns only if the exec itself fails (it raises then)."""
    argv, env = flower_command(settings, sys.executable, os.environ)
    if settings.flower_password.get_secret_value() == DEFAULT_PASSWORD:
        logger.warning("flower.default_password user=%s hint=set FLOWER_PASSWORD", settings.flower_user)
    logger.info(
        "flower.exec host=%s port=%d user=%s",
        settings.flower_host,
        settings.flower_port,
        settings.flower_user,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached: execvpe replaces the process
