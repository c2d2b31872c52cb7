"""Test harness: real apps on port 0, and real Prometheus / victoria-metrics servers on free loopback ports.

Integration tests need Debian's `prometheus` (with `promtool`) and `victoria-metrics`. On a laptop without
them those tests skip; under CI=true a missing binary fails them instead.
"""
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import payment_api

# influxdb-client logs from its own threads, some of which outlive a test: without a handler of its own, Python's
# last-resort handler would print those lines into the test output after the test (the service filters them)
logging.getLogger("influxdb_client").addHandler(logging.NullHandler())

QUIET = {"simulation_enabled": False, "failure_rate": 0.0, "decline_rate": 0.0, "influxdb_url": "", "host": "127.0.0.1", "port": 0, "shutdown_timeout": 5.0}


class FakeClock:
    """A clock the test moves by hand: for the simulator's schedule, scenario expiry, keys and the UTC day."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return self.now


def eventually(condition, timeout=10.0, interval=0.05, message="condition"):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout} s (last: {result!r})")
        time.sleep(interval)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require_binary(name):
    """The binary's path; skip without it, except under CI=true where its absence is a failure."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))  # a venv's bin/
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required under CI=true (bash .ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def node_checker(folder, package, timeout):
    """check({name: query}) -> {name: result}, from one node run of `folder`/check.mjs, which reads the queries
    as JSON and writes a result with each name. The npm `package` it loads must be the version pinned in
    `folder`/package-lock.json: skip without it, except under CI=true where that is a failure."""
    node = require_binary("node")
    lock = json.loads((folder / "package-lock.json").read_text())
    pinned = lock["packages"][f"node_modules/{package}"]["version"]
    installed = folder / "node_modules" / package / "package.json"
    installed_version = json.loads(installed.read_text())["version"] if installed.exists() else None
    if installed_version != pinned:
        message = (f"{package} {pinned} is not installed (found {installed_version}): "
                   f"run npm ci --prefix .ci/{folder.name}")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    def check(queries):
        run = subprocess.run([node, str(folder / "check.mjs")], input=json.dumps([{"name": name, "query": query}
                                                                              for name, query in queries.items()]),
                             capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, f"the checker failed:\n{run.stderr}"
        return {result["name"]: result for result in json.loads(run.stdout)}

    return check


def http(method, url, body=None, headers=None, timeout=10):
    """(status, headers, parsed JSON or raw bytes) for one request; 4xx and 5xx are answers, not errors."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else (headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, response_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, response_headers, raw = error.code, error.headers, error.read()
    is_json = response_headers.get("Content-Type", "").startswith("application/json")
    return status, response_headers, json.loads(raw) if is_json and raw else raw


def answers_health(url):
    """Whether the service at `url` answers /health with 200 now (False while nothing listens there yet)."""
    try:
        return http("GET", url + "/health", timeout=1)[0] == 200
    except OSError:
        return False


def metric_value(app_url, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`, read from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    _, _, text = http("GET", app_url + "/metrics")
    return sum(sample.value for family in text_string_to_metric_families(text.decode())
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def make_app():
    """Start PaymentApps with QUIET settings plus overrides; every one is stopped after the test."""
    apps = []

    def start(clock=None, monotonic=None, **overrides):
        settings = dataclasses.replace(payment_api.Settings(), **{**QUIET, **overrides})
        kwargs = {key: value for key, value in (("clock", clock), ("monotonic", monotonic)) if value}
        app = payment_api.PaymentApp(settings, **kwargs).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        if not app.stopping:
            app.stop()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def run_service(tmp_path):
    """Start `python payment_api.py` (or other `argv` for python) with extra environment; stdout goes to a file;
    killed if a test leaves it."""
    processes = []

    def start(argv=("payment_api.py",), **env):
        port = int(env.get("PORT") or free_port())
        log_path = tmp_path / f"service-{len(processes)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, *argv], cwd=os.path.dirname(os.path.abspath(__file__)), stdout=log_file,
                                       stderr=subprocess.STDOUT,
                                       env={**os.environ, "HOST": "127.0.0.1", **env, "PORT": str(port)})
        processes.append(process)
        process.url, process.log_path = f"http://127.0.0.1:{port}", log_path

        def ready():
            assert process.poll() is None, log_path.read_text()
            return answers_health(process.url)
        eventually(ready, timeout=15, message="service ready")
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


class ServerProcess:
    """A real server binary on a free loopback port, with its data in a temporary folder."""

    def __init__(self, args, port, tmp_path, name, ready_path):
        self.args, self.port, self.tmp_path, self.name, self.ready_path = args, port, tmp_path, name, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self):
        self.log = open(self.tmp_path / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        eventually(self._ready, timeout=30, message=f"{self.name} ready")
        return self

    def _ready(self):
        assert self.process.poll() is None, f"{self.name} exited; see {self.log.name}"
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()

    def query(self, promql, path="/api/v1/query"):
        url = self.url + path + "?" + urllib.parse.urlencode({"query": promql, "nocache": 1})
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["result"]


class VictoriaMetrics(ServerProcess):
    """victoria-metrics accepts influxdb-client's writes at /api/v2/write (measurement_field becomes a metric)."""

    def __init__(self, tmp_path):
        port = free_port()
        super().__init__([require_binary("victoria-metrics"), f"-httpListenAddr=127.0.0.1:{port}",
                          f"-storageDataPath={tmp_path / 'vm-data'}", "-search.latencyOffset=0s",
                          "-loggerLevel=ERROR"], port, tmp_path, "victoria-metrics", "/health")

    def count_points(self, metric="payment_amount"):
        """How many points of `metric` were written (flushing first, so fresh points are visible)."""
        urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10).read()
        result = self.query(f"sum(count_over_time({metric}[1h]))")
        return int(float(result[0]["value"][1])) if result else 0


@pytest.fixture
def victoria_metrics(tmp_path):
    server = VictoriaMetrics(tmp_path).start()
    yield server
    server.stop()


class Prometheus(ServerProcess):
    """Prometheus scraping one app every second and evaluating the given rule files every second."""

    def __init__(self, tmp_path, target, rule_files=()):
        port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(path) for path in rule_files],
                  "scrape_configs": [{"job_name": "payment-api", "static_configs": [{"targets": [target]}]}]}
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is valid YAML
        super().__init__([require_binary("prometheus"), f"--config.file={config_path}",
                          f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{port}",
                          "--log.level=warn"], port, tmp_path, "prometheus", "/-/ready")

    def firing_alerts(self):
        with urllib.request.urlopen(self.url + "/api/v1/alerts", timeout=10) as response:
            alerts = json.load(response)["data"]["alerts"]
        return {alert["labels"]["alertname"] for alert in alerts if alert["state"] == "firing"}


