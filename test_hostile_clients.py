"""The server under hostile and careless clients: request smuggling, trickling clients, connection floods,
running out of file descriptors, odd input. Real sockets against real apps on port 0, loopback only,
every loop bounded in count and time.
"""
import io
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import payment_api
from conftest import eventually, free_port, http, metric_value


def connect(app, timeout=10):
    return socket.create_connection(app.server.server_address[:2], timeout=timeout)


def hold_busy(app):
    """A connection that keeps a thread busy: its POST's body is still on its way."""
    connection = connect(app)
    connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 40\r\n\r\n{")
    return connection


def read_until_closed(connection):
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def payments_counted(app):
    return metric_value(app.url, "payment_requests_total", status="200")

# ---------------------------------------------------------------- request framing


SMUGGLED = b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n" \
           b'{"amount": 11}'


@pytest.mark.parametrize("framing", [
    b"Content-Length: 14\r\nContent-Length: 105\r\n",
    b"Content-Length: 0\r\nContent-Length: 14\r\n",
    b"Content-Length: 14\r\nContent-Length: 14\r\n",
    b"Content-Length: 14\r\nTransfer-Encoding: chunked\r\n",
    b"X Bad: 1\r\nContent-Length: 14\r\n",
    b"Transfer-Encoding: chunked\r\n",
], ids=["two lengths", "zero then a length", "a repeated length", "length and chunked",
        "a malformed line hiding the length", "chunked alone"])
def test_ambiguous_body_framing_is_a_400_that_closes_and_smuggles_no_payment(app, framing):
    request = (b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n"
               + b'{"amount": 10}' + SMUGGLED)
    with connect(app) as connection:
        connection.sendall(request)
        reply = read_until_closed(connection)

    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 411")) and reply.count(b"HTTP/1.1") == 1
    assert b"Connection: close" in reply
    assert payments_counted(app) == 0
    assert app.stats.snapshot()["totals"]["payments"] == 0


class HeadOnly(payment_api.BaseHTTPRequestHandler):
    """A handler that only parses a request's head, as the service's handlers do."""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"

    def __init__(self, head):
        self.rfile = io.BufferedReader(io.BytesIO(head))
        self.raw_requestline = self.rfile.readline(65537)
        self.answered = []

    def send_error(self, code, message=None, explain=None):
        self.answered.append((int(code), message, explain))

    def handle_expect_100(self):
        self.answered.append(100)
        return True

    def parsed(self):
        ok = self.parse_request()
        return (ok, self.command, getattr(self, "path", None), self.request_version, self.close_connection,
                getattr(self, "requestline", None), self.answered, self.rfile.read(),
                described(getattr(self, "headers", None)))


def described(message):
    """A message as plain values, its nested messages too."""
    if message is None or isinstance(message, str):
        return message
    return (type(message), message.items(), [type(defect) for defect in message.defects], message.get_unixfrom(),
            [described(part) for part in message.get_payload()] if message.is_multipart() else message.get_payload())


class PlainHeadOnly(payment_api.PlainRequestHeads, HeadOnly):
    pass


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.0\r\nHost: x\r\nConnection: Keep-Alive\r\n\r\n",
    b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\nrest",
    b"POST /api/payments HTTP/1.1\r\nContent-Length: 14\r\nContent-Length: 105\r\n\r\n",
    b"POST /api/payments HTTP/1.1\r\nX Bad: 1\r\nContent-Length: 14\r\n\r\n",
    b"POST /api/payments HTTP/1.1\r\nX: a\r\n folded\r\nContent-Length: 14\r\n\r\n",
    b"POST /api/payments HTTP/1.1\r\nExpect: 100-continue\r\nX:\t padded \t\r\nEmpty:\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Type: message/rfc822\r\n\r\nA: b\r\n",
    b"GET /x HTTP/1.1\r\nA: \x85b\r\nB: c\rd\r\nC: \x0be\r\n\r\n",
    b"GET /x HTTP/1.1\r\n: no name\r\nFrom x\r\n\r\n",
    b"GET /x HTTP/1.1\nA: b\n\n",
    b"GET /x HTTP/1.1\r\nA: b\r\n",
    b"GET //x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/2.0\r\n\r\n",
    b"GET /x\r\n\r\n",
    b"GET  /x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\n" + b"A: b\r\n" * 100 + b"\r\n",
    b"GET /x HTTP/1.1\r\nA: " + b"b" * 70000 + b"\r\n\r\n",
], ids=lambda head: repr(head[:40]))
def test_a_head_split_without_the_email_package_is_the_one_the_stdlib_parses(head):
    assert PlainHeadOnly(head).parsed() == HeadOnly(head).parsed()

# ---------------------------------------------------------------- deadlines


