"""README.md and the pages of docs/ stand alone and their commands work as written: every setting, metric and file
they name exists, nothing outside the repository is referred to, every relative link and #anchor resolves (as GitHub
makes anchors from headings), README.md stays short, and the laptop Prometheus commands start from the repository
root.
"""
import dataclasses
import json
import os
import re
import shlex
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

import payment_api
from conftest import eventually, free_port, require_binary

ROOT = Path(__file__).resolve().parent
README = (ROOT / "README.md").read_text()
README_MAX_LINES = 350
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()  # README first, then docs/ in name order
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
SETTINGS_PAGE = PAGES["docs/settings.md"]
RUNBOOK_CONFIGS = ["prometheus", "alertmanager", "grafana"]  # folders whose YAML and JSON may carry a runbook_url
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![image](...)


# ---------------------------------------------------------------- headings and links as GitHub reads them


def prose(markdown):
    """`markdown` without its fenced code blocks: a "# comment" in a block of code is no heading."""
    kept, fence = [], None
    for line in markdown.splitlines():
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening[1]
        elif fence is not None and re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a page: the heading's text without its markup, lower case,
    punctuation dropped, spaces as hyphens; a repeated anchor gets -1, -2, ..."""
    anchors, seen = set(), {}
    for line in markdown.splitlines():
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if not heading:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading[1]).replace("`", "")  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchor = slug if slug not in seen else f"{slug}-{seen[slug]}"
        seen[slug] = seen.get(slug, 0) + 1
        anchors.add(anchor)
    return anchors


def unresolved(target, page, root=ROOT):
    """Why a relative link `target` on the page at `page` (a path from `root`) does not resolve, or None. The
    file must exist inside `root`; an #anchor must be a heading of the Markdown page it names."""
    path, _, anchor = target.partition("#")
    file = (root / page).parent / path if path else root / page
    try:
        file.resolve().relative_to(root.resolve())
    except ValueError:
        return f"{target}: outside the repository"
    if not file.exists():
        return f"{target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in github_anchors(prose(file.read_text())):
        return f"{target}: {file.relative_to(root).as_posix()} has no heading #{anchor}"
    return None


def relative_links(markdown):
    """The targets of the links of a page that lead into the repository (no scheme, no //host); a [x](y) in
    code is no link."""
    return [target for target in LINK.findall(re.sub(r"(`+).+?\1", "", prose(markdown)))
            if not re.match(r"^[a-z][a-z0-9+.-]*:|^//", target, re.I)]


def test_github_anchors_are_made_as_github_makes_them():
    page = "# The API: payments, retries\n## Declines, retries, refunds\n### `GET /api/activity`\n## Sample step: 60 s\n" \
           "## Notes\n## Notes\n```\n# not a heading\n```\n"
    assert github_anchors(prose(page)) == {"the-api-payments-retries", "declines-retries-refunds", "get-apiactivity",
                                           "sample-step-60-s", "notes", "notes-1"}


def test_a_link_to_a_missing_file_or_heading_does_not_resolve(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Title\n\n## The two commands\n")
    (tmp_path / "docs" / "page.md").write_text("# Page\n")
    assert unresolved("../README.md#the-two-commands", "docs/page.md", tmp_path) is None
    assert unresolved("#page", "docs/page.md", tmp_path) is None
    assert "no heading #nope" in unresolved("#nope", "docs/page.md", tmp_path)
    assert "no heading #title-1" in unresolved("../README.md#title-1", "docs/page.md", tmp_path)
    assert "no such file" in unresolved("other.md", "docs/page.md", tmp_path)
    assert "outside the repository" in unresolved("../../elsewhere.md", "docs/page.md", tmp_path)
    assert relative_links("[a](x.md) [b](https://example.org) `[c](y.md)` ![d](img.png \"title\")") == ["x.md", "img.png"]


def test_every_relative_link_and_anchor_of_the_readme_and_the_docs_resolves():
    assert len(PAGES) > 1, "no page found in docs/"
    links = {page: relative_links(text) for page, text in PAGES.items()}
    assert all(links.values()), f"a page that leads nowhere, or the pattern is wrong: {links}"
    broken = [f"{page}: {problem}" for page, targets in links.items()
              for problem in (unresolved(target, page) for target in targets) if problem]
    assert not broken, "\n".join(broken)


def test_the_readme_links_to_every_page_of_the_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(README)}
    missing = [page for page in PAGES if page != "README.md" and (ROOT / page).resolve() not in linked]
    assert not missing, f"pages of docs/ the README's map does not lead to: {missing}"


def test_the_readme_has_at_most_350_lines():
    assert len(README.splitlines()) <= README_MAX_LINES


