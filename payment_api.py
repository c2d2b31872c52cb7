"""payment-api: a mock payment service giving Prometheus, InfluxDB and Grafana classes telemetry.

Run it with `python payment_api.py` (settings: `python payment_api.py --help`, or the docs).
A built-in simulator makes payments from the first second. Every payment, simulated or sent to
`POST /api/payments`, is counted in the Prometheus metrics at `/metrics`, written to InfluxDB 2 and
logged with its W3C trace id; with the OpenTelemetry extra (tracing.py) it is also sent as a trace.

How to read this file. Part I is the course path: one payment, in the order it travels.
  1. settings      a plain table read from the environment (and CLI flags) once, at start-up
  2. the request   the JSON body and the headers, validated; client mistakes become 4xx answers
  3. the payment   what a payment is, where it sits in a trace, and the store of recent ones
  4. processing    PaymentProcessor: the one path for API and simulated payments alike
  5. metrics       PaymentStats (the figures of /stats and the gauges) and every payment
                   metric, in one registry the app owns (tracing.py adds its own)
  6. exports       the InfluxDB line, the batching writer, the log line's fields (the trace:
                   tracing.py, an optional extra)
  7. HTTP          the routing table and the handler: POST /api/payments starts here
  8. simulator     the incident scenarios, and the thread that makes payments on its own
  9. application   PaymentApp wires the parts and owns start and stop; main()
One payment: PaymentHandler.create_payment -> validate_payment -> PaymentProcessor.pay, which
calls begin (outcome and processing time), waits, then finish: the store, tracer.record,
PaymentMetrics.record_payment, PaymentStats.record, payment_line -> InfluxWriter.export and
PaymentLog.write (the log line) -> payment_answer -> the answer. A request with an
Idempotency-Key runs the same pay inside IdempotencyKeys.answer_once (Part II), which remembers
the answer for a retry.

How a payment ended is spelled three ways, as the course's contract has it: `status` in answers,
the store and the log is completed, declined or failed; its `outcome` (success, declined,
failed) is the `status` label of payment_amount and payment_duration_seconds and the `status`
tag in InfluxDB; and payment_requests_total's `status` label is the HTTP code (200, 402, 500,
503, or the 4xx of a body create_payment refused; the guards' refusals are not counted).
Answers also say "success": true or false, and /api/payments/stats counts "succeeded".

PaymentApp runs Part I with Part II attached: ActivityStats, ScenarioControl, RefundingStore,
RefundingProcessor, InfluxExporter and GuardedServer are PaymentStats, ScenarioBoard,
PaymentStore, PaymentProcessor, InfluxWriter and PaymentServer with what Part II adds, and the
server's GuardedHandler is PaymentHandler with the guards and Part II's endpoints. With
INFLUXDB_URL empty (or influxdb-client missing) the exporter is a DisabledExporter.

Part II, the machinery, keeps the service safe and fast without changing that path: connection
guards (deadlines, framing, fair shares, cross-site refusals, a cap with an overflow), idempotency
keys, refunds, the exporter's states and stop, listing and the console's activity, students'
checks (exercises.py) and the admin token, scenario control, traffic shapes and fast draws, the
steps a trace shows (tracing.py), the JSON payment line rendered fast, and start-up plumbing.
Each piece attaches to Part I as a subclass, a small hook, or a function Part I calls by name, so
Part I reads without it.
"""
import base64
import bisect
import dataclasses
import email.parser
import email.utils
import errno
import functools
import gzip
import hashlib
import heapq
import hmac
import http.client
import io
import itertools
import ipaddress
import json
import logging
import math
import operator
import os
import random
import re
import select
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

VERSION = "1.0.0"
log = logging.getLogger("payment_api")

# ================================================================ PART I: THE COURSE PATH
# ---------------------------------------------------------------- 1. settings


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message names the variable."""


def number(kind, low, high=math.inf):
    """A parser for a setting that is an int or float from `low` to `high`."""
    noun = "a whole number" if kind is int else "a number"
    if high == math.inf:
        described = f"{noun} of at least {low:g}"
    else:
        described = f"{noun} from {low:g} to {high:g}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError("must be " + described)
        return value
    return parse


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}


def parse_bool(text):
    if text.strip().lower() not in BOOLEAN_WORDS:
        raise ValueError("must be true or false")
    return BOOLEAN_WORDS[text.strip().lower()]


def one_of(*choices):
    def parse(text):
        if text.strip().lower() not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text.strip().lower()
    return parse


def parse_url(text):
    if text and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", text):
        raise ValueError("must be an http:// or https:// URL, or empty")
    return text


INSTANCE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def parse_instance(text):
    if not INSTANCE_NAME.fullmatch(text):
        raise ValueError("must be 1-64 characters of A-Z, a-z, 0-9, _ . : and -")
    return text


def default_instance():
    host = socket.gethostname()
    return host if INSTANCE_NAME.fullmatch(host) else "payment-api"


def parse_optional_int(text):
    return int(text) if text.strip() else None


def parse_currencies(text):
    codes = tuple(code.strip().upper() for code in text.split(",") if code.strip())
    well_formed = all(re.fullmatch(r"[A-Z]{3}", code) for code in codes)
    if not codes or not well_formed or len(set(codes)) < len(codes):
        raise ValueError("must be distinct three-letter currency codes separated by commas, "
                         "e.g. USD,EUR,GBP")
    return codes


def parse_token(text):
    """A bearer token as a client can send it: visible ASCII, no space anywhere."""
    if not re.fullmatch(r"[!-~]*", text):
        raise ValueError("must be printable ASCII without spaces (a header carries it "
                         "byte for byte; check for a space or line break at either end)")
    return text


def parse_origins(text):
    """Web origins, e.g. http://grafana.example:3000, separated by commas."""
    origins = tuple(origin.strip().lower().rstrip("/") for origin in text.split(",")
                    if origin.strip())
    if not all(re.fullmatch(r"https?://[^/\s]+", origin) for origin in origins):
        raise ValueError("must be origins such as http://localhost:3000, separated by commas")
    return origins


def parse_networks(text):
    """Addresses or networks (10.0.0.0/8), separated by commas."""
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError("must be IP addresses or networks such as 172.16.0.0/12, "
                         "separated by commas") from None


def setting(default, env, help, parse=str, aliases=(), lenient=False, secret=False):
    """A row of the settings table: its variable (or an older alias), its --help and its parser.

    A lenient setting falls back to its default, with a warning, when its value is wrong."""
    metadata = {"env": env, "help": help, "parse": parse, "aliases": aliases, "lenient": lenient,
                "secret": secret}
    return field(default=default, repr=not secret, metadata=metadata)


