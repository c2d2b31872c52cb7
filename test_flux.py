"""Every Flux query we ship is valid, as InfluxData's own Flux language server sees it.

No InfluxDB 2 server runs here, but `@influxdata/flux-lsp-browser` (the Flux parser, semantic checker and
language server, compiled to WebAssembly) runs in node through the loader .ci/flux/check.mjs. Every Flux query
of every dashboard under grafana/ and every ```flux block of the repository's Markdown files is found here,
Grafana's macros and template variables are replaced by values as Grafana would write them, and the language
server must publish no diagnostic for any of them. It knows no schema (a misspelled tag or field is not
caught): test_stack.py checks those names against what the service writes.

Needs node and `npm ci --prefix .ci/flux` (the version is pinned in .ci/flux/package-lock.json); without them
the checks skip, except under CI=true where they fail.
"""
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import node_checker

HERE = Path(__file__).resolve().parent
CHECKER = HERE / ".ci" / "flux" / "check.mjs"
PACKAGE = "@influxdata/flux-lsp-browser"
DATASOURCES = HERE / "grafana" / "provisioning" / "datasources" / "datasources.yml"
SKIP_FOLDERS = {"node_modules", "venv", "site-packages", "dist-packages", "__pycache__"}  # and hidden ones

# What Grafana's InfluxDB data source (Flux mode) writes in place of its macros, for a one-hour dashboard range.
FLUX_MACROS = {"v.timeRangeStart": "2026-01-01T00:00:00Z", "v.timeRangeStop": "2026-01-01T01:00:00Z",
               "v.windowPeriod": "15s", "v.defaultBucket": '"training"', "v.organization": '"training"'}
# Grafana's global variables, for the same range.
GLOBAL_VARIABLES = {"__interval": "15s", "__rate_interval": "1m", "__range": "1h", "__interval_ms": "15000",
                    "__range_s": "3600", "__range_ms": "3600000", "__from": "1767225600000", "__to": "1767229200000"}
# How Grafana writes a variable's selected values for each ${name:format}.
FORMATS = {None: lambda values: values[0], "raw": lambda values: values[0], "text": lambda values: values[0],
           "json": json.dumps, "csv": ",".join, "pipe": "|".join,
           "regex": lambda values: "(" + "|".join(map(re.escape, values)) + ")",
           "doublequote": lambda values: ",".join(f'"{value}"' for value in values),
           "singlequote": lambda values: ",".join(f"'{value}'" for value in values)}


# ---------------------------------------------------------------- finding the queries


def repository_files(pattern, under=HERE):
    """Files matching `pattern` below `under`, outside hidden folders, virtual environments and node_modules."""
    found = []
    for folder, subfolders, files in os.walk(under):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".") and name not in SKIP_FOLDERS)
        found += [Path(folder, name) for name in sorted(files) if Path(name).match(pattern)]
    return found


def flux_datasources(path=DATASOURCES):
    """{uid and name: "flux" for an InfluxDB data source in Flux mode, else its type} of the provisioned ones."""
    kinds = {}
    for source in yaml.safe_load(path.read_text())["datasources"]:
        flux = source["type"] == "influxdb" and (source.get("jsonData") or {}).get("version") == "Flux"
        kinds[source.get("uid")] = kinds[source["name"]] = "flux" if flux else source["type"]
    return kinds


def dashboard_queries(board, field, kind_of, wanted):
    """(JSON path, text) of every non-empty `field` string in a dashboard whose data source is of kind `wanted`.

    A string belongs to the data source of its own object or of the nearest enclosing one (a panel's targets
    inherit the panel's), so targets of panels inside rows, annotations and template variables are found
    alike. kind_of(datasource) gives a data source's kind, or None when it cannot tell: then the enclosing
    one's counts.
    """
    found = []

    def walk(node, path, inherited):
        if isinstance(node, dict):
            kind = kind_of(node.get("datasource")) or inherited
            if kind == wanted and isinstance(node.get(field), str) and node[field].strip():
                found.append((f"{path}/{field}", node[field]))
            for key, value in node.items():
                walk(value, f"{path}/{key}", kind)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}", inherited)

    walk(board, "", None)
    return found


