"""The training stack around payment-api: shipped alerts, dashboard and compose file, proved against real servers.

A. The shipped alert rules fire and resolve with the incidents they are written for, in a real Prometheus
   scraping a real app. Their windows and `for:` durations are shortened by a regex over the shipped files
   (never hand-copied), so a whole incident takes seconds instead of minutes.
B. Every PromQL query of the Grafana dashboard returns data from that Prometheus; its Flux queries name only
   what the service writes to InfluxDB; data sources and layout are consistent.
C. docker-compose.yml, .env.example, the Dockerfile, prometheus.yml and Grafana provisioning agree.

The tests of A and B share one app (100 payments/s) and one Prometheus for the module: Prometheus needs about
6 s before its first scrape, and each incident needs its rate window to fill and drain again.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import payment_api
from conftest import QUIET, Prometheus, RecordingInfluxDB, eventually, http, require_binary

HERE = Path(__file__).resolve().parent
ALERTS, RECORDING = HERE / "prometheus" / "alerts.yml", HERE / "prometheus" / "recording.yml"
DASHBOARD = HERE / "grafana" / "dashboards" / "payment-api.json"
DATASOURCES = HERE / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = HERE / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
COMPOSE, ENV_EXAMPLE, DOCKERFILE = HERE / "docker-compose.yml", HERE / ".env.example", HERE / "Dockerfile"

# Fast equivalents of the shipped durations. Rate windows keep their order (5m < 30m < 1h < 6h), so the
# multi-window SLO alerts keep their meaning; at 100 payments/s a 20 s window holds 2,000 payments, and the
# normal 2 % of 500s and 1.5 % of declines stay 9 and 13 standard deviations below their 5 % thresholds.
FAST_WINDOWS = {"1m": "5s", "2m": "10s", "5m": "20s", "30m": "40s", "1h": "60s", "6h": "90s"}
FAST_HOLDS = {"1m": "5s", "2m": "5s", "5m": "5s", "15m": "10s"}
LONGEST_FAST_WINDOW, LONGEST_FAST_HOLD = 90, 10  # seconds
TRAFFIC = {"simulation_enabled": True, "simulation_rate": 100, "failure_rate": 0.02, "decline_rate": 0.02}  # the defaults
INCIDENT_TIMEOUT = 60  # seconds for an alert to fire, or to resolve: 20 s window + 5 s hold + a noisy machine
HEALTH_ALERTS = ("PaymentApiDown", "PaymentApiUnreachable", "PaymentApiTargetMissing",
                 "SimulatedTrafficStopped")  # never in an incident

# ---------------------------------------------------------------- helpers: durations and rules


def seconds(duration):
    """Seconds in a Prometheus duration such as 20s, 5m or 1h30m."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, f"not a duration: {duration}"
    unit_seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(number) * unit_seconds[unit] for number, unit in parts)


def range_durations(expr):
    """Every duration written inside [...] in a PromQL expression (ranges and subqueries)."""
    return [part for inside in re.findall(r"\[([^\]]*)\]", expr) for part in inside.split(":") if part]


def fast_rule_text(text, name):
    """The rule file `text` with every [window] and `for:` replaced by its fast equivalent."""
    def window(match):
        assert match[1] in FAST_WINDOWS, f"{name}: no fast equivalent of [{match[1]}]; add it to FAST_WINDOWS"
        return f"[{FAST_WINDOWS[match[1]]}]"

    def hold(match):
        assert match[2] in FAST_HOLDS, f"{name}: no fast equivalent of `for: {match[2]}`; add it to FAST_HOLDS"
        return match[1] + FAST_HOLDS[match[2]]

    text = re.sub(r"\[(\d+[smhdwy])\]", window, text)
    return re.sub(r"^(\s*for:\s*)(\S+)[ \t]*$", hold, text, flags=re.MULTILINE)


def write_fast_rules(folder):
    """Fast copies of the shipped alerts.yml and recording.yml in `folder`, for Prometheus evaluating every 1 s."""
    copies = []
    for shipped in (ALERTS, RECORDING):
        copy = folder / f"fast-{shipped.name}"
        copy.write_text(fast_rule_text(shipped.read_text(), shipped.name))
        copies.append(copy)
    return copies


def without_durations(rule):
    """A rule with its `for:` left out and every [...] in its expression masked, to compare the rest."""
    return {key: re.sub(r"\[[^\]]*\]", "[window]", value) if key == "expr" else value
            for key, value in rule.items() if key != "for"}


def rules_of(path):
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def shipped_alert(name):
    """The first shipped alerting rule called `name` (PaymentAvailabilitySLOBurn has two)."""
    return next(rule for rule in rules_of(ALERTS) if rule.get("alert") == name)

# ---------------------------------------------------------------- helpers: the running stack