PROFILES = ("steady", "diurnal", "bursty")  # traffic shapes, see the simulator
MAX_SIMULATION_RATE = 5000.0  # payments per second; a traffic_surge multiplies it by 5
MAX_FLUSH_INTERVAL_MS = 5000  # so InfluxDB panels lag Prometheus by seconds at most


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, read once at start-up: flag, else variable, else default."""
    host: str = setting("0.0.0.0", "HOST", "address to listen on")
    port: int = setting(8080, "PORT", "TCP port to listen on (0 picks a free one)",
                        number(int, 0, 65535), aliases=("PAYMENT_API_PORT",))
    log_format: str = setting("json", "LOG_FORMAT", "json (one JSON object a line) or text",
                              one_of("json", "text"))
    log_level: str = setting("info", "LOG_LEVEL", "debug also logs /health and /metrics requests",
                             one_of("debug", "info", "warning", "error"))
    log_payments: bool = setting(True, "LOG_PAYMENTS", "log a 'payment' event (with its trace "
                                 "id) for every completed payment; false for very high rates",
                                 parse_bool)
    currencies: tuple = setting(("USD", "EUR", "GBP"), "CURRENCIES",
                                "accepted currencies, comma-separated", parse_currencies)
    store_size: int = setting(10_000, "STORE_SIZE",
                              "how many recent payments GET /api/payments/{id} can find",
                              number(int, 1))
    failure_rate: float = setting(0.02, "PAYMENT_FAILURE_RATE", "probability that a payment "
                                  "fails with HTTP 500 (the payment_failure_rate gauge shows "
                                  "the failed percentage over the last 60 s)",
                                  number(float, 0, 1))
    decline_rate: float = setting(0.02, "PAYMENT_DECLINE_RATE", "probability that the bank "
                                  "declines a card payment (HTTP 402); test card numbers are "
                                  "always declined", number(float, 0, 1))
    latency_scale: float = setting(1.0, "PAYMENT_LATENCY_SCALE", "multiplies simulated "
                                   "processing time (0 = no delay, for load tests)",
                                   number(float, 0))
    simulation_enabled: bool = setting(True, "ENABLE_SIMULATION",
                                       "run the built-in traffic simulator", parse_bool)
    simulation_rate: float = setting(5.0, "SIMULATION_RATE",
                                     "simulated payments per second (0 = off)",
                                     number(float, 0, MAX_SIMULATION_RATE),
                                     aliases=("PAYMENT_SIMULATION_RATE",))
    simulation_profile: str = setting("steady", "SIMULATION_PROFILE",
                                      "traffic shape: " + ", ".join(PROFILES), one_of(*PROFILES))
    simulation_period: float = setting(3600.0, "SIMULATION_PERIOD",
                                       "length in seconds of one diurnal 'day'; 86400 follows "
                                       "the UTC clock and week, as the history", number(float, 0))
    simulation_seed: int = setting(None, "SIMULATION_SEED",
                                   "makes simulated payments reproducible (empty = random)",
                                   parse_optional_int)
    scenario_schedule: tuple = setting((), "SCENARIO_SCHEDULE", "incidents to run unattended, "
                                       "e.g. error_spike@2m+5m,random@10m+3m/20m",
                                       lambda text: parse_schedule(text))  # see Part II
    admin_token: str = setting("", "ADMIN_TOKEN", "when set, changing scenarios or the "
                               "simulator needs 'Authorization: Bearer <token>'", parse_token,
                               secret=True)
    max_connections: int = setting(256, "MAX_CONNECTIONS", "connections served at once, a "
                                   "thread each; more are answered 503 with Retry-After, "
                                   "except /health and /metrics", number(int, 1, 10_000))
    client_share: float = setting(0.25, "MAX_CLIENT_SHARE", "share of MAX_CONNECTIONS one "
                                  "client address may keep busy at once; more get 429",
                                  number(float, 0.01, 1))
    trusted_proxies: tuple = setting((), "TRUSTED_PROXIES", "proxies (addresses or networks) "
                                     "whose X-Forwarded-For names the client", parse_networks)
    allowed_origins: tuple = setting((), "ALLOWED_ORIGINS", "web origins besides the "
                                     "service's own that may change things (POST, PUT, "
                                     "DELETE) from a browser", parse_origins)
    shutdown_timeout: float = setting(8.0, "SHUTDOWN_TIMEOUT",
                                      "seconds to finish requests and InfluxDB writes on stop",
                                      number(float, 0))
    instance: str = setting(default_instance(), "INSTANCE", "name of this replica (the host "
                            "name by default), the instance tag of its InfluxDB points",
                            parse_instance)
    influxdb_url: str = setting("http://influxdb:8086", "INFLUXDB_URL",
                                "InfluxDB 2 URL (empty = export off)", parse_url)
    influxdb_token: str = setting("training-token-change-me", "INFLUXDB_TOKEN",
                                  "InfluxDB API token", secret=True)
    influxdb_org: str = setting("data2ai", "INFLUXDB_ORG", "InfluxDB organization")
    influxdb_bucket: str = setting("training", "INFLUXDB_BUCKET", "InfluxDB bucket")
    influxdb_batch_size: int = setting(500, "INFLUXDB_BATCH_SIZE", "points per write",
                                       number(int, 1), lenient=True)
    influxdb_flush_interval_ms: int = setting(1000, "INFLUXDB_FLUSH_INTERVAL_MS",
                                              "longest wait before a write",
                                              number(int, 1, MAX_FLUSH_INTERVAL_MS),
                                              lenient=True)
    influxdb_buffer_size: int = setting(50_000, "INFLUXDB_BUFFER_SIZE", "points kept while "
                                        "InfluxDB is unreachable; more are dropped and counted",
                                        number(int, 1), lenient=True)
    prometheus_url: str = setting("", "PROMETHEUS_URL", "Prometheus that checks students' alert "
                                  "rules and dashboards (/api/checks, exercises.py); empty = "
                                  "checks off", parse_url)
    # every OTEL_* variable, for the optional OpenTelemetry extra (tracing.py)
    otel_environment: dict = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple = field(default=(), compare=False)

    @classmethod
    def load(cls, argv=(), environ=os.environ):
        """Settings from CLI flags, then environment variables, then defaults.

        SettingsError names a bad value; reading the table is start-up plumbing (Part II)."""
        return read_settings(cls, list(argv), environ)

# ---------------------------------------------------------------- 2. the request


PAYMENT_TYPES = ("standard", "express", "recurring")
PAYMENT_METHODS = ("card", "bank_transfer", "wallet")
# payment_requests_total's status codes of a paid request: completed, declined, failed,
# refused during an outage
OUTCOME_STATUSES = ("200", "402", "500", "503")
# a payment's status in answers, the store and filters
PAYMENT_STATUSES = ("completed", "declined", "failed")
# Well-known test card numbers that a card network declines, with the reason
TEST_CARDS = {"4000000000000002": "generic_decline", "4000000000009995": "insufficient_funds",
              "4000000000000069": "expired_card", "4100000000000019": "suspected_fraud"}
CARD_NUMBER = re.compile(r"[0-9]{12,19}")  # and a valid Luhn check digit
DECLINE_WEIGHTS = {"insufficient_funds": 45, "generic_decline": 30, "expired_card": 15,
                   "suspected_fraud": 10}
DECLINE_CODES = tuple(DECLINE_WEIGHTS)
INVALID = "invalid"  # the one label value that stands for anything a client invents
MAX_AMOUNT = Decimal("1000000")
CUSTOMER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
CUSTOMER_POOL = 1000
# the customers of the simulator (and of requests that name none); the first are the regulars
CUSTOMER_IDS = tuple(f"cust_{number:05d}" for number in range(1, CUSTOMER_POOL + 1))
MAX_BODY_BYTES = 64 * 1024
MAX_PROCESSING_SECONDS = 30.0
ECHO_LIMIT = 200  # characters of client input repeated in an answer or a log line
WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: int() would also take "²" or "١"
SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


class ClientError(Exception):
    """A mistake in a request: answered with `status` and a JSON body, never a traceback."""
    status = 400
    # True where the body's end is unknown: what follows must not be read as a request
    closes_connection = False

    def __init__(self, message, **details):
        super().__init__(message)
        self.body = {"error": message, **details}
        self.headers = {}


class InvalidField(ClientError):
    def __init__(self, field_name, message):
        super().__init__(message, field=field_name)


class MalformedBody(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401


class NotFound(ClientError):
    status = 404


class MethodNotAllowed(ClientError):
    status = 405


class RequestTimeout(ClientError):
    status = 408


class Conflict(ClientError):
    status = 409


class LengthRequired(ClientError):
    status = 411
    closes_connection = True


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class Unprocessable(ClientError):
    status = 422


class PaymentRequest(NamedTuple):
    """What a client (or the simulator) asks for: validated, never changed."""
    amount: Decimal
    currency: str
    type: str
    customer_id: str
    method: str = "card"
    card_last4: str = None  # the only part of a card number kept anywhere
    decline_code: str = None  # set by a test card number that is always declined


def luhn_valid(digits):
    """The check digit of card numbers: catches a mistyped digit or two swapped neighbours."""
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


@dataclass(frozen=True)
class Fault:
    """A fault a student asks for with X-Simulate-Failure / X-Simulate-Latency headers."""
    fail: bool = False
    latency: float = None


def reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body):
    """A JSON document with floats as exact Decimals; NaN, Infinity or garbage: MalformedBody."""
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise MalformedBody("body is not valid JSON") from None


def validate_payment(document, currencies, rng):
    """The PaymentRequest a JSON body asks for, or InvalidField naming the first wrong field.
    A body without customerId is paid by one of the simulator's customers, drawn with `rng`."""
    if not isinstance(document, dict):
        raise MalformedBody("body must be a JSON object")
    amount = validate_amount(document.get("amount"))
    currency = known_currency(document.get("currency", "USD"), currencies)
    if currency is None:
        raise InvalidField("currency", "currency must be one of " + ", ".join(currencies))
    payment_type = known_type(document.get("type", "standard"))
    if payment_type is None:
        raise InvalidField("type", "type must be one of " + ", ".join(PAYMENT_TYPES))
    customer_id = document.get("customerId")
    if customer_id is None:
        customer_id = rng.choice(CUSTOMER_IDS)
    elif not isinstance(customer_id, str) or not CUSTOMER_ID.fullmatch(customer_id):
        raise InvalidField("customerId",
                           "customerId must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
    method = document.get("paymentMethod", "card")
    if method not in PAYMENT_METHODS:
        raise InvalidField("paymentMethod",
                           "paymentMethod must be one of " + ", ".join(PAYMENT_METHODS))
    card_last4, decline_code = validate_card(document, method)
    return PaymentRequest(amount, currency, payment_type, customer_id, method, card_last4,
                          decline_code)


def validate_amount(amount):
    """A money amount as a Decimal with 2 decimals, or InvalidField naming `amount`."""
    if amount is None:
        raise InvalidField("amount", "amount is required")
    if isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
        raise InvalidField("amount", "amount must be a JSON number")
    amount = Decimal(amount)
    if not 0 < amount <= MAX_AMOUNT:
        raise InvalidField("amount", f"amount must be greater than 0 and at most {MAX_AMOUNT}")
    if amount != amount.quantize(Decimal("0.01")):
        raise InvalidField("amount", "amount must have at most 2 decimals")
    return amount.quantize(Decimal("0.01"))


def known_currency(value, currencies):
    """The currency named, in any (ASCII) case, or None."""
    if isinstance(value, str) and value.isascii() and value.upper() in currencies:
        return value.upper()
    return None


def known_type(value):
    if isinstance(value, str) and value.isascii() and value.lower() in PAYMENT_TYPES:
        return value.lower()
    return None


def label_values(document, currencies):
    """(type, currency) labels of a request: what it named if valid, else INVALID, never new."""
    if not isinstance(document, dict):
        return INVALID, INVALID
    payment_type = known_type(document.get("type", "standard")) or INVALID
    currency = known_currency(document.get("currency", "USD"), currencies) or INVALID
    return payment_type, currency


def validate_card(document, method):
    """(last four digits, decline code) of an optional test card number; never the whole number."""
    number = document.get("cardNumber")
    if number is None:
        return None, None
    if method != "card":
        raise InvalidField("cardNumber", "cardNumber goes with paymentMethod card only")
    if not (isinstance(number, str) and CARD_NUMBER.fullmatch(number) and luhn_valid(number)):
        raise InvalidField("cardNumber",
                           "cardNumber must be 12-19 digits with a valid check digit (Luhn)")
    return number[-4:], TEST_CARDS.get(number)


def read_fault(headers):
    """The Fault of X-Simulate-Failure: true and X-Simulate-Latency: <seconds>; 400 if unusable."""
    fail = headers.get("X-Simulate-Failure")
    latency = headers.get("X-Simulate-Latency")
    try:
        if latency and not SECONDS.fullmatch(latency.strip()):
            raise ValueError
        fault = Fault(fail=parse_bool(fail) if fail else False,
                      latency=float(latency) if latency else None)
        if fault.latency is not None and not fault.latency <= MAX_PROCESSING_SECONDS:
            raise ValueError
    except ValueError:
        raise InvalidField("headers", "X-Simulate-Failure must be true or false, "
                           "X-Simulate-Latency seconds from 0 to "
                           f"{MAX_PROCESSING_SECONDS:g}") from None
    return fault

# ---------------------------------------------------------------- 3. the payment


# W3C Trace Context: version-trace id-parent id-flags in lowercase hex; a later version may add
# fields after a '-'
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


class TraceContext(NamedTuple):
    """Where a payment sits in a distributed trace: the ids of its answer, log line and spans."""
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the payment's own span
    parent_span_id: str = None  # the client's span, from its traceparent header, or None
    sampled: bool = True  # whether its spans are recorded: the client's or the sampler's say


def trace_context(traceparent_headers):
    """The payment's TraceContext: a child of the client's span when it sent one valid
    traceparent header, else a new trace. An invalid header is ignored, as W3C asks."""
    parent = None
    if len(traceparent_headers) == 1:
        parent = TRACEPARENT.fullmatch(traceparent_headers[0].strip())
    if parent:
        version, trace_id, parent_span_id, flags, rest = parent.groups()
        valid = (version != "ff" and not (version == "00" and rest)
                 and trace_id != "0" * 32 and parent_span_id != "0" * 16)
        if valid:
            sampled = bool(int(flags, 16) & 1)
            return TraceContext(trace_id, new_span_id(), parent_span_id, sampled=sampled)
    return TraceContext(f"{random.getrandbits(128):032x}", new_span_id())


def new_span_id():
    """64 random bits in hex. Trace, span and refund ids are drawn as OpenTelemetry's own id
    generator draws them: unique, not secret, and without a system call each."""
    return f"{random.getrandbits(64):016x}"


# how a payment ended, by its HTTP status (any other: failed); see the map at the top
PAYMENT_STATUS = {200: "completed", 402: "declined"}  # answers, the store, the log line
PAYMENT_OUTCOME = {200: "success", 402: "declined"}  # metric labels and InfluxDB tags
OUTAGE_REASON = "payment service unavailable (outage scenario)"


@dataclass(slots=True)
class Payment:
    """One payment from arrival to completion: the store, the metrics, InfluxDB, the log and
    the trace all see this object."""
    payment_id: str
    request: PaymentRequest
    source: str  # "api" or "simulator"
    processing_time: float
    http_status: int  # 200 completed, 402 declined, 500 failed, 503 unavailable (outage)
    completed_at: float = None
    decline_code: str = None
    refunds: tuple = ()  # the Refunds, oldest first
    trace: TraceContext = None
    usual_time: float = None  # processing_time without a slow bank or a scenario's slowdown
    failure_reason: str = None  # why a failed or refused payment did not go through
    # worked out once from http_status:
    succeeded: bool = field(init=False)
    status: str = field(init=False)  # completed, declined or failed: in answers and the store
    outcome: str = field(init=False)  # success, declined or failed: metric labels and tags

    def __post_init__(self):
        self.succeeded = self.http_status == 200
        self.status = PAYMENT_STATUS.get(self.http_status, "failed")
        self.outcome = PAYMENT_OUTCOME.get(self.http_status, "failed")

    @property
    def steps(self):
        """The processing Steps, spans of its trace: worked out when asked for, not kept
        (processing_steps, Part II, trace steps)."""
        usual_time = self.processing_time if self.usual_time is None else self.usual_time
        return processing_steps(self.http_status, self.processing_time, usual_time,
                                self.failure_reason)

    @property
    def refunded(self):
        return sum((refund.amount for refund in self.refunds), Decimal(0))


class PaymentStore:
    """The most recent payments by id, up to a fixed count: memory stays flat however long.
    It counts the refunds of the payments it keeps, which Part II's RefundingStore bounds."""

    def __init__(self, capacity):
        self.capacity = capacity
        self._payments = OrderedDict()
        self._refunds = 0  # of the payments kept
        self._lock = threading.Lock()

    def get(self, payment_id):
        with self._lock:
            return self._payments.get(payment_id)

    def recent(self, limit, matches=lambda payment: True, start_after=None):
        """Up to `limit` payments, newest first, that `matches` accepts; with `start_after` (a
        payment id), only older ones, or None when that payment is no longer kept."""
        with self._lock:
            payments = list(self._payments.values())  # filtered outside the lock
        newest_first = reversed(payments)
        if start_after is not None:  # any() stops at the id: the iterator goes on after it
            if not any(payment.payment_id == start_after for payment in newest_first):
                return None
        matching = (payment for payment in newest_first if matches(payment))
        return [payment for payment, _ in zip(matching, range(limit))]

    def add(self, payment):
        with self._lock:
            replaced = self._payments.pop(payment.payment_id, None)  # an id drawn twice
            self._refunds -= len(replaced.refunds) if replaced else 0
            self._payments[payment.payment_id] = payment
            if len(self._payments) > self.capacity:
                self._forget_oldest()

    def _forget_oldest(self):
        _, oldest = self._payments.popitem(last=False)
        self._refunds -= len(oldest.refunds)

# ---------------------------------------------------------------- 4. processing


@dataclass(frozen=True)
class Effects:
    """How the running incident scenarios change processing, combined (see the simulator)."""
    failure_rate: float = None  # None: the configured PAYMENT_FAILURE_RATE
    decline_rate: float = None  # None: the configured PAYMENT_DECLINE_RATE
    latency_factor: float = 1.0
    outage: bool = False
    rate_factor: float = 1.0
    fails_last_currency: bool = False


NO_EFFECTS = Effects()
MEDIAN_PROCESSING_SECONDS = {"standard": 0.12, "express": 0.06, "recurring": 0.20}
LATENCY_SIGMA = 0.55  # log-normal spread: p95 about 0.33 s, p99 about 0.5 s across the type mix
SLOW_BANK_SHARE = 0.01  # 1 % of payments meet a slow bank
SLOW_BANK_FACTOR = 4.0  # and take 4 times as long


class PaymentProcessor:
    """Turns a valid PaymentRequest into a Payment: one path for API and simulated payments."""

    def __init__(self, settings, metrics, stats, store, exporter, clock, tracer):
        self.settings = settings
        self.metrics = metrics
        self.stats = stats
        self.store = store
        self.exporter = exporter
        self._clock = clock
        self.tracer = tracer
        self.payment_log = PaymentLog(settings.log_format)  # section 6

    def pay(self, request, rng, effects, fault, trace, wait):
        """An API payment from start to end: begin, wait its processing time, finish. `wait`
        is the app's abort_waits.wait: it sleeps, unless a stop that runs out of time ends it."""
        payment = self.begin(request, rng, "api", effects, fault, trace)
        wait(payment.processing_time)
        return self.finish(payment)

    def begin(self, request, rng, source, effects=NO_EFFECTS, fault=Fault(), trace=None):
        """Decide the outcome and processing time; the caller waits that long, then calls
        finish(). `trace` is the client's TraceContext, else the payment starts a trace."""
        status, processing_time, usual_time = draw_outcome(rng, request, self.settings,
                                                           effects, fault)
        decline_code = None
        if status == 402:
            decline_code = request.decline_code
            if decline_code is None:
                decline_code = rng.choices(DECLINE_CODES, DECLINE_WEIGHTS.values())[0]
        reason = None
        if status == 500:
            reason = failure_reason(request, effects, fault, self.settings.currencies)
        elif status == 503:
            reason = OUTAGE_REASON
        self.stats.record_start()
        trace = self.tracer.sample(trace or trace_context(()), source)  # recorded or not
        payment_id = f"pay_{trace.span_id}"  # the id of the payment's own span, drawn for it
        return Payment(payment_id, request, source, processing_time, status,
                       decline_code=decline_code, trace=trace, usual_time=usual_time,
                       failure_reason=reason)

    def finish(self, payment, log_later=None):
        """Count, keep, export, log and trace a completed payment: every payment comes here.
        With a list `log_later`, its log line waits there for PaymentLog.write_lines."""
        payment.completed_at = self._clock()
        self.store.add(payment)
        self.tracer.record(payment)
        self.metrics.record_payment(payment)
        self.stats.record(payment)
        if self.exporter.enabled:  # no line is built for an export that is off
            self.exporter.export(payment_line(payment, self.settings.instance))
        if self.settings.log_payments:
            self.payment_log.write(payment, log_later)
        return payment

    def reject(self, error, document):
        """Count a refused request under the labels it named, if they are known ones."""
        payment_type, currency = label_values(document, self.settings.currencies)
        self.metrics.record_rejection(error.status, payment_type, currency)
        self.stats.record_rejection()


def draw_outcome(rng, request, settings, effects, fault=Fault()):
    """(HTTP status, processing seconds, usual seconds) of one payment: a log-normal time, and
    failures as configured and by scenario. The usual seconds leave out a slow bank and a
    scenario's slowdown: the bank step takes those."""
    median = MEDIAN_PROCESSING_SECONDS[request.type]
    usual_time = rng.lognormvariate(math.log(median), LATENCY_SIGMA) * settings.latency_scale
    slow_bank = SLOW_BANK_FACTOR if rng.random() < SLOW_BANK_SHARE else 1.0
    processing_time = usual_time * slow_bank * effects.latency_factor
    failure_rate = effects.failure_rate
    if failure_rate is None:
        failure_rate = settings.failure_rate
    fails = (rng.random() < failure_rate or fault.fail
             or (effects.fails_last_currency and request.currency == settings.currencies[-1]))
    decline_rate = effects.decline_rate
    if decline_rate is None:
        decline_rate = settings.decline_rate
    declined = request.decline_code is not None
    declined = declined or (request.method == "card" and rng.random() < decline_rate)
    # an outage refuses the payment at once: no processing time, so it counts at 0 s in
    # payment_duration_seconds (as failed) and as "503" in payment_requests_total
    if effects.outage:
        return 503, 0.0, 0.0
    if fault.latency is not None:
        processing_time = usual_time = fault.latency
    status = 500 if fails else 402 if declined else 200
    processing_time = min(processing_time, MAX_PROCESSING_SECONDS)
    # nothing slowed it: usual_time is the very same float, so the Payment keeps one
    return status, processing_time, min(processing_time, usual_time)


class DisabledTracer:
    """Stands in for trace export (tracing.py, an optional extra) when it is off."""

    def __init__(self, reason, asked_for=False):
        self.reason = reason
        self.asked_for = asked_for  # an OTLP endpoint is set, but traces cannot be sent

    def sample(self, trace, source):
        return trace

    def record(self, payment):
        pass

    def health(self):
        return {"state": "disabled", "reason": self.reason}

    def close(self, timeout):
        pass


def failure_reason(request, effects, fault, currencies):
    """Why a payment failed, in the words its trace and log line give."""
    if fault.fail:
        return "the client asked for a failure (X-Simulate-Failure)"
    if effects.fails_last_currency and request.currency == currencies[-1]:
        return f"no acquirer processes {request.currency} (currency_outage scenario)"
    if effects.failure_rate is not None:
        return "bank gateway error (error_spike scenario)"
    return "bank gateway error"


# ---------------------------------------------------------------- 5. metrics


AMOUNT_BUCKETS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)
DURATION_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2.5,
                    5, 10)
TOTALS_KEY = {"completed": "succeeded"}  # the /stats total a payment status counts in


