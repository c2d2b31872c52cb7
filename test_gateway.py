"""The gateway in front of every payment-api replica: gateway/default.conf run by Debian's real nginx.

A. `nginx -t` accepts gateway/default.conf as shipped, included the way the nginx image includes conf.d/*.conf.
   The upstream name needs no resolving for that: with a variable in proxy_pass, nginx looks it up per request.
B. Real nginx on a free loopback port, with a config derived from the shipped one by the smallest rewrite: its
   listen address, and the compose service name replaced by an upstream of two real apps on free ports.
   Requests are spread over both apps; headers and bodies arrive unchanged, plus the client address in
   X-Forwarded-For; answers, errors included, come back unchanged; a 2 s payment completes; admin calls reach
   one replica; with one replica down the other answers, with none the gateway answers 502 in JSON.
B2. --scale: the shipped config, rewritten only in its listen address, its resolver's address and the service
   port, asks a small DNS server on a free loopback port that stands in for Docker's at 127.0.0.11:53 (port 53
   needs root, and inside a container Docker's own DNS is there) and answers the service name with replicas on
   127.0.0.2, .3 and .4, all on one free port: a replica added to the answer gets requests within seconds, a
   removed one none, and every request is answered meanwhile.
C. docker-compose.yml: the gateway publishes PAYMENT_API_PORT (8081), reads the shipped config where the image
   reads its conf.d, and forwards to the payment-api service on its container port.
"""
import difflib
import http.client
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import Counter, namedtuple
from pathlib import Path

import pytest

import payment_api
from conftest import ServerProcess, eventually, free_port, require_binary
from test_alerting import compose_config
from test_stack import compose

HERE = Path(__file__).resolve().parent
GATEWAY_DIR = HERE / "gateway"
SHIPPED = GATEWAY_DIR / "default.conf"
IMAGE_CONF_DIR = "/etc/nginx/conf.d"  # the nginx image's nginx.conf includes *.conf from here, inside http { }
LISTEN = "    listen 80;"
RESOLVER = "    resolver 127.0.0.11 valid=5s ipv6=off;"
TARGET = "        set $payment_api payment-api:8080;"
TEST_UPSTREAM = "payment_api_test_replicas"
PAYMENT = {"amount": 123.45, "currency": "GBP", "customerId": "cust_00042", "type": "express",
           "paymentMethod": "card"}

Received = namedtuple("Received", "replica method path headers")  # replica: "host:port"


def nginx_binary():
    """Debian's nginx is in /usr/sbin, which a user's PATH may lack."""
    return shutil.which("nginx", path="/usr/sbin") or require_binary("nginx")


def image_like_nginx_conf(tmp_path, conf_dir):
    """The nginx image's nginx.conf as far as it matters here: conf_dir/*.conf included inside http { }. Its pid
    file and temporary folders, under /var in the image, go to tmp_path; its logs to stdout and stderr, as there."""
    temp = tmp_path / "nginx-temp"
    temp.mkdir(exist_ok=True)
    main = tmp_path / "nginx.conf"
    main.write_text(f"""pid {tmp_path}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    keepalive_timeout 65;
    client_body_temp_path {temp}/client; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
    include {conf_dir}/*.conf;
}}
""")
    return [nginx_binary(), "-p", str(tmp_path), "-e", "stderr", "-c", str(main)]


def rewritten(lines, prefix=""):
    """The shipped config with whole lines replaced ({shipped line: new line}) and `prefix` put before it."""
    text = SHIPPED.read_text()
    for old, new in lines.items():
        assert text.count(old + "\n") == 1, old
        text = text.replace(old + "\n", new + "\n")
    return prefix + text


def derived_config(listen_port, replica_ports):
    """The shipped config, listening on 127.0.0.1:listen_port and sending to an upstream of the given apps."""
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in replica_ports)
    return rewritten({LISTEN: f"    listen 127.0.0.1:{listen_port};",
                      TARGET: TARGET.replace("payment-api:8080", TEST_UPSTREAM)},
                     prefix=f"upstream {TEST_UPSTREAM} {{\n{servers}}}\n")


