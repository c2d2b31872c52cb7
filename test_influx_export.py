"""InfluxDB export: one point per payment, nothing lost in an outage, bounded when InfluxDB hangs, flushed on SIGTERM.

victoria-metrics stands in for InfluxDB 2 (it accepts influxdb-client's writes at /api/v2/write): measurement
`payment` with fields `amount` and `processing_time` becomes metrics `payment_amount` and `payment_processing_time`,
tags become labels, string fields are not stored.
"""
import json
import logging
import selectors
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

import payment_api
from conftest import RecordingInfluxDB, eventually, free_port, http, metric_value

FAST_EXPORT = {"influxdb_flush_interval_ms": 100, "latency_scale": 0.0, "failure_rate": 0.0}
TOKEN = "tok-8f3a1c-must-stay-secret"

# ---------------------------------------------------------------- helpers


def payments_made(app_url):
    """Payments completed (API and simulated, success and failed), as /metrics counts them."""
    return metric_value(app_url, "payment_duration_seconds_count")


def post_payment(app_url, headers=None, **body):
    status, _, answer = http("POST", app_url + "/api/payments", {"amount": 100.5, **body}, headers=headers)
    assert status in (200, 402, 500), answer  # completed, declined by the bank, or failed
    return answer


def timed(call):
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def influx_health(app_url):
    status, _, body = http("GET", app_url + "/health")
    assert status == 200, body
    return body["dependencies"]["influxdb"]


def registry_value(app, name, **labels):
    """A sample read from the app's registry directly: works after the app has stopped serving /metrics."""
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def stop_simulation_and_settle(app_url):
    """Turn the simulator off and wait until no payment is in flight, so the payment count is final."""
    status, _, body = http("PUT", app_url + "/api/simulation", {"enabled": False})
    assert status == 200, body
    eventually(lambda: metric_value(app_url, "active_payments") == 0, message="no payment in flight")
    return payments_made(app_url)


def export_series(server, selector):
    """Raw samples from victoria-metrics: [(labels, values, timestamps in ms)] for every series matching selector."""
    urllib.request.urlopen(server.url + "/internal/force_flush", timeout=10).read()
    url = server.url + "/api/v1/export?" + urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    return [(line["metric"], line["values"], line["timestamps"]) for line in lines]


def grouped(server, promql, *labels):
    """{(label values...): number} for an instant vector query."""
    return {tuple(row["metric"].get(label) for label in labels): float(row["value"][1])
            for row in server.query(promql)}


