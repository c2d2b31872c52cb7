"""One client cannot take the class down, and no careless request does more than it says: fair
connection sharing, strict refunds and idempotency keys, bounded listing and memory, a stop that
lets uploads finish, cross-site refusals, settings that can never work. Real sockets against real
apps on port 0, loopback only, every loop bounded in count and time.
"""
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from decimal import Decimal

import pytest

import payment_api
from conftest import answers_health, eventually, http

SEED_PAYMENT = {"amount": 20.00, "currency": "USD", "type": "standard", "customerId": "cust_00001"}
OTHER_CLIENT = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second client address


def raw_request(app, head, body=b"", source=None, timeout=10):
    """Send one request from `source` (an address of 127/8) and return (status, headers, body)."""
    import socket
    connection = socket.create_connection(app.server.server_address[:2], timeout=timeout,
                                          source_address=(source, 0) if source else None)
    with connection:
        connection.sendall(head + body)
        return read_answer(connection)


def read_answer(connection):
    from http.client import HTTPResponse
    response = HTTPResponse(connection)
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


def pay(app, body=SEED_PAYMENT, headers=None):
    return http("POST", app.url + "/api/payments", body, headers)

# ---------------------------------------------------------------- fair sharing


def slow_payment(app, source):
    """A payment taking 5 s, sent from `source`; the connection is returned, still waiting."""
    import socket
    connection = socket.create_connection(app.server.server_address[:2], timeout=10,
                                          source_address=(source, 0))
    body = json.dumps(SEED_PAYMENT).encode()
    connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"X-Simulate-Latency: 5\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return connection


def test_one_client_holding_every_slot_it_can_leaves_the_others_answered_within_a_second(make_app):
    import socket
    app = make_app(max_connections=32)  # a quarter each: 8 requests in progress per client
    slow = [slow_payment(app, OTHER_CLIENT) for _ in range(12)]
    idle = []
    try:
        refused = [read_answer(connection)[0] for connection in slow[8:]]  # over its share: fast
        eventually(lambda: app.stats.active == 8, message="8 slow payments in progress")
        for _ in range(40):  # then every slot it can hold, idle
            idle.append(socket.create_connection(app.server.server_address[:2], timeout=10,
                                                 source_address=(OTHER_CLIENT, 0)))
        eventually(lambda: len(app.server.connections) >= 32, message="every slot taken")
        timings = []
        for method, path, body in (("POST", "/api/payments", SEED_PAYMENT),
                                   ("GET", "/api/payments/stats", None), ("GET", "/", None)):
            started = time.monotonic()
            status = http(method, app.url + path, body, timeout=5)[0]
            timings.append((path, status, time.monotonic() - started))
        still_paying = app.stats.active
    finally:
        for connection in slow + idle:
            connection.close()

    assert refused == [429] * 4
    assert [(path, status) for path, status, _ in timings] == [
        ("/api/payments", 200), ("/api/payments/stats", 200), ("/", 200)]
    assert all(took < 1.0 for _, _, took in timings), timings
    assert still_paying == 8  # making room closed idle connections, never a payment in progress


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(make_app):
    app = make_app(max_connections=4, trusted_proxies=payment_api.parse_networks("127.0.0.1"))
    held = [threading.Thread(target=pay, args=(app, SEED_PAYMENT, {
        "X-Simulate-Latency": "2", "X-Forwarded-For": "203.0.113.9"})) for _ in range(1)]
    for thread in held:
        thread.start()
    eventually(lambda: app.stats.active == 1, message="one payment of 203.0.113.9 in progress")
    second = pay(app, headers={"X-Forwarded-For": "203.0.113.9"})
    other = pay(app, headers={"X-Forwarded-For": "203.0.113.10"})
    for thread in held:
        thread.join()
    assert second[0] == 429 and second[1]["Retry-After"] == "1"
    assert other[0] == 200


def test_an_untrusted_peer_cannot_pretend_to_be_another_client(make_app):
    app = make_app(max_connections=4)  # no trusted proxy: X-Forwarded-For is ignored
    thread = threading.Thread(target=pay, args=(app, SEED_PAYMENT, {"X-Simulate-Latency": "2"}))
    thread.start()
    eventually(lambda: app.stats.active == 1, message="one payment in progress")
    spoofed = pay(app, headers={"X-Forwarded-For": "198.51.100.7"})
    thread.join()
    assert spoofed[0] == 429


