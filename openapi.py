"""The OpenAPI 3.1 description of payment-api, served at GET /openapi.json.

An optional extra beside payment_api.py, imported only when the document is asked for. It walks
PaymentHandler.ROUTES and builds every schema from the tables the service validates with
(currencies, payment types and methods, amount bounds, scenarios, profiles, test cards, error
statuses), so the document says what this very service accepts and answers, and cannot drift.

It never imports payment_api: the running module is passed in as `api` (document(settings,
api)), so serving the document loads nothing a second time and no import cycle exists.
"""
import json
import random
import re
from decimal import Decimal

EXAMPLE_TIME = 1_795_694_400.118  # 2026-11-26T12:00:00.118Z, the moment every example happens


def example_trace(api):
    return api.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")

# ---------------------------------------------------------------- the document


def document(settings, api):
    """The OpenAPI document (a dict, ready for json.dumps) of the service running with
    `settings`; `api` is the payment_api module that runs it."""
    paths = {}
    for method, pattern, handler, needs_admin in api.PaymentHandler.ROUTES:
        path, path_names = path_template(pattern)
        describe = OPERATIONS.get(handler, undescribed)
        operation = {"operationId": handler, **describe(api, settings)}
        parameters = [path_parameter(api, name, settings) for name in path_names]
        parameters += operation.get("parameters", [])
        if parameters:
            operation["parameters"] = parameters
        if needs_admin and settings.admin_token:
            operation["security"] = [{"adminToken": []}]
            operation["responses"]["401"] = {"$ref": "#/components/responses/Unauthorized"}
        responses = operation["responses"]
        # framing, on every route
        responses.setdefault("400", {"$ref": "#/components/responses/BadRequest"})
        if (method, path) not in overflow_answers(api):  # /health and /metrics always answer
            responses.setdefault("503", {"$ref": "#/components/responses/TooManyConnections"})
            responses.setdefault("429", {"$ref": "#/components/responses/TooManyRequests"})
        if method in api.CHANGES:
            responses.setdefault("403", {"$ref": "#/components/responses/Forbidden"})
        operation["responses"] = dict(sorted(responses.items()))
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "payment-api", "version": api.VERSION, "description": introduction(api)},
        "servers": [{"url": "/", "description": "this service"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        "components": {"schemas": schemas(api, settings), "responses": shared_responses(api),
                       "parameters": header_parameters(api), "headers": SHARED_HEADERS,
                       "securitySchemes": {"adminToken": {
                           "type": "http", "scheme": "bearer",
                           "description": "ADMIN_TOKEN of the service; only when it is set"}}},
    }


def introduction(api):
    """The Markdown of info.description: what every answer has in common."""
    return (
        "A mock payment service for Grafana, Prometheus and InfluxDB classes.\n"
        "\n"
        "Every answer is JSON except `/metrics` (Prometheus text or OpenMetrics)"
        " and `/` (the console page). An error is\n"
        '`{"error": "...", ...}` with details such as the `field` at fault.'
        " Besides what each operation lists:\n"
        "\n"
        "- a method a path does not have is answered `405` with an `Allow` header"
        " (HEAD is answered wherever GET is);\n"
        "- an unknown path is `404`;\n"
        "- a request line over 64 KiB is `414`,"
        " a header line over 64 KiB or more than 100 header lines `431`;\n"
        "- beyond MAX_CONNECTIONS connections at once,"
        " anything but `GET /health` and `GET /metrics` is answered `503`\n"
        "  with `Retry-After: 1`.\n"
        "\n"
        "Changing the simulator or a scenario needs `Authorization: Bearer <ADMIN_TOKEN>`"
        " when the service has an\n"
        "ADMIN_TOKEN. Card numbers the bank always declines: "
        + ", ".join(api.TEST_CARDS) + ".")

TAGS = {"payments": "Payments, refunds and the figures about them",
        "trainer": "The simulator and the incident scenarios a trainer starts",
        "service": "Health, metrics, this document and the console page",
        "checks": "Students' alert rules and dashboards, checked against the incidents that "
                  "really happened (exercises.py; needs PROMETHEUS_URL)"}

def overflow_answers(api):
    return {(method.decode(), path.decode()) for method, path in api.Overflow.ANSWERED_HERE}


def path_template(pattern):
    """('/api/payments/{payment_id}', ['payment_id']) from a route's compiled regular
    expression."""
    text = pattern.pattern.removesuffix(r"\Z").replace("\\.", ".")
    names = re.findall(r"\(\?P<(\w+)>", text)
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", text), names


def path_parameter(api, name, settings):
    """A payment id (other text is a 404 too), or a scenario: traffic_surge for an example,
    since no alert fires for it."""
    schema = {"payment_id": {**PAYMENT_ID, "examples": ["pay_6f1c0e3a9b2d4c10"]},
              "name": {"type": "string", "enum": list(api.SCENARIOS),
                       "examples": [name for name in api.SCENARIOS if name == "traffic_surge"]}}
    return {"name": name, "in": "path", "required": True, "schema": schema[name],
            "description": {
                "payment_id": "a paymentId; one of the most recent STORE_SIZE payments",
                "name": "a scenario; another name is 404"}[name]}


def undescribed(api, settings):
    """A route nobody described yet: still listed, and test_openapi.py fails until it is
    described."""
    return {"summary": "not described yet", "x-undescribed": True,
            "responses": {"default": {"description": "not described yet"}}}

# ---------------------------------------------------------------- operations, one per handler of
# ROUTES


def json_response(description, schema, example=None, examples=None, headers=None):
    content = {"schema": schema}
    if example is not None:
        content["example"] = example
    if examples:
        content["examples"] = {name: {"value": value} for name, value in examples.items()}
    response = {} if description is None else {"description": description}
    response["content"] = {"application/json": content}
    if headers:
        response["headers"] = headers
    return response


def ref(name, kind="schemas"):
    return {"$ref": f"#/components/{kind}/{name}"}


REPLAYED = {"Idempotent-Replayed": ref("IdempotentReplayed", "headers")}
PAYMENT_HEADERS = {**REPLAYED, "traceparent": ref("TraceParent", "headers")}
BODY_ERRORS = {status: ref(name, "responses") for status, name in (
    ("408", "RequestTimeout"), ("411", "LengthRequired"), ("413", "PayloadTooLarge"),
    ("415", "UnsupportedMediaType"))}


def json_body(schema, required, example=None, examples=None):
    return {"required": required, **json_response(None, schema, example, examples)}


def console(api, settings):
    return {"tags": ["service"], "summary": "The trainer's console: a page for the browser",
            "responses": {
                "200": {"description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}}},
                "404": error_response("console.html is not installed beside payment_api.py",
                                      api.NotFound("the console page (console.html) is not "
                                                   "installed").body)}}


def openapi_document(api, settings):
    return {"tags": ["service"], "summary": "This document",
            "responses": {"200": json_response("OpenAPI 3.1", {"type": "object",
                                                               "required": ["openapi", "paths"]})}}


def health(api, settings):
    example = {"status": "UP", "service": "payment-api", "version": api.VERSION,
               "timestamp": api.iso_utc(EXAMPLE_TIME), "uptimeSeconds": 3600.5,
               "dependencies": {"influxdb": {"state": "up", "url": "http://influxdb:8086",
                                             "bucket": "training",
                                             "pendingPoints": 0}},
               "simulation": simulation_example(settings)}
    return {"tags": ["service"], "summary": "Whether the service is up",
            "responses": {
                "200": json_response("up", ref("Health"), example),
                "503": json_response("the service is stopping", ref("Health"),
                                     {**example, "status": "DOWN"})}}


def metrics(api, settings):
    text = {"schema": {"type": "string"},
            "example": "payment_requests_total{currency=\"USD\",method=\"POST\","
                                                     "status=\"200\",type=\"standard\"} 42.0\n"}
    return {"tags": ["service"], "summary": "Prometheus metrics",
            "description": "Prometheus text format; OpenMetrics when `Accept` asks for "
                           "`application/openmetrics-text`; gzip when `Accept-Encoding` allows "
                           "it.",
            "responses": {"200": {"description": "the metrics", "content": {
                "text/plain": text,
                "application/openmetrics-text": {
                    **text, "example": text["example"] + "# EOF\n"}}}}}


def payment_request_examples(api, settings):
    return {"plain": {"amount": 100, "currency": settings.currencies[0]},
            "card": {"amount": 99.5, "currency": settings.currencies[-1],
                     "type": api.PAYMENT_TYPES[1],
                     "customerId": "cust_00042", "cardNumber": "4242424242424242"},
            "declined": {"amount": 25, "cardNumber": next(iter(api.TEST_CARDS)),
                         "currency": settings.currencies[0]},
            "wallet": {"amount": 12.3, "currency": settings.currencies[0],
                       "paymentMethod": api.PAYMENT_METHODS[-1]}}


def create_payment(api, settings):
    completed, declined, failed, refused = (
        api.payment_json(example_payment(api, settings, status))
        for status in (200, 402, 500, 503))
    return {
        "tags": ["payments"], "summary": "Make a payment",
        "description": "Processing takes a simulated time (see docs/api.md). Declines and "
                       "failures are answers about the payment, with the payment in the body.",
        "parameters": [ref(name, "parameters")
                       for name in ("IdempotencyKey", "TraceParent", "SimulateFailure",
                                    "SimulateLatency")],
        "requestBody": json_body(ref("PaymentRequest"), True,
                                 examples=payment_request_examples(api, settings)),
        "responses": {
            "200": json_response("completed", ref("CompletedPayment"), completed,
                                 headers=PAYMENT_HEADERS),
            "402": json_response("declined by the bank", ref("DeclinedPayment"), declined,
                                 headers=PAYMENT_HEADERS),
            "409": error_response("a request with this Idempotency-Key is still being processed",
                                  idempotency_error(api, "in_progress")),
            "422": error_response("this Idempotency-Key was used with another request body",
                                  idempotency_error(api, "mismatch")),
            "500": json_response("the payment failed (PAYMENT_FAILURE_RATE, a scenario, or "
                                 "X-Simulate-Failure)",
                                 ref("FailedPayment"), failed, headers=PAYMENT_HEADERS),
            "503": json_response("refused during an `outage` scenario (not remembered for its "
                                 "Idempotency-Key), or too many connections",
                                 {"anyOf": [ref("FailedPayment"), ref("Error")]},
                                 examples={"outage": refused,
                                           "busy": json.loads(api.Overflow.BUSY)},
                                 headers={"Retry-After": ref("RetryAfter", "headers"),
                                          "traceparent": ref("TraceParent", "headers")}),
            "400": error_response("the body or a header is not valid: `field` names it",
                                  examples=invalid_payment_examples(api, settings)),
            **BODY_ERRORS}}


def list_payments(api, settings):
    filters = [{"name": name, "in": "query", "required": False, "schema": schema,
                "description": "only payments with this " + name}
               for name, schema in listing_filter_schemas(api, settings).items()]
    limit = {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": api.MAX_PAGE, "default": 50},
             "description": "how many, newest first (at most STORE_SIZE are kept)"}
    cursor = {"name": "cursor", "in": "query", "required": False,
              "schema": {"type": "string", "pattern": or_empty(PAYMENT_ID["pattern"]),
                         "default": ""},
              "description": "the nextCursor of the page before: the payments after it; empty: "
                             "from the newest. A payment no longer kept is a 400."}
    payment = api.payment_json(example_payment(api, settings, 200))
    return {"tags": ["payments"], "summary": "The most recent payments, newest first",
            "description": "Another query parameter is a 400 naming it.",
            "parameters": [limit, cursor, *filters],
            "responses": {
                "200": json_response("the payments", ref("PaymentList"), {
                    "count": 1, "payments": [payment], "nextCursor": None}),
                "400": error_response("an unknown parameter or a value not allowed", examples={
                    "unknown": api.InvalidField("page", "unknown parameter; known: limit, cursor, "
                                                + ", ".join(api.LISTING_FILTERS)).body})}}


def payment_stats(api, settings):
    stats = api.ActivityStats(settings.currencies, lambda: EXAMPLE_TIME)
    for status in (200, 200, 402):
        stats.record_start()
        stats.record(example_payment(api, settings, status))
    return {"tags": ["payments"],
            "summary": "Totals since start, rates, active payments, today's revenue",
            "responses": {"200": json_response("the figures", ref("Stats"), stats.snapshot())}}


def activity(api, settings):
    most = api.PaymentStats.ACTIVITY_SECONDS
    stats = api.ActivityStats(settings.currencies, lambda: EXAMPLE_TIME)
    stats.record_start()
    stats.record(example_payment(api, settings, 200))
    return {"tags": ["payments"],
            "summary": "The last minutes second by second (the console's chart)",
            "description": "Another query parameter is a 400 naming it.",
            "parameters": [{"name": "seconds", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": most,
                                       "default": most},
                            "description": "how many seconds back, one entry each, oldest first"}],
            "responses": {
                "200": json_response("one entry a second; p95 over the payments completed in the "
                                     "last "
                                     f"{api.PaymentStats.WINDOW_SECONDS} s (null without any)",
                                     ref("Activity"), stats.activity(3)),
                "400": error_response("an unknown parameter or seconds out of range")}}


def get_payment(api, settings):
    return {"tags": ["payments"], "summary": "One payment, with its refunds",
            "responses": {
                "200": json_response("the payment", ref("Payment"), examples={
                    status: api.payment_json(example_payment(api, settings, code))
                    for status, code in zip(api.PAYMENT_STATUSES, (200, 402, 500))}),
                "404": error_response("unknown, or no longer among the most recent STORE_SIZE "
                                      "payments",
                                      api.NotFound("payment not found",
                                                   paymentId="pay_0000000000000000").body)}}


def create_refund(api, settings):
    payment = example_payment(api, settings, 200)
    refund = api.Refund("re_3b9d0c2e7a1f4d58", payment.payment_id, Decimal("40.00"),
                        payment.request.currency,
                        "api", EXAMPLE_TIME + 60)
    too_much = api.Unprocessable(f"at most 60.00 {payment.request.currency} remains to refund",
                                 field="amount",
                                 refundable=60.0)
    return {
        "tags": ["payments"], "summary": "Refund a completed payment in full or in part",
        "parameters": [ref("IdempotencyKey", "parameters")],
        "requestBody": json_body(ref("RefundRequest"), False, {"amount": 40}),
        "responses": {
            "201": json_response("refunded", ref("RefundResult"),
                                 {**api.refund_json(refund), "refundedAmount": 40.0,
                                  "remainingAmount": 60.0},
                                 headers=REPLAYED),
            "404": error_response("no such payment", api.NotFound(
                "payment not found", paymentId=payment.payment_id).body),
            "409": error_response("the payment was not completed, is refunded in full or has too "
                                  "many refunds, or a "
                                  "request with this Idempotency-Key is still being processed",
                                  api.Conflict("nothing left to refund on this payment").body),
            "422": error_response("more than remains, or an Idempotency-Key used with another "
                                  "request body",
                                  examples={"too much": too_much.body,
                                            "key reused": idempotency_error(api, "mismatch")}),
            **BODY_ERRORS}}


def get_simulation(api, settings):
    return {"tags": ["trainer"], "summary": "The simulator's settings now",
            "responses": {"200": json_response("the settings", ref("Simulation"),
                                               simulation_example(settings))}}


def put_simulation(api, settings):
    return {"tags": ["trainer"], "summary": "Change the simulator at runtime",
            "description": "Only the fields sent change; a new seed restarts the random sequence.",
            "requestBody": json_body(ref("SimulationChange"), True, examples={
                "as at start": {name: simulation_example(settings)[name]
                                for name in ("enabled", "rate", "profile")},
                "busier": {"rate": 50, "profile": "bursty"}}),
            "responses": {"200": json_response("the settings now", ref("Simulation"),
                                               simulation_example(settings)),
                          **BODY_ERRORS}}


def list_scenarios(api, settings):
    return {"tags": ["trainer"], "summary": "The incident scenarios and which of them run",
            "responses": {"200": json_response("every scenario", ref("ScenarioList"), {
                "scenarios": [scenario_example(api, name) for name in api.SCENARIOS]})}}


def scenario_history(api, settings):
    example = {"scenario": "error_spike", "startedAt": api.iso_utc(EXAMPLE_TIME),
               "startedBy": "api",
               "stoppedAt": api.iso_utc(EXAMPLE_TIME + 300), "stoppedBy": "duration"}
    return {"tags": ["trainer"], "summary": "What ran when (the last 200 starts)",
            "responses": {"200": json_response("oldest first", ref("ScenarioHistory"),
                                               {"history": [example]})}}


def start_scenario(api, settings):
    return {"tags": ["trainer"], "summary": "Start an incident scenario",
            "description": "Without a duration it runs until stopped; starting a running scenario "
                           "restarts it.",
            "requestBody": json_body(ref("ScenarioStart"), False, {"duration": 300}),
            "responses": {"200": json_response("started", ref("Scenario"),
                                               scenario_example(api, "error_spike", 300)),
                          "404": unknown_scenario_response(api), **BODY_ERRORS}}


def stop_scenario(api, settings):
    return {"tags": ["trainer"], "summary": "Stop an incident scenario",
            "responses": {"200": json_response("stopped (or was not running)", ref("Scenario"),
                                               scenario_example(api, "error_spike")),
                          "404": unknown_scenario_response(api)}}


# ---------------------------------------------------------------- operations: checking students'
# work (exercises.py, with PROMETHEUS_URL)

RULE_FILE_EXAMPLE = {"groups": [{"name": "student", "rules": [{
    "alert": "PaymentErrors", "for": "5m",
    "expr": 'sum(rate(payment_requests_total{status="500"}[5m])) '
            "/ sum(rate(payment_requests_total[5m])) > 0.05"}]}]}
RULE_FILE_YAML = """groups:
  - name: student
    rules:
      - alert: PaymentErrors
        expr: >-
          sum(rate(payment_requests_total{status="500"}[5m]))
          / sum(rate(payment_requests_total[5m])) > 0.05
        for: 5m
"""
SUCCESS_RATE = ('sum(rate(payment_requests_total{status="200",currency=~"$currency"}[5m])) / '
                'sum(rate(payment_requests_total{currency=~"$currency"}[5m])) * 100')
DASHBOARD_EXAMPLE = {
    "title": "My payments",
    "templating": {"list": [{"name": "currency", "type": "query", "includeAll": True,
                             "multi": True, "datasource": {"type": "prometheus"},
                             "query": "label_values(payment_requests_total, currency)"}]},
    "panels": [{"id": 1, "title": "Success rate", "type": "stat",
                "datasource": {"type": "prometheus"},
                "fieldConfig": {"defaults": {"unit": "percent"}},
                "targets": [{"refId": "A", "expr": SUCCESS_RATE}]},
               {"id": 2, "title": "Payments by currency", "type": "timeseries",
                "datasource": {"type": "prometheus"},
                "targets": [{"refId": "A", "expr": "sum by (currency) (rate(payment_request_total"
                                                   '{currency=~"$currency"}[5m]))'}]}]}


def check_parameters(api, since):
    """?since= and ?end=: the window a check looks at, as exercises.py's --since and --end."""
    most = api.MOST_CHECK_SINCE // 86400
    return [{"name": "since", "in": "query", "required": False,
             "schema": {"type": "string", "minLength": 1, "default": since,
                        "pattern": "^(?:[0-9]+y)?(?:[0-9]+w)?(?:[0-9]+d)?(?:[0-9]+h)?"
                                   "(?:[0-9]+m)?(?:[0-9]+s)?(?:[0-9]+ms)?$"},
             "description": "how far back to look, a Prometheus duration (30m, 6h, 2d): more "
                            f"than 0 and at most {most}d"},
            {"name": "end", "in": "query", "required": False,
             "schema": {"type": "string", "default": "", "examples": ["2026-11-20T00:00:00Z"]},
             "description": "the end of the window, ISO-8601 UTC; empty: now"}]


def check_errors(api):
    """What every check may answer instead of its report."""
    busy = json_response(f"{api.MAX_CHECKS} checks run already, or too many connections: "
                         "retry in a few seconds", ref("Error"),
                         examples={"checks": api.ChecksBusy().body,
                                   "connections": json.loads(api.Overflow.BUSY)},
                         headers={"Retry-After": ref("RetryAfter", "headers")})
    return {
        "400": error_response("an unknown parameter, or `since` or `end` not allowed",
                              api.InvalidField("since", "since must be a Prometheus duration "
                                               "(30m, 6h, 2d), more than 0 and at most "
                                               "7d").body),
        "404": error_response("exercises.py is not installed beside payment_api.py",
                              api.NotFound("the checks (exercises.py) are not installed beside "
                                           "payment_api.py").body),
        "409": error_response("checks are off: the service runs without PROMETHEUS_URL",
                              api.Conflict(api.CHECKS_OFF).body),
        "502": error_response("Prometheus did not answer, or failed a query", api.BadGateway(
            "no answer from Prometheus at http://prometheus:9090 ([Errno 111] Connection "
            "refused)").body),
        "503": busy,
        "504": error_response(f"the check took more than {api.CHECK_SECONDS} s",
                              api.GatewayTimeout().body)}


def document_errors(api, types, refused):
    """The answers to a document that cannot be read or checked."""
    return {
        "408": ref("RequestTimeout", "responses"), "411": ref("LengthRequired", "responses"),
        "413": error_response(f"a body over {api.MAX_CHECK_BODY_BYTES} bytes", api.PayloadTooLarge(
            f"body is larger than {api.MAX_CHECK_BODY_BYTES} bytes").body),
        "415": error_response("another Content-Type; or YAML while PyYAML is not installed",
                              api.UnsupportedMediaType("Content-Type must be "
                                                       + " or ".join(types)).body),
        "422": error_response("a document Prometheus or Grafana would refuse: the error names "
                              "the rule or the panel, and the problem", {"error": refused})}


def checks(api, settings):
    url = settings.prometheus_url
    return {"tags": ["checks"], "summary": "Whether checks are on, and what they take",
            "responses": {"200": json_response("the checks' state", ref("Checks"), {
                "enabled": bool(url), "prometheus": url or None,
                "message": f"checks ask the Prometheus at {url}" if url else api.CHECKS_OFF,
                "yamlRuleFiles": True, "maxBodyBytes": api.MAX_CHECK_BODY_BYTES,
                "mostSinceSeconds": api.MOST_CHECK_SINCE,
                "asks": {"currency_variable": "a $currency variable"}})}}


def answer_key(api, settings):
    incident = {**INCIDENT_EXAMPLE, "alerts": [{"alertname": "HighPaymentErrorRate",
                                                "fired_at": "2026-11-19T06:08:00Z",
                                                "after_seconds": 360.0}]}
    return {"tags": ["checks"],
            "summary": "The answer key: every incident and the alerts it fired",
            "description": "What `exercises.py incidents --json` prints (docs/exercises.md).",
            "parameters": check_parameters(api, "7d"),
            "responses": {"200": json_response("the incidents, oldest first", ref("AnswerKey"), {
                **WINDOW_EXAMPLE, "incidents": [incident]}), **check_errors(api)}}


def check_alerts(api, settings):
    types = api.RULE_FILE_TYPES
    return {"tags": ["checks"], "summary": "Score a rule file's alerting rules",
            "description": "What `exercises.py alerts RULES.yml --json` prints: each alerting "
                           "rule evaluated by Prometheus over the window and laid over the "
                           "incidents "
                           "(docs/exercises.md). The body is the rule file, YAML or JSON; it is "
                           "only read.",
            "parameters": check_parameters(api, "7d"),
            "requestBody": {"required": True, "content": {
                "application/yaml": {"schema": {"type": "string"}, "example": RULE_FILE_YAML},
                "application/json": {"schema": ref("RuleFile"), "example": RULE_FILE_EXAMPLE}}},
            "responses": {"200": json_response("every alerting rule, scored",
                                               ref("AlertsReport"), alerts_report_example()),
                          **check_errors(api), **document_errors(api, types, (
                              'group "student", rule 1, "PaymentErrors": could not parse '
                              "expression: 1:6: parse error: expected type range vector in call "
                              'to function "rate", got instant vector'))}}


def check_dashboard(api, settings):
    return {"tags": ["checks"], "summary": "Check a dashboard's panels and the course's asks",
            "description": "What `exercises.py dashboard DASHBOARD.json --json` prints: every "
                           "Prometheus query of every panel run with its variables at All and "
                           "at each value (docs/exercises.md). The body is Grafana's JSON "
                           "export; it is only read.",
            "parameters": check_parameters(api, "6h"),
            "requestBody": json_body(ref("Dashboard"), True, DASHBOARD_EXAMPLE),
            "responses": {"200": json_response("the panels that fail or show nothing, and the "
                                               "asks met", ref("DashboardReport"),
                                               dashboard_report_example()),
                          **check_errors(api), **document_errors(api, ("application/json",), (
                              "not a Grafana dashboard: there is no panels list (export it "
                              "with Share > Export > Save to file)"))}}


WINDOW_EXAMPLE = {"prometheus": "http://prometheus:9090", "start": "2026-11-13T00:00:00Z",
                  "end": "2026-11-20T00:00:00Z"}
INCIDENT_EXAMPLE = {"scenario": "error_spike", "start": "2026-11-19T06:02:00Z",
                    "end": "2026-11-19T06:21:00Z", "running": False, "duration_seconds": 1140.0}


def alerts_report_example():
    caught = {"incidents": 1, "caught": 1, "delays_seconds": [360.0]}
    score = {"name": "PaymentErrors", "group": "student", "number": 1,
             "expr": RULE_FILE_EXAMPLE["groups"][0]["rules"][0]["expr"], "interval_seconds": 60,
             "for_seconds": 300, "keep_firing_for_seconds": 0, "grace_seconds": 420,
             "target": "error_spike", "incidents": 1, "caught": 1, "missed": 0,
             "delays_seconds": [360.0], "false_alarm_seconds": 0, "false_alarms": [],
             "firing_seconds": 1380.0, "by_scenario": {"error_spike": caught}, "hint": "",
             "verdict": "caught 1 of 1 error_spike incident, 6 m after it began; no false alarm",
             "ok": True}
    return {**WINDOW_EXAMPLE, "default_interval_seconds": 60, "incidents": [INCIDENT_EXAMPLE],
            "rules": [score], "ok": True}


def dashboard_report_example():
    asks = {"currency_variable": True, "payment_type_variable": False,
            "panels_use_currency": True, "panels_use_payment_type": False,
            "customer_filter": False, "success_rate_panel": True,
            "latency_percentile_panel": False, "revenue_by_currency": False,
            "success_rate_agrees": True}
    query = DASHBOARD_EXAMPLE["panels"][1]["targets"][0]["expr"]
    empty = {"title": "Payments by currency", "id": 2, "ref": "A", "query": query,
             "problem": "returns nothing for any value of its variables: no metric "
                        "payment_request_total in Prometheus (did you mean "
                        "payment_requests_total?)",
             "selections": ["All", "currency=EUR", "currency=GBP", "currency=USD"]}
    success = {"title": "Success rate",
               "query": SUCCESS_RATE.replace("$currency", "(EUR|GBP|USD)"),
               "truth_query": 'sum(rate(payment_requests_total{status="200"}[300s])) / '
                              "sum(rate(payment_requests_total[300s])) * 100",
               "panel_percent": [95.789, 98.741, 95.27, 96.007],
               "truth_percent": [95.789, 98.741, 95.27, 96.007], "several_series": False,
               "agrees": True}
    return {**WINDOW_EXAMPLE, "start": "2026-11-19T18:00:00Z", "title": "My payments",
            "step_seconds": 90, "variables": {"currency": ["EUR", "GBP", "USD"]},
            "checked_queries": 2, "query_runs": 8, "empty_panels": [empty], "not_checked": [],
            "notes": [], "asks": asks, "success_rate": success, "ok": False}


OPERATIONS = {describe.__name__: describe for describe in (
    console, openapi_document, health, metrics, create_payment, list_payments, payment_stats,
    activity,
    get_payment, create_refund, get_simulation, put_simulation, list_scenarios, scenario_history,
    start_scenario, stop_scenario, checks, answer_key, check_alerts, check_dashboard)}

# ---------------------------------------------------------------- examples, made by the service's
# own code


def example_payment(api, settings, http_status):
    """A payment of the service's own making, answered `http_status`: its JSON is the example."""
    card_number = "4000000000009995" if http_status == 402 else "4242424242424242"
    request = api.PaymentRequest(Decimal("100.00"), settings.currencies[0], "standard",
                                 "cust_00042", "card",
                                 card_number[-4:], api.TEST_CARDS.get(card_number))
    return api.Payment("pay_6f1c0e3a9b2d4c10", request, "api", 0.1183, http_status, EXAMPLE_TIME,
                       decline_code=request.decline_code, trace=example_trace(api))


def invalid_payment_examples(api, settings):
    examples = {}
    for name, body in (("amount", {"amount": Decimal("0.001")}), ("currency", {"amount": 1,
                                                                               "currency": "XXX"}),
                       ("cardNumber", {"amount": 1, "cardNumber": "4242424242424241"})):
        try:
            api.validate_payment(body, settings.currencies, random.Random(0))
        except api.ClientError as error:
            examples[name] = error.body
    return examples


def idempotency_error(api, result):
    return {"in_progress": api.Conflict("a request with this Idempotency-Key is still being "
                                        "processed; retry in "
                                        "a moment").body,
            "mismatch": api.Unprocessable("this Idempotency-Key was used with another request "
                                          "body", field="Idempotency-Key").body}[result]


def simulation_example(settings):
    return {"enabled": settings.simulation_enabled, "rate": settings.simulation_rate,
            "profile": settings.simulation_profile, "seed": settings.simulation_seed}


def scenario_example(api, name, duration=None):
    return {"name": name, "description": api.SCENARIOS[name][0], "active": duration is not None,
            "startedAt": api.iso_utc(EXAMPLE_TIME) if duration else None,
            "endsAt": api.iso_utc(EXAMPLE_TIME + duration) if duration else None}


def unknown_scenario_response(api):
    return error_response("no such scenario", api.NotFound("no such scenario", scenario="surprise",
                                                           known=list(api.SCENARIOS)).body)


def error_response(description, example=None, examples=None):
    return json_response(description, ref("Error"), example, examples)

# ---------------------------------------------------------------- schemas

def answered_amount(api):
    return {"type": "number", "minimum": 0, "maximum": int(api.MAX_AMOUNT)}
TIMESTAMP = {"type": "string", "format": "date-time", "pattern": "Z$",
             "description": "UTC, ISO-8601"}
PAYMENT_ID = {"type": "string", "pattern": "^pay_[0-9a-f]{16}$"}
SOURCES = ["api", "simulator"]  # who made a payment or a refund


def schemas(api, settings):
    """Every schema the operations refer to, in four groups."""
    return {**payment_schemas(api, settings), **service_schemas(api, settings),
            **trainer_schemas(api), **check_schemas()}


def payment_schemas(api, settings):
    """Payments, refunds and what a client sends for them."""
    amount = {"type": "number", "exclusiveMinimum": 0, "maximum": int(api.MAX_AMOUNT),
              "multipleOf": 0.01,
              "description": "at most 2 decimals"}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"},
            "field": {"type": "string",
                      "description": "the field, parameter or header at fault"}}},
        "PaymentRequest": payment_request_schema(api, settings, amount),
        "RefundRequest": {
            "description": "No body, null or {} refunds all that remains; another field than "
                           "amount is a 400 naming it.",
            "type": ["object", "null"], "additionalProperties": False,
            "default": {"amount": None},
            "properties": {"amount": {**amount, "type": ["number", "null"],
                                      "description": "default (or null): all that remains"}}},
        "Payment": {"oneOf": [ref("CompletedPayment"), ref("DeclinedPayment"),
                              ref("FailedPayment")]},
        "CompletedPayment": payment_schema(api, settings, "completed", ["refundedAmount",
                                                                        "refunds"]),
        "DeclinedPayment": payment_schema(api, settings, "declined", ["error", "declineCode"]),
        "FailedPayment": payment_schema(api, settings, "failed", ["error"]),
        "PaymentList": {"type": "object", "required": ["count", "payments", "nextCursor"],
                        "additionalProperties": False,
                        "properties": {"count": {"type": "integer", "minimum": 0},
                                       "payments": {"type": "array", "items": ref("Payment")},
                                       "nextCursor": {**PAYMENT_ID, "type": ["string", "null"],
                                                      "description": "the cursor of the next "
                                                      "page; null: no more"}}},
        "Refund": refund_schema(api, settings),
        "RefundResult": refund_schema(api, settings, refundedAmount=answered_amount(api),
                                      remainingAmount=answered_amount(api)),
    }


