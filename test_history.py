"""History on demand (`python payment_api.py backfill`), proved with the real promtool, Prometheus and victoria-metrics.

One day of history (5 payments/s, diurnal, incidents) is written once for the module, to a file that promtool turns
into blocks and to victoria-metrics through influxdb-client; a Prometheus started on those blocks answers the
queries. The end is a fixed past time, so every run checks the same history.
"""
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

import history
import payment_api
from conftest import (Prometheus, RecordingInfluxDB, ServerProcess, VictoriaMetrics, eventually, free_port,
                      require_binary)
from test_stack import (ALERTS, ENV_EXAMPLE, SEED_QUERIES, compose, dashboard, environment, grafana_value,
                        interpolate, interpolations, panel_queries, rules_of, shipped_alert,
                        variable_label_query, variables)

HERE = Path(__file__).resolve().parent
END = "2026-11-20T06:00:00Z"  # a past time: the same history in every run
END_SECONDS = int(datetime(2026, 11, 20, 6, tzinfo=timezone.utc).timestamp())
START_SECONDS = END_SECONDS - 86400
MIDNIGHT = END_SECONDS - 6 * 3600  # 2026-11-20T00:00:00Z, inside the history
SEED = 7
ALERT_OF_INCIDENT = {"error_spike": "HighPaymentErrorRate", "currency_outage": "HighPaymentErrorRate",
                     "latency_degradation": "HighPaymentLatencyP95", "outage": "PaymentServiceUnavailable",
                     "decline_wave": "HighPaymentDeclineRate"}


def backfill(*args, env=None, check=True, timeout=120):
    """Run `python payment_api.py backfill ARGS` as a trainer would; the finished process."""
    result = subprocess.run([sys.executable, "payment_api.py", "backfill", *args], cwd=HERE, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_backfill_as_a_terminal_would(*args, env=None):
    """`payment_api.py backfill ARGS` in a process group of its own, with no signal ignored (as a shell that
    runs pytest in the background would have it), stderr piped."""
    with history.stop_signals_set_to(signal.SIG_DFL):
        return subprocess.Popen([sys.executable, "payment_api.py", "backfill", *args], cwd=HERE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})


def end_group(process):
    with contextlib.suppress(ProcessLookupError):  # nothing left of it, as it should be
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def is_worker(pid):
    """True while `pid` is a running backfill worker (Linux: /proc; a zombie's command line is empty)."""
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return False


def worker_pids(process):
    """The pids of the backfill's worker processes."""
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            if is_worker(pid)]


def stopped_line(signal_number):
    """All an interrupted backfill says on stderr: one line, no traceback."""
    return f"{history.PROG}: stopped by {signal.Signals(signal_number).name} before the history was complete\n"


PROMTOOL_BLOCKS = "--max-block-duration=87600h"  # one block: promtool reads the file once more per block