class HungInfluxDB:
    """Accepts TCP connections and reads what is sent, but never answers a byte.

    A real InfluxDB or victoria-metrics cannot be made to hang on demand (stopping it refuses connections
    instead), so this stdlib stand-in plays the hung server.
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.setblocking(False)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hung-influxdb", daemon=True)

    def _serve(self):
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                if key.fileobj is self.listener:
                    connection, _ = self.listener.accept()
                    connection.setblocking(False)
                    self._selector.register(connection, selectors.EVENT_READ)
                    self.accepted += 1
                elif not key.fileobj.recv(65536):  # the client gave up: forget the connection
                    self._selector.unregister(key.fileobj)
                    key.fileobj.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


def log_events(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]

# ---------------------------------------------------------------- export off


EXPORT_OFF = {
    "url empty": ({"influxdb_url": ""}, None),
    "client not installed": ({"influxdb_url": "http://127.0.0.1:9"}, "missing"),
}


@pytest.fixture(params=EXPORT_OFF.values(), ids=EXPORT_OFF.keys())
def export_off_settings(request, monkeypatch):
    settings, client = request.param
    if client == "missing":  # `import influxdb_client` raises ImportError while sys.modules maps it to None
        monkeypatch.setitem(sys.modules, "influxdb_client", None)
    return settings


def test_service_runs_with_export_disabled_when_url_empty_or_client_missing(make_app, export_off_settings):
    app = make_app(**export_off_settings, **FAST_EXPORT)

    answer = post_payment(app.url, currency="EUR")

    assert answer["status"] == "completed"
    assert influx_health(app.url)["state"] == "disabled"
    assert metric_value(app.url, "payment_influx_points_written_total") == 0
    assert metric_value(app.url, "payment_influx_points_dropped_total") == 0


def test_export_off_is_said_in_exactly_one_log_line(make_app, export_off_settings, caplog):
    caplog.set_level(logging.INFO, logger="payment_api")

    app = make_app(**export_off_settings, **FAST_EXPORT)
    post_payment(app.url)
    app.stop()

    about_influx = [record for record in caplog.records if record.name == "payment_api"
                    and "influx" in payment_api.LogFormatter("json").format(record).lower()]
    assert len(about_influx) == 1, [record.getMessage() for record in about_influx]
    line = payment_api.LogFormatter("json").format(about_influx[0]).lower()
    assert "off" in line or "disabled" in line


def test_influxdb_token_never_appears_in_logs_health_or_responses(make_app, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the client library's too
    app = make_app(influxdb_url=f"http://127.0.0.1:{free_port()}", influxdb_token=TOKEN, shutdown_timeout=1.0,
                   **FAST_EXPORT)
    post_payment(app.url)
    eventually(lambda: influx_health(app.url)["state"] == "unreachable", message="write failure noticed")

    answers = [http("POST", app.url + "/api/payments", {"amount": 5, "currency": "GBP"}),
               http("POST", app.url + "/api/payments", {"amount": "oops"}),
               http("GET", app.url + "/no/such/path")]
    answers += [http("GET", app.url + path) for path in ("/health", "/metrics", "/api/payments", "/api/payments/stats",
                                                         "/api/simulation", "/api/scenarios")]
    app.stop()

    for _, headers, body in answers:
        assert TOKEN not in (body if isinstance(body, bytes) else json.dumps(body).encode()).decode()
        assert TOKEN not in str(headers)
    formatted = [formatter.format(record) for record in caplog.records
                 for formatter in (payment_api.LogFormatter("json"), payment_api.LogFormatter("text"))]
    assert any("unreachable" in line for line in formatted), "the outage should have been logged"
    assert not [line for line in formatted if TOKEN in line]
    assert TOKEN not in repr(app.settings)

# ---------------------------------------------------------------- one point per payment


def test_each_api_payment_becomes_one_point_with_its_tags_fields_and_time(make_app, victoria_metrics):
    app = make_app(influxdb_url=victoria_metrics.url, **FAST_EXPORT)
    asked = [("EUR", "standard", False), ("USD", "express", True), ("GBP", "recurring", False),
             ("USD", "standard", True), ("EUR", "express", False)]
    answers = {}
    for number, (currency, payment_type, fail) in enumerate(asked):
        customer = f"cust_9900{number}"  # pool-shaped (cust_ + 5 digits): tagged as is
        headers = {"X-Simulate-Latency": f"{0.011 * (number + 1):.3f}", "X-Simulate-Failure": str(fail).lower()}
        answers[customer] = post_payment(app.url, headers=headers, amount=10.25 + number, currency=currency,
                                         type=payment_type, customerId=customer)

    eventually(lambda: victoria_metrics.count_points() == len(asked), message="every point visible")
    amounts = export_series(victoria_metrics, '{__name__="payment_amount",customer_id=~"cust_9900.*"}')
    times = export_series(victoria_metrics, '{__name__="payment_processing_time",customer_id=~"cust_9900.*"}')
    assert len(amounts) == len(times) == len(asked)
    for labels, values, timestamps in amounts:
        answer = answers[labels["customer_id"]]
        completed_at = app.store.get(answer["paymentId"]).completed_at
        assert labels == {"__name__": "payment_amount", "customer_id": answer["customerId"],
                          "currency": answer["currency"], "payment_type": answer["type"],
                          "instance": app.settings.instance, "status": "success" if answer["success"] else "failed"}
        assert values == [answer["amount"]]
        assert timestamps == [int(completed_at * 1000)]
    for labels, values, _ in times:
        payment = app.store.get(answers[labels["customer_id"]]["paymentId"])
        assert payment.processing_time > 0 and values == [pytest.approx(payment.processing_time, rel=1e-9)]
    assert metric_value(app.url, "payment_influx_points_written_total") == len(asked)


def test_point_is_measurement_payment_with_numeric_fields_and_nanosecond_completion_time(make_app):
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, **FAST_EXPORT)
        answer = post_payment(app.url, amount=42.5, currency="GBP", type="express", customerId="cust_00042",
                              headers={"X-Simulate-Latency": "0.02"})
        eventually(lambda: influxdb.lines(), message="a write arrived")
        app.stop()

    payment = app.store.get(answer["paymentId"])
    # payment_id is no field since c9fcd40: numeric fields only, so Flux mean() over a measurement works
    assert influxdb.lines() == [
        f"payment,currency=GBP,customer_id=cust_00042,instance={app.settings.instance},payment_type=express,"
        f"status=success amount=42.5,"
        f"processing_time={payment.processing_time!r} {int(payment.completed_at * 1e9)}"]
    path, _ = influxdb.bodies[0]
    assert path.startswith("/api/v2/write?") and "bucket=training" in path and "precision=ns" in path


def test_customer_ids_outside_the_pool_are_tagged_other_to_bound_series(make_app):
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, **FAST_EXPORT)
        for customer in ("vip-anna", "cust_1", "cust_123456", "cust_00007"):
            post_payment(app.url, customerId=customer)
        eventually(lambda: len(influxdb.lines()) == 4, message="four points arrived")
        app.stop()

    tags = [dict(pair.split("=") for pair in line.split(" ")[0].split(",")[1:]) for line in influxdb.lines()]
    assert sorted(tag["customer_id"] for tag in tags) == ["cust_00007", "other", "other", "other"]


def test_api_and_simulated_payments_each_become_exactly_one_point(make_app, victoria_metrics):
    app = make_app(influxdb_url=victoria_metrics.url, simulation_enabled=True, simulation_rate=100,
                   influxdb_flush_interval_ms=100, latency_scale=0.2, failure_rate=0.2)
    for number in range(30):
        post_payment(app.url, customerId=f"cust_api_{number}", currency=("USD", "EUR", "GBP")[number % 3])
    eventually(lambda: payments_made(app.url) >= 250, message="250 payments")
    payments = stop_simulation_and_settle(app.url)

    sources = [payment.source for payment in app.store.recent(app.store.capacity)]
    assert len(sources) == payments and sources.count("api") == 30
    eventually(lambda: metric_value(app.url, "payment_influx_points_written_total") == payments,
               message="every point written")
    eventually(lambda: victoria_metrics.count_points() == payments, message="every point stored")
    assert victoria_metrics.count_points("payment_processing_time") == payments
    assert metric_value(app.url, "payment_influx_points_dropped_total") == 0

    # tags: per (status, currency, type), the server holds as many points as the app counted payments
    stored = grouped(victoria_metrics, "sum by (status, currency, payment_type) (count_over_time(payment_amount[1h]))",
                     "status", "currency", "payment_type")
    counted = {}
    for payment_type in payment_api.PAYMENT_TYPES:
        for currency in app.settings.currencies:
            for code, status in (("200", "success"), ("500", "failed")):
                number = metric_value(app.url, "payment_requests_total", method="POST", status=code,
                                      type=payment_type, currency=currency)
                if number:
                    counted[(status, currency, payment_type)] = number
    assert stored == counted
    assert {key[0] for key in stored} == {"success", "failed"}

    # fields: amounts and processing times add up to what /metrics observed
    amounts = grouped(victoria_metrics, "sum by (status, currency) (sum_over_time(payment_amount[1h]))",
                      "status", "currency")
    for (status, currency), total in amounts.items():
        assert total == pytest.approx(metric_value(app.url, "payment_amount_sum", status=status, currency=currency))
    durations = grouped(victoria_metrics, "sum by (status) (sum_over_time(payment_processing_time[1h]))", "status")
    for (status,), total in durations.items():
        assert total == pytest.approx(metric_value(app.url, "payment_duration_seconds_sum", status=status))

# ---------------------------------------------------------------- outages


def post_latencies(app_url, seconds, pace=0.02):
    """POST payments one after another for `seconds`; each one's latency in seconds."""
    latencies, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        latency, _ = timed(lambda: post_payment(app_url))
        latencies.append(latency)
        time.sleep(pace)  # pacing the load, not waiting for a condition
    return latencies


