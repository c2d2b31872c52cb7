"""History on demand: days of simulated payments and refunds for Prometheus (an OpenMetrics file) and InfluxDB.

Run it through the service: `python payment_api.py backfill --days 7 --openmetrics history.om --influxdb`
(`--help` lists every option). The payments come from the simulator's own draws in payment_api.py, made without
its objects in the hot loop (millions of payments; test_history checks they stay the same draws and points); the
file becomes Prometheus blocks with `promtool tsdb create-blocks-from openmetrics --max-block-duration=87600h FILE DIR`.

The history is a pure function of the seed and the time: each hour (a "chunk") draws its payments from a
random generator seeded with the seed and the chunk's start, so separate runs for Prometheus and InfluxDB, any
number of worker processes, and a longer --days all give the same payments for the same moment. The refunds of a
chunk's payments come from a second generator seeded the same way, as the live simulator makes them: a few minutes
later, possibly in a later chunk, and not at all when that is after the end.
"""
import argparse
import bisect
import contextlib
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

PROG = "payment_api.py backfill"
DAY = 86400
MAX_DAYS = 31
DEFAULT_STEP = 60  # seconds between samples: 5 samples in every [5m] window of the dashboard and the alerts
MAX_STEP = 150  # rate(x[5m]) needs 2 samples in each window
DEFAULT_SEED = 1
DEFAULT_JOB = "payment-api"  # the scrape job of prometheus/prometheus.yml and prometheus.local.yml
DEFAULT_INSTANCE = "localhost:8080"  # the target of prometheus.local.yml (compose passes --live-url)
DEFAULT_LABELS = "service=payment-api,environment=training"  # and its labels (prometheus.yml gives the same)
CHUNK_PAYMENTS = 20_000  # payments a chunk holds at most on average: bounds each worker's memory
INCIDENT_SLOT = 8 * 3600  # one past incident in each 8-hour slot of the UTC clock
INCIDENT_KINDS = ("error_spike", "latency_degradation", "outage", "currency_outage", "decline_wave")  # in turn
INCIDENT_MINUTES = {"outage": (5, 10)}  # shortest and longest; the others run 15-30 minutes, long enough to alert
INFLUXDB_BATCH_SIZE = 5000  # lines per write; InfluxData's recommended batch
INFLUXDB_RETRIES = payment_api.InfluxExporter.RETRIES  # as the live export retries
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

# ---------------------------------------------------------------- options


class OptionError(Exception):
    """An option the backfill cannot use; the message names it."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the option, exit 2 (argparse's default adds the whole usage)."""
        self.exit(2, f"{self.prog}: {message}\n")


