"""A new user's first run: README's two commands, exactly as README.md writes them, from a fresh clone.

The repository this file lives in is cloned (its committed state, as a user gets it) into a temporary folder,
once for each command. The run command must bring the service up with only what a user's shell has (PORT and
HOST set, no virtual environment active, the unreachable default INFLUXDB_URL) until a payment shows in
/metrics; the test command must start pytest and collect the tests (PYTEST_ADDOPTS=--collect-only, so the
inner run only collects). Both install from PyPI into a new `.venv`, so this runs under CI=true (or with
PAYMENT_API_FIRST_RUN=1) and skips elsewhere.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import answers_health, eventually, free_port, metric_value, require_binary

HERE = Path(__file__).resolve().parent
SECTION = "The two commands"
# What a user's shell passes on: its own settings, and how this machine reaches PyPI.
USER_VARIABLES = re.compile(r"HOME|USER|LOGNAME|SHELL|LANG|LC_\w+|TERM|TMPDIR|TZ|PIP_\w+|(HTTPS?|NO|ALL)_PROXY"
                            r"|SSL_CERT_\w+|REQUESTS_CA_BUNDLE", re.IGNORECASE)

needs_pypi = pytest.mark.skipif(os.environ.get("CI") != "true" and os.environ.get("PAYMENT_API_FIRST_RUN") != "1",
                                reason="installs from PyPI into fresh clones: runs under CI=true or PAYMENT_API_FIRST_RUN=1")


def readme_commands(readme):
    """{"run": command, "test": command}: the code lines of README's "## The two commands" section, up to the
    next heading of any level (indented or fenced code; the test command is the one that runs pytest)."""
    section = re.search(rf"^##\s+{re.escape(SECTION)}\s*$(.*?)(?=^#{{1,6}}\s|\Z)", readme, re.M | re.S)
    assert section, f'README.md has no "## {SECTION}" section'
    lines, fenced = [], False
    for line in section[1].splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
        elif line.strip() and (fenced or re.match(r"^( {4}|\t)", line)):
            lines.append(re.sub(r"^\$\s+", "", line.strip()))
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 2, f'"## {SECTION}" should show two commands, one a line: {commands}'
    test = [command for command in commands if re.search(r"\bpytest\b", command)]
    assert len(test) == 1, f"exactly one of the two commands should run pytest: {commands}"
    return {"run": next(command for command in commands if command not in test), "test": test[0]}


def users_environment(**extra):
    """This process's environment as a user's shell would have it: no virtual environment on PATH or active,
    no test runner's variables, nothing from this CI but how to reach PyPI."""
    venvs = {os.path.join(prefix, "bin") for prefix in (sys.prefix, os.environ.get("VIRTUAL_ENV"))
             if prefix and prefix != sys.base_prefix}
    path = [folder for folder in os.environ.get("PATH", os.defpath).split(os.pathsep) if folder not in venvs]
    env = {name: value for name, value in os.environ.items() if USER_VARIABLES.fullmatch(name)}
    return {**env, "PATH": os.pathsep.join(path), **extra}


def fresh_clone(folder):
    require_binary("git")
    subprocess.run(["git", "clone", "--quiet", str(HERE), str(folder)], check=True, timeout=60)
    return folder


def test_readme_commands_are_read_from_the_section_and_stop_at_the_next_heading():
    readme = ("# x\n## The two commands\n\nRun:\n\n    python3 -m venv .venv && .venv/bin/python app.py\n\nTest:\n\n"
              "```bash\n$ .venv/bin/python -m pytest -q\n```\n### What you see\n\n    {\"log\": 1}\n")
    assert readme_commands(readme) == {"run": "python3 -m venv .venv && .venv/bin/python app.py",
                                       "test": ".venv/bin/python -m pytest -q"}


@needs_pypi
def test_the_run_command_from_a_fresh_clone_serves_health_and_payments(tmp_path):
    started = time.monotonic()
    clone = fresh_clone(tmp_path / "payment-api")
    cloned = time.monotonic()
    command = readme_commands((clone / "README.md").read_text())["run"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        shell = subprocess.Popen(command, shell=True, cwd=clone, stdout=log, stderr=subprocess.STDOUT,
                                 env=users_environment(PORT=str(port), HOST="127.0.0.1"),
                                 start_new_session=True)  # its own process group, as in a terminal

    def answers():
        assert shell.poll() is None, f"`{command}` exited {shell.returncode}:\n{log_path.read_text()}"
        return answers_health(url)

    try:
        eventually(answers, timeout=240, interval=0.2, message=f"`{command}` serves /health")
        healthy = time.monotonic()
        eventually(lambda: metric_value(url, "payment_requests_total") > 0, timeout=30, interval=0.1,
                   message="the simulator's first payment shows in /metrics")
        paid = time.monotonic()
        print(f"\nclone to first payment in /metrics: {paid - started:.1f} s (clone {cloned - started:.1f} s, "
              f"venv, install and start {healthy - cloned:.1f} s, first payment {paid - healthy:.1f} s later)")
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGINT)  # Ctrl-C
            try:
                shell.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@needs_pypi
def test_the_test_command_from_a_fresh_clone_collects_the_tests(tmp_path):
    clone = fresh_clone(tmp_path / "payment-api")
    command = readme_commands((clone / "README.md").read_text())["test"]
    started = time.monotonic()
    run = subprocess.run(command, shell=True, cwd=clone, capture_output=True, text=True, timeout=300,
                         env=users_environment(PYTEST_ADDOPTS="--collect-only"))
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"`{command}` exited {run.returncode}:\n{output[-5000:]}"
    collected = re.search(r"^(\d+) tests? collected", output, re.M)
    assert collected and int(collected[1]) > 0, output[-5000:]
    print(f"\n`{command}` collected {collected[1]} tests in {time.monotonic() - started:.1f} s")