def test_ten_second_outage_loses_no_point_and_keeps_post_latency(make_app, victoria_metrics):
    app = make_app(influxdb_url=victoria_metrics.url, simulation_enabled=True, simulation_rate=50, **FAST_EXPORT)
    before = post_latencies(app.url, 1.0)
    eventually(lambda: influx_health(app.url)["state"] == "up", message="first write")

    victoria_metrics.stop()
    during = post_latencies(app.url, 10.0, pace=0.05)
    assert influx_health(app.url)["state"] == "unreachable"
    assert metric_value(app.url, "payment_influx_points_pending") > 500  # 10 s at 50/s + the POSTs, kept
    victoria_metrics.start()

    eventually(lambda: influx_health(app.url)["state"] == "up", timeout=30, message="writes resumed")
    payments = stop_simulation_and_settle(app.url)
    eventually(lambda: metric_value(app.url, "payment_influx_points_written_total") == payments, timeout=30,
               message="every payment written")
    assert metric_value(app.url, "payment_influx_points_dropped_total") == 0
    eventually(lambda: victoria_metrics.count_points() == payments, message="every point stored")
    assert max(during) < 1.0, f"slowest POST during the outage took {max(during):.3f} s"
    assert statistics.median(during) < statistics.median(before) + 0.02


def test_outage_is_logged_once_when_lost_and_once_when_back(make_app, caplog):
    caplog.set_level(logging.INFO, logger="payment_api")
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, **FAST_EXPORT)
        post_payment(app.url)
        eventually(lambda: influx_health(app.url)["state"] == "up", message="first write")

        influxdb.refusing = True
        for _ in range(20):
            post_payment(app.url)
        eventually(lambda: influxdb.refused >= 3, message="three failed write attempts")
        assert metric_value(app.url, "payment_influx_points_pending") == 20
        influxdb.refusing = False
        eventually(lambda: metric_value(app.url, "payment_influx_points_written_total") == 21, timeout=20,
                   message="writes resumed")
        eventually(lambda: influx_health(app.url)["state"] == "up", message="state up")  # set after its log line
        app.stop()

    about_influxdb = [(record.levelname, record.getMessage()) for record in caplog.records
                      if record.name == "payment_api" and getattr(record, "fields", {}).get("url") == influxdb.url]
    assert [level for level, _ in about_influxdb] == ["INFO", "WARNING", "INFO"], about_influxdb  # up, lost, back
    assert "unreachable" in about_influxdb[1][1]
    assert len(influxdb.lines()) == 21


