"""exercises.py: the answer key, the alert-rule scorer and the dashboard checker, proved against a real Prometheus.

Two days of history (seed 7, ending on an 8-hour slot boundary, so six whole incidents and every scenario that has an
alert) are backfilled once for the module with the history's own command and promtool; a few ALERTS series, as
Prometheus writes them, are added to the same file for the answer key. The state machine of `for` and
`keep_firing_for` is checked against promtool's own rule unit tests.
"""
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import exercises
import payment_api
from conftest import free_port, require_binary
from test_history import ALERT_OF_INCIDENT, PastPrometheus, backfill, create_blocks, listed_incidents
from test_stack import HEALTH_ALERTS, panel_queries

HERE = Path(__file__).resolve().parent
END = "2026-11-20T00:00:00Z"  # a past slot boundary: the same six incidents in every run
END_SECONDS = int(datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp())
DAYS = 2
SINCE = DAYS * 86400
SHIPPED_RULES = HERE / "prometheus" / "alerts.yml"
SHIPPED_DASHBOARD = HERE / "grafana" / "dashboards" / "payment-api.json"
TARGET_OF_ALERT = {"HighPaymentErrorRate": "error_spike", "HighPaymentDeclineRate": "decline_wave",
                   "HighPaymentLatencyP95": "latency_degradation", "PaymentServiceUnavailable": "outage",
                   "PaymentAvailabilitySLOBurn": "outage"}
P95 = "histogram_quantile(0.95, sum by (le) (rate(payment_duration_seconds_bucket[5m])))"


def synthetic_alerts(incidents):
    """ALERTS series as Prometheus writes them, one sample every 15 s: HighPaymentLatencyP95 pending 1 m after the
    latency incident begins and firing from 6 m, PaymentServiceUnavailable firing 3 m into each outage, and a
    Watchdog firing from 2 m before the error spike."""
    spans = []
    for start, end, scenario in incidents:
        if scenario == "latency_degradation":
            spans.append(("HighPaymentLatencyP95", "pending", start + 60, start + 360))
            spans.append(("HighPaymentLatencyP95", "firing", start + 360, end + 300))
        if scenario == "outage":
            spans.append(("PaymentServiceUnavailable", "firing", start + 180, end + 120))
        if scenario == "error_spike":
            spans.append(("Watchdog", "firing", start - 120, start + 60))
    lines = ["# HELP ALERTS Alerts, as Prometheus's rule manager writes them.\n", "# TYPE ALERTS gauge\n"]
    for name, state, first, stop in spans:
        lines.extend(f'ALERTS{{alertname="{name}",alertstate="{state}",severity="warning"}} 1 {moment}\n'
                     for moment in range(first, stop, 15))
    return "".join(lines).encode()


def add_to_openmetrics(path, family):
    """Append a metric family to a finished OpenMetrics file, before its # EOF."""
    with open(path, "r+b") as file:
        file.seek(-len(b"# EOF\n"), 2)
        assert file.read() == b"# EOF\n"
        file.seek(-len(b"# EOF\n"), 2)
        file.truncate()
        file.write(family + b"# EOF\n")


