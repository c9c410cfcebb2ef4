"""README.md and docs/ agree with the code, and with each other.

Every `binance.md §N` cited is a heading of docs/binance.md; README.md stays short and every link
resolves; the defaults, the exportable relations, the fake exchange's switches and the `collector`
commands that the docs state are those of the code (the SQL cookbook is run by test_cookbook.py, the
settings and Redis keys are checked by test_compose.py).
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import redis
from pydantic import SecretStr

from collector import cli
from collector.binance.rest import open_interest_request
from collector.export.plan import RELATIONS
from collector.fake.control import Controls
from collector.local.services import services_config
from collector.rest import planner
from collector.rest.poll import MANUAL_MAX_WAIT_S
from collector.settings import Settings
from tests.conftest import FakeFactory
from tests.markdown import (
    DOCS,
    LINK,
    README,
    ROOT,
    anchors,
    code_blocks,
    documents,
    prose_lines,
    section,
    table_rows,
)

BINANCE_MD = DOCS / "binance.md"
CONFIGURATION_MD = DOCS / "configuration.md"
SCHEMA_MD = DOCS / "schema.md"
OPERATIONS_MD = DOCS / "operations.md"
DEMO_FAKE = "127.0.0.1:19443"  # where `make demo` runs the fake exchange (Procfile.demo)

# `## 4. REST`, `### 4.5 Rate limits, ...`: the section number opens the heading.
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
# A citation runs from `binance.md` to the end of its parenthesis, clause or line:
# `(binance.md §0 fact 3, §1.2, §1.4)`, `binance.md §5.2 step 6, §5.3`, `binance.md §4.1/§4.2`.
CITATION = re.compile(r"binance\.md([^)\n;]*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")


def _sections() -> list[str]:
    return HEADING.findall(BINANCE_MD.read_text(encoding="utf-8"))


def _citations() -> list[tuple[str, int, str]]:
    """(file, line, section) of every section cited after `binance.md` in the code, tests, README, docs/."""
    files = [
        *sorted((ROOT / "collector").rglob("*.py")),
        *sorted((ROOT / "tests").rglob("*.py")),
        *[path for path in documents() if path != BINANCE_MD],
    ]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for tail in CITATION.findall(line):
                found += [(str(path.relative_to(ROOT)), number, section) for section in SECTION.findall(tail)]
    return found


def test_section_numbers_of_binance_md_are_unique() -> None:
    """A section number names one heading only, so a citation cannot be ambiguous."""
    sections = _sections()
    assert len(sections) > 20
    assert len(sections) == len(set(sections)), sorted(s for s in sections if sections.count(s) > 1)


def test_every_binance_md_citation_resolves_to_a_heading() -> None:
    """`binance.md §N` / `§N.M` in the code, tests, README and docs/ names a heading of docs/binance.md."""
    sections = set(_sections())
    citations = _citations()
    assert len(citations) > 50  # the scan found the citations (a broken pattern would find none)
    missing = [f"{path}:{line} §{section}" for path, line, section in citations if section not in sections]
    assert not missing, f"cited but not a heading of docs/binance.md: {missing}"


# --- README.md and docs/ as a newcomer reads them ---------------------------------------------------

README_MAX_LINES = 250  # read in five minutes; the detail lives in docs/


def test_readme_is_short() -> None:
    """README.md stays a five-minute read: at most 250 lines."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_into_every_doc() -> None:
    """README.md links to every file of docs/, so none is out of a newcomer's reach."""
    targets = {target.split("#", 1)[0] for target in LINK.findall(README.read_text(encoding="utf-8"))}
    unlinked = [path.name for path in sorted(DOCS.glob("*.md")) if f"docs/{path.name}" not in targets]
    assert not unlinked, f"README.md links to none of {unlinked}"


def _relative_links() -> list[tuple[Path, int, str]]:
    """(document, line, target) of every link of README.md and docs/ that is not a URL."""
    found = []
    for path in documents():
        for number, line in prose_lines(path.read_text(encoding="utf-8")):
            found += [(path, number, target) for target in LINK.findall(line) if "://" not in target]
    return found


def test_every_link_names_an_existing_file_and_heading() -> None:
    """Each link of README.md and docs/ opens a file of the repository, and its #anchor a heading there."""
    links = _relative_links()
    assert len([link for link in links if link[0] == README and "docs/" in link[2]]) >= 10
    broken = []
    for path, number, target in links:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number} {target}"
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{where}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text(encoding="utf-8"))):
            broken.append(f"{where}: no heading #{anchor}")
    assert not broken, broken