def test_hung_influxdb_keeps_payments_fast_and_pending_points_bounded(make_app):
    with HungInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, simulation_enabled=True, simulation_rate=200,
                       influxdb_buffer_size=200, shutdown_timeout=1.0, **FAST_EXPORT)
        post_times, health_times, pending = [], [], []
        deadline = time.monotonic() + 15
        while metric_value(app.url, "payment_influx_points_dropped_total", reason="buffer_full") < 200:
            assert time.monotonic() < deadline, "the buffer never filled"
            post_times.append(timed(lambda: post_payment(app.url))[0])
            health_time, health = timed(lambda: influx_health(app.url))
            health_times.append(health_time)
            pending += [health["pendingPoints"], metric_value(app.url, "payment_influx_points_pending")]
        payments = payments_made(app.url)
        app.stop()

    assert influxdb.accepted >= 1, "the exporter never reached the hung server"
    assert max(pending) == 200, "pending points must stop exactly at INFLUXDB_BUFFER_SIZE"
    assert payments >= 400 and registry_value(app, "payment_influx_points_written_total") == 0
    assert max(post_times) < 1.0, f"slowest POST {max(post_times):.3f} s"
    assert max(health_times) < 1.0, f"slowest /health {max(health_times):.3f} s"


def test_stop_returns_in_time_while_influxdb_hangs_and_counts_leftovers_as_dropped(make_app):
    with HungInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, simulation_enabled=True, simulation_rate=100,
                       influxdb_buffer_size=200, shutdown_timeout=2.0, **FAST_EXPORT)
        eventually(lambda: metric_value(app.url, "payment_influx_points_pending") >= 50, message="points pending")
        stop_time, _ = timed(app.stop)

    assert stop_time < app.settings.shutdown_timeout + 1.5, f"stop took {stop_time:.2f} s"
    payments = sum(registry_value(app, "payment_duration_seconds_count", status=status)
                   for status in ("success", "failed"))
    dropped = {reason: registry_value(app, "payment_influx_points_dropped_total", reason=reason)
               for reason in ("shutdown", "buffer_full", "write_error")}
    assert dropped["shutdown"] >= 50
    assert registry_value(app, "payment_influx_points_written_total") + sum(dropped.values()) == payments
    assert registry_value(app, "payment_influx_points_pending") == 0


