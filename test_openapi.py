"""The OpenAPI document at /openapi.json: valid, complete, made from the service's own tables, and true.

What a user of an API client gets works: the Postman collection that openapi-to-postmanv2 makes of the
document runs in newman, every request answering as documented. Every JSON answer shown in README.md and
docs/ has exactly the fields the service answers. The last test lets schemathesis (a property-based API
tester) loose on a live service with all its checks: no 5xx, and no answer the document does not describe.
"""
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

import openapi
import payment_api as api
from conftest import QUIET, http, require_binary

ADMIN_TOKEN = "trainer-secret"
ROOT = Path(__file__).resolve().parent


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
    assert list(listing) == ["limit", "cursor", *api.LISTING_FILTERS]
    assert listing["limit"]["schema"]["maximum"] == api.MAX_PAGE
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
    for text in ("order-4711", "x" * 255, "x" * 256, "", "tab\there", "é"):  # empty: no key
        assert pattern_accepts(key, text) == (text == "" or bool(api.IDEMPOTENCY_KEY.fullmatch(text))), text


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


# ---------------------------------------------------------------- what an API client sends as it comes

# Postman's converter switches every optional header on, filled with its example, else its schema's default
# (with pattern, enum or default; a bare type becomes a placeholder such as "<number>"). Both must ask for
# nothing: no fault, no delay, no Idempotency-Key, no trace of another's.


def header_parameters(document):
    """Every header parameter of every operation, references followed."""
    for _, _, operation in operations(document):
        for parameter in operation.get("parameters", []):
            parameter = follow(document, parameter)
            if parameter["in"] == "header":
                yield parameter


def test_no_default_or_example_of_a_header_asks_for_a_fault_a_delay_a_key_or_a_trace(served):
    names = set()
    for parameter in header_parameters(served):
        name = parameter["name"]
        assert parameter["required"] is False, name
        for value in [parameter["schema"]["default"], *(value for _, value in named_examples(parameter))]:
            assert api.read_fault({name: value}) == api.Fault(), (name, value)
            assert name != "Idempotency-Key" or value == "", value
            assert name != "traceparent" or api.trace_context([value]).parent_span_id is None, value
        names.add(name)
    assert names == {"Idempotency-Key", "traceparent", "X-Simulate-Failure", "X-Simulate-Latency"}


def test_the_optional_headers_at_their_defaults_ask_for_nothing(make_app):
    """Two payments with every optional header sent at its default: two payments, no replay, no 422."""
    app = make_app()
    defaults = {parameter["name"]: parameter["schema"]["default"]
                for parameter in header_parameters(openapi.document(settings(), api))}
    answers = [http("POST", app.url + "/api/payments", {"amount": amount}, defaults) for amount in (10, 20)]
    assert [(status, body.get("amount"), headers["Idempotent-Replayed"]) for status, headers, body in answers] == [
        (200, 10.0, None), (200, 20.0, None)], answers[0][2]


def schema_defaults(node, where="#"):
    """(where, default, schema) for every schema of the document that has a default."""
    if isinstance(node, dict):
        if "default" in node and ("type" in node or "enum" in node):
            yield where, node["default"], node
        for key, value in node.items():
            yield from schema_defaults(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from schema_defaults(value, f"{where}/{index}")


def test_every_default_validates_against_its_schema(served):
    """A converter in its default mode sends the defaults: each must be a value the service accepts."""
    defaults = list(schema_defaults(served))
    for where, default, schema in defaults:
        validator = jsonschema.Draft202012Validator({**schema, "components": served["components"]})
        assert not [error.message for error in validator.iter_errors(default)], where
    assert len(defaults) >= 12


def test_every_request_body_has_an_example(served):
    for method, path, operation in operations(served):
        if "requestBody" in operation:
            content = operation["requestBody"]["content"]["application/json"]
            assert "example" in content or content.get("examples"), f"{method} {path}"


# ---------------------------------------------------------------- the Postman collection runs in newman

POSTMAN = ROOT / ".ci" / "postman"
# the converter's default mode, and example mode with a folder per tag (as docs/api.md advises)
CONVERTER_OPTIONS = {"default": [], "example": ["-O", "parametersResolution=Example,folderStrategy=Tags"]}
ABSENT_PAYMENT = {"get_payment", "create_refund"}  # the collection's payment id exists in no store: 404
CHECKS = {"answer_key", "check_alerts", "check_dashboard"}  # without PROMETHEUS_URL: 409, checks are off


def postman_tools():
    """(node, converter script, newman script), the versions pinned in .ci/postman/package-lock.json; skip
    without them, except under CI=true where that is a failure."""
    node = require_binary("node")
    packages = json.loads((POSTMAN / "package-lock.json").read_text())["packages"]
    scripts = []
    for package, script in (("openapi-to-postmanv2", "bin/openapi2postmanv2.js"), ("newman", "bin/newman.js")):
        pinned = packages[f"node_modules/{package}"]["version"]
        manifest = POSTMAN / "node_modules" / package / "package.json"
        installed = json.loads(manifest.read_text())["version"] if manifest.exists() else None
        if installed != pinned:
            message = f"{package} {pinned} is not installed (found {installed}): run npm ci --prefix .ci/postman"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        scripts.append(str(POSTMAN / "node_modules" / package / script))
    return node, *scripts


def run_collection(url, document, workdir, mode):
    """Convert `document` as openapi-to-postmanv2 does in `mode` and run the collection with newman against
    `url`, with the admin token; (the collection, newman's run report)."""
    node, converter, newman = postman_tools()
    source, collection, report = (workdir / f"{mode}-{name}.json" for name in ("openapi", "collection", "run"))
    source.write_text(json.dumps(document))
    converted = subprocess.run([node, converter, "-s", str(source), "-o", str(collection),
                                *CONVERTER_OPTIONS[mode]], capture_output=True, text=True, timeout=60)
    assert converted.returncode == 0 and collection.exists(), converted.stdout[-3000:] + converted.stderr
    ran = subprocess.run([node, newman, "run", str(collection), "--env-var", f"baseUrl={url}",
                          "--env-var", f"bearerToken={ADMIN_TOKEN}", "--timeout-request", "10000",
                          "--reporters", "json", "--reporter-json-export", str(report)],
                         capture_output=True, text=True, timeout=90)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    return json.loads(collection.read_text()), json.loads(report.read_text())["run"]


def documented_operation(document, method, path):
    """The operation of the document that a request to `path` reaches: an exact path before a template."""
    candidates = [(template != path, operation) for documented_method, template, operation in operations(document)
                  if documented_method == method
                  and re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path)]
    return min(candidates, key=lambda candidate: candidate[0])[1] if candidates else None