class Stack:
    """One app making 100 payments/s and one Prometheus scraping it and evaluating the fast rules every 1 s."""

    def __init__(self, app, prometheus):
        self.app, self.prometheus = app, prometheus

    def api(self, path, **params):
        url = self.prometheus.url + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            document = json.load(response)
        assert document["status"] == "success", document
        return document["data"]

    def query(self, promql):
        return self.prometheus.query(promql)

    def value(self, promql):
        """The one number an expression returns now, or None while it returns nothing."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} returned {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def firing(self):
        """{alertname: alert} of the alerts firing now (pending ones are not firing yet)."""
        return {alert["labels"]["alertname"]: alert for alert in self.api("/api/v1/alerts")["alerts"]
                if alert["state"] == "firing"}

    def scenario(self, method, name):
        status, _, body = http(method, f"{self.app.url}/api/scenarios/{name}")
        assert status == 200 and body["active"] is (method == "POST"), body

    def has_normal_traffic(self, seconds):
        """True once Prometheus holds `seconds` of scrapes and no scenario ran in them (or 10 s before)."""
        scrapes = self.value(f"count_over_time(up[{seconds}s])")
        scenarios = self.value(f"max(max_over_time(payment_scenario_active[{seconds + 10}s]))")
        return scrapes is not None and scrapes >= seconds - 3 and scenarios == 0

    def wait_for_normal_traffic(self, seconds):
        eventually(lambda: self.has_normal_traffic(seconds), timeout=seconds + 150, interval=0.5,
                   message=f"{seconds} s of normal traffic in Prometheus")

    def wait_until_quiet(self):
        """No scenario running and no alert firing: a clean start for the next incident."""
        eventually(lambda: self.value("max(payment_scenario_active)") == 0 and not self.firing(),
                   timeout=INCIDENT_TIMEOUT + 30, interval=0.5, message="no scenario running and no alert firing")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The app (QUIET settings + 100 payments/s, 2 % failures, 2 % of card payments declined) and Prometheus with
    the fast rules, for the module.

    The function-scoped `make_app` and `start_prometheus` fixtures would restart both for every test;
    this uses the same settings and the same Prometheus class, and stops both after the module.
    """
    folder = tmp_path_factory.mktemp("stack")
    rule_files = write_fast_rules(folder)
    app = payment_api.PaymentApp(dataclasses.replace(payment_api.Settings(), **{**QUIET, **TRAFFIC})).start()
    prometheus = Prometheus(folder, app.url.removeprefix("http://"), rule_files)
    try:
        prometheus.start()
        running = Stack(app, prometheus)
        eventually(lambda: running.value("sum(rate(payment_requests_total[10s]))"), timeout=60, interval=0.5,
                   message="first scrapes of the app in Prometheus")
        yield running
    finally:
        prometheus.stop()
        app.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_incident(stack, scenario, alert, quiet):
    """Start `scenario` until `alert` fires, stop it until `alert` resolves; the `quiet` alerts never fire.

    Returns the alert as /api/v1/alerts showed it firing.
    """
    stack.wait_until_quiet()

    def firing_alert(wanted):
        firing = stack.firing()
        unexpected = set(firing) & {*quiet, *HEALTH_ALERTS}
        assert not unexpected, f"during {scenario}: {sorted(unexpected)} fired too"
        return firing.get(alert) if wanted else alert not in firing

    stack.scenario("POST", scenario)
    try:
        fired = eventually(lambda: firing_alert(True), timeout=INCIDENT_TIMEOUT, interval=0.5,
                           message=f"{alert} firing during {scenario}")
    finally:
        stack.scenario("DELETE", scenario)
    eventually(lambda: firing_alert(False), timeout=INCIDENT_TIMEOUT, interval=0.5,
               message=f"{alert} resolved after {scenario} stopped")
    return fired