def test_stop_leaves_no_exporter_thread_behind_when_influxdb_is_down(make_app):
    threads_before = set(threading.enumerate())
    app = make_app(influxdb_url=f"http://127.0.0.1:{free_port()}", shutdown_timeout=0.5, **FAST_EXPORT)
    post_payment(app.url)
    eventually(lambda: influx_health(app.url)["state"] == "unreachable", message="write failure noticed")
    app.stop()

    left = lambda: [thread.name for thread in set(threading.enumerate()) - threads_before if thread.is_alive()]
    eventually(lambda: not left(), timeout=3, message="every app thread ended")

# ---------------------------------------------------------------- no InfluxDB at all (a laptop without the stack)

UNRESOLVABLE = "http://influxdb.invalid:8086"  # the compose default seen from a laptop: a name that never resolves
QUICK_GIVE_UP = {"retry_interval": 10, "exponential_base": 2, "max_retry_delay": 20, "max_retries": 2,
                 "max_retry_time": 200}  # a batch is given up in a fraction of a second instead of about 30 s


def test_unreachable_influxdb_is_said_once_however_many_batches_are_given_up(make_app, caplog, monkeypatch):
    monkeypatch.setattr(payment_api.InfluxExporter, "RETRIES", QUICK_GIVE_UP)
    caplog.set_level(logging.INFO, logger="payment_api")
    app = make_app(influxdb_url=f"http://127.0.0.1:{free_port()}", simulation_enabled=True, simulation_rate=200,
                   **FAST_EXPORT)

    # at least 10 batches given up: with the default retries, more than 5 minutes of an InfluxDB that is not there
    eventually(lambda: metric_value(app.url, "payment_influx_points_dropped_total", reason="write_error") >= 200,
               timeout=30, message="many batches given up")
    app.stop()

    about_influxdb = [(record.levelname, record.getMessage()) for record in caplog.records
                      if record.name == "payment_api" and "InfluxDB" in record.getMessage()]
    assert about_influxdb[0] == ("WARNING", payment_api.UNREACHABLE)
    assert {message for _, message in about_influxdb[1:]} <= {"InfluxDB points left unwritten at shutdown"}


def test_an_influxdb_answering_503_is_said_once_as_refusing_not_unreachable(make_app, caplog, monkeypatch):
    monkeypatch.setattr(payment_api.InfluxExporter, "RETRIES", QUICK_GIVE_UP)
    caplog.set_level(logging.INFO, logger="payment_api")
    with RecordingInfluxDB() as influxdb:
        influxdb.error_status = 503
        app = make_app(influxdb_url=influxdb.url, simulation_enabled=True, simulation_rate=200, **FAST_EXPORT)
        eventually(lambda: metric_value(app.url, "payment_influx_points_dropped_total", reason="write_error") >= 200,
                   timeout=30, message="many batches given up")
        app.stop()

    warnings = [record.getMessage() for record in caplog.records
                if record.name == "payment_api" and record.levelname == "WARNING" and "InfluxDB" in record.getMessage()]
    assert warnings[0] == payment_api.REFUSING
    assert set(warnings[1:]) <= {"InfluxDB points left unwritten at shutdown"}


