"""Alerts that reach someone, and a service that scales to replicas, proved with a real Prometheus and Alertmanager.

A. Delivery: the app, Prometheus with the fast copy of the shipped rules (test_stack.py derives it), and Debian's
   `prometheus-alertmanager` with the shipped alertmanager.yml. Its e-mail receivers are the one change: each
   becomes a webhook to a small receiver in this test, because the real receiver (Mailpit or a mail server)
   cannot run here, and a webhook's JSON shows exactly which receiver got which labels and annotations.
   Grouping timers are shortened so a notification comes within seconds; routes and inhibition stay as shipped.
B. Replicas: three apps on free ports behind one Prometheus using the shipped scrape job, whose DNS discovery of
   the compose service name is replaced by file-based discovery (no DNS server for a made-up name can run here);
   the relabelling stays as shipped.
C. The compose file, Alertmanager and the runbook links, checked statically.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import payment_api
from conftest import QUIET, Prometheus, RecordingInfluxDB, ServerProcess, eventually, free_port, http, require_binary
from test_stack import (COMPOSE, TRAFFIC, Stack, compose, dashboard, grafana_value, interpolate, panel_queries,
                        selections, shipped_alert, variable_options, variables, write_fast_rules)

HERE = Path(__file__).resolve().parent
ALERTMANAGER_CONFIG = HERE / "alertmanager" / "alertmanager.yml"
PROMETHEUS_CONFIG = HERE / "prometheus" / "prometheus.yml"
ALERTS = HERE / "prometheus" / "alerts.yml"
RUNBOOKS = HERE / "docs" / "alerts-and-runbooks.md"  # runbook_url is a path from the repository root
FAST_GROUPING = {"group_wait": "1s", "group_interval": "1s"}  # shipped: 10-30 s and 5 min
DELIVERY_TIMEOUT = 60  # seconds: a 20 s rate window, a 5 s `for:`, Prometheus' ~6 s first scrape, a busy machine
REPLICA_TRAFFIC = {**TRAFFIC, "simulation_rate": 50}  # three of them share 2 cores with Prometheus and the test

# ---------------------------------------------------------------- helpers: configuration derived from the shipped files


def fast_alertmanager_config(webhook_url):
    """The shipped alertmanager.yml with each receiver's e-mail replaced by a webhook to `webhook_url`/<receiver name>
    (send_resolved as shipped), and the grouping timers of every route shortened; nothing else changes."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        emails = receiver.pop("email_configs")
        receiver["webhook_configs"] = [{"url": f"{webhook_url}/{receiver['name']}",
                                        "send_resolved": email.get("send_resolved", False)} for email in emails]
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        for key, fast in FAST_GROUPING.items():
            if key in route:
                route[key] = fast
        routes.extend(route.get("routes", []))
    return config


def shipped_scrape_job(discovery):
    """The shipped payment-api scrape job (relabelling included) with `discovery` in place of its DNS discovery."""
    job, = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    job = {key: value for key, value in job.items() if key != "dns_sd_configs"}
    return {**job, **discovery}


class AlertingPrometheus(Prometheus):
    """conftest's Prometheus (1 s scrapes and evaluations, the given rules) with the given scrape job, sending its
    alerts to `alertmanager` (host:port)."""

    def __init__(self, folder, scrape_job, rule_files, alertmanager):
        super().__init__(folder, "127.0.0.1:9", rule_files)
        config_path = Path(next(arg for arg in self.args if arg.startswith("--config.file=")).split("=", 1)[1])
        config = json.loads(config_path.read_text())
        config["scrape_configs"] = [scrape_job]
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        config_path.write_text(json.dumps(config))

    def firing(self, name):
        """The labels of every firing instance of the alert `name`."""
        with urllib.request.urlopen(self.url + "/api/v1/alerts", timeout=10) as response:
            alerts = json.load(response)["data"]["alerts"]
        return [alert["labels"] for alert in alerts if alert["labels"]["alertname"] == name and alert["state"] == "firing"]