def eventually_passes(check, timeout, interval=1.0):
    """Run `check` until it raises no AssertionError; after `timeout` seconds its last AssertionError is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def assert_fired_as_shipped(fired, name):
    """The firing alert carries the shipped severity and summary, and its description rendered."""
    shipped = shipped_alert(name)
    assert fired["labels"]["severity"] == shipped["labels"]["severity"]
    assert fired["annotations"]["summary"] == shipped["annotations"]["summary"]
    assert fired["annotations"]["description"] and "error expanding" not in fired["annotations"]["description"]

# ---------------------------------------------------------------- A. alert rules


def test_fast_rules_are_derived_from_the_shipped_rules_with_only_windows_and_holds_shortened(tmp_path):
    promtool = require_binary("promtool")
    copies = write_fast_rules(tmp_path)
    assert [seconds(FAST_WINDOWS[w]) for w in sorted(FAST_WINDOWS, key=seconds)] == sorted(
        seconds(fast) for fast in FAST_WINDOWS.values()), "fast windows must keep the order of the shipped ones"

    for shipped, copy in zip((ALERTS, RECORDING), copies):
        assert copy.read_text() != shipped.read_text()
        shipped_rules, fast_rules = rules_of(shipped), rules_of(copy)
        assert len(fast_rules) == len(shipped_rules)
        shortened = 0
        for before, after in zip(shipped_rules, fast_rules):
            assert without_durations(after) == without_durations(before), "only windows and for: may change"
            assert ("for" in before) == ("for" in after)
            assert all(seconds(window) <= LONGEST_FAST_WINDOW for window in range_durations(after["expr"])), after
            assert seconds(after.get("for", "0s")) <= LONGEST_FAST_HOLD, after
            shortened += after["expr"] != before["expr"] or after.get("for") != before.get("for")
        assert shortened == sum("[" in rule["expr"] or "for" in rule for rule in shipped_rules)

    result = subprocess.run([promtool, "check", "rules", *map(str, copies)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_alert_fires_in_normal_traffic(stack):
    stack.wait_for_normal_traffic(25)  # the 20 s windows hold nothing but normal traffic
    groups = stack.api("/api/v1/rules")["groups"]
    assert {rule["name"] for group in groups for rule in group["rules"]} == {
        rule.get("alert") or rule.get("record") for rule in rules_of(ALERTS) + rules_of(RECORDING)}
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"]), groups
    # The alert expressions have data, and it is normal: quiet because nothing is wrong, not because of no data.
    assert 0.01 < stack.value("payment:error_ratio:rate5m") < 0.05
    assert 0.005 < stack.value("payment:decline_ratio:rate5m") < 0.03  # declines on, counted apart from errors
    assert stack.value("payment:unavailable_ratio:rate5m") == 0
    assert 0.2 < stack.value("payment:duration_seconds:p95_5m") < 0.5

    evaluations = set()

    def quiet_for_ten_evaluations():
        firing = stack.firing()
        assert not firing, f"fired in normal traffic: {firing}"
        evaluations.add(tuple(group["lastEvaluation"] for group in stack.api("/api/v1/rules")["groups"]))
        return len(evaluations) >= 10

    eventually(quiet_for_ten_evaluations, timeout=60, interval=0.5, message="ten quiet rule evaluations")


SEED_SUCCESS_RATE = (
    'sum(rate(payment_requests_total{status="200"}[5m])) / sum(rate(payment_requests_total[5m])) * 100')
SEED_QUERIES = {  # the seed's example queries (README "Metrics"), each with what a sensible answer is
    "rate(payment_requests_total[5m])": "total rate near the 100 payments/s of the simulator",
    "sum(rate(payment_requests_total[5m])) by (currency)": "a positive rate for each configured currency",
    SEED_SUCCESS_RATE: "success rate between 90 and 100 %",
    "histogram_quantile(0.95, rate(payment_duration_seconds_bucket[5m]))": "p95 between 0.1 and 0.5 s",
    "payment_daily_revenue": "positive revenue for each configured currency",
    "active_payments": "a whole number of payments in flight",
}


def test_seed_example_queries_return_sensible_values(stack):
    readme_block = re.search(r"```promql\n(.*?)```", (HERE / "README.md").read_text(), re.DOTALL)[1]
    readme_queries = {line.strip() for line in readme_block.splitlines() if line.strip() and not line.startswith("#")}
    assert readme_queries == set(SEED_QUERIES)
    stack.wait_for_normal_traffic(30)

    def run(query):  # [5m] -> [30s]: the stack has run for well under 5 minutes
        result = stack.query(query.replace("[5m]", "[30s]"))
        assert result, f"{query} returned nothing"
        return result

    def sensible():
        currencies = set(stack.app.settings.currencies)
        rates = run("rate(payment_requests_total[5m])")
        assert all(float(row["value"][1]) >= 0 for row in rates)
        assert 70 < sum(float(row["value"][1]) for row in rates) < 130
        by_currency = {row["metric"]["currency"]: float(row["value"][1])
                       for row in run("sum(rate(payment_requests_total[5m])) by (currency)")}
        assert set(by_currency) == currencies and all(rate > 0 for rate in by_currency.values()), by_currency
        success = run(SEED_SUCCESS_RATE)
        assert len(success) == 1 and 90 < float(success[0]["value"][1]) < 100, success
        p95 = {row["metric"]["status"]: float(row["value"][1])
               for row in run("histogram_quantile(0.95, rate(payment_duration_seconds_bucket[5m]))")}
        assert set(p95) == {"success", "declined", "failed"} and all(0.1 < v < 0.5 for v in p95.values()), p95
        revenue = {row["metric"]["currency"]: float(row["value"][1]) for row in run("payment_daily_revenue")}
        assert set(revenue) == currencies and all(amount > 0 for amount in revenue.values()), revenue
        active = run("active_payments")
        assert len(active) == 1 and float(active[0]["value"][1]).is_integer() and float(active[0]["value"][1]) >= 0
        assert stack.value("avg_over_time(active_payments[30s])") > 1  # about 15 in flight at 100/s
        return True

    eventually_passes(sensible, timeout=20)

# ---------------------------------------------------------------- B. Grafana dashboard (run before the incidents)


def dashboard():
    return json.loads(DASHBOARD.read_text())


def provisioned_datasources():
    """{uid: type} of the data sources Grafana provisions."""
    return {source["uid"]: source["type"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}


def all_panels(panels):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panel_queries(board, datasource_type):
    """(where, target) for every query of `datasource_type` in the panels, those inside rows included."""
    types = provisioned_datasources()
    return [(f"panel {panel['id']} {panel['title']!r} {target['refId']}", target)
            for panel in all_panels(board["panels"]) for target in panel.get("targets", [])
            if types.get((target.get("datasource") or panel.get("datasource") or {}).get("uid")) == datasource_type]


def annotation_queries(board, datasource_type):
    """(where, annotation) for every annotation query of `datasource_type`."""
    types = provisioned_datasources()
    return [(f"annotation {annotation['name']!r}", annotation) for annotation in board["annotations"]["list"]
            if types.get((annotation.get("datasource") or {}).get("uid")) == datasource_type]


def variables(board, datasource_type="prometheus"):
    """{name: variable} of the dashboard's variables whose data source is of `datasource_type` (None: every one)."""
    types = provisioned_datasources()
    return {variable["name"]: variable for variable in board["templating"]["list"]
            if datasource_type is None or types.get(variable["datasource"]["uid"]) == datasource_type}


def variable_label_query(variable):
    """(series selector, label) of a `label_values(metric, label)` or `label_values(metric{...}, label)` query."""
    definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"label_values\(\s*(\w+(?:\{[^}]*\})?)\s*,\s*(\w+)\s*\)", definition.strip())
    assert match, f"variable {variable['name']}: unsupported query {definition!r}"
    return match[1], match[2]