def service_schemas(api, settings):
    """The figures, the activity and the health of the service."""
    currencies = list(settings.currencies)
    per_currency = {"type": "object",
                    "properties": {code: {"type": "number"} for code in currencies},
                    "required": currencies, "additionalProperties": False}
    return {
        "Stats": stats_schema(per_currency),
        "Activity": {
            "type": "object", "additionalProperties": False,
            "required": ["windowSeconds", "p95ProcessingTime", "seconds"],
            "properties": {
                "windowSeconds": {"type": "integer", "minimum": 1,
                                  "maximum": api.PaymentStats.ACTIVITY_SECONDS},
                "p95ProcessingTime": {"type": ["number", "null"], "minimum": 0,
                                      "description": "seconds"},
                "seconds": {"type": "array", "maxItems": api.PaymentStats.ACTIVITY_SECONDS,
                            "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["time", "payments", "declined", "failed"],
                    "properties": {"time": TIMESTAMP, "payments": {"type": "integer",
                                                                   "minimum": 0},
                                   "declined": {"type": "integer", "minimum": 0},
                                   "failed": {"type": "integer", "minimum": 0}}}}}},
        "Health": {
            "type": "object", "required": ["status", "service", "version", "timestamp",
                                           "uptimeSeconds",
                                           "dependencies", "simulation"],
            "properties": {"status": {"enum": ["UP", "DOWN"]}, "service": {"const": "payment-api"},
                           "version": {"type": "string"}, "timestamp": TIMESTAMP,
                           "uptimeSeconds": {"type": "number", "minimum": 0},
                           "dependencies": {"type": "object", "required": ["influxdb"],
                                            "properties": {
                               "influxdb": {"type": "object", "required": ["state"],
                                            "properties": {
                                   "state": {"type": "string"}}}}},
                           "simulation": ref("Simulation")}},
    }