def test_health_and_metrics_answer_a_client_over_its_share(make_app):
    app = make_app(max_connections=4)
    thread = threading.Thread(target=pay, args=(app, SEED_PAYMENT, {"X-Simulate-Latency": "2"}))
    thread.start()
    eventually(lambda: app.stats.active == 1, message="one payment in progress")
    answers = [http("GET", app.url + path)[0] for path in ("/health", "/metrics")]
    thread.join()
    assert answers == [200, 200]

# ---------------------------------------------------------------- strict refunds


def test_a_misspelt_refund_field_is_a_400_naming_it_and_refunds_nothing(app):
    payment = pay(app)[2]
    status, _, body = http("POST", f"{app.url}/api/payments/{payment['paymentId']}/refunds",
                           {"amountt": 1})
    after = http("GET", f"{app.url}/api/payments/{payment['paymentId']}")[2]
    assert status == 400 and body["field"] == "amountt" and "amountt" in body["error"]
    assert after["refundedAmount"] == 0 and after["refunds"] == []


def test_the_last_refund_a_payment_may_have_returns_all_that_remains(app, monkeypatch):
    monkeypatch.setattr(payment_api, "MAX_REFUNDS", 3)
    url = f"{app.url}/api/payments/{pay(app)[2]['paymentId']}/refunds"
    first = [http("POST", url, {"amount": 1})[0] for _ in range(2)]
    partial = http("POST", url, {"amount": 1})
    rest = http("POST", url, {"amount": 18})
    beyond = http("POST", url)
    assert first == [201, 201]
    assert partial[0] == 422 and partial[2]["refundable"] == 18.0 and "18" in partial[2]["error"]
    assert rest[0] == 201 and rest[2]["remainingAmount"] == 0
    assert beyond[0] == 409


def test_the_store_keeps_as_many_refunds_in_all_as_payments(make_app):
    app = make_app(store_size=5)
    ids = [pay(app)[2]["paymentId"] for _ in range(5)]
    for payment_id in (ids[0], ids[1], ids[4]):  # 6 refunds: the oldest refunded payment goes
        for _ in range(2):
            assert http("POST", f"{app.url}/api/payments/{payment_id}/refunds", {"amount": 0.5})[0] == 201
    kept = [http("GET", f"{app.url}/api/payments/{payment_id}")[0] for payment_id in ids]
    assert kept == [404, 200, 200, 200, 200]


def test_the_default_store_at_its_worst_stays_under_its_documented_size(make_app):
    """Every kept payment as large as a client can make it, and the whole refund budget used."""
    app = make_app()
    documented = 20 * 2**20  # docs/api.md, "Limits": about 14 MiB measured
    big = {"amount": Decimal("999999.99"), "currency": "USD", "type": "recurring", "paymentMethod": "card",
           "customerId": "c" * 64, "cardNumber": "4242424242424242"}
    request = payment_api.validate_payment(big, app.settings.currencies, app.rng)
    tracemalloc.start()
    try:
        for _ in range(app.store.capacity):
            payment = app.processor.begin(request, app.rng, "api")
            app.processor.finish(payment)
            app.processor.refund(payment.payment_id, Decimal("0.01"), "api")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(app.store.recent(payment_api.MAX_PAGE)) == payment_api.MAX_PAGE
    assert held < documented, f"{held / 2**20:.1f} MiB"

# ---------------------------------------------------------------- listing in pages


def test_the_listing_pages_with_a_cursor_and_refuses_pages_over_the_maximum(app):
    made = [pay(app, {**SEED_PAYMENT, "customerId": f"cust_{number:05d}"})[2]["paymentId"]
            for number in range(1, 8)]
    first = http("GET", app.url + "/api/payments?limit=3")[2]
    second = http("GET", f"{app.url}/api/payments?limit=3&cursor={first['nextCursor']}")[2]
    third = http("GET", f"{app.url}/api/payments?limit=3&cursor={second['nextCursor']}")[2]
    too_big = http("GET", f"{app.url}/api/payments?limit={payment_api.MAX_PAGE + 1}")
    unknown = http("GET", app.url + "/api/payments?cursor=pay_0000000000000000")
    listed = [p["paymentId"] for page in (first, second, third) for p in page["payments"]]
    assert listed == made[::-1]
    assert third["count"] == 1 and third["nextCursor"] is None
    assert too_big[0] == 400 and too_big[2]["field"] == "limit"
    assert unknown[0] == 400 and unknown[2]["field"] == "cursor"