def dashboard_flux_queries(board, kinds):
    """(JSON path, query) of every Flux query in a dashboard, wherever Grafana keeps it. A data source is
    named by {"type", "uid"}, or by a uid or name alone."""
    def kind_of(source):
        if isinstance(source, str):
            return kinds.get(source)
        if isinstance(source, dict):
            kind = kinds.get(source.get("uid"), source.get("type"))
            return "flux" if kind == "influxdb" else kind  # an InfluxDB we do not provision: assume Flux
        return None

    return dashboard_queries(board, "query", kind_of, "flux")


def json_strings(node, path=""):
    """(JSON path, string) of every string in a JSON document."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from json_strings(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from json_strings(value, f"{path}/{index}")


def fenced_blocks(markdown):
    """(first line number, info word, text) of every fenced code block of a Markdown document."""
    blocks, lines, index = [], markdown.splitlines(), 0
    while index < len(lines):
        opening = re.match(r"^( *)(`{3,}|~{3,})\s*([^\s`]*)", lines[index])
        index += 1
        if not opening:
            continue
        indent, fence, info = len(opening[1]), opening[2], opening[3].lower()
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        start, body = index + 1, []
        while index < len(lines) and not closing.match(lines[index]):
            body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[index]))
            index += 1
        index += 1
        blocks.append((start, info, "\n".join(body)))
    return blocks


def looks_like_flux(text):
    return "|>" in text


def template_variables(board):
    """{name: [two or more sample values]} of a dashboard's variables, as selected with "All" or as offered."""
    variables = {}
    for variable in board.get("templating", {}).get("list", []):
        values = [option["value"] for option in variable.get("options") or [] if option.get("value") != "$__all"]
        current = (variable.get("current") or {}).get("value")
        if not values and current and "$__all" not in current:
            values = current if isinstance(current, list) else [current]
        if not values and variable.get("type") in ("custom", "interval") and isinstance(variable.get("query"), str):
            values = [value.strip() for value in variable["query"].split(",") if value.strip()]
        if not values and variable.get("type") == "constant":
            values = [variable.get("query", "")]
        variables[variable["name"]] = [str(value) for value in values] or ["sample-1", "sample-2"]
    return variables


def as_grafana_sends(query, variables):
    """`query` with Grafana's Flux macros, global variables and the dashboards' `variables` replaced by values.

    Only known names are replaced: Flux's own string interpolation ("${r.currency}") stays as it is, and an
    unknown variable is left for the checker to reject.
    """
    for macro, value in FLUX_MACROS.items():
        query = re.sub(rf"\b{re.escape(macro)}\b", value, query)

    def replace(match):
        name, format_ = match[1] or match[3] or match[4], match[2]
        if name in GLOBAL_VARIABLES:
            return GLOBAL_VARIABLES[name]
        if name not in variables:
            return match[0]
        assert format_ in FORMATS, f"${{{name}:{format_}}}: a format this check does not know yet; add it to FORMATS"
        return FORMATS[format_](variables[name])

    return re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]", replace, query)


def shipped_flux_queries():
    """{where: query as Grafana would send it} for every Flux query in the dashboards and the Markdown files,
    and [where] for every Flux-looking text that is not in a place where a Flux query is looked for."""
    kinds, queries, stray, variables = flux_datasources(), {}, [], {}
    boards = {path: json.loads(path.read_text()) for path in repository_files("*.json", HERE / "grafana")}
    for path, board in boards.items():
        variables.update(template_variables(board))
    for path, board in boards.items():
        found = dashboard_flux_queries(board, kinds)
        name = path.relative_to(HERE)
        queries.update((f"{name} {where}", as_grafana_sends(query, variables)) for where, query in found)
        stray += [f"{name} {where}" for where, text in json_strings(board)
                  if looks_like_flux(text) and (where, text) not in found]
    for path in repository_files("*.md"):
        name = path.relative_to(HERE)
        for line, info, text in fenced_blocks(path.read_text()):
            if info == "flux":
                queries[f"{name}:{line}"] = as_grafana_sends(text, variables)
            elif looks_like_flux(text):
                stray.append(f"{name}:{line} (a ```{info} block)")
    return queries, stray