class Alertmanager(ServerProcess):
    """Debian's prometheus-alertmanager with `config_path`, alone (no cluster), on a free loopback port."""

    def __init__(self, folder, config_path):
        port = free_port()
        super().__init__([require_binary("prometheus-alertmanager"), f"--config.file={config_path}",
                          f"--storage.path={folder / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{port}",
                          "--cluster.listen-address=", "--log.level=warn"], port, folder, "alertmanager", "/-/ready")
        self.address = f"127.0.0.1:{port}"

    def alerts(self, name):
        """Every alert called `name` Alertmanager holds, with its status (active, or suppressed and by what)."""
        _, _, alerts = http("GET", self.url + "/api/v2/alerts?" + urllib.parse.urlencode({"filter": f'alertname="{name}"'}))
        return alerts

    def post(self, *label_sets):
        """Send alerts as a rule evaluator would (they stay active for 5 minutes unless resolved)."""
        status, _, body = http("POST", self.url + "/api/v2/alerts", [{"labels": labels} for labels in label_sets])
        assert status == 200, body


class WebhookReceiver(RecordingInfluxDB):
    """Stands in for the e-mail inboxes: conftest's recording HTTP server (it answers every POST with 204 and keeps
    it) read as Alertmanager's webhook notifications."""

    @property
    def notifications(self):
        """(receiver, JSON payload) of every notification so far, in order."""
        return [(path.strip("/"), json.loads(body)) for path, body in list(self.bodies)]

    def received(self, receiver, alertname, status, since=0):
        """Every alert of that name and status (firing or resolved) delivered to `receiver` in notification
        `since` or later."""
        return [alert for path, payload in self.notifications[since:] if path == receiver
                for alert in payload["alerts"] if alert["labels"]["alertname"] == alertname and alert["status"] == status]


@dataclasses.dataclass
class AlertingStack:
    apps: list
    prometheus: AlertingPrometheus
    alertmanager: Alertmanager
    webhook: WebhookReceiver

    def address(self, app):
        return app.url.removeprefix("http://")


