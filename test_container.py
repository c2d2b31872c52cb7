"""The container's first run, checked for real: the image built from the unchanged Dockerfile, run as a user would.

No Docker engine runs here; Debian's podman builds and runs the image. Base images cannot be pulled, so the
`python:3.12-slim` the Dockerfile starts FROM is played by a stand-in: a Debian minbase made with debootstrap,
with Debian's python3 (3.11) and pip (kept in a cache outside the repository, built once per machine, about
45 s), given to `podman build --from`. The Dockerfile itself is never changed.

Needs root, podman, runc and debootstrap (`.ci/run` installs them); without them these tests skip, except under
CI=true where they fail. Containers and images made here are removed afterwards; only the cached base stays.
"""
import ast
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import answers_health, eventually, free_port, http, require_binary

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PAYMENT_API_BASE_CACHE", "/var/tmp/payment-api-ci"))
# The stand-in for python:3.12-slim: what the Dockerfile relies on is `python` and `pip` on PATH.
STAND_IN = {"suite": "bookworm", "variant": "minbase",
            "packages": ["python3", "python3-pip", "python3-venv", "ca-certificates"],
            "env": {"PIP_BREAK_SYSTEM_PACKAGES": "1", "LANG": "C.UTF-8"}}
APP_DIR = "/app"  # the Dockerfile's WORKDIR
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def podman(*args, timeout=120, check=True):
    run = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, f"podman {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run


def debian_mirror():
    """The Debian mirror this machine's apt uses (deb822 or one-line format), else the default one."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.exists():
            match = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s", path.read_text(), re.M)
            if match:
                return match[1]
    return "http://deb.debian.org/debian"


def stand_in_rootfs():
    """A tarball of the stand-in's root file system, made once per recipe and cached in CACHE."""
    key = hashlib.sha256(json.dumps(STAND_IN, sort_keys=True).encode()).hexdigest()[:12]
    tarball = CACHE / f"python-slim-stand-in-{key}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits for the one that builds it
        if tarball.exists():
            return tarball
        debootstrap = require_binary("debootstrap")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            rootfs = Path(work, "rootfs")

            def run(*command):
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr}"

            run(debootstrap, f"--variant={STAND_IN['variant']}", STAND_IN["suite"], str(rootfs), debian_mirror())
            run("chroot", str(rootfs), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *STAND_IN["packages"])
            run("chroot", str(rootfs), "apt-get", "clean")
            shutil.rmtree(rootfs / "var/lib/apt/lists")  # as in the slim image: no package lists
            (rootfs / "usr/bin/python").symlink_to("python3")  # the Dockerfile runs `python`
            run("tar", "-C", str(rootfs), "-cf", f"{work}/rootfs.tar", ".")
            os.replace(f"{work}/rootfs.tar", tarball)
        print(f"\nstand-in base built in {time.monotonic() - started:.1f} s, cached in {tarball}")
    return tarball


class Image:
    def __init__(self, name, base):
        self.name, self.base = name, base

    def history(self, name=None):
        return json.loads(podman("history", "--format", "json", name or self.name).stdout)

    def project_layers(self):
        """(created by, bytes) of the history entries the Dockerfile adds on top of the base."""
        entries = self.history()
        return [(entry.get("CreatedBy", entry.get("createdBy", "")), entry.get("Size", entry.get("size", 0)))
                for entry in entries[:len(entries) - len(self.history(self.base))]]


@pytest.fixture(scope="module")
def image():
    for binary in ("podman", "runc", "debootstrap"):
        require_binary(binary)
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("building the stand-in base needs root (debootstrap, chroot)")
        pytest.skip("building the stand-in base needs root (debootstrap, chroot)")
    tag = uuid.uuid4().hex[:10]  # other runs may build at the same time
    image = Image(f"localhost/payment-api-test:{tag}", f"localhost/payment-api-test-base:{tag}")
    started = time.monotonic()
    tarball = stand_in_rootfs()
    changes = [f"--change=ENV {key}={value}" for key, value in STAND_IN["env"].items()]
    podman("import", *changes, "--change=CMD [\"python3\"]", str(tarball), image.base)
    based = time.monotonic()
    try:
        podman("build", "--format", "docker",  # the default OCI format drops HEALTHCHECK
               "--isolation=chroot", "--pull=never", "--network", "host", "--from", image.base,
               "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",  # pip inside the build trusts what this machine trusts
               "-t", image.name, str(HERE), timeout=300)
        built = time.monotonic()
        print(f"\nbase ready in {based - started:.1f} s, image built in {built - based:.1f} s")
        yield image
    finally:
        podman("rmi", "-f", image.name, check=False)
        podman("rmi", "-f", image.base, check=False)