def create_blocks(openmetrics, data_dir):
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", PROMTOOL_BLOCKS,
                             str(openmetrics), str(data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([block for block in Path(data_dir).iterdir() if (block / "meta.json").exists()]) == 1
    return result


def closing_counts(output):
    """(payments, refunds) of the backfill's closing line."""
    match = re.search(r"^(\d+) payments and (\d+) refunds in", output, re.MULTILINE)
    return int(match[1]), int(match[2])


def listed_incidents(output):
    return [(history.parse_end(start), history.parse_end(end), scenario)
            for start, end, scenario in re.findall(r"^incident (\S+) (\S+) (\w+)$", output, re.MULTILINE)]


class PastPrometheus(ServerProcess):
    """A real Prometheus that scrapes nothing and serves the blocks in `data_dir`."""

    def __init__(self, tmp_path, data_dir):
        port = free_port()
        config = tmp_path / "empty-prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "15s"}}))
        super().__init__([require_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                         port, tmp_path, "prometheus-past", "/-/ready")

    def at(self, promql, moment):
        """The result of an instant query at `moment` (epoch seconds)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": moment})
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["result"]

    def by(self, label, promql, moment):
        return {row["metric"].get(label): float(row["value"][1]) for row in self.at(promql, moment)}


class History:
    def __init__(self, output, prometheus, victoria_metrics):
        self.output, self.prometheus, self.victoria_metrics = output, prometheus, victoria_metrics
        self.incidents = listed_incidents(output)


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """One day of history in a file -> promtool -> Prometheus, and in victoria-metrics through --influxdb."""
    folder = tmp_path_factory.mktemp("history")
    victoria_metrics = VictoriaMetrics(folder)
    victoria_metrics.args.append("-retentionPeriod=100y")  # the history's fixed end gets older every day
    prometheus = PastPrometheus(folder, folder / "blocks")
    try:
        victoria_metrics.start()
        result = backfill("--days", "1", "--end", END, "--seed", str(SEED), "--openmetrics", str(folder / "day.om"),
                          "--influxdb", env={"INFLUXDB_URL": victoria_metrics.url, "SIMULATION_RATE": "5"})
        create_blocks(folder / "day.om", folder / "blocks")
        prometheus.start()
        yield History(result.stdout, prometheus, victoria_metrics)
    finally:
        prometheus.stop()
        victoria_metrics.stop()

# ---------------------------------------------------------------- Prometheus: the metrics over the whole day


def test_the_history_carries_the_scrape_labels_of_the_shipped_prometheus_configs(day):
    local_job, = yaml.safe_load((HERE / "prometheus" / "prometheus.local.yml").read_text())["scrape_configs"]
    group, = local_job["static_configs"]
    expected = {"job": local_job["job_name"], "instance": group["targets"][0], **group["labels"]}
    assert {"job": history.DEFAULT_JOB, "instance": history.DEFAULT_INSTANCE,
            **history.parse_labels(history.DEFAULT_LABELS)} == expected
    compose_job, = yaml.safe_load((HERE / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    constants = {rule["target_label"]: rule["replacement"] for rule in compose_job.get("relabel_configs", [])
                 if "source_labels" not in rule}
    static = {name: value for group in compose_job.get("static_configs", []) for name, value in
              group.get("labels", {}).items()}
    assert compose_job["job_name"] == history.DEFAULT_JOB and {**static, **constants} == group["labels"]
    for row in day.prometheus.at('{__name__=~"payment_.*|active_payments|up"}', END_SECONDS):
        assert expected.items() <= row["metric"].items(), row["metric"]


def test_every_live_metric_has_its_live_name_type_and_labels(day):
    live = payment_api.PaymentMetrics(("USD", "EUR", "GBP"), payment_api.PaymentStats(("USD",), lambda: 0),
                                      payment_api.ScenarioBoard(payment_api.Settings(), lambda: 0))
    live_samples = {}
    for family in live.registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                live_samples.setdefault(sample.name, set()).add(frozenset(sample.labels))
    wanted = ("payment_requests_total", "payment_amount_bucket", "payment_amount_sum", "payment_amount_count",
              "payment_duration_seconds_bucket", "payment_duration_seconds_sum", "payment_duration_seconds_count",
              "payment_refunds_total", "payment_refund_amount_bucket", "payment_refund_amount_sum",
              "payment_refund_amount_count", "payment_daily_revenue", "payment_failure_rate", "active_payments",
              "payment_scenario_active", "payment_simulation_rate")
    target = {"job", "instance", "service", "environment"}
    for name in wanted:
        rows = day.prometheus.at(name, END_SECONDS)
        assert rows, name
        history_labels = {frozenset(row["metric"]) - target - {"__name__"} for row in rows}
        if name in live_samples:  # histograms without observations have no live samples yet
            assert history_labels == live_samples[name], name
    assert day.prometheus.by("job", "up", END_SECONDS) == {"payment-api": 1.0}


def test_counters_only_rise_over_the_whole_day(day):
    for name in ("payment_requests_total", "payment_amount_count", "payment_duration_seconds_bucket",
                 "payment_refunds_total", "payment_refund_amount_bucket"):
        drops = day.prometheus.at(f"sum(resets({name}[1d]))", END_SECONDS)
        assert float(drops[0]["value"][1]) == 0, name
    samples = day.prometheus.at("count_over_time(up[1d])", END_SECONDS)
    assert float(samples[0]["value"][1]) == 86400 / history.DEFAULT_STEP + 1  # every minute, ends included


def past_instants(day):
    """A night, a morning, just after midnight, midday-ish and the last minute: not only 'now'."""
    return [START_SECONDS + 3600, START_SECONDS + 6 * 3600, MIDNIGHT + 600, MIDNIGHT + 4 * 3600, END_SECONDS]


def variable_values(day, variable):
    """The values a dashboard variable offers over the history: its label's values, filtered by its regex."""
    metric, label = variable_label_query(variable)
    url = day.prometheus.url + f"/api/v1/label/{label}/values?" + urllib.parse.urlencode(
        {"match[]": metric, "start": START_SECONDS, "end": END_SECONDS})
    with urllib.request.urlopen(url, timeout=10) as response:
        values = json.load(response)["data"]
    keep = re.compile(re.fullmatch(r"/(.*)/\w*", variable.get("regex") or "/.*/")[1])
    return sorted(value for value in values if keep.search(value))


def test_seed_queries_and_every_dashboard_query_answer_at_several_past_instants(day):
    board = dashboard()
    offered = {name: variable_values(day, variable) for name, variable in variables(board).items()}
    assert all(offered.values()), offered
    every = {name: grafana_value(values) for name, values in offered.items()}
    one = {name: grafana_value(values[:1]) for name, values in offered.items()}
    queries = list(SEED_QUERIES) + [interpolate(target["expr"], selection, window="5m")
                                    for _, target in panel_queries(board, "prometheus") for selection in (every, one)]
    assert len(queries) > 20
    for moment in past_instants(day):
        for query in queries:
            result = day.prometheus.at(query, moment)
            assert result, f"{query} at {history.iso(moment)}: no data"
            assert any(math.isfinite(float(row["value"][1])) for row in result), (query, moment, result)


def test_rates_have_data_at_every_step_of_a_whole_day_view(day):
    url = day.prometheus.url + "/api/v1/query_range?" + urllib.parse.urlencode({
        "query": "sum(rate(payment_requests_total[5m]))", "start": START_SECONDS + 300, "end": END_SECONDS,
        "step": 300})
    with urllib.request.urlopen(url, timeout=10) as response:
        (series,) = json.load(response)["data"]["result"]
    assert len(series["values"]) == (86400 - 300) // 300 + 1


def test_daily_revenue_drops_to_zero_at_a_past_utc_midnight(day):
    before = day.prometheus.by("currency", "payment_daily_revenue", MIDNIGHT - 60)
    at_midnight = day.prometheus.by("currency", "payment_daily_revenue", MIDNIGHT)
    later = day.prometheus.by("currency", "payment_daily_revenue", MIDNIGHT + 3600)
    currencies = set(payment_api.Settings().currencies)
    assert set(before) == set(at_midnight) == set(later) == currencies
    assert all(before[currency] > 1000 for currency in currencies), before
    assert all(value == 0 for value in at_midnight.values()), at_midnight
    assert all(0 < later[currency] < before[currency] for currency in currencies), (later, before)


def test_hour_by_hour_payment_count_follows_the_day_busiest_at_least_three_times_the_quietest(day):
    hours = range(START_SECONDS + 3600, END_SECONDS + 1, 3600)
    counts = [float(day.prometheus.at("sum(increase(payment_requests_total[1h]))", hour)[0]["value"][1])
              for hour in hours]
    assert max(counts) >= 3 * min(counts), counts
    busiest_hour = datetime.fromtimestamp(hours[counts.index(max(counts))] - 1800, timezone.utc).hour
    assert 9 <= busiest_hour <= 15, counts  # the diurnal profile peaks at 12:00 UTC


def test_past_incidents_are_listed_and_marked_and_the_shipped_alerts_see_only_them(day):
    assert day.incidents, day.output
    annotation = dashboard()["annotations"]["list"][1]["expr"]
    for start, end, scenario in day.incidents:
        assert START_SECONDS <= start < end <= END_SECONDS
        middle = (start + end) // 2
        assert [row["metric"]["scenario"] for row in day.prometheus.at(annotation, middle)] == [scenario]
        alert = ALERT_OF_INCIDENT[scenario]
        assert day.prometheus.at(shipped_alert(alert)["expr"], end), f"{alert} not true at the end of {scenario}"
        if scenario == "outage":
            fast_burn = shipped_alert("PaymentAvailabilitySLOBurn")["expr"]
            assert day.prometheus.at(fast_burn, end), "the SLO fast-burn alert misses the outage"
        for outside in (start - 1800, end + 1800):
            if START_SECONDS + 300 <= outside <= END_SECONDS:
                for rule in rules_of(ALERTS):  # the incident alerts and all the others
                    assert not day.prometheus.at(rule["expr"], outside), (rule["alert"], scenario, outside)
                assert day.prometheus.at(annotation, outside) == []


def test_no_incidents_means_no_scenario_and_no_incident_line(tmp_path):
    result = backfill("--days", "0.5", "--end", END, "--no-incidents", "--rate", "0.2", "--openmetrics",
                      str(tmp_path / "quiet.om"))
    assert "incident " not in result.stdout and "0 incidents" in result.stdout
    assert not re.search(r"^payment_scenario_active\{.*\} 1 ", (tmp_path / "quiet.om").read_text(), re.MULTILINE)

# ---------------------------------------------------------------- InfluxDB: the same payments


def test_influxdb_gets_one_point_a_payment_and_one_a_refund(day):
    payments, refunds = closing_counts(day.output)
    assert f"{payments + refunds} points written, 0 not written" in day.output


def test_refunds_are_the_live_share_of_completed_payments(day):
    refunds = "sum(increase(payment_refunds_total[1d]))"
    completed = 'sum(increase(payment_requests_total{status="200"}[1d]))'
    share = float(day.prometheus.at(f"{refunds} / {completed}", END_SECONDS)[0]["value"][1])
    assert abs(share - payment_api.REFUND_SHARE) < 0.1 * payment_api.REFUND_SHARE, share


@pytest.mark.parametrize("counter, measurement", [("payment_requests_total", "payment_amount"),
                                                  ("payment_refunds_total", "refund_amount")])
def test_influxdb_holds_as_many_points_per_day_and_currency_as_prometheus_counted(day, counter, measurement):
    urllib.request.urlopen(day.victoria_metrics.url + "/internal/force_flush", timeout=10).read()
    for first, last in ((START_SECONDS, MIDNIGHT), (MIDNIGHT, END_SECONDS)):
        totals = f"sum by (currency) ({counter})"
        at_last, at_first = day.prometheus.by("currency", totals, last), day.prometheus.by("currency", totals, first)
        counted = {currency: at_last[currency] - at_first.get(currency, 0) for currency in at_last}
        url = day.victoria_metrics.url + "/api/v1/query?" + urllib.parse.urlencode({
            "query": f"sum by (currency) (count_over_time({measurement}[{last - first}s]))", "time": last,
            "nocache": 1})
        with urllib.request.urlopen(url, timeout=10) as response:
            rows = json.load(response)["data"]["result"]
        points = {row["metric"]["currency"]: float(row["value"][1]) for row in rows}
        assert points == counted and min(counted.values()) > 100, (history.iso(first), history.iso(last), counted)
        increase = day.prometheus.by("currency", f"sum by (currency) (increase({counter}[{last - first}s]))", last)
        assert all(abs(increase[c] - counted[c]) <= 0.01 * counted[c] for c in counted), (increase, counted)


def point(line):
    """((measurement, tag names, field names), {tag: value}, {field: number}, seconds) of a line-protocol point."""
    series, fields, timestamp = line.split(" ")
    measurement, *tags = series.split(",")
    tags = dict(tag.split("=") for tag in tags)
    fields = {name: float(value) for name, value in (field.split("=") for field in fields.split(","))}
    return (measurement, tuple(tags), tuple(fields)), tags, fields, int(timestamp) / 1e9


def test_points_are_written_like_the_live_export_and_a_second_run_writes_the_same_points(tmp_path):
    runs = []
    for _ in range(2):
        with RecordingInfluxDB() as influxdb:
            backfill("--days", "0.01", "--end", END, "--influxdb", env={"INFLUXDB_URL": influxdb.url,
                                                                         "INSTANCE": "replica-1"})
        runs.append(influxdb.lines())
    assert runs[0] == runs[1] and len(runs[0]) > 100
    request = payment_api.draw_request(random.Random(0), ("USD",))
    payment = payment_api.Payment("pay_1", request, "simulator", 0.1, 200, END_SECONDS - 900)
    refund = payment_api.Refund("re_1", "pay_1", request.amount, "USD", "simulator", END_SECONDS - 600)
    live_shapes = {point(payment_api.payment_line(payment, "replica-1"))[0],
                   point(payment_api.refund_line(refund, payment, "replica-1"))[0]}
    points = [point(line) for line in runs[0]]
    assert {shape for shape, _, _, _ in points} == live_shapes
    for _, tags, _, timestamp in points:
        assert tags["instance"] == "replica-1" and END_SECONDS - 900 <= timestamp <= END_SECONDS
    completed = [(tags, fields, timestamp) for (measurement, *_), tags, fields, timestamp in points
                 if measurement == "payment" and tags["status"] == "success"]
    refunds = [(tags, fields, timestamp) for (measurement, *_), tags, fields, timestamp in points
               if measurement == "refund"]
    assert len(refunds) > 0.005 * len(completed), (len(refunds), len(completed))
    full = 0
    for tags, fields, timestamp in refunds:  # each refunds part or all of a payment completed minutes before
        paid = [paid_fields["amount"] for paid_tags, paid_fields, completed_at in completed
                if tags.items() <= paid_tags.items() and fields["amount"] <= paid_fields["amount"]
                and payment_api.REFUND_AFTER[0] <= timestamp - completed_at <= payment_api.REFUND_AFTER[1]]
        assert paid, (tags, fields, timestamp)
        full += fields["amount"] in paid
    assert 0 < full < len(refunds)  # full and partial refunds alike


def test_influxdb_unreachable_for_a_while_is_retried_and_nothing_is_lost(tmp_path):
    with RecordingInfluxDB() as influxdb:
        influxdb.refusing = True
        process = subprocess.Popen([sys.executable, "payment_api.py", "backfill", "--days", "0.01", "--end", END,
                                    "--influxdb"], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "INFLUXDB_URL": influxdb.url})
        try:
            eventually(lambda: influxdb.refused >= 2, timeout=30, message="two refused writes")
            influxdb.refusing = False
            output, _ = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0, output
    written = int(re.search(r"(\d+) points written, 0 not written", output)[1])
    assert written == len(influxdb.lines()) > 100


def test_sigterm_while_influxdb_is_retried_stops_within_docker_stops_grace_period():
    with RecordingInfluxDB() as influxdb:
        influxdb.refusing = True
        process = start_backfill_as_a_terminal_would("--days", "0.5", "--end", END, "--influxdb",
                                                     env={"INFLUXDB_URL": influxdb.url})
        try:
            eventually(lambda: influxdb.refused >= 1, timeout=30, message="a refused write")
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=10)  # it does not wait for the retries (up to 2 minutes)
        finally:
            end_group(process)
    assert (process.returncode, errors) == (143, stopped_line(signal.SIGTERM))