def variable_options(stack, variable):
    """The values Grafana offers: the label's values filtered by the variable's regex, sorted."""
    selector, label = variable_label_query(variable)
    values = stack.api(f"/api/v1/label/{label}/values", **{"match[]": selector})
    pattern = variable.get("regex") or "/.*/"
    keep = re.compile(re.fullmatch(r"/(.*)/\w*", pattern)[1])
    return sorted(value for value in values if keep.search(value))


def grafana_value(values):
    """How Grafana's Prometheus data source writes a selection into a query: one value, or (a|b) for several."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def selections(board, stack):
    """{name: {variable: text Grafana puts in the query}} for one value, two values and All of each variable.

    All is the variable's allValue when it has one, else every option it offers.
    """
    options = {name: variable_options(stack, variable) for name, variable in variables(board).items()}
    return {"one value": {name: grafana_value(values[:1]) for name, values in options.items()},
            "two values": {name: grafana_value(values[:2]) for name, values in options.items()},
            "All": {name: variables(board)[name].get("allValue") or grafana_value(values)
                    for name, values in options.items()}}


def interpolate(expr, selection, window="20s"):
    """`expr` as Grafana sends it for `selection` {variable: text}, with every range shortened to `window`."""
    def replace(match):
        name = match[1] or match[2] or match[3]
        if name in ("__rate_interval", "__interval", "__range"):
            return window
        assert name in selection, f"unknown variable ${name} in {expr}"
        return selection[name]

    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", replace, expr)
    assert "$" not in expr, expr
    return re.sub(r"\[\d+[smhdwy]\]", f"[{window}]", expr)


def test_dashboard_variables_offer_the_service_currencies_and_types_from_prometheus(stack):
    status, _, _ = http("POST", stack.app.url + "/api/payments", {"amount": 5, "currency": "XXX", "type": "gift"})
    assert status == 400  # a rejected payment brings the label value "invalid" the variables must hide
    board = dashboard()
    expected = {"currency": sorted(stack.app.settings.currencies), "payment_type": sorted(payment_api.PAYMENT_TYPES),
                "instance": [stack.app.url.removeprefix("http://")]}  # the replicas, by scraped address
    assert set(variables(board)) == set(expected)
    for name, variable in variables(board).items():
        assert variable["definition"] == variable["query"]["query"]
        selector, label = variable_label_query(variable)
        assert (variable["query"]["metric"], variable["query"]["label"]) == (selector.split("{")[0], label)
        if label != "instance":
            eventually(lambda: payment_api.INVALID in stack.api(f"/api/v1/label/{label}/values", **{"match[]": selector}),
                       timeout=30, interval=0.5, message=f"label value invalid scraped for {label}")
        assert variable_options(stack, variable) == expected[name]
        assert variable["includeAll"] and variable["current"]["value"] == ["$__all"], name


def influxdb_variables(board):
    """{tag: variable} of the dashboard's InfluxDB variables, each listing the values of one tag."""
    return {re.search(r'tag:\s*"(\w+)"', variable["query"])[1]: variable
            for variable in variables(board, "influxdb").values()}


