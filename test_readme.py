"""README.md stands alone and its commands work as written: every setting, metric and file it names exists,
nothing outside the repository is referred to, and the laptop Prometheus command starts from the repository root.
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

import payment_api
from conftest import eventually, free_port, require_binary

ROOT = Path(__file__).resolve().parent
README = (ROOT / "README.md").read_text()


def test_readme_refers_to_no_file_outside_the_repository():
    assert "../" not in README
    assert "PAYMENT-API-INTEGRATION" not in README


def test_every_repository_path_the_readme_names_exists():
    named = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)+)`", README))
    paths = {path for path in named
             if not path.startswith(("/", "http")) and "..." not in path and "." in path.rsplit("/", 1)[-1]}
    assert paths, "no repository path found: the pattern is wrong"
    missing = [path for path in sorted(paths) if not (ROOT / path).exists()]
    assert not missing, f"README names files that are not in the repository: {missing}"


def test_every_setting_the_service_reads_is_in_the_readme_settings_table():
    settings = [spec.metadata["env"] for spec in dataclasses.fields(payment_api.Settings) if "env" in spec.metadata]
    missing = [name for name in settings if f"| `{name}` |" not in README]
    assert not missing, f"settings missing from README: {missing}"


def test_every_payment_metric_is_in_the_readme_metrics_table(make_app):
    app = make_app()
    names = {metric.name for metric in app.metrics.registry.collect()
             if not metric.name.startswith(("process_", "python_"))}
    missing = [name for name in sorted(names)
               if f"| `{name}` |" not in README and f"| `{name}_total` |" not in README]
    assert not missing, f"metrics missing from README: {missing}"


def laptop_prometheus_commands():
    """Every `prometheus --config.file=...` command in README, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", README)
    return [line.strip() for line in text.splitlines() if line.strip().startswith("prometheus --config.file=")]


def test_the_readme_shows_laptop_prometheus_commands():
    assert len(laptop_prometheus_commands()) >= 2  # plain, and on the backfilled history


@pytest.mark.parametrize("number", range(2))
def test_the_laptop_prometheus_command_works_from_the_repository_root(tmp_path, number):
    prometheus = require_binary("prometheus")
    line = laptop_prometheus_commands()[number]
    words = shlex.split(line)
    storage = next(word.split("=", 1)[1] for word in words if word.startswith("--storage.tsdb.path="))
    assert os.path.isabs(storage) and not storage.startswith(str(ROOT)), "its data must go outside the repository"
    port = free_port()
    data = tmp_path / "prometheus-data"  # the README's path, moved into this test's own folder
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