def _documented_default(cell: str) -> str:
    return cell.strip("`") if cell.startswith("`") else cell


def _code_default(value: object) -> str:
    """A default as the docs write it: lists comma-separated, booleans lower case, secrets revealed."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) if value else "(empty: any)"
    return str(value)


def _same(documented: str, actual: str) -> bool:
    try:
        return float(documented) == float(actual)  # `5.0` and `5`, `1000000` and `1_000_000`
    except ValueError:
        return documented == actual


def test_every_default_in_the_configuration_docs_is_the_code_default() -> None:
    """Each `NAME` | default row of docs/configuration.md's Settings table equals `Settings`' default."""
    rows = table_rows(section(CONFIGURATION_MD, "Settings"))
    documented = {row[0].strip("`"): _documented_default(row[1]) for row in rows}
    assert set(documented) == {name.upper() for name in Settings.model_fields}
    wrong = []
    for name, default in documented.items():
        actual = _code_default(Settings.model_fields[name.lower()].default)
        if not _same(default, actual):
            wrong.append(f"{name}: docs say {default!r}, the code {actual!r}")
    assert not wrong, wrong


def test_local_services_defaults_in_the_configuration_docs() -> None:
    """The LOCAL_* defaults of docs/configuration.md are those `collector services` uses."""
    rows = table_rows(section(CONFIGURATION_MD, "Only for `make run` and `collector services`"))
    config = services_config({})
    actual = {
        "LOCAL_REDIS_PORT": str(config.redis_port),
        "LOCAL_POSTGRES_PORT": str(config.postgres_port),
        "LOCAL_DATABASE_NAME": config.database_name,
        "LOCAL_REDIS_DB": str(config.redis_db),
        "LOCAL_SERVICES": ",".join(config.services),
    }
    assert {row[0].strip("`"): _documented_default(row[1]) for row in rows} == actual


def test_compose_defaults_in_the_configuration_docs() -> None:
    """Compose's own variables are documented with the default the compose files give them."""
    files = ("docker-compose.yml", "docker-compose.monitoring.yml")
    compose = "".join((ROOT / name).read_text(encoding="utf-8") for name in files)
    rows = table_rows(section(CONFIGURATION_MD, "Only for Docker Compose"))
    assert rows
    for name, default, *_ in rows:
        name, default = name.strip("`"), _documented_default(default)
        forms = set(re.findall(r"\$\{" + name + r"(:?[-?])([^}]*)\}", compose))
        assert forms, f"no compose file reads {name}"
        if "required" in default:
            assert all(op.endswith("?") or value == "" for op, value in forms), f"{name}: {forms}"
        else:
            assert forms == {(":-", default)}, f"{name}: docs say {default!r}, the compose files {forms}"


def test_exportable_relations_in_the_docs_are_those_export_accepts() -> None:
    """docs/schema.md names exactly the tables and views `collector export` accepts."""
    bullet = next(
        block for block in section(SCHEMA_MD, "Exporting").split("\n- ") if block.startswith("Relations:")
    )
    named = set(re.findall(r"`([a-z_0-9]+)`", bullet.split(". Rows come", 1)[0]))
    assert named == set(RELATIONS), f"docs: {sorted(named)}; collector export: {sorted(RELATIONS)}"


def _control_paths() -> dict[str, str]:
    """path -> method of every control endpoint the fake exchange serves (`/_fake/...`)."""
    controls = object.__new__(Controls)  # the route table needs no running exchange
    return {route.path: route.method for route in controls.routes()}


def test_every_fault_switch_is_documented() -> None:
    """docs/operations.md's table of switches names every POST control of the fake exchange, and no other."""
    rows = table_rows(section(OPERATIONS_MD, "Faults to try"))
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row[0])}
    served = {path.removeprefix("/_fake/") for path, method in _control_paths().items() if method == "POST"}
    assert named == served