SHIPPED, STRAY = shipped_flux_queries()


# ---------------------------------------------------------------- the checker


@pytest.fixture(scope="module")
def check_flux():
    """check_flux({name: query}) -> {name: {"valid", "diagnostics"}}, from one node run of .ci/flux/check.mjs."""
    return node_checker(CHECKER.parent, PACKAGE, timeout=120)


@pytest.fixture(scope="module")
def shipped_results(check_flux):
    return check_flux(SHIPPED)


def report(query, result):
    """The query with each diagnostic under the line it points at."""
    lines = query.splitlines()
    for diagnostic in sorted(result["diagnostics"], key=lambda item: -item["line"]):
        marker = " " * (diagnostic["character"] - 1) + f"^ {diagnostic['message']}"
        lines.insert(diagnostic["line"], marker)
    return "\n".join(lines)


def test_flux_queries_are_found_in_the_dashboard_the_readme_and_the_docs_and_nowhere_else():
    assert sum(name.startswith("grafana/") for name in SHIPPED) >= 4, sorted(SHIPPED)
    assert any(name.startswith("README.md:") for name in SHIPPED), sorted(SHIPPED)
    assert any(name.startswith("docs/") for name in SHIPPED), sorted(SHIPPED)
    assert not STRAY, ("Flux-looking text where no Flux query is looked for: put dashboard queries in a target"
                       " of an InfluxDB (Flux) data source, and label Markdown blocks ```flux", STRAY)


def test_every_flux_block_of_the_readme_and_the_docs_is_checked():
    for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        name = path.relative_to(HERE).as_posix()
        lines = [line for line, info, _ in fenced_blocks(path.read_text()) if info == "flux"]
        assert all(f"{name}:{line}" in SHIPPED for line in lines), (name, lines, sorted(SHIPPED))


@pytest.mark.parametrize("where", sorted(SHIPPED))
def test_shipped_flux_query_has_no_diagnostic(where, shipped_results):
    result = shipped_results[where]
    assert result["diagnostics"] == [] and result["valid"], f"{where}:\n{report(SHIPPED[where], result)}"
    assert not re.search(r"\bv\.\w+|\$\{?__", SHIPPED[where]), "a Grafana macro this check does not replace yet"


# ---------------------------------------------------------------- the checker rejects what it must

BROKEN = {  # name: (query, a message the language server must publish)
    "unknown function": ('from(bucket: "training")\n  |> range(start: -1h)\n  |> meen()',
                         "undefined identifier meen"),
    "wrong argument name": ('from(bucket: "training")\n  |> range(begin: -1h)',
                            "unexpected argument begin"),
    "missing argument": ('from(bucket: "training")\n  |> range()', "missing required argument start"),
    "argument of the wrong type": ('from(bucket: "training")\n  |> range(start: -1h)\n  |> limit(n: "ten")',
                                   "expected int but found string"),
    "syntax error": ('from(bucket: "training"\n  |> range(start: -1h)', "expected RPAREN"),
    "unreplaced Grafana macro": ('from(bucket: "training")\n  |> range(start: v.timeRangeStart)',
                                 "undefined identifier v"),
}




def misspelled(query):
    """(query with its last piped function misspelled, as a careless edit would leave it, the message expected)."""
    *_, call = re.finditer(r"\|>\s*(\w+)\(", query)
    return query[:call.start(1)] + call[1] + "x" + query[call.end(1):], f"undefined identifier {call[1]}x"


BROKEN.update({f"{where}, misspelled": misspelled(query)  # the longest shipped query
               for where, query in sorted(SHIPPED.items(), key=lambda item: -len(item[1]))[:1]})