def test_points_influxdb_rejects_are_counted_and_the_command_fails():
    with RecordingInfluxDB() as server:
        server.error_status = 400  # a Bad Request, which influxdb-client does not retry
        result = backfill("--days", "0.01", "--end", END, "--influxdb", env={"INFLUXDB_URL": server.url}, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    not_written = int(re.search(r"0 points written, (\d+) not written", result.stdout)[1])
    assert not_written == sum(closing_counts(result.stdout)) > 0
    assert "rejected by the test" in result.stdout

def test_influxdb_down_for_good_costs_one_batch_of_retries_then_everything_is_counted(monkeypatch, capsys):
    monkeypatch.setitem(history.INFLUXDB_RETRIES, "retry_interval", 50)  # the live export's retries, shortened
    monkeypatch.setitem(history.INFLUXDB_RETRIES, "max_retries", 2)
    monkeypatch.setenv("INFLUXDB_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert history.main(["--days", "0.02", "--end", END, "--rate", "20", "--jobs", "1", "--influxdb"]) == 1
    output = capsys.readouterr().out
    payments, refunds = closing_counts(output)
    assert "retrying as the live export does" in output
    assert f"0 points written, {payments + refunds} not written (first error: " in output and payments > 10_000


def a_plan(currencies=("EUR", "USD", "GBP"), incidents=(), rate=5.0):
    """A Plan for draw_chunk, as backfill makes it, for the day before END."""
    settings = payment_api.Settings.load((), {"CURRENCIES": ",".join(currencies), "INSTANCE": "replica-1"})
    return history.Plan(settings=settings, seed=SEED, rate=rate, profile="diurnal", start=START_SECONDS,
                        end=END_SECONDS, step=60, chunk_seconds=history.chunk_seconds(rate, 60),
                        incidents=tuple(incidents), influx_instance=settings.instance, with_lines=True,
                        outcome_of_status=history.outcome_labels(settings))


def plain_request(rng, currencies):
    """A PaymentRequest drawn the plain way from payment_api's tables, as history.draw_request_fields draws it
    fast: a weighted currency; one weighted choice among the combinations of type, amount band and method (they are
    independent, so a combination weighs the product of their weights); a log-uniform amount in the band; a customer,
    returning or from the whole pool."""
    currency, = rng.choices(currencies, [payment_api.CURRENCY_WEIGHTS.get(code, 10) for code in currencies])
    combinations = list(itertools.product(zip(payment_api.PAYMENT_TYPES, payment_api.TYPE_WEIGHTS),
                                          payment_api.AMOUNT_BANDS,
                                          zip(payment_api.PAYMENT_METHODS, payment_api.METHOD_WEIGHTS)))
    weights = [type_weight * share * method_weight
               for (_, type_weight), (share, _, _), (_, method_weight) in combinations]
    ((payment_type, _), (_, low, high), (method, _)), = rng.choices(combinations, weights)
    amount = math.exp(math.log(low) + math.log(high / low) * rng.random())
    returning = rng.random() < payment_api.RETURNING_SHARE
    pool = payment_api.RETURNING_CUSTOMERS if returning else payment_api.CUSTOMER_POOL
    customer_id = payment_api.CUSTOMER_IDS[int(rng.random() * pool)]
    return payment_api.PaymentRequest(Decimal(f"{amount:.2f}"), currency, payment_type, customer_id, method)


def points_as_the_live_export_writes_them(plan, chunk_start):
    """The lines of draw_chunk's payments, drawn plainly (plain_request) and written only with payment_api's own
    PaymentRequest, Payment, Refund, payment_line and refund_line: the slow way draw_chunk must agree with."""
    rng = random.Random(f"payment-api history {plan.seed} {chunk_start}")
    refund_rng = random.Random(f"payment-api refunds {plan.seed} {chunk_start}")
    chunk_end = min(chunk_start + plan.chunk_seconds, plan.end)
    lines = []
    arrival = chunk_start + rng.expovariate(plan.rate_at(chunk_start, plan.effects_at(chunk_start)))
    while arrival < chunk_end:
        second = math.floor(arrival)  # the rate and the effects of the arrival's whole second
        effects = plan.effects_at(second)
        request = plain_request(rng, plan.settings.currencies)
        status, processing_time, _ = payment_api.draw_outcome(rng, request, plan.settings, effects)
        completed = arrival + processing_time
        if plan.start <= arrival and completed <= plan.end:
            payment = payment_api.Payment("", request, "history", processing_time, status, completed)
            lines.append(payment_api.payment_line(payment, plan.influx_instance))
            refund = status == 200 and payment_api.draw_refund(refund_rng, request.amount)
            if refund and completed + refund[0] <= plan.end:
                made = payment_api.Refund("", "", refund[1] or request.amount, request.currency, "history",
                                          completed + refund[0])
                lines.append(payment_api.refund_line(made, payment, plan.influx_instance))
        arrival += rng.expovariate(plan.rate_at(second, effects))
    return lines


@pytest.mark.parametrize("currencies", [("EUR", "USD", "GBP"), ("USD",), ("JPY", "EUR", "CHF", "USD", "GBP")])
def test_request_fields_are_the_requests_drawn_plainly_from_payment_apis_tables(currencies):
    drawn, mirrored = random.Random(SEED), random.Random(SEED)
    for _ in range(20_000):
        request = plain_request(drawn, currencies)
        fields = history.draw_request_fields(mirrored, currencies)
        assert fields == (float(request.amount), request.currency, request.type, request.customer_id,
                          request.method)
    assert drawn.getstate() == mirrored.getstate()


def test_the_history_draws_the_mix_of_the_live_simulator():
    """history.draw_request_fields and payment_api.draw_request use the random numbers differently, so they draw
    other payments; the shares of currencies, types, methods, amount bands and returning customers are the same,
    and so are the shares of one among the payments of another (knowing one tells nothing about the others)."""
    currencies = ("EUR", "USD", "GBP", "JPY")
    fast, live = random.Random(SEED), random.Random(SEED)
    history_draws = [history.draw_request_fields(fast, currencies) for _ in range(60_000)]
    live_draws = [(float(request.amount), request.currency, request.type, request.customer_id, request.method)
                  for request in (payment_api.draw_request(live, currencies) for _ in range(60_000))]

    def band(amount):
        return next(number for number, (_, _, high) in enumerate(payment_api.AMOUNT_BANDS) if amount <= high)

    def mix(draws):
        """{what: its share} of a list of draws."""
        counted = {}
        for amount, currency, payment_type, customer_id, method in draws:
            returning = customer_id in payment_api.CUSTOMER_IDS[:payment_api.RETURNING_CUSTOMERS]
            for what in (currency, payment_type, method, f"band {band(amount)}", f"returning {returning}",
                         f"{payment_type} by {method}", f"band {band(amount)} {payment_type}"):
                counted[what] = counted.get(what, 0) + 1
        return {what: count / len(draws) for what, count in counted.items()}

    expected = mix(live_draws)
    assert mix(history_draws) == pytest.approx(expected, abs=0.01)
    assert len(expected) == 4 + 3 + 3 + 3 + 2 + 9 + 9, sorted(expected)
    amounts = sorted(amount for amount, *_ in history_draws)
    assert amounts[0] >= 10 and amounts[-1] <= 6000


@pytest.mark.parametrize("scenario, chunk", [*((scenario, 10) for scenario in (None, *payment_api.SCENARIOS)),
                                             (None, 0), (None, -1)], ids=lambda value: str(value))
def test_points_are_the_lines_of_the_live_export_for_the_same_payments(scenario, chunk):
    """Chunk 0 begins before the history, the last one is cut short by its end."""
    plan = a_plan()
    chunk_start = history.chunk_starts(plan)[chunk]
    if scenario:  # the middle of the chunk: payments before, during and after it
        plan = a_plan(incidents=[history.Incident(scenario, chunk_start + 600, chunk_start + 1200)])
    _, bodies, payments, refunds = history.draw_chunk(plan, chunk_start)
    lines = b"\n".join(bodies).decode().split("\n")
    assert lines == points_as_the_live_export_writes_them(plan, chunk_start)
    assert len(lines) == payments + refunds and refunds > 0

# ---------------------------------------------------------------- the file: same seed, same bytes; atomic; flat


def test_the_same_seed_gives_byte_identical_files_whatever_the_number_of_workers(tmp_path):
    common = ("--days", "0.05", "--end", END, "--rate", "20")
    backfill(*common, "--jobs", "1", "--openmetrics", str(tmp_path / "one.om"))
    backfill(*common, "--jobs", "2", "--openmetrics", str(tmp_path / "two.om"))
    backfill(*common, "--seed", "99", "--openmetrics", str(tmp_path / "other.om"))
    assert (tmp_path / "one.om").read_bytes() == (tmp_path / "two.om").read_bytes()
    assert (tmp_path / "other.om").read_bytes() != (tmp_path / "one.om").read_bytes()
    assert (tmp_path / "one.om").read_text().endswith("# EOF\n")
    assert re.search(r"^payment_refunds_total\{.*\} [1-9]", (tmp_path / "one.om").read_text(), re.MULTILINE)


def test_history_py_run_on_its_own_is_the_backfill_command(tmp_path):
    """`payment_api.py backfill` hands over to `python history.py`, which runs from any folder, with workers."""
    common = ("--days", "0.02", "--end", END, "--rate", "20", "--jobs", "2")
    backfill(*common, "--openmetrics", str(tmp_path / "through.om"))
    alone = [sys.executable, str(HERE / "history.py"), *common]
    result = subprocess.run([*alone, "--openmetrics", "alone.om"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "alone.om").read_bytes() == (tmp_path / "through.om").read_bytes()
    refused = subprocess.run([*alone, "--step", "7"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (refused.returncode, refused.stderr) == (2, backfill("--step", "7", check=False).stderr)
    assert refused.stderr.startswith(f"{history.PROG}: argument --step: ") and refused.stderr.count("\n") == 1


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "through Python"])
def test_the_families_are_joined_whole_in_order_with_or_without_a_kernel_copy(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # as on a system without os.copy_file_range (macOS)
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    parts = [random.Random(number).randbytes(size) for number, size in enumerate((3 << 20, 0, 12_345))]
    for number, part in enumerate(parts):
        (tmp_path / f"part{number}").write_bytes(part)
    with open(tmp_path / "joined", "wb") as joined:
        for number in range(len(parts)):
            joined.write(f"# part {number}\n".encode())  # buffered writes before and after each copy
            with open(tmp_path / f"part{number}", "rb") as source:
                history.append_file(source, joined)
        joined.write(b"# EOF\n")
    expected = b"".join(f"# part {number}\n".encode() + part for number, part in enumerate(parts)) + b"# EOF\n"
    assert (tmp_path / "joined").read_bytes() == expected


@pytest.mark.parametrize("to_the_group", [False, True], ids=["to the command", "to its workers too"])
@pytest.mark.parametrize("signal_number", history.STOP_SIGNALS, ids=lambda number: signal.Signals(number).name)
def test_an_interrupted_run_stops_at_once_with_one_line_and_leaves_no_file_behind(tmp_path, signal_number,
                                                                                  to_the_group):
    target = tmp_path / "big.om"
    process = start_backfill_as_a_terminal_would("--days", "3", "--end", END, "--jobs", "2",
                                                 "--openmetrics", str(target))
    try:
        eventually(lambda: any(tmp_path.iterdir()), timeout=30, message="the backfill's temporary files")
        assert not target.exists()
        if to_the_group:  # as a terminal's Ctrl-C or SIGHUP, or `timeout`, sends it
            os.killpg(process.pid, signal_number)
        else:  # at once: the first moments after the first file appears included
            process.send_signal(signal_number)
        _, errors = process.communicate(timeout=30)
    finally:
        end_group(process)
    assert (process.returncode, errors) == (128 + signal_number, stopped_line(signal_number))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_worker_ends_the_run_with_one_line_and_a_killed_command_ends_its_workers(tmp_path):
    process = start_backfill_as_a_terminal_would("--days", "3", "--end", END, "--jobs", "2",
                                                 "--openmetrics", str(tmp_path / "one.om"))
    try:
        workers = eventually(lambda: len(worker_pids(process)) == 2 and worker_pids(process), timeout=30,
                             message="two workers")
        os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _, errors = process.communicate(timeout=30)
    finally:
        end_group(process)
    assert (process.returncode, errors) == (1, f"{history.PROG}: a worker process ended before it answered "
                                               "(killed, or out of memory?)\n")
    assert list(tmp_path.iterdir()) == []

    process = start_backfill_as_a_terminal_would("--days", "3", "--end", END, "--jobs", "2",
                                                 "--openmetrics", str(tmp_path / "two.om"))
    try:
        workers = eventually(lambda: len(worker_pids(process)) == 2 and worker_pids(process), timeout=30,
                             message="two workers")
        process.kill()  # nothing can clean up after a SIGKILL, but the workers must not outlive it
        process.wait(30)
        eventually(lambda: not any(map(is_worker, workers)), timeout=30, message="the workers gone")
    finally:
        end_group(process)


def interrupted_after(function):
    """`function`, then what the signal handler raises for a SIGTERM arriving the moment after it returns."""
    def call_then_interrupt(*args, **kwargs):
        function(*args, **kwargs)
        raise history.Interrupted(signal.SIGTERM)
    return call_then_interrupt


@pytest.mark.parametrize("owner, name", [(os, "mkdir"), (history.OpenMetricsWriter, "add_sample"),
                                         (history, "append_file"), (os, "replace")],
                         ids=["parts folder made", "a sample written", "a family joined", "file renamed"])
def test_an_interruption_at_any_step_leaves_only_a_complete_file(tmp_path, monkeypatch, capsys, owner, name):
    calls = []
    original = getattr(owner, name)

    def recorded(*args):
        calls.append(args)
        return original(*args)
    monkeypatch.setattr(owner, name, interrupted_after(recorded))
    target = tmp_path / "history.om"
    assert history.main(["--days", "0.01", "--end", END, "--jobs", "1", "--openmetrics", str(target)]) == 143
    assert len(calls) == 1
    if owner is os:  # the backfill's own call, not another one that happened to come first
        assert os.path.dirname(calls[0][0]) == str(tmp_path)
    assert capsys.readouterr().err == stopped_line(signal.SIGTERM)
    if name == "replace":  # the file was complete when the signal came
        assert [path.name for path in tmp_path.iterdir()] == ["history.om"]
        assert target.read_bytes().endswith(b"\n# EOF\n")
    else:
        assert list(tmp_path.iterdir()) == []


def peak_rss_kb(*args):
    process = subprocess.Popen([sys.executable, "payment_api.py", "backfill", *args], cwd=HERE,
                               stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    return usage.ru_maxrss


def test_memory_stays_flat_whatever_the_number_of_days(tmp_path):
    common = ("--rate", "0.2", "--jobs", "1", "--openmetrics", str(tmp_path / "flat.om"))
    short, long = peak_rss_kb("--days", "0.5", *common), peak_rss_kb("--days", "8", *common)
    assert long < short + 10_000, (short, long)

# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("args, env, option", [
    (["--days", "0"], {}, "--days"),
    (["--days", "400"], {}, "--days"),
    (["--days", "a week"], {}, "--days"),
    (["--end", "2999-01-01T00:00:00Z"], {}, "--end"),
    (["--end", "yesterday"], {}, "--end"),
    (["--rate", "0"], {}, "--rate"),
    (["--step", "7"], {}, "--step"),
    (["--labels", "service"], {}, "--labels"),
    (["--live-url", "http://127.0.0.1:9/", "--openmetrics", "x.om"], {}, "--live-url"),
    (["--live-url", "http://127.0.0.1:9/", "--end", END], {}, "--live-url"),
    (["--openmetrics", "/no/such/folder/history.om"], {}, "--openmetrics"),
    (["--influxdb"], {"INFLUXDB_URL": ""}, "--influxdb"),
    ([], {}, "--openmetrics"),
    (["--openmetrics", "x.om"], {"PAYMENT_FAILURE_RATE": "2"}, "PAYMENT_FAILURE_RATE"),
])
def test_a_bad_option_stops_with_one_line_naming_it_and_exit_2(args, env, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        sys.exit(history.main(args))
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and option in captured.err, captured.err
    assert list(tmp_path.iterdir()) == []


def test_influxdb_without_the_client_package_stops_with_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "influxdb_client", None)  # import fails as if it were not installed
    assert history.main(["--influxdb"]) == 2
    assert "--influxdb: the influxdb-client package is not installed" in capsys.readouterr().err

# ---------------------------------------------------------------- the seam with the live service


def test_rate_and_increase_across_the_seam_with_the_live_service_have_no_spike(make_app, tmp_path):
    rate = 40
    app_started = time.time()
    app = make_app(simulation_enabled=True, simulation_rate=rate, failure_rate=0.03, simulation_profile="steady")
    target = app.url.removeprefix("http://")
    result = backfill("--days", "0.02", "--live-url", app.url, "--rate", str(rate), "--profile", "steady",
                      "--no-incidents", "--job", "payment-api", "--labels", "",
                      "--openmetrics", str(tmp_path / "seam.om"))
    seam = history.parse_end(re.search(r" to (\S+):", result.stdout)[1])
    assert abs(seam - app_started) <= 1  # the history ends where the live service began
    create_blocks(tmp_path / "seam.om", tmp_path / "prom-data")
    prometheus = Prometheus(tmp_path, target).start()  # on the backfilled data folder, scraping the live app
    try:
        history_samples = int(0.02 * 86400) // history.DEFAULT_STEP + 1
        eventually(lambda: prometheus.query(f"count_over_time(up[1h]) > {history_samples + 20}"), timeout=60,
                   interval=0.5,
                   message="20 live scrapes after the history")
        one_series = 'payment_requests_total{status="200",type="standard",currency="EUR"}'
        assert len(prometheus.query(f"count_over_time({one_series}[1h])")) == 1  # history and live: one series
        assert float(prometheus.query(f"resets({one_series}[1h])")[0]["value"][1]) == 1  # the live restart
        url = prometheus.url + "/api/v1/query_range?" + urllib.parse.urlencode({
            "query": "sum(rate(payment_requests_total[5m]))", "start": seam - 600, "end": seam + 20, "step": 5})
        with urllib.request.urlopen(url, timeout=10) as response:
            (series,) = json.load(response)["data"]["result"]
        values = [float(value) for _, value in series["values"]]
        assert len(values) > 100 and 0.5 * rate < min(values) and max(values) < 1.5 * rate, (min(values), max(values))
        increase = float(prometheus.query("sum(increase(payment_requests_total[2m]))")[0]["value"][1])
        assert 0.5 * 120 * rate < increase < 1.5 * 120 * rate, increase
    finally:
        prometheus.stop()

# ---------------------------------------------------------------- docker compose


def test_compose_backfills_before_prometheus_starts_with_only_the_variables_the_tool_reads():
    services = compose()["services"]
    history_service, blocks = services["history"], services["prometheus-history"]
    assert blocks["image"] == services["prometheus"]["image"]  # the promtool of the Prometheus that reads the blocks
    assert services["prometheus"]["depends_on"]["prometheus-history"] == {"condition": "service_completed_successfully"}
    assert blocks["depends_on"]["history"] == {"condition": "service_completed_successfully"}
    assert history_service["depends_on"]["payment-api"] == {"condition": "service_healthy"}  # --live-url needs it
    readable = {name for spec in payment_api.dataclasses.fields(payment_api.Settings) if "env" in spec.metadata
                for name in (spec.metadata["env"], *spec.metadata["aliases"])} | {"BACKFILL_DAYS"}
    passed = environment(history_service)
    assert set(passed) <= readable, set(passed) - readable
    live = environment(services["payment-api"])
    assert all(passed[name] == live[name] for name in passed if name in live)  # the same InfluxDB and rate
    (name, default), = interpolations(str(passed["BACKFILL_DAYS"]))
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert name == "BACKFILL_DAYS" and example[name] == default == "7"
    retention = next(arg for arg in services["prometheus"]["command"]
                     if arg.startswith("--storage.tsdb.retention.time"))
    assert int(retention.split("=")[1].removesuffix("d")) > history.MAX_DAYS


def test_trainers_make_blocks_with_the_promtool_command_the_tests_run():
    docs = "".join(path.read_text() for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))])
    documented = re.findall(r"promtool tsdb create-blocks-from openmetrics (\S+)", docs)
    in_compose = re.findall(r"promtool tsdb create-blocks-from openmetrics (\S+)",
                            compose()["services"]["prometheus-history"]["command"][0])
    assert documented == in_compose == [PROMTOOL_BLOCKS]