def start_container(image):
    """Run the image as a user would (`docker run -d -p 127.0.0.1:PORT:8080 IMAGE`); (name, url), once healthy."""
    name, port = f"payment-api-test-{uuid.uuid4().hex[:10]}", free_port()
    started = time.monotonic()
    podman("--runtime", "runc", "run", "-d", "--name", name,  # crun fails here on rlimits and hybrid cgroups
           "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
           "-p", f"127.0.0.1:{port}:8080", image.name)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["Status"] == "running", (state, podman("logs", name).stdout)
        return answers_health(url)

    try:
        eventually(healthy, timeout=30, interval=0.1, message=f"container {name} answers /health")
    except BaseException:
        podman("rm", "-f", name, check=False)
        raise
    print(f"\ncontainer {name}: /health answered {time.monotonic() - started:.1f} s after `podman run`")
    return name, url


@pytest.fixture(scope="module")
def container(image):
    name, url = start_container(image)
    yield name, url
    podman("rm", "-f", name, check=False)


def exercise(url):
    """Every route a user reaches once, the way the README shows them: {request: status}."""
    statuses = {}
    payment = {"amount": 42.5, "currency": "EUR", "customer_id": "cust_00042"}
    statuses["POST /api/payments"], _, created = http("POST", url + "/api/payments", payment)
    for path in ["/health", "/metrics", "/api/payments", "/api/payments/stats", f"/api/payments/{created['paymentId']}",
                 "/api/simulation", "/api/scenarios", "/api/scenarios/history", "/nowhere"]:
        statuses[f"GET {path}"] = http("GET", url + path, headers={"Accept-Encoding": "gzip"})[0]
    return statuses


def test_image_keeps_its_healthcheck_and_adds_little_to_the_base(image):
    config = json.loads(podman("image", "inspect", image.name).stdout)[0]
    assert config["Config"]["User"] == "10001"
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python"], config.get("Healthcheck")
    layers = image.project_layers()
    size = sum(size for _, size in layers)
    print(f"\nthe project adds {size / 1e6:.1f} MB to the base:" +
          "".join(f"\n  {size / 1e6:8.3f} MB  {created[:90]}" for created, size in reversed(layers)))
    assert layers and size < 40e6, layers  # about 26 MB: the dependencies (OpenTelemetry included) and the service


def test_runs_as_uid_10001(container):
    name, _ = container
    status = podman("exec", name, "cat", "/proc/1/status").stdout  # PID 1 is the service (exec form CMD)
    uids, gids = (re.search(rf"^{kind}:\s+(.*)$", status, re.M)[1].split() for kind in ("Uid", "Gid"))
    assert uids == ["10001"] * 4, status
    assert "python" in podman("exec", name, "cat", "/proc/1/cmdline").stdout


def test_the_service_runs_from_bytecode_compiled_when_the_image_was_built(container):
    name, _ = container
    cmdline = podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert cmdline[1:3] == ["-m", "payment_api"], cmdline
    cached = podman("exec", name, "ls", f"{APP_DIR}/__pycache__").stdout.split()
    assert any(file.startswith("payment_api.") and file.endswith(".pyc") for file in cached), cached


def test_answers_health_on_the_loopback_port_it_is_published_on(container):
    name, url = container
    assert podman("port", name, "8080/tcp").stdout.split() == [url.removeprefix("http://")]
    status, _, body = http("GET", url + "/health")
    assert status == 200 and body["status"] == "UP", body
    assert body["dependencies"]["influxdb"]["state"] != "connected", body  # no InfluxDB here, as on a laptop


def test_healthcheck_command_succeeds(container):
    name, _ = container
    run = podman("healthcheck", "run", name, check=False)  # prints harmless "no systemd" timer errors
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(podman("inspect", name).stdout)[0]["State"]["Health"]["Status"] == "healthy"


