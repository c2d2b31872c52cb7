"""OpenTelemetry traces for payment-api: each payment becomes a trace, exported over OTLP/HTTP (an
optional extra).

Install:  pip install -r requirements-tracing.txt   (opentelemetry-sdk and its OTLP/HTTP exporter)
Enable:   OTEL_EXPORTER_OTLP_ENDPOINT=http://tempo:4318 python payment_api.py
payment_api.py imports this module only when an endpoint is set; without the packages it runs
without traces.

A payment's trace is a root span (`POST /api/payments`, or `simulated payment` for the simulator)
with one child span per processing step. Its ids are the ones the service puts in answers, logs and
exemplars, so Tempo shows the trace a Grafana exemplar or log line points at. Spans wait in a
bounded queue and leave in batches from one background thread: a payment never waits for the
collector, and every span given up is counted by reason.

The standard variables are read from the dict the service hands over (the settings' OTEL_*
variables), not from os.environ: OTEL_SERVICE_NAME (default payment-api), OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, OTEL_EXPORTER_OTLP_ENDPOINT (gets /v1/traces
appended) or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is), OTEL_EXPORTER_OTLP_[TRACES_]HEADERS,
_TIMEOUT (milliseconds, as the specification says), _COMPRESSION, _CERTIFICATE,
_CLIENT_CERTIFICATE, _CLIENT_KEY, and OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_SCHEDULE_DELAY,
OTEL_BSP_MAX_EXPORT_BATCH_SIZE. Only OTLP over HTTP with protobuf is spoken.
"""
import logging
import threading
from collections import deque
from urllib.parse import unquote, urlsplit

from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from prometheus_client import Counter, Gauge

log = logging.getLogger("payment_api")
# the exporter logs every failed batch; the tracer logs each change of the collector's state once
# instead
logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)

COMPRESSIONS = {"gzip": Compression.Gzip, "deflate": Compression.Deflate}
DROP_REASONS = ("queue_full", "export_failed", "shutdown", "error")
SCOPE = InstrumentationScope("payment_api")
NEVER_ACCEPTED_WAIT = 1.0  # seconds a stop gives a collector that has not accepted a span yet
UNREACHABLE = ("OpenTelemetry collector unreachable or refusing spans: spans are kept (up to "
               "OTEL_BSP_MAX_QUEUE_SIZE) and retried for OTEL_EXPORTER_OTLP_TIMEOUT, then dropped "
               "and counted")


def otlp_variable(environment, name):
    """The variable that applies: OTEL_EXPORTER_OTLP_TRACES_<name> when set, else
    OTEL_EXPORTER_OTLP_<name>."""
    specific = f"OTEL_EXPORTER_OTLP_TRACES_{name}"
    return specific if environment.get(specific) else f"OTEL_EXPORTER_OTLP_{name}"


def otlp_setting(environment, name, default=None):
    return environment.get(otlp_variable(environment, name)) or default


def traces_endpoint(environment):
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, else OTEL_EXPORTER_OTLP_ENDPOINT plus /v1/traces
    (the spec's rule)."""
    if environment.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return environment["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    return environment["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"


def positive_number(environment, name, default):
    """The variable's value as a positive number; the default, with a warning naming it, when it is
    not one."""
    text = environment.get(name, "")
    try:
        value = float(text) if text.strip() else default
    except ValueError:
        value = -1
    if value <= 0:
        log.warning(f"{name} is not a positive number; using {default}",
                    extra={"fields": {"value": text}})
        return default
    return value


def make_resource(environment, instance):
    """service.name, service.instance.id and OTEL_RESOURCE_ATTRIBUTES (which may override the
    instance)."""
    attributes = {"service.instance.id": instance, "telemetry.sdk.language": "python",
                  "telemetry.sdk.name": "opentelemetry"}
    for pair in environment.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, equals, value = pair.partition("=")
        if equals and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = (environment.get("OTEL_SERVICE_NAME")
                                  or attributes.get("service.name") or "payment-api")
    return Resource(attributes)


def make_sampler(environment):
    """(name, sampler) from OTEL_TRACES_SAMPLER[_ARG]; like the SDK, an unknown name means
    parentbased_always_on."""
    name = environment.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    arg = environment.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        ratio = float(arg) if arg.strip() else 1.0
    except ValueError:
        ratio = -1
    if not 0 <= ratio <= 1:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a ratio from 0 to 1; using 1.0",
                    extra={"fields": {"value": arg}})
        ratio = 1.0
    samplers = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
                "traceidratio": sampling.TraceIdRatioBased(ratio),
                "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
                "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
                "parentbased_traceidratio": sampling.ParentBased(
                    sampling.TraceIdRatioBased(ratio))}
    if name not in samplers:
        log.warning("unknown OTEL_TRACES_SAMPLER; using parentbased_always_on",
                    extra={"fields": {"value": name}})
        name = "parentbased_always_on"
    return name, samplers[name]