# ---------------------------------------------------------------- idempotency keys


@pytest.mark.parametrize("key", [b"tw ", b"tw\t", b"t\tw"])
def test_an_idempotency_key_with_a_space_at_its_end_is_a_400(app, key):
    """Leading spaces are not part of a header's value (RFC 9110); trailing ones reach us."""
    body = json.dumps(SEED_PAYMENT).encode()
    head = (b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: " + key + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    status, _, answer = raw_request(app, head, body)
    assert status == 400 and json.loads(answer)["field"] == "Idempotency-Key"


def test_two_idempotency_key_headers_are_a_400(app):
    head = (b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: one\r\nIdempotency-Key: two\r\nContent-Length: %d\r\n\r\n")
    body = json.dumps(SEED_PAYMENT).encode()
    status, _, answer = raw_request(app, head % len(body), body)
    assert status == 400 and json.loads(answer)["field"] == "Idempotency-Key"
    assert app.stats.snapshot()["totals"]["payments"] == 0


def test_bodies_that_mean_the_same_payment_are_the_same_request(app):
    head = (b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: order-17\r\nContent-Length: %d\r\n\r\n")
    bodies = [b'{"amount": 10.50, "currency": "usd", "type": "standard", "customerId": "cust_00001"}',
              b'{"amount": 10.5, "customerId": "cust_00001"}']  # USD and standard: the defaults
    first, again = [raw_request(app, head % len(body), body) for body in bodies]
    assert first[0] == 200 and again[0] == 200
    assert json.loads(again[2])["paymentId"] == json.loads(first[2])["paymentId"]
    assert again[1]["Idempotent-Replayed"] == "true"

# ---------------------------------------------------------------- cross-site requests


def test_a_change_from_another_site_is_a_403_and_changes_nothing(app):
    status, _, body = http("POST", app.url + "/api/scenarios/outage",
                           headers={"Origin": "http://evil.example"})
    scenarios = http("GET", app.url + "/api/scenarios")[2]
    assert status == 403 and "evil.example" in body["error"]
    assert not any(scenario["active"] for scenario in scenarios["scenarios"])


def test_a_change_from_the_service_own_page_or_an_allowed_origin_is_accepted(make_app):
    app = make_app(allowed_origins=payment_api.parse_origins("http://grafana.example:3000"))
    own = http("POST", app.url + "/api/payments", SEED_PAYMENT, headers={"Origin": app.url})
    allowed = http("POST", app.url + "/api/payments", SEED_PAYMENT,
                   headers={"Origin": "http://grafana.example:3000"})
    assert own[0] == 200 and allowed[0] == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_an_empty_form_post_cannot_refund_or_start_an_incident(app, content_type):
    payment_id = pay(app)[2]["paymentId"]
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type.encode()
            + b"\r\nContent-Length: 0\r\n\r\n")
    refund = raw_request(app, head % f"/api/payments/{payment_id}/refunds".encode())
    outage = raw_request(app, head % b"/api/scenarios/outage")
    after = http("GET", f"{app.url}/api/payments/{payment_id}")[2]
    assert refund[0] in (400, 415) and outage[0] in (400, 415)  # 400: a malformed multipart type
    assert after["refundedAmount"] == 0
    assert app.scenarios.effects() == payment_api.NO_EFFECTS


def test_the_console_page_cannot_be_framed_or_run_other_scripts(app):
    status, headers, _ = http("GET", app.url + "/")
    policy = headers["Content-Security-Policy"]
    assert status == 200 and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy and "script-src 'sha256-" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"

# ---------------------------------------------------------------- uploads and stops


def test_expect_100_continue_is_answered_before_the_body_is_sent(app):
    import socket
    body = json.dumps(SEED_PAYMENT).encode()
    with socket.create_connection(app.server.server_address[:2], timeout=2) as connection:
        connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = connection.recv(100)  # within the socket's 2 s, long before curl's 1 s wait
        connection.sendall(body)
        status = read_answer(connection)[0]
    assert interim.startswith(b"HTTP/1.1 100 Continue") and status == 200


def test_expect_100_continue_is_not_sent_to_a_request_that_is_refused(app):
    import socket
    with socket.create_connection(app.server.server_address[:2], timeout=2) as connection:
        connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                           b"Origin: http://evil.example\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 10\r\n\r\n")
        first = connection.recv(200)
    assert first.startswith(b"HTTP/1.1 403")


def test_a_head_cut_to_make_room_is_never_served_as_a_whole_request(make_app):
    """A connection still sending its head is idle, so it may be closed to make room; what it had sent
    (here a refund without its body's length) must not run as if it were the whole request."""
    import socket
    app = make_app(max_connections=2)
    payment_id = pay(app)[2]["paymentId"]
    partial = socket.create_connection(app.server.server_address[:2], timeout=5)
    partial.sendall(f"POST /api/payments/{payment_id}/refunds HTTP/1.1\r\nHost: x\r\n".encode())
    eventually(lambda: len(app.server.idle_connections) == 1, message="the partial head waiting")
    others = [socket.create_connection(app.server.server_address[:2], timeout=5) for _ in range(2)]
    cut_answer = partial.recv(200)  # the connection ends: no answer at all
    eventually(lambda: partial not in app.server.connections, message="its thread gone")
    after = http("GET", f"{app.url}/api/payments/{payment_id}")[2]
    for connection in [partial, *others]:
        connection.close()
    assert cut_answer == b""
    assert after["refundedAmount"] == 0


def test_a_stop_lets_a_body_still_arriving_finish(make_app):
    import socket
    app = make_app()
    body = json.dumps(SEED_PAYMENT).encode()
    connection = socket.create_connection(app.server.server_address[:2], timeout=10)
    connection.sendall(b"POST /api/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
    # the head read and the request counted in progress (a connection is registered before its
    # handler reads the head: waiting for the registration alone would stop too early)
    eventually(lambda: app.in_progress._count == 1 and not app.server.idle_connections,
               message="the request's head read")
    stopper = threading.Thread(target=app.stop)
    stopper.start()
    eventually(lambda: app.stopping, message="the stop begun")
    time.sleep(0.3)  # the client's pace: the rest of its upload comes a moment later
    connection.sendall(body[10:])
    status = read_answer(connection)[0]
    stopper.join()
    connection.close()
    assert status == 200
    assert app.stats.snapshot()["totals"]["succeeded"] == 1

# ---------------------------------------------------------------- settings that can never work


@pytest.mark.parametrize("token", ["abc ", " abc", "pässword", "two words", "tab\there"])
def test_an_admin_token_a_header_cannot_carry_stops_the_start_naming_it(token):
    result = subprocess.run([sys.executable, "payment_api.py"], capture_output=True, text=True,
                            timeout=30, env={"ADMIN_TOKEN": token, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ADMIN_TOKEN" in result.stderr
    assert token.strip() not in result.stderr  # a secret is named, never shown


def test_a_connection_limit_over_the_open_file_limit_is_lowered_and_said_once(tmp_path):
    import resource
    import socket
    from conftest import free_port
    port = free_port()
    log_path = tmp_path / "service.log"
    command = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)); "
               "runpy.run_path('payment_api.py', run_name='__main__')")
    with open(log_path, "wb") as log_file:
        service = subprocess.Popen([sys.executable, "-c", command], stdout=log_file, stderr=subprocess.STDOUT,
                                   env={"PATH": "/usr/bin:/bin", "HOST": "127.0.0.1", "PORT": str(port),
                                        "INFLUXDB_URL": "", "ENABLE_SIMULATION": "false"})
    clients = []
    try:
        eventually(lambda: answers_health(f"http://127.0.0.1:{port}"), message="service ready",
                   timeout=15)
        for _ in range(300):  # more than the limit allows: the last ones wait or are closed
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        started = time.monotonic()
        health = http("GET", f"http://127.0.0.1:{port}/health", timeout=5)[0]
        took = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
        service.terminate()
        service.wait(15)
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    lowered = [event for event in events if event["event"].startswith("MAX_CONNECTIONS lowered")]
    assert health == 200 and took < 1.0
    assert len(lowered) == 1 and lowered[0]["connections served"] < 256
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # the test's own limit is untouched