def trainer_schemas(api):
    """The simulator and the incident scenarios."""
    return {
        "Simulation": {"type": "object", "additionalProperties": False,
                       "required": ["enabled", "rate", "profile", "seed"],
                       "properties": simulation_properties(api)},
        "SimulationChange": {"type": "object", "additionalProperties": False, "default": {},
                             "properties": simulation_properties(api), "description": "Any of "
                             "the fields; another is a 400 naming it; {} changes nothing."},
        "Scenario": {"type": "object", "additionalProperties": False,
                     "required": ["name", "description", "active", "startedAt", "endsAt"],
                     "properties": {"name": {"enum": list(api.SCENARIOS)},
                                    "description": {"type": "string"},
                                    "active": {"type": "boolean"},
                                    "startedAt": {**TIMESTAMP, "type": ["string", "null"]},
                                    "endsAt": {**TIMESTAMP, "type": ["string", "null"],
                                               "description": "null: runs until stopped"}}},
        "ScenarioList": {"type": "object", "required": ["scenarios"],
                         "additionalProperties": False,
                         "properties": {"scenarios": {"type": "array", "items": ref("Scenario")}}},
        "ScenarioHistory": scenario_history_schema(api),
        "ScenarioStart": {"type": ["object", "null"], "additionalProperties": True,
                          "default": {"duration": None},
                          "description": "No body, null or {} runs the scenario until stopped.",
                          "properties": {"duration": {"type": ["number", "null"],
                                                      "exclusiveMinimum": 0,
                                                      "maximum": api.MAX_SCENARIO_SECONDS,
                                                      "description": "seconds"}}},
    }


