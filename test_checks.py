"""The checks of students' work in the service: /api/checks, what the console's "Check my work" calls.

Against the real Prometheus of test_exercises.py (two days of backfilled history with known incidents, one module
fixture): a pasted rule file or dashboard gets exactly what `exercises.py ... --json` prints; a document Prometheus or
Grafana would refuse is a 422 naming the rule; without PROMETHEUS_URL the checks are off and say how to turn them on;
bodies are bounded in size and type, checks in time and in number; and a check sends Prometheus nothing but queries.
"""
import json
import posixpath
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import openapi
import payment_api
from conftest import eventually, free_port, http
from test_exercises import END, REFUSED, SHIPPED_DASHBOARD, SHIPPED_RULES, history, run, student_rules  # noqa: F401

YAML = {"Content-Type": "application/yaml"}
JSON = {"Content-Type": "application/json"}
WINDOW = {"alerts": f"since=2d&end={END}", "dashboard": f"since=6h&end={END}", "incidents": f"since=2d&end={END}"}


@pytest.fixture
def checking(history, make_app):
    """A service whose PROMETHEUS_URL is the history's Prometheus."""
    return make_app(prometheus_url=history.url)


def check(app, kind, document=None, headers=YAML, query=None):
    """(status, headers, JSON answer) of one check of `document` (text, or a dict sent as JSON)."""
    url = f"{app.url}/api/checks/{kind}?{WINDOW[kind] if query is None else query}"
    if document is None:
        return http("GET", url, timeout=60)
    body = (json.dumps(document) if isinstance(document, dict) else document).encode()
    return http("POST", url, body, headers if not isinstance(document, dict) else JSON, timeout=60)

# ---------------------------------------------------------------- the same report as the command line


@pytest.mark.parametrize("kind, document", [("alerts", SHIPPED_RULES), ("dashboard", SHIPPED_DASHBOARD),
                                            ("incidents", None)])
def test_pasted_work_gets_exactly_the_json_exercises_py_prints(checking, history, kind, document):
    since = "6h" if kind == "dashboard" else "2d"
    cli = run(kind, *([document] if document else []), "--prometheus", history.url, "--since", since, "--end", END,
              "--json")
    assert cli.returncode in (0, 1), cli.stderr
    status, _, answer = check(checking, kind, document.read_text() if document else None,
                              JSON if kind == "dashboard" else YAML)
    assert status == 200, answer
    assert answer == json.loads(cli.stdout)


def test_the_documented_examples_are_checked_as_the_document_says(checking):
    """The request bodies /openapi.json shows: the YAML and the JSON rule file are one file, scored alike; the
    dashboard's misspelled metric is named as its example answer names it."""
    assert yaml.safe_load(openapi.RULE_FILE_YAML) == openapi.RULE_FILE_EXAMPLE
    status, _, as_yaml = check(checking, "alerts", openapi.RULE_FILE_YAML)
    assert status == 200 and as_yaml == check(checking, "alerts", openapi.RULE_FILE_EXAMPLE)[2]
    score, = as_yaml["rules"]
    documented, = openapi.alerts_report_example()["rules"]
    assert (score["name"], score["target"], score["verdict"]) == (
        documented["name"], documented["target"], documented["verdict"])
    status, _, board = check(checking, "dashboard", openapi.DASHBOARD_EXAMPLE)
    documented = openapi.dashboard_report_example()
    assert status == 200 and board["empty_panels"] == documented["empty_panels"], board
    assert (board["asks"], board["variables"], board["ok"]) == (documented["asks"], documented["variables"], False)


@pytest.mark.parametrize("case", ["a YAML syntax error", "a function without its range", "a misspelled field"])
def test_a_rule_file_prometheus_would_refuse_is_a_422_naming_the_rule_and_the_problem(checking, case):
    text, beginning, ending = REFUSED[case]
    status, _, answer = check(checking, "alerts", text)
    assert status == 422 and beginning in answer["error"] and answer["error"].endswith(ending), answer


def test_a_document_grafana_would_not_import_is_a_422(checking):
    status, _, answer = check(checking, "dashboard", "[1, 2", JSON)
    assert (status, answer["error"].split(":")[0]) == (422, "not JSON"), answer
    status, _, answer = check(checking, "dashboard", {"title": "no panels"})
    assert status == 422 and answer["error"].startswith("not a Grafana dashboard: there is no panels list"), answer


def test_the_window_is_read_from_since_and_end_and_bounded_to_7_days(checking):
    status, _, answer = check(checking, "incidents", query=f"since=1d&end={END}")
    assert status == 200 and (answer["start"], answer["end"]) == ("2026-11-19T00:00:00Z", END), answer
    for query, field in [("since=8d", "since"), ("since=0", "since"), ("since=soon", "since"), ("end=yesterday", "end"),
                         ("end=nan", "end"), ("end=1e400", "end"), ("limit=5", "limit")]:
        status, _, answer = check(checking, "incidents", query=query)
        assert (status, answer.get("field")) == (400, field), (query, answer)

