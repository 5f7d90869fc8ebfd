"""docker/: the image and the compose cluster agree with the pinned stack and with each other.

No Docker engine is needed (none was available where these were written): the files are parsed.
"""
from __future__ import annotations

import os
import re
import shlex

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(REPO, "docker")
SERVICES = ("spark-master", "spark-worker-1", "spark-worker-2", "submit")


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as handle:
        return handle.read()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [line for line in _read("docker", "Dockerfile").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in _read("requirements.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt line {line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


def horovod_flags(text: str) -> set[str]:
    return set(re.findall(r"\b(HOROVOD_WITH(?:OUT)?_[A-Z]+)=1\b", text))


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(DOCKER, "docker-compose.yml"), encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _mount(volume: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume; the source may be ``${VAR:-default}``."""
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", volume)
    assert match, f"cannot parse volume {volume!r}"
    return match.group(1), match.group(2), match.group(3) or "rw"


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_compose_defines_the_cluster_services(compose):
    services = compose["services"]
    for name in SERVICES:
        assert name in services, f"service {name} missing; found {sorted(services)}"
        assert services[name].get("image") == services["spark-master"]["image"]
        build = services[name]["build"]
        dockerfile = os.path.normpath(os.path.join(DOCKER, build["context"], build["dockerfile"]))
        assert dockerfile == os.path.join(DOCKER, "Dockerfile")
    assert "org.apache.spark.deploy.master.Master" in _command(services["spark-master"])
    for name in ("spark-worker-1", "spark-worker-2"):
        command = _command(services[name])
        assert command[0] == "spark-class" and "org.apache.spark.deploy.worker.Worker" in command


def test_data_is_mounted_read_only_where_it_is_mounted(compose):
    mounted = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, mode = _mount(volume)
            if target == "/data":
                assert mode == "ro", f"{name}: {volume} must end in :ro"
                assert source.startswith("${DATA:-") and source.endswith("shared/data/cxr3}"), volume
                mounted.append(name)
    # Executors decode the images (workers); the driver lists them (submit).
    assert set(mounted) >= {"spark-worker-1", "spark-worker-2", "submit"}


def test_submit_uses_the_masters_service_name_and_port(compose):
    services = compose["services"]
    master = _command(services["spark-master"])
    submit = _command(services["submit"])
    url = _option(submit, "--master")
    match = re.fullmatch(r"spark://([\w.-]+):(\d+)", url)
    assert match, url
    host, port = match.groups()
    assert host in services and "org.apache.spark.deploy.master.Master" in _command(services[host])
    assert _option(master, "--port") == port and _option(master, "--host") == host
    for name in ("spark-worker-1", "spark-worker-2"):
        assert url in _command(services[name]), f"{name} does not join {url}"
    assert submit[0] == "spark-submit"
    properties = _option(submit, "--properties-file")
    assert os.path.isfile(os.path.join(REPO, properties)), properties
    assert "jobs/pipeline.py" in submit and os.path.isfile(os.path.join(REPO, "jobs", "pipeline.py"))
    assert _option(submit, "--input") == "/data"
    assert _option(submit, "--run-dir").startswith("/runs/")
    runs = [_mount(v)[0] for v in services["submit"]["volumes"] if _mount(v)[1] == "/runs"]
    assert runs and runs[0] in compose.get("volumes", {}), runs


def test_dockerfile_installs_requirements_txt_itself():
    steps = dockerfile_instructions()
    copies = [args for word, args in steps if word == "COPY"]
    assert any(args.split()[0] == "requirements.txt" for args in copies), copies
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert re.search(r"pip install (?:[^&;]* )?-r requirements\.txt", runs), "no pip install -r requirements.txt"
    # Any version written into the Dockerfile itself must be the one requirements.txt pins.
    pins = requirement_pins()
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.${}]+)", runs):
        if name.lower() == "horovod":
            continue
        assert name.lower() in pins and pins[name.lower()] == version, f"{name}=={version} vs requirements.txt"


def test_dockerfile_builds_horovod_like_setup_env():
    setup_env = _read("scripts", "setup_env.sh")
    dockerfile = _read("docker", "Dockerfile")
    (wanted,) = re.findall(r"^HOROVOD_VERSION=(\S+)$", setup_env, flags=re.M)
    assert re.findall(r"^ARG HOROVOD_VERSION=(\S+)$", dockerfile, flags=re.M) == [wanted]
    assert '"horovod==${HOROVOD_VERSION}"' in dockerfile
    assert horovod_flags(dockerfile) == horovod_flags(setup_env)
    assert {"HOROVOD_WITH_TENSORFLOW", "HOROVOD_WITH_GLOO"} <= horovod_flags(dockerfile)
    assert "--no-build-isolation" in dockerfile


def test_dockerfile_uses_python_311_and_java_17():
    steps = dockerfile_instructions()
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases and all(base == "python:3.11-slim-bookworm" for base in bases), bases
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "openjdk-17-jre-headless" in runs
    assert not re.search(r"openjdk-(?!17)\d+", runs)


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignore = [line.strip() for line in _read("docker", "Dockerfile.dockerignore").splitlines()
              if line.strip() and not line.startswith("#")]
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [args.split()[0] for word, args in dockerfile_instructions()
               if word == "COPY" and not args.startswith("--from")]
    for source in sources:
        assert source.rstrip("/") in kept, f"COPY {source} but the .dockerignore excludes it"
        assert os.path.exists(os.path.join(REPO, source)), source


@pytest.mark.parametrize("profile", ["spark-standalone.conf", "spark-docker.conf"])
def test_spark_profiles_agree_with_the_local_one(profile):
    def settings(name):
        pairs = {}
        for line in _read("conf", name).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.strip().partition(" ")
                pairs[key] = value.strip()
        return pairs

    local, other = settings("spark-local.conf"), settings(profile)
    for conf in (local, other):
        assert "spark.master" not in conf, "never set spark.master in a profile: it overrides --master"
    for key in ("spark.driver.memory", "spark.driver.extraJavaOptions", "spark.task.maxFailures",
                "spark.sql.execution.arrow.pyspark.enabled", "spark.ui.showConsoleProgress"):
        assert other.get(key) == local[key], f"{profile}: {key} is {other.get(key)!r}, spark-local.conf has {local[key]!r}"