def check_schemas():
    """The checks of students' work: their state, what they take, the answer key."""
    moment = {"type": "string", "format": "date-time", "pattern": "Z$"}
    window = {"prometheus": {"type": "string"}, "start": moment, "end": moment}
    alert = {"type": "object", "required": ["alertname", "fired_at", "after_seconds"],
             "properties": {"alertname": {"type": "string"}, "fired_at": moment,
                            "after_seconds": {"type": "number",
                                              "description": "negative: firing before"}}}
    return {
        "Checks": {"type": "object", "additionalProperties": False, "required": [
            "enabled", "prometheus", "message", "yamlRuleFiles", "maxBodyBytes",
            "mostSinceSeconds", "asks"], "properties": {
            "enabled": {"type": "boolean", "description": "false without PROMETHEUS_URL"},
            "prometheus": {"type": ["string", "null"]}, "message": {"type": "string"},
            "yamlRuleFiles": {"type": "boolean", "description": "false without PyYAML: send "
                              "rule files as JSON"},
            "maxBodyBytes": {"type": "integer"}, "mostSinceSeconds": {"type": "integer"},
            "asks": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "the course's asks of a dashboard, in words"}}},
        "Incident": {"type": "object", "required": ["scenario", "start", "end", "running",
                                                    "duration_seconds"], "properties": {
            "scenario": {"type": "string"}, "start": moment,
            "end": {**moment, "type": ["string", "null"], "description": "null: running"},
            "running": {"type": "boolean"}, "duration_seconds": {"type": "number"}}},
        "AnswerKey": {"type": "object", "required": [*window, "incidents"], "properties": {
            **window, "incidents": {"type": "array", "items": {"allOf": [ref("Incident"), {
                "type": "object", "required": ["alerts"],
                "properties": {"alerts": {"type": "array", "items": alert}}}]}}}},
        "RuleFile": {"type": "object", "required": ["groups"], "description": "a Prometheus "
                     "rule file written as JSON", "properties": {"groups": {
                         "type": "array", "items": {"type": "object", "required": ["name"],
                                                    "properties": {"name": {"type": "string"},
                                                                   "rules": {"type": "array"}}}}}},
        "Dashboard": {"type": "object", "description": "Grafana's JSON export of a dashboard "
                      "(or the API's {\"dashboard\": ...}): a `panels` list, `templating`"},
        **report_schemas(window),
    }