def test_a_client_trickling_its_headers_is_cut_off_at_the_header_deadline(app, monkeypatch):
    monkeypatch.setattr(payment_api, "HEADER_SECONDS", 1.0)
    threads_before = threading.active_count()
    with connect(app) as connection:
        started = time.monotonic()
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        cut_off = False
        for _ in range(40):  # one header byte every 0.1 s: each recv is quick, the whole is slow
            try:
                connection.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
            time.sleep(0.1)  # pacing the client, not waiting for a condition
        took = time.monotonic() - started

    assert cut_off, "the trickling client was never cut off"
    assert took < 3.0, f"cut off after {took:.1f} s, deadline 1 s"
    eventually(lambda: threading.active_count() <= threads_before, message="its thread ended")


def test_a_body_trickling_past_its_deadline_gets_408(app, monkeypatch):
    monkeypatch.setattr(payment_api, "BODY_SECONDS", 0.5)
    with connect(app) as connection:
        connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 40\r\n\r\n{")
        for _ in range(10):
            time.sleep(0.1)  # pacing the client
            connection.sendall(b" ")
        reply = read_until_closed(connection)
    assert reply.startswith(b"HTTP/1.1 408")


def test_an_idle_keep_alive_connection_still_gets_its_idle_timeout_after_a_request(app, monkeypatch):
    monkeypatch.setattr(payment_api.PaymentHandler, "timeout", 0.5)
    monkeypatch.setattr(payment_api, "HEADER_SECONDS", 30.0)
    with connect(app) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        reply = read_until_closed(connection)
    assert reply.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 5

# ---------------------------------------------------------------- connection limit


def test_beyond_the_connection_limit_clients_get_a_fast_503_while_health_and_metrics_answer(make_app):
    app = make_app(max_connections=4, client_share=1.0)
    threads_before = threading.active_count()
    held = [hold_busy(app) for _ in range(4)]  # each holds one of the four threads
    try:
        eventually(lambda: len(app.server.connections) == 4, message="four connections served")
        excess = [connect(app) for _ in range(30)]  # sent nothing yet: they wait without a thread
        for connection in excess[:20]:
            connection.sendall(b"GET /api/payments/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [read_until_closed(connection) for connection in excess[:20]]
        health = http("GET", app.url + "/health", timeout=5)
        metrics = http("GET", app.url + "/metrics", timeout=5)
        threads_during = threading.active_count()
        for connection in excess:
            connection.close()
    finally:
        for connection in held:
            connection.close()

    assert all(answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer for answer in answers)
    assert health[0] == 200 and health[2]["status"] == "UP"
    assert metrics[0] == 200 and b"payment_http_connections_shed_total 20.0" in metrics[2]
    assert threads_during <= threads_before + 4


def test_the_overflow_survives_connections_churning_through_it(make_app, monkeypatch):
    monkeypatch.setattr(payment_api.Overflow, "CAPACITY", 5)
    app = make_app(max_connections=1)
    held = hold_busy(app)
    eventually(lambda: len(app.server.connections) == 1, message="one connection served")
    try:
        for _ in range(20):  # bursts that overfill the overflow while some of its connections send or leave
            burst = [connect(app) for _ in range(12)]
            for number, connection in enumerate(burst):
                if number % 3 == 0:
                    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                elif number % 3 == 1:
                    connection.close()
            for connection in burst:
                connection.close()
        status = http("GET", app.url + "/health", timeout=5)[0]
    finally:
        held.close()
    assert status == 200 and app.server.overflow._thread.is_alive()


def test_the_overflow_is_bounded_and_closes_the_oldest_silent_connection(make_app, monkeypatch):
    monkeypatch.setattr(payment_api.Overflow, "CAPACITY", 5)
    app = make_app(max_connections=1)
    held = hold_busy(app)
    eventually(lambda: len(app.server.connections) == 1, message="one connection served")
    silent = [connect(app) for _ in range(12)]
    try:
        oldest_closed = read_until_closed(silent[0]) == b""  # closed without an answer, to make room
        status, _, body = http("GET", app.url + "/health", timeout=5)
    finally:
        for connection in [held, *silent]:
            connection.close()
    assert oldest_closed and status == 200 and body["status"] == "UP"


def test_thousands_of_connections_closed_at_once_leave_health_answering(make_app):
    app = make_app()
    connections = [connect(app) for _ in range(2000)]
    for connection in connections:
        connection.close()

    started = time.monotonic()
    status = http("GET", app.url + "/health", timeout=10)[0]
    took = time.monotonic() - started
    assert status == 200 and took < 1.0, f"/health took {took:.2f} s"
    eventually(lambda: not app.server.connections, message="every connection gone")

# ---------------------------------------------------------------- out of file descriptors


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc (Linux)")
def test_out_of_file_descriptors_backs_off_logs_once_and_recovers(run_service, tmp_path):
    limit = 64
    service = run_service(ENABLE_SIMULATION="false", INFLUXDB_URL="", MAX_CONNECTIONS="500")
    # lowered after start-up (which fits MAX_CONNECTIONS to the limit), as if files had used it up
    resource.prlimit(service.pid, resource.RLIMIT_NOFILE, (limit, limit))
    host, port = "127.0.0.1", int(service.url.rsplit(":", 1)[1])
    clients = []
    try:
        for _ in range(limit + 40):  # more than the service has descriptors for
            clients.append(socket.create_connection((host, port), timeout=5))
        eventually(lambda: "out of file descriptors" in service.log_path.read_text(), message="starvation noticed")
        cpu_before = cpu_seconds(service.pid)
        time.sleep(2.0)  # measuring CPU over an interval
        busy = cpu_seconds(service.pid) - cpu_before
        for _ in range(5):  # churn: some close, as many new ones starve again
            for client in clients[:20]:
                client.close()
            clients[:20] = [socket.create_connection((host, port), timeout=5) for _ in range(20)]
            time.sleep(0.2)  # pacing the churn
    finally:
        for client in clients:
            client.close()

    assert busy < 0.5, f"{busy:.2f} s of CPU in 2 s while out of descriptors: a busy loop"
    eventually(lambda: http("GET", service.url + "/health", timeout=2)[0] == 200, timeout=20,
               message="/health answers once descriptors are free")
    log_text = service.log_path.read_text()
    assert log_text.count("out of file descriptors") == 1
    assert "accepting connections again" in log_text
    service.send_signal(signal.SIGTERM)
    assert service.wait(10) == 0

# ---------------------------------------------------------------- odd input


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "-1", "1.5", "0", "1e3", "9" * 12, "", "%00"])
def test_odd_limit_values_are_a_400_naming_the_parameter(app, limit):
    status, _, body = http("GET", app.url + "/api/payments?limit=" + limit)
    assert status == 400 and body["field"] == "limit"