def grafana_flux_regex(values):
    """How Grafana's ${name:regex} writes a selection: each value regex-escaped, several as (a|b)."""
    escaped = [re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def test_influxdb_variables_list_the_replica_and_customer_tags_of_the_payment_measurement(make_app):
    board, schema = dashboard(), written_schema(make_app)
    listed = influxdb_variables(board)
    assert set(listed) == {"instance", "customer_id"} and set(listed) <= set(schema["tags"])
    for tag, variable in listed.items():
        assert variable["definition"] == variable["query"] and variable["includeAll"] and variable["multi"], tag
        assert variable["current"]["value"] == ["$__all"], tag
        assert set(re.findall(r'r\._measurement\s*==\s*"([^"]*)"', variable["query"])) == {"payment"}, tag
        assert set(re.findall(r'bucket:\s*"([^"]*)"', variable["query"])) == schema["buckets"], tag
    flux = [target["query"] for _, target in panel_queries(board, "influxdb")]
    replica = listed["instance"]["name"]
    assert all(f"${{{replica}:json}}" in query for query in flux), "every InfluxDB panel follows the replica variable"
    customer = listed["customer_id"]["name"]
    assert all(f"${{{customer}:regex}}" in query for query in flux), "every InfluxDB panel follows the customer variable"


def test_customer_filter_keeps_exactly_the_chosen_customers_and_all_of_them_for_all(make_app):
    """The Flux panels filter customer_id with the regex Grafana writes for ${customer:regex}: one customer, several,
    or the variable's allValue for All, which keeps every customer without listing a thousand of them."""
    board = dashboard()
    variable = influxdb_variables(board)["customer_id"]
    name, everyone = variable["name"], variable["allValue"]
    flux = [target["query"] for _, target in panel_queries(board, "influxdb")]
    patterns = {re.search(r"r\.customer_id\s*=~\s*/(.*?)/\)", query)[1] for query in flux}
    pattern, = patterns  # one filter, the same in every panel
    customers = written_schema(make_app)["tags"]["customer_id"] | {"other", "cust_00042", "cust_000420", "cust_00043"}

    def kept(selection):
        regex = re.compile(pattern.replace(f"${{{name}:regex}}", selection))
        return {value for value in customers if regex.search(value)}  # Flux's =~ matches anywhere in the value

    assert kept(grafana_flux_regex(["cust_00042"])) == {"cust_00042"}
    assert kept(grafana_flux_regex(["cust_00042", "other"])) == {"cust_00042", "other"}
    assert kept(everyone) == customers


def test_every_dashboard_promql_query_returns_data_for_one_several_and_all_values(stack):
    board = dashboard()
    queries = panel_queries(board, "prometheus")
    assert len(queries) >= 10
    for label, selection in selections(board, stack).items():
        for where, target in queries:
            expr = interpolate(target["expr"], selection)
            result = eventually(lambda: stack.query(expr), timeout=30, interval=0.5,
                                message=f"{where} with {label}: data for {expr}")
            assert all(math.isfinite(float(row["value"][1])) for row in result), (where, expr, result)
            for legend_label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert all(legend_label in row["metric"] for row in result), (where, legend_label, result)


def test_incident_annotation_marks_exactly_the_running_scenario(stack):
    (where, annotation), = annotation_queries(dashboard(), "prometheus")
    stack.wait_until_quiet()
    assert stack.query(annotation["expr"]) == [], where
    stack.scenario("POST", "traffic_surge")
    try:
        marked = eventually(lambda: stack.query(annotation["expr"]), timeout=30, interval=0.5,
                            message=f"{where} during traffic_surge")
    finally:
        stack.scenario("DELETE", "traffic_surge")
    assert [row["metric"]["scenario"] for row in marked] == ["traffic_surge"]
    used = re.findall(r"\{\{\s*(\w+)\s*\}\}", annotation["titleFormat"] + annotation["textFormat"])
    assert all(label in marked[0]["metric"] for label in [*used, *annotation["tagKeys"].split(",")])
    eventually(lambda: stack.query(annotation["expr"]) == [], timeout=30, interval=0.5,
               message=f"{where} ends when the scenario stops")


def written_schema(make_app):
    """What the service writes to InfluxDB, read from real writes of a completed, a declined and a failed payment
    and a refund of the completed one.

    Returns {"buckets", "measurements", "tags": {tag: {values}}, "by_measurement": {measurement: {"fields": {names},
    "tags": {names}}}}. Line protocol is split simply: the service's tag and field values hold no spaces or commas.
    """
    payment = {"amount": 12.5, "currency": "EUR"}
    declined = {**payment, "cardNumber": next(iter(payment_api.TEST_CARDS))}  # a test card the bank always declines
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, influxdb_flush_interval_ms=100, latency_scale=0)
        answers = [http("POST", app.url + "/api/payments", body, headers)
                   for body, headers in ((payment, {}), (declined, {}), (payment, {"X-Simulate-Failure": "true"}))]
        assert [status for status, _, _ in answers] == [200, 402, 500], answers
        completed = answers[0][2]["paymentId"]
        status, _, refund = http("POST", f"{app.url}/api/payments/{completed}/refunds", {})
        assert status == 201, refund
        app.stop()  # sends what is pending
    lines = influxdb.lines()
    assert len(lines) == 4, f"expected one point per payment and refund (is influxdb-client installed?): {lines}"
    schema = {"buckets": {urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["bucket"][0]
                          for path, _ in influxdb.bodies},
              "measurements": set(), "tags": {}, "by_measurement": {}}
    for line in lines:
        series, fields, _timestamp = line.split(" ")
        measurement, *tags = series.split(",")
        schema["measurements"].add(measurement)
        written = schema["by_measurement"].setdefault(measurement, {"fields": set(), "tags": set()})
        written["fields"] |= {field.split("=")[0] for field in fields.split(",")}
        for tag in tags:
            name, value = tag.split("=")
            schema["tags"].setdefault(name, set()).add(value)
            written["tags"].add(name)
    return schema


def test_flux_queries_name_only_the_bucket_measurement_fields_and_tags_the_service_writes(make_app):
    schema = written_schema(make_app)
    assert schema["buckets"] == {payment_api.Settings().influxdb_bucket}
    board = dashboard()
    flux = panel_queries(board, "influxdb") + annotation_queries(board, "influxdb")
    assert len(flux) >= 4
    builtin_columns = {"_measurement", "_field", "_value", "_time", "_start", "_stop"}
    for where, target in flux:
        query = target["query"]
        assert set(re.findall(r'from\(\s*bucket:\s*"([^"]*)"\s*\)', query)) == schema["buckets"], where
        assert query.count("from(") == 1, where
        measurements = re.findall(r'r\._measurement\s*==\s*"([^"]*)"', query)
        assert measurements and set(measurements) <= schema["measurements"], (where, measurements)
        # A tag or field counts only if the measurement the query reads has it: a refund has no status tag.
        written = [schema["by_measurement"][measurement] for measurement in measurements]
        written_fields = set().union(*(each["fields"] for each in written))
        written_tags = set().union(*(each["tags"] for each in written))
        fields = re.findall(r'r\._field\s*==\s*"([^"]*)"', query)
        assert fields and set(fields) <= written_fields, (where, fields)
        columns = set(re.findall(r"\br\.(\w+)", query)) - builtin_columns
        assert columns <= written_tags, (where, columns - written_tags)
        for tag, value in re.findall(r'\br\.(\w+)\s*==\s*"([^"]*)"', query):
            if tag not in builtin_columns:
                assert value in schema["tags"][tag], (where, tag, value)
        for listed in re.findall(r"columns:\s*\[([^\]]*)\]", query):
            names = set(re.findall(r'"([^"]*)"', listed))
            assert names <= written_tags | builtin_columns, (where, names)
        assert set(re.findall(r"\$\{(\w+)(?::\w+)?\}", query)) <= set(variables(board, None)), where
    # The $payment_type variable offers Prometheus `type` values; Flux filters the `payment_type` tag with them.
    assert schema["tags"]["payment_type"] <= set(payment_api.PAYMENT_TYPES)
    assert schema["tags"]["currency"] <= set(payment_api.Settings().currencies)