@pytest.fixture
def start_prometheus(tmp_path):
    servers = []

    def start(app, rule_files=()):
        host_port = app.url.removeprefix("http://")
        server = Prometheus(tmp_path, host_port, rule_files).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class LoopbackServer(ThreadingHTTPServer):
    """A stand-in HTTP server on 127.0.0.1 (a free port unless given), served from a thread inside `with`."""
    daemon_threads = False

    def __init__(self, handler, name, port=0):
        super().__init__(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name=name)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        self._thread.join(5)
        self.server_close()


class RecordingInfluxDB(LoopbackServer):
    """Answers every write with 204 and keeps the line protocol it received; or, while `refusing`, drops the
    connection without an answer and counts the attempt; or, with `error_status` set, answers that error with
    InfluxDB's JSON error body.

    victoria-metrics keeps timestamps to the millisecond, stores no string field and turns the point into
    metrics, and a stopped one refuses connections without a trace: the exact line protocol and the number
    of write attempts are seen here instead.
    """

    def __init__(self):
        self.bodies, self.refusing, self.refused = [], False, 0
        self.error_status = None

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request a connection, so no thread idles
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                if self.refusing:
                    self.refused += 1
                    return  # the connection closes without a status line
                if self.error_status:  # with InfluxDB's error body, whose message clients pass on
                    self.refused += 1
                    answer = json.dumps({"code": "invalid" if self.error_status < 500 else "unavailable",
                                         "message": "rejected by the test"}).encode()
                    handler.send_response(self.error_status)
                    handler.send_header("Content-Type", "application/json")
                    handler.send_header("Content-Length", str(len(answer)))
                    handler.end_headers()
                    handler.wfile.write(answer)
                    return
                self.bodies.append((handler.path, body))
                handler.send_response(204)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(Handler, "recording-influxdb")

    def lines(self):
        return [line for _, body in list(self.bodies) for line in body.decode().splitlines()]

