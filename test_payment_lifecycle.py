"""A payment API that behaves like one: declines, idempotency keys, refunds and listing filters.

Real apps on port 0; concurrency with real threads and sockets, bounded in count.
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import payment_api
from conftest import FakeClock, RecordingInfluxDB, eventually, http, metric_value

PAYMENT = {"amount": 100.50, "currency": "USD", "customerId": "cust_12345", "type": "standard"}


def pay(app, body=PAYMENT, headers=None):
    return http("POST", app.url + "/api/payments", body, headers)


def refund(app, payment_id, body=None, headers=None):
    return http("POST", f"{app.url}/api/payments/{payment_id}/refunds", body if body is not None else {}, headers)


def paid(app, amount=100.50, **fields):
    status, _, answer = pay(app, {**PAYMENT, "amount": amount, **fields})
    assert status == 200, answer
    return answer["paymentId"]

# ---------------------------------------------------------------- declines


@pytest.mark.parametrize("card, reason", payment_api.TEST_CARDS.items())
def test_a_test_card_is_declined_402_with_its_reason_and_counted_apart_from_errors(app, card, reason):
    status, _, answer = pay(app, {**PAYMENT, "paymentMethod": "card", "cardNumber": card})

    assert status == 402
    assert (answer["success"], answer["status"], answer["declineCode"]) == (False, "declined", reason)
    assert answer["cardLast4"] == card[-4:] and card not in str(answer)
    assert metric_value(app.url, "payment_requests_total", status="402", currency="USD") == 1
    assert metric_value(app.url, "payment_requests_total", status="500") == 0
    assert metric_value(app.url, "payment_amount_count", status="declined", currency="USD") == 1
    assert metric_value(app.url, "payment_failure_rate") == 0  # a decline is no failure of the service
    assert http("GET", app.url + "/api/payments/stats")[2]["totals"]["declined"] == 1
    assert http("GET", f"{app.url}/api/payments/{answer['paymentId']}")[2]["status"] == "declined"


def test_a_valid_card_that_is_no_test_card_is_charged(app):
    status, _, answer = pay(app, {**PAYMENT, "cardNumber": "4242424242424242"})
    assert status == 200 and answer["paymentMethod"] == "card" and answer["cardLast4"] == "4242"


@pytest.mark.parametrize("fields, field", [
    ({"cardNumber": "4242424242424241"}, "cardNumber"),  # check digit wrong
    ({"cardNumber": "42424242"}, "cardNumber"),  # too short
    ({"cardNumber": "4242 4242 4242 4242"}, "cardNumber"),
    ({"cardNumber": 4242424242424242}, "cardNumber"),
    ({"paymentMethod": "wallet", "cardNumber": "4242424242424242"}, "cardNumber"),
    ({"paymentMethod": "cash"}, "paymentMethod"),
])
def test_an_implausible_card_or_method_is_a_400_naming_the_field(app, fields, field):
    status, _, answer = pay(app, {**PAYMENT, **fields})
    assert status == 400 and answer["field"] == field


def test_a_card_number_is_never_stored_logged_or_exported_in_full(make_app, caplog):
    caplog.set_level(logging.DEBUG)
    card = "4000000000009995"
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, influxdb_flush_interval_ms=100, latency_scale=0)
        pay(app, {**PAYMENT, "cardNumber": card})
        listing = http("GET", app.url + "/api/payments")[2]
        eventually(lambda: influxdb.lines(), message="the point written")
        app.stop()
    assert card not in str(listing) and card not in caplog.text and card not in "".join(influxdb.lines())
    assert "status=declined" in influxdb.lines()[0]


def test_the_simulator_declines_a_small_share_of_card_payments_and_decline_wave_many(make_app):
    clock = FakeClock()
    app = make_app(simulation_enabled=True, simulation_rate=200, latency_scale=0, simulation_seed=7,
                   decline_rate=0.02, failure_rate=0.02, monotonic=clock)
    for _ in range(30):
        app.simulator.tick(clock.advance(1.0))
    normal = app.stats.snapshot()
    assert 0.75 * 2 - 0.6 < normal["declineRate"] < 0.75 * 2 + 0.6  # 2 % of the 75 % paid by card
    assert normal["successRate"] > 95  # the course's success-rate panel stays green

    app.scenarios.start("decline_wave")
    before = dict(normal["totals"])
    for _ in range(30):
        app.simulator.tick(clock.advance(1.0))
    totals = app.stats.snapshot()["totals"]
    payments = totals["payments"] - before["payments"]
    assert (totals["declined"] - before["declined"]) / payments > 0.15
    assert (totals["failed"] - before["failed"]) / payments < 0.05

# ---------------------------------------------------------------- idempotency keys


def test_a_repeat_with_the_same_key_and_body_gets_the_first_answer_and_no_second_payment(app):
    first = pay(app, headers={"Idempotency-Key": "order-1"})
    again = pay(app, headers={"Idempotency-Key": "order-1"})

    assert again[0] == first[0] == 200 and again[2] == first[2]
    assert again[1]["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first[1]
    assert metric_value(app.url, "payment_requests_total", status="200") == 1
    assert metric_value(app.url, "payment_idempotent_requests_total", result="replayed") == 1
    assert http("GET", app.url + "/api/payments")[2]["count"] == 1


def test_the_same_key_with_another_body_is_422(app):
    pay(app, headers={"Idempotency-Key": "order-2"})
    status, _, answer = pay(app, {**PAYMENT, "amount": 999}, headers={"Idempotency-Key": "order-2"})
    assert status == 422 and answer["field"] == "Idempotency-Key"
    assert metric_value(app.url, "payment_idempotent_requests_total", result="mismatch") == 1


@pytest.mark.parametrize("key", ["k" * 256, "caf\u00e9"])
def test_an_overlong_or_non_ascii_key_is_400(app, key):
    status, _, answer = pay(app, headers={"Idempotency-Key": key.encode().decode("latin-1")})
    assert status == 400 and answer["field"] == "Idempotency-Key"


def test_an_empty_key_is_as_if_none_were_sent(app):
    """API clients (Postman's converter) send every optional header, empty when unset."""
    first, second = [pay(app, headers={"Idempotency-Key": ""}) for _ in range(2)]
    assert first[0] == second[0] == 200
    assert first[2]["paymentId"] != second[2]["paymentId"]
    assert "Idempotent-Replayed" not in second[1]


def test_twenty_concurrent_repeats_make_exactly_one_payment(app):
    headers = {"Idempotency-Key": "retry-storm", "X-Simulate-Latency": "0.3"}
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: pay(app, headers=headers), range(20)))

    firsts = [answer for answer in answers if answer[0] == 200]
    assert len({answer[2]["paymentId"] for answer in firsts}) == 1
    assert all(answer[0] == 409 for answer in answers if answer[0] != 200)
    assert any(answer[0] == 409 for answer in answers)  # some arrived while the first was processing
    assert metric_value(app.url, "payment_requests_total", status="200") == 1
    assert app.stats.snapshot()["totals"]["payments"] == 1 and len(app.store.recent(100)) == 1


