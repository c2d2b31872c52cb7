"""Students' alert rules and dashboards, checked against what really happened.

An extra beside payment_api.py for trainers and students (docs/exercises.md). It reads nothing but
a real Prometheus, over its HTTP API:

- the answer key: every incident of a window is a run of `payment_scenario_active` (live,
  scheduled or backfilled), and the alerts that fired during it are Prometheus's `ALERTS` series;
- a rule file, scored: each alerting rule's expression is evaluated with query_range at its
  group's interval, `for` and `keep_firing_for` are applied as Prometheus's rule manager applies
  them, and the time it fired is laid over the incidents;
- a dashboard, checked: every Prometheus query of every panel runs with its variables at All and
  at each single value, and the course's asks are looked for.

answer_key(), score_alert_rules() and check_dashboard() return what `--json` prints. A document
Prometheus or Grafana would refuse raises DocumentError; an unreachable Prometheus,
PrometheusError.

    python exercises.py incidents [--since 7d]
    python exercises.py alerts RULES.yml [--since 7d]
    python exercises.py dashboard DASHBOARD.json [--since 6h]
"""
import argparse
import difflib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

DEFAULT_PROMETHEUS = "http://localhost:9090"
DEFAULT_EVALUATION_INTERVAL = 60  # Prometheus's global evaluation_interval when none is set
SCRAPE_INTERVAL = 15  # the stack's scrape interval: the finest step the checks look at
MAX_STEPS = 11_000  # Prometheus refuses a query_range of more steps than this
REQUEST_TIMEOUT = 60  # seconds Prometheus has for one answer
QUERY_WORKERS = 4  # queries in flight at once: bounds the load put on Prometheus
MAX_SINCE = 32 * 86400  # the compose stack keeps 32 days
MAX_DOCUMENT_BYTES = 5_000_000
MAX_RULES = 200
MAX_PANEL_QUERIES = 200
MAX_QUERY_RUNS = 3000
MAX_VALUES_PER_VARIABLE = 20
DASHBOARD_STEPS = 240  # steps of a dashboard query over the window: enough to see data
SUCCESS_RATE_TOLERANCE = 0.5  # percentage points a success-rate panel may be off the truth
PROMTOOL_TIMEOUT = 20
SAMPLE_SPACING = 60  # the backfilled history's step (live scrapes come every 15 s): a gauge's
# last sample of an incident is still the latest one that long after it ends

INCIDENTS_QUERY = "max by (scenario) (payment_scenario_active) > 0"
FIRING_QUERY = 'max by (alertname) (ALERTS{alertstate="firing"})'
TRUE_SUCCESS_RATE = ('sum(rate(payment_requests_total{{status="200"}}[{window}])) / '
                     'sum(rate(payment_requests_total[{window}])) * 100')

# words of a rule's name and expression that point at the scenario it is written for; used only
# to name the target of a rule that caught nothing (the keys are payment_api.SCENARIOS names)
SCENARIO_HINTS = {
    "latency_degradation": ("latency", "histogram_quantile", "_bucket", "slow", "p95", "p99"),
    "outage": ('"503"', "unavailable", "outage"),
    "decline_wave": ('"402"', "decline"),
    "currency_outage": ("currency=", "currency!"),
    "error_spike": ('"500"', '"5..', "error", "fail"),
    "traffic_surge": ("surge",),
}


class DocumentError(ValueError):
    """A rule file or dashboard Prometheus or Grafana would refuse, or one with nothing to
    check."""


class PrometheusError(RuntimeError):
    """Prometheus cannot be reached, or failed a query for a reason of its own."""


class MissingDependency(RuntimeError):
    """A package the command needs is not installed."""


class QueryError(Exception):
    """Prometheus refused a query (bad_data or execution): its message says why."""

# ---------------------------------------------------------------- time and durations


DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?"
                      r"(?:(\d+)ms)?")
UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_duration(text):
    """Seconds of a Prometheus duration ("5m", "1h30m", "0"); ValueError if it is none."""
    text = str(text).strip()
    if text == "0":
        return 0
    match = DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        raise ValueError(f'not a valid duration string: "{text}"')
    return sum(int(count) * unit for count, unit in zip(match.groups(), UNIT_SECONDS) if count)