def dns_config(listen_port, dns_port, service_port):
    """The shipped config, listening on 127.0.0.1:listen_port and asking the DNS server on dns_port for the
    service name, whose replicas listen on service_port."""
    return rewritten({LISTEN: f"    listen 127.0.0.1:{listen_port};",
                      RESOLVER: RESOLVER.replace("127.0.0.11", f"127.0.0.1:{dns_port}"),
                      TARGET: TARGET.replace(":8080", f":{service_port}")})


def address(app):
    """host:port of an app, as Received and nginx's log name it."""
    return "%s:%d" % app.server.server_address[:2]


def request(url, method="GET", body=None, headers=()):
    """(status, headers, raw body) with exactly the given headers (http.client adds Host, Accept-Encoding and
    Content-Length only)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        connection.request(method, parts.path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


class Gateway:
    def __init__(self, server, replicas, received):
        self.server, self.replicas, self.received = server, replicas, received
        self.url = server.url

    def replica_at(self, replica):
        return next(app for app in self.replicas if address(app) == replica)

    def log(self):
        return Path(self.server.log.name).read_text()


class ReplicaDNS:
    """Stands in for Docker's DNS: answers A queries for `name` with `addresses` (changed at will, like --scale
    does), NXDOMAIN for any other name; on a free loopback UDP port."""

    def __init__(self, name):
        self.name, self.addresses, self.queries = name, [], 0
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="replica-dns")

    def _serve(self):
        while not self._stopping.is_set():
            try:
                query, client = self.socket.recvfrom(512)
            except TimeoutError:
                continue
            self.queries += 1
            self.socket.sendto(self.answer(query), client)

    def answer(self, query):
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode().lower())
            at += 1 + query[at]
        question_end = at + 5  # the name's final zero, type and class
        qtype, = struct.unpack("!H", query[at + 1:at + 3])
        known = ".".join(labels) == self.name
        addresses = list(self.addresses) if known and qtype == 1 else []
        flags = 0x8180 | (0 if known else 3)  # an answer, recursion desired and available; NXDOMAIN if unknown
        header = query[:2] + struct.pack("!HHHHH", flags, 1, len(addresses), 0, 0)
        records = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 600, 4) + socket.inet_aton(ip) for ip in addresses)
        return header + query[12:question_end] + records  # TTL 600 s: nginx's valid=5s must be what counts

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stopping.set()
        self._thread.join(5)
        self.socket.close()


@pytest.fixture
def received(monkeypatch):
    """Every request the apps of the test parsed, with the headers as they arrived."""
    seen = []
    parse_request = payment_api.PlainRequestHeads.parse_request  # the stdlib's, plain heads split faster

    def recording_parse_request(handler):
        parsed = parse_request(handler)
        if parsed:
            seen.append(Received(address(handler.server.app), handler.command, handler.path,
                                 list(handler.headers.items())))
        return parsed
    monkeypatch.setattr(payment_api.PlainRequestHeads, "parse_request", recording_parse_request)
    return seen


def start_nginx(tmp_path, config):
    """Real nginx on a free loopback port with config(port) as its conf.d/default.conf; ready when a replica
    answers /health through it."""
    conf_dir = tmp_path / "conf.d"
    conf_dir.mkdir()
    port = free_port()
    (conf_dir / "default.conf").write_text(config(port))
    args = image_like_nginx_conf(tmp_path, conf_dir) + ["-g", "daemon off;"]
    return ServerProcess(args, port, tmp_path, "nginx", "/health").start()


@pytest.fixture
def gateway(make_app, received, tmp_path):
    """Real nginx with the derived config in front of two apps."""
    replicas = [make_app(), make_app()]
    server = start_nginx(tmp_path, lambda port: derived_config(port, [app.server.server_address[1]
                                                                      for app in replicas]))
    received.clear()
    yield Gateway(server, replicas, received)
    server.stop()


def pay_through(gateway, key, body=PAYMENT, headers=()):
    """A payment with an Idempotency-Key through the gateway, and the same request sent straight to the replica
    that got it: the replica replays its first answer, so the two must be the same bytes. (status, JSON)."""
    raw_body = json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "Idempotency-Key": key, **dict(headers)}
    status, response_headers, raw = request(gateway.url + "/api/payments", "POST", raw_body, sent)
    replica, = [gateway.replica_at(seen.replica) for seen in gateway.received if seen.method == "POST"]
    replay_status, replay_headers, replay_raw = request(replica.url + "/api/payments", "POST", raw_body, sent)
    assert replay_headers["Idempotent-Replayed"] == "true", replay_raw  # the replica saw this key and body
    assert (status, raw) == (replay_status, replay_raw)
    for name in ("Content-Type", "Content-Length", "Server"):
        assert response_headers[name] == replay_headers[name], name
    gateway.received.clear()
    return status, json.loads(raw)

# ---------------------------------------------------------------- A. the shipped config


def test_nginx_accepts_the_shipped_config_included_as_the_image_includes_conf_d(tmp_path):
    result = subprocess.run(image_like_nginx_conf(tmp_path, GATEWAY_DIR) + ["-t"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"{GATEWAY_DIR}/*.conf" in (tmp_path / "nginx.conf").read_text()


def test_derived_configs_change_only_the_listen_address_and_the_way_to_the_replicas():
    shipped, derived = SHIPPED.read_text().splitlines(), derived_config(18080, [18081, 18082]).splitlines()
    changes = [line for line in difflib.ndiff(shipped, derived) if line[:2] in ("- ", "+ ")]
    assert changes == ["+ upstream payment_api_test_replicas {", "+     server 127.0.0.1:18081;",
                       "+     server 127.0.0.1:18082;", "+ }",
                       "-     listen 80;", "+     listen 127.0.0.1:18080;",
                       "-         set $payment_api payment-api:8080;",
                       "+         set $payment_api payment_api_test_replicas;"]

    derived = dns_config(18080, 18053, 18081).splitlines()
    changes = [line for line in difflib.ndiff(shipped, derived) if line[:2] in ("- ", "+ ")]
    assert changes == ["-     listen 80;", "+     listen 127.0.0.1:18080;",
                       "-     resolver 127.0.0.11 valid=5s ipv6=off;",
                       "+     resolver 127.0.0.1:18053 valid=5s ipv6=off;",
                       "-         set $payment_api payment-api:8080;", "+         set $payment_api payment-api:18081;"]


def test_the_shipped_config_resolves_the_service_name_at_run_time_with_dockers_dns():
    text = SHIPPED.read_text()
    assert re.search(r"^\s*resolver 127\.0\.0\.11 valid=5s\b", text, re.M)  # the embedded DNS of every container
    assert re.search(r"^\s*proxy_pass http://\$payment_api;$", text, re.M)  # a variable: looked up per request
    assert not re.search(r"^\s*upstream\b", text, re.M)  # its names are looked up once, at start: --scale is missed

# ---------------------------------------------------------------- B. real nginx in front of two apps


def test_requests_are_spread_over_every_replica_and_the_log_names_each(gateway):
    for _ in range(20):
        assert request(gateway.url + "/health")[0] == 200
    counts = Counter(seen.replica for seen in gateway.received)
    replicas = [address(app) for app in gateway.replicas]
    assert set(counts) == set(replicas) and min(counts.values()) >= 5, counts
    eventually(lambda: all(f"replica={replica} " in gateway.log() for replica in replicas),
               message="access log names each replica")


def test_payment_headers_and_body_arrive_unchanged_plus_the_client_address_in_x_forwarded_for(gateway):
    headers = {"Content-Type": "application/json", "Idempotency-Key": "order-42-attempt-1",
               "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               "tracestate": "rojo=00f067aa0ba902b7", "X-Simulate-Latency": "0.05",
               "X-Course_Lesson": "load-balancing", "User-Agent": "course-client/1.0"}
    body = json.dumps({**PAYMENT, "cardNumber": "4242424242424242"}, indent=1).encode()
    status, _, raw = request(gateway.url + "/api/payments", "POST", body, headers)
    assert status == 200, raw

    arrived, = gateway.received
    sent = Counter((name.lower(), value) for name, value in {
        **headers, "Host": urllib.parse.urlsplit(gateway.url).netloc, "Accept-Encoding": "identity",
        "Content-Length": str(len(body))}.items())
    at_replica = Counter((name.lower(), value) for name, value in arrived.headers)
    assert sent - at_replica == Counter(), "lost or changed on the way"
    assert at_replica - sent == Counter({("x-forwarded-for", "127.0.0.1"): 1, ("connection", "close"): 1})
    answer = json.loads(raw)
    assert {key: answer[key] for key in ("amount", "currency", "customerId", "type", "cardLast4")} == {
        **{key: PAYMENT[key] for key in ("amount", "currency", "customerId", "type")}, "cardLast4": "4242"}

    gateway.received.clear()
    assert request(gateway.url + "/health", headers={"X-Forwarded-For": "203.0.113.7"})[0] == 200
    arrived, = gateway.received
    assert dict(arrived.headers)["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"  # appended, as proxies do


def test_a_payment_answer_comes_back_as_the_replica_wrote_it(gateway):
    status, answer = pay_through(gateway, "order-43")
    assert status in (200, 402) and answer["paymentId"].startswith("pay_")


def test_a_two_second_payment_completes_through_the_gateway(gateway):
    started = time.monotonic()
    status, answer = pay_through(gateway, "slow-1", headers={"X-Simulate-Latency": "2"})
    assert 2.0 <= time.monotonic() - started < 6 and answer["processingTime"] == 2.0 and status in (200, 402)


def test_declines_failures_and_outages_pass_unchanged(gateway):
    status, answer = pay_through(gateway, "declined-1", {**PAYMENT, "cardNumber": "4000000000000002"})
    assert (status, answer["declineCode"], answer["error"]) == (402, "generic_decline", "Payment declined by the bank")
    status, answer = pay_through(gateway, "failed-1", headers={"X-Simulate-Failure": "true"})
    assert (status, answer["error"]) == (500, "Payment processing failed")

    for app in gateway.replicas:  # one call each: through the gateway it would reach one replica only
        assert request(app.url + "/api/scenarios/outage", "POST")[0] == 200
    status, headers, raw = request(gateway.url + "/api/payments", "POST", json.dumps(PAYMENT).encode(),
                                   {"Content-Type": "application/json"})
    answer = json.loads(raw)
    assert (status, headers["Content-Type"]) == (503, "application/json")
    assert answer["error"] == "Payment service unavailable"
    assert headers["Server"].startswith("payment-api/")


def test_an_admin_call_through_the_gateway_reaches_one_replica(gateway):
    status, _, raw = request(gateway.url + "/api/scenarios/error_spike", "POST")
    assert status == 200, raw
    running = [app.scenarios.active_flags()["error_spike"] for app in gateway.replicas]
    assert sorted(running) == [False, True]


def test_with_one_replica_down_the_other_answers_and_with_none_the_gateway_answers_502_in_json(gateway):
    first, second = gateway.replicas
    second.stop()
    assert [request(gateway.url + "/health")[0] for _ in range(6)] == [200] * 6
    first.stop()
    status, headers, raw = request(gateway.url + "/health")
    assert (status, headers["Content-Type"]) == (502, "application/json")
    assert json.loads(raw) == {"error": "no payment-api replica could be reached through the gateway"}


def test_replicas_added_to_or_removed_from_the_dns_answer_are_used_or_dropped_within_seconds(make_app, received,
                                                                                             tmp_path):
    service_port = free_port()  # the same port on every replica's address, as 8080 in every container
    replicas = {ip: make_app(host=ip, port=service_port) for ip in ("127.0.0.2", "127.0.0.3")}
    with ReplicaDNS("payment-api") as dns:
        dns.addresses = list(replicas)
        server = start_nginx(tmp_path, lambda port: dns_config(port, dns.port, service_port))
        try:
            def requests_reach(ip):
                assert request(server.url + "/health")[0] == 200
                return any(seen.replica == f"{ip}:{service_port}" for seen in received)

            for ip in replicas:  # both replicas of the first answer get requests
                eventually(lambda: requests_reach(ip), timeout=5, interval=0.01, message=f"requests reach {ip}")

            replicas["127.0.0.4"] = make_app(host="127.0.0.4", port=service_port)  # --scale payment-api=3
            dns.addresses = list(replicas)
            started = time.monotonic()
            eventually(lambda: requests_reach("127.0.0.4"), timeout=15, interval=0.05, message="the new replica used")
            assert time.monotonic() - started < 10

            dns.addresses.remove("127.0.0.3")  # --scale payment-api=2: the replica leaves the answer and stops
            replicas.pop("127.0.0.3").stop()
            deadline = time.monotonic() + 6  # the 5 s nginx keeps an answer, and a margin
            while time.monotonic() < deadline:  # every request is answered, by a replica still there
                assert request(server.url + "/health")[0] == 200
                time.sleep(0.05)
            refused = Path(server.log.name).read_text().count(f"127.0.0.3:{service_port}")
            received.clear()
            assert [request(server.url + "/health")[0] for _ in range(20)] == [200] * 20
            assert Path(server.log.name).read_text().count(f"127.0.0.3:{service_port}") == refused  # not tried
            assert {seen.replica for seen in received} == {f"{ip}:{service_port}" for ip in replicas}
            assert dns.queries >= 3  # nginx asked again, not once at start
        finally:
            server.stop()

# ---------------------------------------------------------------- C. compose file


def test_compose_gateway_publishes_payment_api_port_and_reads_the_shipped_config_where_the_image_does(tmp_path):
    services = compose()["services"]
    gateway = services["gateway"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", gateway["image"]), gateway["image"]
    assert gateway["ports"] == ["${PAYMENT_API_PORT:-8081}:80"]
    assert gateway["volumes"] == [f"./gateway:{IMAGE_CONF_DIR}:ro"]
    assert "container_name" not in gateway and "healthcheck" in gateway
    assert gateway["depends_on"]["payment-api"]["condition"] == "service_healthy"
    for env, published in (({}, 8081), ({"PAYMENT_API_PORT": "9081"}, 9081)):
        rendered = compose_config(tmp_path, **env)["services"]["gateway"]
        assert rendered["ports"] == [{"published": published, "target": 80}]


def test_compose_gateway_listens_where_it_is_published_and_forwards_to_the_service_on_its_container_port():
    services, text = compose()["services"], SHIPPED.read_text()
    listen, = re.findall(r"^\s*listen (\d+);$", text, re.M)
    assert [mapping.rsplit(":", 1)[1] for mapping in services["gateway"]["ports"]] == [listen]
    host, port = TARGET.split()[-1].rstrip(";").split(":")
    assert host in services and services[host]["ports"] == [f"127.0.0.1::{port}"]  # every replica, a free port
    assert "container_name" not in services[host]
    health = services["gateway"]["healthcheck"]["test"]
    assert health[-1] == f"http://127.0.0.1{'' if listen == '80' else ':' + listen}/health"


def test_behind_the_gateway_each_student_gets_a_share_not_the_gateway(make_app, tmp_path):
    """The compose stack trusts its gateway: a runaway student through it is held to a share while
    another student, through the same gateway, still pays."""
    app = make_app(max_connections=8, trusted_proxies=payment_api.parse_networks("127.0.0.1"))
    server = start_nginx(tmp_path, lambda port: derived_config(port, [app.server.server_address[1]]))
    body = json.dumps(PAYMENT).encode()
    slow = {"Content-Type": "application/json", "X-Simulate-Latency": "3"}

    def from_runaway_student():
        source = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20, source_address=("127.0.0.2", 0))
        source.request("POST", "/api/payments", body=body, headers=slow)
        return source.getresponse().status

    statuses = []
    runaway = [threading.Thread(target=lambda: statuses.append(from_runaway_student())) for _ in range(3)]
    try:
        for thread in runaway:
            thread.start()
        eventually(lambda: 429 in statuses, message="the third slow payment over the share refused")
        other = request(server.url + "/api/payments", "POST", body, {"Content-Type": "application/json"})
        for thread in runaway:
            thread.join()
    finally:
        server.stop()
    assert sorted(statuses) == [200, 200, 429]  # a share of 8 is 2: the third waits for nobody
    assert other[0] == 200
