# payment-api: the mock payment service used in the Grafana training stack.
# Build:  docker build -t payment-api .
# Run:    docker run --rm -p 8081:8080 payment-api
# Every setting is an environment variable; see payment_api.py's docstring.

FROM python:3.12-slim

# Unbuffered output so logs reach `docker logs` at once; no .pyc files written at run time (the
# non-root user cannot write to /app): the ones compiled at build time below are read.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app

# Dependencies first, so editing payment_api.py does not re-run pip. requirements-tracing.txt is the
# OpenTelemetry extra: installed here, it is used only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
# requirements-exercises.txt (PyYAML) lets the checks of students' work read YAML rule files.
# Every dependency installs from a wheel (pure Python, or protobuf's prebuilt one): no compiler is needed.
COPY requirements.txt requirements-tracing.txt requirements-exercises.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-tracing.txt \
    -r requirements-exercises.txt

# The service, and its optional extras: history.py (`payment_api.py backfill`), openapi.py (/openapi.json),
# tracing.py (OpenTelemetry traces), exercises.py (the checks of students' work at /api/checks, with
# PROMETHEUS_URL) and console.html (the trainer's console at /).
COPY payment_api.py history.py openapi.py tracing.py exercises.py console.html ./
# Compiled here, once (as root, before USER): the service then starts from this bytecode instead
# of compiling its 3,600 lines at every start (about 20 ms, and some MB the compiler leaves behind).
RUN python -m compileall -q .

# A numeric UID needs no /etc/passwd entry and lets Kubernetes' runAsNonRoot verify it.
USER 10001

EXPOSE 8080

# Standard library only: the slim image has neither curl nor wget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=2)"]

# Exec form: python is PID 1 and receives SIGTERM from `docker stop` directly. `-m` runs the module
# from the bytecode compiled above (`python payment_api.py` would compile it again); it is the same
# program: `docker run payment-api python payment_api.py backfill ...` works as well.
CMD ["python", "-m", "payment_api"]