class PaymentStats:
    """Totals since start, today's revenue (UTC day) and the recent failure rate, for /stats and
    the gauges; the last minutes second by second for the console (Part II reads them)."""
    WINDOW_SECONDS = 60  # of payment_failure_rate and the activity's p95
    ACTIVITY_SECONDS = 300  # kept second by second for /api/activity
    RECENT_TIMES = 10_000  # processing times kept for the p95 of the last minute

    def __init__(self, currencies, clock):
        self.currencies = currencies
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at = clock()
        self._counts = {"succeeded": 0, "declined": 0, "failed": 0, "rejected": 0}
        self._revenue_total = dict.fromkeys(currencies, Decimal(0))
        self._refunded_total = dict.fromkeys(currencies, Decimal(0))
        self._day = None
        self._next_day_at = -math.inf  # when today's revenue starts again from 0
        self._daily_revenue = {}
        # second -> [completed, failed, declined], for the last ACTIVITY_SECONDS
        self._recent = {}
        # completion times and processing times in two deques (cheaper than a tuple each)
        self._recent_ends = deque(maxlen=self.RECENT_TIMES)
        self._recent_times = deque(maxlen=self.RECENT_TIMES)
        self.active = 0

    def record_start(self):
        with self._lock:
            self.active += 1

    def record(self, payment):
        request = payment.request
        with self._lock:
            self.active -= 1
            self._counts[TOTALS_KEY.get(payment.status, payment.status)] += 1
            if payment.succeeded:
                self._roll_day(payment.completed_at)
                self._daily_revenue[request.currency] += request.amount
                self._revenue_total[request.currency] += request.amount
            second = int(payment.completed_at)
            counts = self._recent.get(second)
            if counts is None:
                self._forget_before(second - self.ACTIVITY_SECONDS)
                counts = self._recent[second] = [0, 0, 0]
            counts[0] += 1
            counts[1] += payment.status == "failed"
            counts[2] += payment.status == "declined"
            self._recent_ends.append(payment.completed_at)
            self._recent_times.append(payment.processing_time)

    def _roll_day(self, now):
        """Start a new day's revenue at 00:00 UTC; never back: 23:59:59's late payment stays."""
        if now < self._next_day_at:
            return
        self._day = datetime.fromtimestamp(now, timezone.utc).date()
        self._next_day_at = (now // 86400 + 1) * 86400  # the next midnight, UTC
        self._daily_revenue = dict.fromkeys(self.currencies, Decimal(0))

    def _forget_before(self, oldest_second):
        for second in [second for second in self._recent if second <= oldest_second]:
            del self._recent[second]

    def record_rejection(self):
        with self._lock:
            self._counts["rejected"] += 1

    def record_refund(self, refund):
        with self._lock:
            self._refunded_total[refund.currency] += refund.amount

    def daily_revenue(self):
        with self._lock:
            self._roll_day(self._clock())
            return {currency: float(amount) for currency, amount in self._daily_revenue.items()}

    def recent_failure_rate(self):
        """Percentage of the payments completed in the last WINDOW_SECONDS that failed (0 when
        there were none). A decline is the bank's answer, not a failure: it does not count."""
        with self._lock:
            since = int(self._clock()) - self.WINDOW_SECONDS
            last_minute = [counts for second, counts in self._recent.items() if second > since]
            completed = sum(counts[0] for counts in last_minute)
            failed = sum(counts[1] for counts in last_minute)
            return 100.0 * failed / completed if completed else 0.0


class CallbackGauge(Collector):
    """A labelled gauge whose values are read from the application at scrape time."""

    def __init__(self, name, documentation, labelnames, read):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.read = read

    def describe(self):
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.read():
            family.add_metric(labels, value)
        return [family]


class PaymentMetrics:
    """Owns a CollectorRegistry and every metric, named and labelled as the course's contract."""

    def __init__(self, currencies, stats, scenarios):
        self.registry = registry = CollectorRegistry()
        self._series = {}  # (HTTP status, type, currency) -> a payment's three series
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        self.requests = Counter(
            "payment_requests_total", "Payment requests by HTTP method, status code, payment "
            "type and currency ('invalid' for values a client invented)",
            ["method", "status", "type", "currency"], registry=registry)
        self.amount = Histogram(
            "payment_amount", "Payment amounts by currency and outcome (status: success, "
            "declined or failed)", ["currency", "status"], buckets=AMOUNT_BUCKETS,
            registry=registry)
        self.duration = Histogram(
            "payment_duration_seconds", "Payment processing time by outcome (status: success, "
            "declined or failed)", ["status"], buckets=DURATION_BUCKETS, registry=registry)
        self.add_refund_metrics()
        self.add_gauges(stats, scenarios)
        self.add_health_metrics()
        self.create_series(currencies)

    def record_payment(self, payment):
        """Count a payment; the trace id of a recorded (sampled) trace rides along as an
        exemplar, shown in the OpenMetrics exposition."""
        request = payment.request
        exemplar = None
        if payment.trace and payment.trace.sampled:
            exemplar = {"trace_id": payment.trace.trace_id}
        requests, amount, duration = self.payment_series(payment)
        requests.inc(exemplar=exemplar)
        amount.observe(float(request.amount))
        duration.observe(payment.processing_time, exemplar)

    def payment_series(self, payment):
        """The three series a payment counts in, looked up once for each kind of payment."""
        request = payment.request
        key = (payment.http_status, request.type, request.currency)
        series = self._series.get(key)
        if series is None:  # a bounded set: every label value is a validated one
            # a simulated payment counts as a POST too: the course's queries see every payment
            series = (self.requests.labels("POST", str(payment.http_status), request.type,
                                           request.currency),
                      self.amount.labels(request.currency, payment.outcome),
                      self.duration.labels(payment.outcome))
            self._series[key] = series
        return series

    def add_gauges(self, stats, scenarios):
        """Gauges read from the app when Prometheus scrapes."""
        registry = self.registry
        active = Gauge("active_payments", "Payments being processed right now",
                       registry=registry)
        active.set_function(lambda: stats.active)
        failure_rate = Gauge("payment_failure_rate", "Percentage (0-100) of payments completed "
                             f"in the last {PaymentStats.WINDOW_SECONDS} s that failed",
                             registry=registry)
        failure_rate.set_function(stats.recent_failure_rate)
        self.simulation_rate = Gauge("payment_simulation_rate", "Payments per second the "
                                     "simulator aims at now (0 when it is off)", registry=registry)
        registry.register(CallbackGauge(
            "payment_daily_revenue", "Revenue of successful payments today (UTC; resets at "
            "00:00 UTC)", ["currency"],
            lambda: [((currency,), amount) for currency, amount in stats.daily_revenue().items()]))
        registry.register(CallbackGauge(
            "payment_scenario_active", "1 while an incident scenario is running", ["scenario"],
            lambda: [((name,), float(on)) for name, on in scenarios.active_flags().items()]))

    def add_refund_metrics(self):
        """Refunds, and requests a client repeated."""
        registry = self.registry
        self.refunds = Counter("payment_refunds_total", "Refunds of completed payments, by "
                               "currency", ["currency"], registry=registry)
        self.refund_amount = Histogram("payment_refund_amount", "Refunded amounts by currency",
                                       ["currency"], buckets=AMOUNT_BUCKETS, registry=registry)
        self.idempotency = Counter("payment_idempotent_requests_total", "Requests repeating an "
                                   "Idempotency-Key, by result (replayed, in_progress, mismatch)",
                                   ["result"], registry=registry)

    def add_health_metrics(self):
        """What the service says about its own health: InfluxDB points, shed connections."""
        registry = self.registry
        self.influx_written = Counter("payment_influx_points_written_total",
                                      "Points InfluxDB accepted", registry=registry)
        self.influx_dropped = Counter("payment_influx_points_dropped_total",
                                      "Points given up, by reason", ["reason"], registry=registry)
        self.connections_shed = Counter("payment_http_connections_shed_total", "Connections "
                                        "beyond MAX_CONNECTIONS answered 503 without being served",
                                        registry=registry)
        self.influx_pending = Gauge("payment_influx_points_pending",
                                    "Points waiting to be written to InfluxDB", registry=registry)

    def create_series(self, currencies):
        """The series of requests, durations, refunds and repeated keys exist from the first
        scrape, so rate() works at once."""
        for payment_type in PAYMENT_TYPES:
            for currency in currencies:
                for status in OUTCOME_STATUSES:
                    self.requests.labels("POST", status, payment_type, currency)
        for outcome in ("success", "declined", "failed"):
            self.duration.labels(outcome)
        for currency in currencies:
            self.refunds.labels(currency)
        for result in ("replayed", "in_progress", "mismatch"):
            self.idempotency.labels(result)

    def record_refund(self, refund):
        self.refunds.labels(refund.currency).inc()
        self.refund_amount.labels(refund.currency).observe(float(refund.amount))

    def record_rejection(self, status, payment_type, currency):
        self.requests.labels("POST", str(status), payment_type, currency).inc()


# ---------------------------------------------------------------- 6. exports: InfluxDB, log


POOL_CUSTOMER = re.compile(r"cust_[0-9]{5}")  # ids InfluxDB may tag; any other is "other"


def payment_line(payment, instance):
    """One payment as an InfluxDB line-protocol point: what the live export and the history
    both write. Every tag value comes from a bounded set, so nothing needs escaping."""
    request = payment.request
    return (f"payment,currency={request.currency},customer_id={customer_tag(request)},"
            f"instance={instance},payment_type={request.type},status={payment.outcome} "
            f"amount={float(request.amount)!r},"
            f"processing_time={float(payment.processing_time)!r} "
            f"{int(payment.completed_at * 1e9)}")


def customer_tag(request):
    """The customer_id tag: pool-shaped ids as they are, any other 'other' (bounded series)."""
    return request.customer_id if POOL_CUSTOMER.fullmatch(request.customer_id) else "other"


class InfluxWriter:
    """Writes one point per payment through influxdb-client's batching WriteApi: export() only
    queues the line, so a payment never waits for InfluxDB. When InfluxDB is down, a batch is
    retried with backoff (8 times over about 30 s), then given up and counted as dropped; past
    INFLUXDB_BUFFER_SIZE points waiting, new ones are dropped and counted at once. The service
    runs Part II's InfluxExporter: this, with InfluxDB's state (logged once a change, shown in
    /health) and a stop that never waits long."""
    enabled = True
    RETRIES = {"retry_interval": 1_000, "exponential_base": 2, "max_retry_delay": 5_000,
               "max_retries": 8, "max_retry_time": 120_000}  # ms: about 30 s, 2 minutes at most

    def __init__(self, settings, metrics):
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import WriteOptions
        from reactivex.scheduler import EventLoopScheduler
        self.settings = settings
        self.metrics = metrics
        self._precision = WritePrecision.NS
        self._pending = 0  # points queued and not yet written or given up
        self._closed = False
        self._lock = threading.Lock()
        self._client = InfluxDBClient(url=settings.influxdb_url, token=settings.influxdb_token,
                                      org=settings.influxdb_org, timeout=5_000)
        # writes run one at a time on a daemon thread (a hung InfluxDB cannot hold the exit)
        self._scheduler = EventLoopScheduler(exit_if_empty=True)
        self._options = WriteOptions(batch_size=settings.influxdb_batch_size,
                                     flush_interval=settings.influxdb_flush_interval_ms,
                                     write_scheduler=self._scheduler, **self.RETRIES)
        self._write_api = self._client.write_api(
            write_options=self._options, success_callback=self._written,
            error_callback=self._failed, retry_callback=self._retrying)
        metrics.influx_pending.set_function(lambda: self._pending)

    def export(self, line):
        """Queue one point; past INFLUXDB_BUFFER_SIZE waiting points, drop it and count it."""
        with self._lock:
            if self._pending >= self.settings.influxdb_buffer_size:
                self.metrics.influx_dropped.labels("buffer_full").inc()
                return
            self._pending += 1
            self._write_api.write(bucket=self.settings.influxdb_bucket, record=line,
                                  write_precision=self._precision)

    def _written(self, _conf, data):
        self._settle(data, "written")

    def _failed(self, _conf, data, error):
        """A batch given up: after its retries, or refused outright (a 4xx)."""
        self._settle(data, "write_error")

    def _retrying(self, _conf, _data, error):
        pass  # the exporter (Part II) says when InfluxDB is down

    def _settle(self, data, outcome):
        """Count the points of a batch that was written or given up."""
        points = data.count(b"\n" if isinstance(data, bytes) else "\n") + 1
        with self._lock:
            if self._closed:  # a late answer after close() (Part II) was counted as dropped
                return
            self._pending -= points
        if outcome == "written":
            self.metrics.influx_written.inc(points)
        else:
            self.metrics.influx_dropped.labels(outcome).inc(points)


def log_fields(payment):
    """The fields of a payment's `payment` log line: what Loki filters on, and the ids that
    lead to its trace."""
    request = payment.request
    fields = {"trace_id": payment.trace.trace_id, "span_id": payment.trace.span_id,
              "payment_id": payment.payment_id, "status": payment.status,
              "http_status": payment.http_status, "amount": float(request.amount),
              "currency": request.currency, "type": request.type, "method": request.method,
              "customer_id": request.customer_id, "source": payment.source,
              "processing_seconds": round(payment.processing_time, 4)}
    if payment.decline_code:
        fields["decline_code"] = payment.decline_code
    if payment.failure_reason:
        fields["reason"] = payment.failure_reason
    return fields


class PaymentLog:
    """Writes the `payment` event of every payment to stdout, where every event goes: the
    fields of log_fields(payment). It is the service's busiest line, so a JSON one (the default
    LOG_FORMAT) is rendered at once by json_log_line (Part II), without a LogRecord or a dict."""

    def __init__(self, style):
        self.style = style

    def write(self, payment, later=None):
        """Write the payment's line now, or add it to the list `later` for write_lines()."""
        if self.style != "json":
            log.info("payment", extra={"fields": log_fields(payment)})
        elif later is not None:
            later.append(payment)
        else:
            self.write_lines([payment])

    def write_lines(self, payments):
        """The JSON lines of `payments` in one write: the simulator finishes several at once."""
        if not payments or not log.isEnabledFor(logging.INFO):
            return
        now = time.time()
        text = "".join([json_log_line(payment, now) for payment in payments])
        try:  # whole lines in one write, as logging's handler writes: lines never mix
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):  # stdout closed: the payments go on without it
            pass


class DisabledExporter:
    """Stands in for InfluxDB export when it is off: same interface, does nothing."""
    enabled = False

    def __init__(self, reason):
        self.reason = reason

    def start(self):
        pass

    def export(self, line):
        pass

    def health(self):
        return {"state": "disabled", "reason": self.reason}

    def close(self, timeout):
        pass


# ---------------------------------------------------------------- 7. HTTP


def payment_answer(payment):
    """(status, JSON body, headers) of the answer to POST /api/payments. Its traceparent header
    names the payment's span: the client's trace goes on from there."""
    trace = payment.trace
    flags = "01" if trace.sampled else "00"
    headers = {"traceparent": f"00-{trace.trace_id}-{trace.span_id}-{flags}"}
    return payment.http_status, payment_json(payment), headers


def payment_json(payment):
    """A payment as the API shows it."""
    request = payment.request
    body = {"success": payment.succeeded, "paymentId": payment.payment_id,
            "status": payment.status, "amount": float(request.amount),
            "currency": request.currency, "type": request.type,
            "customerId": request.customer_id, "paymentMethod": request.method,
            "timestamp": iso_utc(payment.completed_at),
            "processingTime": round(payment.processing_time, 4), "source": payment.source}
    if payment.trace:
        body["traceId"] = payment.trace.trace_id
    if request.card_last4:
        body["cardLast4"] = request.card_last4
    if payment.succeeded:
        refunds = list(payment.refunds)  # one snapshot, while a refund may be added meanwhile
        body["refundedAmount"] = float(sum((refund.amount for refund in refunds), Decimal(0)))
        body["refunds"] = [refund_json(refund) for refund in refunds]  # Part II, refunds
    elif payment.http_status == 402:
        body["error"] = "Payment declined by the bank"
        body["declineCode"] = payment.decline_code
    elif payment.http_status == 500:
        body["error"] = "Payment processing failed"
    else:
        body["error"] = "Payment service unavailable"
    return body


def iso_utc(epoch_seconds):
    """2026-11-26T12:00:00.118Z: what datetime's isoformat gives in milliseconds, in a fraction
    of the time (every log line and every answer has one)."""
    fraction, whole = math.modf(epoch_seconds)
    milliseconds = round(fraction * 1_000_000) // 1000  # to microseconds first, as datetime
    if milliseconds == 1000:
        whole += 1
        milliseconds = 0
    return f"{utc_second(whole)}.{milliseconds:03d}Z"