def compose_script(service, tmp_path, live_url):
    """The shell command of a one-shot compose service, runnable here: volumes in tmp_path, real binaries."""
    script = compose()["services"][service]["command"][0].replace("$$", "$")
    for volume in ("/prometheus", "/influxdb"):
        script = script.replace(f" {volume}", f" {tmp_path}{volume}")
    script = script.replace("http://payment-api:8080", live_url).replace("python ", f"{sys.executable} ")
    script = script.replace("promtool ", require_binary("promtool") + " ")
    return script if os.geteuid() == 0 else script.replace("chown -R", "true")


def test_compose_history_steps_write_both_stores_once_per_volume(make_app, tmp_path):
    app = make_app()
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "influxdb").mkdir()

    def run(service, **env):
        return subprocess.run(["sh", "-c", compose_script(service, tmp_path, app.url)], cwd=HERE, capture_output=True,
                              text=True, timeout=120, env={**os.environ, **env})

    killed_run = tmp_path / "prometheus" / ".history.om.0123abcd.parts"  # what a SIGKILL leaves behind
    killed_run.mkdir()
    (killed_run / "payment_requests").write_text("payment_requests_total 1 1763618400\n")
    with RecordingInfluxDB() as influxdb:
        first = run("history", BACKFILL_DAYS="0.01", INFLUXDB_URL=influxdb.url)
        assert first.returncode == 0 and "0 not written" in first.stdout, first.stdout + first.stderr
        blocks = run("prometheus-history")
        assert blocks.returncode == 0, blocks.stdout + blocks.stderr
        again = run("history", BACKFILL_DAYS="0.01", INFLUXDB_URL=influxdb.url)
    assert len(influxdb.lines()) == int(re.search(r"(\d+) points written", first.stdout)[1]) > 0
    assert "already written" in again.stdout, again.stdout + again.stderr
    assert sorted(path.name for path in (tmp_path / "prometheus").iterdir() if not path.is_dir()) == [
        "payment-api-history.done"]  # the file became blocks and is gone
    folders = [path.name for path in (tmp_path / "prometheus").iterdir() if path.is_dir()]
    assert len(folders) == 1 and re.fullmatch("[0-9A-HJKMNP-TV-Z]{26}", folders[0]), folders  # one block, a ULID
    assert run("history", BACKFILL_DAYS="0").stdout.startswith("history: off")