def format_duration(seconds):
    """'5 m 10 s', '2 h', '1 d 20 h': the two largest units, zeros left out."""
    sign = "-" if seconds < 0 else ""
    left = round(abs(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count} {unit}")
    return sign + (" ".join(parts[:2]) or "0 s")


def iso(epoch_seconds):
    """ISO-8601 UTC with Z, as the service writes times."""
    moment = datetime.fromtimestamp(epoch_seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def readable_time(epoch_seconds):
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def window(since_seconds, now=None):
    """(start, end) in whole epoch seconds: the `since_seconds` before `now` (default: now)."""
    end = math.floor(time.time() if now is None else now)
    return end - math.ceil(since_seconds), end


def plural(count, word):
    return f"{count} {word}" if count == 1 else f"{count} {word}s"

# ---------------------------------------------------------------- spans of time


def runs(times, step):
    """[(first, stop)] of the runs of consecutive steps in sorted `times`; `stop` is the step
    after a run's last."""
    spans = []
    for moment in times:
        if spans and abs(moment - spans[-1][1]) < step / 2:
            spans[-1][1] = moment + step
        else:
            spans.append([moment, moment + step])
    return [tuple(span) for span in spans]


def union(spans):
    """The spans merged where they touch or overlap, in order."""
    merged = []
    for first, stop in sorted(spans):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([first, stop])
    return [tuple(span) for span in merged]


def outside(spans, covered):
    """The parts of `spans` outside every span of `covered` (both sorted and disjoint)."""
    left = []
    for first, stop in spans:
        for cover_first, cover_stop in covered:
            if cover_stop <= first or cover_first >= stop:
                continue
            if cover_first > first:
                left.append((first, cover_first))
            first = cover_stop
            if first >= stop:
                break
        if first < stop:
            left.append((first, stop))
    return left


def parallel(function, items):
    """function(item) for every item, in order, with at most QUERY_WORKERS at once."""
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(QUERY_WORKERS, thread_name_prefix="exercises-query") as pool:
        return list(pool.map(function, items))

# ---------------------------------------------------------------- Prometheus's HTTP API


class Prometheus:
    """The few calls of Prometheus's HTTP API the checks make."""

    def __init__(self, url, timeout=REQUEST_TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, path, params=None, post=True):
        """The `data` of an answer; QueryError when Prometheus refuses the query, PrometheusError
        when it cannot answer."""
        encoded = urllib.parse.urlencode(params or {}, doseq=True)
        if post:
            request = urllib.request.Request(self.url + path, data=encoded.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded"})
        else:
            request = urllib.request.Request(self.url + path + ("?" + encoded if encoded else ""))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)["data"]
        except urllib.error.HTTPError as error:
            raise self.refusal(error) from None
        except (OSError, ValueError, KeyError) as error:
            reason = getattr(error, "reason", None) or error
            raise PrometheusError(f"no answer from Prometheus at {self.url} ({reason})") from None

    def refusal(self, error):
        """QueryError for Prometheus's answer to a bad query, PrometheusError for anything else."""
        try:
            answer = json.loads(error.read())
        except ValueError:
            answer = {}
        message = str(answer.get("error", "")).removeprefix('invalid parameter "query": ')
        if answer.get("errorType") in ("bad_data", "execution"):
            return QueryError(message)
        return PrometheusError(f"Prometheus at {self.url} answered {error.code} "
                               f"{message or error.reason} (is it Prometheus?)")

    def query_range(self, expr, start, end, step):
        """{labels as a sorted tuple: [(time, value)]} of `expr` at each multiple of `step` from
        `start` to `end`, in as many calls as Prometheus's limit on steps needs."""
        series = {}
        first = math.ceil(start / step) * step
        while first <= end:
            last = min(first + MAX_STEPS * step, end)
            data = self.call("/api/v1/query_range", {"query": expr, "start": first, "end": last,
                                                     "step": step})
            for row in data["result"]:
                values = series.setdefault(tuple(sorted(row["metric"].items())), [])
                values.extend((float(moment), float(value)) for moment, value in row["values"])
            first = last + step
        return series

    def instant(self, expr, at):
        """[(labels, value)] of `expr` at `at`."""
        data = self.call("/api/v1/query", {"query": expr, "time": at})
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(row["metric"], float(row["value"][1])) for row in data["result"]]

    def label_values(self, label, selector, start, end):
        params = {"start": start, "end": end, **({"match[]": selector} if selector else {})}
        return self.call(f"/api/v1/label/{urllib.parse.quote(label)}/values", params, post=False)

    def evaluation_interval(self):
        """Seconds of the global evaluation_interval Prometheus runs with (1 m unless set)."""
        config = self.call("/api/v1/status/config", post=False)["yaml"]
        found = re.search(r"^global:\n(?:[ \t].*\n)*?[ \t]+evaluation_interval:\s*(\S+)", config,
                          re.MULTILINE)
        return parse_duration(found[1]) if found else DEFAULT_EVALUATION_INTERVAL

# ---------------------------------------------------------------- the answer key


@dataclass(frozen=True)
class Incident:
    scenario: str
    start: float
    end: float  # when it stopped, or the end of the window while it runs
    running: bool

    def describe(self):
        return {"scenario": self.scenario, "start": iso(self.start),
                "end": None if self.running else iso(self.end), "running": self.running,
                "duration_seconds": round(self.end - self.start, 3)}


def sample_edge(prometheus, selector, at, rising):
    """When, in the SCRAPE_INTERVAL up to `at`, the raw samples of `selector` turned above 0
    (rising) or back to 0 after the last one above (falling); None if none did."""
    rows = prometheus.call("/api/v1/query", {"query": f"{selector}[{SCRAPE_INTERVAL}s]",
                                             "time": at})["result"]
    samples = sorted((float(moment), float(value) > 0) for row in rows
                     for moment, value in row["values"])
    if rising:
        return next((moment for moment, above in samples if above), None)
    last_above = max((moment for moment, above in samples if above), default=-math.inf)
    return next((moment for moment, above in samples if not above and moment > last_above), None)


def exact_incident(prometheus, scenario, first, stop, running, end):
    """The Incident of a run found at SCRAPE_INTERVAL steps, its start and end moved to the
    samples that began and ended it (a run that stopped with no 0 sample, say when the service
    stopped, ends where its series did)."""
    selector = f"payment_scenario_active{{scenario={json.dumps(scenario)}}}"
    begins = sample_edge(prometheus, selector, first, rising=True) or first
    if running:
        return Incident(scenario, begins, end, True)
    ends = sample_edge(prometheus, selector, stop, rising=False) or stop
    return Incident(scenario, begins, ends, False)


def incidents_between(prometheus, start, end):
    """Every incident between `start` and `end`, in order: the runs of payment_scenario_active
    above 0, by scenario, over every replica."""
    series = prometheus.query_range(INCIDENTS_QUERY, start, end, SCRAPE_INTERVAL)
    last_step = math.floor(end / SCRAPE_INTERVAL) * SCRAPE_INTERVAL
    found = [(dict(labels).get("scenario", "unknown"), first, stop, stop > last_step)
             for labels, values in series.items()
             for first, stop in runs([moment for moment, _ in values], SCRAPE_INTERVAL)]
    exact = parallel(lambda run: exact_incident(prometheus, *run, end), found)
    return sorted(exact, key=lambda incident: incident.start)


def firing_alerts(prometheus, start, end):
    """{alertname: [(first, stop)]} of the firing spans of Prometheus's own ALERTS series."""
    series = prometheus.query_range(FIRING_QUERY, start, end, SCRAPE_INTERVAL)
    return {dict(labels).get("alertname", "?"): runs([moment for moment, _ in values],
                                                      SCRAPE_INTERVAL)
            for labels, values in series.items()}


def alerts_during(prometheus, incident, firing):
    """The alerts firing at some moment of `incident`, the earliest first, each with the sample
    that began its firing (before the incident began: a negative delay)."""
    found = []
    for name, spans in firing.items():
        during = [first for first, stop in spans
                  if first <= incident.end and stop > incident.start]
        if during:
            selector = f'ALERTS{{alertname={json.dumps(name)},alertstate="firing"}}'
            fired = sample_edge(prometheus, selector, during[0], rising=True) or during[0]
            found.append({"alertname": name, "fired_at": iso(fired),
                          "after_seconds": round(fired - incident.start, 3)})
    return sorted(found, key=lambda alert: (alert["after_seconds"], alert["alertname"]))


def answer_key(prometheus_url, since_seconds, now=None):
    """Every incident of the window with the alerts that fired during it: what `incidents
    --json` prints."""
    prometheus = Prometheus(prometheus_url)
    start, end = window(since_seconds, now)
    incidents = incidents_between(prometheus, start, end)
    firing = firing_alerts(prometheus, start, end)
    return {"prometheus": prometheus.url, "start": iso(start), "end": iso(end),
            "incidents": parallel(lambda incident: {
                **incident.describe(), "alerts": alerts_during(prometheus, incident, firing)},
                incidents)}

# ----------------------------------------------------- rule files, as Prometheus reads one


GROUP_FIELDS = {"name", "interval", "limit", "rules"}
RULE_FIELDS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
RULE_LINE = re.compile(r"""^\s*-?\s*(?:alert|record)\s*:\s*["']?([^"'#\n]*?)["']?\s*(?:#.*)?$""")


@dataclass(frozen=True)
class AlertRule:
    name: str
    group: str
    number: int  # its place in the group, from 1, as Prometheus numbers rules
    expr: str  # as written
    evaluated: str  # with the file's recording rules written out
    interval: float
    hold: float  # for
    keep: float  # keep_firing_for

    @property
    def where(self):
        return f'group "{self.group}", rule {self.number}, "{self.name}"'


def load_rule_document(text):
    """The parsed YAML (or JSON) of a rule file; DocumentError naming the line of a syntax error
    and the rule near it."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            raise MissingDependency("reading a YAML rule file needs PyYAML, which is not installed"
                                    " (pip install PyYAML); a rule file written as JSON needs "
                                    "nothing") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DocumentError(yaml_problem(text, error)) from None


def yaml_problem(text, error):
    """'line 7: YAML syntax error: ... (near rule "X")' for a YAML error of `text`."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"YAML syntax error: {problem}"
    line = mark.line + 1
    names = [found[1] for found in map(RULE_LINE.match, text.splitlines()[:line]) if found]
    near = f' (near rule "{names[-1]}")' if names else ""
    return f"line {line}, column {mark.column + 1}: YAML syntax error: {problem}{near}"


def rule_groups(document):
    """The groups of a parsed rule file, checked as Prometheus checks them before it loads a file;
    DocumentError naming the group and the rule otherwise."""
    if document is None:
        return []
    if not isinstance(document, dict):
        raise DocumentError("a rule file is a mapping with a groups: list")
    unknown = sorted(set(document) - {"groups"})
    if unknown:
        raise DocumentError(f"field {unknown[0]} not found in a rule file (it has groups: only)")
    groups = document.get("groups") or []
    if not isinstance(groups, list):
        raise DocumentError("groups: must be a list of rule groups")
    rule_count = sum(len(as_list(group.get("rules"))) for group in groups
                     if isinstance(group, dict))
    if rule_count > MAX_RULES:
        raise DocumentError(f"more than {MAX_RULES} rules: score a smaller file")
    seen = set()
    for group in groups:
        check_group(group, seen)
    return groups


def check_group(group, seen):
    if not isinstance(group, dict):
        raise DocumentError("each entry of groups: is a mapping with name: and rules:")
    name = group.get("name")
    unknown = sorted(set(group) - GROUP_FIELDS)
    if unknown:
        raise DocumentError(f'group "{name}": field {unknown[0]} not found in a group')
    if not name or not isinstance(name, str):
        raise DocumentError("a group has no name: (Groupname must not be empty)")
    if name in seen:
        raise DocumentError(f'groupname: "{name}" is repeated in the same file')
    seen.add(name)
    problem = duration_problem(group, "interval")
    if problem:
        raise DocumentError(f'group "{name}": {problem}')
    if not isinstance(group.get("rules") or [], list):
        raise DocumentError(f'group "{name}": rules: must be a list')
    for number, rule in enumerate(group.get("rules") or [], 1):
        problem = rule_problem(rule)
        if problem:
            title = rule.get("alert") or rule.get("record") if isinstance(rule, dict) else ""
            raise DocumentError(f'group "{name}", rule {number}, "{title}": {problem}')


def duration_problem(mapping, key):
    """What is wrong with the duration `key` of `mapping`, or None (absent is fine)."""
    value = mapping.get(key)
    if value is None or value == 0:
        return None
    try:
        parse_duration(value)
    except ValueError as error:
        return f"{key}: {error}"
    return None


def rule_problem(rule):
    """What Prometheus would say about one rule, or None."""
    if not isinstance(rule, dict):
        return "a rule is a mapping with alert: (or record:) and expr:"
    unknown = sorted(set(rule) - RULE_FIELDS)
    if unknown:
        return f"field {unknown[0]} not found in a rule"
    if "alert" in rule and "record" in rule:
        return "only one of 'record' and 'alert' must be set"
    if not rule.get("alert") and not rule.get("record"):
        return "one of 'record' or 'alert' must be set"
    if not str(rule.get("expr") or "").strip():
        return "field 'expr' must be set in rule"
    if "record" in rule:
        return recording_problem(rule)
    problems = [duration_problem(rule, key) for key in ("for", "keep_firing_for")]
    return next(filter(None, problems), None) or labels_problem(rule)


def recording_problem(rule):
    for key in ("annotations", "for", "keep_firing_for"):
        if rule.get(key):
            return f"invalid field '{key}' in recording rule"
    if not METRIC_NAME.fullmatch(str(rule["record"])):
        return f"invalid recording rule name: {rule['record']}"
    return labels_problem(rule)


def labels_problem(rule):
    for key in ("labels", "annotations"):
        mapping = rule.get(key) or {}
        if not isinstance(mapping, dict):
            return f"{key}: must be a mapping of names to values"
        bad = [name for name in mapping if not LABEL_NAME.fullmatch(str(name))
               or (key == "labels" and name == "__name__")]
        if bad:
            return f"invalid {key[:-1]} name: {bad[0]}"
    return None


def check_expressions(prometheus, groups):
    """DocumentError naming the first rule whose expression Prometheus cannot parse (asked at a
    time long before any data, so nothing is evaluated)."""
    rules = [(f'group "{group["name"]}", rule {number}, "{rule.get("alert") or rule["record"]}"',
              str(rule["expr"]))
             for group in groups for number, rule in enumerate(group.get("rules") or [], 1)]

    def problem(rule):
        try:
            prometheus.call("/api/v1/query", {"query": rule[1], "time": 0})
        except QueryError as error:
            return f"{rule[0]}: could not parse expression: {error}"
        return None
    found = next(filter(None, parallel(problem, rules)), None)
    if found:
        raise DocumentError(found)


def promtool_problem(text):
    """The first problem `promtool check rules` finds in the file (annotation templates, say),
    or None, also when promtool is not installed."""
    promtool = shutil.which("promtool")
    if not promtool:
        return None
    with tempfile.TemporaryDirectory(prefix="exercises-") as folder:
        path = os.path.join(folder, "rules.yml")
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        try:
            result = subprocess.run([promtool, "check", "rules", path], capture_output=True,
                                    text=True, timeout=PROMTOOL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
    if result.returncode == 0:
        return None
    lines = [line.strip().removeprefix(path + ": ")
             for line in (result.stderr + result.stdout).splitlines()
             if line.strip().startswith(path + ":")]
    return lines[0] if lines else "promtool check rules refuses the file"


def inlined(expr, records):
    """`expr` with each plain use of a recording rule of the same file replaced by the rule's
    expression, so that it can be evaluated over a past in which the rule never ran."""
    for _ in range(3):  # a recording rule may use another one
        changed = expr
        for name, body in records.items():
            changed = re.sub(r"(?<![\w:])" + re.escape(name) + r"(?![\w:{\[(])",
                             lambda _, body=body: f"({body})", changed)
        if changed == expr:
            return expr
        expr = changed
    return expr


def alert_rules(groups, default_interval):
    """The alerting rules of the groups, with their durations in seconds."""
    records = {str(rule["record"]): str(rule["expr"]).strip() for group in groups
               for rule in group.get("rules") or [] if "record" in rule}
    rules = []
    for group in groups:
        interval = parse_duration(group.get("interval") or 0) or default_interval
        for number, rule in enumerate(group.get("rules") or [], 1):
            if "alert" not in rule:
                continue
            expr = str(rule["expr"]).strip()
            rules.append(AlertRule(
                name=str(rule["alert"]), group=group["name"], number=number, expr=expr,
                evaluated=inlined(expr, records), interval=interval,
                hold=parse_duration(rule.get("for") or 0),
                keep=parse_duration(rule.get("keep_firing_for") or 0)))
    return rules

# ----------------------------------------------------- rules, evaluated over the past


def firing_spans(present, step, hold, keep):
    """The spans an alert fires, from the spans its expression returned the series: pending from
    a span's first evaluation, firing once `hold` has passed, kept firing for `keep` after the
    expression stops returning it, as Prometheus's rule manager does (rules/alerting.go)."""
    kept = math.ceil(keep / step) * step  # the evaluations less than `keep` after the first miss
    spans = []
    for first, stop in present:
        if spans and first <= spans[-1][1]:  # back while it was kept firing: it never resolved
            spans[-1][1] = stop + kept
            continue
        fires = first + math.ceil(hold / step) * step
        if fires < stop:
            spans.append([fires, stop + kept])
    return [tuple(span) for span in spans]


def rule_firing(prometheus, rule, start, end):
    """The spans in which `rule` would have fired between `start` and `end`, over all its
    series; DocumentError when Prometheus cannot evaluate its expression."""
    try:
        series = prometheus.query_range(rule.evaluated, start, end, rule.interval)
    except QueryError as error:
        raise DocumentError(f"{rule.where}: Prometheus cannot evaluate it: {error}") from None
    spans = []
    for values in series.values():
        present = runs([moment for moment, _ in values], rule.interval)
        spans.extend(firing_spans(present, rule.interval, rule.hold, rule.keep))
    return [(first, min(stop, end)) for first, stop in union(spans) if first < end]


def longest_window(expr):
    """Seconds the data of a moment stays in `expr`'s answers: its longest range (or subquery
    range) plus its longest offset."""
    def longest(pattern):
        found = [0]
        for text in re.findall(pattern, expr):
            try:
                found.append(parse_duration(text))
            except ValueError:
                pass
        return max(found)
    return (longest(r"\[\s*(\w+)\s*(?::[^\]]*)?\]")
            + longest(r"\boffset\s+(\w+)"))


def catch_delay(spans, start, stop):
    """Seconds from `start` to the first firing moment before `stop`, or None."""
    for first, last in spans:
        if first < stop and last > start:
            return max(first, start) - start
    return None


def catches(spans, incidents, grace):
    """[(incident, delay or None)]: whether the spans fire in an incident's own time, from its
    start until `grace` after its end or until a later incident starts, and how late."""
    starts = sorted({incident.start for incident in incidents})
    found = []
    for incident in incidents:
        later = [start for start in starts if start > incident.start][:1]
        stop = min([incident.end + grace, *later])
        found.append((incident, catch_delay(spans, incident.start, stop)))
    return found


def scenario_tally(caught):
    """{scenario: {incidents, caught, delays_seconds}} from catches()."""
    tally = {}
    for incident, delay in caught:
        entry = tally.setdefault(incident.scenario, {"incidents": 0, "caught": 0,
                                                     "delays_seconds": []})
        entry["incidents"] += 1
        if delay is not None:
            entry["caught"] += 1
            entry["delays_seconds"].append(delay)
    return tally


def guessed_target(rule):
    """The scenario a rule's name and expression point at, or None."""
    text = (rule.name + " " + rule.expr).lower().replace(" ", "")
    scores = {scenario: sum(hint in text for hint in hints)
              for scenario, hints in SCENARIO_HINTS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] else None


def best_target(tally, rule):
    """The scenario the rule catches best: the largest share caught, then the one its name and
    expression point at, then the shortest delay; for a rule that caught nothing, that one."""
    caught = {scenario: entry for scenario, entry in tally.items() if entry["caught"]}
    guess = guessed_target(rule)
    if not caught:
        return guess
    return max(caught, key=lambda scenario: (
        caught[scenario]["caught"] / caught[scenario]["incidents"], scenario == guess,
        -statistics.median(caught[scenario]["delays_seconds"]), caught[scenario]["caught"]))


THRESHOLD = re.compile(r"(?s)(?P<value>.+?)\s*(?P<op>>=|<=|>|<)\s*"
                       r"(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def threshold_parts(expr):
    """(value expression, comparison, threshold) of a rule written `VALUE > NUMBER`, or None
    when it is not that simple."""
    match = THRESHOLD.fullmatch(expr.strip())
    if not match:
        return None
    top_level = match["value"]
    while re.search(r"\([^()]*\)|\{[^{}]*\}|\[[^\[\]]*\]|\"[^\"]*\"", top_level):
        top_level = re.sub(r"\([^()]*\)|\{[^{}]*\}|\[[^\[\]]*\]|\"[^\"]*\"", "", top_level)
    if re.search(r"\b(and|or|unless|bool)\b|[<>=!]=?", top_level):
        return None
    return match["value"], match["op"], float(match["threshold"])


def threshold_hint(prometheus, rule, missed, grace):
    """'; its value peaked at 1.44 during it, and the rule needs > 2' for a rule written `VALUE
    > NUMBER` (or <, >=, <=) that missed incidents, or ''."""
    parts = threshold_parts(rule.evaluated)
    if not parts or not missed:
        return ""
    value, op, threshold = parts
    seen = []
    for incident in missed:
        try:
            series = prometheus.query_range(value, incident.start, incident.end + grace,
                                            rule.interval)
        except QueryError:
            return ""
        seen.extend(number for values in series.values() for _, number in values
                    if math.isfinite(number))
    during = "it" if len(missed) == 1 else "them"
    if not seen:
        return f"; its value had no data during {during}"
    extreme, word = (max(seen), "peaked at") if op.startswith(">") else (min(seen), "fell to")
    return (f"; its value {word} {extreme:.3g} during {during}, and the rule needs "
            f"{op} {threshold:g}")


def delays_text(delays):
    """'5 m 10 s' when every delay is the same, '4 m to 6 m' otherwise."""
    shortest, longest = min(delays), max(delays)
    if longest - shortest < 1:
        return format_duration(shortest)
    return f"{format_duration(shortest)} to {format_duration(longest)}"


def verdict(score):
    """The one line a student reads: what the rule caught and whether it cried wolf."""
    target, caught, total = score["target"], score["caught"], score["incidents"]
    if target is None:
        first = "never fired during an incident" if score["firing_seconds"] else "never fired"
    elif total == 0:
        first = f"no {target} incident in this window to catch"
    elif caught == 0:
        every = "the only" if total == 1 else f"all {total}"
        first = f"missed {every} {target} incident{'s' * (total > 1)}{score['hint']}"
    else:
        began = "it" if caught == 1 else "they"
        first = (f"caught {caught} of {plural(total, target + ' incident')}, "
                 f"{delays_text(score['delays_seconds'])} after {began} began")
        if caught < total:
            first += f"; missed {total - caught}"
    if score["false_alarm_seconds"] <= 0:
        return first + "; no false alarm"
    return (f"{first}; fired {format_duration(score['false_alarm_seconds'])} outside any "
            "incident (false alarm)")


def score_rule(prometheus, rule, spans, incidents):
    """One rule's score: its target, what it caught, how late, its false alarms, its verdict.
    An incident stays in the rule's data for its longest window after it ends, and in a gauge's
    latest sample until the next; the alert then needs an evaluation, and keep_firing_for."""
    grace = longest_window(rule.evaluated) + SAMPLE_SPACING + rule.interval + rule.keep
    caught = catches(spans, incidents, grace)
    tally = scenario_tally(caught)
    target = best_target(tally, rule)
    entry = tally.get(target, {"incidents": 0, "caught": 0, "delays_seconds": []})
    false_alarms = outside(spans, union([(one.start, one.end + grace) for one in incidents]))
    missed = [one for one, delay in caught if one.scenario == target and delay is None]
    score = {
        "name": rule.name, "group": rule.group, "number": rule.number, "expr": rule.expr,
        "interval_seconds": rule.interval, "for_seconds": rule.hold,
        "keep_firing_for_seconds": rule.keep, "grace_seconds": grace, "target": target,
        "incidents": entry["incidents"], "caught": entry["caught"],
        "missed": entry["incidents"] - entry["caught"],
        "delays_seconds": entry["delays_seconds"],
        "false_alarm_seconds": sum(stop - first for first, stop in false_alarms),
        "false_alarms": [{"start": iso(first), "end": iso(stop)} for first, stop in
                         false_alarms[:10]],
        "firing_seconds": sum(stop - first for first, stop in spans),
        "by_scenario": tally,
        "hint": threshold_hint(prometheus, rule, missed, grace) if not entry["caught"] else "",
    }
    score["verdict"] = verdict(score)
    score["ok"] = score["caught"] > 0 and score["false_alarm_seconds"] <= 0
    return score


def data_start(prometheus, start, end):
    """The window's start, or later the first moment the service's metrics exist: before it,
    a rule on absent() would fire for a past Prometheus never saw."""
    query = (f"min_over_time(timestamp(count(payment_scenario_active))"
             f"[{end - start}s:{SCRAPE_INTERVAL}s])")
    found = prometheus.instant(query, end)
    return max(start, math.ceil(found[0][1])) if found else start


def score_alert_rules(prometheus_url, rules_text, since_seconds, now=None):
    """Each alerting rule of a rule file scored against the incidents of the window: what `alerts
    --json` prints. DocumentError for a file Prometheus would refuse."""
    prometheus = Prometheus(prometheus_url)
    start, end = window(since_seconds, now)
    groups = rule_groups(load_rule_document(rules_text))
    check_expressions(prometheus, groups)
    problem = promtool_problem(rules_text)
    if problem:
        raise DocumentError(problem)
    needs_default = any(not group.get("interval") for group in groups)
    default = prometheus.evaluation_interval() if needs_default else DEFAULT_EVALUATION_INTERVAL
    rules = alert_rules(groups, default)
    if not rules:
        raise DocumentError("the file has no alerting rule (alert:) to score")
    start = data_start(prometheus, start, end)
    incidents = incidents_between(prometheus, start, end)
    spans = parallel(lambda rule: rule_firing(prometheus, rule, start, end), rules)
    scores = [score_rule(prometheus, rule, firing, incidents)
              for rule, firing in zip(rules, spans)]
    return {"prometheus": prometheus.url, "start": iso(start), "end": iso(end),
            "default_interval_seconds": default,
            "incidents": [incident.describe() for incident in incidents],
            "rules": scores, "ok": all(score["ok"] for score in scores)}

# ----------------------------------------------------- dashboards, as Grafana reads one


REFERENCE = re.compile(r"\$\{(\w+)(?::([^}]*))?\}|\$(\w+)|\[\[(\w+)(?::([^\]]*))?\]\]")
DATASOURCE_KINDS = ("prometheus", "influxdb", "loki", "tempo", "elasticsearch", "graphite",
                    "mysql", "postgres", "testdata", "alertmanager")
BUILT_IN_SOURCES = {"-- grafana --": "grafana", "grafana": "grafana", "-- mixed --": "mixed",
                    "-- dashboard --": "dashboard", "__expr__": "expression"}


@dataclass
class Variable:
    name: str
    kind: str  # query, custom, constant, interval, textbox, datasource, adhoc
    source: str  # the data source kind of a query variable
    definition: str
    regex: str
    include_all: bool
    multi: bool
    all_value: object  # the allValue text, or None
    current: list
    values: list = None  # the options it offers; None when they cannot be known here

    @property
    def regex_style(self):
        return self.multi or self.include_all


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    panel_id: object
    ref: str
    kind: str  # the data source's type
    text: str
    unit: str


@dataclass(frozen=True)
class Choice:
    values: tuple
    all_text: object  # the variable's allValue when All is chosen and it has one
    regex_style: bool  # a multi-value or All variable: values go in as a regex


def load_dashboard(text):
    """The dashboard of a Grafana JSON export (the dashboard, or the API's {"dashboard": ...});
    DocumentError when Grafana would not import it."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise DocumentError(f"not JSON: {error}") from None
    if isinstance(document, dict) and isinstance(document.get("dashboard"), dict):
        document = document["dashboard"]
    if not isinstance(document, dict) or not isinstance(
            document.get("panels", document.get("rows")), list):
        raise DocumentError("not a Grafana dashboard: there is no panels list (export it with "
                            "Share > Export > Save to file)")
    templating = document.get("templating") or {}
    if not isinstance(templating, dict) or not isinstance(templating.get("list", []), list):
        raise DocumentError("templating.list must be a list of variables")
    return document


def as_list(value):
    """A list from a document, or [] for anything else: a malformed part checks as empty."""
    return value if isinstance(value, list) else []


def all_panels(board):
    """Every panel, those inside rows (collapsed or not, and the old `rows` layout) included."""
    def walk(panels):
        for panel in panels:
            if isinstance(panel, dict):
                yield panel
                yield from walk(as_list(panel.get("panels")))
    rows = [row for row in as_list(board.get("rows")) if isinstance(row, dict)]
    yield from walk(as_list(board.get("panels")))
    yield from walk([panel for row in rows for panel in as_list(row.get("panels"))])


def datasource_kind(source, inputs, variables):
    """The type of the data source a panel or variable names (a {type, uid}, a name, an
    exported ${DS_...} input, a data source variable); none named is the default, Prometheus."""
    if not source:
        return "prometheus"  # the default data source of the course's stack
    if isinstance(source, dict):
        if source.get("type") and source.get("type") != "datasource":
            return BUILT_IN_SOURCES.get(str(source["type"]).lower(), str(source["type"]).lower())
        source = source.get("uid") or ""
    text = str(source)
    reference = re.fullmatch(r"\$\{?(\w+)\}?", text)
    if reference and reference[1] in inputs:
        text = inputs[reference[1]]
    elif reference and reference[1] in variables:
        text = variables[reference[1]].definition
    lower = text.lower()
    if lower in BUILT_IN_SOURCES:
        return BUILT_IN_SOURCES[lower]
    return next((kind for kind in DATASOURCE_KINDS if kind[:5] in lower), lower or "prometheus")


def read_variables(board):
    """{name: Variable} of the dashboard's template variables, in order."""
    inputs = {item.get("name"): str(item.get("pluginId") or "")
              for item in as_list(board.get("__inputs")) if isinstance(item, dict)}
    variables = {}
    templating = board.get("templating")
    for item in as_list(templating.get("list") if isinstance(templating, dict) else None):
        if not isinstance(item, dict) or not item.get("name"):
            raise DocumentError("templating.list holds a variable without a name")
        query = item.get("query")
        definition = query.get("query", "") if isinstance(query, dict) else str(query or "")
        current = (item.get("current") or {}).get("value", [])
        variables[item["name"]] = Variable(
            name=item["name"], kind=item.get("type", "query"),
            source=datasource_kind(item.get("datasource"), inputs, variables),
            definition=definition, regex=item.get("regex") or "",
            include_all=bool(item.get("includeAll")), multi=bool(item.get("multi")),
            all_value=item.get("allValue") or None,
            current=current if isinstance(current, list) else [str(current)])
    return variables


def panel_queries(board, variables):
    """Every query of every panel (hidden ones left out), with its data source's type."""
    inputs = {item.get("name"): str(item.get("pluginId") or "")
              for item in as_list(board.get("__inputs")) if isinstance(item, dict)}
    found = []
    for panel in all_panels(board):
        title = str(panel.get("title") or f"panel {panel.get('id')}")
        unit = str(((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit") or "")
        for target in as_list(panel.get("targets")):
            if not isinstance(target, dict) or target.get("hide"):
                continue
            source = target.get("datasource") or panel.get("datasource")
            if datasource_kind(source, inputs, variables) == "mixed":
                source = None
            text = target.get("expr") or target.get("query") or target.get("rawSql") or ""
            found.append(PanelQuery(title, panel.get("id"), str(target.get("refId", "")),
                                    datasource_kind(source, inputs, variables), str(text), unit))
    return found


def regex_escaped(value):
    """A value as Grafana writes it into a PromQL regex: special characters escaped twice,
    once for the regex and once for the string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def formatted(choice, form):
    """The text Grafana's Prometheus data source puts in a query for a choice and a format."""
    if choice.all_text is not None:
        return choice.all_text
    values = list(choice.values)
    form = form or ("regex" if choice.regex_style else "raw")
    if form == "regex":
        escaped = [regex_escaped(value) for value in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if form == "pipe":
        return "|".join(values)
    if form == "json":
        return json.dumps(values)
    if form == "glob":
        return values[0] if len(values) == 1 else "{" + ",".join(values) + "}"
    if form in ("singlequote", "doublequote"):
        quote = "'" if form == "singlequote" else '"'
        return ",".join(quote + value + quote for value in values)
    return ",".join(values)


def referenced(text):
    """The names of the variables `text` uses: $name, ${name}, ${name:format}, [[name]]."""
    return {match[1] or match[3] or match[4] for match in REFERENCE.finditer(text)} - {
        name for name in map(str, range(10))}


def interpolate(text, selection, built_ins):
    """(the query as Grafana sends it for `selection` {name: Choice}, the variables it uses
    that the dashboard does not define)."""
    undefined = []

    def replace(match):
        name = match[1] or match[3] or match[4]
        if name in selection:
            return formatted(selection[name], (match[2] or match[5] or "").split(":")[0])
        if name in built_ins:
            return built_ins[name]
        if not (name.startswith("__") or name.isdigit()):
            undefined.append(name)
        return match[0]
    return REFERENCE.sub(replace, text), undefined


def built_in_values(start, end, step):
    """Grafana's global variables for a query over the window at `step`."""
    rate_interval = max(step + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL)
    since = end - start
    return {"__interval": f"{step}s", "__interval_ms": str(step * 1000),
            "__rate_interval": f"{rate_interval}s",
            "__rate_interval_ms": str(rate_interval * 1000),
            "__range": f"{since}s", "__range_s": str(since), "__range_ms": str(since * 1000),
            "__from": str(start * 1000), "__to": str(end * 1000)}


def all_choice(variable):
    """What All (or the current value, for a variable without All) puts in a query."""
    if variable.values is None or (variable.include_all and variable.all_value):
        return Choice((), variable.all_value or ".*", True)
    if variable.include_all or variable.multi:
        return Choice(tuple(variable.values), None, True)
    first = variable.values[:1] or variable.current[:1]
    return Choice(tuple(first), None, False)


def grafana_regex(pattern):
    """The Python regex of a variable's /regex/flags, or None."""
    found = re.fullmatch(r"/(.*)/(\w*)", pattern.strip(), re.S)
    if not found:
        return None
    flags = re.IGNORECASE if "i" in found[2] else 0
    try:
        return re.compile(found[1].replace("(?<", "(?P<").replace("(?P<=", "(?<=")
                          .replace("(?P<!", "(?<!"), flags)
    except re.error:
        return None


def filtered(values, pattern):
    """The values a variable's regex keeps, as Grafana keeps them (a capture group's text when
    the regex has one), without repeats."""
    regex = grafana_regex(pattern) if pattern else None
    kept = []
    for value in values:
        found = regex.search(value) if regex else None
        if regex and not found:
            continue
        if found and found.re.groups:
            value = found.groupdict().get("value") or found[1] or value
        if value not in kept:
            kept.append(value)
    return kept


def prometheus_options(prometheus, variable, variables, start, end):
    """The options of a Prometheus query variable, asked of Prometheus as Grafana asks them."""
    earlier = {name: all_choice(other) for name, other in variables.items()
               if other.values is not None}
    definition, _ = interpolate(variable.definition, earlier, built_in_values(start, end, 60))
    label_values = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?([\w.]+)\s*\)\s*",
                                definition, re.S)
    if label_values:
        return prometheus.label_values(label_values[2], label_values[1], start, end)
    if re.fullmatch(r"\s*label_names\(\s*\)\s*", definition):
        return prometheus.call("/api/v1/labels", {"start": start, "end": end})
    metrics = re.fullmatch(r"\s*metrics\((.*)\)\s*", definition, re.S)
    if metrics:
        try:
            keep = re.compile(metrics[1].strip())
        except re.error as error:
            raise QueryError(f"invalid regex in metrics(): {error}") from None
        return [name for name in prometheus.label_values("__name__", None, start, end)
                if keep.search(name)]
    result = re.fullmatch(r"\s*query_result\((.*)\)\s*", definition, re.S)
    expr = result[1] if result else definition
    rows = prometheus.instant(expr, end)
    return [labels.get("__name__", "") + "{" + ",".join(
        f'{key}="{value}"' for key, value in labels.items() if key != "__name__") + "} "
        + f"{number:g} {end * 1000}" for labels, number in rows]


def variable_options(prometheus, variable, variables, start, end):
    """The options a variable offers, or None when they cannot be known from Prometheus."""
    if variable.kind == "query" and variable.source == "prometheus":
        values = prometheus_options(prometheus, variable, variables, start, end)
    elif variable.kind in ("custom", "interval"):
        parts = re.findall(r"(?:\\,|[^,])+", variable.definition)
        values = [part.split(" : ")[-1].strip().replace("\\,", ",") for part in parts]
    elif variable.kind in ("constant", "textbox"):
        values = [variable.definition] if variable.definition else variable.current
    else:
        return None
    return filtered([str(value) for value in values if str(value)], variable.regex)


def resolve_variables(prometheus, variables, start, end):
    """Give each variable its options, in the dashboard's order (a variable may use the ones
    before it); a note for each whose query Prometheus refuses."""
    notes = []
    for variable in variables.values():
        try:
            variable.values = variable_options(prometheus, variable, variables, start, end)
        except QueryError as error:
            notes.append(f"variable ${variable.name}: Prometheus refuses its query "
                         f"{variable.definition!r}: {error}")
            variable.values = []
        if variable.values and len(variable.values) > MAX_VALUES_PER_VARIABLE:
            notes.append(f"variable ${variable.name}: checked with its first "
                         f"{MAX_VALUES_PER_VARIABLE} of {len(variable.values)} values")
            variable.values = variable.values[:MAX_VALUES_PER_VARIABLE]
    return notes


def selections(names, variables):
    """[(label, {name: Choice})]: every variable at All, then each single value of each
    variable in `names` in turn, the others at All."""
    everything = {name: all_choice(variable) for name, variable in variables.items()}
    chosen = [("All", everything)]
    for name in sorted(names & set(variables)):
        variable = variables[name]
        for value in variable.values or []:
            single = Choice((value,), None, variable.regex_style)
            chosen.append((f"{name}={value}", {**everything, name: single}))
    return chosen


def query_outcome(prometheus, text, start, end, step):
    """('ok', series) with the series that have a number, ('empty', {}) or ('error', message)."""
    try:
        series = prometheus.query_range(text, start, end, step)
    except QueryError as error:
        return "error", str(error)
    with_numbers = {labels: values for labels, values in series.items()
                    if any(math.isfinite(number) for _, number in values)}
    return ("ok", with_numbers) if with_numbers else ("empty", {})


def metric_names_in(text):
    """The names in a PromQL query that stand for metrics (not functions, keywords, labels)."""
    stripped = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|\{[^{}]*\}', " ", text)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                      stripped)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}
    names = re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", stripped)
    return [found[1] for found in names if found[1].lower() not in keywords]


def unknown_metrics_hint(text, known):
    """': no metric payment_requets_total in Prometheus (did you mean payment_requests_total?)'
    for the names of a query Prometheus does not have, or ''."""
    unknown = [name for name in dict.fromkeys(metric_names_in(text)) if name not in known]
    if not unknown:
        return ""
    guesses = difflib.get_close_matches(unknown[0], known, n=1)
    guess = f" (did you mean {guesses[0]}?)" if guesses else ""
    return f": no metric {unknown[0]} in Prometheus{guess}"


def query_problem(outcomes, text, known):
    """(what is wrong, the selections it is wrong for) from [(selection, status, detail)]."""
    errors = [(label, detail) for label, status, detail in outcomes if status == "error"]
    if errors:
        return f"Prometheus refuses it: {errors[0][1]}", [label for label, _ in errors]
    empty = [label for label, status, _ in outcomes if status == "empty"]
    if not empty:
        return None, []
    hint = unknown_metrics_hint(text, known)
    if len(empty) < len(outcomes):
        return f"returns nothing for {', '.join(empty)}{hint}", empty
    every = " for any value of its variables" if len(outcomes) > 1 else ""
    return f"returns nothing{every}{hint}", empty


def planned_runs(queries, variables, built_ins):
    """{query: [(selection label, text to run)]} for the Prometheus queries, and the problems of
    those that cannot run: an empty query, an undefined variable."""
    plans = {}
    problems = []
    for query in queries:
        if not query.text.strip():
            problems.append((query, "has no query", []))
            continue
        _, undefined = interpolate(query.text, {}, {**built_ins, **dict.fromkeys(variables, "")})
        if undefined:
            guesses = difflib.get_close_matches(undefined[0], list(variables), n=1)
            guess = f" (did you mean ${guesses[0]}?)" if guesses else ""
            problems.append((query, f"uses ${undefined[0]}, which the dashboard does not define"
                                    + guess, []))
            continue
        plans[query] = [(label, interpolate(query.text, selection, built_ins)[0])
                        for label, selection in selections(referenced(query.text), variables)]
    if sum(map(len, plans.values())) > MAX_QUERY_RUNS:
        raise DocumentError(f"checking this dashboard takes more than {MAX_QUERY_RUNS} queries: "
                            "fewer panels or variable values, please")
    return plans, problems


def run_panel_queries(prometheus, queries, variables, start, end, step):
    """({query: series of its All run}, [(query, problem, selections)]) of the Prometheus
    queries, each run for every selection of the variables it uses."""
    built_ins = built_in_values(start, end, step)
    plans, problems = planned_runs(queries, variables, built_ins)
    texts = sorted({text for runs_of_one in plans.values() for _, text in runs_of_one})
    outcomes = dict(zip(texts, parallel(
        lambda text: query_outcome(prometheus, text, start, end, step), texts)))
    known = None
    results = {}
    for query, planned in plans.items():
        done = [(label, *outcomes[text]) for label, text in planned]
        results[query] = (planned[0][1], done[0][2] if done[0][1] == "ok" else {})
        if all(status == "ok" for _, status, _ in done):
            continue
        if known is None:
            known = set(prometheus.label_values("__name__", None, start, end))
        problem, failing = query_problem(done, planned[0][1], known)
        problems.append((query, problem, failing))
    return results, problems


def success_rate_check(prometheus, candidates, start, end):
    """How a success-rate panel's value compares with the truth from payment_requests_total, at
    four moments of the window, or None without such a panel."""
    if not candidates:
        return None
    query, text = candidates[0]
    window_seconds = longest_window(text) or 300
    truth_query = TRUE_SUCCESS_RATE.format(window=f"{window_seconds}s")
    moments = [end - step * (end - start) // 4 for step in range(4)]
    panel = parallel(lambda at: prometheus.instant(text, at), moments)
    truth = parallel(lambda at: prometheus.instant(truth_query, at), moments)
    pairs = [(as_percent(shown[0][1], query.unit), true[0][1])
             for shown, true in zip(panel, truth) if len(shown) == 1 and true
             and math.isfinite(shown[0][1]) and math.isfinite(true[0][1])]
    return {"title": query.panel, "query": text, "truth_query": truth_query,
            "panel_percent": [round(shown, 3) for shown, _ in pairs],
            "truth_percent": [round(true, 3) for _, true in pairs],
            "several_series": any(len(shown) > 1 for shown in panel),
            "agrees": bool(pairs) and all(abs(shown - true) <= SUCCESS_RATE_TOLERANCE
                                          for shown, true in pairs)}


def as_percent(value, unit):
    """A panel's value in percent, read by its unit (a bare ratio of at most 1 is a fraction)."""
    if unit == "percentunit" or (unit != "percent" and abs(value) <= 1):
        return value * 100
    return value


ASKS = {
    "currency_variable": "a $currency variable",
    "payment_type_variable": "a $payment_type variable",
    "panels_use_currency": "panels that use $currency",
    "panels_use_payment_type": "panels that use $payment_type",
    "customer_filter": "a customer filter (a customer variable that panels use)",
    "success_rate_panel": "a success-rate or SLA panel",
    "latency_percentile_panel": "a latency percentile panel",
    "revenue_by_currency": "revenue by currency",
    "success_rate_agrees": "the success rate agrees with payment_requests_total",
}


def course_asks(variables, queries, results, success):
    """{ask: True/False} for the course's asks (ASKS)."""
    def used(name):
        return any(name in referenced(query.text) for query in queries)
    customer = [name for name, variable in variables.items()
                if "customer" in (name + " " + variable.definition).lower() and used(name)]
    ran = {query: series for query, (_, series) in results.items() if series}
    return {
        "currency_variable": "currency" in variables,
        "payment_type_variable": "payment_type" in variables,
        "panels_use_currency": "currency" in variables and used("currency"),
        "panels_use_payment_type": "payment_type" in variables and used("payment_type"),
        "customer_filter": bool(customer),
        "success_rate_panel": success is not None,
        "latency_percentile_panel": any(
            "histogram_quantile" in query.text or "quantile_over_time" in query.text
            for query in ran),
        "revenue_by_currency": any(
            ("revenue" in (query.panel + query.text).lower() or "payment_amount_sum" in query.text)
            and all("currency" in dict(labels) for labels in series)
            for query, series in ran.items()),
        "success_rate_agrees": bool(success and success["agrees"]),
    }


def success_candidates(results):
    """[(query, text of its All run)] of the Prometheus queries that show a success rate or an
    SLA, those titled "success" first."""
    found = [(query, text) for query, (text, series) in results.items() if series
             and re.search(r"success|\bsla\b|availab", query.panel, re.I)
             and "payment_requests_total" in text]
    return sorted(found, key=lambda pair: "success" not in pair[0].panel.lower())


def dashboard_step(since_seconds):
    return max(SCRAPE_INTERVAL, math.ceil(since_seconds / DASHBOARD_STEPS / SCRAPE_INTERVAL)
               * SCRAPE_INTERVAL)


def check_dashboard(prometheus_url, dashboard_json_text, since_seconds, now=None):
    """A dashboard checked against the data of the window: what `dashboard --json` prints.
    DocumentError for a document Grafana would not import."""
    board = load_dashboard(dashboard_json_text)
    prometheus = Prometheus(prometheus_url)
    start, end = window(since_seconds, now)
    step = dashboard_step(end - start)
    variables = read_variables(board)
    queries = panel_queries(board, variables)
    checked = [query for query in queries if query.kind == "prometheus"]
    if len(checked) > MAX_PANEL_QUERIES:
        raise DocumentError(f"more than {MAX_PANEL_QUERIES} Prometheus queries: check a "
                            "smaller dashboard")
    notes = resolve_variables(prometheus, variables, start, end)
    results, problems = run_panel_queries(prometheus, checked, variables, start, end, step)
    success = success_rate_check(prometheus, success_candidates(results), start, end)
    problems.sort(key=lambda problem: checked.index(problem[0]))
    empty = [{"title": query.panel, "id": query.panel_id, "ref": query.ref, "query": query.text,
              "problem": problem, "selections": failing} for query, problem, failing in problems]
    return {
        "prometheus": prometheus.url, "title": board.get("title", ""), "start": iso(start),
        "end": iso(end), "step_seconds": step,
        "variables": {name: variable.values for name, variable in variables.items()},
        "checked_queries": len(checked),
        "query_runs": sum(len(selections(referenced(query.text), variables)) for query in results),
        "empty_panels": empty, "not_checked": not_checked(board, queries), "notes": notes,
        "asks": course_asks(variables, queries, results, success), "success_rate": success,
        "ok": not empty}


def not_checked(board, queries):
    """The panels whose queries go to other data sources, and library panels (their queries
    are not in the export)."""
    found = {(query.panel, query.kind) for query in queries if query.kind != "prometheus"}
    found |= {(str(panel.get("title") or panel.get("id")), "library panel")
              for panel in all_panels(board) if panel.get("libraryPanel")
              and not panel.get("targets")}
    return [{"title": title, "datasource": kind} for title, kind in sorted(found)]

# ---------------------------------------------------------------- reports


def incidents_report(report):
    lines = [f"{plural(len(report['incidents']), 'incident')} from "
             f"{readable_time(parse_time(report['start']))} to "
             f"{readable_time(parse_time(report['end']))} UTC (Prometheus {report['prometheus']})"]
    for incident in report["incidents"]:
        until = ("running " if incident["running"] else
                 "to " + readable_time(parse_time(incident["end"]))[11:])
        fired = ", ".join(
            f"{alert['alertname']} " + (f"after {format_duration(alert['after_seconds'])}"
                                        if alert["after_seconds"] >= 0 else "already firing")
            for alert in incident["alerts"]) or "none"
        lines.append(f"  {readable_time(parse_time(incident['start']))} {until:<11} "
                     f"{format_duration(incident['duration_seconds']):<8} "
                     f"{incident['scenario']:<20} alerts: {fired}")
    return "\n".join(lines)


def alerts_report(report, name):
    lines = [f"{name}: {plural(len(report['rules']), 'alerting rule')} scored against "
             f"{plural(len(report['incidents']), 'incident')} from "
             f"{readable_time(parse_time(report['start']))} to "
             f"{readable_time(parse_time(report['end']))} UTC (Prometheus {report['prometheus']})",
             ""]
    for score in report["rules"]:
        lines.append(f"{score['name']} (group {score['group']}, every "
                     f"{format_duration(score['interval_seconds'])}, for "
                     f"{format_duration(score['for_seconds'])})")
        lines.append(f"  {score['verdict']}")
        others = [f"{scenario} ({entry['caught']} of {entry['incidents']})"
                  for scenario, entry in score["by_scenario"].items()
                  if entry["caught"] and scenario != score["target"]]
        if others:
            lines.append(f"  also fired during: {', '.join(others)}")
        if score["false_alarms"]:
            first = score["false_alarms"][0]
            lines.append(f"  first false alarm: {readable_time(parse_time(first['start']))} to "
                         f"{readable_time(parse_time(first['end']))} UTC")
    verdict_line = "every rule caught an incident and raised no false alarm" if report["ok"] \
        else "not every rule caught an incident without a false alarm"
    return "\n".join([*lines, "", verdict_line])


def dashboard_report(report, name):
    lines = [f"{name}: dashboard {report['title']!r}, {report['checked_queries']} Prometheus "
             f"queries run {report['query_runs']} times (All, and each value of the variables "
             f"they use) from {readable_time(parse_time(report['start']))} to "
             f"{readable_time(parse_time(report['end']))} UTC (Prometheus {report['prometheus']})",
             ""]
    if report["empty_panels"]:
        lines.append("Panels that fail or show nothing:")
        for entry in report["empty_panels"]:
            lines.append(f"  {entry['title']!r} ({entry['ref']}): {entry['problem']}")
            lines.append(f"      {entry['query']}")
    else:
        lines.append("Every checked panel shows data.")
    if report["not_checked"]:
        lines.append("Not checked (other data sources): " + ", ".join(
            f"{entry['title']!r} ({entry['datasource']})" for entry in report["not_checked"]))
    lines.extend(f"Note: {note}" for note in report["notes"])
    lines.extend(["", "The course's asks:"])
    lines.extend(f"  [{'x' if met else ' '}] {ASKS[ask]}" for ask, met in report["asks"].items())
    success = report["success_rate"]
    if success and success["panel_percent"]:
        lines.append(f"      {success['title']!r} shows {success['panel_percent'][0]:.2f} %, "
                     f"the truth is {success['truth_percent'][0]:.2f} % (at the end)")
    return "\n".join(lines)

# ---------------------------------------------------------------- the command line


def parse_time(text):
    """Epoch seconds of an ISO-8601 UTC time (2026-11-20T06:00:00Z) or of a number."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def since_option(text):
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not 0 < seconds <= MAX_SINCE:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 32d")
    return seconds


def end_option(text):
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO-8601 time (2026-11-20T06:00:00Z)") from None


def make_parser():
    parser = argparse.ArgumentParser(
        prog="exercises.py", description="Check students' alert rules and dashboards against "
        "the incidents that really happened, from a real Prometheus (docs/exercises.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    incidents = commands.add_parser("incidents", help="the answer key: every incident of the "
                                    "window and the alerts that fired during it")
    alerts = commands.add_parser("alerts", help="score a rule file's alerting rules")
    alerts.add_argument("document", metavar="RULES.yml", help="a Prometheus rule file")
    dashboard = commands.add_parser("dashboard", help="check a Grafana dashboard's JSON export")
    dashboard.add_argument("document", metavar="DASHBOARD.json", help="Grafana's JSON export")
    for command, since in ((incidents, "7d"), (alerts, "7d"), (dashboard, "6h")):
        command.add_argument("--prometheus", metavar="URL", default=DEFAULT_PROMETHEUS,
                             help=f"Prometheus to ask (default {DEFAULT_PROMETHEUS})")
        command.add_argument("--since", type=since_option, default=since, metavar="DURATION",
                             help=f"how far back to look, a Prometheus duration (default {since})")
        command.add_argument("--end", type=end_option, default=None, metavar="TIME",
                             help="end of the window, ISO-8601 UTC (default now)")
        command.add_argument("--json", action="store_true", help="print JSON for tools")
    return parser


def read_document(path):
    """The text of the file at `path`; DocumentError when it cannot be read or is too large."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as error:
        raise DocumentError(f"cannot read it: {error.strerror}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"larger than {MAX_DOCUMENT_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def run_command(options):
    """(report, its text, exit code) of the command `options` name."""
    if options.command == "incidents":
        report = answer_key(options.prometheus, options.since, options.end)
        return report, incidents_report(report), 0
    name = os.path.basename(options.document)
    try:
        text = read_document(options.document)
        if options.command == "alerts":
            report = score_alert_rules(options.prometheus, text, options.since, options.end)
        else:
            report = check_dashboard(options.prometheus, text, options.since, options.end)
    except DocumentError as error:
        raise DocumentError(f"{name}: {error}") from None
    describe = alerts_report if options.command == "alerts" else dashboard_report
    return report, describe(report, name), 0 if report["ok"] else 1


def main(argv=None):
    """Run one command; exit code 0 when all is well, 1 when the check finds a problem, 2 when
    it cannot check (a document Prometheus or Grafana would refuse, no Prometheus)."""
    options = make_parser().parse_args(argv)
    try:
        report, text, code = run_command(options)
    except (DocumentError, PrometheusError, MissingDependency) as error:
        print(f"exercises.py {options.command}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if options.json else text)
    return code


if __name__ == "__main__":
    sys.exit(main())