@functools.lru_cache(maxsize=4)
def utc_second(whole_seconds):
    """2026-11-26T12:00:00, worked out once a second, not once a line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole_seconds))


def routes_by_plain_path(routes):
    """{path: [(route, match)]} for the routes without path parameters, so most requests are
    found without trying every pattern; /api/scenarios/history is never taken for a name."""
    by_path = {}
    for route in routes:
        if "(" not in route[1].pattern:
            path = route[1].pattern.removesuffix(r"\Z").replace("\\.", ".")
            by_path.setdefault(path, []).append((route, route[1].match(path)))
    return by_path


IDLE_TIMEOUT_SECONDS = 15  # an idle keep-alive connection is closed after this


class PaymentHandler(BaseHTTPRequestHandler):
    """One HTTP connection: every method goes through dispatch(), which looks up ROUTES."""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # even a garbled request line gets a status line
    server_version = f"payment-api/{VERSION}"
    disable_nagle_algorithm = True  # headers and body leave together, not meeting delayed ACKs
    wbufsize = -1  # headers and body buffered and sent together (one send up to 8 KiB)
    timeout = IDLE_TIMEOUT_SECONDS  # idle keep-alive connections are closed after this
    body_unread = False  # a request body we did not read: the connection closes after the answer

    # method, path, handler method, whether it needs ADMIN_TOKEN; (II): written in Part II
    ROUTES = [(method, re.compile(path + r"\Z"), handler, needs_admin)
              for method, path, handler, needs_admin in (
                  ("GET", r"/", "console", False),  # (II)
                  ("GET", r"/openapi\.json", "openapi_document", False),  # (II)
                  ("GET", r"/health", "health", False),
                  ("GET", r"/metrics", "metrics", False),
                  ("POST", r"/api/payments", "create_payment", False),
                  ("GET", r"/api/payments", "list_payments", False),  # (II)
                  ("GET", r"/api/payments/stats", "payment_stats", False),
                  ("GET", r"/api/activity", "activity", False),  # (II)
                  ("GET", r"/api/payments/(?P<payment_id>[^/]+)", "get_payment", False),
                  # (II), the refunds section:
                  ("POST", r"/api/payments/(?P<payment_id>[^/]+)/refunds", "create_refund", False),
                  ("GET", r"/api/simulation", "get_simulation", False),  # (II)
                  ("PUT", r"/api/simulation", "put_simulation", True),  # (II)
                  ("GET", r"/api/scenarios", "list_scenarios", False),  # (II)
                  ("GET", r"/api/scenarios/history", "scenario_history", False),  # (II)
                  ("POST", r"/api/scenarios/(?P<name>[^/]+)", "start_scenario", True),  # (II)
                  ("DELETE", r"/api/scenarios/(?P<name>[^/]+)", "stop_scenario", True),  # (II)
                  ("GET", r"/api/checks", "checks", False),  # (II)
                  ("GET", r"/api/checks/incidents", "answer_key", False),  # (II)
                  ("POST", r"/api/checks/alerts", "check_alerts", False),  # (II)
                  ("POST", r"/api/checks/dashboard", "check_dashboard", False))]  # (II)
    ROUTES_BY_PATH = routes_by_plain_path(ROUTES)

    # -- the simple endpoints: one answer each

    def get_payment(self, payment_id):
        payment = self.server.app.store.get(payment_id)
        if payment is None:
            raise NotFound("payment not found", paymentId=payment_id[:ECHO_LIMIT])
        self.send_json(200, payment_json(payment))

    def payment_stats(self):
        """The figures of /api/payments/stats (ActivityStats.snapshot, Part II)."""
        self.send_json(200, self.server.app.stats.snapshot())

    def health(self):
        app = self.server.app
        dependencies = {"influxdb": app.exporter.health(), "tracing": app.tracer.health()}
        self.send_json(503 if app.stopping else 200, {
            "status": "DOWN" if app.stopping else "UP", "service": "payment-api",
            "version": VERSION, "timestamp": iso_utc(time.time()),
            "uptimeSeconds": round(time.monotonic() - app.started_at, 3),
            "dependencies": dependencies, "simulation": dict(app.simulator.config)})

    def metrics(self):
        """The Prometheus exposition, in the format and encoding the scraper asks for."""
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        body = encoder(self.server.app.metrics.registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self.send_body(200, body, headers)

    # -- writing answers

    def send_json(self, status, document, headers=None):
        headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_body(status, json.dumps(document).encode(), headers)

    def send_client_error(self, error):
        if error.closes_connection:
            self.close_connection = True
        self.send_json(error.status, error.body, error.headers)

    def send_body(self, status, body, headers):
        self.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.server.app.stopping or self.body_unread:
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()  # the answer leaves before the request counts as done
        except OSError:  # the client hung up or reads too slowly: what it asked for is done
            self.close_connection = True

    def date_time_string(self, timestamp=None):
        """The Date header of every answer, formatted once a second, not once an answer."""
        if timestamp is None:
            return self.http_date(int(time.time()))
        return super().date_time_string(timestamp)

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def http_date(whole_seconds):
        """Sat, 05 Dec 2026 21:00:00 GMT: an HTTP Date header."""
        return email.utils.formatdate(whole_seconds, usegmt=True)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (a bad request line, headers too long) are JSON."""
        self.close_connection = True
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def log_access(self, path, started):
        """The access log: one `request` event a request; /health and /metrics at debug."""
        level = logging.DEBUG if path in ("/health", "/metrics") else logging.INFO
        if not log.isEnabledFor(level):
            return
        fields = {"method": self.command, "path": path[:ECHO_LIMIT], "status": self.status,
                  "durationMs": round((time.monotonic() - started) * 1000, 2),
                  "client": self.client_address[0]}
        if self.trace:  # a payment's request line leads to its trace, as its payment line does
            fields["trace_id"] = self.trace.trace_id
        log.log(level, "request", extra={"fields": fields})

    def log_request(self, code="-", size="-"):
        pass  # dispatch() writes the access log

    def log_message(self, format, *args):
        pass  # dispatch() writes the access log

    # -- routing

    def dispatch(self):
        """Find the route and run it; a client's mistake is a JSON 4xx, ours a JSON 500."""
        started = time.monotonic()
        self.status = None
        self.trace = None
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True) if url.query else {}
        self.body_unread = ("Transfer-Encoding" in self.headers
                            or self.headers.get("Content-Length", "0") != "0")
        try:
            method = "GET" if self.command == "HEAD" else self.command
            handler, params = self.find_route(method, url.path)
            handler(**params)
        except ClientError as error:
            self.send_client_error(error)
        except Exception:
            fields = {"method": self.command, "path": url.path[:ECHO_LIMIT]}
            log.exception("unexpected error", extra={"fields": fields})
            self.send_json(500, {"error": "internal server error"})
        self.log_access(url.path, started)

    # every method HTTP defines gets a JSON 404 or a 405 with Allow; an unknown one gets a 501
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = dispatch
    do_OPTIONS = do_TRACE = do_CONNECT = do_QUERY = dispatch

    def find_route(self, method, path):
        """The handler method and its path parameters; 404 for an unknown path, 405 (with
        Allow) for a known path and another method."""
        matches = self.ROUTES_BY_PATH.get(path)
        if not matches:
            matches = [(route, match) for route in self.ROUTES if (match := route[1].match(path))]
        allowed = []
        for (route_method, _, name, needs_admin), match in matches:
            if route_method == method:
                if needs_admin:  # a trainer's change (ControlEndpoints, Part II)
                    self.check_admin_token()
                return getattr(self, name), match.groupdict()
            if route_method not in allowed:
                allowed.append(route_method)
        if not allowed:
            raise NotFound(f"no such path: {path[:ECHO_LIMIT]}")
        allowed += ["HEAD"] * ("GET" in allowed)
        error = MethodNotAllowed(f"{self.command[:ECHO_LIMIT]} is not allowed on "
                                 f"{path[:ECHO_LIMIT]}", allowed=allowed)
        error.headers["Allow"] = ", ".join(allowed)
        raise error

    # -- the payment endpoint (a refund's is in Part II, refunds)

    def create_payment(self):
        """POST /api/payments: validate, process (taking its processing time), answer."""
        app = self.server.app
        key = self.idempotency_key()
        effects = app.scenarios.effects()  # the incidents running as the payment arrives
        document = None
        try:
            document = self.read_json()
            request = validate_payment(document, app.settings.currencies, app.rng)
            fault = read_fault(self.headers)
        except ClientError as error:
            app.processor.reject(error, document)
            raise
        trace = trace_context(self.headers.get_all("traceparent", []))
        self.trace = trace  # the access line names it, even if paying fails
        pay = functools.partial(app.processor.pay, request, app.rng, effects, fault, trace,
                                app.abort_waits.wait)
        if key is not None:  # a retry gets the first answer, not a second payment (Part II)
            return app.idempotency.answer_once(self, key, request, pay, payment_answer)
        payment = pay()
        self.trace = payment.trace  # sampled or not, as the tracer decided
        self.send_json(*payment_answer(payment))

    def idempotency_key(self):
        """Every Idempotency-Key header, joined (answer_once refuses two); an empty one is as if
        none were sent: None."""
        return ",".join(self.headers.get_all("Idempotency-Key", [])) or None

    # -- reading a body

    def read_json(self, required=True):
        """The request's JSON body (None when optional and absent); 400, 408, 411, 413 or 415
        when unusable."""
        body = self.read_body(required, MAX_BODY_BYTES)
        if not body and not required:
            return None
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        return parse_json(body)

    def read_body(self, required, most_bytes):
        """The request's body as bytes (None when optional and absent); 400, 408, 411 or 413
        when unusable. Part II made sure at most one Content-Length came."""
        length = self.headers.get("Content-Length")
        if "Transfer-Encoding" in self.headers or (length is None and required):
            raise LengthRequired("a Content-Length header is required")
        if length is None:
            return None
        if not WHOLE_NUMBER.fullmatch(length):
            raise MalformedBody("Content-Length must be a whole number")
        if int(length) > most_bytes:
            raise PayloadTooLarge(f"body is larger than {most_bytes} bytes")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:  # the body's deadline (Part II) passed
            raise RequestTimeout("the body did not arrive in time") from None
        if len(body) < int(length):
            raise MalformedBody("the connection closed before the whole body arrived")
        self.body_unread = False
        return body

    def read_object(self, required=True):
        """The body as a JSON object; {} when optional and absent (or null); else 400."""
        document = self.read_json(required)
        if document is None and not required:
            return {}
        if not isinstance(document, dict):
            raise MalformedBody("body must be a JSON object")
        return document


class PaymentServer(ThreadingHTTPServer):
    """A thread per connection; `app` is how handlers reach the service."""
    daemon_threads = False  # server_close() joins every connection thread
    request_queue_size = 1024  # the default of 5 resets connections under a burst of clients

    def __init__(self, address, app, handler_class=PaymentHandler):
        self.app = app
        super().__init__(address, handler_class)

# ---------------------------------------------------------------- 8. scenarios and the simulator


SCENARIOS = {
    "error_spike": ("25 % of payments fail with HTTP 500", Effects(failure_rate=0.25)),
    "latency_degradation": ("processing takes 4 times as long: p95 about 1.3 s",
                            Effects(latency_factor=4.0)),
    "outage": ("every payment is answered 503, simulated ones too", Effects(outage=True)),
    "traffic_surge": ("the simulator sends 5 times its rate", Effects(rate_factor=5.0)),
    "currency_outage": ("every payment in the last configured currency (GBP by default) fails "
                        "with HTTP 500", Effects(fails_last_currency=True)),
    "decline_wave": ("a card network problem: 30 % of card payments are declined (402), "
                     "errors stay normal", Effects(decline_rate=0.30)),
}


class ScenarioBoard:
    """Which incident scenarios run now, started by the API or the schedule, with a history.

    Expiry and the schedule are applied whenever the board is read (every payment and scrape
    reads it), at the exact time they were due, so no extra thread is needed.
    """

    def __init__(self, settings, clock):
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._running = {}  # name -> {"startedAt", "endsAt", "startedBy"}
        self._history = deque(maxlen=200)
        self._rng = random.Random(settings.simulation_seed)
        started = clock()
        self._schedule = [[started + entry.start, entry] for entry in settings.scenario_schedule]

    def effects(self):
        """The combined Effects of every running scenario."""
        with self._lock:
            self._refresh(self._clock())
            running = [SCENARIOS[name][1] for name in self._running]
        if not running:
            return NO_EFFECTS
        failure_rates = [one.failure_rate for one in running if one.failure_rate is not None]
        decline_rates = [one.decline_rate for one in running if one.decline_rate is not None]
        return Effects(failure_rate=max(failure_rates, default=None),
                       decline_rate=max(decline_rates, default=None),
                       latency_factor=math.prod(one.latency_factor for one in running),
                       outage=any(one.outage for one in running),
                       rate_factor=math.prod(one.rate_factor for one in running),
                       fails_last_currency=any(one.fails_last_currency for one in running))

    def _refresh(self, now):
        """End the scenarios whose time is up and start those the schedule has due."""
        for name, run in list(self._running.items()):
            if run["endsAt"] is not None and run["endsAt"] <= now:
                by = "schedule" if run["startedBy"] == "schedule" else "duration"
                self._stop(name, run["endsAt"], by)
        for due in self._schedule:
            while due[0] is not None and due[0] <= now:
                start, entry = due
                name = entry.scenario
                if name == "random":
                    name = self._rng.choice(sorted(SCENARIOS))
                if start + entry.duration > now:
                    self._start(name, start, entry.duration, "schedule")
                due[0] = start + entry.every if entry.every else None

    def _start(self, name, now, duration, by):
        if name in self._running:
            self._stop(name, now, by)
        ends_at = now + duration if duration else None
        self._running[name] = {"startedAt": now, "endsAt": ends_at, "startedBy": by}
        self._history.append({"scenario": name, "startedAt": iso_utc(now), "startedBy": by,
                              "stoppedAt": None, "stoppedBy": None})
        fields = {"scenario": name, "by": by, "duration": duration}
        log.warning("scenario started", extra={"fields": fields})

    def _stop(self, name, now, by):
        del self._running[name]
        for entry in reversed(self._history):
            if entry["scenario"] == name and entry["stoppedAt"] is None:
                entry.update(stoppedAt=iso_utc(now), stoppedBy=by)
                break
        log.warning("scenario stopped", extra={"fields": {"scenario": name, "by": by}})

    def active_flags(self):
        with self._lock:
            self._refresh(self._clock())
            return {name: name in self._running for name in SCENARIOS}


# the mix of simulated payments; draw_request picks with them, added up once in TYPE_CHOICE,
# METHOD_CHOICE, AMOUNT_BAND_CHOICE and currency_choice() (Part II, fast draws)
CURRENCY_WEIGHTS = {"EUR": 50, "USD": 30, "GBP": 20}  # other configured currencies weigh 10
TYPE_WEIGHTS = (70, 20, 10)  # standard, express, recurring
METHOD_WEIGHTS = (75, 15, 10)  # card, bank_transfer, wallet
# share, lowest and highest amount; amounts are log-uniform within a band
AMOUNT_BANDS = ((0.75, 10, 200), (0.20, 200, 1000), (0.05, 1000, 6000))
RETURNING_CUSTOMERS = 100  # the first 10 % of the customers
RETURNING_SHARE = 0.6  # make 60 % of the payments
BURST_EVERY = 60.0  # the bursty profile: every minute,
BURST_LENGTH = 6.0  # 6 s
BURST_FACTOR = 4.0  # at 4 times the rate
MAX_LAG_SECONDS = 5.0
TICK_SECONDS = 0.005  # the scheduler sleeps at least this long: high rates come in batches
DAY_SECONDS = 86400  # a diurnal profile of this period follows the UTC clock and the week


def profile_factor(profile, elapsed, period, utc=None, seed=None):
    """Rate multiplier of a traffic profile at `elapsed` seconds; each averages 1 a cycle. A
    diurnal 'day' of 24 hours follows the UTC clock at epoch second `utc` instead, by week
    (utc_day_factor, Part II)."""
    if profile == "diurnal" and period == DAY_SECONDS and utc is not None:
        return utc_day_factor(utc, seed)
    if profile == "diurnal":  # night at 0.2x, midday at 1.8x
        return 1.0 - 0.8 * math.cos(2 * math.pi * elapsed / period) if period else 1.0
    if profile == "bursty":  # a 4x surge for 6 s every minute, a little below 1x in between
        if elapsed % BURST_EVERY < BURST_LENGTH:
            return BURST_FACTOR
        return (BURST_EVERY - BURST_FACTOR * BURST_LENGTH) / (BURST_EVERY - BURST_LENGTH)
    return 1.0


def draw_request(rng, currencies):
    """A PaymentRequest as a real shop's customers make them: the simulator's mix, drawn with
    pick() and the weights added up once (Part II, fast draws)."""
    currency = pick(rng, currency_choice(currencies))
    payment_type = pick(rng, TYPE_CHOICE)
    _, low, high = pick(rng, AMOUNT_BAND_CHOICE)
    amount = low * (high / low) ** rng.random()
    method = pick(rng, METHOD_CHOICE)
    pool = RETURNING_CUSTOMERS if rng.random() < RETURNING_SHARE else CUSTOMER_POOL
    customer_id = CUSTOMER_IDS[int(rng.random() * pool)]
    return PaymentRequest(Decimal(f"{amount:.2f}"), currency, payment_type, customer_id, method)


class Simulator:
    """Makes Poisson-distributed payments through the PaymentProcessor, as clients would (and
    refunds some later, through the app's RefundingProcessor, Part II).

    One thread: arrivals are drawn ahead on a schedule, and payments that are 'processing' wait
    in a heap until their completion time, so thousands are in flight without a thread each.
    """

    def __init__(self, settings, processor, scenarios, metrics, clock=time.monotonic):
        self.settings = settings
        self.processor = processor
        self.scenarios = scenarios
        self._clock = clock
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread = None
        self._in_flight = []  # heap of (completes_at, sequence, payment)
        self._refunds_due = []  # heap of (due_at, sequence, payment id, amount or None for all)
        self._sequence = 0
        self.fell_behind = False  # said once in the log
        self._started_at = clock()
        self.config = {}
        self.configure(enabled=settings.simulation_enabled and settings.simulation_rate > 0,
                       rate=settings.simulation_rate, profile=settings.simulation_profile,
                       seed=settings.simulation_seed)
        metrics.simulation_rate.set_function(lambda: self.current_rate(self._clock()))

    def configure(self, **changes):
        """Apply runtime changes (already validated); a new seed restarts the random sequence."""
        with self._lock:
            self.config.update(changes)
            if "seed" in changes:
                self._rng = random.Random(changes["seed"])
            self._next_arrival = None  # redrawn from now: Poisson arrivals have no memory
            return dict(self.config)

    def current_rate(self, now, effects=None):
        if not self.config["enabled"]:
            return 0.0
        if effects is None:
            effects = self.scenarios.effects()
        shape = 1.0  # steady
        if self.config["profile"] != "steady":
            elapsed = now - self._started_at
            utc = time.time() + now - self._clock()  # `now` on the wall clock, for a 24-hour day
            shape = profile_factor(self.config["profile"], elapsed,
                                   self.settings.simulation_period, utc,
                                   self.settings.simulation_seed)
        return self.config["rate"] * shape * effects.rate_factor

    def tick(self, now):
        """Start every payment due by `now`, finish every one whose processing is over; return
        when to wake up next."""
        with self._lock:
            effects = self.scenarios.effects()
            rate = self.current_rate(now, effects)
            if self._next_arrival is None and rate > 0:
                self._next_arrival = now + self._rng.expovariate(rate)
            elif self._next_arrival is not None and self._next_arrival < now - MAX_LAG_SECONDS:
                self._fall_behind(now, rate)
            while self._next_arrival is not None and self._next_arrival <= now:
                self._begin_payment(self._next_arrival, effects)
                rate = self.current_rate(self._next_arrival, effects)
                if rate > 0:
                    self._next_arrival += self._rng.expovariate(rate)
                else:
                    self._next_arrival = None
            self._finish_until(now)
            self._refund_until(now)
            next_completion = self._in_flight[0][0] if self._in_flight else math.inf
            return min(now + 0.5, self._next_arrival or math.inf, next_completion)

    def _fall_behind(self, now, rate):
        """A machine too slow for the rate skips the payments due over MAX_LAG_SECONDS ago, and
        says so once."""
        if not self.fell_behind:
            skipped = now - MAX_LAG_SECONDS - self._next_arrival
            fields = {"rate": round(rate, 1), "skipped_seconds": round(skipped, 3)}
            log.warning("simulator cannot keep up: late payments are skipped",
                        extra={"fields": fields})
            self.fell_behind = True
        self._next_arrival = now - MAX_LAG_SECONDS

    def _begin_payment(self, arrival, effects):
        request = draw_request(self._rng, self.settings.currencies)
        payment = self.processor.begin(request, self._rng, "simulator", effects)
        self._sequence += 1
        completes_at = arrival + payment.processing_time
        heapq.heappush(self._in_flight, (completes_at, self._sequence, payment))

    def _run(self):
        while not self._stop_event.is_set():
            wake_at = self.tick(self._clock())
            self._stop_event.wait(max(wake_at - self._clock(), TICK_SECONDS))
        with self._lock:  # payments in flight at shutdown complete now: counted and exported
            self._finish_until(math.inf)

    def _finish_until(self, now):
        finished = []  # their log lines go out in one write
        while self._in_flight and self._in_flight[0][0] <= now:
            completed_at, sequence, payment = heapq.heappop(self._in_flight)
            self.processor.finish(payment, finished)
            # a few are refunded minutes later (draw_refund, Part II, refunds)
            refund = payment.succeeded and draw_refund(self._rng, payment.request.amount)
            if refund:
                delay, amount = refund
                due = (completed_at + delay, sequence, payment.payment_id, amount)
                heapq.heappush(self._refunds_due, due)
        self.processor.payment_log.write_lines(finished)

    def _refund_until(self, now):
        while self._refunds_due and self._refunds_due[0][0] <= now:
            _, _, payment_id, amount = heapq.heappop(self._refunds_due)
            try:
                self.processor.refund(payment_id, amount, "simulator")  # Part II, refunds
            except ClientError:  # the payment left the store, or a student refunded it already
                pass

    def start(self):
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop_event.set()
        if self._thread:
            self._thread.join()

# ---------------------------------------------------------------- 9. the application