def otlp_headers(environment):
    """OTEL_EXPORTER_OTLP_[TRACES_]HEADERS as a dict: key=value pairs, comma-separated, values
    percent-encoded. A malformed pair is left out with a warning that names the variable, never the
    value (it may be an API key)."""
    variable = otlp_variable(environment, "HEADERS")
    headers = {}
    for pair in environment.get(variable, "").split(","):
        key, equals, value = pair.partition("=")
        if not pair.strip():
            continue
        if not equals or not key.strip():
            log.warning(f"{variable} has an entry that is not key=value; it is left out")
            continue
        headers[key.strip().lower()] = unquote(value.strip())
    return headers


def shown(endpoint):
    """The endpoint as logs and /health show it: without a user name or password it may carry."""
    parts = urlsplit(endpoint)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def make_exporter(environment):
    compression = otlp_setting(environment, "COMPRESSION", "none").strip().lower()
    certificate = otlp_setting(environment, "CLIENT_CERTIFICATE")
    return OTLPSpanExporter(
        endpoint=traces_endpoint(environment),
        headers=otlp_headers(environment),
        timeout=positive_number(environment, otlp_variable(environment, "TIMEOUT"), 10_000) / 1000,
        compression=COMPRESSIONS.get(compression, Compression.NoCompression),
        certificate_file=otlp_setting(environment, "CERTIFICATE"),
        client_certificate_file=certificate,
        client_key_file=otlp_setting(environment, "CLIENT_KEY") if certificate else None)


def root_name(source):
    return "POST /api/payments" if source == "api" else "simulated payment"


def nanoseconds(seconds):
    return int(round(seconds * 1e9))


def payment_attributes(payment):
    """The root span's attributes: the payment's fields, and HTTP's for an API payment."""
    request = payment.request
    attributes = {"payment.id": payment.payment_id, "payment.amount": float(request.amount),
                  "payment.currency": request.currency, "payment.type": request.type,
                  "payment.method": request.method, "payment.status": payment.status,
                  "payment.source": payment.source}
    if payment.decline_code:
        attributes["payment.decline_code"] = payment.decline_code
    if payment.source == "api":
        attributes.update({"http.request.method": "POST", "http.route": "/api/payments",
                           "url.path": "/api/payments",
                           "http.response.status_code": payment.http_status})
    if payment.http_status >= 500:
        attributes["error.type"] = str(payment.http_status)
    return attributes


