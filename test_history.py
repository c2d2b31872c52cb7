"""History on demand (`python payment_api.py backfill`), proved with the real promtool, Prometheus and victoria-metrics.

One day of history (5 payments/s, diurnal, incidents) is written once for the module, to a file that promtool turns
into blocks and to victoria-metrics through influxdb-client; a Prometheus started on those blocks answers the
queries. The end is a fixed past time, so every run checks the same history.
"""
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
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
from conftest import (QUIET, FakeClock, Prometheus, RecordingInfluxDB, ServerProcess, VictoriaMetrics, eventually,
                      free_port, http, require_binary)
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
    # every minute, every 15 s in the last hour (as the live service is scraped), ends included
    expected = (86400 - history.SEAM_SECONDS) / history.DEFAULT_STEP + history.SEAM_SECONDS / history.SEAM_STEP + 1
    assert float(samples[0]["value"][1]) == expected


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
    common = ("--rate", "0.2", "--jobs", "1", "--openmetrics", str(tmp_path / "flat.om"), "--force")
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


def history_py(*args, cwd, **kwargs):
    """`python history.py ARGS`, the real command, run in `cwd`; the finished process."""
    return subprocess.run([sys.executable, str(HERE / "history.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, **kwargs)


def assert_one_line(result, code, *words):
    """The command stopped with `code` and said why in one line on stderr naming `words`, without a traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.startswith(f"{history.PROG}: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


UNUSABLE_INPUTS = [
    (["--end", "1970-01-01T00:00:00Z", "--days", "0.01"], ["--end", "1970-01-01T00:00:00Z"]),
    (["--end", "1970-01-01T00:05:00Z", "--days", "0.01"], ["--days", "before 1970-01-01T00:00:00Z"]),
    (["--end", "0001-01-01"], ["--end", "not after 1970"]),
    (["--end", "0001-01-01T00:00:00+01:00"], ["--end", "not after 1970"]),
    (["--days", "1e-9"], ["--days", "shorter than one sample step (60 s"]),
    (["--days", "0.0006"], ["--days", "(52 s) is shorter than one sample step"]),
    (["--days", "0.01", "--step", "150", "--end", "1970-01-01T00:02:00Z"], ["--days"]),
    (["--days", "0.001", "--step", "150"], ["--days", "(86 s) is shorter than one sample step (150 s"]),
    (["--openmetrics", "/proc/history.om"], ["--openmetrics", "/proc"]),
    (["--openmetrics", "/proc/self/history.om"], ["--openmetrics", "/proc/self"]),
    (["--openmetrics", "/sys/history.om"], ["--openmetrics", "/sys"]),
    (["--openmetrics", "/sys/kernel/history.om"], ["--openmetrics", "/sys/kernel"]),
    (["--openmetrics", "/dev/full", "--force"], ["--openmetrics", "/dev/full", "not a regular file"]),
    (["--openmetrics", "/dev/null"], ["--openmetrics", "/dev/null", "not a regular file"]),
    (["--openmetrics", "."], ["--openmetrics", "is a folder"]),
]


@pytest.mark.parametrize("args, words", UNUSABLE_INPUTS, ids=[" ".join(args) for args, _ in UNUSABLE_INPUTS])
def test_an_input_the_backfill_cannot_use_stops_it_with_one_line_exit_2_and_no_file(args, words, tmp_path):
    if "--openmetrics" not in args:
        args = [*args, "--openmetrics", "history.om"]
    result = history_py(*args, cwd=tmp_path)
    assert_one_line(result, 2, *words)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
    assert Path("/dev/full").is_char_device() and Path("/dev/null").is_char_device()


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    target = tmp_path / "history.om"
    target.write_text("a history someone still needs\n")
    target.chmod(0o444)
    common = ("--days", "0.01", "--end", END, "--openmetrics", "history.om")
    refused = history_py(*common, cwd=tmp_path)
    assert_one_line(refused, 2, "--openmetrics: history.om exists; add --force to replace it")
    assert refused.stdout == "" and target.read_text() == "a history someone still needs\n"
    assert [path.name for path in tmp_path.iterdir()] == ["history.om"]
    replaced = history_py(*common, "--force", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert target.read_text().endswith("\n# EOF\n") and [path.name for path in tmp_path.iterdir()] == ["history.om"]


def on_a_small_filesystem(folder, options, *args):
    """`python history.py ARGS --openmetrics FOLDER/history.om` with a real tmpfs mounted on FOLDER with `options`
    (size=4m, ...), in a user and mount namespace of its own, so nothing is mounted outside the command. (the
    finished process, what FOLDER held when it ended)."""
    unshare = shutil.which("unshare") or pytest.skip("needs unshare (util-linux) for a small filesystem")
    folder.mkdir()
    script = ('mount -t tmpfs -o "$1" history-test "$2" || exit 99; folder=$2; shift 2; "$@"; status=$?; '
              'echo; echo "left:$(ls -A "$folder" | tr "\n" " ")"; exit $status')
    result = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", options,
                             str(folder), sys.executable, str(HERE / "history.py"), *args, "--openmetrics",
                             str(folder / "history.om")], capture_output=True, text=True, timeout=120)
    if result.returncode == 99 or result.stderr.startswith("unshare:"):
        pytest.skip(f"no tmpfs in a user namespace here: {result.stderr.strip()}")
    left = result.stdout.rsplit("left:", 1)[1].split()
    return result, left


@pytest.mark.parametrize("options", ["size=1m,nr_inodes=1", "size=4m", "size=32m"],
                         ids=["no file can be created", "full while the families are written",
                              "full while they are joined"])
def test_a_full_disk_stops_the_backfill_with_one_line_exit_1_and_leaves_no_file(tmp_path, options):
    """0.2 days make a file of about 22 MB, written as parts (one a family) and then joined: twice that at the end
    (the kernel's copy_file_range fails, then the copy through Python)."""
    result, left = on_a_small_filesystem(tmp_path / "small", options, "--days", "0.2", "--end", END)
    assert_one_line(result, 1, "--openmetrics: cannot write", "history.om: the disk is full")
    assert left == [] and "wrote " not in result.stdout


def test_influxdb_without_the_client_package_stops_with_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "influxdb_client", None)  # import fails as if it were not installed
    assert history.main(["--influxdb"]) == 2
    assert "--influxdb: the influxdb-client package is not installed" in capsys.readouterr().err

# ---------------------------------------------------------------- a month: the livelier week, the alerts


MONTH_END = "2026-11-16T00:00:00Z"  # a Monday: the month holds four whole weeks, Monday to Sunday
MONTH_END_SECONDS = int(datetime(2026, 11, 16, tzinfo=timezone.utc).timestamp())


@pytest.fixture(scope="module")
def month(tmp_path_factory):
    """31 days of history at the default rate, as compose writes them at most -> promtool -> Prometheus. About
    13 million payments: about 55 s for the file (2.1 GB, deleted once it is blocks), 25 s and 2.2 GB of memory
    for promtool."""
    folder = tmp_path_factory.mktemp("month")
    prometheus = PastPrometheus(folder, folder / "blocks")
    try:
        result = backfill("--days", str(history.MAX_DAYS), "--end", MONTH_END, "--seed", str(SEED),
                          "--openmetrics", str(folder / "month.om"), env={"SIMULATION_RATE": "5"}, timeout=600)
        create_blocks(folder / "month.om", folder / "blocks")
        (folder / "month.om").unlink()
        prometheus.start()
        yield History(result.stdout, prometheus, None)
    finally:
        prometheus.stop()


def rule_duration(text):
    """Seconds of a rule's `for:` (5m, 1h30m, ...)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([smhd])", text or "0s"))


def firing_spans(prometheus, rule, start, end, step=60):
    """[(first, last)] moments the alert `rule` would be firing over [start, end], evaluated every `step` (the
    history's samples change once a minute): true at every evaluation for at least its `for:`."""
    true_at = set()
    for first in range(start, end + 1, 10_000 * step):  # Prometheus answers at most 11,000 points a query
        url = prometheus.url + "/api/v1/query_range?" + urllib.parse.urlencode({
            "query": rule["expr"], "start": first, "end": min(first + 9_999 * step, end), "step": step})
        with urllib.request.urlopen(url, timeout=120) as response:
            for series in json.load(response)["data"]["result"]:
                true_at.update(int(float(moment)) for moment, _ in series["values"])
    spans, run, hold = [], [], rule_duration(rule.get("for"))
    for moment in [*sorted(true_at), math.inf]:
        if run and moment - run[-1] != step:
            if run[-1] - run[0] >= hold:
                spans.append((run[0] + hold, run[-1]))
            run = []
        run.append(moment)
    return spans


def test_over_31_days_the_shipped_alerts_fire_for_every_past_incident_and_never_outside_them(month):
    """Outside an incident, or the 30 minutes after it that the SLO's slow-burn window still sees, no shipped alert
    holds for its `for:` over the whole month: not at night, not on a quiet Sunday. Each incident fires its alert."""
    start, end = MONTH_END_SECONDS - history.MAX_DAYS * 86400, MONTH_END_SECONDS
    assert len(month.incidents) > 80
    fired = {}
    for rule in rules_of(ALERTS):
        for first, last in firing_spans(month.prometheus, rule, start + 300, end):
            during = [(begins, ends, scenario) for begins, ends, scenario in month.incidents
                      if begins <= first and last <= ends + 1800]
            assert during, (rule["alert"], history.iso(first), history.iso(last))
            fired.setdefault(during[0], set()).add(rule["alert"])
    for incident in month.incidents:
        assert ALERT_OF_INCIDENT[incident[2]] in fired.get(incident, ()), (history.iso(incident[0]), incident[2])


def test_over_31_days_weekends_are_quieter_than_every_weekday_no_two_days_alike_and_a_week_averages_the_rate(month):
    """The payments of each UTC day, counted by Prometheus (the counters at midnight), are the shape's: the seeded
    day levels of payment_api.week_levels, weekends lower; `offset 1w` shows another week, not the same one."""
    midnights = range(MONTH_END_SECONDS - history.MAX_DAYS * 86400, MONTH_END_SECONDS + 1, 86400)
    totals = [float(month.prometheus.at("sum(payment_requests_total)", midnight)[0]["value"][1])
              for midnight in midnights]
    assert totals[0] == 0  # the first sample, at the start
    days = dict(zip(midnights[1:], (later - earlier for earlier, later in zip(totals, totals[1:]))))
    for day, count in days.items():  # the payments of the day that ends at `day`
        assert count == pytest.approx(5 * 86400 * sum(diurnal(second) for second in range(day - 86400, day, 60))
                                      / 1440, rel=0.01), history.iso(day)
    for monday in range(MONTH_END_SECONDS - 28 * 86400, MONTH_END_SECONDS, 7 * 86400):
        week = [days[monday + number * 86400] for number in range(1, 8)]
        assert max(week[5:]) < 0.9 * min(week[:5]), week
        assert len({round(count, -3) for count in week}) >= 5, week  # thousands apart
        assert sum(week) / (7 * 86400) == pytest.approx(5, rel=0.01), week
        if monday - 6 * 86400 in days:  # a whole week before it
            last_week = [days[monday - 7 * 86400 + number * 86400] for number in range(1, 8)]
            assert sum(abs(this - last) / last for this, last in zip(week, last_week)) / 7 > 0.03, (week, last_week)

# ---------------------------------------------------------------- the seam with the live service


def diurnal(moment, seed=SEED):
    """The shape the history and the live service share: payment_api's diurnal factor on the UTC clock."""
    return payment_api.profile_factor("diurnal", 0, 86400, moment, seed)


def mean_rate(rate, first, last, seed=SEED):
    """The average payments/s the shape gives over [first, last), second by second as the history draws them."""
    return rate * sum(diurnal(second, seed) for second in range(first, last)) / (last - first)


@pytest.mark.parametrize("seed", [None, SEED], ids=["SIMULATION_SEED unset", "SIMULATION_SEED set"])
def test_the_live_simulator_runs_at_the_historys_rate_at_every_moment_of_three_weeks(seed):
    """As compose runs it (diurnal, SIMULATION_PERIOD=86400), the live simulator's rate is the history's at the same
    moment of the UTC clock, weekends and seeded days included; unseeded, both use the history's default seed."""
    settings = dataclasses.replace(payment_api.Settings(), **{
        **QUIET, "simulation_enabled": True, "simulation_rate": 5.0, "simulation_profile": "diurnal",
        "simulation_period": 86400.0, "simulation_seed": seed})
    monotonic = FakeClock()
    simulator = payment_api.PaymentApp(settings, monotonic=monotonic).simulator  # built, not started
    options = history.make_parser(settings).parse_args(["--openmetrics", "unused.om"])
    plan = history.make_plan(options, settings, END_SECONDS)
    assert plan.seed == (SEED if seed else history.DEFAULT_SEED) and plan.profile == "diurnal"
    monday = END_SECONDS - 4 * 86400 - 6 * 3600  # 2026-11-16T00:00:00Z
    moments = [*range(monday - 7 * 86400, monday + 14 * 86400, 997), monday, monday + 5 * 86400 + 43200]
    for moment in moments:
        now = monotonic() + moment - time.time()  # the monotonic clock's reading at that moment
        live = simulator.current_rate(now)
        assert live == pytest.approx(plan.rate_at(moment, history.NO_EFFECTS), rel=1e-6), history.iso(moment)


def test_the_diurnal_week_has_quieter_weekends_seeded_days_a_quiet_midnight_and_the_configured_mean():
    monday = 1794787200  # 2026-11-16T00:00:00Z
    weeks = {}
    for seed in (history.DEFAULT_SEED, SEED):
        for first in range(monday - 3 * 7 * 86400, monday + 7 * 86400, 7 * 86400):
            days = [sum(diurnal(day + second, seed) for second in range(0, 86400, 60)) / 1440
                    for day in range(first, first + 7 * 86400, 86400)]
            weekdays, weekend = days[:5], days[5:]
            assert max(weekend) < 0.9 * min(weekdays), days
            assert max(weekdays) - min(weekdays) > 0.03 and len(set(days)) == 7, days  # no two days alike
            assert sum(days) / 7 == pytest.approx(1.0, abs=1e-9)  # SIMULATION_RATE is the mean of every week
            weeks[seed, first] = days
        for midnight in range(monday - 21 * 86400, monday + 7 * 86400, 86400):  # one line from day to day
            assert diurnal(midnight, seed) == payment_api.NIGHT_FACTOR
            assert abs(diurnal(midnight - 60, seed) - diurnal(midnight + 60, seed)) < 1e-4
    assert len({tuple(days) for days in weeks.values()}) == len(weeks)  # each week and each seed its own


def test_the_days_are_drawn_alike_in_every_process():
    """The days' levels come from a string seed, which Python hashes alike whatever PYTHONHASHSEED is."""
    code = "import payment_api; print([payment_api.week_levels(seed, 2967) for seed in (1, 7)])"
    printed = {subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True).stdout
               for hash_seed in ("0", "1", "4242")}
    assert printed == {f"{[payment_api.week_levels(seed, 2967) for seed in (1, 7)]}\n"}


def query_at(prometheus, promql, moment):
    url = prometheus.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": moment})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


def test_the_live_service_continues_the_historys_line_at_the_seam(make_app, tmp_path):
    """The live service as compose runs it (diurnal, a 24-hour period) after the history, scraped every 15 s as the
    shipped configs scrape it: one series and one reset; every `sum(rate(payment_requests_total[5m]))` over the
    history's last hour and across the seam within Poisson noise (5 standard deviations) of the shape they share; the
    live payments since the start as many as the shape makes; payment_simulation_rate one line.

    At 60/s a minute of live data says something; the rates are equal at every moment anyway (the test above).
    Windows that end after the history but before the first live scrape are left out: no sample exists there yet,
    and Prometheus extrapolates the history's last ones less the longer that lasts (in compose, the time the
    backfill and promtool take before Prometheus starts)."""
    rate = 60
    app = make_app(simulation_enabled=True, simulation_rate=rate, failure_rate=0.03, simulation_profile="diurnal",
                   simulation_period=86400.0, simulation_seed=SEED)
    result = backfill("--days", "0.05", "--live-url", app.url, "--rate", str(rate), "--seed", str(SEED),
                      "--no-incidents", "--job", "payment-api", "--labels", "",
                      "--openmetrics", str(tmp_path / "seam.om"))
    seam = history.parse_end(re.search(r" to (\S+):", result.stdout)[1])
    live_started = time.time() - http("GET", app.url + "/health")[2]["uptimeSeconds"]
    assert seam <= live_started < seam + 1  # the history ends where the live service began
    create_blocks(tmp_path / "seam.om", tmp_path / "prom-data")
    prometheus = Prometheus(tmp_path, app.url.removeprefix("http://"))  # on the history's blocks, scraping the app
    config = json.loads((tmp_path / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = yaml.safe_load(
        (HERE / "prometheus" / "prometheus.local.yml").read_text())["global"]["scrape_interval"]
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    prometheus.start()
    try:
        history_samples = int(re.search(r"(\d+) samples of", result.stdout)[1])
        eventually(lambda: prometheus.query(f"count_over_time(up[2h]) >= {history_samples + 3}"), timeout=120,
                   interval=1, message="3 live scrapes after the history")
        (up,) = prometheus.query("up[2h]")
        live_scrapes = [float(moment) for moment, _ in up["values"] if float(moment) > seam]
        one_series = 'payment_requests_total{status="200",type="standard",currency="EUR"}'
        assert len(prometheus.query(f"count_over_time({one_series}[2h])")) == 1  # history and live: one series
        assert float(prometheus.query(f"resets({one_series}[2h])")[0]["value"][1]) == 1  # the live start

        def deviation(value, first, last):
            """How many standard deviations of a Poisson count over [first, last) `value` is from the shape."""
            expected = mean_rate(rate, math.floor(first), math.floor(last))
            return (float(value) - expected) / (math.sqrt(expected * (last - first)) / (last - first))
        url = prometheus.url + "/api/v1/query_range?" + urllib.parse.urlencode({
            "query": "sum(rate(payment_requests_total[5m]))", "start": seam - 3300, "end": live_scrapes[-1],
            "step": 5})
        with urllib.request.urlopen(url, timeout=10) as response:
            (series,) = json.load(response)["data"]["result"]
        deviations = {float(moment) - seam: deviation(value, float(moment) - 300, float(moment))
                      for moment, value in series["values"] if not seam < float(moment) < live_scrapes[0]}
        assert len(deviations) > 660 and max(deviations) > live_scrapes[1] - seam, sorted(deviations)[-5:]
        worst = max(deviations, key=lambda moment: abs(deviations[moment]))
        assert abs(deviations[worst]) < 5, (worst, deviations[worst])
        live = query_at(prometheus, "sum(payment_requests_total)", live_scrapes[-1])[0]["value"][1]
        assert abs(deviation(float(live) / (live_scrapes[-1] - live_started), live_started, live_scrapes[-1])) < 5
        gauge = "payment_simulation_rate"
        assert float(query_at(prometheus, gauge, seam)[0]["value"][1]) == pytest.approx(rate * diurnal(seam), 1e-6)
        live_gauge = float(query_at(prometheus, gauge, live_scrapes[-1])[0]["value"][1])
        assert live_gauge == pytest.approx(rate * diurnal(live_scrapes[-1]), rel=1e-3)
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
    documented = re.findall(r"promtool tsdb create-blocks-from openmetrics ([^\s`]+)", docs)  # in code or text
    in_compose = re.findall(r"promtool tsdb create-blocks-from openmetrics (\S+)",
                            compose()["services"]["prometheus-history"]["command"][0])
    assert documented and set(documented) == set(in_compose) == {PROMTOOL_BLOCKS} and len(in_compose) == 1


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