def test_every_panel_query_annotation_and_variable_uses_a_provisioned_datasource():
    board, types = dashboard(), provisioned_datasources()
    users = [(f"panel {panel['id']}", panel) for panel in all_panels(board["panels"])
             if panel["type"] not in ("row", "alertlist")]
    names = {source["name"]: source["type"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    alert_lists = [panel for panel in all_panels(board["panels"]) if panel["type"] == "alertlist"]
    assert alert_lists and all(names.get(panel["options"]["datasource"]) == "prometheus" for panel in alert_lists)
    users += [(f"panel {panel['id']} target {target['refId']}", target)
              for panel in all_panels(board["panels"]) for target in panel.get("targets", [])]
    users += [(f"annotation {item['name']}", item) for item in board["annotations"]["list"] if not item.get("builtIn")]
    users += [(f"variable {item['name']}", item) for item in board["templating"]["list"] if "datasource" in item]
    for where, user in users:
        source = user["datasource"]
        assert source["uid"] in types, f"{where}: unknown datasource uid {source['uid']!r}"
        assert source["type"] == types[source["uid"]], f"{where}: {source} is provisioned as {types[source['uid']]}"


def test_panels_have_unique_ids_fit_the_grid_and_do_not_overlap():
    board = dashboard()
    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))

    def layout(group):
        boxes = [(panel["id"], panel["gridPos"]) for panel in group]
        for panel_id, box in boxes:
            assert box["x"] >= 0 and box["y"] >= 0 and box["w"] > 0 and box["h"] > 0 and box["x"] + box["w"] <= 24, (
                panel_id, box)
        for number, (first_id, a) in enumerate(boxes):
            for second_id, b in boxes[number + 1:]:
                apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                         or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
                assert apart, f"panels {first_id} and {second_id} overlap: {a} {b}"

    layout(board["panels"])
    for row in board["panels"]:
        if row.get("panels"):  # a collapsed row keeps its panels inside, laid out for when it opens
            layout(row["panels"])

# ---------------------------------------------------------------- A. incidents (after the dashboard, which wants calm)


def test_error_spike_fires_high_payment_error_rate_and_it_resolves_after_stop(stack):
    fired = run_incident(stack, "error_spike", "HighPaymentErrorRate",
                         quiet=("PaymentServiceUnavailable", "HighPaymentLatencyP95", "HighPaymentDeclineRate"))
    assert_fired_as_shipped(fired, "HighPaymentErrorRate")
    assert float(fired["value"]) > 0.05


def test_latency_degradation_fires_high_payment_latency_p95_and_it_resolves_after_stop(stack):
    fired = run_incident(stack, "latency_degradation", "HighPaymentLatencyP95",
                         quiet=("HighPaymentErrorRate", "PaymentServiceUnavailable", "HighPaymentDeclineRate"))
    assert_fired_as_shipped(fired, "HighPaymentLatencyP95")
    assert float(fired["value"]) > 0.5


def test_outage_fires_payment_service_unavailable_not_the_error_rate_alert_and_it_resolves(stack):
    fired = run_incident(stack, "outage", "PaymentServiceUnavailable",
                         quiet=("HighPaymentErrorRate", "HighPaymentLatencyP95", "HighPaymentDeclineRate"))
    assert_fired_as_shipped(fired, "PaymentServiceUnavailable")
    assert float(fired["value"]) > 0.05


def test_decline_wave_fires_high_payment_decline_rate_not_the_error_or_slo_alerts_and_it_resolves(stack):
    fired = run_incident(stack, "decline_wave", "HighPaymentDeclineRate",
                         quiet=("HighPaymentErrorRate", "PaymentServiceUnavailable", "PaymentAvailabilitySLOBurn",
                                "HighPaymentLatencyP95"))
    assert_fired_as_shipped(fired, "HighPaymentDeclineRate")
    assert 0.05 < float(fired["value"]) < 0.3  # the wave, filling the window, heads for 22 % (30 % of card payments)

# ---------------------------------------------------------------- C. compose file, .env.example, image


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def service_env_names():
    """Every environment variable payment_api.Settings reads, aliases included."""
    return {name for spec in dataclasses.fields(payment_api.Settings) if "env" in spec.metadata
            for name in (spec.metadata["env"], *spec.metadata["aliases"])}


def environment(service):
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def interpolations(text):
    """[(VAR, default)] for every ${VAR}, ${VAR:-default} and ${VAR-default} in `text` (default "" when none).

    Pass the text of parsed YAML (json.dumps) so that comments are left out, as compose and Grafana do.
    """
    return [(name, default) for name, default in re.findall(r"\$\{(\w+)(?::?-([^}]*))?\}", text)]


def env_example():
    return dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#"))


def dockerfile_instructions(name):
    """The arguments of every `name` instruction in the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def volumes(service):
    """{container path: host path or volume name} of a compose service."""
    return {target: source for source, target, *_ in (volume.split(":") for volume in service.get("volumes", []))}


def test_compose_passes_payment_api_only_variables_the_service_reads():
    """Settings' variables, plus the standard OTEL_* ones the service hands to the OpenTelemetry extra."""
    passed = {name for name in environment(compose()["services"]["payment-api"]) if not name.startswith("OTEL_")}
    assert passed and passed <= service_env_names(), passed - service_env_names()


