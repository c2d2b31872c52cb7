"""OpenTelemetry traces (tracing.py): one trace a payment, with the ids its answer, log line and exemplars carry.

No Tempo or OpenTelemetry Collector binary runs on this machine, so an OTLP/HTTP receiver run by the test stands in
for the collector: a stdlib HTTP server taking POST /v1/traces, whose requests are decoded with the OpenTelemetry
protocol package (opentelemetry-proto), as a collector would. Prometheus is the real one, with exemplar storage on.

Needs requirements-tracing.txt (and opentelemetry-proto, which it brings); without it these tests skip, except under
CI=true where they fail.
"""
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import statistics
import time
import urllib.parse
import urllib.request
from decimal import Decimal
from http.server import BaseHTTPRequestHandler

import pytest
from prometheus_client import CollectorRegistry

import payment_api
from conftest import LoopbackServer, Prometheus, eventually, free_port, http, metric_value

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                         ExportTraceServiceResponse)
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
    import tracing
except ImportError as error:
    if os.environ.get("CI") == "true":
        raise ImportError(f"{error}: requirements-dev.txt installs the OpenTelemetry packages") from error
    pytest.skip(f"OpenTelemetry packages are not installed ({error})", allow_module_level=True)

FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # milliseconds between exports of a batch that is not full
QUIET_LOGS = {"LOG_FORMAT": "json", "ENABLE_SIMULATION": "false", "PAYMENT_FAILURE_RATE": "0",
              "PAYMENT_DECLINE_RATE": "0", "INFLUXDB_URL": ""}
CLIENT_TRACE_ID, CLIENT_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

# ---------------------------------------------------------------- an OTLP/HTTP receiver


def attribute_values(key_values):
    """{key: value} of OTLP KeyValues (strings, numbers and booleans)."""
    return {item.key: getattr(item.value, item.value.WhichOneof("value")) for item in key_values}


class OTLPReceiver(LoopbackServer):
    """Answers OTLP/HTTP trace exports as a collector does and keeps what it received: paths, headers and spans."""

    def __init__(self, port=0):
        self.requests = []  # (path, headers, ExportTraceServiceRequest)

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request a connection, so no thread idles
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                self.requests.append((handler.path, dict(handler.headers), ExportTraceServiceRequest.FromString(body)))
                answer = ExportTraceServiceResponse().SerializeToString()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/x-protobuf")
                handler.send_header("Content-Length", str(len(answer)))
                handler.end_headers()
                handler.wfile.write(answer)

            def log_message(handler, *args):
                pass

        super().__init__(Handler, "otlp-receiver", port)

    def spans(self):
        """[(resource attributes, Span)] of every span received so far."""
        return [(attribute_values(resource_spans.resource.attributes), span)
                for _, _, request in list(self.requests) for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans for span in scope_spans.spans]

    def trace(self, trace_id, spans=4):
        """The spans of one trace (hex id), once `spans` of them have arrived."""
        def received():
            found = [span for _, span in self.spans() if span.trace_id.hex() == trace_id]
            return found if len(found) >= spans else None
        return eventually(received, timeout=10, message=f"{spans} spans of trace {trace_id}")


@contextlib.contextmanager
def hung_collector():
    """A collector that hangs: the kernel accepts connections on its port, but nothing ever reads or answers them.

    A real collector cannot be made to hang on demand (stopping it refuses connections instead); a listening
    socket that is never served is exactly what a client sees of a hung one.
    """
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def by_name(spans):
    return {span.name: span for span in spans}


def duration(span):
    return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9

# ---------------------------------------------------------------- tracers fed hand-made payments


STEP_SECONDS = {"validation": 0.016, "fraud_check": 0.044, "bank_authorization": 0.14}


def make_payment(http_status=200, source="api", parent_span_id=None, sampled=True, decline_code=None,
                 error="bank gateway error", completed_at=None):
    """A finished Payment as PaymentProcessor.finish hands it to the tracer: 0.2 s in three steps, or none (503)."""
    processing_time = 0.0 if http_status == 503 else sum(STEP_SECONDS.values())
    reason = {500: error, 503: payment_api.OUTAGE_REASON}.get(http_status)
    request = payment_api.PaymentRequest(Decimal("100.50"), "EUR", "standard", "cust_00001")
    trace = payment_api.TraceContext(secrets.token_hex(16), secrets.token_hex(8), parent_span_id, sampled)
    payment = payment_api.Payment(f"pay_{secrets.token_hex(8)}", request, source, processing_time, http_status,
                                  completed_at=completed_at or time.time(), decline_code=decline_code, trace=trace,
                                  usual_time=processing_time, failure_reason=reason)
    assert {step.name: step.seconds for step in payment.steps} == pytest.approx(
        {} if http_status == 503 else STEP_SECONDS)
    return payment


