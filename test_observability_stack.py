"""Loki, Tempo and Alloy in the training stack: the files that wire them agree with each other and with the service.

No Docker engine, Loki, Tempo, Alloy or Grafana runs here, so these tests read the shipped files and check what
can be checked without them, against the real service where the service is the other side:

A. Grafana's links: every data source uid that the dashboard, the exemplar destinations, the Loki derived field
   and Tempo's trace-to-logs and trace-to-metrics name is provisioned with the right type; the values survive
   Grafana's environment expansion of provisioning files ($$ escapes).
B. One trace id through the signals: the exemplar label Grafana follows is the one the service attaches to its
   samples; the derived field's pattern finds the trace id in a real `payment` log line of the service; Tempo's
   logs query and the dashboard's "Failed payments" query select that line (a small LogQL evaluator runs them
   on the service's real lines).
C. docker-compose.yml, alloy/config.alloy, loki/loki.yaml and tempo/tempo.yaml: Alloy keeps only the payment-api
   containers; ports and hosts agree; Prometheus keeps exemplars; images are pinned; health checks can run in
   their images (the Alloy probe is run here against a real HTTP server); docker-compose renders the file.
"""
import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import payment_api
from conftest import eventually, http, require_binary

HERE = Path(__file__).resolve().parent
COMPOSE = HERE / "docker-compose.yml"
DASHBOARD = HERE / "grafana" / "dashboards" / "payment-api.json"
DATASOURCE_FILES = sorted((HERE / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
ALLOY_CONFIG, LOKI_CONFIG, TEMPO_CONFIG = HERE / "alloy" / "config.alloy", HERE / "loki" / "loki.yaml", HERE / "tempo" / "tempo.yaml"

TRACE_ID, PARENT_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
# The line the service documents for a payment (issue 12), as it writes JSON: a space after each colon and comma.
DOCUMENTED_LINE = json.dumps({
    "time": "2026-11-27T03:00:00.123Z", "level": "info", "event": "payment", "trace_id": TRACE_ID,
    "span_id": "a3ce929d0e0e4736", "payment_id": "pay_0123456789abcdef", "status": "failed", "http_status": 500,
    "amount": 12.34, "currency": "EUR", "type": "standard", "method": "card", "customer_id": "cust_00042",
    "source": "api", "processing_seconds": 0.123, "reason": "Payment processing failed"})

# ---------------------------------------------------------------- helpers: the shipped files


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def datasources():
    """{uid: data source} of every provisioned data source, from every file Grafana reads."""
    found = {}
    for path in DATASOURCE_FILES:
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert source["uid"] not in found, f"uid {source['uid']} provisioned twice"
            found[source["uid"]] = source
    return found


def of_type(kind):
    source, = [source for source in datasources().values() if source["type"] == kind]
    return source


def grafana_expanded(value, environment):
    """A provisioning value as Grafana reads it: $$ is a literal $, ${NAME} and $NAME come from its environment."""
    def expand(part):
        return re.sub(r"\$\{([^}]*)\}|\$(\w+)", lambda match: environment.get(match[1] or match[2], ""), part)
    return "$".join(expand(part) for part in value.split("$$"))


def grafana_environment():
    return {name: str(value) for name, value in (compose()["services"]["grafana"].get("environment") or {}).items()}


def dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(panels):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def compose_default(value):
    """The value docker compose uses for `value` when its variable is unset: ${VAR:-default} or ${VAR-default}."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(value))


def published_container_ports(service):
    return {str(mapping).split("/")[0].rsplit(":", 1)[-1] for mapping in service.get("ports", [])}


def mounts(service):
    return {target: source for source, target, *_ in (volume.split(":") for volume in service.get("volumes", []))}


def mounted_file(service, container_path):
    """The repository file a compose service sees at `container_path` through a bind mount of a folder."""
    path = Path(container_path)
    return (HERE / mounts(service)[str(path.parent)] / path.name).resolve()


def alloy_blocks(kind):
    """{label: body} of the `kind "label" { ... }` blocks of alloy/config.alloy (comments removed)."""
    text = re.sub(r"^\s*//[^\n]*", "", ALLOY_CONFIG.read_text(), flags=re.MULTILINE)  # whole-line comments
    blocks = {}
    for match in re.finditer(rf'^{re.escape(kind)}\s+"([^"]+)"\s*\{{', text, re.MULTILINE):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        blocks[match[1]] = text[match.end():index - 1]
    return blocks


def alloy_attributes(body):
    """{name: value} of the `name = "string"`, `name = ["a", "b"]` and `name = reference` lines of a block body."""
    values = {}
    for name, value in re.findall(r'^\s*(\w+)\s*=\s*(".*"|\[.*\]|[\w.]+)\s*$', body, re.MULTILINE):
        literal = value[0] == '"' or (value[0] == "[" and '"' in value)  # strings, or references kept as text
        values[name] = json.loads(value) if literal else value
    return values


def alloy_rules(body):
    return [alloy_attributes(rule) for rule in re.findall(r"\brule\s*\{(.*?)\}", body, re.DOTALL)]


def relabel(labels, rules):
    """Prometheus relabelling (replace and keep, anchored regexes) of one target; None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["target_label"]] = match.expand(rule.get("replacement", r"\1").replace("$", "\\"))
        else:
            raise AssertionError(f"relabel action {action} is not modelled here")
    return {name: value for name, value in labels.items() if not name.startswith("__")}

# ---------------------------------------------------------------- helpers: LogQL, as far as the shipped queries go


def logql_selects(query, line, stream_labels):
    """Whether a LogQL query of the forms shipped here ({...} |= "x" | json | field="v" | field=~"re") keeps `line`
    of a stream with `stream_labels`. Other stages fail the test, so a new query form must be modelled first."""
    selector, *stages = [part.strip() for part in re.split(r"\s\|(?=[ =~])", query)]
    matchers = re.fullmatch(r"\{(.*)\}", selector)[1]
    for name, operator, value in re.findall(r'(\w+)\s*(=~|!=|=)\s*"((?:[^"\\]|\\.)*)"', matchers):
        if not label_matches(stream_labels.get(name, ""), operator, json.loads(f'"{value}"')):
            return False
    fields = {}
    for stage in stages:
        if stage.startswith("= "):  # the line filter |= "text"
            if json.loads(stage[2:].strip()) not in line:
                return False
        elif stage == "json":
            fields = {name: str(value) for name, value in json.loads(line).items()}
        else:
            name, operator, value = re.fullmatch(r'(\w+)\s*(=~|!=|=)\s*("(?:[^"\\]|\\.)*")', stage).groups()
            if not label_matches(fields.get(name, stream_labels.get(name, "")), operator, json.loads(value)):
                return False
    return True


def label_matches(actual, operator, expected):
    return {"=": actual == expected, "!=": actual != expected,
            "=~": re.fullmatch(expected, actual) is not None}[operator]  # LogQL regex matchers are anchored


def grafana_loki_value(values):
    """How Grafana's Loki data source writes a multi-value variable into a query: (a|b) of escaped values."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

# ---------------------------------------------------------------- helpers: the real service


@pytest.fixture
def payment_lines(run_service):
    """{"completed": line, "failed": line} that `python payment_api.py` wrote on stdout, as Alloy reads it, for two
    API payments; the completed one was sent with a traceparent."""
    service = run_service(LOG_FORMAT="json", LOG_PAYMENTS="true", ENABLE_SIMULATION="false", INFLUXDB_URL="",
                          PAYMENT_LATENCY_SCALE="0", OTEL_EXPORTER_OTLP_ENDPOINT="",
                          PAYMENT_FAILURE_RATE="0", PAYMENT_DECLINE_RATE="0")  # only the asked-for failure
    body = {"amount": 12.34, "currency": "EUR", "type": "standard"}
    completed = http("POST", service.url + "/api/payments", body, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"})
    failed = http("POST", service.url + "/api/payments", body, {"X-Simulate-Failure": "true"})
    assert (completed[0], failed[0]) == (200, 500), (completed, failed)
    ids = {"completed": completed[2]["paymentId"], "failed": failed[2]["paymentId"]}

    def both_logged():
        events = [(line, json.loads(line)) for line in service.log_path.read_text().splitlines()]
        lines = {status: line for line, event in events for status, payment_id in ids.items()
                 if event.get("event") == "payment" and event.get("payment_id") == payment_id}
        return lines if len(lines) == 2 else None
    return eventually(both_logged, timeout=10, message="a payment log line for each payment")

# ---------------------------------------------------------------- A. Grafana's links


def test_every_datasource_uid_named_in_a_link_or_the_dashboard_is_provisioned_with_the_right_type():
    sources = datasources()
    kinds = {uid: source["type"] for uid, source in sources.items()}
    prometheus, loki, tempo = of_type("prometheus"), of_type("loki"), of_type("tempo")
    links = [("exemplar destination", destination["datasourceUid"], "tempo")
             for destination in prometheus["jsonData"]["exemplarTraceIdDestinations"]]
    links += [(f"derived field {field['name']}", field["datasourceUid"], "tempo")
              for field in loki["jsonData"]["derivedFields"]]
    links += [("traces to logs", tempo["jsonData"]["tracesToLogsV2"]["datasourceUid"], "loki"),
              ("traces to metrics", tempo["jsonData"]["tracesToMetrics"]["datasourceUid"], "prometheus"),
              ("Loki search", tempo["jsonData"]["lokiSearch"]["datasourceUid"], "loki")]
    for where, uid, kind in links:
        assert kinds.get(uid) == kind, f"{where} names {uid!r}, provisioned as {kinds.get(uid)}"

    board = dashboard()
    users = [panel for panel in all_panels(board["panels"]) if panel.get("datasource")]
    users += [target for panel in all_panels(board["panels"]) for target in panel.get("targets", [])]
    users += [item for item in board["templating"]["list"] + board["annotations"]["list"] if "datasource" in item]
    used = {(user["datasource"]["uid"], user["datasource"]["type"]) for user in users
            if isinstance(user["datasource"], dict) and user["datasource"].get("uid") != "-- Grafana --"}
    assert {("loki", "loki"), ("prometheus", "prometheus")} <= used
    assert all(kinds.get(uid) == kind for uid, kind in used), used


def test_link_templates_survive_grafanas_environment_expansion_of_provisioning_files():
    environment = grafana_environment()
    loki, tempo = of_type("loki"), of_type("tempo")
    field, = loki["jsonData"]["derivedFields"]
    assert grafana_expanded(field["url"], environment) == "${__value.raw}"
    logs_query = grafana_expanded(tempo["jsonData"]["tracesToLogsV2"]["query"], environment)
    assert logs_query.count("${__trace.traceId}") == 2, logs_query
    for source in datasources().values():  # a lone $ in a link would be eaten by the expansion
        for text in re.findall(r'"((?:[^"\\]|\\.)*)"', json.dumps(source.get("jsonData", {}))):
            unescaped = text.replace("$$", "")
            assert all(name in environment for name in re.findall(r"\$\{?(\w+)", unescaped)), (source["uid"], text)


def test_trace_to_logs_and_to_metrics_select_the_labels_alloy_and_prometheus_give_the_service():
    tempo = of_type("tempo")["jsonData"]
    logs_selector = re.match(r"\{([^}]*)\}", tempo["tracesToLogsV2"]["query"])[1]
    assert logs_selector == 'service="payment-api"'
    assert tempo["tracesToLogsV2"]["tags"] == [{"key": "service.name", "value": "service"}]
    prometheus_config = yaml.safe_load((HERE / "prometheus" / "prometheus.yml").read_text())
    added = {rule["target_label"]: rule["replacement"] for job in prometheus_config["scrape_configs"]
             for rule in job.get("relabel_configs", []) if "replacement" in rule}
    assert added["service"] == "payment-api"
    for query in tempo["tracesToMetrics"]["queries"]:
        assert 'service="payment-api"' in query["query"], query
    assert environment_of("payment-api")["OTEL_SERVICE_NAME"] == "payment-api"  # the span's service.name

# ---------------------------------------------------------------- B. one trace id through the signals


def test_exemplar_destination_follows_the_label_the_service_puts_on_its_samples(app):
    status, _, _ = http("POST", app.url + "/api/payments", {"amount": 5, "currency": "EUR"})
    assert status == 200
    _, headers, text = http("GET", app.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    exemplar_labels = {name for exemplar in re.findall(r" # \{([^}]*)\}", text.decode())
                       for name in re.findall(r'(\w+)="', exemplar)}
    destination, = of_type("prometheus")["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplar_labels == {destination["name"]} == {"trace_id"}
    latency = [target for panel in all_panels(dashboard()["panels"]) for target in panel.get("targets", [])
               if target.get("exemplar")]
    assert latency and all("payment_duration_seconds_bucket" in target["expr"] for target in latency), latency


@pytest.mark.parametrize("source", ["documented", "service"])
def test_loki_derived_field_captures_the_trace_id_of_a_payment_log_line(source, request):
    if source == "documented":
        line, trace_id = DOCUMENTED_LINE, TRACE_ID
    else:
        line = request.getfixturevalue("payment_lines")["completed"]
        trace_id = TRACE_ID  # the client's traceparent
    field, = of_type("loki")["jsonData"]["derivedFields"]
    assert field["matcherType"] == "regex"
    match = re.search(field["matcherRegex"], line)  # \s, \w and groups mean the same in JavaScript
    assert match and match[1] == trace_id == json.loads(line)["trace_id"], (field["matcherRegex"], line)


def test_tempo_logs_query_finds_the_payments_line_by_its_trace_id_and_no_other(payment_lines):
    environment = grafana_environment()
    template = grafana_expanded(of_type("tempo")["jsonData"]["tracesToLogsV2"]["query"], environment)
    stream = stream_labels_of_a_replica()
    query = template.replace("${__trace.traceId}", TRACE_ID)
    assert logql_selects(query, payment_lines["completed"], stream)
    assert not logql_selects(query, payment_lines["failed"], stream)
    assert not logql_selects(template.replace("${__trace.traceId}", "0" * 32), payment_lines["completed"], stream)


def test_failed_payments_panel_shows_failed_payment_lines_for_the_chosen_currency_type_and_replica(payment_lines):
    board = dashboard()
    panel, = [panel for panel in all_panels(board["panels"]) if panel.get("title") == "Failed payments"]
    assert panel["type"] == "logs" and panel["datasource"]["type"] == "loki"
    target, = panel["targets"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", target["expr"]))
    assert used == {"currency", "payment_type", "instance"} and used <= set(variables)
    assert all(variables[name]["multi"] and variables[name]["includeAll"] for name in used)

    stream = stream_labels_of_a_replica()
    failed, completed = payment_lines["failed"], payment_lines["completed"]
    event = json.loads(failed)
    # Grafana's All is every value the variable offers: the configured currencies, the payment types, the replicas.
    everything = {"currency": list(payment_api.Settings().currencies), "payment_type": list(payment_api.PAYMENT_TYPES),
                  "instance": [stream["instance"], "172.18.0.9:8080"]}
    selections = {"All": everything,
                  "the line's values": {"currency": [event["currency"]], "payment_type": [event["type"]],
                                        "instance": [stream["instance"]]},
                  "other values": {name: [value for value in values if value not in
                                          (event["currency"], event["type"], stream["instance"])][:2]
                                   for name, values in everything.items()}}

    def query_for(selection):
        return re.sub(r"\$(\w+)", lambda match: grafana_loki_value(selection[match[1]]), target["expr"])

    assert logql_selects(query_for(selections["All"]), failed, stream)
    assert logql_selects(query_for(selections["the line's values"]), failed, stream)
    assert not logql_selects(query_for(selections["All"]), completed, stream)
    for name in used:  # each filter works on its own: another value of one variable hides the line
        narrowed = {**selections["the line's values"], name: selections["other values"][name]}
        assert not logql_selects(query_for(narrowed), failed, stream), name

# ---------------------------------------------------------------- C. compose file and the configs beside it


def environment_of(name):
    return {key: str(value) for key, value in (compose()["services"][name].get("environment") or {}).items()}


def stream_labels_of_a_replica(ip="172.18.0.5"):
    """The labels Alloy's rules give the stream of a payment-api replica, from what Docker reports of it."""
    target = {"__meta_docker_container_label_com_docker_compose_service": "payment-api",
              "__meta_docker_container_name": "/payment-api-payment-api-2", "__meta_docker_network_ip": ip,
              "__meta_docker_port_private": "8080", "__meta_docker_container_id": "0123abcd"}
    rules, = [alloy_rules(body) for body in alloy_blocks("discovery.relabel").values()]
    return relabel(target, rules)


def test_alloy_ships_the_logs_of_every_payment_api_replica_and_of_no_other_service():
    (relabel_name, body), = alloy_blocks("discovery.relabel").items()
    discovery, = alloy_blocks("discovery.docker").items()
    assert alloy_attributes(body)["targets"] == f"discovery.docker.{discovery[0]}.targets"
    rules = alloy_rules(body)
    keep, = [rule for rule in rules if rule.get("action") == "keep"]
    assert keep["source_labels"] == ["__meta_docker_container_label_com_docker_compose_service"]
    services = compose()["services"]
    for name in services:
        kept = relabel({"__meta_docker_container_label_com_docker_compose_service": name}, [keep]) is not None
        assert kept == (name == "payment-api"), name
    assert stream_labels_of_a_replica() == {"service": "payment-api", "instance": "172.18.0.5:8080",
                                            "container": "payment-api-payment-api-2"}
    # The instance label is the one Prometheus scrapes the same replica as: <container IP>:<the port it discovers>.
    discovery_port = yaml.safe_load((HERE / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"][0]["dns_sd_configs"][0]["port"]
    assert published_container_ports(services["payment-api"]) == {str(discovery_port)}

    source, = alloy_blocks("loki.source.docker").values()
    source = alloy_attributes(source)
    assert source["targets"] == f"discovery.relabel.{relabel_name}.output"
    alloy = services["alloy"]
    socket_path = urlsplit(source["host"]).path
    assert source["host"] == alloy_attributes(discovery[1])["host"] == f"unix://{socket_path}"
    assert f"{socket_path}:{socket_path}:ro" in alloy["volumes"], "the Docker socket, read-only"
    assert mounted_file(alloy, alloy["command"][1]) == ALLOY_CONFIG.resolve()
    (writer_name, writer), = alloy_blocks("loki.write").items()
    assert re.fullmatch(rf"\[\s*loki\.write\.{writer_name}\.receiver\s*\]", source["forward_to"]), source["forward_to"]
    push = urlsplit(re.search(r'url\s*=\s*"([^"]+)"', writer)[1])
    assert push.hostname == "loki" and push.path == "/loki/api/v1/push"
    assert push.port == yaml.safe_load(LOKI_CONFIG.read_text())["server"]["http_listen_port"]


def test_loki_and_tempo_listen_where_compose_grafana_alloy_and_the_service_expect_them():
    services = compose()["services"]
    loki, tempo = services["loki"], services["tempo"]
    assert mounted_file(loki, loki["command"][0].split("=", 1)[1]) == LOKI_CONFIG.resolve()
    assert mounted_file(tempo, tempo["command"][0].split("=", 1)[1]) == TEMPO_CONFIG.resolve()
    loki_port = yaml.safe_load(LOKI_CONFIG.read_text())["server"]["http_listen_port"]
    tempo_config = yaml.safe_load(TEMPO_CONFIG.read_text())
    tempo_port = tempo_config["server"]["http_listen_port"]
    for source, service, port in ((of_type("loki"), "loki", loki_port), (of_type("tempo"), "tempo", tempo_port)):
        url = urlsplit(source["url"])
        assert (url.hostname, url.port) == (service, port), source["url"]
        assert str(port) in published_container_ports(services[service])

    otlp = urlsplit(compose_default(environment_of("payment-api")["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    assert otlp.scheme == "http" and otlp.hostname == "tempo" and otlp.port == 4318  # OTLP/HTTP's port
    receivers = tempo_config["distributor"]["receivers"]["otlp"]["protocols"]
    assert receivers["http"]["endpoint"] == f"0.0.0.0:{otlp.port}"  # not localhost: reached from other containers
    assert {str(otlp.port), receivers["grpc"]["endpoint"].rsplit(":", 1)[1]} <= published_container_ports(tempo)
    # The volumes hold what the configs write.
    assert mounts(loki)["/loki"] == "loki-data" and yaml.safe_load(LOKI_CONFIG.read_text())["common"]["path_prefix"] == "/loki"
    assert mounts(tempo)["/var/tempo"] == "tempo-data"
    storage = tempo_config["storage"]["trace"]
    assert storage["wal"]["path"].startswith("/var/tempo/") and storage["local"]["path"].startswith("/var/tempo/")


def test_prometheus_keeps_exemplars_and_its_other_flags():
    command = compose()["services"]["prometheus"]["command"]
    assert "--enable-feature=exemplar-storage" in command
    for flag in ("--config.file=", "--storage.tsdb.path=", "--storage.tsdb.retention.time=", "--web.enable-lifecycle",
                 "--web.external-url="):
        assert any(argument.startswith(flag) for argument in command), flag


def test_every_image_is_pinned_to_a_release():
    for name, service in compose()["services"].items():
        if "image" not in service:
            assert "build" in service, name
            continue
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest" and re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[\w.]+)?", tag), (name, service["image"])
    images = {name: compose()["services"][name]["image"] for name in ("loki", "tempo", "alloy")}
    assert all(re.search(r":v?\d+\.\d+\.\d+$", image) for image in images.values()), images


def test_start_order_waits_for_health_checks_the_images_can_run():
    services = compose()["services"]
    # Loki and Tempo images are distroless (no shell, no wget): their own binaries probe /ready.
    assert services["loki"]["healthcheck"]["test"] == ["CMD", "/usr/bin/loki", "-health"]
    assert services["tempo"]["healthcheck"]["test"] == ["CMD", "/tempo", "-health"]
    assert services["alloy"]["depends_on"]["loki"]["condition"] == "service_healthy"
    grafana = services["grafana"]["depends_on"]
    assert grafana["loki"]["condition"] == grafana["tempo"]["condition"] == "service_healthy"
    # Payments never wait for the tracing backend: payment-api needs Tempo started, not ready.
    assert services["payment-api"]["depends_on"]["tempo"]["condition"] == "service_started"


def test_alloy_health_check_asks_its_ready_endpoint_and_fails_when_it_is_not_ready():
    bash = require_binary("bash")
    test = compose()["services"]["alloy"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "bash"]
    listen = next(argument for argument in compose()["services"]["alloy"]["command"]
                  if argument.startswith("--server.http.listen-addr="))
    port = int(listen.rsplit(":", 1)[1])
    probe = [bash, *test[2:]]
    assert f"/dev/tcp/127.0.0.1/{port}" in probe[-1]
    seen = []
    for status in (200, 503):
        class Ready(BaseHTTPRequestHandler):
            def do_GET(handler):
                seen.append(handler.path)
                handler.send_response(status)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):
                pass
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), Ready)
        except OSError:
            pytest.skip(f"port {port} is taken on this machine")
        thread = threading.Thread(target=server.serve_forever, name="alloy-ready-stand-in")
        thread.start()
        try:
            result = subprocess.run(probe, capture_output=True, text=True, timeout=10)
        finally:
            server.shutdown()
            thread.join(5)
            server.server_close()
        assert (result.returncode == 0) == (status == 200), (status, result.stderr)
    assert seen == ["/-/ready", "/-/ready"]


def test_docker_compose_renders_tracing_on_by_default_and_off_with_an_empty_endpoint(tmp_path):
    docker_compose = require_binary("docker-compose")
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("PAYMENT_", "COMPOSE_", "OTEL_", "LOG_"))}

    def rendered(**env):
        result = subprocess.run([docker_compose, "--env-file", str(empty_env_file), "-f", str(COMPOSE), "config"],
                                capture_output=True, text=True, timeout=60, cwd=HERE, env={**clean, **env})
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["services"]["payment-api"]["environment"]

    default = rendered()
    assert default["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo:4318"
    assert default["OTEL_SERVICE_NAME"] == "payment-api" and default["LOG_PAYMENTS"] == "true"
    assert rendered(PAYMENT_OTLP_ENDPOINT="")["OTEL_EXPORTER_OTLP_ENDPOINT"] in ("", None)