@pytest.fixture
def start_alerting_stack(tmp_path_factory):
    """Start `replicas` apps, the Alertmanager with the fast copy of the shipped config, and Prometheus with the fast
    rules discovering the apps through a file; everything is stopped afterwards, last started first."""
    with contextlib.ExitStack() as started:
        def start(replicas, traffic):
            folder = tmp_path_factory.mktemp("alerting")
            webhook = started.enter_context(WebhookReceiver())
            config_path = folder / "alertmanager.yml"
            config_path.write_text(json.dumps(fast_alertmanager_config(webhook.url)))
            alertmanager = Alertmanager(folder, config_path)
            started.callback(alertmanager.stop)
            alertmanager.start()
            settings = dataclasses.replace(payment_api.Settings(), **{**QUIET, **traffic})
            apps = []
            started.callback(lambda: [app.stop() for app in apps if not app.stopping])
            for _ in range(replicas):
                apps.append(payment_api.PaymentApp(settings).start())
            # File-based discovery stands in for the compose DNS name: no DNS server can answer for it here.
            targets = folder / "targets.json"
            targets.write_text(json.dumps([{"targets": [app.url.removeprefix("http://") for app in apps]}]))
            job = shipped_scrape_job({"file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]})
            prometheus = AlertingPrometheus(folder, job, write_fast_rules(folder), alertmanager.address)
            started.callback(prometheus.stop)
            prometheus.start()
            return AlertingStack(apps, prometheus, alertmanager, webhook)

        yield start


def scenario(app, method, name):
    status, _, body = http(method, f"{app.url}/api/scenarios/{name}")
    assert status == 200, body

# ---------------------------------------------------------------- A. delivery through a real Alertmanager


def test_fast_alertmanager_config_changes_only_receivers_and_grouping_timers_and_passes_amtool(tmp_path):
    amtool = require_binary("amtool")
    shipped, fast = yaml.safe_load(ALERTMANAGER_CONFIG.read_text()), fast_alertmanager_config("http://127.0.0.1:9")
    assert fast["inhibit_rules"] == shipped["inhibit_rules"] and fast["global"] == shipped["global"]
    assert all(email["send_resolved"] for receiver in shipped["receivers"] for email in receiver["email_configs"])

    def without_timers(route):
        return {key: [without_timers(child) for child in value] if key == "routes" else value
                for key, value in route.items() if key not in FAST_GROUPING}
    assert without_timers(fast["route"]) == without_timers(shipped["route"])
    assert [receiver["name"] for receiver in fast["receivers"]] == [receiver["name"] for receiver in shipped["receivers"]]
    copy_path = tmp_path / "alertmanager.yml"
    copy_path.write_text(json.dumps(fast))
    for path in (ALERTMANAGER_CONFIG, copy_path):
        result = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def assert_delivered_as_shipped(alert, name):
    """A delivered alert carries the shipped severity, service and annotations, its description rendered."""
    shipped = shipped_alert(name)
    assert {key: alert["labels"][key] for key in shipped["labels"]} == shipped["labels"]
    assert alert["annotations"]["summary"] == shipped["annotations"]["summary"]
    assert alert["annotations"]["runbook_url"] == shipped["annotations"]["runbook_url"]
    assert "{{" not in alert["annotations"]["description"] and "error expanding" not in alert["annotations"]["description"]


def test_error_spike_reaches_the_team_receiver_with_labels_and_annotations_and_its_end_is_notified(
        start_alerting_stack):
    stack = start_alerting_stack(1, TRAFFIC)
    app, = stack.apps
    webhook = stack.webhook

    scenario(app, "POST", "error_spike")
    fired, = eventually(lambda: webhook.received("payments-team", "HighPaymentErrorRate", "firing"),
                        timeout=DELIVERY_TIMEOUT, interval=0.25, message="HighPaymentErrorRate at the team's receiver")
    assert_delivered_as_shipped(fired, "HighPaymentErrorRate")
    assert re.match(r"[\d.]+% of payments answered 500", fired["annotations"]["description"]), fired
    assert float(fired["annotations"]["description"].split("%")[0]) > 5
    assert not webhook.received("payments-oncall", "HighPaymentErrorRate", "firing"), "a warning paged the on-call"

    scenario(app, "DELETE", "error_spike")
    resolved, = eventually(lambda: webhook.received("payments-team", "HighPaymentErrorRate", "resolved"),
                           timeout=DELIVERY_TIMEOUT, interval=0.25, message="HighPaymentErrorRate resolved")
    assert resolved["labels"] == fired["labels"] and resolved["endsAt"] > fired["startsAt"]


def test_unreachable_service_delivers_payment_api_down_to_the_on_call_and_its_warnings_are_inhibited(
        start_alerting_stack):
    """The warning fires, then the service stops answering while its error-rate window still holds the spike."""
    stack = start_alerting_stack(1, TRAFFIC)
    app, = stack.apps
    webhook, alertmanager = stack.webhook, stack.alertmanager
    scenario(app, "POST", "error_spike")
    eventually(lambda: webhook.received("payments-team", "HighPaymentErrorRate", "firing"),
               timeout=DELIVERY_TIMEOUT, interval=0.25, message="HighPaymentErrorRate delivered")
    delivered_before = len(webhook.notifications)
    app.stop()
    down, = eventually(lambda: webhook.received("payments-oncall", "PaymentApiDown", "firing", delivered_before),
                       timeout=DELIVERY_TIMEOUT, interval=0.25, message="PaymentApiDown at the on-call receiver")
    assert_delivered_as_shipped(down, "PaymentApiDown")
    assert down["labels"]["instance"] == stack.address(app) and down["labels"]["job"] == "payment-api"
    inhibited = eventually(lambda: [alert for alert in alertmanager.alerts("HighPaymentErrorRate")
                                    if alert["status"]["state"] == "suppressed" and alert["status"]["inhibitedBy"]],
                           timeout=15, interval=0.2, message="HighPaymentErrorRate inhibited while the service is down")
    sources = {alert["fingerprint"]: alert["labels"]["alertname"] for alert in alertmanager.alerts("PaymentApiUnreachable")}
    assert set(inhibited[0]["status"]["inhibitedBy"]) <= set(sources), (inhibited, sources)
    assert not webhook.received("payments-team", "HighPaymentErrorRate", "firing", delivered_before)

# ---------------------------------------------------------------- B. replicas


def query_at(stack, promql, at):
    return stack.api("/api/v1/query", query=promql, time=at)["result"]


def keyed(result):
    """{labels: value} of an instant query's answer."""
    return {tuple(sorted(row["metric"].items())): float(row["value"][1]) for row in result}


def is_additive(expr):
    """A sum of counts (rates, payments, replicas) adds up over replicas; ratios, averages and quantiles do not."""
    return "/" not in expr and "histogram_quantile" not in expr and "avg(" not in expr


def test_replicas_have_one_up_series_each_and_dashboard_totals_for_all_equal_the_sum_of_each(start_alerting_stack):
    stack = start_alerting_stack(3, REPLICA_TRAFFIC)
    addresses = sorted(stack.address(app) for app in stack.apps)
    view = Stack(stack.apps[0], stack.prometheus)
    eventually(lambda: len(view.query('up{job="payment-api"} == 1')) == 3 and view.query(
        'count(sum by (instance) (rate(payment_duration_seconds_count[5s])) > 0) == 3'),
        timeout=60, interval=0.5, message="three replicas scraped, each with payments")
    up = view.query('up{job="payment-api"}')
    assert sorted(row["metric"]["instance"] for row in up) == addresses  # one series per replica, named by address
    assert all(row["metric"]["service"] == "payment-api" and row["metric"]["environment"] == "training" for row in up)

    board = dashboard()
    assert variables(board)["instance"]["current"]["value"] == ["$__all"]
    assert variable_options(view, variables(board)["instance"]) == addresses
    queries = panel_queries(board, "prometheus")
    assert all("$instance" in target["expr"] for _, target in queries), [w for w, t in queries if "$instance" not in t["expr"]]
    eventually(lambda: view.value("min(count_over_time(up[30s]))") >= 12, timeout=60, interval=0.5,
               message="12 s of scrapes of every replica")
    at = time.time() - 2  # every query below sees the same samples
    every = selections(board, view)["All"]
    for where, target in queries:
        total = keyed(query_at(view, interpolate(target["expr"], every), at))
        singles = [keyed(query_at(view, interpolate(target["expr"], {**every, "instance": grafana_value([address])}), at))
                   for address in addresses]
        assert total, (where, target["expr"])
        for labels, value in total.items():
            parts = [single[labels] for single in singles if labels in single]
            if is_additive(target["expr"]):
                assert math.isclose(value, sum(parts), rel_tol=1e-9, abs_tol=1e-9), (where, labels, value, parts)
            else:  # a ratio, average or quantile of the whole lies between those of its parts
                assert min(parts) - 1e-9 <= value <= max(parts) + 1e-9, (where, labels, value, parts)


def test_one_replica_down_fires_payment_api_down_for_it_alone_while_service_wide_alerts_keep_working(
        start_alerting_stack):
    stack = start_alerting_stack(3, REPLICA_TRAFFIC)
    view = Stack(stack.apps[0], stack.prometheus)
    webhook, alertmanager = stack.webhook, stack.alertmanager
    eventually(lambda: len(view.query('up{job="payment-api"} == 1')) == 3, timeout=60, interval=0.5,
               message="three replicas scraped")
    stopped, serving, spiking = stack.apps[2], stack.apps[0], stack.apps[1]
    stopped.stop()

    down, = eventually(lambda: webhook.received("payments-oncall", "PaymentApiDown", "firing"),
                       timeout=DELIVERY_TIMEOUT, interval=0.25, message="PaymentApiDown delivered")
    assert down["labels"]["instance"] == stack.address(stopped)
    assert [labels["instance"] for labels in stack.prometheus.firing("PaymentApiDown")] == [stack.address(stopped)]
    assert not stack.prometheus.firing("PaymentApiUnreachable"), "two replicas still answer"

    # A per-replica warning (as SimulatedTrafficStopped would be) is muted for the replica that is down only.
    def warning(app):
        return {"alertname": "SimulatedTrafficStopped", "severity": "warning", "service": "payment-api",
                "job": "payment-api", "instance": stack.address(app)}
    alertmanager.post(warning(stopped), warning(serving))

    def states():
        return {alert["labels"]["instance"]: alert["status"] for alert in alertmanager.alerts("SimulatedTrafficStopped")}
    eventually(lambda: len(states()) == 2, timeout=10, interval=0.2, message="the two warnings in Alertmanager")
    assert states()[stack.address(serving)]["state"] == "active"
    assert states()[stack.address(stopped)]["state"] == "suppressed" and states()[stack.address(stopped)]["inhibitedBy"]

    # The error rate summed over the two serving replicas still fires, and is not muted by one replica being down.
    scenario(spiking, "POST", "error_spike")
    fired, = eventually(lambda: webhook.received("payments-team", "HighPaymentErrorRate", "firing"),
                        timeout=DELIVERY_TIMEOUT, interval=0.25, message="HighPaymentErrorRate over the replicas")
    assert "instance" not in fired["labels"]
    assert [labels["instance"] for labels in stack.prometheus.firing("PaymentApiDown")] == [stack.address(stopped)]

# ---------------------------------------------------------------- C. compose file, Alertmanager, runbooks


def compose_config(tmp_path, **env):
    """docker-compose's own rendering of the compose file (interpolated, validated) with `env` set; a .env beside
    the compose file is not read (an empty one is given instead)."""
    docker_compose = require_binary("docker-compose")
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("PAYMENT_", "COMPOSE_"))}
    result = subprocess.run([docker_compose, "--env-file", str(empty_env_file), "-f", str(COMPOSE), "config"],
                            capture_output=True, text=True, timeout=60, cwd=HERE, env={**clean, **env})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_payment_api_can_scale_no_container_name_and_no_fixed_host_port(tmp_path):
    service = compose()["services"]["payment-api"]
    assert "container_name" not in service and "hostname" not in service
    for env in ({}, {"PAYMENT_API_PORT": "8081"}):  # PAYMENT_API_PORT is the gateway's (test_gateway.py)
        rendered = compose_config(tmp_path, **env)["services"]["payment-api"]
        assert "container_name" not in rendered
        assert rendered["ports"] == ["127.0.0.1::8080/tcp"]  # each replica gets a free host port


