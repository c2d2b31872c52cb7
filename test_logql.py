"""Every LogQL query we ship parses, as Grafana's own LogQL parser sees it.

No Loki or Grafana runs here, but `@grafana/lezer-logql` (the grammar behind Grafana's LogQL editor) runs in node
through .ci/logql/check.mjs. The LogQL queries are: the `expr` of every Loki target of the dashboards under
grafana/, every query the provisioned data sources send to Loki (Tempo's "Logs for this span"), and every line of
a ```logql block in the repository's Markdown files (an indented line continues the query above it). Grafana's
variables are replaced by values as Grafana would write them first. The parser checks syntax only: what the
queries select is checked by test_observability_stack.py.

Needs node and `npm ci --prefix .ci/logql` (the version is pinned in .ci/logql/package-lock.json); without them
the checks skip, except under CI=true where they fail.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import node_checker
from test_flux import dashboard_queries, fenced_blocks, repository_files

HERE = Path(__file__).resolve().parent
CHECKER = HERE / ".ci" / "logql" / "check.mjs"
PACKAGE = "@grafana/lezer-logql"
DATASOURCES = HERE / "grafana" / "provisioning" / "datasources" / "datasources.yml"

# What Grafana's Loki data source writes for each variable: a multi-value selection as a regex of escaped
# values (the dashboard's variables are multi-value with All), the global ones for a one-hour range, and the
# trace and span of a Tempo link.
GRAFANA_VALUES = {"currency": "(EUR|USD)", "payment_type": "(standard|express)",
                  "instance": r"(172\\.18\\.0\\.5:8080|172\\.18\\.0\\.6:8080)",
                  "__auto": "1m", "__interval": "15s", "__rate_interval": "1m", "__range": "1h",
                  "__trace.traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "__span.spanId": "00f067aa0ba902b7"}


# ---------------------------------------------------------------- finding the queries


def as_grafana_sends(query):
    """`query` with the variables of GRAFANA_VALUES replaced; an unknown one is left for the test to report."""
    def replace(match):
        return GRAFANA_VALUES.get(match[1] or match[2], match[0])
    return re.sub(r"\$\{([\w.]+)\}|\$(\w+)", replace, query)


def loki_sources(path=DATASOURCES):
    """The uids and names of the provisioned Loki data sources."""
    sources = yaml.safe_load(path.read_text())["datasources"]
    return {key for source in sources if source["type"] == "loki" for key in (source.get("uid"), source["name"])}


def dashboard_loki_queries(board, loki):
    """(JSON path, expr) of every target of a Loki data source, its own or the one of the panel around it."""
    def kind_of(source):
        if not source:
            return None
        if isinstance(source, dict):
            return "loki" if source.get("type") == "loki" or source.get("uid") in loki else "other"
        return "loki" if source in loki else "other"

    return dashboard_queries(board, "expr", kind_of, "loki")


def provisioned_loki_queries(path=DATASOURCES):
    """(where, query) of every link from a provisioned data source to Loki that carries a query, `$$` undone."""
    loki = loki_sources(path)
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("datasourceUid") in loki and isinstance(node.get("query"), str):
                found.append((f"{where}/query", node["query"].replace("$$", "$")))
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    for source in yaml.safe_load(path.read_text())["datasources"]:
        walk(source, source["name"])
    return found


def logql_block_queries(text, first_line):
    """(line, query) of a ```logql block: one query a line, an indented line continuing the one above."""
    queries = []
    for number, line in enumerate(text.splitlines(), first_line):
        if line.strip() and line[0].isspace() and queries:
            queries[-1] = (queries[-1][0], queries[-1][1] + "\n" + line)
        elif line.strip():
            queries.append((number, line))
    return queries


def shipped_logql_queries():
    """{where: query as Grafana would send it} for every LogQL query of the dashboards, the provisioning and
    the Markdown files."""
    queries, loki = {}, loki_sources()
    for path in repository_files("*.json", HERE / "grafana"):
        for where, query in dashboard_loki_queries(json.loads(path.read_text()), loki):
            queries[f"{path.relative_to(HERE)} {where}"] = as_grafana_sends(query)
    for where, query in provisioned_loki_queries():
        queries[f"{DATASOURCES.relative_to(HERE)} {where}"] = as_grafana_sends(query)
    for path in repository_files("*.md"):
        for start, info, text in fenced_blocks(path.read_text()):
            if info == "logql":
                queries.update((f"{path.relative_to(HERE)}:{line}", as_grafana_sends(query))
                               for line, query in logql_block_queries(text, start))
    return queries


SHIPPED = shipped_logql_queries()


# ---------------------------------------------------------------- the checker


@pytest.fixture(scope="module")
def check_logql():
    """check_logql({name: query}) -> {name: [error]}, from one node run of .ci/logql/check.mjs."""
    check = node_checker(CHECKER.parent, PACKAGE, timeout=20)
    return lambda queries: {name: result["errors"] for name, result in check(queries).items()}


def report(query, errors):
    """The query with a marker under the first place of each line where the parser gave up."""
    lines = query.splitlines()
    for line, column in sorted({(error["line"], error["column"]) for error in errors}, reverse=True):
        lines.insert(line, " " * (column - 1) + "^ parse error here")
    return "\n".join(lines)


def test_logql_queries_are_found_in_the_dashboard_the_provisioning_and_the_docs():
    assert any(name.startswith("grafana/dashboards/") for name in SHIPPED), sorted(SHIPPED)
    assert any(name.startswith("grafana/provisioning/") for name in SHIPPED), sorted(SHIPPED)
    assert any(name.startswith("docs/") for name in SHIPPED), sorted(SHIPPED)
    assert len(SHIPPED) >= 4, sorted(SHIPPED)


def test_every_logql_line_of_the_readme_and_the_docs_is_checked():
    for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        name = path.relative_to(HERE).as_posix()
        lines = [line for start, info, text in fenced_blocks(path.read_text()) if info == "logql"
                 for line, _ in logql_block_queries(text, start)]
        assert all(f"{name}:{line}" in SHIPPED for line in lines), (name, lines, sorted(SHIPPED))


@pytest.mark.parametrize("where", sorted(SHIPPED))
def test_shipped_logql_query_parses(where, check_logql):
    query = SHIPPED[where]
    assert not re.search(r"\$\{?[\w.]", query), f"{where}: a Grafana variable this check does not replace yet:\n{query}"
    errors = check_logql({where: query})[where]
    assert errors == [], f"{where}:\n{report(query, errors)}"


# ---------------------------------------------------------------- the checker rejects what it must

BROKEN = {
    "missing closing brace": '{service="payment-api" | json | event="payment"',
    "dangling pipe": '{service="payment-api"} | json |',
    "unquoted label value": '{service=payment-api} | json',
    "range without a duration": 'count_over_time({service="payment-api"} | json [])',
    "unreplaced Grafana variable": 'count_over_time({service="payment-api"}[$__auto])',
}
BROKEN.update({f"{where}, its first closing brace dropped": query.replace("}", "", 1)
               for where, query in SHIPPED.items()})


def test_checker_reports_every_broken_query(check_logql):
    results = check_logql(BROKEN)
    assert [name for name, errors in results.items() if not errors] == []


# ---------------------------------------------------------------- the finding itself, on made-up files


def test_only_targets_of_loki_sources_are_found_in_rows_and_mixed_panels():
    loki, prometheus = {"type": "loki", "uid": "loki"}, {"type": "prometheus", "uid": "prometheus"}
    board = {"panels": [
        {"type": "row", "collapsed": True, "panels": [{"datasource": loki, "targets": [{"expr": "{a=\"1\"}"}]}]},
        {"datasource": {"type": "datasource", "uid": "-- Mixed --"}, "targets": [
            {"datasource": prometheus, "expr": "up"}, {"datasource": "Loki", "expr": "{b=\"2\"}"}]},
        {"datasource": prometheus, "targets": [{"expr": "rate(x[5m])"}]}]}
    found = dashboard_loki_queries(board, {"loki", "Loki"})
    assert [where for where, _ in found] == ["/panels/0/panels/0/targets/0/expr", "/panels/1/targets/1/expr"]


def test_a_logql_block_holds_one_query_a_line_and_indented_lines_continue_it():
    block = '{a="1"}\n\nsum(count_over_time({a="1"}\n    | json [5m]))\n{b="2"}'
    assert logql_block_queries(block, 10) == [(10, '{a="1"}'), (12, 'sum(count_over_time({a="1"}\n    | json [5m]))'),
                                              (14, '{b="2"}')]


def test_variables_are_replaced_as_grafana_writes_them_and_unknown_ones_are_kept():
    query = '{instance=~"$instance"} |= "${__trace.traceId}" | currency=~"${currency}" | x="$unknown" [$__auto]'
    assert as_grafana_sends(query) == (r'{instance=~"(172\\.18\\.0\\.5:8080|172\\.18\\.0\\.6:8080)"}'
                                       ' |= "4bf92f3577b34da6a3ce929d0e0e4736" | currency=~"(EUR|USD)"'
                                       ' | x="$unknown" [1m]')