# ---------------------------------------------------------------- off, and bounded in size, type, time and number


def test_without_prometheus_url_the_checks_are_off_and_say_how_to_turn_them_on(make_app):
    app = make_app()
    status, _, state = http("GET", app.url + "/api/checks")
    assert status == 200 and state["enabled"] is False and state["prometheus"] is None
    assert "PROMETHEUS_URL" in state["message"] and state["asks"]["currency_variable"] == "a $currency variable"
    for kind, document in [("alerts", SHIPPED_RULES.read_text()), ("dashboard", "{}"), ("incidents", None)]:
        status, _, answer = check(app, kind, document, JSON if kind == "dashboard" else YAML)
        assert (status, answer) == (409, {"error": payment_api.CHECKS_OFF}), kind
    assert "PROMETHEUS_URL" in payment_api.CHECKS_OFF and "exercises.py" in payment_api.CHECKS_OFF


def test_a_dashboard_of_300_kb_is_read_and_a_document_over_1_mib_is_refused_with_413(checking, history):
    padded = SHIPPED_DASHBOARD.read_text() + " " * 240_000  # as big as a large export, beyond MAX_BODY_BYTES
    assert len(padded) > 300_000 > payment_api.MAX_BODY_BYTES
    status, _, answer = check(checking, "dashboard", padded, JSON)
    assert status == 200 and answer["ok"], answer.get("error")
    too_big = b"{" + b" " * payment_api.MAX_CHECK_BODY_BYTES + b"}"
    status, headers, answer = http("POST", checking.url + "/api/checks/dashboard", too_big, JSON, timeout=60)
    assert (status, answer) == (413, {"error": f"body is larger than {payment_api.MAX_CHECK_BODY_BYTES} bytes"})
    assert headers["Connection"] == "close"
    status, _, answer = http("POST", checking.url + "/api/payments", b" " * (payment_api.MAX_BODY_BYTES + 1), JSON)
    assert status == 413, "payments keep their own bound"


def test_a_text_plain_post_is_refused_with_415_and_a_page_of_another_site_with_403(checking):
    """A form of another site can send text/plain, never YAML or JSON; a script of another site names its Origin."""
    rules = SHIPPED_RULES.read_text()
    for path, content_type in [("alerts", "text/plain"), ("alerts", "application/x-www-form-urlencoded"),
                               ("dashboard", "application/yaml"), ("dashboard", "text/plain")]:
        status, _, answer = check(checking, path, rules, {"Content-Type": content_type})
        assert status == 415 and answer["error"].startswith("Content-Type must be "), (path, content_type, answer)
    status, _, answer = check(checking, "alerts", rules, {**YAML, "Origin": "http://elsewhere.example"})
    assert status == 403 and "ALLOWED_ORIGINS" in answer["error"]
    status, _, answer = http("POST", checking.url + "/api/payments", b"amount: 10", YAML)
    assert (status, answer["error"]) == (415, "Content-Type must be application/json"), "YAML is for rule files only"
    for content_type in ("text/yaml", "application/x-yaml", "text/x-yaml; charset=utf-8"):
        assert check(checking, "alerts", rules, {"Content-Type": content_type})[0] == 200, content_type


def test_yaml_without_pyyaml_is_a_415_that_says_so_and_a_rule_file_written_as_json_still_works(checking, monkeypatch):
    as_json = yaml.safe_load(SHIPPED_RULES.read_text())
    with_pyyaml = check(checking, "alerts", as_json)
    monkeypatch.setitem(sys.modules, "yaml", None)  # the service runs in this process: import yaml now fails
    status, _, answer = check(checking, "alerts", SHIPPED_RULES.read_text())
    assert status == 415 and "needs PyYAML, which is not installed" in answer["error"], answer
    assert "requirements-exercises.txt" in answer["error"]
    assert http("GET", checking.url + "/api/checks")[2]["yamlRuleFiles"] is False
    status, _, answer = check(checking, "alerts", as_json)
    assert status == 200 and answer == with_pyyaml[2]


def test_no_prometheus_at_prometheus_url_is_a_502(make_app):
    app = make_app(prometheus_url=f"http://127.0.0.1:{free_port()}")
    status, _, answer = check(app, "incidents", query="since=1h")
    assert status == 502 and answer["error"].startswith("no answer from Prometheus at http://127.0.0.1:"), answer