class PaymentApp:
    """Wires the parts together and owns start and stop; tests run several side by side."""

    def __init__(self, settings, clock=time.time, monotonic=time.monotonic):
        self.settings = settings
        self.rng = random.Random()
        self.store = RefundingStore(settings.store_size)  # PaymentStore + refunds (Part II)
        self.stats = ActivityStats(settings.currencies, clock)  # PaymentStats + the console's
        self.scenarios = ScenarioControl(settings, clock)  # ScenarioBoard + start/stop, schedule
        self.metrics = PaymentMetrics(settings.currencies, self.stats, self.scenarios)
        self.exporter = make_exporter(settings, self.metrics)  # an InfluxWriter, or disabled
        self.tracer = make_tracer(settings, self.metrics)  # tracing.py, or DisabledTracer
        self.processor = RefundingProcessor(settings, self.metrics, self.stats, self.store,
                                            self.exporter, clock, self.tracer)  # + refunds
        self.simulator = Simulator(settings, self.processor, self.scenarios, self.metrics,
                                   monotonic)
        # Part II from here: remembered answers, requests counted for a graceful stop
        self.idempotency = IdempotencyKeys(monotonic)
        self.in_progress = RequestsInProgress()
        self.check_places = threading.BoundedSemaphore(MAX_CHECKS)  # students' checks at once
        self.abort_waits = threading.Event()  # set when a stop runs out of time
        self.openapi = None  # the API description, built once when first asked for
        self.started_at = monotonic()
        self.stopping = False
        self.server = None
        self._server_thread = None

    @property
    def url(self):
        """Where a browser on this machine reaches the service."""
        host, port = self.server.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    def start(self):
        # a PaymentServer with the connection guards of Part II
        self.server = GuardedServer((self.settings.host, self.settings.port), self)
        self._server_thread = threading.Thread(target=self.server.serve_forever,
                                               name="http-server")
        self._server_thread.start()
        self.simulator.start()
        announce_start(self)
        self.exporter.start()
        return self

    def stop(self):
        """Stop accepting, let requests in progress finish (within SHUTDOWN_TIMEOUT), flush
        InfluxDB, return."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.stopping = True
        self.in_progress.stopping = True
        self.server.shutdown()
        self._server_thread.join()
        self.server.socket.close()  # new connections are refused; a new process can bind
        self.server.close_idle_connections()  # bodies still arriving are read to the end
        # requests in progress may take all but the last second, which is InfluxDB's
        if not self.in_progress.wait_until_none(max(deadline - time.monotonic() - 1, 0)):
            self.abort_waits.set()  # payments still processing finish now
            self.in_progress.wait_until_none(0.5)
        self.server.shutdown_connections(socket.SHUT_RDWR)
        self.server.server_close()
        self.simulator.stop()
        self.exporter.close(max(deadline - time.monotonic(), 0.1))  # the points first,
        self.tracer.close(max(deadline - time.monotonic(), 0.5))  # then traces, in the time left

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backfill"]:  # days of history: an extra in its own file, run in its place
        return run_history(argv[1:])  # Part II; replaces this process, never returns
    try:
        settings = Settings.load(argv)
    except SettingsError as error:
        print(f"payment_api.py: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    stop_requested = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop_requested.set())
    app = PaymentApp(settings)
    try:
        app.start()
    except OSError as error:
        fields = {"host": settings.host, "port": settings.port, "error": str(error)}
        log.error("cannot listen", extra={"fields": fields})
        app.exporter.close(0)
        return 1
    stop_requested.wait()
    log.info("stopping: finishing requests in progress and InfluxDB writes")
    app.stop()
    log.info("stopped")
    return 0


# ================================================================ PART II: THE MACHINERY
# What keeps the course path safe and fast. Part I reads without it, and the service runs both:
# each piece attaches to Part I as a subclass, a mixin, or a function Part I calls by name.
# ---------------------------------------------------------------- connection guards


HEADER_SECONDS = 10  # request line and headers must arrive within this, however they trickle
BODY_SECONDS = 10  # a body gets this long, plus one second for every BODY_BYTES_PER_SECOND
BODY_BYTES_PER_SECOND = 16 * 1024


class DeadlineReader(socket.SocketIO):
    """A connection's reads with one deadline for a whole request, not a timeout per recv.

    The stdlib's socket timeout applies to each recv, so a client trickling a byte every few
    seconds would keep its thread for ever. Here the first bytes of a request start
    HEADER_SECONDS for all its headers, and a body gets time in proportion to its size; waiting
    for the next request of an idle keep-alive connection keeps the handler's own timeout.
    """
    deadline = None  # None: idle, waiting for the first byte of a request

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not self._arrives_within(remaining):
                raise TimeoutError("the request did not arrive in time")
        count = super().readinto(buffer)
        if self.deadline is None and count:
            self.deadline = time.monotonic() + HEADER_SECONDS
        return count

    def _arrives_within(self, seconds):
        """Wait for bytes without changing the socket's timeout, which answers are sent under."""
        poll = select.poll()
        poll.register(self.fileno(), select.POLLIN)
        return bool(poll.poll(seconds * 1000))

    def expect_body(self, length):
        self.deadline = time.monotonic() + BODY_SECONDS + length / BODY_BYTES_PER_SECOND


class RequestsInProgress:
    """How many requests are being served (read, and not yet answered): a graceful stop
    waits until none is left. No client may keep more than its `share` of them at once, so
    one runaway load test leaves room for the rest of the class."""

    def __init__(self):
        self._count = 0
        self._by_client = {}
        self._lock = threading.Lock()  # taken directly: cheaper than through the Condition
        self._none_left = threading.Condition(self._lock)
        self.stopping = False
        self.share = math.inf  # the server sets it from MAX_CONNECTIONS

    def enter(self, client):
        """Count a request of `client` (None: one never refused); False when over its share."""
        with self._lock:
            busy = self._by_client.get(client, 0)
            if client is not None and busy >= self.share:
                return False
            self._by_client[client] = busy + 1
            self._count += 1
            return True

    def leave(self, client):
        with self._lock:
            self._count -= 1
            busy = self._by_client.pop(client) - 1
            if busy:
                self._by_client[client] = busy
            if self.stopping:
                self._none_left.notify_all()

    def wait_until_none(self, timeout):
        """True when none is left within `timeout` seconds."""
        with self._none_left:
            return self._none_left.wait_for(lambda: self._count == 0, timeout)


class ConnectionGuards:
    """A handler mixin: deadlines for a request's bytes, one way to frame a body, and a
    graceful close when a body was left unread."""

    def setup(self):
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one with deadlines
        self.reader = DeadlineReader(self.connection, "rb")
        self.rfile = io.BufferedReader(self.reader)
        self.answered = 0  # requests on this connection

    def handle_one_request(self):
        self.reader.deadline = None  # the next request is awaited with the idle timeout
        self.in_progress = None
        self.continue_asked = False
        self.served = self.connection in self.server.connections  # not one of the Overflow's
        if self.served and self.server.app.stopping and self.answered:
            self.close_connection = True  # a keep-alive connection gets no new request in a stop
            return
        if self.served:
            self.server.idle_connections[self.connection] = True  # room to make at the cap
        try:
            super().handle_one_request()
        finally:
            self.answered += 1
            if self.in_progress:  # counted from its headers to its answer
                self.in_progress.leave(self.client)

    def finish(self):
        """Closing with a body unread (a 413, a 400): read it away briefly, so the client sees
        our answer instead of a reset."""
        super().finish()
        if self.body_unread:
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(1)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline and self.connection.recv(65536):
                    pass
            except OSError:
                pass

    def parse_request(self):
        """The stdlib's parsing, then framing checked and the body's deadline set."""
        if not super().parse_request():
            return False
        if self.served and self.server.idle_connections.pop(self.connection, None) is None:
            self.close_connection = True  # closed to make room while its head arrived: a
            return False  # part of a request must never be served as if it were whole
        app = self.server.app
        path = urlsplit(self.path).path
        error = (framing_error(self.headers) or cross_site_error(
            self.command, self.headers, app.settings.allowed_origins, path))
        self.client = None
        if path not in NEVER_REFUSED:
            self.client = client_of(self.client_address[0], self.headers,
                                    app.settings.trusted_proxies)
        if error is None and not app.in_progress.enter(self.client):
            error = TooManyRequests(self.client, app.in_progress.share)
        if error is not None:
            self.refuse(error)
            return False
        self.in_progress = app.in_progress  # a stop waits for it to be answered
        length = self.headers.get("Content-Length")
        most_bytes, _ = BODIES.get(path, JSON_BODY)
        if length and WHOLE_NUMBER.fullmatch(length) and int(length) <= most_bytes:
            self.reader.expect_body(int(length))
            if self.continue_asked:  # the checks passed: now the body is welcome
                self.send_response_only(100)
                self.end_headers()
                self.wfile.flush()  # at once, not with the final answer
        return True

    def handle_expect_100(self):
        """Expect: 100-continue is answered once the request's checks pass (parse_request)."""
        self.continue_asked = True
        return True

    def refuse(self, error):
        """Answer a request whose body cannot be framed, and log it as dispatch() would."""
        self.status = None
        self.trace = None
        lengths = self.headers.get_all("Content-Length", [])
        self.body_unread = ("Transfer-Encoding" in self.headers
                            or any(length != "0" for length in lengths))
        self.send_client_error(error)
        self.log_access(urlsplit(self.path).path, time.monotonic())


class GuardedServer(PaymentServer):
    """A thread per connection, up to MAX_CONNECTIONS; more wait in the Overflow, threadless.

    It remembers open connections so a graceful stop can end them, and backs off when the
    process runs out of file descriptors instead of retrying accept() in a busy loop.
    """
    OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self, address, app):
        self.max_connections, overflow_places = fit_to_file_limit(app.settings.max_connections)
        self.connections = set()
        self.idle_connections = OrderedDict()  # waiting for (the rest of) a request's head
        app.in_progress.share = max(1, math.ceil(self.max_connections * app.settings.client_share))
        self._limit_reached_said = False
        self._accept_backoff = 0.0
        self._starving = False  # accept() failed for want of descriptors, no success since
        self._starving_said = False  # ... and the log said so (at most once a minute)
        self._starving_said_at = -math.inf
        self._stop_event = threading.Event()
        self._serving_ended = threading.Event()
        self.overflow = None  # until the port is bound
        super().__init__(address, app, GuardedHandler)
        self._wake_reader, self._wake_writer = socket.socketpair()  # a stop wakes serve_forever
        self.overflow = Overflow(self, overflow_places)

    def get_request(self):
        try:
            connection = super().get_request()
        except OSError as error:
            if error.errno in self.OUT_OF_DESCRIPTORS:
                self._back_off(error)
            raise
        if self._accept_backoff > 0.01:
            self._accept_backoff /= 2
        else:
            self._accept_backoff = 0.0
        if self._starving:
            self._starving = False
            if self._starving_said:
                log.info("accepting connections again: file descriptors are free")
        return connection

    def process_request(self, request, client_address):
        at_limit = len(self.connections) >= self.max_connections
        if at_limit and not self.close_oldest_idle():
            if not self._limit_reached_said:
                self._limit_reached_said = True
                fields = {"MAX_CONNECTIONS": self.max_connections}
                log.warning("connection limit reached: further connections get 503, except "
                            "/health and /metrics", extra={"fields": fields})
            self.overflow.admit(request, client_address)
            return
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        self.idle_connections.pop(request, None)
        super().shutdown_request(request)

    def server_bind(self):
        """HTTPServer's bind, without the reverse DNS lookup of its address (socket.getfqdn)
        that start-up would wait for: nothing here reads server_name."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve_forever(self):
        """Accept connections until shutdown(). The stdlib's loop wakes every poll_interval to
        see whether to stop; this one sleeps until a connection arrives or a stop wakes it."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_reader, selectors.EVENT_READ)
                while not self._stop_event.is_set():
                    ready = selector.select()
                    if self._stop_event.is_set():
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
        finally:
            self._serving_ended.set()

    def close_oldest_idle(self):
        """Make room at the limit: end the connection idle the longest (a keep-alive one
        waiting for its next request, or one still sending its head). False when none is."""
        try:
            connection, _ = self.idle_connections.popitem(last=False)
        except KeyError:
            return False
        try:
            connection.shutdown(socket.SHUT_RDWR)  # its thread sees the end and leaves
        except OSError:
            pass
        return True

    def close_idle_connections(self):
        """A stop ends the connections that wait for a request; the others finish theirs."""
        while self.idle_connections:
            try:
                connection, _ = self.idle_connections.popitem(last=False)
                connection.shutdown(socket.SHUT_RD)
            except (KeyError, OSError):  # taken by its own thread meanwhile, or already gone
                pass

    def _back_off(self, error):
        """Out of file descriptors: wait (up to 1 s, doubling) for connections to close; say
        so once a minute."""
        if not self._starving:
            self._starving = True
            self._starving_said = time.monotonic() - self._starving_said_at > 60
            if self._starving_said:
                self._starving_said_at = time.monotonic()
                fields = {"error": str(error), "open connections": len(self.connections)}
                log.warning("out of file descriptors: accepting new connections slows down "
                            "until some close", extra={"fields": fields})
        self._accept_backoff = min(max(self._accept_backoff * 2, 0.01), 1.0)
        self._stop_event.wait(self._accept_backoff)

    def handle_error(self, request, client_address):
        """A client resetting its connection is ordinary (load tools do it); anything else is
        logged as an event."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.exception("connection failed", extra={"fields": {"client": client_address[0]}})

    def shutdown(self):
        """Stop serve_forever() and wait until it has returned."""
        self._stop_event.set()
        self._wake_writer.send(b"\0")
        self._serving_ended.wait()

    def server_close(self):
        if self.overflow is not None:
            self.overflow.stop()
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def shutdown_connections(self, how):
        """SHUT_RD ends idle keep-alive connections while answers in progress still go out;
        SHUT_RDWR ends all."""
        for connection in list(self.connections):
            try:
                connection.shutdown(how)
            except OSError:
                pass


# http.server parses every request's headers with the email package: the largest cost of a small
# request such as a scrape of /health. A head of plain ASCII lines means the same to a split on the
# first colon, so such a head is split here; anything else takes the stdlib's own way.


PLAIN_REQUEST_LINE = re.compile(  # a path starting with // is one the stdlib rewrites
    rb"(?P<command>[!-~]+) (?P<path>(?!//)[!-~]+) HTTP/1\.(?P<minor>[01])\r\n")
PLAIN_HEADER_LINE = re.compile(  # a token, a colon, visible ASCII, spaces and tabs
    rb"(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(?P<value>[\t -~]*)\r\n")
MAX_HEADER_LINE = 65536  # http.client's limits, as the stdlib applies them to every head
MAX_HEADER_LINES = 100
NESTED_BODIES = ("multipart", "message")  # types whose body the email package parses too


class PlainRequestHeads:
    """A handler mixin: the stdlib's parse_request, with plain heads split without the email
    package into the very HTTPMessage it would build; the guards check the result as before."""

    def parse_request(self):
        line = PLAIN_REQUEST_LINE.fullmatch(self.raw_requestline)
        if line is None:  # HTTP/0.9 or 2, spaces, tabs, bytes beyond ASCII: the stdlib decides
            return super().parse_request()
        self.requestline = self.raw_requestline[:-2].decode("ascii")
        self.command = line["command"].decode("ascii")
        self.path = line["path"].decode("ascii")
        self.request_version = "HTTP/1." + line["minor"].decode("ascii")
        self.close_connection = not (line["minor"] == b"1"
                                     and self.protocol_version >= "HTTP/1.1")
        try:
            self.headers = self.read_headers()
        except http.client.LineTooLong as error:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long",
                            str(error))
            return False
        except http.client.HTTPException as error:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers",
                            str(error))
            return False
        return self.read_connection_headers()

    def read_headers(self):
        """http.client.parse_headers: the same limits, the same message."""
        lines = []
        while not lines or lines[-1] not in (b"\r\n", b"\n", b""):
            lines.append(self.rfile.readline(MAX_HEADER_LINE + 1))
            if len(lines[-1]) > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            if len(lines) > MAX_HEADER_LINES:
                raise http.client.HTTPException(f"got more than {MAX_HEADER_LINES} headers")
        message = self.plain_headers(lines)
        if message is None:
            head = b"".join(lines).decode("iso-8859-1")
            message = email.parser.Parser(_class=self.MessageClass).parsestr(head)
        return message

    def plain_headers(self, lines):
        """The message the email package makes of these lines, or None unless they are plain."""
        if lines[-1] != b"\r\n":
            return None
        message = self.MessageClass()
        for line in lines[:-1]:
            header = PLAIN_HEADER_LINE.fullmatch(line)
            if header is None:
                return None
            message.set_raw(header["name"].decode("ascii"), header["value"].decode("ascii"))
        message.set_payload("")
        if "Content-Type" in message and message.get_content_maintype() in NESTED_BODIES:
            return None
        return message

    def read_connection_headers(self):
        """The end of the stdlib's parse_request: Connection, then Expect."""
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = self.headers.get("Expect", "").lower()
        if (expect == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1" and not self.handle_expect_100()):
            return False
        return True


class AmbiguousFraming(MalformedBody):
    closes_connection = True


def framing_error(headers):
    """Why the body's end is not known for sure, or None: anything but one way to tell could
    smuggle a second request in the body."""
    lengths = headers.get_all("Content-Length", [])
    if len(lengths) > 1:
        return AmbiguousFraming("more than one Content-Length header")
    if lengths and "Transfer-Encoding" in headers:
        return AmbiguousFraming("Content-Length and Transfer-Encoding together")
    if headers.defects:  # a malformed header line hides every header after it
        return AmbiguousFraming("a header line is malformed")
    return None


class Forbidden(ClientError):
    status = 403


CHANGES = ("POST", "PUT", "DELETE", "PATCH")


# what a change may send, by path: JSON of at most MAX_BODY_BYTES, except a document to check (a
# dashboard's export is often 50-300 KB), which for a rule file may also be YAML
MAX_CHECK_BODY_BYTES = 1024 * 1024  # what the compose stack's gateway lets through
RULE_FILE_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
                   "application/json")
