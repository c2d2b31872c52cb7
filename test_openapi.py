"""The OpenAPI document at /openapi.json: valid, complete, made from the service's own tables, and true.

The last test lets schemathesis (a property-based API tester) loose on a live service with all its checks:
no 5xx, and no answer the document does not describe.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

import openapi
import payment_api as api
from conftest import QUIET, http

ADMIN_TOKEN = "trainer-secret"


@pytest.fixture
def served(make_app):
    """The document as the running service serves it, with an ADMIN_TOKEN set."""
    app = make_app(admin_token=ADMIN_TOKEN)
    status, headers, document = http("GET", app.url + "/openapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    return document


def settings(**overrides):
    return dataclasses.replace(api.Settings(), **{**QUIET, **overrides})


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def pattern_accepts(schema, text):
    """A JSON Schema pattern is ECMA-262, where $ is the very end (Python's $ also takes a last newline)."""
    return re.search(schema["pattern"].replace("$", r"\Z"), text) is not None


# ---------------------------------------------------------------- the document is valid and complete


def test_the_served_document_is_valid_openapi_3_1(served):
    OpenAPIV31SpecValidator(served).validate()
    assert served["openapi"].startswith("3.1")
    assert served["info"]["version"] == api.VERSION


def test_every_route_is_in_the_document_and_nothing_else(served):
    documented = list(operations(served))
    for method, pattern, handler, _ in api.PaymentHandler.ROUTES:
        paths = [path for documented_method, path, operation in documented if documented_method == method
                 and operation["operationId"] == handler and pattern.match(re.sub(r"\{\w+\}", "x", path))]
        assert len(paths) == 1, f"{method} {pattern.pattern} ({handler})"
    assert len(documented) == len(api.PaymentHandler.ROUTES)
    assert {path for _, path, _ in documented} >= {"/", "/openapi.json", "/api/activity", "/api/payments/{payment_id}"}


def test_every_route_has_a_description_of_its_own():
    handlers = {handler for _, _, handler, _ in api.PaymentHandler.ROUTES}
    assert set(openapi.OPERATIONS) == handlers, "describe each route of ROUTES in openapi.OPERATIONS"
    for method, path, operation in operations(openapi.document(settings(), api)):
        assert "x-undescribed" not in operation, f"{method} {path} has no description in openapi.py"
        assert operation["summary"] and operation["responses"]


def test_an_undescribed_route_is_still_listed_and_flagged(monkeypatch):
    monkeypatch.setattr(api.PaymentHandler, "ROUTES", [
        *api.PaymentHandler.ROUTES, ("GET", re.compile(r"/api/refunds\Z"), "list_refunds", False)])
    operation = openapi.document(settings(), api)["paths"]["/api/refunds"]["get"]
    assert operation["x-undescribed"] is True


# ---------------------------------------------------------------- made from the service's tables


def test_request_schemas_follow_the_configured_currencies():
    document = openapi.document(settings(currencies=("EUR", "JPY")), api)
    payment = document["components"]["schemas"]["PaymentRequest"]
    currency = payment["properties"]["currency"]
    assert [code for code in ("EUR", "jpy", "Eur", "USD", "GBP", "EURO") if pattern_accepts(currency, code)] == [
        "EUR", "jpy", "Eur"]
    assert "currency" in payment["required"], "without USD configured, the default USD is refused: say so"
    completed = document["components"]["schemas"]["CompletedPayment"]
    assert completed["properties"]["currency"]["enum"] == ["EUR", "JPY"]
    listing = {parameter["name"]: parameter for parameter in document["paths"]["/api/payments"]["get"]["parameters"]}
    assert pattern_accepts(listing["currency"]["schema"], "jpy") and not pattern_accepts(
        listing["currency"]["schema"], "USD")


def test_the_default_currency_usd_makes_currency_optional():
    payment = openapi.document(settings(), api)["components"]["schemas"]["PaymentRequest"]
    assert payment["required"] == ["amount"] and payment["properties"]["currency"]["default"] == "USD"


def test_enums_and_bounds_are_the_service_tables(served):
    schemas = served["components"]["schemas"]
    completed, declined = schemas["CompletedPayment"]["properties"], schemas["DeclinedPayment"]["properties"]
    assert completed["type"]["enum"] == list(api.PAYMENT_TYPES)
    assert completed["paymentMethod"]["enum"] == list(api.PAYMENT_METHODS)
    assert completed["currency"]["enum"] == list(api.Settings().currencies)
    assert declined["declineCode"]["enum"] == list(api.DECLINE_WEIGHTS)
    assert set(api.TEST_CARDS.values()) <= set(api.DECLINE_WEIGHTS)
    statuses = [schemas[name]["properties"]["status"]["const"]
                for name in ("CompletedPayment", "DeclinedPayment", "FailedPayment")]
    assert statuses == list(api.PAYMENT_STATUSES)
    request = schemas["PaymentRequest"]["properties"]
    assert request["amount"]["maximum"] == api.MAX_AMOUNT and request["amount"]["multipleOf"] == 0.01
    assert request["paymentMethod"]["enum"] == list(api.PAYMENT_METHODS)
    assert all(number in request["cardNumber"]["description"] for number in api.TEST_CARDS)
    simulation = schemas["SimulationChange"]["properties"]
    assert simulation["profile"]["enum"] == list(api.PROFILES)
    assert simulation["rate"]["maximum"] == api.MAX_SIMULATION_RATE
    assert schemas["Scenario"]["properties"]["name"]["enum"] == list(api.SCENARIOS)
    assert schemas["ScenarioStart"]["properties"]["duration"]["maximum"] == api.MAX_SCENARIO_SECONDS
    scenario = {parameter["name"]: parameter for parameter in served["paths"]["/api/scenarios/{name}"]["post"][
        "parameters"]}
    assert scenario["name"]["schema"]["enum"] == list(api.SCENARIOS)
    listing = {parameter["name"]: parameter for parameter in served["paths"]["/api/payments"]["get"]["parameters"]}
    assert list(listing) == ["limit", *api.LISTING_FILTERS]
    assert listing["status"]["schema"]["enum"] == list(api.PAYMENT_STATUSES)
    activity = served["paths"]["/api/activity"]["get"]["parameters"][0]["schema"]
    assert activity["maximum"] == activity["default"] == api.PaymentStats.ACTIVITY_SECONDS


def test_customer_ids_and_card_numbers_follow_the_validators():
    request = openapi.document(settings(), api)["components"]["schemas"]["PaymentRequest"]["properties"]
    for text in ("cust_00042", "A-b_9", "x" * 64, "x" * 65, "", "cust 1", "cüst", "a\n"):
        assert pattern_accepts(request["customerId"], text) == bool(api.CUSTOMER_ID.fullmatch(text)), text
    for number in ("4242424242424242", "4242424242424241", "12345", "4" * 20, "4242-4242-4242-4242"):
        try:
            api.validate_card({"cardNumber": number}, "card")
            accepted = True
        except api.InvalidField:
            accepted = False
        assert accepted == (pattern_accepts(request["cardNumber"], number) and api.luhn_valid(number)), number


def test_fault_and_idempotency_headers_follow_the_service(served):
    parameters = served["components"]["parameters"]
    failure = parameters["SimulateFailure"]["schema"]
    latency = parameters["SimulateLatency"]["schema"]
    for fail, seconds in [("true", ""), ("TRUE", "0"), ("off", "30"), ("", "30.0"), (" yes ", "29.999999999"),
                          ("maybe", "2"), ("1", "30.000000001"), ("0", "31"), ("no", "000000005"),
                          ("on", "0000000005"), ("false", "1e1"), ("true", "-1"), ("true", " 2.5 "), ("true", "2.")]:
        headers = {"X-Simulate-Failure": fail, "X-Simulate-Latency": seconds}
        try:
            api.read_fault(headers)
            accepted = True
        except api.InvalidField:
            accepted = False
        assert accepted == (pattern_accepts(failure, fail) and pattern_accepts(latency, seconds)), (fail, seconds)
    key = parameters["IdempotencyKey"]["schema"]
    for text in ("order-4711", "x" * 255, "x" * 256, "", "tab\there", "é"):
        assert pattern_accepts(key, text) == bool(api.IDEMPOTENCY_KEY.fullmatch(text)), text


def test_admin_routes_need_the_bearer_token_only_when_one_is_set(served):
    admin = {(method, openapi.path_template(pattern)[0])
             for method, pattern, _, needs_admin in api.PaymentHandler.ROUTES if needs_admin}
    scheme = served["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in operations(served):
        assert ("security" in operation) == ((method, path) in admin) == ("401" in operation["responses"])
    open_document = openapi.document(settings(), api)
    assert not any("security" in operation or "401" in operation["responses"]
                   for _, _, operation in operations(open_document))


def test_every_client_error_status_the_service_has_is_documented(served):
    documented = {status for _, _, operation in operations(served) for status in operation["responses"]}
    client_errors = {str(kind.status) for kind in all_subclasses(api.ClientError)}
    assert client_errors - {"405"} <= documented  # 405 belongs to methods a path has not, see info.description
    assert "405" in served["info"]["description"]
    payment = served["paths"]["/api/payments"]["post"]["responses"]
    assert {"200", "400", "402", "409", "422", "500", "503", "408", "411", "413", "415"} <= set(payment)


def all_subclasses(kind):
    return {kind} | {grandchild for child in kind.__subclasses__() for grandchild in all_subclasses(child)}


def test_metrics_and_the_console_are_not_json(served):
    assert set(served["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain", "application/openmetrics-text"}
    assert set(served["paths"]["/"]["get"]["responses"]["200"]["content"]) == {"text/html"}


# ---------------------------------------------------------------- examples validate against their schemas


def examples_with_schemas(document):
    """(where, example, schema) for every example of a response, request body or parameter."""
    for method, path, operation in operations(document):
        places = [(f"{method} {path} {status}", response) for status, response in operation["responses"].items()]
        if "requestBody" in operation:
            places.append((f"{method} {path} body", operation["requestBody"]))
        for where, place in places:
            place = follow(document, place)
            for media_type, content in place.get("content", {}).items():
                for name, example in named_examples(content):
                    yield f"{where} {media_type} {name}", example, content["schema"]
        for parameter in operation.get("parameters", []):
            parameter = follow(document, parameter)
            for name, example in named_examples(parameter):
                yield f"{method} {path} {parameter['name']} {name}", example, parameter["schema"]


def follow(document, node):
    """What a {"$ref": "#/components/..."} points at, or the node itself."""
    while "$ref" in node:
        target = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def named_examples(node):
    if "example" in node:
        yield "example", node["example"]
    for name, example in node.get("examples", {}).items():
        yield name, example["value"]
    if isinstance(node.get("schema"), dict):
        for index, example in enumerate(node["schema"].get("examples", [])):
            yield f"schema example {index}", example


def test_every_example_validates_against_its_schema(served):
    checked = 0
    for where, example, schema in examples_with_schemas(served):
        validator = jsonschema.Draft202012Validator({**schema, "components": served["components"]},
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        errors = [error.message for error in validator.iter_errors(example)]
        assert not errors, f"{where}: {errors}"
        checked += 1
    assert checked >= 40


# ---------------------------------------------------------------- schemathesis against a live service

# 402 (declined), 404 (no such payment), 409, 422 (more than remains, a key reused) answer valid requests too.
# The fault headers stay "false" and "0": a requested 500 or a 30 s payment proves nothing here.
SCHEMATHESIS_CONFIG = """
hooks = "luhn_format.py"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "402", "404", "409", "422"]

[parameters]
"header.X-Simulate-Failure" = "false"
"header.X-Simulate-Latency" = "0"
"""
# A card number's last digit is a check digit, beyond what JSON Schema can say: the document names it
# format "luhn", and this teaches schemathesis to draw such numbers (with the service's own luhn_valid).
LUHN_FORMAT = """
import schemathesis
from hypothesis import strategies as st
from payment_api import luhn_valid


def with_check_digit(digits):
    return next(digits + check for check in "0123456789" if luhn_valid(digits + check))


schemathesis.openapi.format("luhn", st.from_regex(r"\\A[0-9]{11,18}\\Z").map(with_check_digit))
"""
SCHEMATHESIS_SEED = "20261127"


def run_schemathesis(url, workdir, *arguments):
    """Run schemathesis' CLI with all its checks, a few examples an operation, one worker; return its summary."""
    executable = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or shutil.which("schemathesis")
    if executable is None:
        pytest.fail("schemathesis is not installed (pip install -r requirements-dev.txt)")
    config = workdir / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    (workdir / "luhn_format.py").write_text(LUHN_FORMAT)
    command = [executable, "--config-file", str(config), "run", url + "/openapi.json", "--checks", "all",
               "--max-examples", "10", "--seed", SCHEMATHESIS_SEED, "--workers", "1", "--request-timeout", "10",
               *arguments]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=150,
                            env={**os.environ, "NO_COLOR": "1",
                                 "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))})
    summary = result.stdout[result.stdout.rfind("SUMMARY"):]
    print(" ".join(command), summary, sep="\n")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return summary


def test_schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_describe(make_app, tmp_path):
    """Every operation, the admin ones answering 401 without the token; then the admin ones with it.

    Apart, so that a scenario it starts (an outage, an error spike) cannot make a payment answer 5xx."""
    app = make_app(admin_token=ADMIN_TOKEN, failure_rate=0.0, decline_rate=api.Settings().decline_rate,
                   latency_scale=0.0)
    everything = run_schemathesis(app.url, tmp_path)
    assert int(re.search(r"Tested: (\d+)", everything)[1]) == len(api.PaymentHandler.ROUTES) - 1  # not the document
    admin = run_schemathesis(app.url, tmp_path, "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
                             "--include-path-regex", "^/api/(simulation|scenarios)")
    assert int(re.search(r"Tested: (\d+)", admin)[1]) == 6