def test_a_flood_of_keys_never_forgets_a_request_still_in_progress(make_app, monkeypatch):
    monkeypatch.setattr(payment_api.IdempotencyKeys, "CAPACITY", 5)
    app = make_app(latency_scale=0)
    first = ThreadPoolExecutor(1).submit(pay, app, headers={"Idempotency-Key": "slow", "X-Simulate-Latency": "1.5"})
    eventually(lambda: app.stats.active == 1, message="the first request in progress")
    for number in range(20):
        pay(app, headers={"Idempotency-Key": f"flood-{number}"})

    assert pay(app, headers={"Idempotency-Key": "slow"})[0] == 409
    assert first.result()[0] == 200
    assert pay(app, headers={"Idempotency-Key": "slow"})[2] == first.result()[2]


def test_a_refused_payment_during_an_outage_can_be_retried_with_its_key(app):
    app.scenarios.start("outage")
    assert pay(app, headers={"Idempotency-Key": "after-outage"})[0] == 503
    app.scenarios.stop("outage")
    assert pay(app, headers={"Idempotency-Key": "after-outage"})[0] == 200


def test_keys_are_bounded_in_count_and_time(make_app, monkeypatch):
    monkeypatch.setattr(payment_api.IdempotencyKeys, "CAPACITY", 50)
    clock = FakeClock()
    app = make_app(monotonic=clock, latency_scale=0)
    for number in range(120):
        pay(app, headers={"Idempotency-Key": f"flood-{number}"})
    assert len(app.idempotency) == 50
    assert pay(app, headers={"Idempotency-Key": "flood-0"})[1].get("Idempotent-Replayed") is None  # forgotten

    pay(app, headers={"Idempotency-Key": "kept-a-day"})
    clock.advance(payment_api.IdempotencyKeys.KEEP_SECONDS - 1)
    assert pay(app, headers={"Idempotency-Key": "kept-a-day"})[1]["Idempotent-Replayed"] == "true"
    clock.advance(2)
    assert pay(app, headers={"Idempotency-Key": "kept-a-day"})[1].get("Idempotent-Replayed") is None

# ---------------------------------------------------------------- refunds


def test_a_refund_returns_what_remains_by_default_and_shows_in_the_payment(app):
    payment_id = paid(app, amount=80)
    status, _, partial = refund(app, payment_id, {"amount": 30})
    assert status == 201 and partial["amount"] == 30 and partial["remainingAmount"] == 50
    status, _, rest = refund(app, payment_id)
    assert status == 201 and rest["amount"] == 50 and rest["remainingAmount"] == 0

    payment = http("GET", f"{app.url}/api/payments/{payment_id}")[2]
    assert payment["refundedAmount"] == 80
    assert [item["refundId"] for item in payment["refunds"]] == [partial["refundId"], rest["refundId"]]
    assert metric_value(app.url, "payment_refunds_total", currency="USD") == 2
    assert metric_value(app.url, "payment_refund_amount_sum", currency="USD") == 80
    assert metric_value(app.url, "payment_daily_revenue", currency="USD") == 80  # revenue stays gross