def request_of(execution):
    """(method, path) of a request newman sent."""
    return execution["request"]["method"], "/" + "/".join(execution["request"]["url"]["path"])


def sent_operations(document, run):
    """The operationId of each request of a newman run."""
    for execution in run["executions"]:
        operation = documented_operation(document, *request_of(execution))
        yield operation and operation["operationId"]


def wrong_answers(document, run):
    """What is not as documented in each answer of a newman run: its status, or its JSON body's schema."""
    for execution in run["executions"]:
        (method, path), response = request_of(execution), execution.get("response") or {}
        operation = documented_operation(document, method, path)
        if operation is None:
            yield f"{method} {path}: not in the document"
            continue
        successes = [status for status in operation["responses"] if status.startswith("2")]
        expected = ("404" if operation["operationId"] in ABSENT_PAYMENT
                    else "409" if operation["operationId"] in CHECKS else successes[0])
        status = str(response.get("code"))
        body = bytes(response.get("stream", {}).get("data", [])).decode()
        if status != expected:
            yield f"{method} {path}: {status} instead of {expected}: {body[:300]}"
            continue
        content = follow(document, operation["responses"][status]).get("content", {})
        if "application/json" in content:
            schema = {**content["application/json"]["schema"], "components": document["components"]}
            errors = [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(json.loads(body))]
            if errors:
                yield f"{method} {path} {status}: {errors}"


@pytest.mark.parametrize("mode", CONVERTER_OPTIONS)
def test_the_postman_collection_of_the_document_answers_as_documented_in_newman(make_app, tmp_path, mode):
    """What a Postman user gets: the collection openapi-to-postmanv2 makes, every request sent as it comes.
    Every request answers its documented 2xx (404 for a payment that does not exist, 409 for a check of a service
    without PROMETHEUS_URL), and the run leaves the simulator as it was and no scenario running."""
    app = make_app(admin_token=ADMIN_TOKEN, simulation_enabled=True, simulation_rate=1.0,
                   simulation_profile="diurnal")
    document = http("GET", app.url + "/openapi.json")[2]
    simulation = http("GET", app.url + "/api/simulation")[2]
    collection, run = run_collection(app.url, document, tmp_path, mode)
    statuses = [execution["response"]["code"] for execution in run["executions"]]
    print(f"newman, converter's {mode} mode: requests {run['stats']['requests']}, failures "
          f"{len(run['failures'])}, answers {dict(sorted(Counter(statuses).items()))}")
    wrong = list(wrong_answers(document, run))
    assert not wrong, "\n".join(wrong)
    assert sorted(sent_operations(document, run)) == sorted(handler for _, _, handler, _ in api.PaymentHandler.ROUTES)
    assert run["stats"]["requests"]["failed"] == 0 and run["failures"] == []
    assert http("GET", app.url + "/api/simulation")[2] == simulation
    assert not [scenario for scenario in http("GET", app.url + "/api/scenarios")[2]["scenarios"] if scenario["active"]]
    if "folderStrategy=Tags" in " ".join(CONVERTER_OPTIONS[mode]):
        assert [folder["name"] for folder in collection["item"]] == [tag["name"] for tag in document["tags"]]