def runbook_urls(node):
    """Every `runbook_url` value in a YAML or JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "runbook_url" and isinstance(value, str):
                yield value
            else:
                yield from runbook_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from runbook_urls(value)


def test_every_runbook_url_leads_to_a_heading_of_the_docs():
    found = {}
    for folder in RUNBOOK_CONFIGS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".yml", ".yaml", ".json"):
                document = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
                found[path.relative_to(ROOT).as_posix()] = list(runbook_urls(document))
    assert len(found["prometheus/alerts.yml"]) >= 9, found["prometheus/alerts.yml"]
    broken = [f"{where}: {problem}" for where, urls in found.items() for url in urls
              for problem in [unresolved(url, "runbook_url") if "#" in url else f"{url}: no #anchor"] if problem]
    assert not broken, "\n".join(broken)  # a runbook_url is a path from the repository root


# ---------------------------------------------------------------- what the pages name exists


def test_readme_refers_to_no_file_outside_the_repository():
    assert "../" not in README
    assert not [page for page, text in PAGES.items() if "PAYMENT-API-INTEGRATION" in text]


def test_the_docs_refer_to_no_file_outside_the_repository():
    """A page of docs/ reaches README.md with ../, and only in a link that resolves inside the repository."""
    for page, text in PAGES.items():
        rest = re.sub(r"\]\(([^)\s]+)\)", lambda link: "](" if unresolved(link[1], page) is None else link[0], text)
        assert "../" not in rest, page


def test_every_repository_path_the_readme_and_the_docs_name_exists():
    named = {(page, path) for page, text in PAGES.items() for path in re.findall(r"`([\w.-]+(?:/[\w.-]+)+)`", text)}
    paths = {(page, path) for page, path in named
             if not path.startswith(("/", "http")) and "..." not in path and "." in path.rsplit("/", 1)[-1]}
    assert {page for page, _ in paths} >= {"README.md", "docs/history.md"}, "no repository path found: the pattern is wrong"
    missing = [f"{page}: {path}" for page, path in sorted(paths) if not (ROOT / path).exists()]
    assert not missing, f"the README or docs/ name files that are not in the repository: {missing}"


def test_every_setting_the_service_reads_is_in_the_settings_table_of_the_docs():
    settings = [spec.metadata["env"] for spec in dataclasses.fields(payment_api.Settings) if "env" in spec.metadata]
    missing = [name for name in settings if f"| `{name}` |" not in SETTINGS_PAGE]
    assert not missing, f"settings missing from docs/settings.md: {missing}"


def test_the_readme_settings_are_rows_of_the_settings_table_of_the_docs():
    """The README's short table copies its rows from docs/settings.md (links aside), so the two cannot disagree."""
    def rows(text):
        return [re.sub(r"\]\([^)]*\)", "]()", line) for line in text.splitlines() if line.startswith("| `")]
    section = re.search(r"^## The settings that matter most$(.*?)^## ", README, re.M | re.S)[1]
    assert len(rows(section)) >= 5
    assert not [row for row in rows(section) if row not in rows(SETTINGS_PAGE)]


def test_every_payment_metric_is_in_the_readme_metrics_table(make_app):
    app = make_app()
    names = {metric.name for metric in app.metrics.registry.collect()
             if not metric.name.startswith(("process_", "python_"))}
    missing = [name for name in sorted(names)
               if f"| `{name}` |" not in README and f"| `{name}_total` |" not in README]
    assert not missing, f"metrics missing from README: {missing}"


def laptop_prometheus_commands():
    """Every `prometheus --config.file=...` command in README and docs/, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(PAGES.values()))
    return [line.strip() for line in text.splitlines() if line.strip().startswith("prometheus --config.file=")]


def test_the_docs_show_laptop_prometheus_commands():
    assert len(laptop_prometheus_commands()) >= 2  # plain, and on the backfilled history


@pytest.mark.parametrize("number", range(2))
def test_the_laptop_prometheus_command_works_from_the_repository_root(tmp_path, number):
    prometheus = require_binary("prometheus")
    line = laptop_prometheus_commands()[number]
    words = shlex.split(line)
    storage = next(word.split("=", 1)[1] for word in words if word.startswith("--storage.tsdb.path="))
    assert os.path.isabs(storage) and not storage.startswith(str(ROOT)), "its data must go outside the repository"
    port = free_port()
    data = tmp_path / "prometheus-data"  # the documented path, moved into this test's own folder
    args = [prometheus] + [f"--storage.tsdb.path={data}" if word.startswith("--storage.tsdb.path=") else word
                           for word in words[1:]] + [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answer(path):
            assert process.poll() is None, process.stderr.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                    return json.load(response)["data"]
            except OSError:
                return None
        groups = eventually(lambda: (answer("/api/v1/rules") or {}).get("groups"), timeout=30,
                            message="Prometheus up with the shipped rules")
        targets = eventually(lambda: (answer("/api/v1/targets") or {}).get("activeTargets"), timeout=30,
                             message="the laptop target discovered")
    finally:
        process.terminate()
        process.wait(10)
    rule_names = {rule["name"] for group in groups for rule in group["rules"]}
    assert "HighPaymentErrorRate" in rule_names
    assert [target["scrapeUrl"] for target in targets] == ["http://localhost:8080/metrics"]
    assert not (ROOT / "data").exists(), "Prometheus wrote its data into the repository"