JSON_BODY = (MAX_BODY_BYTES, ("application/json",))  # (most bytes, Content-Types)
BODIES = {"/api/checks/alerts": (MAX_CHECK_BODY_BYTES, RULE_FILE_TYPES),
          "/api/checks/dashboard": (MAX_CHECK_BODY_BYTES, ("application/json",))}


def cross_site_error(method, headers, allowed_origins, path=""):
    """Why a web page on another site may not make this change, or None. A browser names the
    page's origin on every POST; a form can send only types other than JSON (and YAML), and a
    script of another site needs a CORS preflight for them, which this service never grants."""
    if method not in CHANGES:
        return None
    origin = headers.get("Origin")
    host = headers.get("Host", "").lower()
    own = (f"http://{host}", f"https://{host}", *allowed_origins)
    if origin is not None and origin.lower().rstrip("/") not in own:
        return Forbidden(f"a page from {origin[:ECHO_LIMIT]} may not change this service; "
                         "ALLOWED_ORIGINS lists the sites that may")
    content_type = headers.get("Content-Type")
    _, types = BODIES.get(path, JSON_BODY)
    if content_type is not None and media_type(content_type) not in types:
        return UnsupportedMediaType("Content-Type must be " + " or ".join(types))
    return None


def media_type(content_type):
    return content_type.split(";")[0].strip().lower()


def client_of(peer, headers, trusted_proxies):
    """Who sent a request: the peer, or behind a trusted proxy the last address that
    X-Forwarded-For names before the proxies."""
    if not trusted_proxies or not is_trusted(peer, trusted_proxies):
        return peer
    hops = ",".join(headers.get_all("X-Forwarded-For", [])).split(",")
    for hop in reversed(hops):
        if hop.strip() and not is_trusted(hop.strip(), trusted_proxies):
            return hop.strip()[:64]
    return peer


def is_trusted(address, trusted_proxies):
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted_proxies)


class TooManyRequests(ClientError):
    status = 429

    def __init__(self, client, share):
        super().__init__(f"too many requests in progress from {client} (at most {share} at "
                         "once); retry in a second")
        self.headers["Retry-After"] = "1"


NEVER_REFUSED = ("/health", "/metrics")  # however busy a client: Prometheus keeps scraping


SPARE_DESCRIPTORS = 64  # files, InfluxDB and OTLP sockets, the log: besides the connections


def fit_to_file_limit(wanted):
    """(connections, overflow places): MAX_CONNECTIONS and the Overflow's CAPACITY, or fewer
    when the open-file limit cannot hold them; the soft limit is raised first, up to the hard."""
    import resource  # POSIX only, like the limit it reads
    needed = wanted + Overflow.CAPACITY + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # macOS caps it below the hard limit: keep the soft one
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted, Overflow.CAPACITY
    room = max(2, soft - SPARE_DESCRIPTORS)
    connections = min(wanted, room // 2)
    fields = {"MAX_CONNECTIONS": wanted, "open files allowed": soft,
              "connections served": connections, "connections waiting": room - connections}
    log.warning("MAX_CONNECTIONS lowered to fit the open-file limit (ulimit -n)",
                extra={"fields": fields})
    return connections, room - connections


class Overflow:
    """Connections beyond MAX_CONNECTIONS, held without a thread of their own.

    One thread waits on all of them with a selector, reads each request head (briefly), answers
    GET /health and /metrics so Prometheus keeps scraping, and answers anything else a fast 503
    with Retry-After. At most CAPACITY wait here; the oldest is closed to make room.
    """
    CAPACITY = 256
    HEAD_SECONDS = 2.0
    HEAD_BYTES = 8192
    ANSWERED_HERE = {(b"GET", b"/health"), (b"GET", b"/metrics"), (b"HEAD", b"/health"),
                     (b"HEAD", b"/metrics")}
    BUSY = json.dumps({"error": "too many connections; retry in a second"}).encode()

    def __init__(self, server, capacity):
        self.server = server
        self.capacity = capacity
        self._selector = selectors.DefaultSelector()
        self._waiting = OrderedDict()  # socket -> [client address, deadline, head so far]
        self._arrived = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-overflow", daemon=True)
        self._thread.start()

    def admit(self, connection, client_address):
        self._arrived.append((connection, client_address))
        self._wake()

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except BlockingIOError:  # the thread has wake-ups enough pending
            pass

    def _run(self):
        while not self._stop_event.is_set():
            for key, _ in self._selector.select(timeout=self._until_first_deadline()):
                if key.fileobj is self._wake_reader:
                    self._take_arrivals()
                else:
                    self._read(key.fileobj)
            now = time.monotonic()
            late = [connection for connection, (_, deadline, _) in self._waiting.items()
                    if deadline < now]
            for connection in late:
                self._close(connection)

    def _until_first_deadline(self):
        """Seconds until the oldest waiting head is late (deadlines come in arrival order), or
        None: with no connection waiting, the thread sleeps until one arrives."""
        if not self._waiting:
            return None
        _, deadline, _ = next(iter(self._waiting.values()))
        return max(deadline - time.monotonic(), 0)

    def _take_arrivals(self):
        self._wake_reader.recv(4096)
        while self._arrived:
            connection, client_address = self._arrived.popleft()
            if len(self._waiting) >= self.capacity:
                self._close(next(iter(self._waiting)))
            connection.setblocking(False)
            deadline = time.monotonic() + self.HEAD_SECONDS
            self._waiting[connection] = [client_address, deadline, b""]
            self._selector.register(connection, selectors.EVENT_READ)

    def _read(self, connection):
        entry = self._waiting.get(connection)
        if entry is None:  # closed to make room after select() reported it
            return
        try:
            chunk = connection.recv(self.HEAD_BYTES)
        except OSError:
            chunk = b""
        entry[2] += chunk
        if not chunk or len(entry[2]) > self.HEAD_BYTES:
            self._close(connection)
        elif b"\r\n\r\n" in entry[2]:
            self._answer(connection, entry[0], entry[2])

    def _answer(self, connection, client_address, head):
        self._selector.unregister(connection)
        del self._waiting[connection]
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        try:
            connection.settimeout(self.HEAD_SECONDS)
            if (method, path) in self.ANSWERED_HERE:
                OverflowHandler((connection, head), client_address, self.server)
            else:
                self.server.app.metrics.connections_shed.inc()
                connection.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(self.BUSY), self.BUSY))
        except OSError:  # the client left, or reads too slowly
            pass
        except Exception:  # never let one connection end the thread that holds the others
            fields = {"client": client_address[0]}
            log.exception("overflow answer failed", extra={"fields": fields})
        self.server.shutdown_request(connection)

    def _close(self, connection):
        self._selector.unregister(connection)
        del self._waiting[connection]
        self.server.shutdown_request(connection)

    def stop(self):
        self._stop_event.set()
        self._wake()
        self._thread.join()
        for connection in list(self._waiting):
            self._close(connection)
        while self._arrived:
            self.server.shutdown_request(self._arrived.popleft()[0])
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


# ---------------------------------------------------------------- idempotency keys


IDEMPOTENCY_KEY = re.compile(r"[!-~]([ -~]{0,253}[!-~])?")  # no space at either end


@dataclass
class RememberedAnswer:
    fingerprint: str  # of the request that made it: a repeat with another body is a mistake
    expires_at: float
    status: int = None  # None while the first request is still being processed
    body: dict = None
    headers: dict = None


class IdempotencyKeys:
    """Answers remembered by Idempotency-Key, so a client that retries is answered again, not
    charged twice.

    A key is kept KEEP_SECONDS (24 hours) and at most CAPACITY keys are kept (the oldest is
    forgotten first), so a flood of distinct keys cannot grow memory.
    """
    KEEP_SECONDS = 24 * 3600
    CAPACITY = 10_000

    def __init__(self, clock):
        self._clock = clock
        self._answers = OrderedDict()  # key -> RememberedAnswer, oldest first
        self._lock = threading.Lock()

    def answer_once(self, handler, key, meaning, act, answer_of):
        """Answer answer_of(act()) with the key remembered: a repeat gets the first answer; the
        same key and request while the first runs is 409, with another request 422. `meaning`
        is the validated request, so 10.5 and 10.50, or usd and USD, are the same request."""
        if len(handler.headers.get_all("Idempotency-Key")) > 1:
            raise InvalidField("Idempotency-Key", "send one Idempotency-Key header, not several")
        if not IDEMPOTENCY_KEY.fullmatch(key):
            raise InvalidField("Idempotency-Key", "Idempotency-Key must be 1-255 printable "
                               "ASCII characters, without a space at either end")
        request = [handler.command, urlsplit(handler.path).path, meaning]
        request_text = json.dumps(request, sort_keys=True, default=str)
        fingerprint = hashlib.sha256(request_text.encode()).hexdigest()
        result, entry = self.begin(key, fingerprint)
        if result != "new":
            handler.server.app.metrics.idempotency.labels(result).inc()
        if result == "replayed":
            replayed = {**entry.headers, "Idempotent-Replayed": "true"}
            return handler.send_json(entry.status, entry.body, replayed)
        if result == "in_progress":
            raise Conflict("a request with this Idempotency-Key is still being processed; "
                           "retry in a moment")
        if result == "mismatch":
            raise Unprocessable("this Idempotency-Key was used with another request body",
                                field="Idempotency-Key")
        handler.send_json(*self._act_once(key, entry, act, answer_of))

    def _act_once(self, key, entry, act, answer_of):
        try:
            status, body, headers = answer_of(act())
        except BaseException:
            self.forget(key, entry)
            raise
        if status == 503:  # refused, not processed: a retry after the outage may succeed
            self.forget(key, entry)
        else:
            self.remember(entry, status, body, headers)
        return status, body, headers

    def begin(self, key, fingerprint):
        """(result, entry): 'new' (the caller processes the request and remembers its answer),
        'replayed' (the entry holds the first answer), 'in_progress' or 'mismatch'."""
        with self._lock:
            now = self._clock()
            while self._answers and next(iter(self._answers.values())).expires_at <= now:
                self._answers.popitem(last=False)
            known = self._answers.get(key)
            if known is None:
                if len(self._answers) >= self.CAPACITY:
                    self._forget_oldest_answered()
                entry = RememberedAnswer(fingerprint, now + self.KEEP_SECONDS)
                self._answers[key] = entry
                return "new", entry
            if known.fingerprint != fingerprint:
                return "mismatch", known
            return ("in_progress" if known.status is None else "replayed"), known

    def _forget_oldest_answered(self):
        """Make room without forgetting a request in progress: its retry would be charged."""
        for key, entry in self._answers.items():
            if entry.status is not None:
                del self._answers[key]
                return

    def remember(self, entry, status, body, headers):
        with self._lock:
            entry.status = status
            entry.body = body
            entry.headers = headers

    def forget(self, key, entry):
        with self._lock:
            if self._answers.get(key) is entry:
                del self._answers[key]

    def __len__(self):
        return len(self._answers)

# ---------------------------------------------------------------- refunds
# A second flow beside the payment's: POST /api/payments/{id}/refunds and the simulator's
# refunds go through RefundingProcessor.refund, which checks the store, counts and exports.


@dataclass(frozen=True, slots=True)
class Refund:
    """Money returned to the customer for (part of) a completed payment."""
    refund_id: str
    payment_id: str
    amount: Decimal
    currency: str
    source: str
    created_at: float


MAX_REFUNDS = 100  # refunds a payment may have, so a payment's memory stays bounded too


def refund_json(refund):
    return {"refundId": refund.refund_id, "paymentId": refund.payment_id,
            "amount": float(refund.amount), "currency": refund.currency, "status": "succeeded",
            "source": refund.source, "timestamp": iso_utc(refund.created_at)}


def refund_answer(refund_and_payment):
    """(status, JSON body, headers) of the answer to a refund."""
    refund, payment = refund_and_payment
    refunded = payment.refunded
    body = {**refund_json(refund), "refundedAmount": float(refunded),
            "remainingAmount": float(payment.request.amount - refunded)}
    return 201, body, {}


def refund_line(refund, payment, instance):
    """One refund as a point of the measurement `refund`, tagged like its payment."""
    return (f"refund,currency={refund.currency},customer_id={customer_tag(payment.request)},"
            f"instance={instance},payment_type={payment.request.type} "
            f"amount={float(refund.amount)!r} {int(refund.created_at * 1e9)}")


REFUND_SHARE = 0.02  # of completed simulated payments, refunded 1 to 10 minutes later
REFUND_AFTER = (60.0, 600.0)
FULL_REFUND_SHARE = 0.7  # the others return part of the amount:
PARTIAL_REFUND = (0.1, 0.9)  # 10 to 90 % of it, at least 0.01


def draw_refund(rng, amount):
    """(seconds after completion, amount or None for all) of the refund the simulator (and the
    history) makes of a completed payment of `amount`, or None for no refund."""
    if rng.random() >= REFUND_SHARE:
        return None
    refund_amount = None
    if rng.random() > FULL_REFUND_SHARE:
        part = Decimal(f"{float(amount) * rng.uniform(*PARTIAL_REFUND):.2f}")
        refund_amount = max(part, Decimal("0.01"))
    return rng.uniform(*REFUND_AFTER), refund_amount


class RefundingStore(PaymentStore):
    """The PaymentStore with refunds: each checked and recorded under the store's lock, and as
    many in all as payments, so memory stays flat however many refunds clients make."""

    def refund(self, payment_id, amount, make_refund):
        """Check and record a refund of `amount` (None: all that remains) at once, so racing
        refunds never return more than was paid. Returns the refund and its payment."""
        with self._lock:
            payment = self._payments.get(payment_id)
            if payment is None:
                raise NotFound("payment not found", paymentId=payment_id[:ECHO_LIMIT])
            if not payment.succeeded:
                raise Conflict("only a completed payment can be refunded; "
                               f"this one is {payment.status}")
            remaining = payment.request.amount - payment.refunded
            if remaining <= 0:
                raise Conflict("nothing left to refund on this payment")
            if len(payment.refunds) == MAX_REFUNDS - 1 and amount not in (None, remaining):
                raise Unprocessable(f"a payment can have at most {MAX_REFUNDS} refunds: the "
                                    f"last one returns all that remains ({remaining})",
                                    field="amount", refundable=float(remaining))
            if amount is not None and amount > remaining:
                raise Unprocessable(f"at most {remaining} {payment.request.currency} remains "
                                    "to refund", field="amount", refundable=float(remaining))
            refund = make_refund(payment, remaining if amount is None else amount)
            payment.refunds += (refund,)
            self._refunds += 1
            if self._refunds > self.capacity:
                self._forget_oldest_refunded(besides=payment_id)
            return refund, payment

    def _forget_oldest_refunded(self, besides):
        """Over the refund budget: the oldest payment with refunds (not `besides`) makes room."""
        for payment_id, kept in self._payments.items():
            if kept.refunds and payment_id != besides:
                del self._payments[payment_id]  # and no further step of this loop
                self._refunds -= len(kept.refunds)
                return


class RefundingProcessor(PaymentProcessor):
    """The PaymentProcessor with refunds: each counted, kept with its payment and exported."""

    def refund(self, payment_id, amount, source):
        """Refund `amount` (None: all that remains) of a completed payment."""
        def make_refund(payment, refund_amount):
            return Refund(f"re_{new_span_id()}", payment.payment_id, refund_amount,
                          payment.request.currency, source, self._clock())
        refund, payment = self.store.refund(payment_id, amount, make_refund)
        self.metrics.record_refund(refund)
        self.stats.record_refund(refund)
        if self.exporter.enabled:
            self.exporter.export(refund_line(refund, payment, self.settings.instance))
        return refund, payment


class RefundEndpoints:
    """POST /api/payments/{id}/refunds, attached to the handler the service runs."""

    def create_refund(self, payment_id):
        """POST /api/payments/{id}/refunds: all that remains, or `amount` of it."""
        document = self.read_object(required=False)  # no body, or null: refund all that remains
        unknown = sorted(set(document) - {"amount"})
        if unknown:  # a misspelt "amount" must not refund everything
            raise InvalidField(unknown[0][:40], f"unknown field {unknown[0][:40]!r}; a refund "
                               "takes only 'amount' (leave it out to refund all that remains)")
        amount = document.get("amount")
        if amount is not None:
            amount = validate_amount(amount)
        app = self.server.app
        refund = functools.partial(app.processor.refund, payment_id, amount, "api")
        key = self.idempotency_key()
        if key is not None:  # a retry gets the first answer, not a second refund (see above)
            return app.idempotency.answer_once(self, key, amount, refund, refund_answer)
        self.send_json(*refund_answer(refund()))

# ---------------------------------------------------------------- the exporter's states and stop


UNREACHABLE = ("InfluxDB unreachable: points are kept (up to INFLUXDB_BUFFER_SIZE) and "
               "retried; set INFLUXDB_URL to your InfluxDB 2, or to nothing to turn export off")
REFUSING = ("InfluxDB answers with errors: points are retried where that may help, else "
            "dropped and counted")
NEVER_ACCEPTED_WAIT = 1.0  # seconds a stop gives an InfluxDB that has not accepted a point yet


def influxdb_answered(error):
    """True when InfluxDB sent an error status (it is up), False when no answer came at all."""
    return bool(getattr(error, "status", None)) or getattr(error, "response", None) is not None