class StalledPrometheus:
    """An HTTP server that answers nothing until released, then 503: a Prometheus that hangs."""

    def __init__(self):
        self.release = threading.Event()
        self.requests = 0
        stalled = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                stalled.requests += 1
                stalled.release.wait(30)
                self.send_error(503)
            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="stalled-prometheus")
        self.thread.start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def stalled():
    prometheus = StalledPrometheus()
    yield prometheus
    prometheus.stop()


def test_a_check_is_answered_within_check_seconds_and_no_more_than_two_keep_prometheus_busy(make_app, stalled,
                                                                                            monkeypatch):
    """Checks nobody waits for any more still hold their place until Prometheus answers them."""
    monkeypatch.setattr(payment_api, "CHECK_SECONDS", 1)
    app = make_app(prometheus_url=stalled.url)
    answers = []
    waiting = [threading.Thread(target=lambda: answers.append(check(app, "incidents", query="since=1h")))
               for _ in range(payment_api.MAX_CHECKS)]
    started = time.monotonic()
    for thread in waiting:
        thread.start()
    eventually(lambda: stalled.requests == payment_api.MAX_CHECKS, timeout=5, message="both checks asking")
    status, headers, answer = check(app, "incidents", query="since=1h")
    assert (status, headers["Retry-After"]) == (503, "5") and "retry in a few seconds" in answer["error"], answer
    for thread in waiting:
        thread.join(10)
    assert [status for status, _, _ in answers] == [504, 504] and time.monotonic() - started < 3, answers
    assert answers[0][2]["error"].startswith("the check took more than 1 s")
    assert check(app, "incidents", query="since=1h")[0] == 503, "unanswered checks still hold their places"
    stalled.release.set()
    status, _, answer = eventually(lambda: (lambda found: found if found[0] != 503 else None)(
        check(app, "incidents", query="since=1h")), timeout=10, message="a place again")
    assert status == 502 and "answered 503" in answer["error"], answer

def test_a_stop_does_not_wait_for_a_check_beyond_its_shutdown_timeout(make_app, stalled):
    app = make_app(prometheus_url=stalled.url, shutdown_timeout=2.0)
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(check(app, "incidents", query="since=1h")))
    waiting.start()
    eventually(lambda: stalled.requests == 1, timeout=5, message="the check asking")
    started = time.monotonic()
    app.stop()
    waiting.join(10)
    assert time.monotonic() - started < 3 and answers[0][0] == 504, answers
    assert answers[0][2] == {"error": "the service is stopping"}

# ---------------------------------------------------------------- a check changes nothing


class RecordingProxy:
    """Forwards every request to Prometheus and records its method and path."""

    def __init__(self, target):
        self.seen = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                proxy.seen.append((self.command, self.path.split("?")[0]))
                request = urllib.request.Request(target + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": self.headers.get("Content-Type", "")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, answer = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, answer = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            do_GET = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="recording-proxy")
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


QUERIES = {"/api/v1/query", "/api/v1/query_range", "/api/v1/labels"}  # what a POST may ask: a query, nothing else


def test_a_check_sends_prometheus_nothing_but_queries_whatever_the_document_says(history, make_app):
    """Prometheus changes nothing on a GET (its admin API, /-/reload, /-/quit and remote write take POST, PUT or
    DELETE): every request is a GET, or a POST to a query endpoint, even for a document that tries to climb out of
    a label name."""
    proxy = RecordingProxy(history.url)
    try:
        app = make_app(prometheus_url=proxy.url, simulation_enabled=False)
        board = json.loads(SHIPPED_DASHBOARD.read_text())
        board["templating"]["list"].append({"name": "sneaky", "type": "query", "datasource": {"type": "prometheus"},
                                            "query": "label_values(..)"})
        rules = student_rules('alert: Sneaky\nexpr: up == 0\nannotations:\n  summary: "{{ query \\"up\\" }}"',
                              "record: payment_api:admin\nexpr: vector(1)")
        assert check(app, "dashboard", json.loads(SHIPPED_DASHBOARD.read_text()))[0] == 200
        # label_values(..) climbs from /api/v1/label/../values to /api/v1/values: a GET, which Prometheus answers 404
        assert check(app, "dashboard", board)[0] == 502
        assert check(app, "alerts", rules)[0] == 200
        assert check(app, "incidents")[0] == 200
    finally:
        proxy.stop()
    unexpected = [(method, path) for method, path in proxy.seen
                  if method != "GET" and not (method == "POST" and posixpath.normpath(path) in QUERIES)]
    assert len(proxy.seen) > 20 and not unexpected, unexpected
    assert http("GET", app.url + "/api/scenarios/history")[2]["history"] == []
    assert not any(scenario["active"] for scenario in http("GET", app.url + "/api/scenarios")[2]["scenarios"])
