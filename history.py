"""History on demand: days of simulated payments and refunds for Prometheus (an OpenMetrics file)
and InfluxDB.

Run it through the service or on its own, the same command (`--help` lists every option):

    python payment_api.py backfill --days 7 --openmetrics history.om --influxdb
    python history.py --days 7 --openmetrics history.om --influxdb

The payments follow the simulator's tables in payment_api.py, drawn here without its objects in
the hot loop (millions of payments; test_history checks they make the points the live export
writes). The file becomes Prometheus blocks with
`promtool tsdb create-blocks-from openmetrics --max-block-duration=87600h FILE DIR`.

The traffic is the live service's with SIMULATION_PERIOD=86400 (payment_api.profile_factor): for
diurnal, the UTC day and week, so a live service run that way continues the history's line.

The history is a pure function of the seed and the time: each hour (a "chunk") draws its payments
from a random generator seeded with the seed and the chunk's start, so separate runs for Prometheus
and InfluxDB, any number of worker processes, and a longer --days all give the same payments for
the same moment. The refunds of a chunk's payments come from a second generator seeded the same
way, as the live simulator makes them: a few minutes later, possibly in a later chunk, and not at
all when that is after the end.

Sections, in reading order: options; the plan (time range, samples, incidents); the request mix
(fast draws); drawing payments (in worker processes); the OpenMetrics file; InfluxDB; main.
"""
import argparse
import bisect
import contextlib
import errno
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple, Optional
from urllib.parse import urlsplit

from prometheus_client.utils import floatToGoString

import payment_api
from payment_api import AMOUNT_BUCKETS, DURATION_BUCKETS, OUTCOME_STATUSES, PAYMENT_TYPES
from payment_api import (AMOUNT_BANDS, CUSTOMER_IDS, CUSTOMER_POOL, METHOD_WEIGHTS,
                         PAYMENT_METHODS, RETURNING_CUSTOMERS, RETURNING_SHARE, TYPE_WEIGHTS,
                         currency_choice, pick, weighted)

# the name in messages and --help, however it is started: the command the docs teach
PROG = "payment_api.py backfill"
DAY = payment_api.DAY_SECONDS
MAX_DAYS = 31
# seconds between samples: 5 samples in every [5m] window of the dashboard and the alerts
DEFAULT_STEP = 60
MAX_STEP = 150  # rate(x[5m]) needs 2 samples in each window
# The last hour is sampled as often as the shipped configs scrape the live service, so a [5m]
# window across the seam has alike samples on both sides. rate() extrapolates a window less when
# its first sample lies farther from its start than the samples lie apart on average: 60 s
# samples beside 15 s ones read up to a fifth low. That now happens an hour before the end only.
SEAM_SECONDS = 3600
SEAM_STEP = 15
EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_SEED = payment_api.DEFAULT_SHAPE_SEED  # the live shape's when SIMULATION_SEED is unset
# the scrape job of prometheus/prometheus.yml and prometheus.local.yml
DEFAULT_JOB = "payment-api"
# the target of prometheus.local.yml (compose passes --live-url)
DEFAULT_INSTANCE = "localhost:8080"
# the static labels of prometheus.local.yml (prometheus.yml gives the same)
DEFAULT_LABELS = "service=payment-api,environment=training"
CHUNK_PAYMENTS = 20_000  # payments a chunk holds at most on average: bounds each worker's memory
INCIDENT_SLOT = 8 * 3600  # one past incident in each 8-hour slot of the UTC clock
# the kinds of past incident, in turn
INCIDENT_KINDS = ("error_spike", "latency_degradation", "outage", "currency_outage",
                  "decline_wave")
# shortest and longest minutes; the others run 15-30 minutes, long enough to alert
INCIDENT_MINUTES = {"outage": (5, 10)}
INFLUXDB_BATCH_SIZE = 5000  # lines per write; InfluxData's recommended batch
INFLUXDB_RETRIES = payment_api.InfluxExporter.RETRIES  # as the live export retries
# the live metric families the file holds, in its order
FAMILIES = ("payment_requests", "payment_amount", "payment_duration_seconds", "payment_refunds",
            "payment_refund_amount", "active_payments", "payment_failure_rate",
            "payment_simulation_rate", "payment_daily_revenue", "payment_scenario_active")
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota spent
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                     if hasattr(signal, name))

# ---------------------------------------------------------------------------------------- options


class OptionError(Exception):
    """An option the backfill cannot use; the message names it."""


class OutputFailed(Exception):
    """Writing the file failed (its disk is full, or it went away): exit 1, nothing left."""

    def __init__(self, name, error):
        cause = "the disk is full" if error.errno in FULL_DISK else error.strerror or str(error)
        super().__init__(f"--openmetrics: cannot write {name}: {cause}; it was not written")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the option, exit 2 (argparse's default adds the whole usage)."""
        self.exit(2, f"{self.prog}: {message}\n")


def checked(kind, low, high, what):
    """An argparse type: `kind` of `text`, above `low` and at most `high`, else an error saying
    it must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value
    return parse


def parse_end(text):
    """ISO-8601 time (Z or an offset; no offset means UTC) as whole epoch seconds, after 1970
    began and not in the future."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        end = math.floor(moment.timestamp())
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError("must be an ISO-8601 UTC time like "
                                         f"2026-11-20T06:00:00Z, not {text!r}")
    if end > time.time() + 1:
        raise argparse.ArgumentTypeError(f"{text!r} is in the future; "
                                         "the history ends at the latest now")
    if end <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not after {EPOCH}, where Unix time "
                                         "(and Prometheus') begins")
    return end


def parse_labels(text):
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not (name.isidentifier() and name.isascii() and not name.startswith("__") and value):
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=VALUE")
        if name in ("job", "instance"):
            raise argparse.ArgumentTypeError(f"{name} has its own option, --{name}")
        labels[name] = value
    return labels


def parse_step(text):
    step = checked(int, 0, MAX_STEP, f"whole seconds from 1 to {MAX_STEP}")(text)
    if DAY % step:
        raise argparse.ArgumentTypeError("must divide a day (86400 s), so a sample falls on "
                                         f"midnight; {step} does not")
    return step


def make_parser(settings):
    """The backfill's options; their defaults come from the service's settings where it has one."""
    parser = Parser(prog=PROG,
                    description="Write days of simulated payments as an OpenMetrics file for "
                    "promtool and/or as InfluxDB points, so 24-hour and 7-day views have history.",
                    epilog="INFLUXDB_URL, INFLUXDB_TOKEN, INFLUXDB_ORG, INFLUXDB_BUCKET, "
                    "INSTANCE, CURRENCIES, PAYMENT_FAILURE_RATE and SIMULATION_RATE are read as "
                    "the service reads them.")
    add_time_options(parser)
    add_output_options(parser)
    add_traffic_options(parser, settings)
    add_series_options(parser)
    parser.add_argument("--jobs", type=checked(int, 0, 64, "a whole number from 1 to 64"),
                        default=min(os.cpu_count() or 1, 4),
                        help="worker processes drawing payments (default: the CPUs, at most 4); "
                        "the output does not depend on it")
    return parser