RECORDER = r"""
import os, runpy, sys
record = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        os.write(record, os.fsencode(os.path.abspath(args[0])) + b"\n")
sys.addaudithook(hook)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

CHECK_IN_IMAGE = r"""
import importlib.util, json, os, sys
needed = json.loads(sys.argv[1])
missing = [path for path in needed["files"] if not os.path.isfile(path)]
missing += [module for module in needed["modules"] if importlib.util.find_spec(module) is None]
print(json.dumps(missing))
"""


def imported_modules(source):
    """Top-level names of the modules a Python file imports anywhere (functions included), except the standard
    library's and those imported inside a `try` that handles their absence (ImportError)."""
    tree, guarded = ast.parse(source), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any("ImportError" in ast.unparse(handler.type or ast.Name("BaseException"))
                                             for handler in node.handlers):
            guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) and id(node) not in guarded
             for alias in node.names}
    names |= {node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and id(node) not in guarded}
    return {name.split(".")[0] for name in names} - set(sys.stdlib_module_names)


def what_the_service_needs(run_service, record):
    """Run `python payment_api.py` here, drive it through every route and stop it: {"files": the repository's
    files it opened, as paths in the image; "modules": the installed packages those files import (lazily
    imported ones too); "extras": the repository's modules they import that the service did not open (another
    command's, such as `backfill`), as paths in the image}. Python's own files are the base image's business."""
    service = run_service(argv=("-c", RECORDER, str(record), "payment_api.py"))
    exercise(service.url)
    time.sleep(1)  # the simulator and the InfluxDB writer run too
    service.send_signal(signal.SIGTERM)
    assert service.wait(15) == 0
    opened = {re.sub(r"__pycache__/([^/.]+)\.[^/]+\.pyc$", r"\1.py", path)  # compiled or not, the source
              for path in record.read_text(errors="replace").splitlines()}
    ours = sorted(Path(path) for path in opened if path.startswith(f"{HERE}{os.sep}") and "-packages" not in path)
    modules = set().union(*(imported_modules(path.read_text()) for path in ours if path.suffix == ".py"))
    origins = {name: Path(spec.origin) for name in modules if (spec := importlib.util.find_spec(name)) and spec.origin}
    local = {name for name, origin in origins.items() if origin.parent == HERE or origin.parent.parent == HERE}
    return {"files": [f"{APP_DIR}/{path.relative_to(HERE)}" for path in ours],
            "modules": sorted(set(origins) - local),
            "extras": sorted(f"{APP_DIR}/{origins[name].relative_to(HERE)}" for name in local
                             if origins[name] not in ours)}


def test_every_file_the_service_needs_at_run_time_is_in_the_image(container, run_service, tmp_path):
    name, url = container
    needed = what_the_service_needs(run_service, tmp_path / "opened")
    assert f"{APP_DIR}/payment_api.py" in needed["files"] and "prometheus_client" in needed["modules"], needed
    missing = json.loads(podman("exec", name, "python", "-c", CHECK_IN_IMAGE, json.dumps(needed)).stdout)
    assert missing == [], f"needed at run time but not in the image: {missing}"
    extras = json.loads(podman("exec", name, "python", "-c", CHECK_IN_IMAGE,
                               json.dumps({"files": needed["extras"], "modules": []})).stdout)
    statuses = exercise(url)  # and the service in the image does what it did here
    assert statuses.pop("GET /nowhere") == 404 and statuses.pop("POST /api/payments") in (200, 402, 500), statuses
    assert set(statuses.values()) == {200}, statuses  # (a payment may fail by the simulated failure rate)
    logs = podman("logs", name).stdout
    assert "Traceback" not in logs and "Error:" not in logs, logs[-3000:]
    print(f"\nthe service needs {needed['files']} and {needed['modules']}: all in the image" +
          (f"; NOT in the image: {extras}, which other commands of the service import" if extras else ""))


def test_a_stop_ends_it_with_exit_code_0_in_under_2_seconds_without_influxdb(image):
    name, url = start_container(image)  # the default INFLUXDB_URL, which does not resolve here
    try:
        eventually(lambda: http("GET", url + "/health")[2]["dependencies"]["influxdb"]["pendingPoints"] > 0,
                   timeout=10, message="simulated payments wait for InfluxDB")
        started = time.time()
        podman("stop", "--time", "10", name, timeout=30)  # SIGTERM, then SIGKILL after 10 s as `docker stop` does
        returned = time.time()
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        finished = int(podman("inspect", "--format", "{{.State.FinishedAt.UnixNano}}", name).stdout) / 1e9
        print(f"\nSIGTERM to exit: {finished - started:.2f} s (podman stop returned after {returned - started:.2f} s),"
              f" exit code {state['ExitCode']}")
        assert state["ExitCode"] == 0, podman("logs", name).stdout[-3000:]
        assert finished - started < 2, podman("logs", name).stdout[-3000:]
    finally:
        podman("rm", "-f", name, check=False)