# ---------------------------------------------------------------- the docs' example answers are the service's

# The convention: a ```json block in README.md or docs/ is the answer to the last curl command of the ```bash
# block right before it (prose may stand between them); `...` in it stands for more elements like the ones
# before it.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def fenced_blocks(markdown):
    """(info string, text) of each fenced code block of a page, in order."""
    blocks, fence = [], None
    for line in markdown.splitlines():
        if fence is None:
            opening = re.match(r"^(`{3,})([\w-]*)\s*$", line)
            if opening:
                fence, info, lines = opening[1], opening[2], []
        elif line.strip() == fence:
            blocks.append((info, "\n".join(lines)))
            fence = None
        else:
            lines.append(line)
    return blocks


def example_answers():
    """(page, the curl command or None, the answer's text) for every ```json block of the pages."""
    for page, text in PAGES.items():
        blocks = fenced_blocks(text)
        for index, (info, answer) in enumerate(blocks):
            if info == "json":
                before, code = blocks[index - 1] if index else ("", "")
                commands = [line.strip() for line in code.replace("\\\n", " ").splitlines()
                            if line.strip().startswith("curl ")]
                yield page, commands[-1] if before == "bash" and commands else None, answer


def curl_request(command, url):
    """(method, URL, body, headers) of a documented curl command, sent to the service at `url`."""
    method, body, headers, target = None, None, {}, None
    words = iter(shlex.split(command, comments=True)[1:])
    for word in words:
        if word == "-X":
            method = next(words)
        elif word == "-H":
            name, _, value = next(words).partition(":")
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data"):
            body = next(words).encode()
        else:
            target = word
    return method or ("POST" if body else "GET"), target.replace("http://localhost:8080", url), body, headers


def field_differences(documented, answered, where="the answer"):
    """Where the documented answer has other fields than the service's answer, nested objects and the
    elements of arrays included."""
    if isinstance(documented, dict) and isinstance(answered, dict):
        lacking, extra = sorted(answered.keys() - documented.keys()), sorted(documented.keys() - answered.keys())
        if lacking or extra:
            yield f"{where}: the docs lack {lacking} and show {extra} the service does not answer"
        for key in sorted(documented.keys() & answered.keys()):
            yield from field_differences(documented[key], answered[key], f"{where}.{key}")
    elif isinstance(documented, list) and isinstance(answered, list):
        for item in documented if answered else []:
            yield from field_differences(item, answered[0], f"{where}[]")
    elif isinstance(documented, (dict, list)) or isinstance(answered, (dict, list)):
        yield f"{where}: documented {type(documented).__name__}, answered {type(answered).__name__}"


def test_field_differences_are_found_in_nested_objects_and_arrays():
    documented = {"a": 1, "b": [{"c": 1}, {"c": 2}], "d": {"e": 1}}
    assert list(field_differences(documented, {"a": 2, "b": [{"c": 3}], "d": {"e": None}})) == []
    assert list(field_differences(documented, {"a": 1, "x": 1, "b": [{"c": 1, "y": 2}], "d": []})) == [
        "the answer: the docs lack ['x'] and show [] the service does not answer",
        "the answer.b[]: the docs lack ['y'] and show [] the service does not answer",
        "the answer.b[]: the docs lack ['y'] and show [] the service does not answer",
        "the answer.d: documented dict, answered list"]


def test_every_json_answer_in_the_docs_has_exactly_the_fields_the_service_answers(make_app):
    app = make_app()
    examples = list(example_answers())
    assert {page for page, _, _ in examples} >= {"docs/api.md", "docs/console.md"}
    wrong = []
    for page, command, text in examples:
        if command is None:
            wrong.append(f"{page}: a JSON answer without the curl request it answers in a bash block before it")
            continue
        method, url, body, headers = curl_request(command, app.url)
        _, _, answer = http(method, url, body, headers)
        documented = json.loads(re.sub(r",\s*\.\.\.(?=\s*[\]}])", "", text))
        wrong += [f"{page}: {command}: {difference}" for difference in field_differences(documented, answer)]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- schemathesis against a live service

# 402 (declined), 404 (no such payment), 409, 422 (more than remains, a key reused) answer valid requests too.
# The fault headers stay "false" and "0": a requested 500 or a 30 s payment proves nothing here. The cursor
# stays empty: a made-up one names a payment never kept, a 400 for a well-formed value.
SCHEMATHESIS_CONFIG = """
hooks = "luhn_format.py"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "402", "404", "409", "422"]

[parameters]
"header.X-Simulate-Failure" = "false"
"header.X-Simulate-Latency" = "0"
"query.cursor" = ""
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