class PaymentTracer:
    """Turns finished payments into spans and exports them in batches from a background thread."""

    def __init__(self, environment, instance, registry):
        self.endpoint = shown(traces_endpoint(environment))  # for logs and /health only
        if urlsplit(self.endpoint).scheme not in ("http", "https"):
            log.warning(f"{otlp_variable(environment, 'ENDPOINT')} is not an http:// or https:// "
                        "URL: no span can be exported",
                        extra={"fields": {"endpoint": self.endpoint}})
        self.resource = make_resource(environment, instance)
        self.sampler_name, self.sampler = make_sampler(environment)
        self.max_queue = int(positive_number(environment, "OTEL_BSP_MAX_QUEUE_SIZE", 2048))
        batch_size = positive_number(environment, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.batch_size = min(int(batch_size), self.max_queue)
        self.schedule_delay = positive_number(environment, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        protocol = otlp_setting(environment, "PROTOCOL", "http/protobuf")
        if protocol != "http/protobuf":
            log.warning("only OTLP over http/protobuf is spoken; OTEL_EXPORTER_OTLP_PROTOCOL is "
                        "ignored", extra={"fields": {"value": protocol}})
        self._exporter = make_exporter(environment)
        self._ids = RandomIdGenerator()
        self._queue = deque()  # (payment, its number of spans)
        self._queued = 0  # spans in the queue
        self._in_flight = 0  # spans of the batch being exported
        self._closing = False
        self._closed = False
        self._wake = threading.Condition(threading.Lock())
        self.state = "connecting"
        self._state_lock = threading.Lock()
        self.add_metrics(registry)
        self._thread = threading.Thread(target=self._run, name="otlp-trace-export", daemon=True)
        self._thread.start()
        fields = {"endpoint": self.endpoint, "sampler": self.sampler_name,
                  "service": self.resource.attributes["service.name"]}
        log.info("OpenTelemetry traces on", extra={"fields": fields})

    def add_metrics(self, registry):
        """The tracer's own counters, in the service's registry."""
        self.exported = Counter("payment_trace_spans_exported_total",
                                "Spans the OpenTelemetry collector accepted", registry=registry)
        self.dropped = Counter("payment_trace_spans_dropped_total", "Spans given up, by reason "
                               "(queue_full, export_failed, shutdown, error)", ["reason"],
                               registry=registry)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        queued = Gauge("payment_trace_spans_queued", "Spans waiting to be exported",
                       registry=registry)
        queued.set_function(lambda: self._queued + self._in_flight)

    def record(self, payment):
        """Queue a finished payment's spans if sampled; a full queue drops them (counted). Never
        blocks or raises."""
        try:
            if not payment.trace.sampled:
                return
            spans = 1 + len(payment.steps)  # worked out for the sampled payments alone
            with self._wake:
                if not self._closing and self._queued + self._in_flight + spans <= self.max_queue:
                    self._queue.append((payment, spans))
                    self._queued += spans
                    if self._queued >= self.batch_size:
                        self._wake.notify()
                    return
            self.dropped.labels("shutdown" if self._closing else "queue_full").inc(spans)
        except Exception:
            log.exception("payment could not be traced")
            self.dropped.labels("error").inc()

    def sample(self, trace, source):
        """The trace with the sampler's decision (OTEL_TRACES_SAMPLER, and the client's sampled
        flag) as its sampled flag: decided once, when the payment begins, so the answer's
        traceparent says whether its spans leave."""
        parent = None
        if trace.parent_span_id:
            flags = TraceFlags(TraceFlags.SAMPLED if trace.sampled else TraceFlags.DEFAULT)
            client_span = SpanContext(int(trace.trace_id, 16), int(trace.parent_span_id, 16),
                                      is_remote=True, trace_flags=flags)
            parent = trace_api.set_span_in_context(trace_api.NonRecordingSpan(client_span))
        decision = self.sampler.should_sample(parent, int(trace.trace_id, 16), root_name(source))
        return trace._replace(sampled=decision.decision.is_sampled())

    def spans(self, payment):
        """The payment's root span and one child per step, back to back from the root's start."""
        trace = payment.trace
        trace_id = int(trace.trace_id, 16)
        sampled = TraceFlags(TraceFlags.SAMPLED)
        root = SpanContext(trace_id, int(trace.span_id, 16), is_remote=False, trace_flags=sampled)
        parent = None
        if trace.parent_span_id:
            parent = SpanContext(trace_id, int(trace.parent_span_id, 16), is_remote=True,
                                 trace_flags=sampled)
        end = nanoseconds(payment.completed_at)
        start = end - nanoseconds(payment.processing_time)
        status = Status(StatusCode.UNSET)  # a decline is the bank's answer, not an error of ours
        if payment.http_status >= 500:
            status = Status(StatusCode.ERROR, payment.failure_reason)
        kind = SpanKind.SERVER if payment.source == "api" else SpanKind.INTERNAL
        root_span = ReadableSpan(root_name(payment.source), root, parent, self.resource,
                                 payment_attributes(payment), kind=kind, status=status,
                                 start_time=start, end_time=end, instrumentation_scope=SCOPE)
        return [root_span, *self.step_spans(payment, root, start, end)]

    def step_spans(self, payment, root, start, end):
        """One span a processing step, back to back from `start`, none past `end`."""
        spans = []
        elapsed = 0.0
        for step in payment.steps:
            step_start = start + nanoseconds(elapsed)
            elapsed += step.seconds
            context = SpanContext(root.trace_id, self._ids.generate_span_id(), is_remote=False,
                                  trace_flags=root.trace_flags)
            failed = Status(StatusCode.UNSET)
            if step.error:
                failed = Status(StatusCode.ERROR, step.error)
            step_end = min(start + nanoseconds(elapsed), end)
            spans.append(ReadableSpan(step.name, context, root, self.resource,
                                      {"error.type": step.error} if step.error else {},
                                      status=failed, start_time=step_start, end_time=step_end,
                                      instrumentation_scope=SCOPE))
        return spans

    def _run(self):
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or self._queued >= self.batch_size,
                                    self.schedule_delay)
                if self._closed or (self._closing and not self._queue):
                    return
                batch = []
                while self._queue and (not batch
                                       or self._in_flight + self._queue[0][1] <= self.batch_size):
                    payment, spans = self._queue.popleft()
                    batch.append(payment)
                    self._queued -= spans
                    self._in_flight += spans
                count = self._in_flight
            if batch:
                self._export(batch, count)

    def _export(self, batch, count):
        try:
            spans = [span for payment in batch for span in self.spans(payment)]
            accepted = self._exporter.export(spans) is SpanExportResult.SUCCESS
        # a bug of ours or of the exporter: say it, count the spans, go on with the next batch
        except Exception:
            log.exception("spans could not be exported")
            accepted = False
        with self._wake:
            # a late answer after close(): these spans were counted as dropped then
            if self._closed:
                return
            self._in_flight = 0
        if accepted:
            self.exported.inc(count)
            self._set_state("up", "OpenTelemetry collector accepts spans")
        else:
            self.dropped.labels("export_failed").inc(count)
            self._set_state("unreachable", UNREACHABLE)

    def _set_state(self, state, message):
        """Log a change of state once (up, unreachable), not once a batch."""
        with self._state_lock:
            if state == self.state:
                return
            self.state = state
        log.log(logging.INFO if state == "up" else logging.WARNING, message,
                extra={"fields": {"endpoint": self.endpoint}})

    def health(self):
        return {"state": self.state, "endpoint": self.endpoint, "sampler": self.sampler_name,
                "queuedSpans": self._queued + self._in_flight}

    def close(self, timeout):
        """Export what is queued, waiting at most `timeout` seconds, then count what is left as
        dropped.

        A collector known to be unreachable would not take the spans: the stop does not wait for
        it, and one that has not accepted a span yet gets NEVER_ACCEPTED_WAIT, enough for a healthy
        one.
        """
        if self.state == "unreachable":
            timeout = 0
        elif self.state != "up":
            timeout = min(timeout, NEVER_ACCEPTED_WAIT)
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            self._closed = True
            left = self._queued + self._in_flight
            self._queue.clear()
            self._queued = self._in_flight = 0
        if left:
            log.warning("spans left unexported at shutdown", extra={"fields": {"spans": left}})
            self.dropped.labels("shutdown").inc(left)
        # ends the exporter's retry waits; a hung request ends with its timeout
        self._exporter.shutdown()