def checked(kind, low, high, what):
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
    """ISO-8601 time (Z or an offset; no offset means UTC) as whole epoch seconds, not in the future."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO-8601 UTC time like 2026-11-20T06:00:00Z, not {text!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    end = math.floor(moment.timestamp())
    if end > time.time() + 1:
        raise argparse.ArgumentTypeError(f"{text!r} is in the future; the history ends at the latest now")
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
        raise argparse.ArgumentTypeError(f"must divide a day (86400 s), so a sample falls on midnight; {step} does not")
    return step


def make_parser(settings):
    default_rate = settings.simulation_rate or payment_api.Settings().simulation_rate  # 0 (simulator off) is no rate
    parser = Parser(prog=PROG, description="Write days of simulated payments as an OpenMetrics file for promtool "
                    "and/or as InfluxDB points, so 24-hour and 7-day views have history.",
                    epilog="INFLUXDB_URL, INFLUXDB_TOKEN, INFLUXDB_ORG, INFLUXDB_BUCKET, INSTANCE, CURRENCIES, "
                    "PAYMENT_FAILURE_RATE and SIMULATION_RATE are read as the service reads them.")
    parser.add_argument("--days", type=checked(float, 0, MAX_DAYS, f"days greater than 0 and at most {MAX_DAYS}"),
                        default=7.0, help=f"length of the history in days, fractions allowed, at most {MAX_DAYS} "
                        "(default 7)")
    ends = parser.add_mutually_exclusive_group()
    ends.add_argument("--end", type=parse_end, default=None,
                      help="when the history ends, ISO-8601 UTC like 2026-11-20T06:00:00Z (default now)")
    ends.add_argument("--live-url", metavar="URL", help="the running service the history leads up to: end where it "
                      "started (its /health uptime); its IP:PORT is the default --instance, as DNS discovery "
                      "in compose scrapes it")
    parser.add_argument("--openmetrics", metavar="FILE", help="write the metrics' history to FILE (it appears "
                        "under that name only when complete)")
    parser.add_argument("--influxdb", action="store_true", help="write one point a payment and one a refund to "
                        "the InfluxDB of the INFLUXDB_* settings, exactly like the live export")
    parser.add_argument("--seed", type=int, default=settings.simulation_seed if settings.simulation_seed is not None
                        else DEFAULT_SEED, help="same seed, same history, byte for byte (default SIMULATION_SEED, "
                        f"else {DEFAULT_SEED})")
    parser.add_argument("--rate", type=checked(float, 0, payment_api.MAX_SIMULATION_RATE,
                                               f"payments per second above 0, at most "
                                               f"{payment_api.MAX_SIMULATION_RATE:g}"),
                        default=default_rate, help=f"average payments per second (default SIMULATION_RATE, "
                        f"{default_rate:g})")
    parser.add_argument("--profile", choices=payment_api.PROFILES, default="diurnal",
                        help="traffic shape; diurnal has a 24-hour period: quiet at 00:00 UTC, busiest at 12:00 "
                        "(default diurnal)")
    parser.add_argument("--no-incidents", action="store_true",
                        help="no past incidents (by default one runs in every 8 hours)")
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job label of every series (default {DEFAULT_JOB})")
    parser.add_argument("--instance", default=None,
                        help=f"instance label of every series: the scraped address, as in prometheus.local.yml "
                        f"(default {DEFAULT_INSTANCE}, or the IP:PORT of --live-url)")
    parser.add_argument("--labels", type=parse_labels, default=parse_labels(DEFAULT_LABELS),
                        help=f"the scrape config's static labels, NAME=VALUE,... (default {DEFAULT_LABELS}; "
                        "empty for none)")
    parser.add_argument("--step", type=parse_step, default=DEFAULT_STEP,
                        help=f"seconds between samples in the file (default {DEFAULT_STEP})")
    parser.add_argument("--jobs", type=checked(int, 0, 64, "a whole number from 1 to 64"),
                        default=min(os.cpu_count() or 1, 4), help="worker processes drawing payments "
                        "(default: the CPUs, at most 4); the output does not depend on it")
    return parser

# ---------------------------------------------------------------- the plan: time range, samples, incidents


@dataclass(frozen=True)
class Incident:
    scenario: str
    start: int
    end: int


def past_incidents(seed, start, end):
    """One incident in each 8-hour slot of the UTC clock that lies wholly in [start, end], the kinds in turn."""
    incidents = []
    for slot in range(start // INCIDENT_SLOT, end // INCIDENT_SLOT + 1):
        rng = random.Random(f"payment-api incidents {seed} {slot}")
        scenario = INCIDENT_KINDS[(slot + seed) % len(INCIDENT_KINDS)]
        shortest, longest = INCIDENT_MINUTES.get(scenario, (15, 30))
        minutes = rng.randint(shortest, longest)
        begins = slot * INCIDENT_SLOT + 60 * rng.randint(60, (INCIDENT_SLOT // 60) - 60 - minutes)
        if start <= begins and begins + 60 * minutes <= end:
            incidents.append(Incident(scenario, begins, begins + 60 * minutes))
    return incidents


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

    def sample_times(self):
        """Samples at every multiple of the step from the start, and one at the end."""
        times = range(self.first_sample(), self.end + 1, self.step)
        return [*times, self.end] if not times or times[-1] != self.end else list(times)

    def effects_at(self, moment):
        for incident in self.incidents:
            if incident.start <= moment < incident.end:
                return payment_api.SCENARIOS[incident.scenario][1]
        return NO_EFFECTS

    def rate_at(self, moment, effects):
        """Payments per second at `moment`; diurnal follows the UTC clock, quiet at midnight, busiest at noon."""
        elapsed = moment % DAY if self.profile == "diurnal" else moment
        return self.rate * payment_api.profile_factor(self.profile, elapsed, DAY) * effects.rate_factor


NO_EFFECTS = payment_api.Effects()


def live_metrics(settings):
    """A fresh PaymentMetrics of the live service: the names, types, help and labels the history copies."""
    stats = payment_api.PaymentStats(settings.currencies, time.time)
    return payment_api.PaymentMetrics(settings.currencies, stats, payment_api.ScenarioBoard(settings, time.time))


def outcome_labels(settings):
    """{HTTP status: status label} that the live PaymentMetrics.record_payment gives each outcome's histograms."""
    request = payment_api.draw_request(random.Random(0), settings.currencies)
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
    """An hour, or fewer whole steps when an hour would hold more than CHUNK_PAYMENTS payments at the busiest."""
    steps = max(1, min(3600 // step, int(CHUNK_PAYMENTS / (rate * 1.8 * step))))
    return steps * step

# ---------------------------------------------------------------- drawing payments (in worker processes)


class RowLayout:
    """Offsets of the counts one sample interval adds, in a flat list (cheap to pickle between processes).

    `outcome_of_status` is {HTTP status: status label of the histograms}, as the live metrics label a payment.
    """

    def __init__(self, currencies, outcome_of_status):
        self.currencies = currencies
        self.status = {int(status): number for number, status in enumerate(OUTCOME_STATUSES)}
        self.type = {name: number for number, name in enumerate(PAYMENT_TYPES)}
        self.currency = {code: number for number, code in enumerate(currencies)}
        self.outcomes = tuple(dict.fromkeys(outcome_of_status.values()))  # e.g. success, failed
        self.outcome = {status: self.outcomes.index(label) for status, label in outcome_of_status.items()}
        count, outcomes = len(currencies), len(self.outcomes)
        self.requests = 0  # [status][type][currency]
        self.amount_buckets = self.requests + len(OUTCOME_STATUSES) * len(PAYMENT_TYPES) * count  # [cur][out][le]
        self.amount_sums = self.amount_buckets + count * outcomes * (len(AMOUNT_BUCKETS) + 1)  # [currency][outcome]
        self.duration_buckets = self.amount_sums + count * outcomes  # [outcome][le]
        self.duration_sums = self.duration_buckets + outcomes * (len(DURATION_BUCKETS) + 1)  # [outcome]
        self.revenue = self.duration_sums + outcomes  # [currency], completed payments only
        self.active = self.revenue + count  # payments started minus payments completed
        self.refund_buckets = self.active + 1  # [currency][le]; the +Inf bucket is payment_refunds_total too
        self.refund_sums = self.refund_buckets + count * (len(AMOUNT_BUCKETS) + 1)  # [currency]
        self.width = self.refund_sums + count

    def request_slot(self, status, payment_type, currency):
        return ((self.status[status] * len(PAYMENT_TYPES) + self.type[payment_type]) * len(self.currencies)
                + self.currency[currency])

    def amount_slot(self, currency, outcome, bucket):
        return (self.amount_buckets + (self.currency[currency] * len(self.outcomes) + outcome)
                * (len(AMOUNT_BUCKETS) + 1) + bucket)

    def amount_sum_slot(self, currency, outcome):
        return self.amount_sums + self.currency[currency] * len(self.outcomes) + outcome

    def duration_slot(self, outcome, bucket):
        return self.duration_buckets + outcome * (len(DURATION_BUCKETS) + 1) + bucket

    def refund_slot(self, currency, bucket):
        return self.refund_buckets + self.currency[currency] * (len(AMOUNT_BUCKETS) + 1) + bucket

    def refund_sum_slot(self, currency):
        return self.refund_sums + self.currency[currency]

    def failed_slots(self):
        """The request counts of payments the failure rate counts as failed: 5xx, as PaymentStats does."""
        return [self.request_slot(int(status), payment_type, currency) for status in OUTCOME_STATUSES
                if int(status) >= 500 for payment_type in PAYMENT_TYPES for currency in self.currencies]

    def histograms(self):
        """(first bucket slot, bucket count) of every labelled histogram, for turning counts into cumulative ones."""
        outcomes = range(len(self.outcomes))
        amounts = [(self.amount_slot(currency, outcome, 0), len(AMOUNT_BUCKETS) + 1)
                   for currency in self.currencies for outcome in outcomes]
        refunds = [(self.refund_slot(currency, 0), len(AMOUNT_BUCKETS) + 1) for currency in self.currencies]
        return (amounts + [(self.duration_slot(outcome, 0), len(DURATION_BUCKETS) + 1) for outcome in outcomes]
                + refunds)


class PaymentSlots(NamedTuple):
    """Where draw_chunk counts a payment of one status, type and currency (RowLayout offsets), and the tags of
    its point after customer_id. Unpacked in the loop: a tuple is the cheapest to unpack millions of times."""
    request: int
    first_amount_bucket: int
    amount_sum: int
    revenue: Optional[int]  # completed payments only
    first_duration_bucket: int
    duration_sum: int
    tags: str


def outcome_requests(currencies):
    """{(currency, type, method): the PaymentRequest draw_outcome gets}: it reads only those three and the decline
    code (None for drawn requests), so one request a combination serves every payment. Amount and customer are
    None: if draw_outcome ever reads them, it fails here instead of drawing something else."""
    return {(currency, payment_type, method): payment_api.PaymentRequest(None, currency, payment_type, None, method)
            for currency in currencies for payment_type in PAYMENT_TYPES for method in payment_api.PAYMENT_METHODS}


def point_statuses():
    """{HTTP status: the status tag the live export gives a payment}, read from payment_api.Payment.outcome."""
    return {int(status): payment_api.Payment("", None, "history", 0.0, int(status)).outcome
            for status in OUTCOME_STATUSES}


def draw_chunk(plan, chunk_start):
    """The payments arriving in [chunk_start, chunk_start + chunk_seconds) that complete by the end, and their
    refunds that are due by the end.

    Returns ({sample index: what completed in that interval, laid out by RowLayout}, [InfluxDB bodies as bytes],
    payments, refunds). Both are counted when they happen, as PaymentMetrics.record_payment and record_refund count
    them live; a refund can fall into a sample interval of a later chunk. The points are the lines
    payment_api.payment_line and refund_line write, built here without a Payment (test_history compares them).
    """
    settings, layout = plan.settings, RowLayout(plan.settings.currencies, plan.outcome_of_status)
    rng = random.Random(f"payment-api history {plan.seed} {chunk_start}")
    refund_rng = random.Random(f"payment-api refunds {plan.seed} {chunk_start}")
    chunk_end = min(chunk_start + plan.chunk_seconds, plan.end)
    incidents = [incident for incident in plan.incidents
                 if incident.start < chunk_end + 1 and incident.end > chunk_start]

    def effects_at(moment):
        for incident in incidents:
            if incident.start <= moment < incident.end:
                return payment_api.SCENARIOS[incident.scenario][1]
        return NO_EFFECTS

    first_sample, step, start, end = plan.first_sample(), plan.step, plan.start, plan.end
    currencies = settings.currencies
    requests = outcome_requests(currencies)
    point_status = point_statuses()
    with_lines, instance = plan.with_lines, plan.influx_instance
    slots = {}  # (status, type, currency) -> PaymentSlots
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
                    tags=f"instance={instance},payment_type={payment_type},status={point_status[status]}")
    refund_slots = {currency: (layout.refund_slot(currency, 0), layout.refund_sum_slot(currency))
                    for currency in layout.currency}
    active, width = layout.active, layout.width
    find_bucket, draw_outcome, draw_refund = bisect.bisect_left, payment_api.draw_outcome, payment_api.draw_refund
    draw_request_fields = payment_api.draw_request_fields
    rows, lines, bodies, payments, refunds = {}, [], [], 0, 0
    # The scenario's effects and the rate, once for each second: incidents begin and end on whole minutes, the
    # rate changes slowly, and working it out for every payment would cost a tenth of the time
    seconds = range(chunk_start, chunk_end)
    effects_by_second = [effects_at(second) for second in seconds]
    rate_by_second = [plan.rate_at(second, effects) for second, effects in zip(seconds, effects_by_second)]
    arrival = chunk_start + rng.expovariate(rate_by_second[0])
    while arrival < chunk_end:
        second = int(arrival) - chunk_start
        effects = effects_by_second[second]
        amount, currency, payment_type, customer_id, method = draw_request_fields(rng, currencies)
        status, processing_time, _ = draw_outcome(rng, requests[currency, payment_type, method], settings, effects)
        completed = arrival + processing_time
        if arrival >= start and completed <= end:
            payments += 1
            index = -int((first_sample - completed) // step)  # the first sample at or after completion
            row = rows.get(index) or rows.setdefault(index, [0] * width)
            request, first_amount_bucket, amount_sum, revenue, first_duration_bucket, duration_sum, tags = slots[
                status, payment_type, currency]
            row[request] += 1
            row[first_amount_bucket + find_bucket(AMOUNT_BUCKETS, amount)] += 1
            row[amount_sum] += amount
            row[first_duration_bucket + find_bucket(DURATION_BUCKETS, processing_time)] += 1
            row[duration_sum] += processing_time
            if revenue is not None:
                row[revenue] += amount
            started = -int((first_sample - arrival) // step)
            if started != index:  # in flight at the samples from `started` up to (not including) `index`
                row[active] -= 1
                (rows.get(started) or rows.setdefault(started, [0] * width))[active] += 1
            if with_lines:
                lines.append(f"payment,currency={currency},customer_id={customer_id},{tags} amount={amount!r},"
                             f"processing_time={processing_time!r} {int(completed * 1e9)}")
            refund = status == 200 and draw_refund(refund_rng, amount)
            if refund and completed + refund[0] <= end:
                refunds += 1
                refunded_at = completed + refund[0]
                refund_amount = float(refund[1] or amount)
                refund_buckets, refund_sum = refund_slots[currency]
                index = -int((first_sample - refunded_at) // step)
                row = rows.get(index) or rows.setdefault(index, [0] * width)
                row[refund_buckets + find_bucket(AMOUNT_BUCKETS, refund_amount)] += 1
                row[refund_sum] += refund_amount
                if with_lines:
                    lines.append(f"refund,currency={currency},customer_id={customer_id},instance={instance},"
                                 f"payment_type={payment_type} amount={refund_amount!r} {int(refunded_at * 1e9)}")
            if len(lines) >= INFLUXDB_BATCH_SIZE:
                bodies.append("\n".join(lines).encode())
                lines = []
        arrival += rng.expovariate(rate_by_second[second])
    if lines:
        bodies.append("\n".join(lines).encode())
    return rows, bodies, payments, refunds


def chunk_starts(plan):
    """The start of every chunk: on whole multiples of chunk_seconds, the first at or before the start."""
    return range(plan.start // plan.chunk_seconds * plan.chunk_seconds, plan.end, plan.chunk_seconds)


def chunks_in_order(plan, workers):
    """(chunk start, draw_chunk's result) for every chunk in time order; each worker keeps one chunk ahead."""
    starts = chunk_starts(plan)
    if workers is None:
        yield from ((start, draw_chunk(plan, start)) for start in starts)
        return
    waiting = deque()
    for number, start in enumerate(starts):
        workers.send(number, start)
        waiting.append((number, start))
        if len(waiting) > workers.jobs:  # bounded: a slow InfluxDB must not make results pile up here
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
    """Processes that draw chunks: chunk number N goes to worker N % jobs through that worker's own pipe.

    A worker answers its chunks in the order it gets them, so reading the answers in turn keeps them in time order.
    Nothing is shared but the pipes: a worker that dies is an error here (not a hang), and a worker whose parent
    died ends at its next read or write.
    """

    def __init__(self, plan, jobs):
        self.plan = plan
        self.jobs = jobs
        self.processes = []  # start() creates them; stop() ends whatever it created
        self.connections = []

    def start(self):
        context = multiprocessing.get_context("spawn")  # new interpreters, not forks of this one and its threads
        # A terminal's Ctrl-C, a closed terminal's SIGHUP and `timeout`'s SIGTERM go to every process of the
        # command. A process spawned while a signal is ignored keeps ignoring it, so only this one acts on them.
        # One sent in the few milliseconds this takes is lost.
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
    """A worker's loop: draw each chunk whose start it receives, and send the result back, until its parent goes."""
    try:
        while True:
            connection.send(draw_chunk(plan, connection.recv()))
    except (EOFError, OSError):  # the parent closed its end, or died
        pass

# ---------------------------------------------------------------- OpenMetrics: one temporary file a family


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels):
    def escaped(value):
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{name}="{escaped(value)}"' for name, value in sorted(labels.items())) + "}"


class OpenMetricsWriter:
    """Writes each metric family to its own temporary file while the samples come in time order, then joins them.

    OpenMetrics wants each family in one piece; the samples arrive a moment at a time. The final name appears
    only by a rename when the file is complete, so a half-written file never looks finished.
    """

    def __init__(self, path, plan, target_labels):
        self.path = path
        self.plan = plan
        self.layout = RowLayout(plan.settings.currencies, plan.outcome_of_status)
        self.failed_slots = self.layout.failed_slots()
        self.families = self.describe_families(plan.settings)
        folder, name = os.path.split(os.path.abspath(path))
        hidden = os.path.join(folder, f".{name}.{secrets.token_hex(4)}")
        self.parts_folder = hidden + ".parts"  # only names so far: open_parts() creates, discard() deletes
        self.joined_path = hidden + ".tmp"
        self.files = {}
        self.series = self.make_series(target_labels)
        self.totals = [0] * self.layout.width
        self.histograms = self.layout.histograms()
        self.samples = 0

    def open_parts(self):
        """Create the folder of the parts and a file for each family in it."""
        os.mkdir(self.parts_folder)
        for name in self.families:
            self.files[name] = open(os.path.join(self.parts_folder, name), "w", encoding="utf-8", buffering=1 << 20)

    @staticmethod
    def describe_families(settings):
        """{family: (type, help)} read from the live service's own registry, so names and help cannot drift."""
        metrics = live_metrics(settings)
        wanted = ("payment_requests", "payment_amount", "payment_duration_seconds", "payment_refunds",
                  "payment_refund_amount", "payment_daily_revenue", "payment_failure_rate", "active_payments",
                  "payment_scenario_active", "payment_simulation_rate")
        families = {family.name: (family.type, family.documentation) for family in metrics.registry.collect()
                    if family.name in wanted}
        families["up"] = ("gauge", "1 when the last scrape of the target succeeded (the history was always up)")
        return families

    def make_series(self, target_labels):
        """{family: [(line prefix, slot of its value in the vector add_sample builds)]} for every live series."""
        layout, currencies = self.layout, self.plan.settings.currencies
        self.extra = {name: layout.width + number for number, name in enumerate(
            ("failure_rate", "rate", "up", *(f"scenario {name}" for name in payment_api.SCENARIOS)))}

        def prefix(name, **labels):
            return name + label_text({**target_labels, **labels}) + " "

        series = {name: [] for name in self.families}
        for status in OUTCOME_STATUSES:
            for payment_type in PAYMENT_TYPES:
                for currency in currencies:
                    series["payment_requests"].append((
                        prefix("payment_requests_total", method="POST", status=status, type=payment_type,
                               currency=currency), layout.request_slot(int(status), payment_type, currency)))
        for currency in currencies:
            for outcome, label in enumerate(layout.outcomes):
                series["payment_amount"] += self.histogram_series(
                    prefix, "payment_amount", {"currency": currency, "status": label}, AMOUNT_BUCKETS,
                    layout.amount_slot(currency, outcome, 0), layout.amount_sum_slot(currency, outcome))
        for outcome, label in enumerate(layout.outcomes):
            series["payment_duration_seconds"] += self.histogram_series(
                prefix, "payment_duration_seconds", {"status": label}, DURATION_BUCKETS,
                layout.duration_slot(outcome, 0), layout.duration_sums + outcome)
        for currency in currencies:  # the live amounts of a currency appear with its first refund; these at once
            series["payment_refunds"].append((prefix("payment_refunds_total", currency=currency),
                                              layout.refund_slot(currency, len(AMOUNT_BUCKETS))))
            series["payment_refund_amount"] += self.histogram_series(
                prefix, "payment_refund_amount", {"currency": currency}, AMOUNT_BUCKETS,
                layout.refund_slot(currency, 0), layout.refund_sum_slot(currency))
        series["payment_daily_revenue"] = [(prefix("payment_daily_revenue", currency=currency), layout.revenue + number)
                                           for number, currency in enumerate(currencies)]
        series["payment_failure_rate"] = [(prefix("payment_failure_rate"), self.extra["failure_rate"])]
        series["active_payments"] = [(prefix("active_payments"), layout.active)]
        series["payment_scenario_active"] = [(prefix("payment_scenario_active", scenario=name),
                                              self.extra[f"scenario {name}"]) for name in payment_api.SCENARIOS]
        series["payment_simulation_rate"] = [(prefix("payment_simulation_rate"), self.extra["rate"])]
        series["up"] = [(prefix("up"), self.extra["up"])]
        return series

    @staticmethod
    def histogram_series(prefix, name, labels, bounds, first_bucket, sum_slot):
        """Buckets (le written as the live client writes it), _count and _sum of one labelled histogram."""
        rows = [(prefix(name + "_bucket", **labels, le=floatToGoString(bound)), first_bucket + number)
                for number, bound in enumerate((*bounds, math.inf))]
        return rows + [(prefix(name + "_count", **labels), first_bucket + len(bounds)),
                       (prefix(name + "_sum", **labels), sum_slot)]

    def add_sample(self, moment, row):
        """The value of every series at `moment`, given what the sample interval ending there added."""
        layout, totals = self.layout, self.totals
        for slot, value in enumerate(row):
            totals[slot] += value
        if moment % DAY == 0:  # the UTC day's revenue starts again at 0 at midnight
            for number in range(len(self.plan.settings.currencies)):
                totals[layout.revenue + number] = 0
        values = totals + [0] * len(self.extra)
        for first, count in self.histograms:  # buckets are cumulative: le="0.1" counts everything up to 0.1
            values[first:first + count] = itertools.accumulate(totals[first:first + count])
        requests = row[:layout.amount_buckets]
        completed = sum(requests)
        failed = sum(row[slot] for slot in self.failed_slots)
        values[self.extra["failure_rate"]] = 100.0 * failed / completed if completed else 0.0
        values[self.extra["rate"]] = self.plan.rate_at(moment, self.plan.effects_at(moment))
        values[self.extra["up"]] = 1
        for incident in self.plan.incidents:
            if incident.start <= moment < incident.end:
                values[self.extra[f"scenario {incident.scenario}"]] = 1
        stamp = f" {moment}\n"
        for family, series in self.series.items():
            self.files[family].write("".join([f"{text}{values[slot]}{stamp}" for text, slot in series]))
        self.samples += 1

    def finish(self):
        """Join the families into the file under a temporary name, add # EOF, rename it into place."""
        with open(self.joined_path, "wb") as joined:
            for name, part in self.files.items():
                kind, documentation = self.families[name]
                joined.write(f"# HELP {name} {escape_help(documentation)}\n# TYPE {name} {kind}\n".encode())
                part.close()
                with open(part.name, "rb") as source:
                    append_file(source, joined)
            joined.write(b"# EOF\n")
        os.replace(self.joined_path, self.path)
        self.discard()

    def discard(self):
        """Delete whatever temporary files exist under this writer's names, then close the parts.

        It goes by name, not by what was recorded, so an interruption at any moment (even between creating a file
        and noting it) leaves nothing behind, and a failing close (a full disk) comes too late to keep a file.
        """
        shutil.rmtree(self.parts_folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.joined_path)
        for part in self.files.values():
            with contextlib.suppress(OSError):
                part.close()


def append_file(source, target):
    """Copy the open file `source` to the end of the open file `target`: in the kernel where it can (Linux; a 7-day
    file is 470 MB), else through a buffer."""
    target.flush()
    try:
        while os.copy_file_range(source.fileno(), target.fileno(), 1 << 30):
            pass
    except (AttributeError, OSError):  # the kernel cannot or will not copy it: the rest goes through Python
        shutil.copyfileobj(source, target, 1 << 20)

# ---------------------------------------------------------------- InfluxDB: the batching WriteApi, bounded


class InfluxWriter:
    """Sends bodies of line protocol through influxdb-client's batching WriteApi, retried like the live export.

    The WriteApi queues without limit, so write() waits while INFLUXDB_BUFFER_SIZE points are unanswered.
    Once a batch is given up (retries spent, or refused), the rest is counted as not written without being sent:
    an InfluxDB that is down for good costs one batch's retries, not every batch's.
    """

    def __init__(self, settings):
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import WriteOptions
        from reactivex.scheduler import EventLoopScheduler
        client_log = logging.getLogger("influxdb_client")  # it logs every retry and batch; this class reports once
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
        self.client = InfluxDBClient(url=settings.influxdb_url, token=settings.influxdb_token,
                                     org=settings.influxdb_org, timeout=30_000)
        self.scheduler = EventLoopScheduler()  # a daemon thread: an unreachable InfluxDB cannot hold the exit
        # Each body already is a batch: batch_size=1 sends it as it is.
        self.options = WriteOptions(batch_size=1, flush_interval=1_000, write_scheduler=self.scheduler,
                                    max_close_wait=INFLUXDB_RETRIES["max_retry_time"] + 30_000, **INFLUXDB_RETRIES)
        self.write_api = self.client.write_api(write_options=self.options, success_callback=self.succeeded,
                                               error_callback=self.failed, retry_callback=self.retrying)

    def write(self, body):
        """Send one body of line protocol (bytes, as the WriteApi sends it), waiting while too much is unanswered."""
        points = body.count(b"\n") + 1
        with self.answered:
            self.answered.wait_for(lambda: self.gave_up or self.pending + points <= self.limit or not self.pending)
            if self.gave_up:
                self.not_written += points
                return
            self.pending += points
        self.write_api.write(bucket=self.settings.influxdb_bucket, record=body, write_precision=self.precision)

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
        if self.gave_up:  # raising ends this batch's retries, as the live export does after its shutdown
            raise ConnectionAbortedError("an earlier batch was given up; the rest is not sent")
        if not self.retried:
            self.retried = True
            print(f"InfluxDB {self.settings.influxdb_url} did not take a batch; retrying as the live export does, "
                  f"{INFLUXDB_RETRIES['max_retries']} times within {INFLUXDB_RETRIES['max_retry_time'] // 1000} s at "
                  f"most ({str(error)[:200]})", flush=True)

    def close(self):
        """Wait for the answers (retries included), then count what never got one as not written."""
        self.write_api.close()
        with self.answered:
            self.not_written += self.pending
            self.pending = 0
        self.client.close()
        self.scheduler.dispose()

# ---------------------------------------------------------------- main


class Interrupted(BaseException):
    """A stop signal (SIGTERM, Ctrl-C, SIGHUP) arrived: the run stops where it is; its clean-up runs on the way out."""


def stop_on_signal(signal_number, _frame):
    ignore_stop_signals()
    raise Interrupted(signal_number)


@contextlib.contextmanager
def stop_signals_set_to(disposition):
    """Within the block the stop signals get `disposition` (SIG_IGN, SIG_DFL or a handler); after it, what they had."""
    previous = {number: signal.signal(number, disposition) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals():
    """From here on a signal cannot cut the clean-up short (it takes milliseconds); main() restores them."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def iso(epoch_seconds):
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def live_service(url):
    """(start in epoch seconds, IP:PORT address Prometheus scrapes) of the service at `url`; OptionError if none."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as response:
            uptime = json.load(response)["uptimeSeconds"]
        address = urlsplit(url)
        ip = socket.getaddrinfo(address.hostname, address.port or 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, ValueError, KeyError) as error:
        raise OptionError(f"--live-url: no payment-api answers at {url} ({error})") from None
    return math.floor(time.time() - uptime), f"{ip}:{address.port or 80}"


def check_outputs(options, settings):
    """OptionError naming the option when an output cannot be written, before any work is done."""
    if not options.openmetrics and not options.influxdb:
        raise OptionError("--openmetrics FILE or --influxdb (or both) is required")
    if options.openmetrics:
        path = os.path.abspath(options.openmetrics)
        if os.path.isdir(path) or not os.access(os.path.dirname(path), os.W_OK):
            raise OptionError(f"--openmetrics: cannot write {options.openmetrics} (its folder is missing or not "
                              "writable, or it is a folder)")
    if options.influxdb:
        if not settings.influxdb_url:
            raise OptionError("--influxdb: InfluxDB export is off (INFLUXDB_URL is empty)")
        try:
            import influxdb_client  # noqa: F401
        except ImportError:
            raise OptionError("--influxdb: the influxdb-client package is not installed "
                              "(pip install -r requirements.txt)") from None


def main(argv):
    """Run the backfill; a stop signal ends it with one line and exit code 128 + its number, as a shell reports it."""
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, handler in handlers.items():
        if handler is not signal.SIG_IGN:  # ignored on purpose: SIGHUP under `nohup`, SIGINT for `command &`
            signal.signal(number, stop_on_signal)
    try:
        return backfill(argv)
    except Interrupted as interruption:
        number = interruption.args[0]
        print(f"{PROG}: stopped by {signal.Signals(number).name} before the history was complete", file=sys.stderr,
              flush=True)
        return 128 + number
    except WorkerLost as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def backfill(argv):
    try:
        settings = payment_api.Settings.load((), os.environ)
    except payment_api.SettingsError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    options = make_parser(settings).parse_args(argv)
    try:
        check_outputs(options, settings)
    except OptionError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    end = options.end if options.end is not None else math.floor(time.time())
    if options.live_url:
        try:
            end, address = live_service(options.live_url)
        except OptionError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return 2
        options.instance = options.instance or address
    options.instance = options.instance or DEFAULT_INSTANCE
    start = end - round(options.days * DAY)
    incidents = () if options.no_incidents else tuple(past_incidents(options.seed, start, end))
    plan = Plan(settings=settings, seed=options.seed, rate=options.rate, profile=options.profile, start=start,
                end=end, step=options.step, chunk_seconds=chunk_seconds(options.rate, options.step),
                incidents=incidents, influx_instance=settings.instance, with_lines=options.influxdb,
                outcome_of_status=outcome_labels(settings))
    print(f"history from {iso(start)} to {iso(end)}: {options.rate:g} payments/s on average, profile "
          f"{options.profile}, seed {options.seed}, {len(incidents)} incidents", flush=True)
    for incident in incidents:
        print(f"incident {iso(incident.start)} {iso(incident.end)} {incident.scenario}", flush=True)
    return run(plan, options)


def run(plan, options):
    """Draw the chunks, turn them into samples and points, report; 1 when InfluxDB did not take every point."""
    started = time.monotonic()
    target_labels = {**options.labels, "job": options.job, "instance": options.instance}
    writer = OpenMetricsWriter(options.openmetrics, plan, target_labels) if options.openmetrics else None
    workers = Workers(plan, options.jobs) if options.jobs > 1 else None
    influx = None
    payments, refunds, waiting_rows, next_sample = 0, 0, {}, 0
    try:
        if workers:
            workers.start()
        if writer:
            writer.open_parts()
        influx = InfluxWriter(plan.settings) if options.influxdb else None
        times = plan.sample_times()
        empty = [0] * RowLayout(plan.settings.currencies, plan.outcome_of_status).width
        for chunk_start, (rows, bodies, chunk_payments, chunk_refunds) in chunks_in_order(plan, workers):
            payments += chunk_payments
            refunds += chunk_refunds
            for body in bodies:
                influx.write(body)
            if writer:
                for index, row in rows.items():
                    known = waiting_rows.get(index)
                    waiting_rows[index] = row if known is None else [a + b for a, b in zip(known, row)]
                final_before = chunk_start + plan.chunk_seconds  # later chunks only add later completions and refunds
                while next_sample < len(times) and times[next_sample] < final_before:
                    writer.add_sample(times[next_sample], waiting_rows.pop(next_sample, empty))
                    next_sample += 1
        if writer:
            while next_sample < len(times):
                writer.add_sample(times[next_sample], waiting_rows.pop(next_sample, empty))
                next_sample += 1
            writer.finish()
            print(f"wrote {options.openmetrics}: {writer.samples} samples of {sum(map(len, writer.series.values()))}"
                  f" series, {os.path.getsize(options.openmetrics) / 1e6:.1f} MB", flush=True)
        if influx:
            influx.close()
            print(f"InfluxDB {plan.settings.influxdb_url} bucket {plan.settings.influxdb_bucket}: "
                  f"{influx.written} points written, {influx.not_written} not written"
                  + (f" (first error: {influx.first_error})" if influx.first_error else ""), flush=True)
        print(f"{payments} payments and {refunds} refunds in {time.monotonic() - started:.1f} s", flush=True)
        return 1 if influx and influx.not_written else 0
    finally:  # after success, an error or an interruption; the last does not wait for InfluxDB's answers
        ignore_stop_signals()
        if writer:
            writer.discard()  # all of it after an interruption, nothing after finish()
        if workers:
            workers.stop()
