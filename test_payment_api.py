"""The behaviour of payment-api, tested against real apps on port 0 (and real Prometheus / victoria-metrics).

Run with `python -m pytest -q`. The harness (fixtures, `eventually`, servers) is in conftest.py.
"""
import dataclasses
import gzip
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest

import payment_api
from conftest import FakeClock, eventually, http, metric_value, require_binary

SEED_PAYMENT = {"amount": 100.50, "currency": "USD", "customerId": "cust_12345", "type": "standard"}


def post_payment(app, body=SEED_PAYMENT, headers=None):
    return http("POST", app.url + "/api/payments", body, headers)


def label_values(app, metric, label):
    from prometheus_client.parser import text_string_to_metric_families
    _, _, text = http("GET", app.url + "/metrics")
    return {sample.labels[label] for family in text_string_to_metric_families(text.decode())
            for sample in family.samples if sample.name == metric}

# ---------------------------------------------------------------- settings


def test_settings_come_from_environment_with_seed_aliases():
    settings = payment_api.Settings.load([], {"PAYMENT_API_PORT": "8081", "PAYMENT_SIMULATION_RATE": "12",
                                              "CURRENCIES": "usd, chf", "INFLUXDB_URL": ""})
    assert (settings.port, settings.simulation_rate, settings.currencies) == (8081, 12.0, ("USD", "CHF"))
    assert payment_api.Settings.load(["--port", "9000"], {"PORT": "8000"}).port == 9000


@pytest.mark.parametrize("variable, value", [("PORT", "abc"), ("PAYMENT_FAILURE_RATE", "2"),
                                             ("SIMULATION_PROFILE", "weekly"), ("SCENARIO_SCHEDULE", "melt@1m+1m")])
def test_a_wrong_setting_stops_start_up_with_one_line_naming_it(variable, value):
    result = subprocess.run([sys.executable, "payment_api.py"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, variable: value, "INFLUXDB_URL": ""}, cwd=os.path.dirname(__file__))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and variable in result.stderr
    assert result.stdout == ""


def test_invalid_influx_batching_values_fall_back_to_defaults_with_a_warning():
    settings = payment_api.Settings.load([], {"INFLUXDB_BATCH_SIZE": "lots", "INFLUXDB_FLUSH_INTERVAL_MS": "-5"})
    assert settings.influxdb_batch_size == payment_api.Settings.influxdb_batch_size
    assert settings.influxdb_flush_interval_ms == payment_api.Settings.influxdb_flush_interval_ms
    assert len(settings.warnings) == 2 and "INFLUXDB_BATCH_SIZE" in settings.warnings[0]


def test_help_lists_every_setting_with_its_variable():
    result = subprocess.run([sys.executable, "payment_api.py", "--help"], capture_output=True, text=True,
                            timeout=30, cwd=os.path.dirname(__file__))
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for spec in payment_api.dataclasses.fields(payment_api.Settings):
        if "env" in spec.metadata and spec.repr:
            assert f"env {spec.metadata['env']}" in help_text
    assert "ADMIN_TOKEN and INFLUXDB_TOKEN are read from the environment only" in help_text


@pytest.mark.parametrize("flag", ["--admin-token", "--influxdb-token"])
def test_secrets_cannot_be_given_as_flags_where_ps_would_show_them(flag):
    with pytest.raises(SystemExit) as exit_info:
        payment_api.Settings.load([flag, "s3cret"], {})
    assert exit_info.value.code == 2
    assert payment_api.Settings.load([], {"ADMIN_TOKEN": "s3cret"}).admin_token == "s3cret"

# ---------------------------------------------------------------- health, metrics, routing