def test_prometheus_discovers_every_replica_by_the_compose_service_name_and_sends_alerts_to_alertmanager():
    services, config = compose()["services"], yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job, = config["scrape_configs"]
    discovery, = job["dns_sd_configs"]
    assert discovery["names"] == ["payment-api"] and discovery["type"] == "A" and "payment-api" in services
    assert [str(mapping).rsplit(":", 1)[1].split("/")[0] for mapping in services["payment-api"]["ports"]] == [
        str(discovery["port"])]
    target, = [target for manager in config["alerting"]["alertmanagers"] for group in manager["static_configs"]
               for target in group["targets"]]
    host, port = target.split(":")
    assert host in services and any(str(mapping).endswith(f":{port}") for mapping in services[host]["ports"])


def test_alertmanager_reads_the_shipped_config_and_reaches_its_smtp_server_in_the_stack():
    services = compose()["services"]
    alertmanager = services["alertmanager"]
    mounts = {target: source for source, target, *_ in (volume.split(":") for volume in alertmanager["volumes"])}
    config_flag = next(arg for arg in alertmanager["command"] if arg.startswith("--config.file="))
    mounted = Path(config_flag.split("=", 1)[1])
    assert (HERE / mounts[str(mounted.parent)] / mounted.name).resolve() == ALERTMANAGER_CONFIG
    smtp_host, _ = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["global"]["smtp_smarthost"].split(":")
    assert smtp_host in services and "healthcheck" in services[smtp_host]
    for name in ("alertmanager", "mailpit"):
        image = services[name]["image"]
        assert re.search(r":v\d+\.\d+\.\d+$", image), f"{name} image is not pinned: {image}"


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_severity_a_described_value_and_a_runbook_section_in_the_docs():
    prose = re.sub(r"```.*?```", "", RUNBOOKS.read_text(), flags=re.DOTALL)  # a "# comment" in a code block is no heading
    headings = {github_anchor(line.lstrip("#")) for line in prose.splitlines() if line.startswith("#")}
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"] if "alert" in rule]
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["labels"]["service"] == "payment-api", rule["alert"]
        assert rule["annotations"]["summary"] and "$value" in rule["annotations"]["description"], rule["alert"]
        page, anchor = rule["annotations"]["runbook_url"].split("#")
        assert page == RUNBOOKS.relative_to(HERE).as_posix() and anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, f"{page} has no section #{anchor} for {rule['alert']}"