class History:
    def __init__(self, output, prometheus):
        self.incidents = listed_incidents(output)
        self.prometheus = prometheus
        self.url = prometheus.url


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Two days of history (and the synthetic ALERTS) in one block, served by a Prometheus that scrapes nothing."""
    folder = tmp_path_factory.mktemp("exercises")
    prometheus = PastPrometheus(folder, folder / "blocks")
    try:
        result = backfill("--days", str(DAYS), "--end", END, "--seed", "7", "--openmetrics", str(folder / "h.om"),
                          env={"SIMULATION_RATE": "5"})
        add_to_openmetrics(folder / "h.om", synthetic_alerts(listed_incidents(result.stdout)))
        create_blocks(folder / "h.om", folder / "blocks")
        (folder / "h.om").unlink()
        prometheus.start()
        yield History(result.stdout, prometheus)
    finally:
        prometheus.stop()


def run(*args):
    """`python exercises.py ARGS` as a trainer runs it."""
    return subprocess.run([sys.executable, "exercises.py", *map(str, args)], cwd=HERE, capture_output=True,
                          text=True, timeout=120)


def window(history, since="2d"):
    return ["--prometheus", history.url, "--since", since, "--end", END]


def epoch(text):
    return int(exercises.parse_time(text))

# ---------------------------------------------------------------- the answer key


def test_the_answer_key_lists_every_incident_of_the_history_exactly_as_the_history_listed_it(history):
    assert {scenario for *_, scenario in history.incidents} >= set(ALERT_OF_INCIDENT), history.incidents
    key = exercises.answer_key(history.url, SINCE, now=END_SECONDS)
    assert [(epoch(one["start"]), epoch(one["end"]), one["scenario"]) for one in key["incidents"]] == history.incidents
    assert not any(one["running"] for one in key["incidents"])


def test_the_answer_key_names_the_alerts_that_fired_during_each_incident_and_how_long_after_it_began(history):
    result = run("incidents", *window(history), "--json")
    assert result.returncode == 0, result.stderr
    fired = {(incident["scenario"], incident["start"]): [(alert["alertname"], alert["after_seconds"])
                                                         for alert in incident["alerts"]]
             for incident in json.loads(result.stdout)["incidents"]}
    expected = {"latency_degradation": [("HighPaymentLatencyP95", 360)], "outage": [("PaymentServiceUnavailable", 180)],
                "error_spike": [("Watchdog", -120)], "decline_wave": [], "currency_outage": []}
    assert fired == {(scenario, exercises.iso(start)): expected[scenario] for start, _, scenario in history.incidents}
    text = run("incidents", *window(history)).stdout
    assert "6 incidents from 2026-11-18 00:00:00 to 2026-11-20 00:00:00 UTC" in text
    assert re.search(r"latency_degradation +alerts: HighPaymentLatencyP95 after 6 m$", text, re.M), text
    assert re.search(r"error_spike +alerts: Watchdog already firing$", text, re.M), text


def test_an_incident_still_running_at_the_end_of_the_window_is_marked_running(history):
    start, end, _ = next(incident for incident in history.incidents if incident[2] == "latency_degradation")
    key = exercises.answer_key(history.url, 3600, now=start + 600)
    assert key["incidents"][-1] == {"scenario": "latency_degradation", "start": exercises.iso(start), "end": None,
                                    "running": True, "duration_seconds": 600,
                                    "alerts": [{"alertname": "HighPaymentLatencyP95", "after_seconds": 360,
                                                "fired_at": exercises.iso(start + 360)}]}

# ---------------------------------------------------------------- alert rules, scored


def test_the_shipped_rules_each_catch_their_incidents_with_no_false_alarm(history):
    report = exercises.score_alert_rules(history.url, SHIPPED_RULES.read_text(), SINCE, now=END_SECONDS)
    assert len(report["rules"]) == 10 and len(report["incidents"]) == len(history.incidents)
    for score in report["rules"]:
        assert score["false_alarm_seconds"] == 0, (score["name"], score["verdict"])
        if score["name"] in HEALTH_ALERTS:  # nothing in the history makes them fire
            assert score["firing_seconds"] == 0 and score["verdict"] == "never fired; no false alarm", score
            continue
        assert score["target"] == TARGET_OF_ALERT[score["name"]], score
        assert score["caught"] == score["incidents"] >= 1 and len(score["delays_seconds"]) == score["caught"], score
        assert all(score["for_seconds"] <= delay <= score["for_seconds"] + 600 for delay in score["delays_seconds"])
        pattern = rf"caught (\d+) of \1 {score['target']} incidents?, .+ after (it|they) began; no false alarm"
        assert re.fullmatch(pattern, score["verdict"]), score["verdict"]
    error_rate = next(score for score in report["rules"] if score["name"] == "HighPaymentErrorRate")
    assert error_rate["by_scenario"]["currency_outage"]["caught"] == error_rate["by_scenario"]["currency_outage"][
        "incidents"] == 1  # GBP failing is a fifth of the payments: the error rate sees it too
    assert report["ok"] is False  # the health alerts caught no incident


def test_a_window_longer_than_the_history_is_scored_from_where_the_data_begins(history):
    """absent() is true before the history began; Prometheus never evaluated anything then."""
    report = exercises.score_alert_rules(history.url, SHIPPED_RULES.read_text(), SINCE + 86400, now=END_SECONDS)
    assert report["start"] == "2026-11-18T00:00:00Z"
    missing = next(score for score in report["rules"] if score["name"] == "PaymentApiTargetMissing")
    assert missing["firing_seconds"] == 0, missing["verdict"]


def test_the_shipped_rules_file_exits_1_with_a_verdict_a_line(history):
    result = run("alerts", SHIPPED_RULES, *window(history))
    assert result.returncode == 1, result.stderr
    assert "HighPaymentLatencyP95 (group payment-api, every 1 m, for 5 m)\n  caught 1 of 1 latency_degradation" \
           " incident, 6 m after it began; no false alarm\n" in result.stdout, result.stdout


def student_rules(*rules, group="student", interval=None):
    """A rule file with one group of `rules`, each a YAML mapping written as text."""
    header = f"groups:\n  - name: {group}\n" + (f"    interval: {interval}\n" if interval else "") + "    rules:\n"
    return header + "".join("      - " + rule.strip().replace("\n", "\n        ") + "\n" for rule in rules)


def test_a_latency_rule_above_the_incidents_p95_misses_it_and_says_how_close_it_came(history, tmp_path):
    start, end, _ = next(incident for incident in history.incidents if incident[2] == "latency_degradation")
    peak, = history.prometheus.at(f"max_over_time(({P95})[{end - start}s:60s])", end + 300)
    assert 1.0 < float(peak["value"][1]) < 2.5  # "p95 about 1.3 s": a threshold of 2.5 s is above it
    path = tmp_path / "slow.yml"
    path.write_text(student_rules(f"alert: PaymentsSlow\nexpr: {P95} > 2.5\nfor: 5m"))
    result = run("alerts", path, *window(history), "--json")
    assert result.returncode == 1, result.stderr
    score, = json.loads(result.stdout)["rules"]
    assert (score["target"], score["caught"], score["incidents"], score["missed"]) == ("latency_degradation", 0, 1, 1)
    assert score["verdict"].startswith("missed the only latency_degradation incident; its value peaked at 1.")
    assert score["verdict"].endswith(", and the rule needs > 2.5; no false alarm"), score["verdict"]


def test_a_rule_that_is_always_true_reports_its_false_alarms(history, tmp_path):
    path = tmp_path / "always.yml"
    path.write_text(student_rules("alert: AlwaysFiring\nexpr: vector(1)"))
    result = run("alerts", path, *window(history), "--json")
    assert result.returncode == 1, result.stderr
    score, = json.loads(result.stdout)["rules"]
    in_incidents = sum(end - start + score["grace_seconds"] for start, end, _ in history.incidents)
    assert score["firing_seconds"] == SINCE
    assert score["false_alarm_seconds"] == SINCE - in_incidents
    assert score["caught"] == score["incidents"] and score["delays_seconds"] == [0] * score["incidents"]
    assert score["verdict"].endswith(f"fired {exercises.format_duration(SINCE - in_incidents)} outside any incident "
                                     "(false alarm)")
    assert score["false_alarms"][0] == {"start": "2026-11-18T00:00:00Z", "end": exercises.iso(history.incidents[0][0])}
    assert "first false alarm: 2026-11-18 00:00:00" in run("alerts", path, *window(history)).stdout


def test_keep_firing_for_keeps_an_alert_firing_after_the_incident_within_the_allowance(history):
    rule = ('alert: Errors\nexpr: sum(rate(payment_requests_total{status="500"}[5m])) / '
            'sum(rate(payment_requests_total[5m])) > 0.05\nkeep_firing_for: 10m')
    report = exercises.score_alert_rules(history.url, student_rules(rule), SINCE, now=END_SECONDS)
    score, = report["rules"]
    assert score["grace_seconds"] == 300 + exercises.SAMPLE_SPACING + 60 + 600
    assert (score["target"], score["caught"], score["false_alarm_seconds"]) == ("error_spike", 1, 0), score


@pytest.mark.parametrize("hold, keep", [(0, 0), (120, 0), (120, 180), (0, 120), (180, 60), (60, 90)])
def test_for_and_keep_firing_for_fire_at_exactly_the_evaluations_prometheus_fires_at(tmp_path, hold, keep):
    """The state machine, checked by promtool's rule unit tests: at every minute, firing or not as Prometheus is."""
    pattern = "0 1 1 1 0 1 1 1 1 1 0 0 1 0 0 0 0 1 1 1 1 1 1 0 0 0 0 0 1 0 1 1 0 0 0 0"
    values = [int(value) for value in pattern.split()]
    present = exercises.runs([60 * minute for minute, value in enumerate(values) if value], 60)
    spans = exercises.firing_spans(present, 60, hold, keep)
    firing = {minute for minute in range(len(values)) if any(first <= 60 * minute < stop for first, stop in spans)}
    assert firing and len(firing) < len(values)
    rule = {"alert": "Up", "expr": "x > 0", "for": f"{hold}s", "keep_firing_for": f"{keep}s"}
    (tmp_path / "rules.yml").write_text(json.dumps({"groups": [{"name": "g", "interval": "1m", "rules": [rule]}]}))
    checks = [{"eval_time": f"{minute}m", "alertname": "Up",
               "exp_alerts": [{"exp_labels": {}}] if minute in firing else []} for minute in range(len(values))]
    (tmp_path / "tests.yml").write_text(json.dumps({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [{"series": "x", "values": pattern}], "alert_rule_test": checks}]}))
    result = subprocess.run([require_binary("promtool"), "test", "rules", str(tmp_path / "tests.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


REFUSED = {
    "a YAML syntax error": (
        student_rules("alert: Fine\nexpr: up == 0", "alert: Broken\nexpr: up == 0\nlabels: {severity: [warning}"),
        'YAML syntax error: ', '(near rule "Broken")'),
    "a function without its range": (
        student_rules("alert: Fine\nexpr: up == 0", "alert: NoRange\nexpr: rate(payment_requests_total) > 1"),
        'group "student", rule 2, "NoRange": could not parse expression: 1:6: parse error: expected type range vector '
        'in call to function "rate", got instant vector', ""),
    "an unclosed parenthesis": (
        student_rules("alert: Unclosed\nexpr: sum(rate(payment_requests_total[5m]) > 1"),
        'group "student", rule 1, "Unclosed": could not parse expression: ', "unclosed left parenthesis"),
    "a duration without its unit": (
        student_rules("alert: NoUnit\nexpr: up == 0\nfor: 5"),
        'group "student", rule 1, "NoUnit": for: not a valid duration string: "5"', ""),
    "a misspelled field": (
        student_rules("alert: Typo\nexpr: up == 0\nfro: 5m"),
        'group "student", rule 1, "Typo": field fro not found', ""),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_rule_file_prometheus_refuses_exits_2_with_one_line_naming_the_rule_and_the_problem(history, tmp_path,
                                                                                               case):
    text, beginning, ending = REFUSED[case]
    path = tmp_path / "student.yml"
    path.write_text(text)
    result = run("alerts", path, *window(history))
    assert (result.returncode, result.stdout) == (2, ""), result.stdout
    line, = result.stderr.splitlines()
    assert line.startswith("exercises.py alerts: student.yml: ") and beginning in line and line.endswith(ending), line
    promtool = subprocess.run([require_binary("promtool"), "check", "rules", str(path)], capture_output=True,
                              timeout=60)
    assert promtool.returncode != 0, "promtool accepts what the checker refuses"


def test_without_promtool_a_bad_expression_gets_the_same_message_from_prometheus_itself(history, monkeypatch):
    monkeypatch.setattr(exercises.shutil, "which", lambda name: None)
    text, message, _ = REFUSED["a function without its range"]
    with pytest.raises(exercises.DocumentError) as refused:
        exercises.score_alert_rules(history.url, text, SINCE, now=END_SECONDS)
    assert str(refused.value) == message


def test_a_template_only_promtool_can_check_is_refused_with_promtools_message(history, tmp_path):
    require_binary("promtool")
    path = tmp_path / "student.yml"
    path.write_text(student_rules('alert: BadTemplate\nexpr: up == 0\nannotations:\n  summary: "{{ $value | nope }}"'))
    result = run("alerts", path, *window(history))
    assert result.returncode == 2
    assert result.stderr == ('exercises.py alerts: student.yml: group "student", rule 1, "BadTemplate": annotation '
                             '"summary": template: __alert_BadTemplate:1: function "nope" not defined\n')


def test_without_pyyaml_a_yaml_file_says_so_with_exit_2_and_a_json_file_is_still_read(history, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(student_rules("alert: AlwaysFiring\nexpr: vector(1)"))
    as_json = tmp_path / "rules.json"
    as_json.write_text(json.dumps({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "vector(1)"}]}]}))
    program = "import sys; sys.modules['yaml'] = None; import exercises; sys.exit(exercises.main(sys.argv[1:]))"
    without = [sys.executable, "-c", program]
    result = subprocess.run([*without, "alerts", rules, *window(history)], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "needs PyYAML, which is not installed" in result.stderr, result.stderr
    result = subprocess.run([*without, "alerts", as_json, *window(history)], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "A (group g, every 1 m, for 0 s)" in result.stdout, result.stderr


def test_no_prometheus_at_the_address_exits_2_with_one_line():
    result = run("incidents", "--prometheus", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert re.fullmatch(r"exercises\.py incidents: no answer from Prometheus at http://127\.0\.0\.1:\d+ \(.+\)\n",
                        result.stderr), result.stderr


def test_every_scenario_a_rule_target_is_guessed_from_is_a_scenario_of_the_service():
    assert set(exercises.SCENARIO_HINTS) <= set(payment_api.SCENARIOS)

# ---------------------------------------------------------------- dashboards, checked


def shipped_dashboard():
    return json.loads(SHIPPED_DASHBOARD.read_text())


def panels(board):
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_titled(board, title):
    return next(panel for panel in panels(board) if panel.get("title") == title)


def check(history, tmp_path, board, *extra):
    """(exit code, --json report) of the dashboard command on `board` over the last 6 h of the history."""
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(board))
    result = run("dashboard", path, *window(history, "6h"), "--json", *extra)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_the_shipped_dashboard_passes_and_meets_every_course_ask(history, tmp_path):
    code, report = check(history, tmp_path, shipped_dashboard())
    assert code == 0 and report["empty_panels"] == [], report["empty_panels"]
    assert report["asks"] == dict.fromkeys(exercises.ASKS, True)
    assert report["checked_queries"] == len(panel_queries(shipped_dashboard(), "prometheus"))
    assert report["variables"]["currency"] == ["EUR", "GBP", "USD"]
    assert report["variables"]["payment_type"] == sorted(payment_api.PAYMENT_TYPES)
    assert {entry["datasource"] for entry in report["not_checked"]} == {"influxdb", "loki"}
    assert {"title": "Failed payments", "datasource": "loki"} in report["not_checked"]
    success = report["success_rate"]
    assert success["title"] == "Success rate" and len(success["panel_percent"]) == 4, success
    text = run("dashboard", SHIPPED_DASHBOARD, *window(history, "6h")).stdout
    assert "Every checked panel shows data." in text and "[ ]" not in text, text


def test_a_misspelled_metric_is_named_with_its_panel_and_query(history, tmp_path):
    board = shipped_dashboard()
    target = panel_titled(board, "Payment rate by currency")["targets"][0]
    target["expr"] = target["expr"].replace("payment_requests_total", "payment_requets_total")
    code, report = check(history, tmp_path, board)
    assert code == 1
    broken, = report["empty_panels"]
    assert (broken["title"], broken["ref"], broken["query"]) == ("Payment rate by currency", "A", target["expr"])
    assert broken["problem"] == ("returns nothing for any value of its variables: no metric payment_requets_total in "
                                 "Prometheus (did you mean payment_requests_total?)")


def test_a_misspelled_variable_is_named_with_its_panel_and_query(history, tmp_path):
    board = shipped_dashboard()
    target = panel_titled(board, "Requests by status code")["targets"][0]
    target["expr"] = target["expr"].replace("$payment_type", "$paymenttype")
    code, report = check(history, tmp_path, board)
    assert code == 1
    assert report["empty_panels"] == [{
        "title": "Requests by status code", "id": 10, "ref": "A", "query": target["expr"], "selections": [],
        "problem": "uses $paymenttype, which the dashboard does not define (did you mean $payment_type?)"}]


def test_a_missing_variable_names_every_panel_that_uses_it_and_fails_its_asks(history, tmp_path):
    board = shipped_dashboard()
    board["templating"]["list"] = [variable for variable in board["templating"]["list"]
                                   if variable["name"] != "payment_type"]
    code, report = check(history, tmp_path, board)
    users = [where for where, target in panel_queries(shipped_dashboard(), "prometheus")
             if "$payment_type" in target["expr"]]
    assert code == 1 and len(report["empty_panels"]) == len(users) >= 5
    assert {entry["problem"] for entry in report["empty_panels"]} == {
        "uses $payment_type, which the dashboard does not define"}
    assert not report["asks"]["payment_type_variable"] and not report["asks"]["panels_use_payment_type"]


def test_a_success_rate_that_counts_declines_as_successes_disagrees_with_the_truth(history, tmp_path):
    board = shipped_dashboard()
    target = panel_titled(board, "Success rate")["targets"][0]
    target["expr"] = target["expr"].replace('status="200"', 'status!="500"')
    code, report = check(history, tmp_path, board)
    assert code == 0 and report["asks"]["success_rate_agrees"] is False
    assert {ask for ask, met in report["asks"].items() if not met} == {"success_rate_agrees"}
    success = report["success_rate"]
    gaps = [shown - true for shown, true in zip(success["panel_percent"], success["truth_percent"])]
    assert len(gaps) == 4 and min(gaps) > 0 and max(gaps) > exercises.SUCCESS_RATE_TOLERANCE, success


def test_panels_in_collapsed_rows_and_the_old_rows_layout_are_checked_for_every_value_of_a_variable(history, tmp_path):
    status = {"name": "status", "type": "custom", "query": "200,418", "includeAll": True, "multi": True}
    rate = 'sum(rate(payment_requests_total{status=~"$status"}[$__rate_interval]))'
    board = {"title": "Student", "__inputs": [{"name": "DS_PROM", "pluginId": "prometheus"}],
             "templating": {"list": [status]}, "panels": [
                 {"type": "row", "title": "Folded", "collapsed": True, "panels": [
                     {"id": 1, "title": "By status", "datasource": "${DS_PROM}",
                      "targets": [{"refId": "A", "expr": rate}]},
                     {"id": 2, "title": "Logs", "datasource": {"type": "loki", "uid": "x"},
                      "targets": [{"refId": "A", "expr": '{service="payment-api"}'}]}]}]}
    code, report = check(history, tmp_path, board)
    assert code == 1 and report["variables"] == {"status": ["200", "418"]}
    assert [(entry["title"], entry["problem"], entry["selections"]) for entry in report["empty_panels"]] == [
        ("By status", "returns nothing for status=418", ["status=418"])]
    assert report["not_checked"] == [{"title": "Logs", "datasource": "loki"}]
    old_layout = {"title": "Old", "rows": [{"panels": [{"id": 3, "title": "Typo", "targets": [
        {"refId": "B", "expr": "rate(payment_requets_total[5m])"}]}]}]}
    code, report = check(history, tmp_path, old_layout)
    assert code == 1 and [entry["title"] for entry in report["empty_panels"]] == ["Typo"]


@pytest.mark.parametrize("document, message", [
    ("{not json", "not JSON: "),
    ('{"title": "no panels"}', "not a Grafana dashboard: there is no panels list"),
])
def test_a_document_grafana_would_not_import_exits_2_with_one_line(history, tmp_path, document, message):
    path = tmp_path / "board.json"
    path.write_text(document)
    result = run("dashboard", path, *window(history, "6h"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"exercises.py dashboard: board.json: {message}") and result.stderr.count("\n") == 1
    with pytest.raises(exercises.DocumentError):
        exercises.check_dashboard(history.url, document, 3600, now=END_SECONDS)


@pytest.mark.parametrize("document", ['{"panels": [{"targets": 5}]}', '{"panels": [{"panels": 5}]}',
                                      '{"panels": [], "rows": 7}'])
def test_a_dashboard_with_malformed_parts_checks_them_as_empty_not_a_crash(document):
    report = exercises.check_dashboard("http://127.0.0.1:9", document, 3600)  # nothing to ask Prometheus
    assert report["empty_panels"] == []


def test_a_rule_group_whose_rules_are_not_a_list_is_refused_by_name():
    with pytest.raises(exercises.DocumentError, match='group "a": rules: must be a list'):
        exercises.score_alert_rules("http://127.0.0.1:9", '{"groups": [{"name": "a", "rules": 5}]}', 3600)