def report_schemas(window):
    """A rule file's scores and a dashboard's check, as exercises.py's --json prints them."""
    count = {"type": "integer", "minimum": 0}
    seconds = {"type": "number", "minimum": 0}
    score = {"name": {"type": "string"}, "group": {"type": "string"}, "number": count,
             "expr": {"type": "string"}, "interval_seconds": seconds, "for_seconds": seconds,
             "keep_firing_for_seconds": seconds, "grace_seconds": seconds,
             "target": {"type": ["string", "null"]}, "incidents": count, "caught": count,
             "missed": count, "delays_seconds": {"type": "array", "items": {"type": "number"}},
             "false_alarm_seconds": seconds, "false_alarms": {"type": "array"},
             "firing_seconds": seconds, "by_scenario": {"type": "object"},
             "hint": {"type": "string"}, "verdict": {"type": "string"}, "ok": {"type": "boolean"}}
    board = {"title": {"type": "string"}, "step_seconds": seconds, "variables": {"type": "object"},
             "checked_queries": count, "query_runs": count, "empty_panels": {
                 "type": "array", "items": {"type": "object", "required": [
                     "title", "ref", "query", "problem", "selections"]}},
             "not_checked": {"type": "array"}, "notes": {"type": "array"},
             "asks": {"type": "object", "additionalProperties": {"type": "boolean"}},
             "success_rate": {"type": ["object", "null"]}, "ok": {"type": "boolean"}}
    return {
        "AlertsReport": {"type": "object", "required": [
            *window, "default_interval_seconds", "incidents", "rules", "ok"], "properties": {
            **window, "default_interval_seconds": seconds,
            "incidents": {"type": "array", "items": ref("Incident")},
            "rules": {"type": "array", "items": {"type": "object", "required": list(score),
                                                 "properties": score}},
            "ok": {"type": "boolean", "description": "every rule caught an incident of its "
                                                    "target and raised no false alarm"}}},
        "DashboardReport": {"type": "object", "required": [*window, *board],
                            "properties": {**window, **board}},
    }