class InfluxExporter(InfluxWriter):
    """The InfluxWriter, with InfluxDB's state (connecting, up, unreachable, refusing) logged
    once a change, and a stop that never waits long for an InfluxDB that is gone.

    While InfluxDB is slow or down, points wait (at most INFLUXDB_BUFFER_SIZE of them), batches
    are retried with exponential backoff (8 times over about 30 s), and every point given up is
    counted.
    """

    def __init__(self, settings, metrics):
        super().__init__(settings, metrics)
        self.state = "connecting"
        self._state_lock = threading.Lock()

    def start(self):
        threading.Thread(target=self._probe, name="influxdb-probe", daemon=True).start()

    def _probe(self):
        """Say once at start-up when InfluxDB cannot be reached at all (no compose stack)."""
        url = urlsplit(self.settings.influxdb_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), 3).close()
        except OSError as error:
            self._set_state("unreachable", UNREACHABLE, error, only_from="connecting")

    def _set_state(self, state, message, error=None, only_from=None):
        """Log a change of state once (up, unreachable, refusing), not once a batch."""
        with self._state_lock:
            if state == self.state or (only_from and self.state != only_from):
                return
            self.state = state
        fields = {"url": self.settings.influxdb_url}
        if error:
            fields["error"] = str(error)[:200]
        log.log(logging.INFO if state == "up" else logging.WARNING, message,
                extra={"fields": fields})

    def _written(self, _conf, data):
        super()._written(_conf, data)
        self._set_state("up", "InfluxDB accepts points")

    def _retrying(self, _conf, _data, error):
        if self._closed:  # raising ends the client's retries, which would go on after exit
            raise ConnectionAbortedError("payment-api stopped; the points were counted as dropped")
        if influxdb_answered(error):  # 429 or 503: up, but not taking points now
            self._set_state("refusing", REFUSING, error)
        else:
            self._set_state("unreachable", UNREACHABLE, error)

    def _failed(self, _conf, data, error):
        super()._failed(_conf, data, error)
        if influxdb_answered(error):
            self._set_state("refusing", REFUSING, error)

    def health(self):
        return {"state": self.state, "url": self.settings.influxdb_url,
                "bucket": self.settings.influxdb_bucket, "pendingPoints": self._pending}

    def close(self, timeout):
        """Send what is pending, waiting at most `timeout` seconds, then count what is left as
        dropped. An InfluxDB known to be unreachable or refusing would not take the points: the
        stop does not wait for it; one that has accepted none yet gets NEVER_ACCEPTED_WAIT."""
        if self.state in ("unreachable", "refusing"):
            timeout = 0
        elif self.state != "up":
            timeout = min(timeout, NEVER_ACCEPTED_WAIT)
        self._options.max_close_wait = int(timeout * 1000)  # the client's default is 300 s
        batching = self._write_api._disposable
        self._write_api.close()
        # influxdb-client bug: close() forgets its batching pipeline even when it gave up
        # waiting, and the pipeline's late completion then calls dispose() on None
        self._write_api._disposable = batching
        with self._lock:
            self._closed = True
            if self._pending:
                fields = {"points": self._pending}
                log.warning("InfluxDB points left unwritten at shutdown", extra={"fields": fields})
                self.metrics.influx_dropped.labels("shutdown").inc(self._pending)
                self._pending = 0
        self._client.close()
        self._scheduler.dispose()


def make_exporter(settings, metrics):
    """The InfluxExporter, or a DisabledExporter saying why export is off."""
    if not settings.influxdb_url:
        return DisabledExporter("INFLUXDB_URL is empty")
    try:  # an optional extra, imported only when used (it is slower to import than the rest)
        import influxdb_client  # noqa: F401 (only whether it is installed)
    except ImportError:
        return DisabledExporter("the influxdb-client package is not installed")
    return InfluxExporter(settings, metrics)

# ---------------------------------------------------------------- listing and the console


@dataclass(frozen=True)
class ListingFilter:
    """A query parameter of GET /api/payments: how to read it, what it allows, the value."""
    read: object  # (text, currencies) -> the value, or None when it is not allowed
    allowed: object  # currencies -> what is allowed, for the 400
    attribute: str  # the payment's attribute it compares with


LISTING_FILTERS = {
    "customerId": ListingFilter(lambda text, _: text if CUSTOMER_ID.fullmatch(text) else None,
                                lambda _: "1-64 characters of A-Z, a-z, 0-9, _ and -",
                                "request.customer_id"),
    "status": ListingFilter(lambda text, _: text if text in PAYMENT_STATUSES else None,
                            lambda _: "one of " + ", ".join(PAYMENT_STATUSES),
                            "status"),
    "currency": ListingFilter(known_currency,
                              lambda currencies: "one of " + ", ".join(currencies),
                              "request.currency"),
    "type": ListingFilter(lambda text, _: known_type(text),
                          lambda _: "one of " + ", ".join(PAYMENT_TYPES),
                          "request.type"),
}


MAX_PAGE = 100  # payments in one answer of GET /api/payments: about 100 KB at most


def matching(wanted):
    """A test of a payment against the filters `wanted` (name -> value), at C speed: a filter
    that matches nothing scans the whole store, and /health must not wait for it."""
    if not wanted:
        return lambda payment: True
    read = operator.attrgetter(*(LISTING_FILTERS[name].attribute for name in wanted))
    expected = tuple(wanted.values()) if len(wanted) > 1 else next(iter(wanted.values()))
    return lambda payment: read(payment) == expected


class ListingEndpoints:
    """A handler mixin: the payment list, the console's page and chart, the API document."""

    def list_payments(self):
        app = self.server.app
        for name in self.query:
            if name not in ("limit", "cursor", *LISTING_FILTERS):
                raise InvalidField(name[:40], "unknown parameter; known: limit, cursor, "
                                   + ", ".join(LISTING_FILTERS))
        text = self.query.get("limit", ["50"])[-1]
        if not WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= MAX_PAGE:
            raise InvalidField("limit", f"limit must be a whole number from 1 to {MAX_PAGE}; "
                               "nextCursor leads to the next page")
        wanted = {}
        for name, listing_filter in LISTING_FILTERS.items():
            if name in self.query:
                wanted[name] = listing_filter.read(self.query[name][-1], app.settings.currencies)
                if wanted[name] is None:
                    allowed = listing_filter.allowed(app.settings.currencies)
                    raise InvalidField(name, f"{name} must be {allowed}")
        matches = matching(wanted)
        cursor = self.query.get("cursor", [None])[-1] or None  # empty: from the newest
        payments = app.store.recent(int(text), matches, cursor)
        if payments is None:
            raise InvalidField("cursor", "this cursor's payment is no longer kept (STORE_SIZE "
                               "keeps the most recent); list again without a cursor")
        listed = [payment_json(payment) for payment in payments]
        next_cursor = payments[-1].payment_id if len(payments) == int(text) else None
        self.send_json(200, {"count": len(payments), "payments": listed,
                             "nextCursor": next_cursor})

    def activity(self):
        """The last minutes second by second, for the console's chart (and anyone's)."""
        limit = PaymentStats.ACTIVITY_SECONDS
        for name in self.query:
            if name != "seconds":
                raise InvalidField(name[:40], "unknown parameter; known: seconds")
        text = self.query.get("seconds", [str(limit)])[-1]
        if not WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= limit:
            raise InvalidField("seconds", f"seconds must be a whole number from 1 to {limit}")
        self.send_json(200, self.server.app.stats.activity(int(text)))

    def console(self):
        """The trainer's console: one static page beside the module, an optional extra."""
        try:
            with open(os.path.join(HERE, "console.html"), "rb") as page:
                body = page.read()
        except FileNotFoundError:
            raise NotFound("the console page (console.html) is not installed beside "
                           "payment_api.py") from None
        headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
                   "Content-Security-Policy": console_policy(body),
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        self.send_body(200, body, headers)

    def openapi_document(self):
        """The API in OpenAPI 3.1, built by openapi.py from the tables the service uses."""
        app = self.server.app
        if app.openapi is None:
            try:  # an optional extra; it takes this module as an argument, never imports it
                import openapi
            except ImportError:
                raise NotFound("the API description (openapi.py) is not installed beside "
                               "payment_api.py") from None
            document = openapi.document(app.settings, sys.modules[__name__])
            app.openapi = json.dumps(document).encode()
        self.send_body(200, app.openapi, {"Content-Type": "application/json"})


HERE = os.path.dirname(os.path.abspath(__file__))