def add_time_options(parser):
    """--days, and where the history ends: --end or --live-url."""
    days = checked(float, 0, MAX_DAYS, f"days greater than 0 and at most {MAX_DAYS}")
    parser.add_argument("--days", type=days, default=7.0,
                        help="length of the history in days, fractions allowed, "
                        f"at most {MAX_DAYS} (default 7)")
    ends = parser.add_mutually_exclusive_group()
    ends.add_argument("--end", type=parse_end, default=None,
                      help="when the history ends, ISO-8601 UTC like 2026-11-20T06:00:00Z "
                      "(default now)")
    ends.add_argument("--live-url", metavar="URL",
                      help="the running service the history leads up to: end where it started "
                      "(its /health uptime); its IP:PORT is the default --instance, as DNS "
                      "discovery in compose scrapes it")


def add_output_options(parser):
    parser.add_argument("--openmetrics", metavar="FILE",
                        help="write the metrics' history to FILE (it appears under that name only "
                        "when complete)")
    parser.add_argument("--force", action="store_true",
                        help="replace FILE if it exists (without it, an existing FILE stops the "
                        "command)")
    parser.add_argument("--influxdb", action="store_true",
                        help="write one point a payment and one a refund to the InfluxDB of the "
                        "INFLUXDB_* settings, exactly like the live export")


def add_traffic_options(parser, settings):
    """--seed, --rate, --profile and --no-incidents: which payments the history holds."""
    seed = settings.simulation_seed if settings.simulation_seed is not None else DEFAULT_SEED
    parser.add_argument("--seed", type=int, default=seed,
                        help="same seed, same history, byte for byte (default SIMULATION_SEED, "
                        f"else {DEFAULT_SEED})")
    # SIMULATION_RATE=0 turns the simulator off: that is no rate for a history
    default_rate = settings.simulation_rate or payment_api.Settings().simulation_rate
    most = payment_api.MAX_SIMULATION_RATE
    rate = checked(float, 0, most, f"payments per second above 0, at most {most:g}")
    parser.add_argument("--rate", type=rate, default=default_rate,
                        help=f"average payments per second, over each UTC week for diurnal "
                        f"(default SIMULATION_RATE, {default_rate:g})")
    parser.add_argument("--profile", choices=payment_api.PROFILES, default="diurnal",
                        help="traffic shape, as the live service's with SIMULATION_PERIOD=86400: "
                        "diurnal is quiet at 00:00 UTC, busiest at 12:00, lower on weekends and "
                        "a little different every day, drawn from --seed (default diurnal)")
    parser.add_argument("--no-incidents", action="store_true",
                        help="no past incidents (by default one runs in every 8 hours)")


def add_series_options(parser):
    """--job, --instance, --labels and --step: how the file's series look."""
    parser.add_argument("--job", default=DEFAULT_JOB,
                        help=f"job label of every series (default {DEFAULT_JOB})")
    parser.add_argument("--instance", default=None,
                        help="instance label of every series: the scraped address, as in "
                        f"prometheus.local.yml (default {DEFAULT_INSTANCE}, or the IP:PORT of "
                        "--live-url)")
    parser.add_argument("--labels", type=parse_labels, default=parse_labels(DEFAULT_LABELS),
                        help="the scrape config's static labels, NAME=VALUE,... "
                        f"(default {DEFAULT_LABELS}; empty for none)")
    parser.add_argument("--step", type=parse_step, default=DEFAULT_STEP,
                        help=f"seconds between samples in the file (default {DEFAULT_STEP})")

# ------------------------------------------------------- the plan: time range, samples, incidents


@dataclass(frozen=True)
class Incident:
    scenario: str
    start: int
    end: int


