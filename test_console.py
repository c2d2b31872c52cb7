"""The trainer's console (console.html at GET /) in a real headless browser against a running service.

Debian's `chromium`, driven by Playwright for Python (no browser download: it launches /usr/bin/chromium).
Without chromium or Playwright these tests skip; under CI=true they fail instead.
"""
import json
import os
import re
from pathlib import Path

import pytest

import payment_api
from conftest import eventually, http, require_binary

HERE = Path(__file__).resolve().parent

VIEWPORT = {"width": 1280, "height": 720}  # a classroom projector
TOKEN_KEY = "payment-api admin token"  # the page's sessionStorage key
LIVE = {"simulation_enabled": True, "simulation_rate": 20.0}  # enough payments to see every figure within seconds
# as the machine notes say: without the background-networking flags chromium knocks on the closed network
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    chromium = require_binary("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Playwright for Python is required under CI=true (pip install -r requirements-dev.txt)")
        pytest.skip("Playwright for Python is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def open_console(browser, make_app):
    """Open the console of an app in a fresh browser tab; afterwards, fail on any JavaScript or console error
    except the 'Failed to load resource' lines chromium writes for answers the test asked for (page.expected)."""
    tabs = []

    def open_(app):
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.errors, page.expected = [], set()
        page.on("pageerror", lambda error: page.errors.append(f"uncaught {error}"))
        page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
        tabs.append((context, page))
        page.goto(app.url + "/")
        expect(page.locator("#connection")).to_contain_text("Live from")
        return page

    yield open_
    for context, page in tabs:
        unexpected = [error for error in page.errors if not expected_status(error, page.expected)]
        context.close()
        assert not unexpected, f"errors in the browser console: {unexpected}"


def expected_status(console_error, statuses):
    match = re.fullmatch(r"Failed to load resource: the server responded with a status of (\d+) .*", console_error)
    return bool(match) and int(match[1]) in statuses


def expect(locator):
    """Playwright's polling assertion, imported late: without Playwright this module still loads, and skips."""
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(locator)


def scenarios(app):
    return {scenario["name"]: scenario for scenario in http("GET", app.url + "/api/scenarios")[2]["scenarios"]}


def test_the_console_shows_live_figures_that_change_as_the_simulator_runs(make_app, open_console):
    app = make_app(**LIVE)
    page = open_console(app)

    expect(page.locator("#payment-rate")).to_have_text(re.compile(r"[1-9]\d*\.\d"))
    expect(page.locator("#success-rate")).to_have_text("100.0 %")  # make_app's QUIET settings: no failure, no decline
    expect(page.locator("#failure-rate")).to_have_text("0.0 %")
    expect(page.locator("#p95")).to_have_text(re.compile(r"\d+ ms"))
    expect(page.locator("#simulation-now")).to_have_text("Now: on, 20.0 payments/s, profile steady, seed random")
    expect(page.locator("#chart polyline")).to_have_count(3)
    expect(page.locator("#payment-rows tr")).to_have_count(8)
    newest_id = page.locator("#payment-rows tr").first.locator("td").nth(1).text_content()
    assert http("GET", f"{app.url}/api/payments/{newest_id}")[0] == 200

    revenue = page.locator("#revenue").text_content()
    assert re.search(r"EUR[\d,]+\.\d\d", revenue), revenue
    eventually(lambda: page.locator("#revenue").text_content() != revenue, timeout=10, message="revenue moves")
    eventually(lambda: page.locator("#payment-rows tr td").nth(1).text_content() != newest_id, timeout=10,
               message="newer payments listed")


def test_starting_a_scenario_with_the_keyboard_makes_the_service_run_it_and_the_page_show_it(make_app, open_console):
    app = make_app()
    page = open_console(app)
    row = page.locator("#scenario-error_spike")

    row.get_by_label("Duration of error_spike in seconds").fill("120")
    page.keyboard.press("Tab")  # to the row's Start button
    expect(row.get_by_role("button", name="Start error_spike")).to_be_focused()
    page.keyboard.press("Enter")

    expect(row).to_contain_text(re.compile(r"running, (2:00|1:5\d) left"))
    assert scenarios(app)["error_spike"]["active"] and scenarios(app)["error_spike"]["endsAt"]
    expect(page.locator("#scenario-result pre.curl")).to_have_text(
        f"""curl -X POST {app.url}/api/scenarios/error_spike -H "Content-Type: application/json" """
        """-d '{"duration":120}'""")

    page.keyboard.press("Tab")  # to Stop, enabled while the scenario runs
    expect(row.get_by_role("button", name="Stop error_spike")).to_be_focused()
    page.keyboard.press("Enter")
    expect(row.locator("td").nth(1)).to_have_text("off")
    expect(row.get_by_role("button", name="Start error_spike")).to_be_focused()  # not lost with the disabled Stop
    assert not scenarios(app)["error_spike"]["active"]
    expect(page.locator("#scenario-result pre.curl")).to_have_text(
        f"curl -X DELETE {app.url}/api/scenarios/error_spike")


def test_a_scenario_started_elsewhere_appears_in_the_console(make_app, open_console):
    app = make_app()
    page = open_console(app)

    http("POST", app.url + "/api/scenarios/outage")

    expect(page.locator("#scenario-outage")).to_contain_text("running until stopped", timeout=6000)


def test_changing_rate_profile_and_on_off_in_the_console_changes_the_simulator(make_app, open_console):
    app = make_app(**LIVE)
    page = open_console(app)

    page.locator("#simulation-rate").fill("7.5")
    page.locator("#simulation-profile").select_option("bursty")
    page.get_by_role("button", name="Apply rate and profile").click()

    expect(page.locator("#simulation-result pre.curl")).to_have_text(
        f"""curl -X PUT {app.url}/api/simulation -H "Content-Type: application/json" """
        """-d '{"rate":7.5,"profile":"bursty"}'""")
    simulation = http("GET", app.url + "/api/simulation")[2]
    assert (simulation["rate"], simulation["profile"], simulation["enabled"]) == (7.5, "bursty", True)
    expect(page.locator("#simulation-now")).to_contain_text("on, 7.5 payments/s, profile bursty")

    page.get_by_role("button", name="Turn the simulator off").click()
    expect(page.locator("#simulation-now")).to_contain_text("Now: off")
    assert http("GET", app.url + "/api/simulation")[2]["enabled"] is False
    expect(page.get_by_role("button", name="Turn the simulator on")).to_be_visible()


def test_the_forms_offer_the_services_own_currencies_payment_types_and_profiles(make_app, open_console):
    app = make_app(currencies=("USD", "EUR", "GBP", "JPY"))
    page = open_console(app)

    expect(page.get_by_role("button", name="Send payment")).to_be_enabled()
    assert page.locator("#payment-currency option").all_text_contents() == ["USD", "EUR", "GBP", "JPY"]
    assert page.locator("#payment-type option").all_text_contents() == list(payment_api.PAYMENT_TYPES)
    assert page.locator("#simulation-profile option").all_text_contents() == list(payment_api.PROFILES)
    expect(page.locator("#revenue dt")).to_have_text(["USD", "EUR", "GBP", "JPY"])


def test_a_test_payment_shows_the_services_answer_and_its_curl_command(make_app, open_console):
    app = make_app()
    page = open_console(app)
    page.expected = {402, 500}

    page.locator("#payment-amount").fill("25")
    page.locator("#payment-currency").select_option("EUR")
    page.locator("#payment-type").select_option("express")
    page.locator("#card-number").fill("4000000000009995")
    page.get_by_role("button", name="Send payment").click()

    result = page.locator("#payment-result")
    expect(result.locator("p")).to_have_text("402 Payment Required: Payment declined by the bank")
    expect(result.locator("pre.answer")).to_contain_text('"declineCode": "insufficient_funds"')
    payment_id = re.search(r'"paymentId": "(pay_\w+)"', result.locator("pre.answer").text_content())[1]
    status, _, payment = http("GET", f"{app.url}/api/payments/{payment_id}")
    assert status == 200 and (payment["status"], payment["amount"], payment["currency"], payment["type"]) == (
        "declined", 25.0, "EUR", "express")
    expect(result.locator("pre.curl")).to_have_text(
        f"""curl -X POST {app.url}/api/payments -H "Content-Type: application/json" """
        """-d '{"amount":25,"currency":"EUR","type":"express","cardNumber":"4000000000009995"}'""")

    page.locator("#card-number").fill("")
    page.get_by_label("X-Simulate-Failure").check()
    page.get_by_label("X-Simulate-Latency").fill("0.3")
    page.get_by_role("button", name="Send payment").click()
    expect(result.locator("p")).to_have_text("500 Internal Server Error: Payment processing failed")
    expect(result.locator("pre.curl")).to_contain_text('-H "X-Simulate-Failure: true" -H "X-Simulate-Latency: 0.3"')
    assert 0.3 <= float(re.search(r'"processingTime": ([\d.]+)', result.locator("pre.answer").text_content())[1])


@pytest.fixture
def asked_for_the_token(make_app, open_console):
    """(app, page): the console of a service with ADMIN_TOKEN, asking for it after 'Start outage' got a 401."""
    app = make_app(admin_token="class-secret")
    page = open_console(app)
    page.expected = {401}
    page.get_by_role("button", name="Start outage").click()
    expect(page.get_by_role("dialog", name="Admin token needed")).to_be_visible()
    return app, page


def test_a_wrong_admin_token_shows_the_401_message_and_changes_nothing(asked_for_the_token):
    app, page = asked_for_the_token

    page.get_by_label("Admin token", exact=True).fill("guessed")
    page.keyboard.press("Enter")

    expect(page.locator("#scenario-result p")).to_have_text(
        re.compile(r"^Wrong admin token \(401 Unauthorized\): nothing was changed"))
    assert not any(scenario["active"] for scenario in scenarios(app).values())
    assert http("GET", app.url + "/api/scenarios/history")[2]["history"] == []
    assert page.evaluate("[sessionStorage.length, localStorage.length, document.cookie]") == [0, 0, ""]
    expect(page.locator("#scenario-outage td").nth(1)).to_have_text("off")


def test_the_admin_token_is_asked_once_kept_in_the_tab_and_never_shown(asked_for_the_token):
    app, page = asked_for_the_token

    page.get_by_label("Admin token", exact=True).fill("class-secret")
    page.get_by_role("button", name="Use this token").click()
    expect(page.locator("#scenario-outage")).to_contain_text("running until stopped")
    assert scenarios(app)["outage"]["active"]

    page.get_by_role("button", name="Stop outage").click()  # no second question: the tab kept the token
    expect(page.locator("#scenario-result p")).to_have_text("outage stopped.")
    assert not scenarios(app)["outage"]["active"]
    expect(page.locator("#scenario-result pre.curl")).to_have_text(
        f'curl -X DELETE {app.url}/api/scenarios/outage -H "Authorization: Bearer $ADMIN_TOKEN"')
    assert page.evaluate(f"[sessionStorage.getItem('{TOKEN_KEY}'), localStorage.length]") == ["class-secret", 0]
    assert "class-secret" not in page.locator("body").inner_text()


TOO_WIDE = """() => [...document.querySelectorAll("body *")]
    .filter((node) => node.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
    .map((node) => node.tagName + (node.id ? "#" + node.id : ""))"""


def test_the_console_fits_a_1280x720_projector_without_horizontal_overflow(make_app, open_console, tmp_path, capsys):
    app = make_app(**LIVE)
    page = open_console(app)
    page.expected = {402}
    page.get_by_role("button", name="Start currency_outage").click()  # the longest state and result lines
    page.locator("#card-number").fill("4000000000000069")
    page.get_by_role("button", name="Send payment").click()
    expect(page.locator("#payment-result pre.answer")).to_contain_text("expired_card")
    expect(page.locator("#payment-rows tr")).to_have_count(8)

    too_wide = page.evaluate(TOO_WIDE)
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"] and not too_wide, too_wide
    folder = os.environ.get("CI_ARTIFACTS_DIR") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    screenshot = os.path.join(folder, "console-1280x720.png")
    page.screenshot(path=screenshot, full_page=True)
    with capsys.disabled():
        print(f"\nconsole screenshot (1280 wide, whole page): {screenshot}")


# ---------------------------------------------------------------- check my work


@pytest.fixture(scope="module")
def recent_history(tmp_path_factory):
    """A real Prometheus holding a day of history that ends now: what a student's work is checked against."""
    from test_history import PastPrometheus, backfill, create_blocks
    folder = tmp_path_factory.mktemp("console-history")
    prometheus = PastPrometheus(folder, folder / "blocks")
    try:
        backfill("--days", "1", "--seed", "7", "--openmetrics", str(folder / "day.om"), env={"SIMULATION_RATE": "5"})
        create_blocks(folder / "day.om", folder / "blocks")
        prometheus.start()
        yield prometheus
    finally:
        prometheus.stop()


def test_without_prometheus_url_check_my_work_says_how_to_turn_it_on(make_app, open_console):
    app = make_app()
    page = open_console(app)

    expect(page.locator("#checks-state")).to_contain_text(
        "Checks are off: this service does not know where Prometheus is. Start it with PROMETHEUS_URL set")
    expect(page.get_by_role("button", name="Check alert rules")).to_be_disabled()
    expect(page.get_by_role("button", name="Check dashboard")).to_be_disabled()


def test_a_student_pastes_a_rule_group_and_a_dashboard_and_reads_the_report(make_app, open_console, recent_history):
    app = make_app(prometheus_url=recent_history.url)
    page = open_console(app)
    expect(page.locator("#checks-state")).to_contain_text(f"Checks ask the Prometheus at {recent_history.url}.")
    pasted = page.get_by_label("Paste an alert rule file")
    report = page.locator("#checks-result")

    pasted.fill((HERE / "prometheus" / "alerts.yml").read_text())
    page.get_by_role("button", name="Check alert rules").click()

    expect(report.locator("li")).to_have_count(10)  # one for each alerting rule of the shipped file
    expect(report.locator("p").first).to_have_text(
        re.compile(r"^10 alerting rules scored against [1-9]\d* incidents? from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d to "))
    latency = report.locator("li", has_text="HighPaymentLatencyP95")
    expect(latency).to_contain_text("HighPaymentLatencyP95 (group payment-api, every 1 m, for 5 m)")
    expect(latency.locator("p").first).to_have_text(
        re.compile(r"^(caught \d+ of \d+ latency_degradation incidents?, .+ after (it|they) began|"
                   r"no latency_degradation incident in this window to catch); no false alarm$"))
    expect(report.locator("pre.curl")).to_have_text(
        f'curl -X POST {app.url}/api/checks/alerts -H "Content-Type: application/yaml" --data-binary @rules.yml')

    board = json.loads((HERE / "grafana" / "dashboards" / "payment-api.json").read_text())
    misspelled = json.dumps(board).replace("sum(rate(payment_requests_total{currency",
                                           "sum(rate(payment_request_total{currency", 1)
    pasted.fill(misspelled)
    page.get_by_role("button", name="Check dashboard").click()

    expect(report.locator("h3")).to_have_text(["Panels that fail or show nothing", "The course's asks"])
    expect(report.locator("li").first).to_contain_text(
        "returns nothing for any value of its variables: no metric payment_request_total in Prometheus "
        "(did you mean payment_requests_total?)")
    asks = report.locator("li", has_text="met: ")
    expect(asks).to_have_count(9)
    expect(asks.first).to_have_text("✓ met: a $currency variable")
    expect(report.locator("pre.curl")).to_have_text(
        f'curl -X POST {app.url}/api/checks/dashboard -H "Content-Type: application/json" '
        '--data-binary @dashboard.json')
    assert not page.evaluate(TOO_WIDE), "the report fits the projector"