@pytest.fixture(scope="module")
def broken_results(check_flux):
    return check_flux({name: query for name, (query, _) in BROKEN.items()})


@pytest.mark.parametrize("name", BROKEN)
def test_checker_rejects_a_broken_query(name, broken_results):
    result = broken_results[name]
    messages = [diagnostic["message"] for diagnostic in result["diagnostics"]]
    assert not result["valid"] and any(BROKEN[name][1] in message for message in messages), (name, messages)


# ---------------------------------------------------------------- the finding itself, on made-up files


def test_queries_are_found_in_rows_annotations_variables_and_mixed_panels_only_for_flux_sources():
    flux, prometheus = {"type": "influxdb", "uid": "influxdb"}, {"type": "prometheus", "uid": "prometheus"}
    board = {
        "panels": [
            {"type": "row", "collapsed": True, "panels": [
                {"datasource": flux, "targets": [{"refId": "A", "query": "from(bucket: \"a\") |> range(start: -1h)"}]}]},
            {"datasource": {"type": "datasource", "uid": "-- Mixed --"}, "targets": [
                {"refId": "A", "datasource": prometheus, "expr": "up", "query": "up"},
                {"refId": "B", "datasource": "InfluxDB", "query": "from(bucket: \"b\")"}]},
            {"datasource": prometheus, "targets": [{"refId": "A", "expr": "rate(x[5m])"}]}],
        "annotations": {"list": [{"datasource": flux, "target": {"query": "from(bucket: \"c\")"}}]},
        "templating": {"list": [{"name": "host", "type": "query", "datasource": flux,
                                 "query": "import \"influxdata/influxdb/schema\"\nschema.tagValues(bucket: \"d\", tag: \"host\")"}]},
    }
    kinds = {"influxdb": "flux", "InfluxDB": "flux", "prometheus": "prometheus"}
    found = dashboard_flux_queries(board, kinds)
    assert [where for where, _ in found] == ["/panels/0/panels/0/targets/0/query", "/panels/1/targets/1/query",
                                             "/annotations/list/0/target/query", "/templating/list/0/query"]


def test_flux_blocks_are_found_in_markdown_fences_of_either_kind_and_indentation():
    markdown = "\n".join([
        "# Title", "```flux", "from(bucket: \"a\")", "```", "", "- a step:", "", "   ~~~ Flux", "   from(bucket: \"b\")",
        "     |> range(start: -1h)", "   ~~~", "```bash", "curl x | jq", "```", "````flux", "```", "nested", "````"])
    blocks = fenced_blocks(markdown)
    assert [(line, info) for line, info, _ in blocks] == [(3, "flux"), (9, "flux"), (13, "bash"), (16, "flux")]
    assert blocks[1][2] == "from(bucket: \"b\")\n  |> range(start: -1h)"
    assert blocks[3][2] == "```\nnested"


def test_grafana_macros_and_variables_are_replaced_as_grafana_writes_them_and_flux_interpolation_is_kept():
    query = ('from(bucket: v.defaultBucket) |> range(start: v.timeRangeStart, stop: v.timeRangeStop)'
             ' |> filter(fn: (r) => contains(value: r.currency, set: ${currency:json}) and r.host == "$host")'
             ' |> aggregateWindow(every: v.windowPeriod, fn: mean) |> limit(n: $__interval_ms)'
             ' |> map(fn: (r) => ({r with label: "${r.currency}"})) |> yield(name: "[[host]]-$unknown")')
    sent = as_grafana_sends(query, {"currency": ["EUR", "USD"], "host": ["a"]})
    assert sent == ('from(bucket: "training") |> range(start: 2026-01-01T00:00:00Z, stop: 2026-01-01T01:00:00Z)'
                    ' |> filter(fn: (r) => contains(value: r.currency, set: ["EUR", "USD"]) and r.host == "a")'
                    ' |> aggregateWindow(every: 15s, fn: mean) |> limit(n: 15000)'
                    ' |> map(fn: (r) => ({r with label: "${r.currency}"})) |> yield(name: "a-$unknown")')
