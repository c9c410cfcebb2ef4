"""The Grafana dashboard asks only for metrics that the real /metrics exports; the REST weight gauges.

Metric names are read out of each panel's PromQL (`metric_names`) and compared with the series names
that a real `/metrics` page, served by `make_app` against a throwaway Redis and PostgreSQL, offers
(`exported_series`). A page declares every family even before it has samples, so the comparison holds
on an idle collector.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from collector.db.connection import ensure_database
from collector.queue import keys
from collector.settings import Settings
from collector.web.server import make_app
from tests.test_web import DEADLINE_S, serving

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"

# PromQL words that look like names but select nothing.
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
    | {"inf", "nan"}
)
# Series Prometheus records itself for every scrape target; /metrics does not export them.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# The series names a family of each type offers (`collector_messages` is queried as `_total`).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
}

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:5m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# A name not glued to a number (1e3, 5m), a `$variable` or a preceding name; `(` after it: a function.
_NAME = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: no functions, aggregations, keywords, label
    names or values, durations or Grafana variables."""
    text = _STRINGS.sub('""', expr)  # first: a label value may hold braces or brackets
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name, call in _NAME.findall(text) if not call and name.lower() not in KEYWORDS}


def exported_series(page: str) -> set[str]:
    """Every series name a Prometheus text page offers: each family's names by its type, and samples."""
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those folded inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def _load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


@pytest.fixture
def metrics_page(settings: Settings) -> str:
    """The real /metrics of `collector web` with an empty Redis and an existing database."""
    ensure_database(settings)
    with serving(make_app(settings)) as base:
        response = requests.get(f"{base}/metrics", timeout=(5, DEADLINE_S))
    assert response.status_code == 200
    return response.text


# --- pure: reading PromQL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("collector_queue_length", {"collector_queue_length"}),
        (
            'sum by (market, stream) (rate(collector_messages_total{stream=~".*forceOrder{1}[x]"}'
            "[$__rate_interval]))",
            {"collector_messages_total"},
        ),
        (
            "histogram_quantile(0.99, sum(rate(x_seconds_bucket[5m])) by (le)) > 1e3",
            {"x_seconds_bucket"},
        ),
        ("a_sum / on(job) group_left(market) b_count offset 5m", {"a_sum", "b_count"}),
        ("max_over_time(up{job='collector'}[1h:1m] @ end()) or vector(0)", {"up"}),
    ],
)
def test_metric_names_skips_functions_labels_and_durations(expr: str, names: set[str]) -> None:
    """Functions, aggregations, grouping labels, matchers, ranges and numbers are not metric names."""
    assert metric_names(expr) == names


def test_series_names_follow_the_family_type() -> None:
    """A counter is queried as `_total`, a histogram as `_bucket`/`_sum`/`_count`, never by its bare name."""
    page = (
        "# HELP h_seconds a histogram\n# TYPE h_seconds histogram\n"
        "# HELP c_events a counter\n# TYPE c_events counter\n"
        "# HELP g a gauge\n# TYPE g gauge\n"
    )
    offered = exported_series(page)
    assert {"h_seconds_bucket", "h_seconds_sum", "h_seconds_count", "c_events_total", "g"} <= offered
    assert metric_names("rate(h_seconds[5m]) + c_events + g_total") - offered == {
        "h_seconds",
        "c_events",
        "g_total",
    }


# --- the dashboard against the real /metrics -------------------------------------------------------


def test_every_panel_queries_metrics_that_exist(metrics_page: str) -> None:
    """Each metric any panel's PromQL selects is exported by /metrics (or recorded by Prometheus itself)."""
    offered = exported_series(metrics_page) | PROMETHEUS_SERIES
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    unknown: list[str] = []
    for path in DASHBOARDS:
        for title, expr in queries(_load(path)):
            names = metric_names(expr)
            assert names, f"{path.name} {title!r}: no metric in {expr!r}"
            unknown += [f"{path.name} {title!r}: {name}" for name in sorted(names - offered)]
    assert not unknown, "panels query metrics /metrics does not export:\n" + "\n".join(unknown)


def test_dashboard_shows_what_an_operator_watches() -> None:
    """Events, backlog and drain lag, rows, dead letters, reconnects, REST weight, alerts, gaps, losses."""
    queried = {name for path in DASHBOARDS for _, expr in queries(_load(path)) for name in metric_names(expr)}
    wanted = {
        "collector_messages_total",
        "collector_queue_length",
        "collector_drain_last_success_age_seconds",
        "collector_rows_inserted_total",
        "collector_deadletter_length",
        "collector_reconnects_total",
        "collector_rest_weight_used_1m",
        "collector_rest_weight_limit_1m",
        "collector_rest_weight_needed_1m",
        "collector_rest_weight_available_1m",
        "collector_alerts_total",
        "collector_gaps_total",
        "collector_open_gaps",
        "collector_lost_events",
    }
    assert wanted <= queried, f"the dashboard lost {sorted(wanted - queried)}"


def test_panels_use_the_provisioned_datasource_and_fit_the_grid() -> None:
    """Every panel and query names the provisioned Prometheus uid; ids are unique; panels fit 24 columns."""
    uids = {
        source["uid"]
        for path in DATASOURCES.glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    }
    for path in DASHBOARDS:
        dashboard = _load(path)
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name} {panel['title']!r} overflows the grid"
            sources = [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]
            for source in sources:
                assert source is None or source["uid"] in uids, f"{path.name} {panel['title']!r}: {source}"
            assert panel["type"] == "row" or panel.get("datasource"), f"{panel['title']!r} has no datasource"


# --- the REST weight gauges -------------------------------------------------------------------------

FUTURES_PLAN = {
    "market": "futures",
    "limit_1m": 2400,
    "scheduled_limit_1m": 1560,
    "needed_1m": 2500.0,
    "available_1m": 1404.0,
    "stretch": 1.78,
    "intervals_s": {"open_interest": 107.0, "depth_snapshots": 534.0},
    "symbols": 500,
    "updated_us": 1_800_000_000_000_000,
}


def test_rest_weight_gauges_read_redis_at_scrape_time(settings: Settings, redis_conn: redis.Redis) -> None:
    """This minute's weight per market (0 without a key) and the planner's plan; no plan, no plan samples."""
    ensure_database(settings)
    minute = int(time.time()) // 60
    for each in (minute, minute + 1):  # a scrape that crosses into the next minute reads the same
        redis_conn.set(keys.rest_weight("spot", each), 1234)
    redis_conn.hset(keys.REST_PLAN, "futures", json.dumps(FUTURES_PLAN))
    redis_conn.hset(keys.REST_PLAN, "spot", b"{not json")  # a broken plan costs its samples, not the scrape
    with serving(make_app(settings)) as base:
        response = requests.get(f"{base}/metrics", timeout=(5, DEADLINE_S))
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples = {
        (sample.name, sample.labels.get("market")): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("collector_rest_weight_used_1m", "spot")] == 1234
    assert samples[("collector_rest_weight_used_1m", "futures")] == 0
    assert samples[("collector_rest_weight_limit_1m", "futures")] == 2400
    assert samples[("collector_rest_weight_needed_1m", "futures")] == 2500
    assert samples[("collector_rest_weight_available_1m", "futures")] == 1404
    assert samples[("collector_rest_interval_stretch", "futures")] == pytest.approx(1.78)
    for name in ("limit_1m", "needed_1m", "available_1m"):
        assert (f"collector_rest_weight_{name}", "spot") not in samples
        assert families[f"collector_rest_weight_{name}"].type == "gauge"  # declared all the same
    assert ("collector_rest_interval_stretch", "spot") not in samples