def scenario_history_schema(api):
    """What ran when: one entry a start, oldest first."""
    started_by = ["api", "schedule"]
    entry = {"type": "object", "additionalProperties": False,
             "required": ["scenario", "startedAt", "startedBy", "stoppedAt", "stoppedBy"],
             "properties": {"scenario": {"enum": list(api.SCENARIOS)},
                            "startedAt": TIMESTAMP, "startedBy": {"enum": started_by},
                            "stoppedAt": {**TIMESTAMP, "type": ["string", "null"]},
                            "stoppedBy": {"enum": [*started_by, "duration", None]}}}
    return {"type": "object", "required": ["history"], "additionalProperties": False,
            "properties": {"history": {"type": "array", "items": entry}}}


def payment_schema(api, settings, status, required):
    """A payment as payment_json writes it with `status`: completed, declined or failed."""
    properties = {
        "success": {"const": status == "completed"},
        "paymentId": PAYMENT_ID,
        "status": {"const": status},
        "amount": answered_amount(api),
        "currency": {"enum": list(settings.currencies)},
        "type": {"enum": list(api.PAYMENT_TYPES)},
        "customerId": {"type": "string", "pattern": anchored(api.CUSTOMER_ID)},
        "paymentMethod": {"enum": list(api.PAYMENT_METHODS)},
        "cardLast4": {"type": "string", "pattern": "^[0-9]{4}$",
                      "description": "with a card number only"},
        "timestamp": TIMESTAMP,
        "processingTime": {"type": "number", "minimum": 0, "maximum": api.MAX_PROCESSING_SECONDS,
                           "description": "seconds"},
        "source": {"enum": SOURCES},
        "traceId": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                    "description": "the W3C trace id of the payment: in its log line, exemplars "
                                   "and spans"},
    }
    properties.update({
        "completed": {"refundedAmount": answered_amount(api),
                      "refunds": {"type": "array", "maxItems": api.MAX_REFUNDS,
                                  "items": ref("Refund")}},
        "declined": {"error": {"type": "string"},
                     "declineCode": {"enum": list(api.DECLINE_WEIGHTS)}},
        "failed": {"error": {"type": "string"}},
    }[status])
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": [name for name in properties if name != "cardLast4"]}