def console_policy(page):
    """The console's Content-Security-Policy: its own inline script and style (by hash) and
    calls to this service, nothing else; no other site may frame it."""
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
        hashes[tag] = " ".join(source_hash(block) for block in blocks)
    return (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def source_hash(block):
    digest = base64.b64encode(hashlib.sha256(block).digest()).decode()
    return f"'sha256-{digest}'"


class ActivityStats(PaymentStats):
    """PaymentStats with the views of /api/payments/stats and /api/activity."""

    def activity(self, seconds):
        """The last `seconds` seconds, oldest first, with the p95 processing time of the last
        minute."""
        with self._lock:
            now = self._clock()
            recent = list(zip(self._recent_ends, self._recent_times))
            first = int(now) - seconds + 1
            counts = [(second, self._recent.get(second, (0, 0, 0)))
                      for second in range(first, int(now) + 1)]
        since = now - self.WINDOW_SECONDS
        times = sorted(time for completed_at, time in recent if completed_at > since)
        p95 = times[min(int(0.95 * len(times)), len(times) - 1)] if times else None
        seconds_json = [{"time": iso_utc(second), "payments": count[0], "declined": count[2],
                         "failed": count[1]} for second, count in counts]
        return {"windowSeconds": seconds,
                "p95ProcessingTime": None if p95 is None else round(p95, 4),
                "seconds": seconds_json}

    def snapshot(self):
        failure_rate = self.recent_failure_rate()
        daily_revenue = self.daily_revenue()
        with self._lock:
            counts = dict(self._counts)
            processed = counts["succeeded"] + counts["declined"] + counts["failed"]
            revenue = {code: float(amount) for code, amount in self._revenue_total.items()}
            refunded = {code: float(amount) for code, amount in self._refunded_total.items()}
            return {"since": iso_utc(self.started_at),
                    "uptimeSeconds": round(self._clock() - self.started_at, 3),
                    "totals": {"payments": processed, **counts},
                    "successRate": percent(counts["succeeded"], processed),
                    "declineRate": percent(counts["declined"], processed),
                    "failureRate": percent(counts["failed"], processed),
                    "recentFailureRate": round(failure_rate, 2), "activePayments": self.active,
                    "dailyRevenue": {"date": str(self._day), **daily_revenue},
                    "revenueSinceStart": revenue, "refundedSinceStart": refunded}


def percent(part, whole):
    return round(100.0 * part / whole, 2) if whole else None


def is_number(value):
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


# what PUT /api/simulation may change: field -> (check, what it allows)
SIMULATION_CHANGES = {
    "enabled": (lambda value: isinstance(value, bool), "true or false"),
    "rate": (lambda value: is_number(value) and 0 <= value <= MAX_SIMULATION_RATE,
             f"a number from 0 to {MAX_SIMULATION_RATE:g}"),
    "profile": (lambda value: value in PROFILES, "one of " + ", ".join(PROFILES)),
    "seed": (lambda value: value is None or (isinstance(value, int)
                                             and not isinstance(value, bool)),
             "a whole number or null"),
}


MAX_SCENARIO_SECONDS = 86400  # the longest duration a scenario can be started with


def known_scenario(name):
    if name not in SCENARIOS:
        raise NotFound("no such scenario", scenario=name[:ECHO_LIMIT], known=list(SCENARIOS))


class ControlEndpoints:
    """A handler mixin: what trainers change while a class runs, the simulator and the
    incident scenarios (changes need ADMIN_TOKEN when it is set)."""

    def check_admin_token(self):
        """A route that needs ADMIN_TOKEN (find_route asks): 401 without it, when it is set."""
        token = self.server.app.settings.admin_token
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        given_token = given.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        if token and not hmac.compare_digest(given_token, token.encode()):
            error = Unauthorized("this change needs 'Authorization: Bearer <ADMIN_TOKEN>'")
            error.headers["WWW-Authenticate"] = "Bearer"
            raise error

    def get_simulation(self):
        self.send_json(200, dict(self.server.app.simulator.config))

    def put_simulation(self):
        changes = self.read_object()
        for name, value in changes.items():
            if name not in SIMULATION_CHANGES:
                raise InvalidField(name[:40],
                                   "unknown field; known: " + ", ".join(SIMULATION_CHANGES))
            allows, allowed = SIMULATION_CHANGES[name]
            if not allows(value):
                raise InvalidField(name, f"{name} must be {allowed}")
        if "rate" in changes:
            changes["rate"] = float(changes["rate"])
        self.send_json(200, self.server.app.simulator.configure(**changes))

    def list_scenarios(self):
        self.send_json(200, {"scenarios": self.server.app.scenarios.describe_all()})

    def scenario_history(self):
        self.send_json(200, {"history": self.server.app.scenarios.history()})

    def start_scenario(self, name):
        known_scenario(name)
        body = self.read_object(required=False)  # no body, or null: run until stopped
        duration = body.get("duration")
        if duration is not None and not (is_number(duration)
                                         and 0 < duration <= MAX_SCENARIO_SECONDS):
            raise InvalidField("duration", "duration must be seconds, greater than 0 and at "
                               f"most {MAX_SCENARIO_SECONDS}")
        duration = float(duration) if duration else None
        self.send_json(200, self.server.app.scenarios.start(name, duration))

    def stop_scenario(self, name):
        known_scenario(name)
        self.send_json(200, self.server.app.scenarios.stop(name))


# Students' work, checked by exercises.py (an extra beside the module) against the Prometheus at
# PROMETHEUS_URL. A check only reads: exercises.py sends Prometheus queries and nothing else, so a
# pasted document can change nothing there or here.
MAX_CHECKS = 2  # checks running at once in the whole service: each keeps Prometheus busy
CHECK_SECONDS = 30  # a check not done by then is answered 504 (and finishes unanswered)
MOST_CHECK_SINCE = 7 * 86400  # how far back a check may look (exercises.py's command: 32 days)
CHECK_SINCE = {"answer_key": "7d", "score_alert_rules": "7d", "check_dashboard": "6h"}
CHECKS_OFF = ("checks are off: this service does not know where Prometheus is. Start it with "
              "PROMETHEUS_URL set (http://localhost:9090 on a laptop; the compose stack sets "
              "it), or check on the command line with exercises.py (docs/exercises.md)")


class BadGateway(ClientError):
    """Prometheus did not answer a check, or failed its query for a reason of its own."""
    status = 502


class ChecksBusy(ClientError):
    status = 503

    def __init__(self):
        super().__init__(f"{MAX_CHECKS} checks are running already; retry in a few seconds")
        self.headers["Retry-After"] = "5"


class GatewayTimeout(ClientError):
    status = 504

    def __init__(self, stopping=False):
        super().__init__("the service is stopping" if stopping else
                         f"the check took more than {CHECK_SECONDS} s: look at a shorter window "
                         "(?since=1d) or check a smaller document")


def import_exercises():
    """exercises.py, an optional extra: it never imports this module."""
    try:
        import exercises
    except ImportError:
        raise NotFound("the checks (exercises.py) are not installed beside "
                       "payment_api.py") from None
    return exercises


def yaml_readable():
    """Whether PyYAML, which exercises.py reads YAML rule files with, is installed."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        return False
    return True


class Check:
    """One check on a thread of its own, holding one of the app's places until it ends: a
    request that stops waiting leaves it to finish, still counted, so checks nobody waits for
    cannot pile up on Prometheus."""

    def __init__(self, places, function, arguments):
        self.places = places
        self.function = function
        self.arguments = arguments
        self.done = threading.Event()
        self.report = None
        self.error = None

    def start(self):
        threading.Thread(target=self._run, name="check", daemon=True).start()
        return self

    def _run(self):
        try:
            self.report = self.function(*self.arguments)
        except Exception as error:  # answered (or raised) by the request that waits for it
            self.error = error
        finally:
            self.places.release()
            self.done.set()

    def wait(self, seconds, abort):
        """True when the check ended within `seconds`; False at once when `abort` is set."""
        deadline = time.monotonic() + seconds
        while not self.done.wait(max(min(0.25, deadline - time.monotonic()), 0)):
            if abort.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def answer(self, exercises):
        """The report, or the error to answer instead: 422 for a document Prometheus or Grafana
        would refuse, 415 for YAML without PyYAML, 502 when Prometheus failed."""
        error = self.error
        if isinstance(error, exercises.DocumentError):
            raise Unprocessable(str(error))
        if isinstance(error, exercises.MissingDependency):
            raise UnsupportedMediaType(f"{error}: send the rule file as JSON, or install "
                                       "requirements-exercises.txt where the service runs")
        if isinstance(error, exercises.PrometheusError):
            raise BadGateway(str(error))
        if error is not None:
            raise error
        return self.report


class CheckEndpoints:
    """A handler mixin: students' alert rules and dashboards checked against the incidents that
    really happened (docs/exercises.md), what `exercises.py ... --json` prints."""

    def checks(self):
        """GET /api/checks: whether checks are on, and what they take; the console reads it."""
        url = self.server.app.settings.prometheus_url
        exercises = import_exercises()
        self.send_json(200, {
            "enabled": bool(url), "prometheus": url or None,
            "message": f"checks ask the Prometheus at {url}" if url else CHECKS_OFF,
            "yamlRuleFiles": yaml_readable(), "maxBodyBytes": MAX_CHECK_BODY_BYTES,
            "mostSinceSeconds": MOST_CHECK_SINCE, "asks": exercises.ASKS})

    def answer_key(self):
        self.send_json(200, self.run_check("answer_key"))

    def check_alerts(self):
        self.send_json(200, self.run_check("score_alert_rules", RULE_FILE_TYPES))

    def check_dashboard(self):
        self.send_json(200, self.run_check("check_dashboard", ("application/json",)))

    def run_check(self, function, document_types=None):
        """The report of exercises.`function` over the window the query asks for, with the body
        as the document when `document_types` are given."""
        app = self.server.app
        if not app.settings.prometheus_url:
            raise Conflict(CHECKS_OFF)
        exercises = import_exercises()
        since, end = self.check_window(exercises, CHECK_SINCE[function])
        arguments = [app.settings.prometheus_url, since, end]
        if document_types:
            arguments.insert(1, self.read_document(document_types))
        places = app.check_places
        if not places.acquire(blocking=False):
            raise ChecksBusy()
        check = Check(places, getattr(exercises, function), arguments).start()
        if not check.wait(CHECK_SECONDS, app.abort_waits):
            raise GatewayTimeout(stopping=app.abort_waits.is_set())
        return check.answer(exercises)

    def check_window(self, exercises, default_since):
        """(seconds to look back, the window's end or None for now) from ?since= and ?end=."""
        for name in self.query:
            if name not in ("since", "end"):
                raise InvalidField(name[:40], "unknown parameter; known: since, end")
        try:
            since = exercises.parse_duration(self.query.get("since", [default_since])[-1])
        except ValueError:
            since = 0
        if not 0 < since <= MOST_CHECK_SINCE:
            raise InvalidField("since", "since must be a Prometheus duration (30m, 6h, 2d), "
                               f"more than 0 and at most {MOST_CHECK_SINCE // 86400}d")
        text = self.query.get("end", [""])[-1]
        if not text:
            return since, None
        try:
            end = exercises.parse_time(text)
        except ValueError:
            end = math.nan
        if not 0 <= end < 1e11:  # NaN and infinity too
            raise InvalidField("end", "end must be an ISO-8601 UTC time such as "
                               "2026-11-20T00:00:00Z")
        return since, end

    def read_document(self, types):
        """The body as text: at most MAX_CHECK_BODY_BYTES of one of `types`; 400, 408, 411, 413
        or 415 as read_json answers them."""
        body = self.read_body(True, MAX_CHECK_BODY_BYTES)
        if media_type(self.headers.get("Content-Type", "")) not in types:
            raise UnsupportedMediaType("Content-Type must be " + " or ".join(types))
        return body.decode("utf-8", errors="replace")  # as exercises.py reads a file


class GuardedHandler(ConnectionGuards, PlainRequestHeads, RefundEndpoints, ListingEndpoints,
                     ControlEndpoints, CheckEndpoints, PaymentHandler):
    """The handler the service runs: Part I's PaymentHandler with the guards and endpoints of
    Part II attached."""


class OverflowHandler(GuardedHandler):
    """Answers one request whose head the Overflow has already read, then closes."""
    timeout = 2.0  # one slow reader must not hold the Overflow's one thread for long

    def setup(self):
        self.request, head = self.request
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(io.BytesIO(head))

    def handle(self):
        self.close_connection = True
        self.handle_one_request()

# ---------------------------------------------------------------- scenarios: control and schedule


class ScenarioControl(ScenarioBoard):
    """The ScenarioBoard with what the API does to it: start, stop, list and tell the history."""

    def start(self, name, duration=None):
        with self._lock:
            now = self._clock()
            self._refresh(now)
            self._start(name, now, duration, "api")
            return self._describe(name)

    def stop(self, name):
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if name in self._running:
                self._stop(name, now, "api")
            return self._describe(name)

    def _describe(self, name):
        run = self._running.get(name)
        return {"name": name, "description": SCENARIOS[name][0], "active": run is not None,
                "startedAt": iso_utc(run["startedAt"]) if run else None,
                "endsAt": iso_utc(run["endsAt"]) if run and run["endsAt"] else None}

    def describe_all(self):
        with self._lock:
            self._refresh(self._clock())
            return [self._describe(name) for name in SCENARIOS]

    def history(self):
        with self._lock:
            self._refresh(self._clock())
            return list(self._history)


DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)")


def parse_duration(text):
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 5m or 1h")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


@dataclass(frozen=True)
class ScheduleEntry:
    scenario: str  # a name from SCENARIOS, or "random"
    start: float  # seconds after start-up
    duration: float
    every: float = None  # repeat interval, or None for once


def parse_schedule(text):
    """'error_spike@2m+5m,random@10m+3m/20m': NAME@START+DURATION[/EVERY], comma-separated."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"([a-z_]+)@([^+]+)\+([^/]+)(?:/(.+))?", item)
        if not match or match[1] not in (*SCENARIOS, "random"):
            raise ValueError(f"{item!r} is not NAME@START+DURATION[/EVERY] with NAME one of "
                             + ", ".join((*SCENARIOS, "random")))
        every = parse_duration(match[4]) if match[4] else None
        start = parse_duration(match[2])
        entries.append(ScheduleEntry(match[1], start, parse_duration(match[3]), every))
    return tuple(entries)

# ---------------------------------------------------------------- traffic shapes and fast draws
# The UTC week of a 24-hour diurnal day (the history's shape too), and weighted picks whose
# weights are added up once: the simulator's draw_request and the history call them.


NIGHT_FACTOR = 0.2  # the diurnal profile at midnight, every day alike
WEEKEND_SHARE = 0.65  # a Saturday's or Sunday's daytime traffic against a weekday's
DAY_VARIATION = 0.1  # each day's daytime traffic, seeded, up to 10 % more or less
DEFAULT_SHAPE_SEED = 1  # the seed of the days when SIMULATION_SEED is unset (the history's too)


@functools.lru_cache(maxsize=64)
def week_levels(seed, week):
    """How busy the days of week number `week` (Monday to Sunday, UTC) are by day, drawn from
    `seed`: weekends lower, each day varied, the seven summing to 7."""
    rng = random.Random(f"payment-api week {seed} {week}")
    levels = []
    for weekday in range(7):  # Monday is 0
        usual = WEEKEND_SHARE if weekday >= 5 else 1.0
        levels.append(usual * rng.uniform(1 - DAY_VARIATION, 1 + DAY_VARIATION))
    return tuple(7 * level / sum(levels) for level in levels)


def utc_day_factor(utc, seed):
    """Rate multiplier at epoch second `utc`: NIGHT_FACTOR at midnight UTC, the daytime above it
    scaled by the day's level; 1 on average over every UTC week, Monday to Sunday."""
    day, second = divmod(utc, DAY_SECONDS)
    week, weekday = divmod(int(day) + 3, 7)  # 1970-01-01, day 0, was a Thursday
    level = week_levels(DEFAULT_SHAPE_SEED if seed is None else seed, week)[weekday]
    daytime = 1.0 - math.cos(2 * math.pi * second / DAY_SECONDS)  # 0 at midnight, 2 at noon
    return NIGHT_FACTOR + (1.0 - NIGHT_FACTOR) * level * daytime


class WeightedChoice(NamedTuple):
    """A population and its weights added up once: pick() draws from it."""
    population: tuple
    cumulative_weights: tuple


def weighted(population, weights):
    return WeightedChoice(tuple(population), tuple(itertools.accumulate(weights)))


def pick(rng, choice):
    """One weighted pick: what rng.choices(population, weights)[0] draws, from the same random
    number, without adding up the weights again at every draw (the history's draws too)."""
    population, cumulative_weights = choice
    position = rng.random() * cumulative_weights[-1]
    return population[bisect.bisect(cumulative_weights, position, 0, len(population) - 1)]


TYPE_CHOICE = weighted(PAYMENT_TYPES, TYPE_WEIGHTS)
AMOUNT_BAND_CHOICE = weighted(AMOUNT_BANDS, [band[0] for band in AMOUNT_BANDS])
METHOD_CHOICE = weighted(PAYMENT_METHODS, METHOD_WEIGHTS)


@functools.lru_cache(maxsize=8)
def currency_choice(currencies):
    """The configured currencies (a tuple), weighted as CURRENCY_WEIGHTS says."""
    return weighted(currencies, [CURRENCY_WEIGHTS.get(code, 10) for code in currencies])

# ---------------------------------------------------------------- trace steps
# tracing.py draws a sampled payment's processing as spans: Payment.steps gives them.


class Step(NamedTuple):
    """One step of processing a payment, a span of its trace: validation, fraud_check or
    bank_authorization."""
    name: str
    seconds: float
    error: str = None  # why it failed, on the step that failed


# Shares of a payment's usual processing time; the bank takes the rest, and all of a slowdown
# (a slow bank, the latency_degradation scenario), so a slow trace shows where the time went
STEP_SHARES = {"validation": 0.08, "fraud_check": 0.22}


def processing_steps(status, processing_time, usual_time, error=None):
    """The Steps a payment's processing time splits into (their seconds add up to it), the
    failing one with why (`error`)."""
    if status == 503:  # refused before any step began
        return ()
    validation = Step("validation", usual_time * STEP_SHARES["validation"])
    fraud_check = Step("fraud_check", usual_time * STEP_SHARES["fraud_check"])
    bank_seconds = max(processing_time - validation.seconds - fraud_check.seconds, 0.0)
    return validation, fraud_check, Step("bank_authorization", bank_seconds, error)

# ---------------------------------------------------------------- the JSON payment line, fast
# PaymentLog writes a `payment` line for every payment: in JSON (the default) it is rendered
# here with an f-string, byte for byte what LogFormatter writes for log_fields(payment).


# a str as a JSON string, escaped as json.dumps escapes it
json_text = json.encoder.encode_basestring_ascii


def json_log_line(payment, now):
    """log_fields(payment) as the JSON line of a `payment` event at `now`, keys in that order.
    Ids, statuses, currencies and types are plain ASCII; a customer id or a reason is escaped
    as json.dumps would. A test keeps it equal to LogFormatter's line, field by field."""
    request = payment.request
    line = (f'{{"time": "{iso_utc(now)}", "level": "info", "event": "payment", '
            f'"trace_id": "{payment.trace.trace_id}", "span_id": "{payment.trace.span_id}", '
            f'"payment_id": "{payment.payment_id}", "status": "{payment.status}", '
            f'"http_status": {payment.http_status}, "amount": {float(request.amount)!r}, '
            f'"currency": "{request.currency}", "type": "{request.type}", '
            f'"method": "{request.method}", "customer_id": {json_text(request.customer_id)}, '
            f'"source": "{payment.source}", '
            f'"processing_seconds": {round(payment.processing_time, 4)!r}')
    if payment.decline_code:
        line += f', "decline_code": "{payment.decline_code}"'
    if payment.failure_reason:
        line += f', "reason": {json_text(payment.failure_reason)}'
    return line + "}\n"

# ---------------------------------------------------------------- start-up plumbing


def read_settings(settings_class, argv, environ):
    """Settings.load: CLI flags, then environment variables, then defaults."""
    specs = [spec for spec in dataclasses.fields(settings_class) if "env" in spec.metadata]
    flags = vars(settings_parser(specs).parse_args(argv)) if argv else {}  # no flags: no parser
    values = {}
    warnings = []
    for spec in specs:
        names = (spec.metadata["env"], *spec.metadata["aliases"])
        if flags.get(spec.name) is not None:
            given = [(flag(spec), flags[spec.name])]
        else:
            given = [(name, environ[name]) for name in names if name in environ]
        if not given:
            continue
        name, text = given[0]
        try:
            values[spec.name] = spec.metadata["parse"](text)
        except ValueError as error:
            shown = name if spec.metadata["secret"] else f"{name}={text!r}"
            if not spec.metadata["lenient"]:
                raise SettingsError(f"{shown}: {error}") from None
            warnings.append(f"{shown}: {error}; using the default {spec.default}")
    otel_environment = {name: value for name, value in environ.items()
                        if name.startswith("OTEL_")}
    return settings_class(**values, otel_environment=otel_environment, warnings=tuple(warnings))


def settings_parser(specs):
    """The --help of the service: a flag for each setting that is no secret."""
    import argparse  # only when flags are given: a start with none need not load it
    secrets_only = [spec.metadata["env"] for spec in specs if not spec.repr]
    test_cards = ", ".join(f"{number} ({code})" for number, code in TEST_CARDS.items())
    epilog = (f"{' and '.join(secrets_only)} are read from the environment only, never from a "
              "flag (any user can read a process's flags with ps). Test card numbers the bank "
              f"always declines: {test_cards}. 'payment_api.py backfill --help' tells how to "
              "write days of history into Prometheus and InfluxDB. Traces: "
              "OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://tempo:4318) sends each payment as a "
              "trace over OTLP/HTTP, with the OpenTelemetry SDK of requirements-tracing.txt "
              "installed; the standard OTEL_* variables apply.")
    parser = argparse.ArgumentParser(prog="payment_api.py", description=__doc__.splitlines()[0],
                                     epilog=epilog)
    for spec in specs:
        if spec.repr:
            parser.add_argument(flag(spec), metavar=spec.metadata["env"], help=describe(spec))
    return parser


def flag(spec):
    return "--" + spec.name.replace("_", "-")


def describe(spec):
    """--help text of a setting: meaning, variable (and older alias), default (not a secret's)."""
    names = " or ".join((spec.metadata["env"], *spec.metadata["aliases"]))
    default = spec.default
    if isinstance(default, tuple):
        shown = ",".join(default)
    else:
        shown = str(default).lower() if default is not None else ""
    described = f"{spec.metadata['help']} (env {names}"
    if spec.repr:
        described += f", default {shown or 'none'}"
    return described + ")"


def tracing_off_reason(otel):
    """Why traces are not exported under these OTEL_* variables, or None when they are."""
    endpoint = otel.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or otel.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
    if otel.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "OTEL_SDK_DISABLED is true"
    if otel.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return "OTEL_TRACES_EXPORTER is none"
    return None


def make_tracer(settings, metrics):
    """Each payment a trace sent over OTLP/HTTP (tracing.py, with the OpenTelemetry SDK),
    when asked for; else a DisabledTracer saying why not."""
    reason = tracing_off_reason(settings.otel_environment)
    if reason:
        return DisabledTracer(reason)
    try:  # an optional extra, imported only when used: requirements-tracing.txt installs it
        import tracing
    except ImportError:
        return DisabledTracer("the OpenTelemetry SDK is not installed: "
                              "pip install -r requirements-tracing.txt", asked_for=True)
    return tracing.PaymentTracer(settings.otel_environment, settings.instance, metrics.registry)


def announce_start(app):
    """The first log lines: where the service listens, then what is off and why."""
    host, port = app.server.server_address[:2]
    where = app.url
    if host in ("0.0.0.0", "::"):
        where = (f"every interface, port {port}: open {app.url} on this machine (from outside "
                 "a container, its published port)")
    fields = {"health": app.url + "/health", "metrics": app.url + "/metrics",
              "payments": app.url + "/api/payments", "simulation": app.simulator.config}
    log.info(f"payment-api listening on {where}", extra={"fields": fields})
    for warning in app.settings.warnings:
        log.warning(warning)
    if isinstance(app.exporter, DisabledExporter):
        log.info("InfluxDB export off", extra={"fields": {"reason": app.exporter.reason}})
    if isinstance(app.tracer, DisabledTracer):
        level = logging.WARNING if app.tracer.asked_for else logging.INFO
        log.log(level, "traces off", extra={"fields": {"reason": app.tracer.reason}})


class LogFormatter(logging.Formatter):
    """One event a line: a JSON object, or 'time level event key=value ...' (LOG_FORMAT=text)."""

    def __init__(self, style):
        super().__init__()
        self.style = style

    def format(self, record):
        fields = {"time": iso_utc(record.created), "level": record.levelname.lower(),
                  "event": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self.style == "json":
            return json.dumps(fields)
        head = [fields.pop("time"), fields.pop("level"), text_value(fields.pop("event"))]
        pairs = [f"{key}={text_value(value)}" for key, value in flatten(fields)]
        return " ".join(head + pairs)


PLAIN_TEXT = re.compile(r"[\w.,:/@+%-]+")


def flatten(fields, prefix=""):
    """(dotted key, value) pairs of nested dicts: {"simulation": {"rate": 5}} gives
    ("simulation.rate", 5)."""
    for key, value in fields.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def text_value(value):
    """A value for a text log line: as it is when plain, else quoted and escaped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if PLAIN_TEXT.fullmatch(text) else json.dumps(text)


QUIET_LOGGERS = ("influxdb_client", "urllib3", "reactivex", "opentelemetry")


def configure_logging(settings):
    """Events as lines on stdout. The log line of every payment is the service's busiest
    work: what no line shows (the caller's file and line, thread and process names) is not
    looked up, as the logging HOWTO's "Optimization" section suggests."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogFormatter(settings.log_format))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    # influxdb-client and OpenTelemetry log every failed batch (OpenTelemetry a malformed header
    # with its value, which may be an API key); the exporters log each change of state once
    handler.addFilter(lambda record: not record.name.startswith(QUIET_LOGGERS))


def run_history(arguments):
    """`payment_api.py backfill ...` runs history.py in this process's place: the history
    imports this module, so this module never imports it (no import cycle)."""
    sys.stdout.flush()
    history = os.path.join(HERE, "history.py")
    os.execv(sys.executable, [sys.executable, history, *arguments])


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    # influxdb-client's flush timer runs on a thread that is no daemon and would hold the exit
    # for up to one INFLUXDB_FLUSH_INTERVAL_MS; every point is written or counted by now
    os._exit(exit_code)