def test_refund_mistakes_get_clear_4xx(app):
    payment_id = paid(app, amount=10)
    declined = pay(app, {**PAYMENT, "cardNumber": "4000000000000002"})[2]["paymentId"]
    failed = pay(app, headers={"X-Simulate-Failure": "true"})[2]["paymentId"]

    assert refund(app, "pay_unknown")[0] == 404
    assert refund(app, declined)[0] == 409 and refund(app, failed)[0] == 409
    status, _, answer = refund(app, payment_id, {"amount": 10.01})
    assert status == 422 and answer["refundable"] == 10
    assert refund(app, payment_id, {"amount": 0})[0] == 400
    assert refund(app, payment_id)[0] == 201
    assert refund(app, payment_id)[0] == 409  # nothing left


def test_a_refund_race_never_returns_more_than_was_paid(app):
    payment_id = paid(app, amount=100)
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: refund(app, payment_id, {"amount": 10})[0], range(20)))
    assert statuses.count(201) == 10 and set(statuses) <= {201, 409, 422}
    assert http("GET", f"{app.url}/api/payments/{payment_id}")[2]["refundedAmount"] == 100


def test_a_refund_is_idempotent_with_a_key(app):
    payment_id = paid(app, amount=40)
    first = refund(app, payment_id, {"amount": 15}, headers={"Idempotency-Key": "refund-1"})
    again = refund(app, payment_id, {"amount": 15}, headers={"Idempotency-Key": "refund-1"})
    assert first[2] == again[2] and again[1]["Idempotent-Replayed"] == "true"
    assert http("GET", f"{app.url}/api/payments/{payment_id}")[2]["refundedAmount"] == 15


def test_a_refund_becomes_a_refund_point_in_influxdb(make_app):
    with RecordingInfluxDB() as influxdb:
        app = make_app(influxdb_url=influxdb.url, influxdb_flush_interval_ms=100, latency_scale=0)
        payment_id = paid(app, amount=20, customerId="cust_00042")
        refund(app, payment_id, {"amount": 5})
        eventually(lambda: len(influxdb.lines()) == 2, message="payment and refund written")
        app.stop()
    line = [line for line in influxdb.lines() if line.startswith("refund,")][0]
    assert line.startswith(f"refund,currency=USD,customer_id=cust_00042,instance={app.settings.instance},"
                           "payment_type=standard amount=5.0 ")


def test_the_simulator_refunds_some_completed_payments_minutes_later(make_app):
    clock = FakeClock()
    app = make_app(simulation_enabled=True, simulation_rate=50, latency_scale=0, simulation_seed=3,
                   monotonic=clock)
    for _ in range(60):
        app.simulator.tick(clock.advance(1.0))
    assert metric_value(app.url, "payment_refunds_total") == 0  # none before a minute has passed
    app.simulator.configure(enabled=False)
    for _ in range(600):
        app.simulator.tick(clock.advance(1.0))
    refunds = metric_value(app.url, "payment_refunds_total")
    assert 0.02 * 3000 * 0.4 < refunds < 0.02 * 3000 * 1.6
    simulated = [item for payment in app.store.recent(5000) if payment.succeeded for item in payment.refunds]
    assert simulated and {item.source for item in simulated} == {"simulator"}

# ---------------------------------------------------------------- listing filters


def test_payments_can_be_listed_by_customer_status_currency_and_type(app):
    paid(app, customerId="cust_00001", currency="EUR", type="express")
    paid(app, customerId="cust_00002")
    pay(app, {**PAYMENT, "customerId": "cust_00001", "cardNumber": "4000000000000002"})

    def listed(query):
        return [(p["customerId"], p["status"]) for p in http("GET", f"{app.url}/api/payments?{query}")[2]["payments"]]
    assert listed("customerId=cust_00001") == [("cust_00001", "declined"), ("cust_00001", "completed")]
    assert listed("customerId=cust_00001&status=completed") == [("cust_00001", "completed")]
    assert listed("currency=eur&type=express") == [("cust_00001", "completed")]
    assert listed("status=declined&limit=1") == [("cust_00001", "declined")]


@pytest.mark.parametrize("query, field", [("status=pending", "status"), ("currency=JPY", "currency"),
                                          ("type=instant", "type"), ("customerId=a%20b", "customerId"),
                                          ("customer=cust_00001", "customer")])
def test_an_unknown_filter_or_value_is_a_400_naming_it(app, query, field):
    status, _, answer = http("GET", f"{app.url}/api/payments?{query}")
    assert status == 400 and answer["field"] == field