def refund_schema(api, settings, **more):
    """A refund as refund_json writes it, with `more` properties (all required)."""
    properties = {"refundId": {"type": "string", "pattern": "^re_[0-9a-f]{16}$"},
                  "paymentId": PAYMENT_ID,
                  "amount": answered_amount(api), "currency": {"enum": list(settings.currencies)},
                  "status": {"const": "succeeded"}, "source": {"enum": SOURCES},
                  "timestamp": TIMESTAMP, **more}
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(properties)}


def payment_request_schema(api, settings, amount):
    """What validate_payment accepts; fields it does not know are ignored."""
    declined_cards = ", ".join(f"{number} ({code})" for number, code in api.TEST_CARDS.items())
    usd_default = "USD" in settings.currencies
    return {
        "type": "object", "additionalProperties": True,
        "required": ["amount"] if usd_default else ["amount", "currency"],
        "properties": {
            "amount": {**amount, "default": 100,
                       "description": "at most 2 decimals; required (the default is what an "
                                      "API client fills in)"},
            "currency": {"type": "string", "pattern": any_case(settings.currencies),
                         "examples": list(settings.currencies),
                         **({"default": "USD"} if usd_default else {}),
                         "description": "one of " + ", ".join(settings.currencies)
                                        + " (CURRENCIES), in any case"},
            "type": {"type": "string", "pattern": any_case(api.PAYMENT_TYPES),
                     "default": api.PAYMENT_TYPES[0],
                     "examples": list(api.PAYMENT_TYPES),
                     "description": "one of " + ", ".join(api.PAYMENT_TYPES) + ", in any case"},
            "customerId": {"type": ["string", "null"], "pattern": anchored(api.CUSTOMER_ID),
                           "default": None, "description": "absent or null: a customer from "
                                                          f"a pool of {api.CUSTOMER_POOL}"},
            "paymentMethod": {"enum": list(api.PAYMENT_METHODS),
                              "default": api.PAYMENT_METHODS[0]},
            "cardNumber": {"type": ["string", "null"], "pattern": anchored(api.CARD_NUMBER),
                           "format": "luhn", "default": None,
                           "description": "12-19 digits with a valid check digit (Luhn), with "
                                          "paymentMethod card only; only the last four are kept. "
                                          "Always declined: " + declined_cards}},
        "if": {"required": ["paymentMethod"],
               "properties": {"paymentMethod": {"not": {"const": "card"}}}},
        "then": {"properties": {"cardNumber": {"type": "null"}}},
    }


def listing_filter_schemas(api, settings):
    """A schema for each of LISTING_FILTERS, in its order."""
    known = {"customerId": {"type": "string", "pattern": anchored(api.CUSTOMER_ID),
                            "examples": ["cust_00042"]},
             "status": {"type": "string", "enum": list(api.PAYMENT_STATUSES)},
             "currency": {"type": "string", "pattern": any_case(settings.currencies),
                          "examples": list(settings.currencies)},
             "type": {"type": "string", "pattern": any_case(api.PAYMENT_TYPES),
                      "examples": list(api.PAYMENT_TYPES)}}
    return {name: known[name] for name in api.LISTING_FILTERS}


def simulation_properties(api):
    return {"enabled": {"type": "boolean"},
            "rate": {"type": "number", "minimum": 0, "maximum": api.MAX_SIMULATION_RATE,
                     "description": "payments per second"},
            "profile": {"enum": list(api.PROFILES)},
            "seed": {"type": ["integer", "null"], "description": "null: random"}}