def _curl_commands(text: str) -> list[list[str]]:
    """argv of each `curl` line of the shell blocks of `text` (continuation lines joined)."""
    found = []
    for block in code_blocks(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("curl "):
                found.append(shlex.split(line, comments=True))
    return found


def _request_of(argv: list[str]) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, URL, body, headers) of a curl argv using -X, -H and -d only."""
    method, body, headers, url = "GET", None, {}, ""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args).encode()
            method = "POST" if method == "GET" else method
        elif arg in ("-s", "-sS"):
            continue
        else:
            assert not url and not arg.startswith("-"), f"unexpected curl argument {arg!r} in {argv}"
            url = arg
    return method, url, body, headers


def test_the_fault_commands_work_on_a_fake_exchange(make_fake: FakeFactory) -> None:
    """Every curl of the fake's control endpoints in README.md and docs/ is answered ok by a real fake."""
    fake = make_fake()
    served = _control_paths()
    commands = [
        argv
        for path in documents()
        for argv in _curl_commands(path.read_text(encoding="utf-8"))
        if any(DEMO_FAKE in arg for arg in argv)
    ]
    assert len(commands) >= 10
    tried = set()
    for argv in commands:
        method, url, body, headers = _request_of(argv)
        path = urlsplit(url).path
        assert served.get(path) == method, f"{shlex.join(argv)}: the fake serves no {method} {path}"
        request = urllib.request.Request(
            url.replace(DEMO_FAKE, f"127.0.0.1:{fake.port}"), data=body, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{shlex.join(argv)}: {error.code} {error.read()!r}") from None
        assert isinstance(answer, dict) and "error" not in answer, (argv, answer)
        tried.add(path)
    # The faults a newcomer is pointed at are all among the commands that were run.
    for switch in ("drop", "withhold_depth", "silence", "malformed", "rest_fail", "server_shutdown", "pause"):
        assert f"/_fake/{switch}" in tried, switch
    assert "/_fake/liquidation" in tried


def _first_command(argv: list[str]) -> list[str]:
    """The words before the first pipe, redirection or command separator."""
    for index, word in enumerate(argv):
        if word in ("|", "||", "&&", ";", ">", ">>"):
            return argv[:index]
    return argv


def test_every_collector_command_in_the_docs_parses() -> None:
    """Each `collector ...` line in the shell blocks of README.md and docs/ is accepted by the CLI parser."""
    commands = []
    for path in documents():
        for block in code_blocks(path.read_text(encoding="utf-8"), "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                argv = _first_command(shlex.split(line, comments=True))
                if argv[:1] == ["collector"]:
                    commands.append((path.name, argv))
    assert len(commands) >= 15
    for name, argv in commands:
        try:
            cli._parser().parse_args(argv[1:])
        except SystemExit:
            raise AssertionError(f"{name}: the collector CLI rejects {shlex.join(argv)}") from None


def _setting_row(name: str) -> str:
    """The meaning cell of `name`'s row in docs/configuration.md's Settings table."""
    rows = table_rows(section(CONFIGURATION_MD, "Settings"))
    return next(row[2] for row in rows if row[0] == f"`{name}`")


def test_the_documented_retries_of_a_scheduled_poll_are_the_code_s(
    settings: Settings, redis_conn: redis.Redis, make_fake: FakeFactory
) -> None:
    """REST_MAX_RETRIES' row says how many attempts a scheduled poll makes; a real tick makes that many."""
    stated = re.search(r"scheduled poll retries once \((\d+) attempts\)", _setting_row("REST_MAX_RETRIES"))
    assert stated, "docs/configuration.md: REST_MAX_RETRIES must say what a scheduled poll does"
    fake = make_fake()
    fake.fail_rest(500, 10, retry_after_s=0)
    aimed = settings.model_copy(
        update={"binance_futures_rest_url": fake.futures_rest_url, "rest_backoff_initial_s": 0.01}
    )
    call = planner.Call("open_interest", open_interest_request(fake.futures_rest_url, "BTCUSDT"))
    summary = planner.TickSummary()
    planner.send(aimed, redis_conn, [call], summary)
    with urllib.request.urlopen(f"{fake.control_url}/rest_stats", timeout=10) as response:
        answered = json.loads(response.read())["futures"]["answered"]
    assert answered == {"500": int(stated.group(1))}
    assert summary.failed["open_interest/futures/BTCUSDT"].endswith(f"after {stated.group(1)} attempts")


def test_the_documented_wait_of_a_poll_asked_for_by_hand_is_the_code_s() -> None:
    """REST_BACKOFF_MAX_S' row states how long a poll asked for by hand waits for a pause or weight."""
    row = _setting_row("REST_BACKOFF_MAX_S")
    stated = re.search(r"asked for by hand or a resync waits up to (\d+) s", row)
    assert stated and float(stated.group(1)) == MANUAL_MAX_WAIT_S
