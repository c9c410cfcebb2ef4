#!/usr/bin/env bash
# Make sure the servers the tests and `make run` start themselves are installed:
# redis-server, and PostgreSQL's initdb/pg_ctl/postgres. As root, installs what is missing with
# apt-get; otherwise prints one line saying what to install and fails.
set -euo pipefail

have_postgres() {
    local bindir
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    bindir="$(pg_config --bindir 2>/dev/null || true)"
    [[ -n "$bindir" && -x "$bindir/initdb" && -x "$bindir/pg_ctl" ]] && return 0
    # Debian keeps the server binaries out of PATH, and its pg_config may be the client's.
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
have_postgres || missing+=(postgresql)
# The local PostgreSQL runs as the `postgres` system user when we are root (initdb refuses root).
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1 && [[ ! " ${missing[*]} " == *" postgresql "* ]]; then
    missing+=(postgresql)
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "missing ${missing[*]}: install with 'sudo apt-get install -y ${missing[*]}' and run again" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed ${missing[*]}" >&2