def stats_schema(per_currency):
    rate = {"type": ["number", "null"], "minimum": 0, "maximum": 100,
            "description": "percent; null before any"}
    counts = ("payments", "succeeded", "declined", "failed", "rejected")
    return {"type": "object", "additionalProperties": False,
            "required": ["since", "uptimeSeconds", "totals", "successRate", "declineRate",
                         "failureRate",
                         "recentFailureRate", "activePayments", "dailyRevenue",
                         "revenueSinceStart",
                         "refundedSinceStart"],
            "properties": {
                "since": TIMESTAMP, "uptimeSeconds": {"type": "number", "minimum": 0},
                "totals": {"type": "object", "required": list(counts),
                           "additionalProperties": False,
                           "properties": {name: {"type": "integer",
                                                 "minimum": 0} for name in counts}},
                "successRate": rate, "declineRate": rate, "failureRate": rate,
                "recentFailureRate": {"type": "number", "minimum": 0, "maximum": 100},
                "activePayments": {"type": "integer", "minimum": 0},
                "dailyRevenue": {**per_currency, "required": ["date", *per_currency["required"]],
                                 "properties": {"date": {"type": "string",
                                                         "description": "UTC day, or 'None' "
                                                         "before the first payment"},
                                                **per_currency["properties"]}},
                "revenueSinceStart": per_currency, "refundedSinceStart": per_currency}}


def anchored(pattern):
    """A Python regular expression used with fullmatch as a JSON Schema pattern (which
    searches)."""
    return f"^(?:{pattern.pattern})$"


def any_case(words):
    """A pattern for `words` in any ASCII case, as known_currency, known_type and parse_bool
    compare them."""
    def any_case_letter(character):
        if character.isalpha():
            return f"[{character.upper()}{character.lower()}]"
        return re.escape(character)
    return "^(?:" + "|".join("".join(map(any_case_letter, word)) for word in words) + ")$"

# ---------------------------------------------------------------- parameters, headers and shared
# responses


def header_parameters(api):
    """The optional request headers. The default of each is what its absence means, so an API
    client that sends every optional header filled in (Postman's converter does) changes
    nothing: no fault, no delay, no key, no trace of another's."""
    traceparent = f"00-{example_trace(api).trace_id}-b7ad6b7169203331-01"
    keep = (f"kept {api.IdempotencyKeys.KEEP_SECONDS // 3600} hours, at most "
            f"{api.IdempotencyKeys.CAPACITY} keys")
    return {
        "IdempotencyKey": optional_header_parameter(
            "Idempotency-Key", "", or_empty(anchored(api.IDEMPOTENCY_KEY)),
            "For example an order number or a UUID, new for each payment or refund: a repeat "
            "with the same key and body gets the first answer again, and is not charged twice "
            f"({keep}); a 503 or an invalid request is not remembered. Empty: no key."),
        "TraceParent": optional_header_parameter(
            "traceparent", "", None,
            f"W3C Trace Context, for example {traceparent}: the payment joins this trace, as a "
            "child of this span; an empty or invalid value is ignored (the payment starts a "
            "trace of its own)"),
        "SimulateFailure": optional_header_parameter(
            "X-Simulate-Failure", "false", optional_header(any_case(api.BOOLEAN_WORDS)),
            "true: this payment fails with 500; false or empty: it does not"),
        "SimulateLatency": optional_header_parameter(
            "X-Simulate-Latency", "",
            optional_header(seconds_pattern(api, api.MAX_PROCESSING_SECONDS)),
            "for example 2.5: this payment takes so many seconds, at most "
            f"{api.MAX_PROCESSING_SECONDS:g}; empty: the simulated processing time"),
    }


def optional_header_parameter(name, default, pattern, description):
    """A header a client may leave out; `default` is what leaving it out means."""
    schema = {"type": "string", "default": default}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "header", "required": False, "schema": schema,
            "description": description}


def or_empty(pattern):
    """An anchored pattern that also accepts the empty text."""
    return "^(?:" + pattern.removeprefix("^").removesuffix("$") + ")?$"


def seconds_pattern(api, maximum):
    """What SECONDS lets through (blanks may follow), no more than the whole number `maximum`."""
    below = "|".join(str(whole) for whole in range(int(maximum)))
    allowed = rf"(?=(?:{api.SECONDS.pattern})[ \t]*$)"
    return allowed + rf"0*(?:(?:{below})(?:\.[0-9]+)?|{int(maximum)}(?:\.0+)?)"


def optional_header(value_pattern):
    """read_fault takes an empty header as none, and a value with blanks around it."""
    return rf"^(?:[ \t]*{value_pattern.strip('^$')}[ \t]*)?$"


SHARED_HEADERS = {
    "IdempotentReplayed": {"description": "true: the first answer to this Idempotency-Key, "
                                          "replayed",
                           "schema": {"const": "true"}},
    "TraceParent": {"description": "W3C Trace Context naming the payment's own span (its trace id "
                                   "is the "
                                   "payment's traceId)",
                    "schema": {"type": "string",
                               "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$"}},
    "RetryAfter": {"description": "seconds to wait before retrying",
                   "schema": {"type": "string", "pattern": "^[0-9]+$"}},
}


def shared_responses(api):
    def error(description, message):
        return error_response(description, {"error": message})
    unauthorized = error("ADMIN_TOKEN is set and the request did not bring it",
                         "this change needs 'Authorization: Bearer <ADMIN_TOKEN>'")
    unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"const": "Bearer"}}}
    busy = error("more than MAX_CONNECTIONS connections at once: retry in a second",
                 json.loads(api.Overflow.BUSY)["error"])
    busy["headers"] = {"Retry-After": ref("RetryAfter", "headers")}
    return {
        "BadRequest": error("not a usable request: `field` names what is wrong; also two "
                            "Content-Length "
                            "headers, Content-Length with Transfer-Encoding, or a malformed "
                            "header line",
                            "body is not valid JSON"),
        "Unauthorized": unauthorized,
        "RequestTimeout": error("the body did not arrive in time",
                                "the body did not arrive in time"),
        "LengthRequired": error("no Content-Length header, or a chunked body",
                                "a Content-Length header is required"),
        "PayloadTooLarge": error(f"a body over {api.MAX_BODY_BYTES} bytes",
                                 f"body is larger than {api.MAX_BODY_BYTES} bytes"),
        "UnsupportedMediaType": error("a Content-Type other than application/json",
                                      "Content-Type must be application/json"),
        "TooManyConnections": busy,
        "TooManyRequests": too_many_requests(api),
        "Forbidden": error("a page of another site (its Origin is neither the service's own nor "
                           "in ALLOWED_ORIGINS) may not change anything",
                           api.Forbidden("a page from http://elsewhere.example may not change "
                                         "this service; ALLOWED_ORIGINS lists the sites that "
                                         "may").body["error"]),
    }


def too_many_requests(api):
    """429: one client address keeps its share of MAX_CONNECTIONS busy already."""
    answer = error_response("this client already has MAX_CLIENT_SHARE of MAX_CONNECTIONS requests "
                            "in progress: retry in a second",
                            api.TooManyRequests("127.0.0.1", 64).body)
    answer["headers"] = {"Retry-After": ref("RetryAfter", "headers")}
    return answer