def test_compose_defaults_for_payment_api_are_the_service_defaults():
    fields = {name: spec for spec in dataclasses.fields(payment_api.Settings) if "env" in spec.metadata
              for name in (spec.metadata["env"], *spec.metadata["aliases"])}
    fixed = {"SIMULATION_PROFILE": "diurnal", "SIMULATION_PERIOD": "86400",  # the history's shape
             "TRUSTED_PROXIES": "172.16.0.0/12",  # the gateway, on one of Docker's networks
             "PROMETHEUS_URL": "http://prometheus:9090"}  # students' checks ask the stack's Prometheus
    for name, value in environment(compose()["services"]["payment-api"]).items():
        if name.startswith("OTEL_"):  # the stack's tracing target, not a service default (tracing is off by default)
            continue
        if name in fixed:
            assert str(value) == fixed[name], name
            continue
        (_, default), = interpolations(str(value))
        assert fields[name].metadata["parse"](default) == fields[name].default, name


def test_every_compose_variable_is_in_env_example_with_the_same_default_and_every_example_is_used():
    example, used = env_example(), interpolations(json.dumps(compose()))
    for name, default in used:
        assert name in example, f"{name} is used by docker-compose.yml but missing from .env.example"
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose {default!r}"
    assert set(example) == {name for name, _ in used}


def test_compose_prometheus_scrapes_the_payment_api_service_on_its_container_port():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert volumes(prometheus)["/etc/prometheus"] == "./prometheus"
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = HERE / "prometheus" / Path(config_flag.split("=", 1)[1]).relative_to("/etc/prometheus")
    config = yaml.safe_load(config_path.read_text())
    assert all((config_path.parent / rule_file).is_file() for rule_file in config["rule_files"])
    job, = config["scrape_configs"]
    discovery, = job["dns_sd_configs"]  # every replica of the compose service, by DNS
    host, port = discovery["names"], str(discovery["port"])
    assert host == ["payment-api"] and host[0] in services
    published = [str(mapping).rsplit(":", 1)[1] for mapping in services["payment-api"]["ports"]]
    assert published == [port]
    assert dockerfile_instructions("EXPOSE") == [port]
    assert f"PORT={port}" in " ".join(dockerfile_instructions("ENV")).split()
    # The alerts select the scrape job by name: a renamed job would leave them blind.
    jobs = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    assert jobs == {job["job_name"]} == {
        yaml.safe_load((HERE / "prometheus" / "prometheus.local.yml").read_text())["scrape_configs"][0]["job_name"]}


def test_grafana_provisioning_paths_and_datasource_urls_match_the_compose_file():
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = volumes(grafana)
    provider, = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts.get(provider["options"]["path"]) == "./grafana/dashboards", (provider["options"]["path"], mounts)
    assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning", mounts
    home = Path(environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (HERE / mounts[str(home.parent)] / home.name).resolve() == DASHBOARD
    for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]:
        url = urllib.parse.urlsplit(source["url"])
        assert url.hostname in services, source["url"]
        assert any(str(mapping).endswith(f":{url.port}") for mapping in services[url.hostname]["ports"]), source["url"]
    for name, _ in interpolations(json.dumps(yaml.safe_load(DATASOURCES.read_text()))):
        assert name in environment(grafana), f"datasources.yml reads ${{{name}}}, which grafana is not given"


def test_services_waited_for_as_healthy_have_a_health_check():
    services = compose()["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                has_check = "healthcheck" in services[dependency] or (
                    "build" in services[dependency] and dockerfile_instructions("HEALTHCHECK"))
                assert has_check, f"{name} waits for {dependency} to be healthy, which has no health check"