def test_health_reports_up_with_version_timestamp_and_dependencies(app):
    status, headers, body = http("GET", app.url + "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["status"] == "UP" and body["service"] == "payment-api" and body["version"] == payment_api.VERSION
    assert datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert body["dependencies"]["influxdb"]["state"] == "disabled"


def test_metrics_speaks_prometheus_text_openmetrics_and_gzip(app):
    status, headers, text = http("GET", app.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE payment_requests_total counter" in text and b"process_resident_memory_bytes" in text
    _, headers, text = http("GET", app.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and text.endswith(b"# EOF\n")
    _, headers, compressed = http("GET", app.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"payment_duration_seconds" in gzip.decompress(compressed)


def test_metrics_have_the_seed_names_types_and_labels(app):
    post_payment(app)
    from prometheus_client.parser import text_string_to_metric_families
    _, _, text = http("GET", app.url + "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(text.decode())}
    expected = {"payment_requests": ("counter", {"method", "status", "type", "currency"}),
                "payment_amount": ("histogram", {"currency", "status"}),
                "payment_duration_seconds": ("histogram", {"status"}),
                "active_payments": ("gauge", set()), "payment_daily_revenue": ("gauge", {"currency"}),
                "payment_failure_rate": ("gauge", set())}
    for name, (kind, labels) in expected.items():
        family = families[name]
        assert family.type == kind, name
        assert {key for sample in family.samples for key in sample.labels} - {"le"} == labels, name
    buckets = {sample.labels["le"] for sample in families["payment_duration_seconds"].samples if "le" in sample.labels}
    assert "0.5" in buckets


def test_promtool_finds_nothing_to_lint_in_the_metrics(app):
    promtool = require_binary("promtool")
    post_payment(app)
    post_payment(app, {"amount": "x"})
    _, _, text = http("GET", app.url + "/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_unknown_path_is_json_404_and_wrong_method_is_405_with_allow(app):
    status, _, body = http("GET", app.url + "/nope")
    assert status == 404 and "error" in body
    status, headers, body = http("DELETE", app.url + "/api/payments")
    assert status == 405 and set(headers["Allow"].split(", ")) == {"GET", "POST", "HEAD"}
    status, headers, body = http("PATCH", app.url + "/health")
    assert status == 405 and body["allowed"] == ["GET", "HEAD"] == headers["Allow"].split(", ")


def test_head_answers_like_get_without_a_body(app):
    status, headers, body = http("HEAD", app.url + "/health")
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""


def test_a_malformed_request_line_gets_json_not_html(app):
    import socket
    host, port = app.server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.sendall(b"GARBAGE\r\n\r\n")
        reply = connection.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"application/json" in reply and b"<html" not in reply.lower()

def test_overlong_request_line_and_too_many_headers_are_refused(app):
    status, _, body = http("GET", app.url + "/health?" + "x" * 70_000)
    assert status == 414 and "error" in body
    status, _, body = http("GET", app.url + "/health", headers={f"X-{n}": "1" for n in range(120)})
    assert status == 431 and "error" in body


def test_idle_keep_alive_connections_are_closed_after_a_timeout(app, monkeypatch):
    import socket
    monkeypatch.setattr(payment_api.PaymentHandler, "timeout", 0.3)
    with socket.create_connection(app.server.server_address[:2], timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := connection.recv(65536):  # b"" once the server closes the idle connection
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1

def exchange(app, raw, timeout=10):
    """Send raw bytes on one connection and read until the server closes it (or `timeout`)."""
    import socket
    with socket.create_connection(app.server.server_address[:2], timeout=timeout) as connection:
        connection.sendall(raw)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_a_body_left_unread_closes_the_connection_instead_of_corrupting_the_next_request(app):
    reply = exchange(app, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n"
                          b'{"amount": 10}GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
    assert reply.startswith(b"HTTP/1.1 404") and b"Connection: close" in reply and b"400" not in reply


@pytest.mark.parametrize("length, status", [("\u00b2", b"400"), ("9" * 5000, b"400"), ("abc", b"400")])
def test_unusable_content_length_is_a_json_400(app, length, status):
    reply = exchange(app, f"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {length}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 " + status) and b'"error"' in reply


def test_a_body_that_never_arrives_is_answered_408(app, monkeypatch):
    monkeypatch.setattr(payment_api, "BODY_SECONDS", 0.3)
    reply = exchange(app, b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"amount\"")
    assert reply.startswith(b"HTTP/1.1 408")


def test_an_oversized_upload_still_receives_its_413(app):
    import http.client
    host, port = app.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("POST", "/api/payments", body=b"x" * 3_000_000, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]
    connection.close()


def test_a_connection_reset_by_the_client_prints_no_traceback(app, capsys, caplog):
    import socket
    import struct
    connection = socket.create_connection(app.server.server_address[:2], timeout=10)
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.recv(65536).startswith(b"HTTP/1.1 200")
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()  # with linger 0: a reset, as wrk does at the end of a run
    eventually(lambda: not app.server.connections, message="the server noticed the reset")
    assert capsys.readouterr().err == "" and not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_client_that_hangs_up_early_causes_no_error(app, caplog):
    exchange(app, b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Simulate-Latency: 0.2\r\nContent-Length: 13\r\n\r\n{\"amount\": 5}", timeout=0.05)
    eventually(lambda: app.stats.snapshot()["totals"]["payments"] == 1)
    assert http("GET", app.url + "/health")[0] == 200
    assert not [record for record in caplog.records if record.levelname == "ERROR"]

# ---------------------------------------------------------------- payments


def test_seed_quick_start_payment_succeeds_with_defaults(app):
    status, _, body = post_payment(app, {"amount": 100, "currency": "USD"})
    assert status == 200
    assert body["success"] is True and body["status"] == "completed" and body["paymentId"].startswith("pay_")
    assert (body["amount"], body["currency"], body["type"]) == (100.0, "USD", "standard")
    assert body["customerId"].startswith("cust_") and body["processingTime"] > 0
    assert datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")


def test_payment_is_counted_in_every_metric(app):
    post_payment(app, {**SEED_PAYMENT, "currency": "EUR", "type": "express"})
    assert metric_value(app.url, "payment_requests_total", method="POST", status="200", type="express",
                        currency="EUR") == 1
    assert metric_value(app.url, "payment_amount_sum", currency="EUR", status="success") == 100.5
    assert metric_value(app.url, "payment_duration_seconds_count", status="success") == 1
    assert metric_value(app.url, "payment_daily_revenue", currency="EUR") == 100.5
    assert metric_value(app.url, "active_payments") == 0


def test_processing_failure_answers_500_and_is_counted_as_failed(make_app):
    app = make_app(failure_rate=1.0)
    status, _, body = post_payment(app)
    assert status == 500 and body["success"] is False and body["error"] == "Payment processing failed"
    assert body["paymentId"] and body["amount"] == 100.5
    assert metric_value(app.url, "payment_requests_total", status="500") == 1
    assert metric_value(app.url, "payment_duration_seconds_count", status="failed") == 1
    assert metric_value(app.url, "payment_failure_rate") == 100.0
    assert metric_value(app.url, "payment_daily_revenue") == 0


@pytest.mark.parametrize("body, field", [
    ({}, "amount"), ({"amount": "100"}, "amount"), ({"amount": True}, "amount"), ({"amount": 0}, "amount"),
    ({"amount": -5}, "amount"), ({"amount": 1000000.01}, "amount"), ({"amount": 10.001}, "amount"),
    ({"amount": None}, "amount"), ({"amount": [1]}, "amount"),
    ({"amount": 10, "currency": "XXX"}, "currency"), ({"amount": 10, "currency": 5}, "currency"),
    ({"amount": 10, "type": "instant"}, "type"), ({"amount": 10, "customerId": "x" * 65}, "customerId"),
    ({"amount": 10, "customerId": "bad id!"}, "customerId"), ({"amount": 10, "customerId": 7}, "customerId"),
])
def test_invalid_field_is_rejected_with_400_naming_it(app, body, field):
    status, _, answer = post_payment(app, body)
    assert status == 400 and answer["field"] == field and answer["error"]


@pytest.mark.parametrize("raw", [b'{"amount": 1e999}', b'{"amount": Infinity}', b'{"amount": NaN}',
                                 b'{"amount": -Infinity}', b'{"amount": 1' + b"0" * 5000 + b"}"])
def test_non_finite_or_huge_amounts_are_rejected_without_crashing(app, raw):
    status, _, answer = post_payment(app, raw)
    assert status == 400 and "error" in answer
    assert http("GET", app.url + "/health")[0] == 200


@pytest.mark.parametrize("raw, status", [(b"{not json", 400), (b"[1, 2]", 400), (b'"amount"', 400),
                                         (b"[" * 50000 + b"]" * 50000, 413), (b"[" * 30000, 400),
                                         (b"\xff\xfe", 400)])
def test_malformed_bodies_get_json_errors(app, raw, status):
    answer_status, headers, answer = post_payment(app, raw)
    assert answer_status == status and headers["Content-Type"] == "application/json" and answer["error"]


def test_wrong_content_type_is_415_and_oversized_body_is_413(app):
    status, _, answer = http("POST", app.url + "/api/payments", b"amount=100",
                             {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "application/json" in answer["error"]
    status, _, answer = post_payment(app, b'{"amount": 1, "pad": "' + b"x" * 70000 + b'"}')
    assert status == 413


def test_invalid_currency_is_rejected_without_new_label_values(app):
    before = label_values(app, "payment_requests_total", "currency"), label_values(app, "payment_requests_total", "type")
    for number in range(500):
        post_payment(app, {"amount": 10, "currency": f"X{number:03d}", "type": f"t{number}"})
    after = label_values(app, "payment_requests_total", "currency"), label_values(app, "payment_requests_total", "type")
    assert after[0] == before[0] | {"invalid"} and after[1] == before[1] | {"invalid"}
    assert metric_value(app.url, "payment_requests_total", status="400", currency="invalid", type="invalid") == 500


def test_rejections_keep_the_valid_labels_they_named(app):
    post_payment(app, {"amount": -1, "currency": "GBP", "type": "recurring"})
    assert metric_value(app.url, "payment_requests_total", status="400", currency="GBP", type="recurring") == 1


def test_payment_can_be_looked_up_by_id_and_unknown_id_is_404(app):
    _, _, created = post_payment(app)
    status, _, found = http("GET", f"{app.url}/api/payments/{created['paymentId']}")
    assert status == 200 and found == created
    status, _, body = http("GET", app.url + "/api/payments/pay_missing")
    assert status == 404 and body["paymentId"] == "pay_missing"


def test_store_keeps_only_the_most_recent_payments(make_app):
    app = make_app(store_size=5, latency_scale=0)
    ids = [post_payment(app)[2]["paymentId"] for _ in range(8)]
    assert http("GET", f"{app.url}/api/payments/{ids[0]}")[0] == 404
    assert http("GET", f"{app.url}/api/payments/{ids[-1]}")[0] == 200
    status, _, listing = http("GET", app.url + "/api/payments?limit=100")
    assert [payment["paymentId"] for payment in listing["payments"]] == ids[:2:-1]


def test_listing_is_newest_first_and_limit_is_validated(make_app):
    app = make_app(latency_scale=0)
    ids = [post_payment(app)[2]["paymentId"] for _ in range(3)]
    _, _, listing = http("GET", app.url + "/api/payments?limit=2")
    assert [payment["paymentId"] for payment in listing["payments"]] == ids[:0:-1]
    assert http("GET", app.url + "/api/payments?limit=zero")[0] == 400


def test_stats_report_outcomes_rates_and_todays_revenue(make_app):
    app = make_app(latency_scale=0)
    post_payment(app, {"amount": 10, "currency": "EUR"})
    post_payment(app, {"amount": 5.25, "currency": "EUR"})
    post_payment(app, {"amount": 1}, {"X-Simulate-Failure": "true"})
    post_payment(app, {"amount": -1})
    _, _, stats = http("GET", app.url + "/api/payments/stats")
    assert stats["totals"] == {"payments": 3, "succeeded": 2, "declined": 0, "failed": 1, "rejected": 1}
    assert stats["successRate"] == 66.67 and stats["failureRate"] == 33.33
    assert stats["dailyRevenue"]["EUR"] == 15.25 and stats["activePayments"] == 0


def test_activity_counts_the_last_minutes_second_by_second_with_the_recent_p95(make_app):
    clock = FakeClock(now=1_800_000_000.0)
    app = make_app(clock=clock, latency_scale=0)  # only the payment asking for 0.2 s takes any time
    post_payment(app, headers={"X-Simulate-Latency": "0.2"})
    clock.advance(1)
    post_payment(app, headers={"X-Simulate-Failure": "true"})
    post_payment(app, {**SEED_PAYMENT, "cardNumber": "4000000000000002"})

    status, _, activity = http("GET", app.url + "/api/activity?seconds=3")
    assert status == 200 and activity["windowSeconds"] == 3
    assert [(s["payments"], s["failed"], s["declined"]) for s in activity["seconds"]] == [(0, 0, 0), (1, 0, 0),
                                                                                         (2, 1, 1)]
    assert activity["seconds"][-1]["time"] == "2027-01-15T08:00:01.000Z"
    assert activity["p95ProcessingTime"] == 0.2
    clock.advance(payment_api.PaymentStats.ACTIVITY_SECONDS)
    assert sum(s["payments"] for s in http("GET", app.url + "/api/activity")[2]["seconds"]) == 0


@pytest.mark.parametrize("query", ["seconds=0", "seconds=301", "seconds=%C2%B2", "seconds=", "minutes=5"])
def test_odd_activity_windows_are_a_400(app, query):
    status, _, body = http("GET", app.url + "/api/activity?" + query)
    assert status == 400 and body["field"] in ("seconds", "minutes")


def test_daily_revenue_resets_at_utc_midnight(make_app):
    clock = FakeClock(datetime(2026, 11, 26, 23, 59, 50, tzinfo=timezone.utc).timestamp())
    app = make_app(clock=clock, latency_scale=0)
    post_payment(app, {"amount": 40, "currency": "GBP"})
    assert metric_value(app.url, "payment_daily_revenue", currency="GBP") == 40
    clock.advance(11)
    assert metric_value(app.url, "payment_daily_revenue", currency="GBP") == 0
    post_payment(app, {"amount": 2, "currency": "GBP"})
    _, _, stats = http("GET", app.url + "/api/payments/stats")
    assert stats["dailyRevenue"] == {"date": "2026-11-27", "USD": 0.0, "EUR": 0.0, "GBP": 2.0}
    assert stats["revenueSinceStart"]["GBP"] == 42


def test_failure_rate_gauge_covers_only_the_last_minute(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, latency_scale=0)
    post_payment(app, headers={"X-Simulate-Failure": "true"})
    post_payment(app)
    assert metric_value(app.url, "payment_failure_rate") == 50
    clock.advance(61)
    post_payment(app)
    assert metric_value(app.url, "payment_failure_rate") == 0


def test_fault_headers_force_a_failure_or_a_delay(app):
    status, _, body = post_payment(app, headers={"X-Simulate-Failure": "true"})
    assert status == 500
    status, _, body = post_payment(app, headers={"X-Simulate-Latency": "0.3"})
    assert status == 200 and body["processingTime"] == 0.3
    status, _, body = post_payment(app, headers={"X-Simulate-Latency": "nan"})
    assert status == 400 and body["field"] == "headers"


def test_processing_time_is_long_tailed_with_p95_under_the_slo():
    import random
    processor = payment_api.PaymentProcessor(payment_api.Settings(), None, _Null(), None, None, float,
                                             payment_api.DisabledTracer("not traced"))
    rng = random.Random(1)
    requests = [payment_api.PaymentRequest(1, "USD", kind, "c")
                for kind in ("standard",) * 7 + ("express",) * 2 + ("recurring",)]
    times = sorted(processor.begin(requests[n % 10], rng, "test").processing_time for n in range(20000))
    p50, p95, p99 = (times[int(len(times) * q)] for q in (0.5, 0.95, 0.99))
    assert 0.08 < p50 < 0.15 and 0.25 < p95 < 0.4 and p99 > 1.4 * p95


class _Null:
    def __getattr__(self, name):
        return lambda *args: None


# ---------------------------------------------------------------- concurrency and shutdown


def test_health_answers_while_fifty_slow_payments_are_in_flight(app):
    slow = [threading.Thread(target=post_payment, args=(app, SEED_PAYMENT, {"X-Simulate-Latency": "3"}))
            for _ in range(50)]
    for thread in slow:
        thread.start()
    eventually(lambda: metric_value(app.url, "active_payments") == 50, message="50 payments in flight")
    assert http("GET", app.url + "/health", timeout=1)[0] == 200
    for thread in slow:
        thread.join()
    assert metric_value(app.url, "payment_duration_seconds_count") == 50


def test_stop_lets_requests_in_flight_finish_and_leaves_no_thread(make_app):
    threads_before = set(threading.enumerate())
    app = make_app(simulation_enabled=True, simulation_rate=20)
    answers = []
    client = threading.Thread(target=lambda: answers.append(post_payment(app, headers={"X-Simulate-Latency": "1"})))
    client.start()
    eventually(lambda: app.stats.active >= 1)
    http("GET", app.url + "/health")  # leaves an idle keep-alive connection behind in the server
    app.stop()
    client.join()
    assert answers[0][0] == 200 and app.stats.active == 0
    assert set(threading.enumerate()) - threads_before == set()


def test_stop_is_bounded_when_a_request_would_take_longer(make_app):
    app = make_app(shutdown_timeout=0.5)
    answers = []
    client = threading.Thread(target=lambda: answers.append(post_payment(app, headers={"X-Simulate-Latency": "20"})))
    client.start()
    eventually(lambda: app.stats.active >= 1)
    app.stop()
    client.join()
    assert answers[0][0] == 200


def test_sigterm_stops_the_process_cleanly_with_exit_code_0(run_service):
    service = run_service(INFLUXDB_URL="")
    service.send_signal(signal.SIGTERM)
    assert service.wait(20) == 0
    lines = service.log_path.read_text().splitlines()  # stdout and stderr: no traceback, only JSON events
    events = [json.loads(line)["event"] for line in lines]
    assert any(event.startswith("payment-api listening on http://127.0.0.1:") for event in events)
    assert events[-1] == "stopped"


def test_access_log_is_one_json_line_per_request_and_scrapes_are_debug(app, caplog):
    caplog.set_level("DEBUG", logger="payment_api")
    post_payment(app)
    http("GET", app.url + "/metrics")
    requests = eventually(lambda: [r for r in caplog.records if r.getMessage() == "request"][1:] and [
        r for r in caplog.records if r.getMessage() == "request"])  # the line follows the answer
    assert [(r.levelname, r.fields["path"], r.fields["status"]) for r in requests] == [
        ("INFO", "/api/payments", 200), ("DEBUG", "/metrics", 200)]
    line = json.loads(payment_api.LogFormatter("json").format(requests[0]))
    assert line["event"] == "request" and line["method"] == "POST" and line["durationMs"] > 0


def test_admin_token_never_appears_in_logs_or_answers(make_app, caplog):
    caplog.set_level("DEBUG")
    app = make_app(admin_token="s3cret-admin", influxdb_token="s3cret-influx")
    answers = [http("GET", app.url + path)[2] for path in ("/health", "/api/simulation", "/api/scenarios")]
    assert "s3cret" not in json.dumps(answers) + caplog.text + repr(app.settings)

# ---------------------------------------------------------------- simulator


def test_simulated_payments_appear_in_every_metric_and_in_the_store(make_app):
    app = make_app(simulation_enabled=True, simulation_rate=100, latency_scale=0.1)
    eventually(lambda: metric_value(app.url, "payment_duration_seconds_count") >= 50)
    assert metric_value(app.url, "payment_requests_total", method="POST") >= 50
    assert metric_value(app.url, "payment_amount_count") >= 50
    assert sum(metric_value(app.url, "payment_daily_revenue", currency=c) for c in ("USD", "EUR", "GBP")) > 0
    _, _, listing = http("GET", app.url + "/api/payments?limit=5")
    newest = listing["payments"][0]
    assert newest["source"] == "simulator"
    assert http("GET", f"{app.url}/api/payments/{newest['paymentId']}")[2] == newest


def _first_payments(seed, count):
    clock = FakeClock()
    settings = payment_api.dataclasses.replace(
        payment_api.Settings(), simulation_seed=seed, simulation_rate=200, influxdb_url="", store_size=10_000)
    app = payment_api.PaymentApp(settings, monotonic=clock)
    for _ in range(100):
        app.simulator.tick(clock.advance(0.1))
    payments = list(reversed(app.store.recent(count)))
    return [(p.request, p.http_status, round(p.processing_time, 9)) for p in payments]  # ids stay unique


def test_a_seed_makes_the_simulated_payments_reproducible():
    first, again, other = _first_payments(42, 500), _first_payments(42, 500), _first_payments(43, 500)
    assert len(first) == 500 and first == again and first != other


def test_simulated_arrivals_match_the_rate_within_poisson_noise():
    clock = FakeClock()
    settings = payment_api.dataclasses.replace(payment_api.Settings(), simulation_rate=200, latency_scale=0,
                                               influxdb_url="", simulation_seed=1)
    app = payment_api.PaymentApp(settings, monotonic=clock)
    for _ in range(60):  # one tick a second: the scheduler catches up instead of falling behind
        app.simulator.tick(clock.advance(1.0))
    expected = 200 * 59  # arrivals are drawn from the first tick on, one second after the clock's start
    # Within 4 standard deviations: one seed's count lies anywhere in the Poisson noise (over seeds 1-40: mean
    # 0.11, standard deviation 0.95, in standard deviations); losing or adding 5 % of arrivals would be 5.4 off
    assert abs(app.stats.snapshot()["totals"]["payments"] - expected) < 4 * expected ** 0.5


def test_a_simulator_too_far_behind_skips_late_payments_and_says_so_once(caplog):
    caplog.set_level("INFO", logger="payment_api")
    clock = FakeClock()
    settings = payment_api.dataclasses.replace(payment_api.Settings(), simulation_rate=100, latency_scale=0,
                                               influxdb_url="", simulation_seed=1, log_payments=False)
    app = payment_api.PaymentApp(settings, monotonic=clock)
    app.simulator.tick(clock.advance(1.0))
    for _ in range(2):  # two stalls of 20 s, as a machine that cannot keep up
        before = app.stats.snapshot()["totals"]["payments"]
        app.simulator.tick(clock.advance(20.0))
        made = app.stats.snapshot()["totals"]["payments"] - before
        # only the last MAX_LAG_SECONDS are made up: 500 payments, not 2,000
        assert abs(made - 100 * payment_api.MAX_LAG_SECONDS) < 4 * 500 ** 0.5
    said = [record for record in caplog.records if record.getMessage().startswith("simulator cannot keep up")]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert said[0].fields["rate"] == 100 and said[0].fields["skipped_seconds"] > 14


def test_simulator_keeps_its_rate_in_real_time(make_app):
    app = make_app(simulation_enabled=True, simulation_rate=200, latency_scale=0)
    start = app.stats.snapshot()["totals"]["payments"]
    started = payment_api.time.monotonic()
    eventually(lambda: payment_api.time.monotonic() - started > 3, interval=0.1)
    made = app.stats.snapshot()["totals"]["payments"] - start
    expected = 200 * (payment_api.time.monotonic() - started)
    assert abs(made - expected) < 4 * expected ** 0.5 + 10


def test_many_simulated_payments_in_flight_use_one_thread(make_app):
    threads_before = threading.active_count()
    app = make_app(simulation_enabled=True, simulation_rate=1000)
    eventually(lambda: app.stats.active > 50, message="payments in flight")
    assert metric_value(app.url, "active_payments") > 50
    assert threading.active_count() - threads_before <= 4  # server, overflow, simulator, at most one connection


def test_disabled_simulator_makes_no_payments():
    clock = FakeClock()
    settings = payment_api.dataclasses.replace(payment_api.Settings(), simulation_enabled=False, influxdb_url="")
    app = payment_api.PaymentApp(settings, monotonic=clock)
    for _ in range(10):
        app.simulator.tick(clock.advance(1.0))
    assert app.stats.snapshot()["totals"]["payments"] == 0 and app.simulator.current_rate(clock()) == 0


def test_simulated_traffic_has_the_documented_mix():
    from collections import Counter as Tally
    clock = FakeClock()
    settings = payment_api.dataclasses.replace(payment_api.Settings(), simulation_rate=500, influxdb_url="",
                                               simulation_seed=3, latency_scale=0, store_size=20_000)
    app = payment_api.PaymentApp(settings, monotonic=clock)
    for _ in range(30):
        app.simulator.tick(clock.advance(1.0))
    payments = app.store.recent(20_000)
    currencies = Tally(p.request.currency for p in payments)
    types = Tally(p.request.type for p in payments)
    customers = Tally(p.request.customer_id for p in payments)
    share = lambda tally, key: tally[key] / len(payments)  # noqa: E731
    assert abs(share(currencies, "EUR") - 0.5) < 0.03 and abs(share(types, "standard") - 0.7) < 0.03
    assert sum(1 for p in payments if p.request.amount <= 200) / len(payments) > 0.6
    assert max(p.request.amount for p in payments) <= 6000
    top_tenth = sum(count for _, count in customers.most_common(len(customers) // 10))
    assert top_tenth / len(payments) > 0.4  # a minority of returning customers make a large share


def test_request_type_amount_band_and_method_follow_their_weights_independently():
    """Each has its own shares, and knowing one tells nothing about the others."""
    rng = random.Random(7)
    requests = [payment_api.draw_request(rng, ("EUR", "USD", "GBP")) for _ in range(60_000)]
    draws = [(float(r.amount), r.currency, r.type, r.customer_id, r.method) for r in requests]

    def band(amount):
        return next(number for number, (_, low, high) in enumerate(payment_api.AMOUNT_BANDS) if amount <= high)

    def shares(values, keys):
        return [sum(value == key for value in values) / len(values) for key in keys]

    types = [payment_type for _, _, payment_type, _, _ in draws]
    methods = [method for _, _, _, _, method in draws]
    bands = [band(amount) for amount, _, _, _, _ in draws]
    expected_types = [weight / 100 for weight in payment_api.TYPE_WEIGHTS]
    expected_methods = [weight / 100 for weight in payment_api.METHOD_WEIGHTS]
    expected_bands = [share for share, _, _ in payment_api.AMOUNT_BANDS]
    assert shares(types, payment_api.PAYMENT_TYPES) == pytest.approx(expected_types, abs=0.01)
    assert shares(methods, payment_api.PAYMENT_METHODS) == pytest.approx(expected_methods, abs=0.01)
    assert shares(bands, range(3)) == pytest.approx(expected_bands, abs=0.01)
    express = [draw for draw, payment_type in zip(draws, types) if payment_type == "express"]
    assert shares([method for *_, method in express], payment_api.PAYMENT_METHODS) == pytest.approx(
        expected_methods, abs=0.02)
    large = [draw for draw, amount_band in zip(draws, bands) if amount_band == 2]
    assert shares([payment_type for _, _, payment_type, _, _ in large], payment_api.PAYMENT_TYPES) == pytest.approx(
        expected_types, abs=0.03)
    amounts = sorted(amount for amount, _, _, _, _ in draws)
    assert amounts[0] >= 10 and amounts[-1] <= 6000


@pytest.mark.parametrize("profile", payment_api.PROFILES)
def test_each_traffic_profile_averages_to_the_configured_rate(profile):
    period = 3600
    samples = [payment_api.profile_factor(profile, second, period) for second in range(period)]
    assert abs(sum(samples) / len(samples) - 1) < 0.01
    if profile != "steady":
        assert max(samples) / min(samples) > 3


def test_simulation_can_be_read_and_changed_at_runtime(app):
    # Off, with the configured rate it would run at (the gauge payment_simulation_rate says 0 while it is off)
    assert http("GET", app.url + "/api/simulation")[2] == {"enabled": False, "rate": app.settings.simulation_rate,
                                                           "profile": "steady", "seed": None}
    status, _, config = http("PUT", app.url + "/api/simulation", {"enabled": True, "rate": 300, "seed": 5})
    assert status == 200 and config == {"enabled": True, "rate": 300.0, "profile": "steady", "seed": 5}
    eventually(lambda: metric_value(app.url, "payment_duration_seconds_count") > 20)
    assert metric_value(app.url, "payment_simulation_rate") == 300
    http("PUT", app.url + "/api/simulation", {"enabled": False})
    assert metric_value(app.url, "payment_simulation_rate") == 0


@pytest.mark.parametrize("change", [{"rate": -1}, {"rate": "fast"}, {"rate": 1e9}, {"enabled": "yes"},
                                    {"profile": "weekly"}, {"seed": 1.5}, {"speed": 1}])
def test_invalid_simulation_changes_are_rejected(app, change):
    status, _, body = http("PUT", app.url + "/api/simulation", change)
    assert status == 400 and body["field"] in change

# ---------------------------------------------------------------- incident scenarios


def test_scenarios_are_listed_started_and_stopped(app):
    _, _, listing = http("GET", app.url + "/api/scenarios")
    names = {scenario["name"] for scenario in listing["scenarios"]}
    assert {"error_spike", "latency_degradation", "outage", "traffic_surge", "currency_outage"} <= names
    status, _, started = http("POST", app.url + "/api/scenarios/error_spike")
    assert status == 200 and started["active"] is True
    assert metric_value(app.url, "payment_scenario_active", scenario="error_spike") == 1
    status, _, stopped = http("DELETE", app.url + "/api/scenarios/error_spike")
    assert status == 200 and stopped["active"] is False
    assert metric_value(app.url, "payment_scenario_active", scenario="error_spike") == 0
    _, _, history = http("GET", app.url + "/api/scenarios/history")
    assert [(h["scenario"], h["startedBy"], h["stoppedBy"]) for h in history["history"]] == [
        ("error_spike", "api", "api")]


def test_a_route_of_its_own_is_no_scenario_name(app):
    status, headers, _ = http("POST", app.url + "/api/scenarios/history")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert not any(scenario["active"] for scenario in http("GET", app.url + "/api/scenarios")[2]["scenarios"])


@pytest.mark.parametrize("body", [b"false", b"0", b'""', b"[]"])
def test_an_optional_body_must_be_an_object_or_nothing(app, body):
    for path in ("/api/scenarios/error_spike", "/api/payments/pay_nothing/refunds"):
        status, _, answer = http("POST", app.url + path, body)
        assert status == 400 and answer["error"] == "body must be a JSON object"
    assert http("POST", app.url + "/api/scenarios/error_spike", b"null")[0] == 200


def test_scenario_with_a_duration_stops_by_itself(make_app):
    clock = FakeClock()
    app = make_app(clock=clock)
    http("POST", app.url + "/api/scenarios/outage", {"duration": 30})
    assert post_payment(app)[0] == 503
    clock.advance(31)
    assert post_payment(app)[0] == 200
    _, _, history = http("GET", app.url + "/api/scenarios/history")
    assert history["history"][0]["stoppedBy"] == "duration"


@pytest.mark.parametrize("path, body, status", [("/api/scenarios/meltdown", None, 404),
                                                ("/api/scenarios/outage", {"duration": -1}, 400),
                                                ("/api/scenarios/outage", {"duration": "long"}, 400),
                                                ("/api/scenarios/outage", [1], 400)])
def test_bad_scenario_requests_are_rejected(app, path, body, status):
    assert http("POST", app.url + path, body)[0] == status


def test_outage_answers_503_and_counts_it(app):
    http("POST", app.url + "/api/scenarios/outage")
    status, _, body = post_payment(app)
    assert status == 503 and body["error"] == "Payment service unavailable"
    assert metric_value(app.url, "payment_requests_total", status="503") == 1


def test_error_spike_raises_the_failure_ratio_well_above_five_percent(make_app):
    app = make_app(latency_scale=0)
    http("POST", app.url + "/api/scenarios/error_spike")
    failed = sum(post_payment(app)[0] == 500 for _ in range(200))
    assert 30 < failed < 80  # 25 % of 200, far from the 3 % of normal traffic


def test_currency_outage_fails_only_the_last_currency(make_app):
    app = make_app(latency_scale=0, failure_rate=0)
    http("POST", app.url + "/api/scenarios/currency_outage")
    assert post_payment(app, {"amount": 1, "currency": "GBP"})[0] == 500
    assert post_payment(app, {"amount": 1, "currency": "USD"})[0] == 200


def test_latency_degradation_and_traffic_surge_change_processing_and_rate(make_app):
    clock = FakeClock()
    app = make_app(monotonic=clock, simulation_enabled=True, simulation_rate=10)
    assert app.simulator.current_rate(clock()) == 10
    http("POST", app.url + "/api/scenarios/traffic_surge")
    http("POST", app.url + "/api/scenarios/latency_degradation")
    assert app.simulator.current_rate(clock()) == 50 and app.scenarios.effects().latency_factor == 4


def test_schedule_starts_and_stops_scenarios_unattended(make_app):
    clock = FakeClock()
    schedule = payment_api.parse_schedule("error_spike@2m+5m,random@10m+1m/20m")
    app = make_app(clock=clock, scenario_schedule=schedule, simulation_seed=1)
    assert not any(app.scenarios.active_flags().values())
    clock.advance(150)
    assert app.scenarios.active_flags()["error_spike"]
    clock.advance(300)
    assert not any(app.scenarios.active_flags().values())
    clock.advance(155)  # 10m05s: the random one runs
    assert sum(app.scenarios.active_flags().values()) == 1
    clock.advance(20 * 60)
    assert sum(app.scenarios.active_flags().values()) == 1
    _, _, history = http("GET", app.url + "/api/scenarios/history")
    assert history["history"][0] | {"startedAt": None, "stoppedAt": None} == {
        "scenario": "error_spike", "startedBy": "schedule", "stoppedBy": "schedule",
        "startedAt": None, "stoppedAt": None}
    assert len(history["history"]) == 3


def test_admin_token_guards_changes_but_not_reads(make_app):
    app = make_app(admin_token="trainer")
    assert http("POST", app.url + "/api/scenarios/outage")[0] == 401
    assert http("PUT", app.url + "/api/simulation", {"rate": 1})[0] == 401
    assert http("GET", app.url + "/api/scenarios")[0] == 200
    assert http("POST", app.url + "/api/scenarios/outage", headers={"Authorization": "Bearer trainer"})[0] == 200

# ---------------------------------------------------------------- trace context, exemplars and payment logs

CLIENT_TRACE_ID, CLIENT_SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize("header, sampled", [(f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", True),
                                             (f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00", False),
                                             (f" 00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-09 ", True),
                                             (f"cc-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01-later-fields", True)])
def test_a_valid_traceparent_makes_the_payment_a_child_of_the_clients_span(header, sampled):
    trace = payment_api.trace_context([header])
    assert (trace.trace_id, trace.parent_span_id, trace.sampled) == (CLIENT_TRACE_ID, CLIENT_SPAN_ID, sampled)
    assert trace.span_id != CLIENT_SPAN_ID and len(trace.span_id) == 16


@pytest.mark.parametrize("headers", [
    [f"00-{CLIENT_TRACE_ID.upper()}-{CLIENT_SPAN_ID}-01"], [f"00-{'0' * 32}-{CLIENT_SPAN_ID}-01"],
    [f"00-{CLIENT_TRACE_ID}-{'0' * 16}-01"], [f"ff-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"],
    [f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01-more"], [f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-1"],
    [f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"] * 2, ["\x00garbage"], []])
def test_an_invalid_or_absent_traceparent_starts_a_new_trace(headers):
    trace = payment_api.trace_context(headers)
    assert trace.trace_id != CLIENT_TRACE_ID and len(trace.trace_id) == 32 and int(trace.trace_id, 16)
    assert trace.parent_span_id is None and trace.sampled


def test_a_payment_answers_with_its_trace_in_header_json_store_and_listing(app):
    status, headers, body = post_payment(app, headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"})
    assert status == 200 and body["traceId"] == CLIENT_TRACE_ID
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE_ID, "01") and span_id != CLIENT_SPAN_ID
    assert http("GET", app.url + "/api/payments/" + body["paymentId"])[2]["traceId"] == CLIENT_TRACE_ID
    assert http("GET", app.url + "/api/payments")[2]["payments"][0]["traceId"] == CLIENT_TRACE_ID


def test_a_malformed_traceparent_is_ignored_never_an_error(app):
    status, headers, body = post_payment(app, headers={"traceparent": "00-not-a-trace-01"})
    assert status == 200 and len(body["traceId"]) == 32
    assert headers["traceparent"] == f"00-{body['traceId']}-{headers['traceparent'].split('-')[2]}-01"


def test_a_replayed_answer_carries_the_first_payments_trace(app):
    key = {"Idempotency-Key": "order-trace-1"}
    _, first_headers, first = post_payment(app, headers=key)
    _, replay_headers, replay = post_payment(app, headers={**key, "traceparent": f"00-{CLIENT_TRACE_ID}-"
                                                                                 f"{CLIENT_SPAN_ID}-01"})
    assert replay["traceId"] == first["traceId"] and replay_headers["traceparent"] == first_headers["traceparent"]


def openmetrics_exemplars(app, metric):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    _, _, text = http("GET", app.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    return [sample.exemplar for family in text_string_to_metric_families(text.decode())
            for sample in family.samples if sample.name == metric and sample.exemplar]


def test_exemplars_carry_the_payments_trace_id_in_openmetrics_only(app):
    _, _, body = post_payment(app, headers={"X-Simulate-Latency": "0.12"})
    for metric in ("payment_duration_seconds_bucket", "payment_requests_total"):
        assert [exemplar.labels for exemplar in openmetrics_exemplars(app, metric)] == [{"trace_id": body["traceId"]}]
    assert openmetrics_exemplars(app, "payment_duration_seconds_bucket")[0].value == 0.12
    _, _, classic = http("GET", app.url + "/metrics")
    assert b"trace_id" not in classic


class PaymentLines:
    """The `payment` events written to stdout so far (JSON lines, written past logging's
    records: capsys, not caplog, sees them)."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.events = []

    def __call__(self):
        for line in self.capsys.readouterr().out.splitlines():
            event = json.loads(line)
            assert event["event"] == "payment" and event["level"] == "info"
            self.events.append(event)
        return self.events


def test_every_completed_payment_logs_one_payment_event_with_its_ids(make_app, caplog, capsys):
    caplog.set_level("INFO", logger="payment_api")
    app = make_app(simulation_enabled=True, simulation_rate=50.0)
    _, headers, body = post_payment(app, {**SEED_PAYMENT, "cardNumber": "4000000000009995"},
                                    headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"})
    payment_lines = PaymentLines(capsys)
    events = eventually(lambda: [event for event in payment_lines() if event["source"] == "simulator"]
                        and payment_lines())
    lines = [{key: value for key, value in event.items() if key not in ("time", "level", "event")}
             for event in events]
    mine = [fields for fields in lines if fields["payment_id"] == body["paymentId"]]
    assert mine == [{"trace_id": CLIENT_TRACE_ID, "span_id": headers["traceparent"].split("-")[2],
                     "payment_id": body["paymentId"], "status": "declined", "http_status": 402, "amount": 100.5,
                     "currency": "USD", "type": "standard", "method": "card", "customer_id": "cust_12345",
                     "source": "api", "processing_seconds": body["processingTime"],
                     "decline_code": body["declineCode"]}]
    assert "cardNumber" not in caplog.text and "4000000000009995" not in caplog.text
    assert "cardNumber" not in json.dumps(events) and "4000000000009995" not in json.dumps(events)
    assert all(len(fields["trace_id"]) == 32 for fields in lines)


def test_log_payments_false_turns_payment_lines_off(make_app, caplog, capsys):
    caplog.set_level("INFO", logger="payment_api")
    app = make_app(log_payments=False)
    assert post_payment(app)[0] == 200
    eventually(lambda: any(record.getMessage() == "request" for record in caplog.records))
    assert not [record for record in caplog.records if record.getMessage() == "payment"]
    assert '"payment"' not in capsys.readouterr().out


@pytest.mark.parametrize("status, fault, effects", [
    (200, payment_api.Fault(), payment_api.NO_EFFECTS),
    (402, payment_api.Fault(), payment_api.NO_EFFECTS),
    (500, payment_api.Fault(fail=True), payment_api.NO_EFFECTS),
    (500, payment_api.Fault(), payment_api.SCENARIOS["currency_outage"][1]),
    (503, payment_api.Fault(), payment_api.SCENARIOS["outage"][1])])
def test_the_fast_payment_line_is_what_the_log_formatter_writes(make_app, status, fault, effects):
    app = make_app(log_payments=False)
    request = payment_api.PaymentRequest(payment_api.Decimal("12.30"), "GBP", "express", "cust_00042",
                                         decline_code="insufficient_funds" if status == 402 else None)
    payment = app.processor.begin(request, random.Random(3), "api", effects, fault)
    payment.completed_at = 1_790_000_000.5
    assert payment.http_status == status
    record = logging.LogRecord("payment_api", logging.INFO, "", 0, "payment", (), None)
    record.created = 1_790_000_000.0125
    record.fields = payment_api.log_fields(payment)
    expected = payment_api.LogFormatter("json").format(record) + "\n"
    assert payment_api.json_log_line(payment, record.created) == expected


def test_a_payment_log_line_in_text_format_keeps_its_ids_as_plain_values():
    payment = payment_api.Payment("pay_1", payment_api.PaymentRequest(1, "USD", "standard", "cust_00001"), "api",
                                  0.1, 500, 0.0, trace=payment_api.trace_context(()),
                                  failure_reason="bank gateway error")
    record = logging.LogRecord("payment_api", logging.INFO, "", 0, "payment", (), None)
    record.fields = payment_api.log_fields(payment)
    line = payment_api.LogFormatter("text").format(record)
    assert f" payment trace_id={payment.trace.trace_id} " in line and ' reason="bank gateway error"' in line


def processing_steps(effects=payment_api.Effects(), fault=payment_api.Fault(), status=200, currency="USD",
                     rng_draws=(0.5,)):
    """(processing time, steps) of a standard payment drawn at the median time, its uniform draws `rng_draws`
    (then 0.5): the first decides a slow bank."""
    class Draws:
        def __init__(self):
            self.values = iter(rng_draws)

        def lognormvariate(self, mu, sigma):
            return math.exp(mu)  # the median: 0.12 s

        def random(self):
            return next(self.values, 0.5)
    request = payment_api.PaymentRequest(1, currency, "standard", "cust_00001")
    settings = dataclasses.replace(payment_api.Settings(), failure_rate=0.0, decline_rate=0.0)
    status_drawn, processing_time, usual_time = payment_api.draw_outcome(Draws(), request, settings, effects, fault)
    error = payment_api.failure_reason(request, effects, fault, ("USD", "EUR", "GBP")) if status == 500 else None
    steps = payment_api.processing_steps(status, processing_time, usual_time, error)
    return processing_time, steps


@pytest.mark.parametrize("slowdown", ["latency_degradation", "slow bank"])
def test_processing_steps_add_up_to_the_processing_time_and_a_slowdown_lands_in_the_bank(slowdown):
    usual_time, usual = processing_steps()
    if slowdown == "slow bank":
        slow_time, slow = processing_steps(rng_draws=(0.0,))  # the first draw, below SLOW_BANK_SHARE: a slow bank
    else:
        slow_time, slow = processing_steps(payment_api.SCENARIOS[slowdown][1])
    assert [step.name for step in usual] == ["validation", "fraud_check", "bank_authorization"]
    assert usual_time == pytest.approx(0.12) and slow_time == pytest.approx(0.48)
    for steps, total in ((usual, usual_time), (slow, slow_time)):
        assert sum(step.seconds for step in steps) == pytest.approx(total, abs=1e-9)
        assert not any(step.error for step in steps)
    assert [step.seconds for step in slow[:2]] == pytest.approx([step.seconds for step in usual[:2]])
    assert slow[2].seconds > 4 * usual[2].seconds


@pytest.mark.parametrize("case, reason", [
    ({"fault": payment_api.Fault(fail=True)}, "X-Simulate-Failure"),
    ({"effects": payment_api.SCENARIOS["currency_outage"][1], "currency": "GBP"}, "currency_outage"),
    ({"effects": payment_api.SCENARIOS["error_spike"][1]}, "error_spike"),
    ({}, "bank gateway error")])
def test_a_failure_marks_the_bank_step_with_its_reason(case, reason):
    _, steps = processing_steps(status=500, **case)
    assert [step.name for step in steps if step.error] == ["bank_authorization"] and reason in steps[2].error


def test_an_outage_refuses_before_any_step_with_a_reason(app):
    http("POST", app.url + "/api/scenarios/outage")
    status, _, body = post_payment(app)
    payment = app.store.get(body["paymentId"])
    assert status == 503 and payment.steps == () and payment.failure_reason == payment_api.OUTAGE_REASON


def test_traces_stay_off_without_an_otlp_endpoint_and_health_and_the_log_say_why(make_app, caplog):
    caplog.set_level("INFO", logger="payment_api")
    app = make_app()
    assert [(record.levelname, record.fields) for record in caplog.records if record.getMessage() == "traces off"] == [
        ("INFO", {"reason": "OTEL_EXPORTER_OTLP_ENDPOINT is not set"})]
    assert http("GET", app.url + "/health")[2]["dependencies"]["tracing"] == {
        "state": "disabled", "reason": "OTEL_EXPORTER_OTLP_ENDPOINT is not set"}
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true", "PATH": "/bin"}
    settings = payment_api.Settings.load([], environ)
    assert settings.otel_environment == {key: environ[key] for key in environ if key.startswith("OTEL_")}
    assert payment_api.tracing_off_reason(settings.otel_environment) == "OTEL_SDK_DISABLED is true"
    assert payment_api.tracing_off_reason({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"}) is None


def test_the_request_log_line_of_a_payment_names_its_trace(app, caplog):
    caplog.set_level("INFO", logger="payment_api")
    _, _, body = post_payment(app)
    requests = eventually(lambda: [record.fields for record in caplog.records if record.getMessage() == "request"])
    assert requests[0]["trace_id"] == body["traceId"]


def test_an_otlp_endpoint_without_the_sdk_says_once_why_traces_are_off(run_service, tmp_path):
    hidden = tmp_path / "opentelemetry"  # found before the installed SDK, as if it were not installed
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    service = run_service(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(tmp_path),
                          INFLUXDB_URL="", SIMULATION_RATE="0",
                          PAYMENT_FAILURE_RATE="0", PAYMENT_DECLINE_RATE="0")  # no random 500 or 402
    assert post_payment(service)[0] == 200
    service.send_signal(signal.SIGTERM)
    service.wait(15)
    events = [json.loads(line) for line in service.log_path.read_text().splitlines()]
    warnings = [(event["level"], event["reason"]) for event in events if event["event"] == "traces off"]
    assert warnings == [("warning", "the OpenTelemetry SDK is not installed: pip install -r requirements-tracing.txt")]
    assert events[0]["event"].startswith("payment-api listening")


def test_a_trace_the_client_does_not_record_gets_no_exemplar(app):
    _, headers, body = post_payment(app, headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00"})
    assert body["traceId"] == CLIENT_TRACE_ID and headers["traceparent"].endswith("-00")
    assert openmetrics_exemplars(app, "payment_duration_seconds_bucket") == []


def test_pick_draws_what_rng_choices_draws_so_a_seeded_simulation_is_unchanged():
    tables = [(payment_api.PAYMENT_METHODS, payment_api.METHOD_WEIGHTS),
              (payment_api.PAYMENT_TYPES, payment_api.TYPE_WEIGHTS),
              (payment_api.AMOUNT_BANDS, [band[0] for band in payment_api.AMOUNT_BANDS]),
              (("EUR", "USD", "GBP", "JPY"), [50, 30, 20, 10])]
    picked, chosen = random.Random(11), random.Random(11)
    for population, weights in tables:
        choice = payment_api.weighted(population, weights)
        draws = [payment_api.pick(picked, choice) for _ in range(20_000)]
        assert draws == [chosen.choices(population, weights)[0] for _ in range(20_000)]
        assert set(draws) == set(population)
    assert payment_api.currency_choice(("EUR", "USD", "GBP", "JPY")).cumulative_weights == (50, 80, 100, 110)