def past_incidents(seed, start, end):
    """One incident in each 8-hour slot of the UTC clock that lies wholly in [start, end], the
    kinds in turn."""
    incidents = []
    for slot in range(start // INCIDENT_SLOT, end // INCIDENT_SLOT + 1):
        rng = random.Random(f"payment-api incidents {seed} {slot}")
        scenario = INCIDENT_KINDS[(slot + seed) % len(INCIDENT_KINDS)]
        shortest, longest = INCIDENT_MINUTES.get(scenario, (15, 30))
        minutes = rng.randint(shortest, longest)
        latest_minute = INCIDENT_SLOT // 60 - 60 - minutes
        begins = slot * INCIDENT_SLOT + 60 * rng.randint(60, latest_minute)
        if start <= begins and begins + 60 * minutes <= end:
            incidents.append(Incident(scenario, begins, begins + 60 * minutes))
    return incidents


def effects_at(incidents, moment):
    """The Effects of the incident running at `moment`, or none."""
    for incident in incidents:
        if incident.start <= moment < incident.end:
            return payment_api.SCENARIOS[incident.scenario][1]
    return NO_EFFECTS


NO_EFFECTS = payment_api.Effects()


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to draw the payments of one chunk; picklable."""
    settings: payment_api.Settings
    seed: int
    rate: float
    profile: str
    start: int
    end: int
    step: int
    chunk_seconds: int
    incidents: tuple
    influx_instance: str
    with_lines: bool
    outcome_of_status: dict

    def first_sample(self):
        return -(-self.start // self.step) * self.step

    def seam_samples(self):
        """(first, step) of the samples of the last SEAM_SECONDS: every SEAM_STEP at most."""
        step = min(self.step, SEAM_STEP)
        first = max(self.start, self.end - SEAM_SECONDS)
        return -(-first // step) * step, step

    def sample_times(self):
        """Samples at every multiple of the step from the start, of the seam's step in the last
        SEAM_SECONDS, and one at the end."""
        seam_first, seam_step = self.seam_samples()
        times = [*range(self.first_sample(), seam_first, self.step),
                 *range(seam_first, self.end + 1, seam_step)]
        if times[-1] != self.end:
            times.append(self.end)
        return times

    def effects_at(self, moment):
        return effects_at(self.incidents, moment)

    def rate_at(self, moment, effects):
        """Payments per second at `moment`: the live service's shape with a 24-hour period, so
        diurnal follows the UTC clock and the week (payment_api.utc_day_factor)."""
        factor = payment_api.profile_factor(self.profile, moment, DAY, moment, self.seed)
        return self.rate * factor * effects.rate_factor


def a_request(currencies):
    """Some PaymentRequest the service could get, for asking payment_api how it labels one."""
    return payment_api.draw_request(random.Random(0), currencies)


def live_metrics(settings):
    """A fresh PaymentMetrics of the live service: the names, types, help and labels the history
    copies."""
    stats = payment_api.PaymentStats(settings.currencies, time.time)
    board = payment_api.ScenarioBoard(settings, time.time)
    return payment_api.PaymentMetrics(settings.currencies, stats, board)


def outcome_labels(settings):
    """{HTTP status: status label} that the live PaymentMetrics.record_payment gives each
    outcome's histograms."""
    request = a_request(settings.currencies)
    labels = {}
    for status in map(int, OUTCOME_STATUSES):
        metrics = live_metrics(settings)
        metrics.record_payment(payment_api.Payment("", request, "history", 0.1, status, 0.0))
        observed, = [sample.labels["status"] for family in metrics.registry.collect()
                     if family.name == "payment_duration_seconds" for sample in family.samples
                     if sample.name.endswith("_count") and sample.value == 1]
        labels[status] = observed
    return labels


def chunk_seconds(rate, step):
    """An hour, or fewer whole steps when an hour would hold more than CHUNK_PAYMENTS payments at
    the busiest."""
    steps = max(1, min(3600 // step, int(CHUNK_PAYMENTS / (rate * 1.8 * step))))
    return steps * step

# -------------------------------------------------------------------- the request mix: fast draws


# The simulator's tables in payment_api.py, in the shape the fastest draw wants. Type, amount band
# and method are independent, so one weighted pick among their combinations, each weighing the
# product of its three weights, draws all three: a history draws millions of requests. The
# simulator draws the same mix a field at a time, from other random numbers.
LOG_AMOUNT_BANDS = tuple((math.log(low), math.log(high / low))  # (log low, log width)
                         for _, low, high in AMOUNT_BANDS)
REQUEST_SHAPES = tuple(itertools.product(PAYMENT_TYPES, LOG_AMOUNT_BANDS, PAYMENT_METHODS))
BAND_SHARES = tuple(share for share, _, _ in AMOUNT_BANDS)
SHAPE_CHOICE = weighted(REQUEST_SHAPES, (
    math.prod(weights)
    for weights in itertools.product(TYPE_WEIGHTS, BAND_SHARES, METHOD_WEIGHTS)))


def draw_request_fields(rng, currencies):
    """A request of the simulator's mix as a plain tuple (amount, currency, type, customer id,
    method), the amount a float rounded to cents: a frozen PaymentRequest with a Decimal would
    cost a fifth of a history's time."""
    currency = pick(rng, currency_choice(currencies))
    payment_type, (log_low, log_width), method = pick(rng, SHAPE_CHOICE)
    amount = round(math.exp(log_low + log_width * rng.random()), 2)
    pool = RETURNING_CUSTOMERS if rng.random() < RETURNING_SHARE else CUSTOMER_POOL
    customer_id = CUSTOMER_IDS[int(rng.random() * pool)]
    return amount, currency, payment_type, customer_id, method

# --------------------------------------------------------- drawing payments (in worker processes)


class RowLayout:
    """Offsets of the counts one sample interval adds, in a flat list (cheap to pickle between
    processes).

    `outcome_of_status` is {HTTP status: status label of the histograms}, as the live metrics
    label a payment.
    """

    def __init__(self, currencies, outcome_of_status):
        self.currencies = currencies
        self.status = {int(status): number for number, status in enumerate(OUTCOME_STATUSES)}
        self.type = {name: number for number, name in enumerate(PAYMENT_TYPES)}
        self.currency = {code: number for number, code in enumerate(currencies)}
        self.outcomes = tuple(dict.fromkeys(outcome_of_status.values()))  # e.g. success, failed
        self.outcome = {status: self.outcomes.index(label)
                        for status, label in outcome_of_status.items()}
        self.place_counts(len(currencies), len(self.outcomes))

    def place_counts(self, count, outcomes):
        """Where each kind of count starts, for `count` currencies and `outcomes` outcomes."""
        amount_buckets = len(AMOUNT_BUCKETS) + 1
        self.requests = 0  # [status][type][currency]
        # [currency][outcome][le]
        self.amount_buckets = self.requests + len(OUTCOME_STATUSES) * len(PAYMENT_TYPES) * count
        # [currency][outcome]
        self.amount_sums = self.amount_buckets + count * outcomes * amount_buckets
        self.duration_buckets = self.amount_sums + count * outcomes  # [outcome][le]
        # [outcome]
        self.duration_sums = self.duration_buckets + outcomes * (len(DURATION_BUCKETS) + 1)
        self.revenue = self.duration_sums + outcomes  # [currency], completed payments only
        self.active = self.revenue + count  # payments started minus payments completed
        # [currency][le]; the +Inf bucket is payment_refunds_total too
        self.refund_buckets = self.active + 1
        self.refund_sums = self.refund_buckets + count * amount_buckets  # [currency]
        self.width = self.refund_sums + count

    def request_slot(self, status, payment_type, currency):
        by_status = self.status[status] * len(PAYMENT_TYPES) + self.type[payment_type]
        return by_status * len(self.currencies) + self.currency[currency]

    def amount_slot(self, currency, outcome, bucket):
        histogram = self.currency[currency] * len(self.outcomes) + outcome
        return self.amount_buckets + histogram * (len(AMOUNT_BUCKETS) + 1) + bucket

    def amount_sum_slot(self, currency, outcome):
        return self.amount_sums + self.currency[currency] * len(self.outcomes) + outcome

    def duration_slot(self, outcome, bucket):
        return self.duration_buckets + outcome * (len(DURATION_BUCKETS) + 1) + bucket

    def refund_slot(self, currency, bucket):
        return self.refund_buckets + self.currency[currency] * (len(AMOUNT_BUCKETS) + 1) + bucket

    def refund_sum_slot(self, currency):
        return self.refund_sums + self.currency[currency]

    def failed_slots(self):
        """The request counts of payments the failure rate counts as failed: 5xx, as PaymentStats
        does."""
        return [self.request_slot(int(status), payment_type, currency)
                for status in OUTCOME_STATUSES if int(status) >= 500
                for payment_type in PAYMENT_TYPES for currency in self.currencies]

    def histograms(self):
        """(first bucket slot, bucket count) of every labelled histogram, for turning counts into
        cumulative ones."""
        outcomes = range(len(self.outcomes))
        amount_buckets = len(AMOUNT_BUCKETS) + 1
        amounts = [(self.amount_slot(currency, outcome, 0), amount_buckets)
                   for currency in self.currencies for outcome in outcomes]
        durations = [(self.duration_slot(outcome, 0), len(DURATION_BUCKETS) + 1)
                     for outcome in outcomes]
        refunds = [(self.refund_slot(currency, 0), amount_buckets) for currency in self.currencies]
        return amounts + durations + refunds


class PaymentSlots(NamedTuple):
    """Where a chunk counts a payment of one status, type and currency (RowLayout offsets), and
    the tags of its point after customer_id. Unpacked in the loop: a tuple is the cheapest to
    unpack millions of times."""
    request: int
    first_amount_bucket: int
    amount_sum: int
    revenue: Optional[int]  # completed payments only
    first_duration_bucket: int
    duration_sum: int
    tags: str


def payment_slots(layout, instance, point_status):
    """{(HTTP status, type, currency): PaymentSlots} for every payment a chunk can count.

    `point_status` is {HTTP status: the status tag of its point}."""
    slots = {}
    for status, outcome in layout.outcome.items():
        for payment_type in PAYMENT_TYPES:
            for currency, number in layout.currency.items():
                slots[status, payment_type, currency] = PaymentSlots(
                    request=layout.request_slot(status, payment_type, currency),
                    first_amount_bucket=layout.amount_slot(currency, outcome, 0),
                    amount_sum=layout.amount_sum_slot(currency, outcome),
                    revenue=layout.revenue + number if status == 200 else None,
                    first_duration_bucket=layout.duration_slot(outcome, 0),
                    duration_sum=layout.duration_sums + outcome,
                    tags=(f"instance={instance},payment_type={payment_type},"
                          f"status={point_status[status]}"))
    return slots


def outcome_requests(currencies):
    """{(currency, type, method): the PaymentRequest draw_outcome gets}: it reads only those
    three and the decline code (None for drawn requests), so one request a combination serves
    every payment. Amount and customer are None: if draw_outcome ever reads them, it fails here
    instead of drawing something else."""
    return {(currency, payment_type, method):
            payment_api.PaymentRequest(None, currency, payment_type, None, method)
            for currency in currencies for payment_type in PAYMENT_TYPES
            for method in PAYMENT_METHODS}


def point_statuses(currencies):
    """{HTTP status: the status tag the live export gives a payment}, read from
    payment_api.Payment.outcome."""
    request = a_request(currencies)
    return {int(status): payment_api.Payment("", request, "history", 0.0, int(status)).outcome
            for status in OUTCOME_STATUSES}


class ChunkCounts:
    """What the payments and refunds of one chunk add: {sample index: what completed in that
    interval, laid out by RowLayout}, InfluxDB bodies (bytes), and how many of each.

    Each is counted when it happens, as PaymentMetrics.record_payment and record_refund count
    them live; a refund can fall into a sample interval of a later chunk. The points are the
    lines payment_api.payment_line and refund_line write, built here without a Payment
    (test_history compares them).
    """

    def __init__(self, plan):
        layout = RowLayout(plan.settings.currencies, plan.outcome_of_status)
        point_status = point_statuses(plan.settings.currencies)
        self.slots = payment_slots(layout, plan.influx_instance, point_status)
        self.refund_slots = {currency: (layout.refund_slot(currency, 0),
                                        layout.refund_sum_slot(currency))
                             for currency in layout.currency}
        self.active = layout.active
        self.width = layout.width
        self.first_sample = plan.first_sample()
        self.step = plan.step
        self.seam_first, self.seam_step = plan.seam_samples()
        before_seam = range(self.first_sample, self.seam_first, self.step)
        self.before_seam = len(before_seam)
        self.last_before_seam = before_seam[-1] if before_seam else -math.inf
        self.instance = plan.influx_instance
        self.with_lines = plan.with_lines
        self.rows = {}
        self.lines = []
        self.bodies = []
        self.payments = 0
        self.refunds = 0

    def add_payment(self, arrival, completed, status, processing_time, fields):
        """Count a payment that arrived and completed within the history, and write its point."""
        amount, currency, payment_type, customer_id, _ = fields
        slots = self.slots[status, payment_type, currency]
        request, first_amount, amount_sum, revenue, first_duration, duration_sum, tags = slots
        rows = self.rows
        # the first sample at or after completion
        index = -int((self.first_sample - completed) // self.step)
        if completed > self.last_before_seam:
            index = self.seam_index(completed)
        row = rows.get(index) or rows.setdefault(index, [0] * self.width)
        row[request] += 1
        row[first_amount + bisect.bisect_left(AMOUNT_BUCKETS, amount)] += 1
        row[amount_sum] += amount
        row[first_duration + bisect.bisect_left(DURATION_BUCKETS, processing_time)] += 1
        row[duration_sum] += processing_time
        if revenue is not None:
            row[revenue] += amount
        started = -int((self.first_sample - arrival) // self.step)
        if arrival > self.last_before_seam:
            started = self.seam_index(arrival)
        # in flight at the samples from `started` up to (not including) `index`
        if started != index:
            row[self.active] -= 1
            row_started = rows.get(started) or rows.setdefault(started, [0] * self.width)
            row_started[self.active] += 1
        self.payments += 1
        if self.with_lines:
            if len(self.lines) >= INFLUXDB_BATCH_SIZE:  # a body ends after a payment's refund
                self.end_body()
            self.lines.append(f"payment,currency={currency},customer_id={customer_id},{tags} "
                              f"amount={amount!r},processing_time={processing_time!r} "
                              f"{int(completed * 1e9)}")

    def add_refund(self, refunded_at, refund_amount, fields):
        """Count the refund of the payment of `fields`, made at `refunded_at`, and write its
        point."""
        _, currency, payment_type, customer_id, _ = fields
        refund_buckets, refund_sum = self.refund_slots[currency]
        index = -int((self.first_sample - refunded_at) // self.step)
        if refunded_at > self.last_before_seam:
            index = self.seam_index(refunded_at)
        row = self.rows.get(index) or self.rows.setdefault(index, [0] * self.width)
        row[refund_buckets + bisect.bisect_left(AMOUNT_BUCKETS, refund_amount)] += 1
        row[refund_sum] += refund_amount
        self.refunds += 1
        if self.with_lines:
            self.lines.append(f"refund,currency={currency},customer_id={customer_id},"
                              f"instance={self.instance},payment_type={payment_type} "
                              f"amount={refund_amount!r} {int(refunded_at * 1e9)}")

    def seam_index(self, moment):
        """The index of the first sample at or after `moment`, one of the last SEAM_SECONDS."""
        return self.before_seam + max(0, -int((self.seam_first - moment) // self.seam_step))

    def end_body(self):
        self.bodies.append("\n".join(self.lines).encode())
        self.lines = []

    def result(self):
        """(rows, bodies, payments, refunds): what draw_chunk returns."""
        if self.lines:
            self.end_body()
        return self.rows, self.bodies, self.payments, self.refunds


def rates_by_second(plan, chunk_start, chunk_end):
    """([the scenario's effects], [payments per second]) for each second of the chunk.

    Once for each second, not for each payment: incidents begin and end on whole minutes, the
    rate changes slowly, and working it out for every payment would cost a tenth of the time.
    """
    incidents = [incident for incident in plan.incidents
                 if incident.start < chunk_end + 1 and incident.end > chunk_start]
    seconds = range(chunk_start, chunk_end)
    effects = [effects_at(incidents, second) for second in seconds]
    rates = [plan.rate_at(second, running) for second, running in zip(seconds, effects)]
    return effects, rates


def draw_chunk(plan, chunk_start):
    """The payments arriving in [chunk_start, chunk_start + chunk_seconds) that complete by the
    end, and their refunds that are due by the end: ChunkCounts.result()."""
    rng = random.Random(f"payment-api history {plan.seed} {chunk_start}")
    refund_rng = random.Random(f"payment-api refunds {plan.seed} {chunk_start}")
    chunk_end = min(chunk_start + plan.chunk_seconds, plan.end)
    effects_by_second, rate_by_second = rates_by_second(plan, chunk_start, chunk_end)
    settings = plan.settings
    currencies = settings.currencies
    requests = outcome_requests(currencies)
    counts = ChunkCounts(plan)
    draw_outcome = payment_api.draw_outcome
    draw_refund = payment_api.draw_refund
    start = plan.start
    end = plan.end
    arrival = chunk_start + rng.expovariate(rate_by_second[0])
    while arrival < chunk_end:
        second = int(arrival) - chunk_start
        effects = effects_by_second[second]
        fields = draw_request_fields(rng, currencies)
        amount, currency, payment_type, _, method = fields
        request = requests[currency, payment_type, method]
        status, processing_time, _ = draw_outcome(rng, request, settings, effects)
        completed = arrival + processing_time
        if arrival >= start and completed <= end:
            counts.add_payment(arrival, completed, status, processing_time, fields)
            refund = status == 200 and draw_refund(refund_rng, amount)
            if refund and completed + refund[0] <= end:
                counts.add_refund(completed + refund[0], float(refund[1] or amount), fields)
        arrival += rng.expovariate(rate_by_second[second])
    return counts.result()


def chunk_starts(plan):
    """The start of every chunk: on whole multiples of chunk_seconds, the first at or before the
    start."""
    first = plan.start // plan.chunk_seconds * plan.chunk_seconds
    return range(first, plan.end, plan.chunk_seconds)


def chunks_in_order(plan, workers):
    """(chunk start, draw_chunk's result) for every chunk in time order; each worker keeps one
    chunk ahead."""
    starts = chunk_starts(plan)
    if workers is None:
        yield from ((start, draw_chunk(plan, start)) for start in starts)
        return
    waiting = deque()
    for number, start in enumerate(starts):
        workers.send(number, start)
        waiting.append((number, start))
        if len(waiting) > workers.jobs:  # bounded: a slow InfluxDB must not make results pile up
            number, chunk_start = waiting.popleft()
            yield chunk_start, workers.receive(number)
    while waiting:
        number, chunk_start = waiting.popleft()
        yield chunk_start, workers.receive(number)


class WorkerLost(Exception):
    """A worker process ended before it answered; the run cannot be complete."""

    def __init__(self):
        super().__init__("a worker process ended before it answered (killed, or out of memory?)")


class Workers:
    """Processes that draw chunks: chunk number N goes to worker N % jobs through that worker's
    own pipe.

    A worker answers its chunks in the order it gets them, so reading the answers in turn keeps
    them in time order. Nothing is shared but the pipes: a worker that dies is an error here (not
    a hang), and a worker whose parent died ends at its next read or write.
    """

    def __init__(self, plan, jobs):
        self.plan = plan
        self.jobs = jobs
        self.processes = []  # start() creates them; stop() ends whatever it created
        self.connections = []

    def start(self):
        # new interpreters, not forks of this one and its threads
        context = multiprocessing.get_context("spawn")
        # A terminal's Ctrl-C, a closed terminal's SIGHUP and `timeout`'s SIGTERM go to every
        # process of the command. A process spawned while a signal is ignored keeps ignoring it,
        # so only this one acts on them. One sent in the few milliseconds this takes is lost.
        with stop_signals_set_to(signal.SIG_IGN):
            for _ in range(self.jobs):
                ours, theirs = context.Pipe()
                process = context.Process(target=draw_chunks, args=(self.plan, theirs))
                self.processes.append(process)
                process.start()
                theirs.close()  # the worker's end lives in the worker: its death closes the pipe
                self.connections.append(ours)

    def send(self, number, chunk_start):
        try:
            self.connections[number % self.jobs].send(chunk_start)
        except OSError:  # its end of the pipe is closed
            raise WorkerLost() from None

    def receive(self, number):
        try:
            return self.connections[number % self.jobs].recv()
        except (EOFError, OSError):
            raise WorkerLost() from None

    def stop(self):
        """End the workers at once: they hold no file and nothing worth finishing."""
        for process in self.processes:
            if process.pid is not None:
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()


def draw_chunks(plan, connection):
    """A worker's loop: draw each chunk whose start it receives, and send the result back, until
    its parent goes."""
    try:
        while True:
            connection.send(draw_chunk(plan, connection.recv()))
    except (EOFError, OSError):  # the parent closed its end, or died
        pass

# ------------------------------------------------------- OpenMetrics: one temporary file a family


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels):
    def escaped(value):
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    pairs = (f'{name}="{escaped(value)}"' for name, value in sorted(labels.items()))
    return "{" + ",".join(pairs) + "}"


class OpenMetricsWriter:
    """Writes each metric family to its own temporary file while the samples come in time order,
    then joins them.

    OpenMetrics wants each family in one piece; the samples arrive a moment at a time. The final
    name appears only by a rename when the file is complete, so a half-written file never looks
    finished.
    """

    def __init__(self, path, plan, target_labels):
        self.path = path
        self.plan = plan
        self.layout = RowLayout(plan.settings.currencies, plan.outcome_of_status)
        self.failed_slots = self.layout.failed_slots()
        self.families = self.describe_families(plan.settings)
        folder, name = os.path.split(os.path.abspath(path))
        hidden = os.path.join(folder, f".{name}.{secrets.token_hex(4)}")
        # only names so far: open_parts() creates, discard() deletes
        self.parts_folder = hidden + ".parts"
        self.joined_path = hidden + ".tmp"
        self.files = {}
        # the slots of the values add_sample works out, after the RowLayout's
        names = ("failure_rate", "rate", "up",
                 *(f"scenario {name}" for name in payment_api.SCENARIOS))
        self.extra = {name: self.layout.width + number for number, name in enumerate(names)}
        self.series = self.make_series(target_labels)
        self.totals = [0] * self.layout.width
        self.histograms = self.layout.histograms()
        self.recent = deque()  # (moment, completed, failed) of the intervals of the last minute
        self.samples = 0

    def open_parts(self):
        """Create the folder of the parts and a file for each family in it."""
        os.mkdir(self.parts_folder)
        for name in self.families:
            path = os.path.join(self.parts_folder, name)
            self.files[name] = open(path, "w", encoding="utf-8", buffering=1 << 20)

    @staticmethod
    def describe_families(settings):
        """{family: (type, help)} in the order of FAMILIES, read from the live service's own
        registry, so names and help cannot drift."""
        live = {family.name: (family.type, family.documentation)
                for family in live_metrics(settings).registry.collect()}
        families = {name: live[name] for name in FAMILIES}
        families["up"] = ("gauge", "1 when the last scrape of the target succeeded "
                          "(the history was always up)")
        return families

    def make_series(self, target_labels):
        """{family: [(line prefix, slot of its value in the vector add_sample builds)]} for every
        live series."""
        def prefix(name, **labels):
            return name + label_text({**target_labels, **labels}) + " "

        series = {name: [] for name in self.families}
        series["payment_requests"] = self.request_series(prefix)
        self.add_histogram_series(series, prefix)
        layout = self.layout
        currencies = self.plan.settings.currencies
        series["payment_daily_revenue"] = [
            (prefix("payment_daily_revenue", currency=currency), layout.revenue + number)
            for number, currency in enumerate(currencies)]
        series["payment_failure_rate"] = [(prefix("payment_failure_rate"),
                                           self.extra["failure_rate"])]
        series["active_payments"] = [(prefix("active_payments"), layout.active)]
        series["payment_scenario_active"] = [
            (prefix("payment_scenario_active", scenario=name), self.extra[f"scenario {name}"])
            for name in payment_api.SCENARIOS]
        series["payment_simulation_rate"] = [(prefix("payment_simulation_rate"),
                                              self.extra["rate"])]
        series["up"] = [(prefix("up"), self.extra["up"])]
        return series

    def request_series(self, prefix):
        """The series of payment_requests_total: one for each status, type and currency."""
        series = []
        for status in OUTCOME_STATUSES:
            for payment_type in PAYMENT_TYPES:
                for currency in self.plan.settings.currencies:
                    line = prefix("payment_requests_total", method="POST", status=status,
                                  type=payment_type, currency=currency)
                    slot = self.layout.request_slot(int(status), payment_type, currency)
                    series.append((line, slot))
        return series

    def add_histogram_series(self, series, prefix):
        """The series of the amount, duration and refund histograms, and payment_refunds_total."""
        layout = self.layout
        currencies = self.plan.settings.currencies
        for currency in currencies:
            for outcome, label in enumerate(layout.outcomes):
                series["payment_amount"] += self.histogram_series(
                    prefix, "payment_amount", {"currency": currency, "status": label},
                    AMOUNT_BUCKETS, layout.amount_slot(currency, outcome, 0),
                    layout.amount_sum_slot(currency, outcome))
        for outcome, label in enumerate(layout.outcomes):
            series["payment_duration_seconds"] += self.histogram_series(
                prefix, "payment_duration_seconds", {"status": label}, DURATION_BUCKETS,
                layout.duration_slot(outcome, 0), layout.duration_sums + outcome)
        # the live amounts of a currency appear with its first refund; these at once
        for currency in currencies:
            series["payment_refunds"].append(
                (prefix("payment_refunds_total", currency=currency),
                 layout.refund_slot(currency, len(AMOUNT_BUCKETS))))
            series["payment_refund_amount"] += self.histogram_series(
                prefix, "payment_refund_amount", {"currency": currency}, AMOUNT_BUCKETS,
                layout.refund_slot(currency, 0), layout.refund_sum_slot(currency))

    @staticmethod
    def histogram_series(prefix, name, labels, bounds, first_bucket, sum_slot):
        """Buckets (le written as the live client writes it), _count and _sum of one labelled
        histogram."""
        rows = [(prefix(name + "_bucket", **labels, le=floatToGoString(bound)),
                 first_bucket + number)
                for number, bound in enumerate((*bounds, math.inf))]
        return rows + [(prefix(name + "_count", **labels), first_bucket + len(bounds)),
                       (prefix(name + "_sum", **labels), sum_slot)]

    def add_sample(self, moment, row):
        """The value of every series at `moment`, given what the sample interval ending there
        added."""
        values = self.values_at(moment, row)
        stamp = f" {moment}\n"
        for family, series in self.series.items():
            lines = [f"{text}{values[slot]}{stamp}" for text, slot in series]
            self.files[family].write("".join(lines))
        self.samples += 1

    def values_at(self, moment, row):
        """The running totals with `row` added, then the values worked out from them: cumulative
        buckets, the failure rate, the simulation rate, up and the scenarios."""
        layout = self.layout
        totals = self.totals
        for slot, value in enumerate(row):
            totals[slot] += value
        if moment % DAY == 0:  # the UTC day's revenue starts again at 0 at midnight
            for number in range(len(self.plan.settings.currencies)):
                totals[layout.revenue + number] = 0
        values = totals + [0] * len(self.extra)
        # buckets are cumulative: le="0.1" counts everything up to 0.1
        for first, count in self.histograms:
            values[first:first + count] = itertools.accumulate(totals[first:first + count])
        values[self.extra["failure_rate"]] = self.failure_rate(moment, row)
        values[self.extra["rate"]] = self.plan.rate_at(moment, self.plan.effects_at(moment))
        values[self.extra["up"]] = 1
        for incident in self.plan.incidents:
            if incident.start <= moment < incident.end:
                values[self.extra[f"scenario {incident.scenario}"]] = 1
        return values

    def failure_rate(self, moment, row):
        """The percentage of the payments completed in the sample intervals of the last minute
        that failed, as the live gauge counts it over 60 s (the interval ending at `moment` is
        `row`)."""
        completed = sum(row[:self.layout.amount_buckets])
        self.recent.append((moment, completed, sum(row[slot] for slot in self.failed_slots)))
        while self.recent[0][0] <= moment - payment_api.PaymentStats.WINDOW_SECONDS:
            self.recent.popleft()
        completed = sum(interval[1] for interval in self.recent)
        failed = sum(interval[2] for interval in self.recent)
        return 100.0 * failed / completed if completed else 0.0

    def finish(self):
        """Join the families into the file under a temporary name, add # EOF, rename it into
        place."""
        with open(self.joined_path, "wb") as joined:
            for name, part in self.files.items():
                kind, documentation = self.families[name]
                joined.write(f"# HELP {name} {escape_help(documentation)}\n".encode())
                joined.write(f"# TYPE {name} {kind}\n".encode())
                part.close()
                with open(part.name, "rb") as source:
                    append_file(source, joined)
            joined.write(b"# EOF\n")
        os.replace(self.joined_path, self.path)
        self.discard()

    def discard(self):
        """Delete whatever temporary files exist under this writer's names, then close the parts.

        It goes by name, not by what was recorded, so an interruption at any moment (even between
        creating a file and noting it) leaves nothing behind, and a failing close (a full disk)
        comes too late to keep a file.
        """
        shutil.rmtree(self.parts_folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.joined_path)
        for part in self.files.values():
            with contextlib.suppress(OSError):
                part.close()


def append_file(source, target):
    """Copy the open file `source` to the end of the open file `target`: in the kernel where it
    can (Linux; a 7-day file is 470 MB), else through a buffer."""
    target.flush()
    try:
        while os.copy_file_range(source.fileno(), target.fileno(), 1 << 30):
            pass
    # the kernel cannot or will not copy it: the rest goes through Python
    except (AttributeError, OSError):
        shutil.copyfileobj(source, target, 1 << 20)

# ------------------------------------------------------- InfluxDB: the batching WriteApi, bounded


class InfluxWriter:
    """Sends bodies of line protocol through influxdb-client's batching WriteApi, retried like the
    live export.

    The WriteApi queues without limit, so write() waits while INFLUXDB_BUFFER_SIZE points are
    unanswered. Once a batch is given up (retries spent, or refused), the rest is counted as not
    written without being sent: an InfluxDB that is down for good costs one batch's retries, not
    every batch's.
    """

    def __init__(self, settings):
        from influxdb_client import WritePrecision
        # it logs every retry and batch; this class reports once
        client_log = logging.getLogger("influxdb_client")
        client_log.addHandler(logging.NullHandler())
        client_log.propagate = False
        self.settings = settings
        self.precision = WritePrecision.NS
        self.limit = max(settings.influxdb_buffer_size, INFLUXDB_BATCH_SIZE)
        self.pending = 0
        self.written = 0
        self.not_written = 0
        self.first_error = None
        self.retried = False
        self.gave_up = False
        self.answered = threading.Condition()
        self.open_client()

    def open_client(self):
        """The client, and its WriteApi calling back this object with each batch's answer."""
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import WriteOptions
        from reactivex.scheduler import EventLoopScheduler
        settings = self.settings
        self.client = InfluxDBClient(url=settings.influxdb_url, token=settings.influxdb_token,
                                     org=settings.influxdb_org, timeout=30_000)
        # a daemon thread: an unreachable InfluxDB cannot hold the exit
        self.scheduler = EventLoopScheduler()
        # Each body already is a batch: batch_size=1 sends it as it is.
        self.options = WriteOptions(batch_size=1, flush_interval=1_000,
                                    write_scheduler=self.scheduler,
                                    max_close_wait=INFLUXDB_RETRIES["max_retry_time"] + 30_000,
                                    **INFLUXDB_RETRIES)
        self.write_api = self.client.write_api(write_options=self.options,
                                               success_callback=self.succeeded,
                                               error_callback=self.failed,
                                               retry_callback=self.retrying)

    def write(self, body):
        """Send one body of line protocol (bytes, as the WriteApi sends it), waiting while too much
        is unanswered."""
        points = body.count(b"\n") + 1
        with self.answered:
            self.answered.wait_for(lambda: self.gave_up or self.pending + points <= self.limit
                                   or not self.pending)
            if self.gave_up:
                self.not_written += points
                return
            self.pending += points
        self.write_api.write(bucket=self.settings.influxdb_bucket, record=body,
                             write_precision=self.precision)

    def settle(self, data, outcome, error=None):
        points = data.count(b"\n") + 1
        with self.answered:
            self.pending -= points
            if outcome == "written":
                self.written += points
            else:
                self.not_written += points
                self.first_error = self.first_error or str(error)[:300]
                self.gave_up = True
            self.answered.notify_all()

    def succeeded(self, _conf, data):
        self.settle(data, "written")

    def failed(self, _conf, data, error):
        self.settle(data, "not written", error)

    def retrying(self, _conf, _data, error):
        # raising ends this batch's retries, as the live export does after its shutdown
        if self.gave_up:
            raise ConnectionAbortedError("an earlier batch was given up; the rest is not sent")
        if not self.retried:
            self.retried = True
            print(f"InfluxDB {self.settings.influxdb_url} did not take a batch; retrying as the "
                  f"live export does, {INFLUXDB_RETRIES['max_retries']} times within "
                  f"{INFLUXDB_RETRIES['max_retry_time'] // 1000} s at most ({str(error)[:200]})",
                  flush=True)

    def close(self):
        """Wait for the answers (retries included), then count what never got one as not
        written."""
        self.write_api.close()
        with self.answered:
            self.not_written += self.pending
            self.pending = 0
        self.client.close()
        self.scheduler.dispose()

# ------------------------------------------------------------------------------------------- main


class Interrupted(BaseException):
    """A stop signal (SIGTERM, Ctrl-C, SIGHUP) arrived: the run stops where it is; its clean-up
    runs on the way out."""


def stop_on_signal(signal_number, _frame):
    ignore_stop_signals()
    raise Interrupted(signal_number)


@contextlib.contextmanager
def stop_signals_set_to(disposition):
    """Within the block the stop signals get `disposition` (SIG_IGN, SIG_DFL or a handler); after
    it, what they had."""
    previous = {number: signal.signal(number, disposition) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals():
    """From here on a signal cannot cut the clean-up short (it takes milliseconds); main()
    restores them."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def iso(epoch_seconds):
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def live_service(url):
    """(start in epoch seconds, IP:PORT address Prometheus scrapes) of the service at `url`;
    OptionError if none."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as response:
            uptime = json.load(response)["uptimeSeconds"]
        address = urlsplit(url)
        port = address.port or 80
        found = socket.getaddrinfo(address.hostname, port, socket.AF_INET, socket.SOCK_STREAM)
        ip = found[0][4][0]
    except (OSError, ValueError, KeyError) as error:
        raise OptionError(f"--live-url: no payment-api answers at {url} ({error})") from None
    return math.floor(time.time() - uptime), f"{ip}:{port}"


def check_outputs(options, settings):
    """OptionError naming the option when an output cannot be written, before any work is done."""
    if not options.openmetrics and not options.influxdb:
        raise OptionError("--openmetrics FILE or --influxdb (or both) is required")
    if options.openmetrics:
        check_file(options.openmetrics, options.force)
    if options.influxdb:
        if not settings.influxdb_url:
            raise OptionError("--influxdb: InfluxDB export is off (INFLUXDB_URL is empty)")
        try:
            import influxdb_client  # noqa: F401
        except ImportError:
            raise OptionError("--influxdb: the influxdb-client package is not installed "
                              "(pip install -r requirements.txt)") from None


def check_file(name, force):
    """OptionError unless the history can be written as `name` (--openmetrics): a new file, or
    with `force` an existing regular one, in a folder where files can be created."""
    path = os.path.abspath(name)
    if os.path.isdir(path):
        raise OptionError(f"--openmetrics: {name} is a folder")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OptionError(f"--openmetrics: {name} exists and is not a regular file")
    if os.path.exists(path) and not force:
        raise OptionError(f"--openmetrics: {name} exists; add --force to replace it")
    folder, base = os.path.split(path)
    try:  # a missing or read-only folder (or one under /proc or /sys) says so now, not later
        handle, probe = tempfile.mkstemp(prefix=f".{base}.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        if error.errno in FULL_DISK:
            raise OutputFailed(name, error) from None
        raise OptionError(f"--openmetrics: cannot create files in {folder} "
                          f"({error.strerror})") from None


def check_span(options, end):
    """OptionError unless --days holds a sample step at least and begins after 1970 began."""
    seconds = round(options.days * DAY)
    if seconds < options.step:
        raise OptionError(f"--days: {options.days:g} days ({seconds} s) is shorter than one "
                          f"sample step ({options.step} s, --step)")
    if end - seconds < 0:
        raise OptionError(f"--days: {options.days:g} days up to {iso(end)} would begin before "
                          f"{EPOCH}, where Unix time (and Prometheus') begins")


def end_and_instance(options):
    """(when the history ends, its instance label): --end or now, unless --live-url names the
    service it leads up to; OptionError if none answers there."""
    end = options.end if options.end is not None else math.floor(time.time())
    instance = options.instance
    if options.live_url:
        end, address = live_service(options.live_url)
        instance = instance or address
    return end, instance or DEFAULT_INSTANCE


def main(argv):
    """Run the backfill; a stop signal ends it with one line and exit code 128 + its number, as a
    shell reports it."""
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, handler in handlers.items():
        # ignored on purpose: SIGHUP under `nohup`, SIGINT for `command &`
        if handler is not signal.SIG_IGN:
            signal.signal(number, stop_on_signal)
    try:
        return backfill(argv)
    except Interrupted as interruption:
        name = signal.Signals(interruption.args[0]).name
        print(f"{PROG}: stopped by {name} before the history was complete", file=sys.stderr,
              flush=True)
        return 128 + interruption.args[0]
    except (WorkerLost, OutputFailed) as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def backfill(argv):
    """Read the settings and the options, plan the history, say what it holds, and run it."""
    try:
        settings = payment_api.Settings.load((), os.environ)
    except payment_api.SettingsError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    options = make_parser(settings).parse_args(argv)
    try:
        check_outputs(options, settings)
        end, options.instance = end_and_instance(options)
        check_span(options, end)
    except OptionError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    plan = make_plan(options, settings, end)
    print(f"history from {iso(plan.start)} to {iso(plan.end)}: {plan.rate:g} payments/s on "
          f"average, profile {plan.profile}, seed {plan.seed}, {len(plan.incidents)} incidents",
          flush=True)
    for incident in plan.incidents:
        print(f"incident {iso(incident.start)} {iso(incident.end)} {incident.scenario}",
              flush=True)
    return run(plan, options)


def make_plan(options, settings, end):
    start = end - round(options.days * DAY)
    incidents = () if options.no_incidents else tuple(past_incidents(options.seed, start, end))
    return Plan(settings=settings, seed=options.seed, rate=options.rate, profile=options.profile,
                start=start, end=end, step=options.step,
                chunk_seconds=chunk_seconds(options.rate, options.step), incidents=incidents,
                influx_instance=settings.instance, with_lines=options.influxdb,
                outcome_of_status=outcome_labels(settings))


def run(plan, options):
    """Draw the chunks, turn them into samples and points, report; 1 when InfluxDB did not take
    every point."""
    started = time.monotonic()
    target_labels = {**options.labels, "job": options.job, "instance": options.instance}
    writer = None
    if options.openmetrics:
        writer = OpenMetricsWriter(options.openmetrics, plan, target_labels)
    workers = Workers(plan, options.jobs) if options.jobs > 1 else None
    influx = None
    try:
        if workers:
            workers.start()
        if writer:
            writer.open_parts()
        influx = InfluxWriter(plan.settings) if options.influxdb else None
        payments, refunds = write_chunks(plan, workers, writer, influx)
        if writer:
            writer.finish()
            report_file(writer, options.openmetrics)
        if influx:
            influx.close()
            report_points(influx, plan.settings)
        seconds = time.monotonic() - started
        print(f"{payments} payments and {refunds} refunds in {seconds:.1f} s", flush=True)
        return 1 if influx and influx.not_written else 0
    except OSError as error:  # the file's writes: its disk is full, or its folder went away
        if not writer:
            raise
        raise OutputFailed(options.openmetrics, error) from None
    finally:  # after success, an error or an interruption; the last does not wait for InfluxDB
        ignore_stop_signals()
        if writer:
            writer.discard()  # all of it after an interruption, nothing after finish()
        if workers:
            workers.stop()


def write_chunks(plan, workers, writer, influx):
    """Draw every chunk, in time order, and write its points to `influx` and its samples with
    `writer` (either may be None); (payments, refunds)."""
    samples = PendingSamples(plan, writer) if writer else None
    payments = 0
    refunds = 0
    for chunk_start, chunk in chunks_in_order(plan, workers):
        rows, bodies, chunk_payments, chunk_refunds = chunk
        payments += chunk_payments
        refunds += chunk_refunds
        for body in bodies:
            influx.write(body)
        if samples:
            samples.add(chunk_start, rows)
    if samples:
        samples.write_before(math.inf)
    return payments, refunds


class PendingSamples:
    """The rows of the samples not written yet, by sample index; a sample is written once no
    later chunk can add to it."""

    def __init__(self, plan, writer):
        self.plan = plan
        self.writer = writer
        self.times = plan.sample_times()
        self.rows = {}
        self.next = 0  # the index of the first sample not written yet
        self.empty = [0] * RowLayout(plan.settings.currencies, plan.outcome_of_status).width

    def add(self, chunk_start, rows):
        """Add a chunk's rows, then write the samples before the chunk's end: later chunks only
        add later completions and refunds."""
        for index, row in rows.items():
            known = self.rows.get(index)
            self.rows[index] = row if known is None else [a + b for a, b in zip(known, row)]
        self.write_before(chunk_start + self.plan.chunk_seconds)

    def write_before(self, moment):
        while self.next < len(self.times) and self.times[self.next] < moment:
            self.writer.add_sample(self.times[self.next], self.rows.pop(self.next, self.empty))
            self.next += 1


def report_file(writer, path):
    series = sum(map(len, writer.series.values()))
    megabytes = os.path.getsize(path) / 1e6
    print(f"wrote {path}: {writer.samples} samples of {series} series, {megabytes:.1f} MB",
          flush=True)


def report_points(influx, settings):
    error = f" (first error: {influx.first_error})" if influx.first_error else ""
    print(f"InfluxDB {settings.influxdb_url} bucket {settings.influxdb_bucket}: "
          f"{influx.written} points written, {influx.not_written} not written{error}", flush=True)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # After a stop signal the WriteApi is not closed, and its threads are no daemons: they would
    # hold the exit. Every point is written or counted by now, so nothing is left to wait for.
    os._exit(exit_code)
