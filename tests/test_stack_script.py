"""scripts/stack.sh (`make run`, `make demo`) run for real, from a copy of it in a scratch directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collector.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent


def _stack(where: Path, mode: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `scripts/stack.sh mode` copied into `where` (its var/ and Procfiles are `where`'s)."""
    (where / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "stack.sh", where / "scripts" / "stack.sh")
    hidden = {"REDIS_URL", "DATABASE_URL", "SPOT_SYMBOLS", "FUTURES_SYMBOLS"}
    base = {key: value for key, value in os.environ.items() if key not in hidden}
    return subprocess.run(
        ["bash", str(where / "scripts" / "stack.sh"), mode],
        cwd=where,
        env={**base, "VENV": str(VENV), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["run", "demo"])
def test_a_start_with_a_bad_setting_leaves_the_env_file_as_it_was(
    mode: str, settings: Settings, tmp_path: Path
) -> None:
    """`SPOT_SYMBOLS=BTC/USDT make demo` (or run) fails with one line naming the variable, and the
    stack's env file from the last good start is untouched, with no scratch file left beside it."""
    var = tmp_path / "var"
    var.mkdir()
    env_file = var / f"{mode}.env"
    env_file.write_text("REDIS_URL=redis://127.0.0.1:16379/1\n")
    env = {"SPOT_SYMBOLS": "BTC/USDT"}
    if mode == "run":  # the servers of the test: `make run` starts none of its own
        env |= {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    done = _stack(tmp_path, mode, env)
    assert done.returncode != 0
    assert "SPOT_SYMBOLS" in done.stderr
    assert env_file.read_text() == "REDIS_URL=redis://127.0.0.1:16379/1\n"
    assert sorted(path.name for path in var.iterdir()) == [env_file.name]


def test_a_good_start_writes_the_env_file_then_starts_the_procfile(
    settings: Settings, tmp_path: Path
) -> None:
    """With good settings the env file is written in full before honcho starts the Procfile's processes."""
    (tmp_path / "Procfile").write_text(
        "probe: python -c \"import os; print('probe DEMO_VALUE=' + os.environ['DEMO_VALUE'])\"\n"
    )
    env_file = tmp_path / "var" / "run.env"
    env_file.parent.mkdir()
    env_file.write_text("stale\n")
    (tmp_path / ".env").write_text("DEMO_VALUE=from-dotenv\n")
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    done = _stack(tmp_path, "run", env)
    assert done.returncode == 0, done.stderr
    assert "probe DEMO_VALUE=from-dotenv" in done.stdout
    assert env_file.read_text() == ""  # nothing to add: the servers are the configured ones
    assert sorted(path.name for path in env_file.parent.iterdir()) == ["run.env", "run.pid"]