def test_hadolint_accepts_the_dockerfile():
    hadolint = require_binary("hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

# ---------------------------------------------------------------- C. the classroom preset (docs/class-guide.md)

CLASSROOM = HERE / "docker-compose.classroom.yml"
CLASS_GUIDE = HERE / "docs" / "class-guide.md"
CLASSROOM_SECRETS = {"ADMIN_TOKEN": "trainer-token-for-the-test",
                     "CLASSROOM_GRAFANA_PASSWORD": "trainer-password-for-the-test"}


def rendered_compose(tmp_path, env_lines):
    """docker-compose's own rendering with `env_lines` as the .env file, run from the repository root as a trainer
    runs it: no -f, so COMPOSE_FILE in those lines chooses the files. (returncode, config or None, stderr)."""
    docker_compose = require_binary("docker-compose")
    env_file = tmp_path / f"env-{len(list(tmp_path.iterdir()))}"
    env_file.write_text("\n".join(env_lines) + "\n")
    names = ("COMPOSE_", "PAYMENT_", "GRAFANA_", "INFLUXDB_", "CLASSROOM_", "ADMIN_TOKEN", "BACKFILL_", "LOG_", "OTEL_")
    clean = {key: value for key, value in os.environ.items() if not key.startswith(names)}
    result = subprocess.run([docker_compose, "--env-file", str(env_file), "config"],
                            capture_output=True, text=True, timeout=60, cwd=HERE, env=clean)
    return result.returncode, (yaml.safe_load(result.stdout) if result.returncode == 0 else None), result.stderr


def unordered(value):
    """A rendered setting with its list items in a fixed order."""
    return sorted(map(json.dumps, value)) if isinstance(value, list) else value


def classroom_switch():
    """The COMPOSE_FILE line the class guide tells the trainer to put in .env."""
    lines = re.findall(r"^COMPOSE_FILE=\S+$", CLASS_GUIDE.read_text(), re.M)
    assert lines and len(set(lines)) == 1, lines
    return lines[0]


def test_the_classroom_switch_names_the_compose_file_and_the_preset_and_the_guide_says_how():
    files = classroom_switch().split("=", 1)[1].split(":")
    assert files == [COMPOSE.name, CLASSROOM.name]
    assert all((HERE / name).is_file() for name in files)
    for secret in CLASSROOM_SECRETS:
        assert re.search(rf"^{secret}=", CLASS_GUIDE.read_text(), re.M), f"the class guide does not show {secret}="


def test_classroom_preset_sets_the_trainer_secrets_student_sign_up_and_read_only_provisioning(tmp_path):
    """A trainer who copied .env.example (Grafana's password `admin` in it) and added the switch and the two secrets."""
    example = ENV_EXAMPLE.read_text().splitlines()
    secrets = [f"{name}={value}" for name, value in CLASSROOM_SECRETS.items()]
    code, preset, stderr = rendered_compose(tmp_path, [*example, classroom_switch(), *secrets])
    assert code == 0, stderr
    code, default, stderr = rendered_compose(tmp_path, [*example, *secrets])
    assert code == 0, stderr
    services = preset["services"]

    # Incidents and the simulator need the trainer's token.
    assert services["payment-api"]["environment"]["ADMIN_TOKEN"] == CLASSROOM_SECRETS["ADMIN_TOKEN"]

    # Grafana: the trainer's admin password, not .env.example's `admin`; students sign themselves up as Editors of
    # the organization that holds the provisioned dashboard and data sources; nothing more.
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == CLASSROOM_SECRETS["CLASSROOM_GRAFANA_PASSWORD"] != "admin"
    assert default["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    provider, = yaml.safe_load((HERE / "grafana" / "classroom" / "dashboards.yml").read_text())["providers"]
    organizations = {provider["orgId"]} | {source.get("orgId", 1)
                                           for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert organizations == {int(grafana["GF_USERS_AUTO_ASSIGN_ORG_ID"])}
    assert {key: grafana[key] for key in grafana if key.startswith(("GF_USERS_", "GF_AUTH_"))} == {
        "GF_USERS_ALLOW_SIGN_UP": "true", "GF_USERS_VERIFY_EMAIL_ENABLED": "false", "GF_USERS_AUTO_ASSIGN_ORG": "true",
        "GF_USERS_AUTO_ASSIGN_ORG_ID": "1", "GF_USERS_AUTO_ASSIGN_ORG_ROLE": "Editor",
        "GF_USERS_ALLOW_ORG_CREATE": "false", "GF_USERS_EDITORS_CAN_ADMIN": "false", "GF_AUTH_ANONYMOUS_ENABLED": "false"}

    # The provisioned dashboard cannot be saved from the UI: the classroom provider is mounted over the default one
    # and differs from it in allowUiUpdates alone. The provisioned data sources are read-only (no `editable: true`).
    default_volumes = set(default["services"]["grafana"]["volumes"])
    added = set(services["grafana"]["volumes"]) - default_volumes
    assert added == {f"{HERE}/grafana/classroom/dashboards.yml:/etc/grafana/provisioning/dashboards/dashboards.yml:ro"}
    mounted_over = f"{HERE}/grafana/provisioning:/etc/grafana/provisioning:ro"
    assert mounted_over in default_volumes and (HERE / "grafana/provisioning/dashboards/dashboards.yml").is_file()
    default_provider, = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["allowUiUpdates"] is False and provider["disableDeletion"] is True
    assert {**default_provider, "allowUiUpdates": False} == provider
    assert not [source["name"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]
                if source.get("editable", False)]

    # Prometheus: the same command, without the lifecycle API (POST /-/quit, /-/reload).
    default_command = default["services"]["prometheus"]["command"]
    assert "--web.enable-lifecycle" in default_command
    assert services["prometheus"]["command"] == [arg for arg in default_command if arg != "--web.enable-lifecycle"]

    # Nothing else changes: the same services, ports, images and, but for the above, the same settings.
    assert services.keys() == default["services"].keys()
    changed = {"payment-api": {"environment"}, "grafana": {"environment", "volumes"}, "prometheus": {"command"}}
    for name, service in services.items():
        for key in service.keys() | default["services"][name].keys():
            if key not in changed.get(name, ()):  # docker-compose may list volumes in another order
                assert unordered(service.get(key)) == unordered(default["services"][name].get(key)), (name, key)
    overridden = yaml.safe_load(CLASSROOM.read_text())["services"]
    for name in ("payment-api", "grafana"):
        keys = overridden[name]["environment"].keys()
        before = default["services"][name]["environment"]
        after = services[name]["environment"]
        assert {key: before[key] for key in before if key not in keys} == {
            key: after[key] for key in before if key not in keys}


@pytest.mark.parametrize("missing", sorted(CLASSROOM_SECRETS))
def test_classroom_preset_refuses_to_start_without_a_secret_of_the_trainer(tmp_path, missing):
    """.env.example's empty ADMIN_TOKEN and its Grafana password `admin` do not satisfy the preset."""
    secrets = [f"{name}={value}" for name, value in CLASSROOM_SECRETS.items() if name != missing]
    code, _, stderr = rendered_compose(tmp_path, [*ENV_EXAMPLE.read_text().splitlines(), classroom_switch(), *secrets])
    assert code != 0
    assert f"the classroom preset needs {missing} in .env" in stderr
