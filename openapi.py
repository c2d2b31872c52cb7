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
        if (method, path) not in overflow_answers(api):
            responses.setdefault("503", {"$ref": "#/components/responses/TooManyConnections"})
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
        "service": "Health, metrics, this document and the console page"}

def overflow_answers(api):
    return {(method.decode(), path.decode()) for method, path in api.Overflow.ANSWERED_HERE}


def path_template(pattern):
    """('/api/payments/{payment_id}', ['payment_id']) from a route's compiled regular
    expression."""
    text = pattern.pattern.removesuffix(r"\Z").replace("\\.", ".")
    names = re.findall(r"\(\?P<(\w+)>", text)
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", text), names


def path_parameter(api, name, settings):
    schema = {"payment_id": {"type": "string", "pattern": r"^[^/]+$",
                             "examples": ["pay_6f1c0e3a9b2d4c10"]},
              "name": {"type": "string", "enum": list(api.SCENARIOS)}}[name]
    return {"name": name, "in": "path", "required": True, "schema": schema,
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
             "schema": {"type": "integer", "minimum": 1, "maximum": largest_whole_number(api),
                        "default": 50},
             "description": "how many, newest first (at most STORE_SIZE are kept)"}
    return {"tags": ["payments"], "summary": "The most recent payments, newest first",
            "description": "Another query parameter is a 400 naming it.",
            "parameters": [limit, *filters],
            "responses": {
                "200": json_response("the payments", ref("PaymentList"),
                                     {"count": 1,
                                      "payments": [api.payment_json(example_payment(api, settings,
                                                                                    200))]}),
                "400": error_response("an unknown parameter or a value not allowed", examples={
                    "unknown": api.InvalidField("page", "unknown parameter; known: limit, "
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
            "requestBody": json_body(ref("SimulationChange"), True, {"rate": 50,
                                                                     "profile": "bursty"}),
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


OPERATIONS = {describe.__name__: describe for describe in (
    console, openapi_document, health, metrics, create_payment, list_payments, payment_stats,
    activity,
    get_payment, create_refund, get_simulation, put_simulation, list_scenarios, scenario_history,
    start_scenario, stop_scenario)}

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
    """Every schema the operations refer to, in three groups."""
    return {**payment_schemas(api, settings), **service_schemas(api, settings),
            **trainer_schemas(api)}


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
            "description": "No body, null or {} refunds all that remains.",
            "type": ["object", "null"], "additionalProperties": True,
            "properties": {"amount": {**amount, "type": ["number", "null"],
                                      "description": "default (or null): all that remains"}}},
        "Payment": {"oneOf": [ref("CompletedPayment"), ref("DeclinedPayment"),
                              ref("FailedPayment")]},
        "CompletedPayment": payment_schema(api, settings, "completed", ["refundedAmount",
                                                                        "refunds"]),
        "DeclinedPayment": payment_schema(api, settings, "declined", ["error", "declineCode"]),
        "FailedPayment": payment_schema(api, settings, "failed", ["error"]),
        "PaymentList": {"type": "object", "required": ["count", "payments"],
                        "additionalProperties": False,
                        "properties": {"count": {"type": "integer", "minimum": 0},
                                       "payments": {"type": "array", "items": ref("Payment")}}},
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
        "SimulationChange": {"type": "object", "additionalProperties": False,
                             "description": "Any of the fields; another field is a 400 naming it.",
                             "properties": simulation_properties(api)},
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
        "ScenarioHistory": {"type": "object", "required": ["history"],
                            "additionalProperties": False,
                            "properties": {"history": {"type": "array", "items": {
                                "type": "object", "additionalProperties": False,
                                "required": ["scenario", "startedAt", "startedBy", "stoppedAt",
                                             "stoppedBy"],
                                "properties": {"scenario": {"enum": list(api.SCENARIOS)},
                                               "startedAt": TIMESTAMP,
                                               "startedBy": {"enum": ["api", "schedule"]},
                                               "stoppedAt": {**TIMESTAMP, "type": ["string",
                                                                                   "null"]},
                                               "stoppedBy": {"enum": ["api", "schedule",
                                                                      "duration", None]}}}}}},
        "ScenarioStart": {"type": ["object", "null"], "additionalProperties": True,
                          "description": "No body, null or {} runs the scenario until stopped.",
                          "properties": {"duration": {"type": ["number", "null"],
                                                      "exclusiveMinimum": 0,
                                                      "maximum": api.MAX_SCENARIO_SECONDS,
                                                      "description": "seconds"}}},
    }


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
            "amount": amount,
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
                           "description": f"absent or null: a customer from a pool of "
                                          f"{api.CUSTOMER_POOL}"},
            "paymentMethod": {"enum": list(api.PAYMENT_METHODS),
                              "default": api.PAYMENT_METHODS[0]},
            "cardNumber": {"type": ["string", "null"], "pattern": anchored(api.CARD_NUMBER),
                           "format": "luhn",
                           "description": "12-19 digits with a valid check digit (Luhn), with "
                                          "paymentMethod card only; only the last four are kept. "
                                          "Always declined: " + declined_cards}},
        "if": {"required": ["paymentMethod"],
               "properties": {"paymentMethod": {"not": {"const": "card"}}}},
        "then": {"properties": {"cardNumber": {"type": "null"}}},
    }


def listing_filter_schemas(api, settings):
    """A schema for each of LISTING_FILTERS, in its order."""
    known = {"customerId": {"type": "string", "pattern": anchored(api.CUSTOMER_ID)},
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


def largest_whole_number(api):
    """The largest number WHOLE_NUMBER lets through (query and header numbers are ASCII digits, so
    many)."""
    digits = 1
    while api.WHOLE_NUMBER.fullmatch("9" * (digits + 1)):
        digits += 1
    return int("9" * digits)

# ---------------------------------------------------------------- parameters, headers and shared
# responses


def header_parameters(api):
    return {
        "IdempotencyKey": {
            "name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": anchored(api.IDEMPOTENCY_KEY)},
            "description": "For example an order number or a UUID, new for each payment or "
                           "refund: a repeat with the "
                           "same key and body gets the first answer again, and is not charged "
                           "twice (kept "
                           f"{api.IdempotencyKeys.KEEP_SECONDS // 3600} hours, at most "
                           f"{api.IdempotencyKeys.CAPACITY} "
                           "keys); a 503 or an invalid request is not remembered."},
        "TraceParent": {
            "name": "traceparent", "in": "header", "required": False, "schema": {"type": "string"},
            "description": "W3C Trace Context: the payment joins this trace, as a child of this "
                           "span; an invalid "
                           "value is ignored (the payment starts a trace of its own)",
            "example": example_trace(api).traceparent.replace(example_trace(api).span_id,
                                                              "b7ad6b7169203331")},
        "SimulateFailure": {
            "name": "X-Simulate-Failure", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": optional_header(any_case(api.BOOLEAN_WORDS))},
            "description": "true: this payment fails with 500", "example": "true"},
        "SimulateLatency": {
            "name": "X-Simulate-Latency", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": optional_header(
                seconds_pattern(api, api.MAX_PROCESSING_SECONDS))},
            "description": f"this payment takes so many seconds, at most "
                           f"{api.MAX_PROCESSING_SECONDS:g}",
            "example": "2.5"},
    }


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
    }