def test_a_stop_gives_an_influxdb_that_never_accepted_a_point_one_second(make_app):
    with HungInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, shutdown_timeout=8.0, **FAST_EXPORT)
        for _ in range(5):
            post_payment(app.url)
        eventually(lambda: influxdb.accepted >= 1, message="a write attempted")
        stop_time, _ = timed(app.stop)

    assert stop_time < payment_api.NEVER_ACCEPTED_WAIT + 1.0, f"stop took {stop_time:.2f} s"
    assert registry_value(app, "payment_influx_points_dropped_total", reason="shutdown") == 5


def test_stop_does_not_wait_for_an_influxdb_that_cannot_be_reached(run_service):
    service = run_service(INFLUXDB_URL=UNRESOLVABLE, SIMULATION_RATE="50")
    eventually(lambda: influx_health(service.url)["state"] == "unreachable", message="InfluxDB found unreachable")
    eventually(lambda: metric_value(service.url, "payment_influx_points_pending") > 0, message="points pending")

    started = time.monotonic()
    service.send_signal(signal.SIGTERM)
    exit_code = service.wait(10)

    assert (exit_code, time.monotonic() - started < 1.0) == (0, True), f"took {time.monotonic() - started:.2f} s"
    events = [event["event"] for event in log_events(service.log_path)]
    assert events.count(payment_api.UNREACHABLE) == 1
    assert events[-2:] == ["InfluxDB points left unwritten at shutdown", "stopped"]

# ---------------------------------------------------------------- SIGTERM

PENDING_FOR_A_WHILE = {"INFLUXDB_FLUSH_INTERVAL_MS": str(payment_api.MAX_FLUSH_INTERVAL_MS),
                       "INFLUXDB_BATCH_SIZE": "100000"}


def stopped_events(service):
    """The service's log events once it logged 'stopped' (the last line main() writes before returning 0)."""
    events = log_events(service.log_path)
    return events if events and events[-1]["event"] == "stopped" else None


def test_sigterm_writes_every_pending_point_before_exit(run_service, victoria_metrics):
    service = run_service(INFLUXDB_URL=victoria_metrics.url, INFLUXDB_TOKEN=TOKEN, ENABLE_SIMULATION="false",
                          PAYMENT_LATENCY_SCALE="0", **PENDING_FOR_A_WHILE)
    for number in range(40):
        post_payment(service.url, customerId=f"cust_term_{number}")
    assert metric_value(service.url, "payment_influx_points_pending") == 40
    assert metric_value(service.url, "payment_influx_points_written_total") == 0

    service.send_signal(signal.SIGTERM)

    events = eventually(lambda: stopped_events(service), message="'stopped' logged")
    assert "InfluxDB points left unwritten at shutdown" not in [event["event"] for event in events]
    eventually(lambda: victoria_metrics.count_points() == 40, message="40 points stored")  # written before "stopped"
    assert TOKEN not in service.log_path.read_text()


def test_sigterm_with_simulation_running_writes_every_counted_payment(run_service, victoria_metrics):
    service = run_service(INFLUXDB_URL=victoria_metrics.url, ENABLE_SIMULATION="true", SIMULATION_RATE="50",
                          **PENDING_FOR_A_WHILE)
    last_count = eventually(lambda: (count := payments_made(service.url)) >= 30 and count,
                            message="30 simulated payments")
    assert metric_value(service.url, "payment_influx_points_written_total") == 0  # all still pending

    service.send_signal(signal.SIGTERM)

    events = eventually(lambda: stopped_events(service), message="'stopped' logged")
    assert "InfluxDB points left unwritten at shutdown" not in [event["event"] for event in events]
    eventually(lambda: victoria_metrics.count_points() >= last_count, message="every counted payment stored")


def test_sigterm_exits_with_code_0_soon_after_flushing(run_service, victoria_metrics):
    service = run_service(INFLUXDB_URL=victoria_metrics.url, ENABLE_SIMULATION="false", PAYMENT_LATENCY_SCALE="0",
                          SHUTDOWN_TIMEOUT="3", **PENDING_FOR_A_WHILE)
    post_payment(service.url)

    service.send_signal(signal.SIGTERM)

    assert service.wait(3 + 2) == 0  # SHUTDOWN_TIMEOUT bounds the stop, and the exit follows at once
    eventually(lambda: victoria_metrics.count_points() == 1, message="the point stored")