@pytest.mark.parametrize("latency", ["\u00b2", "nan", "inf", "1e3", "-1", "0x10", "31", "1_0"])
def test_odd_latency_headers_are_a_400_not_a_500(app, latency):
    status, _, body = http("POST", app.url + "/api/payments", {"amount": 5},
                           headers={"X-Simulate-Latency": latency.encode("utf-8").decode("latin-1")})
    assert status == 400 and body["field"] == "headers"


@pytest.mark.parametrize("authorization, status", [
    ("Bearer trainer", 200), ("bearer trainer", 200), ("BEARER  trainer ", 200),
    ("trainer", 401), ("Basic trainer", 401), ("Bearer", 401), ("Bearer wrong", 401), ("", 401)])
def test_the_bearer_scheme_is_case_insensitive_and_required(make_app, authorization, status):
    app = make_app(admin_token="trainer")
    answer = http("PUT", app.url + "/api/simulation", {"rate": 7}, headers={"Authorization": authorization})
    assert answer[0] == status


def test_echoes_and_logs_of_client_input_are_bounded(app, caplog):
    caplog.set_level(logging.INFO, logger="payment_api")
    long_path = "/" + "a" * 10_000
    status, _, body = http("GET", app.url + long_path)
    assert status == 404 and len(body["error"]) <= payment_api.ECHO_LIMIT + 20
    logged = eventually(lambda: [record.fields["path"] for record in caplog.records
                                 if getattr(record, "fields", {}).get("status") == 404], message="access log written")
    assert all(len(path) <= payment_api.ECHO_LIMIT for path in logged)


def test_text_logs_escape_control_characters_and_flatten_nested_values():
    formatter = payment_api.LogFormatter("text")
    record = logging.makeLogRecord({"msg": "request", "levelname": "INFO", "fields": {
        "path": "/\x1b[31mred\nfake line", "simulation": {"rate": 5.0, "profile": "steady"}, "ok": True}})
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert 'path="/\\u001b[31mred\\nfake line"' in line
    assert "simulation.rate=5.0 simulation.profile=steady ok=true" in line

# ---------------------------------------------------------------- stopping


def test_during_a_graceful_stop_new_connections_are_refused_at_once(make_app):
    app = make_app()
    address = app.server.server_address[:2]
    slow = threading.Thread(target=http, args=("POST", app.url + "/api/payments", {"amount": 5}),
                            kwargs={"headers": {"X-Simulate-Latency": "2"}})
    slow.start()
    eventually(lambda: app.stats.active == 1, message="a payment in flight")
    stopper = threading.Thread(target=app.stop)
    stopper.start()
    eventually(lambda: app.stopping, message="stop begun")

    def refused():
        try:
            socket.create_connection(address, timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # it reached the backlog just before the listener closed
            return False
        return False
    eventually(refused, timeout=2, message="connections refused while the payment finishes")
    assert stopper.is_alive()  # still draining the payment in flight
    stopper.join(10)
    slow.join(10)
    assert app.stats.snapshot()["totals"]["succeeded"] == 1


def test_a_new_instance_binds_the_port_right_after_the_last_one_stopped(run_service):
    port = free_port()
    for _ in range(3):
        service = run_service(PORT=str(port), ENABLE_SIMULATION="false", INFLUXDB_URL="")
        http("GET", service.url + "/health")  # leaves a connection in TIME_WAIT
        service.send_signal(signal.SIGTERM)
        assert service.wait(10) == 0