@pytest.fixture
def make_tracer():
    """PaymentTracers on a registry of their own, each closed after the test."""
    tracers = []

    def start(endpoint=None, instance="pay-1", **environment):
        """A tracer sending to `endpoint` (OTEL_EXPORTER_OTLP_ENDPOINT), or where `environment` says."""
        registry = CollectorRegistry()
        if endpoint:
            environment["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        tracer = tracing.PaymentTracer({**FAST, **environment}, instance, registry)
        tracer.registry = registry
        tracers.append(tracer)
        return tracer

    yield start
    for tracer in tracers:
        tracer.close(1)


@pytest.fixture
def receiver():
    with OTLPReceiver() as server:
        yield server


def counted(tracer, name, **labels):
    return tracer.registry.get_sample_value(name, labels) or 0.0


def test_api_payment_becomes_a_server_span_with_the_given_ids_and_a_child_span_per_step(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment(parent_span_id=CLIENT_SPAN_ID)

    tracer.record(payment)

    spans = by_name(receiver.trace(payment.trace.trace_id))
    root = spans.pop("POST /api/payments")
    assert root.kind == Span.SPAN_KIND_SERVER
    assert root.span_id.hex() == payment.trace.span_id
    assert root.parent_span_id.hex() == CLIENT_SPAN_ID
    assert list(spans) == ["validation", "fraud_check", "bank_authorization"]
    for step in spans.values():
        assert step.parent_span_id == root.span_id
        assert step.kind == Span.SPAN_KIND_INTERNAL
    assert len({step.span_id for step in spans.values()} | {root.span_id}) == 4
    assert attribute_values(root.attributes) == {
        "http.request.method": "POST", "http.route": "/api/payments", "url.path": "/api/payments",
        "http.response.status_code": 200, "payment.id": payment.payment_id, "payment.amount": 100.5,
        "payment.currency": "EUR", "payment.type": "standard", "payment.method": "card", "payment.status": "completed",
        "payment.source": "api"}
    assert root.status.code == Status.STATUS_CODE_UNSET


def test_step_spans_run_back_to_back_and_add_up_to_the_root_span_within_a_millisecond(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment()

    tracer.record(payment)

    spans = by_name(receiver.trace(payment.trace.trace_id))
    root = spans.pop("POST /api/payments")
    steps = list(spans.values())
    assert duration(root) == pytest.approx(payment.processing_time, abs=1e-6)
    assert root.end_time_unix_nano == pytest.approx(payment.completed_at * 1e9, abs=1e3)  # float seconds: about 0.2 us
    assert sum(duration(step) for step in steps) == pytest.approx(duration(root), abs=1e-3)
    assert steps[0].start_time_unix_nano == root.start_time_unix_nano
    assert all(before.end_time_unix_nano == after.start_time_unix_nano for before, after in zip(steps, steps[1:]))
    assert [duration(step) for step in steps] == pytest.approx(list(STEP_SECONDS.values()), abs=1e-6)


def test_failing_step_and_root_span_are_errors_with_the_reason(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment(http_status=500, error="bank gateway error (error_spike scenario)")

    tracer.record(payment)

    spans = by_name(receiver.trace(payment.trace.trace_id))
    for name in ("POST /api/payments", "bank_authorization"):
        assert spans[name].status.code == Status.STATUS_CODE_ERROR, name
        assert spans[name].status.message == "bank gateway error (error_spike scenario)"
    assert attribute_values(spans["POST /api/payments"].attributes)["error.type"] == "500"
    assert spans["validation"].status.code == spans["fraud_check"].status.code == Status.STATUS_CODE_UNSET


def test_a_decline_is_the_banks_answer_not_an_error_and_carries_its_code(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment(http_status=402, decline_code="insufficient_funds")

    tracer.record(payment)

    spans = receiver.trace(payment.trace.trace_id)
    assert {span.status.code for span in spans} == {Status.STATUS_CODE_UNSET}
    root = by_name(spans)["POST /api/payments"]
    assert attribute_values(root.attributes)["payment.decline_code"] == "insufficient_funds"
    assert attribute_values(root.attributes)["payment.status"] == "declined"
    assert attribute_values(root.attributes)["http.response.status_code"] == 402


def test_an_outage_answer_is_one_error_span_without_steps(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment(http_status=503)

    tracer.record(payment)

    [root] = receiver.trace(payment.trace.trace_id, spans=1)
    assert root.status.code == Status.STATUS_CODE_ERROR
    assert root.status.message == payment.failure_reason
    assert duration(root) == 0


def test_simulated_payment_is_an_internal_root_span_without_http_attributes(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    payment = make_payment(source="simulator")

    tracer.record(payment)

    root = by_name(receiver.trace(payment.trace.trace_id))["simulated payment"]
    assert root.kind == Span.SPAN_KIND_INTERNAL
    assert root.parent_span_id == b""
    assert not [key for key in attribute_values(root.attributes) if key.startswith(("http.", "url."))]
    assert attribute_values(root.attributes)["payment.source"] == "simulator"


ENDPOINTS = {  # variables -> the path the spans are posted to
    "base endpoint": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "{url}"}, "/v1/traces"),
    "base endpoint with a path": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "{url}/otlp/"}, "/otlp/v1/traces"),
    "traces endpoint, as is": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{url}/custom"}, "/custom"),
}


@pytest.mark.parametrize("variables, path", ENDPOINTS.values(), ids=ENDPOINTS.keys())
def test_spans_go_to_the_endpoint_the_variables_name_with_their_headers(make_tracer, receiver, variables, path):
    tracer = make_tracer(**{name: value.format(url=receiver.url) for name, value in variables.items()},
                         OTEL_EXPORTER_OTLP_HEADERS="x-scope-orgid=training,authorization=Bearer%20abc")
    payment = make_payment()

    tracer.record(payment)

    receiver.trace(payment.trace.trace_id)
    request_path, headers, _ = receiver.requests[0]
    assert request_path == path
    headers = {name.lower(): value for name, value in headers.items()}
    assert headers["x-scope-orgid"] == "training"
    assert headers["authorization"] == "Bearer abc"
    assert headers["content-type"] == "application/x-protobuf"


def test_resource_comes_from_the_given_variables_and_never_from_os_environ(make_tracer, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "not-this-one")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=not-this-one")
    tracer = make_tracer(receiver.url, instance="pay-7",
                         OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=training,team=payments%20core")
    payment = make_payment()

    tracer.record(payment)

    receiver.trace(payment.trace.trace_id)
    resource, _ = receiver.spans()[0]
    assert resource["service.name"] == "payment-api"
    assert resource["service.instance.id"] == "pay-7"
    assert resource["deployment.environment.name"] == "training"
    assert resource["team"] == "payments core"


def test_otel_service_name_names_the_service(make_tracer, receiver):
    tracer = make_tracer(receiver.url, OTEL_SERVICE_NAME="checkout-payments",
                         OTEL_RESOURCE_ATTRIBUTES="service.name=overridden-by-otel-service-name")
    payment = make_payment()

    tracer.record(payment)

    receiver.trace(payment.trace.trace_id)
    assert receiver.spans()[0][0]["service.name"] == "checkout-payments"


SAMPLING = {  # (sampler variables, client's sampled flag or None for a new trace) -> exported?
    "default, client sampled": ({}, True, True),
    "default, client did not sample": ({}, False, False),
    "default, new trace": ({}, None, True),
    "always_on ignores the client": ({"OTEL_TRACES_SAMPLER": "always_on"}, False, True),
    "always_off": ({"OTEL_TRACES_SAMPLER": "always_off"}, None, False),
    "ratio 0": ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, None, False),
    "parent-based ratio 0 follows a sampling client": ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                                        "OTEL_TRACES_SAMPLER_ARG": "0"}, True, True),
}


@pytest.mark.parametrize("variables, client_sampled, exported", SAMPLING.values(), ids=SAMPLING.keys())
def test_sampler_variables_and_the_clients_sampled_flag_decide_what_is_exported(make_tracer, receiver, variables,
                                                                                client_sampled, exported):
    tracer = make_tracer(receiver.url, **variables)
    payment = make_payment(parent_span_id=CLIENT_SPAN_ID if client_sampled is not None else None,
                           sampled=client_sampled is not False)
    payment.trace = tracer.sample(payment.trace, payment.source)  # as PaymentProcessor.begin decides it

    tracer.record(payment)
    tracer.close(5)  # exports what is queued before it returns

    assert payment.trace.sampled is exported
    assert (payment.trace.trace_id in {span.trace_id.hex() for _, span in receiver.spans()}) is exported
    assert counted(tracer, "payment_trace_spans_exported_total") == (4 if exported else 0)

# ---------------------------------------------------------------- the collector down, hung, and back


def state_lines(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "payment_api"
            and "collector" in record.getMessage()]


def test_collector_outage_and_return_are_logged_once_each_and_failed_spans_counted(make_tracer, caplog):
    caplog.set_level(logging.INFO, logger="payment_api")
    port = free_port()
    tracer = make_tracer(f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_TIMEOUT="300")
    for _ in range(3):  # three batches, each refused
        tracer.record(make_payment())
        eventually(lambda: tracer.health()["queuedSpans"] == 0, message="batch given up")
    eventually(lambda: counted(tracer, "payment_trace_spans_dropped_total", reason="export_failed") == 12,
               message="12 spans counted as failed")
    assert tracer.health()["state"] == "unreachable"

    with OTLPReceiver(port) as receiver:
        payment = make_payment()
        tracer.record(payment)
        receiver.trace(payment.trace.trace_id)
        eventually(lambda: tracer.health()["state"] == "up", message="collector back")
        tracer.record(make_payment())
        eventually(lambda: counted(tracer, "payment_trace_spans_exported_total") == 8, message="8 spans exported")

    lines = state_lines(caplog)
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "accepts" in lines[1]


def test_a_hung_collector_fills_the_queue_and_further_spans_are_dropped_and_counted_without_waiting(make_tracer):
    with hung_collector() as url:
        tracer = make_tracer(url, OTEL_BSP_MAX_QUEUE_SIZE="40", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="20",
                             OTEL_EXPORTER_OTLP_TIMEOUT="5000")
        payments = [make_payment() for _ in range(500)]

        started = time.monotonic()
        for payment in payments:
            tracer.record(payment)
        elapsed = time.monotonic() - started

        assert elapsed < 1.0, f"500 payments recorded in {elapsed:.2f} s while the collector hangs"
        assert tracer.health()["queuedSpans"] <= 40
        assert counted(tracer, "payment_trace_spans_dropped_total", reason="queue_full") >= 500 * 4 - 40
        assert counted(tracer, "payment_trace_spans_exported_total") == 0


def test_close_exports_what_is_queued_before_it_returns(make_tracer, receiver):
    tracer = make_tracer(receiver.url, OTEL_BSP_SCHEDULE_DELAY="60000")  # nothing would leave on its own for a minute
    payments = [make_payment() for _ in range(5)]
    for payment in payments:
        tracer.record(payment)

    tracer.close(5)

    assert {span.trace_id.hex() for _, span in receiver.spans()} == {payment.trace.trace_id for payment in payments}
    assert counted(tracer, "payment_trace_spans_exported_total") == 20
    assert not tracer._thread.is_alive()


def test_close_gives_up_on_a_hung_collector_in_time_and_counts_what_it_leaves(make_tracer):
    with hung_collector() as url:
        tracer = make_tracer(url, OTEL_EXPORTER_OTLP_TIMEOUT="30000")
        for _ in range(10):
            tracer.record(make_payment())

        started = time.monotonic()
        tracer.close(0.5)
        elapsed = time.monotonic() - started

        assert elapsed < 2.0
        assert counted(tracer, "payment_trace_spans_dropped_total", reason="shutdown") == 40
        tracer.record(make_payment())  # after close: counted, never queued
        assert counted(tracer, "payment_trace_spans_dropped_total", reason="shutdown") == 44


def test_an_endpoint_without_a_scheme_is_named_in_a_warning_and_its_spans_counted_as_failed(make_tracer, caplog):
    caplog.set_level(logging.WARNING, logger="payment_api")
    tracer = make_tracer("tempo:4318")  # a common slip: the scheme left out

    tracer.record(make_payment())

    assert [record for record in caplog.records if "OTEL_EXPORTER_OTLP_ENDPOINT" in record.getMessage()]
    eventually(lambda: counted(tracer, "payment_trace_spans_dropped_total", reason="export_failed") == 4,
               message="spans counted as failed")


def test_record_never_raises_on_a_payment_it_cannot_trace(make_tracer, receiver):
    tracer = make_tracer(receiver.url)
    broken = make_payment()
    broken.trace = None

    tracer.record(broken)

    assert counted(tracer, "payment_trace_spans_dropped_total", reason="error") == 1

# ---------------------------------------------------------------- through the service


def service_environment(receiver_url, **extra):
    return {**QUIET_LOGS, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url, **FAST, **extra}


def payment_lines(process):
    """The `payment` events of a service's JSON log, by trace id."""
    events = [json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")]
    return {event["trace_id"]: event for event in events if event["event"] == "payment"}


def test_no_secret_of_the_otlp_variables_reaches_the_log_or_health(run_service, receiver):
    with_credentials = receiver.url.replace("http://", "http://user:s3cr3t-password@")
    service = run_service(**service_environment(with_credentials, OTEL_EXPORTER_OTLP_HEADERS=(
        "x-scope-orgid=training,Authorization: Bearer s3cr3t-key")))  # a colon for '=': a common slip
    assert http("POST", service.url + "/api/payments", {"amount": 12})[0] == 200
    health = http("GET", service.url + "/health")[2]["dependencies"]["tracing"]
    _, headers, _ = eventually(lambda: receiver.requests and receiver.requests[0], message="spans exported")
    assert {name.lower(): value for name, value in headers.items()}["x-scope-orgid"] == "training"
    service.send_signal(signal.SIGTERM)
    service.wait(15)
    log_text = service.log_path.read_text()
    assert "OTEL_EXPORTER_OTLP_HEADERS has an entry that is not key=value" in log_text
    assert "s3cr3t" not in log_text + json.dumps(health)
    assert health["endpoint"] == receiver.url + "/v1/traces"


def test_client_traceparent_comes_back_in_the_answer_the_payment_log_line_and_the_span(run_service, receiver):
    service = run_service(**service_environment(receiver.url, PAYMENT_LATENCY_SCALE="0.1"))
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"

    status, headers, answer = http("POST", service.url + "/api/payments", {"amount": 42.5, "currency": "EUR"},
                                   headers={"traceparent": traceparent})

    assert status == 200, answer
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE_ID, "01")
    assert span_id != CLIENT_SPAN_ID
    assert answer["traceId"] == CLIENT_TRACE_ID
    line = eventually(lambda: payment_lines(service).get(CLIENT_TRACE_ID), message="payment log line")
    assert line["span_id"] == span_id and line["payment_id"] == answer["paymentId"]
    root = by_name(receiver.trace(CLIENT_TRACE_ID))["POST /api/payments"]
    assert root.span_id.hex() == span_id
    assert root.parent_span_id.hex() == CLIENT_SPAN_ID
    assert attribute_values(root.attributes)["payment.id"] == answer["paymentId"]
    _, _, health = http("GET", service.url + "/health")
    assert health["dependencies"]["tracing"]["state"] == "up"


class ExemplarPrometheus(Prometheus):
    """The conftest Prometheus with exemplar storage on (it scrapes OpenMetrics, where exemplars are shown)."""

    def __init__(self, tmp_path, target):
        super().__init__(tmp_path, target)
        self.args.append("--enable-feature=exemplar-storage")

    def exemplars(self, promql, seconds=120):
        query = urllib.parse.urlencode({"query": promql, "start": time.time() - seconds, "end": time.time() + 5})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_exemplars?{query}", timeout=10) as response:
            return [exemplar for series in json.load(response)["data"] for exemplar in series["exemplars"]]


def dashboard_latency_query():
    """The dashboard's p95 latency query (the one showing exemplars, if one says so), its variables matching all."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana", "dashboards", "payment-api.json")
    with open(path) as dashboard:
        panels = json.load(dashboard)["panels"]
    panels += [inner for panel in panels for inner in panel.get("panels", [])]  # those inside collapsed rows
    latency = [target for panel in panels for target in panel.get("targets", [])
               if "histogram_quantile(0.95" in target.get("expr", "") and "payment_duration_seconds" in target["expr"]]
    query = ([target for target in latency if target.get("exemplar")] or latency)[0]["expr"]
    return re.sub(r"\$\{?(\w+)\}?", lambda match: "1m" if match[1].startswith("__") else ".*", query)


def test_exemplars_of_the_latency_query_lead_to_payment_log_lines_and_spans(run_service, receiver, tmp_path):
    service = run_service(**service_environment(receiver.url, ENABLE_SIMULATION="true", SIMULATION_RATE="20",
                                                PAYMENT_LATENCY_SCALE="0.2"))
    prometheus = ExemplarPrometheus(tmp_path, service.url.removeprefix("http://")).start()
    try:
        traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
        query = dashboard_latency_query()

        # 1.2 s: alone in its bucket (simulated payments take about 25 ms here), so its exemplar stays there
        status, _, answer = http("POST", service.url + "/api/payments", {"amount": 7},
                                 headers={"traceparent": traceparent, "X-Simulate-Latency": "1.2"})
        assert status == 200, answer

        def client_exemplar():
            exemplars = prometheus.exemplars(query)
            return exemplars if CLIENT_TRACE_ID in {e["labels"]["trace_id"] for e in exemplars} else None

        exemplars = eventually(client_exemplar, timeout=30, interval=0.5, message="the client's exemplar")
    finally:
        prometheus.stop()

    trace_ids = {exemplar["labels"]["trace_id"] for exemplar in exemplars}
    assert len(trace_ids) > 1  # simulated payments' exemplars too
    lines = eventually(lambda: (lambda found: found if trace_ids <= set(found) else None)(payment_lines(service)),
                       message="a payment log line for every exemplar")
    for trace_id in trace_ids:
        spans = {span.span_id.hex(): span for span in receiver.trace(trace_id)}
        assert spans[lines[trace_id]["span_id"]].name in ("POST /api/payments", "simulated payment")
    client_root = by_name(receiver.trace(CLIENT_TRACE_ID))["POST /api/payments"]
    assert client_root.parent_span_id.hex() == CLIENT_SPAN_ID


def test_error_spike_failures_mark_the_root_span_as_an_error(make_app, receiver):
    app = make_app(latency_scale=0.0, otel_environment={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **FAST})
    status, _, body = http("POST", app.url + "/api/scenarios/error_spike", {})
    assert status == 200, body

    def failed_payment():
        status, _, answer = http("POST", app.url + "/api/payments", {"amount": 12})
        return answer if status == 500 else None

    answer = eventually(failed_payment, message="a payment failing in the error spike")

    spans = by_name(receiver.trace(answer["traceId"]))
    root = spans["POST /api/payments"]
    assert root.status.code == Status.STATUS_CODE_ERROR
    assert "error_spike" in root.status.message
    assert spans["bank_authorization"].status.code == Status.STATUS_CODE_ERROR


def test_the_answers_traceparent_says_whether_the_sampler_records_the_payment(make_app, receiver):
    app = make_app(latency_scale=0.0, otel_environment={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                                                        "OTEL_TRACES_SAMPLER": "traceidratio",
                                                        "OTEL_TRACES_SAMPLER_ARG": "0.5", **FAST})
    answers = [http("POST", app.url + "/api/payments", {"amount": 12}) for _ in range(40)]
    flags = {answer["traceId"]: headers["traceparent"].endswith("-01") for _, headers, answer in answers}
    assert 0 < sum(flags.values()) < len(flags)  # a ratio of 0.5 keeps some and drops some
    recorded = {trace_id for trace_id, sampled in flags.items() if sampled}
    exported = eventually(lambda: {span.trace_id.hex() for _, span in receiver.spans()} >= recorded
                          and {span.trace_id.hex() for _, span in receiver.spans()}, message="recorded traces")
    assert exported == recorded


def post_latencies(app_url, count):
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        status, _, answer = http("POST", app_url + "/api/payments", {"amount": 10})
        latencies.append(time.monotonic() - started)
        assert status == 200, answer
    return latencies


def p99(latencies):
    return statistics.quantiles(latencies, n=100)[98]


def test_a_hung_collector_changes_no_post_latency_and_its_dropped_spans_are_counted(make_app):
    quick = {"latency_scale": 0.0, "failure_rate": 0.0, "decline_rate": 0.0}
    untraced = make_app(**quick)
    with hung_collector() as url:
        traced = make_app(**quick, otel_environment={"OTEL_EXPORTER_OTLP_ENDPOINT": url, **FAST,
                                                     "OTEL_BSP_MAX_QUEUE_SIZE": "100",
                                                     "OTEL_EXPORTER_OTLP_TIMEOUT": "20000"})
        post_latencies(untraced.url, 20)  # warm both up
        post_latencies(traced.url, 20)

        without_tracing = p99(post_latencies(untraced.url, 300))
        with_hung_collector = p99(post_latencies(traced.url, 300))

        # a generous bound, not a microbenchmark: a payment that waited for the collector would take 20 s
        assert with_hung_collector < max(3 * without_tracing, without_tracing + 0.05), \
            (with_hung_collector, without_tracing)
        assert metric_value(traced.url, "payment_trace_spans_dropped_total", reason="queue_full") >= 320 * 4 - 100
        assert metric_value(traced.url, "payment_trace_spans_exported_total") == 0
        started = time.monotonic()
        traced.stop()  # while the hung collector still holds the export: the stop must not wait 20 s for it
        assert time.monotonic() - started < 3
