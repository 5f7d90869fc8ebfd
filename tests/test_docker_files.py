"""docker/: the image and the compose cluster agree with the pinned stack and with each other.

No Docker engine is needed (none was available where these were written): the compose file is
read with yaml.safe_load, the Dockerfile with tests/structure.py's instruction parser, the shell
in its RUN lines and in scripts/setup_env.sh as simple commands.
"""
from __future__ import annotations

import graphlib
import importlib.metadata
import os
import posixpath
from urllib.parse import urlsplit

import pytest
import yaml

from jobs.pipeline import parse_args
from tests.structure import (Command, Stage, dockerfile_stages, interpolate, compose_variables, parse_dockerfile,
                             parse_spark_submit, shell_commands, shell_script_commands)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(REPO, "docker")
SHARED_CXR3 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cxr3"))   # as in conftest.py
MASTER, WORKERS, SUBMIT = "spark-master", ("spark-worker-1", "spark-worker-2"), "submit"
MASTER_CLASS, WORKER_CLASS = "org.apache.spark.deploy.master.Master", "org.apache.spark.deploy.worker.Worker"


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as handle:
        return handle.read()


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in _read("requirements.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt line {line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


def spark_profile(name: str) -> dict[str, str]:
    pairs = {}
    for line in _read("conf", name).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            pairs[key] = value.strip()
    return pairs


# --- the Dockerfile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    parsed = dockerfile_stages(parse_dockerfile(_read("docker", "Dockerfile")))
    assert len(parsed) == 2, [stage.base for stage in parsed]
    return parsed


def run_commands(stage: Stage) -> list[tuple[int, Command]]:
    """(index of the RUN in the stage, command) for every simple command of the stage's RUNs."""
    return [(stage.instructions.index(ins), command) for ins in stage.of("RUN") for command in shell_commands(ins.args)]


def pip_installs(stage: Stage) -> list[tuple[int, Command]]:
    return [(i, c) for i, c in run_commands(stage) if c.argv[:1] == ["pip"] and c.argv[1:2] in (["install"], ["wheel"])]


def apt_packages(stage: Stage) -> list[str]:
    packages = []
    for _, command in run_commands(stage):
        if command.argv[:2] == ["apt-get", "install"]:
            packages += [word for word in command.argv[2:] if not word.startswith("-")]
    return packages


def copies(stage: Stage) -> list[tuple[int, dict, list[str], str]]:
    """(index, flags, sources, destination resolved against WORKDIR) of each COPY of the stage."""
    result = []
    for ins in stage.of("COPY"):
        flags, words = ins.flags_and_words()
        destination = posixpath.normpath(posixpath.join(stage.workdir(before=ins), words[-1]))
        result.append((stage.instructions.index(ins), flags, words[:-1], destination))
    return result


def image_path(stage: Stage, path: str) -> str | None:
    """The repository file that a path in the image (absolute, or relative to the final WORKDIR)
    comes from, through the stage's COPYs from the build context; None when no COPY puts it there."""
    target = posixpath.normpath(posixpath.join(stage.workdir(), path))
    for _, flags, sources, destination in copies(stage):
        for source in sources if "from" not in flags else ():
            if os.path.isdir(os.path.join(REPO, source)):          # a folder's contents go into the destination
                if target.startswith(destination + "/"):
                    return os.path.join(REPO, source, posixpath.relpath(target, destination))
            elif target in (destination, posixpath.join(destination, posixpath.basename(source))):
                return os.path.join(REPO, source)
    return None


def test_two_stages_from_python_311_and_no_compilers_in_the_runtime(stages):
    build, runtime = stages
    assert build.base == runtime.base == "python:3.11-slim-bookworm"
    assert build.name == "build" and runtime.name is None
    for _, flags, _, _ in copies(runtime):
        if "from" in flags:
            assert flags["from"] == build.name, "COPY --from names the build stage"
    assert {"g++", "make", "cmake"} <= set(apt_packages(build))
    assert not {"g++", "gcc", "make", "cmake"} & set(apt_packages(runtime)), "compilers live in the build stage only"
    # The venv's site-packages path in SPARK_HOME is the base image's Python.
    python = "python" + build.base.split(":")[1].split("-")[0]
    assert runtime.env()["SPARK_HOME"] == f"/opt/venv/lib/{python}/site-packages/pyspark"


def test_runtime_has_java_17_only_and_curl_for_the_healthcheck(stages):
    packages = apt_packages(stages[1])
    assert "openjdk-17-jre-headless" in packages
    assert [p for p in packages if p.startswith("openjdk-")] == ["openjdk-17-jre-headless"], packages
    assert "curl" in packages


def test_requirements_are_installed_before_the_code_is_copied(stages):
    build = stages[0]
    (copied,) = [i for i, _, sources, _ in copies(build) if sources == ["requirements.txt"]]
    installs = [(i, c) for i, c in pip_installs(build) if c.argv[1] == "install" and "-r" in c.argv]
    assert len(installs) == 1, "one pip install -r requirements.txt"
    index, command = installs[0]
    # The file pip reads, from the WORKDIR the RUN runs in, is the requirements.txt COPY'd there.
    read = command.argv[command.argv.index("-r") + 1]
    in_image = posixpath.join(build.workdir(before=build.instructions[index]), read)
    assert image_path(build, in_image) == os.path.join(REPO, "requirements.txt")
    code = [i for i, _, sources, _ in copies(build) if {"covid_spark", "setup.py"} & set(sources)]
    assert copied < index < min(code), "requirements are installed before the code is copied (a code change keeps that layer)"
    # The package is installed from a wheel built after the code is copied.
    wheel = [i for i, c in pip_installs(build) if c.argv[1] == "wheel" and "." in c.argv]
    assert wheel and min(wheel) > max(code)


def test_versions_written_in_the_dockerfile_are_the_pinned_ones(stages):
    pins = requirement_pins()
    for stage in stages:
        for _, command in pip_installs(stage):
            for word in command.argv:
                name, sep, version = word.partition("==")
                if sep and name.lower() != "horovod":   # Horovod is pinned by setup_env.sh (next test)
                    assert pins.get(name.lower()) == version, f"{word} vs requirements.txt"


def test_horovod_is_built_like_setup_env_after_tensorflow(stages):
    build = stages[0]
    script = shell_script_commands(_read("scripts", "setup_env.sh"))
    (script_version,) = [c.env["HOROVOD_VERSION"] for c in script if "HOROVOD_VERSION" in c.env and not c.argv]
    (script_build,) = [c for c in script if "horovod==$HOROVOD_VERSION" in c.argv]
    args = {}
    for ins in build.of("ARG"):
        args.update(ins.pairs())
    assert args["HOROVOD_VERSION"] == script_version
    horovod = [(i, c) for i, c in pip_installs(build) if "horovod==${HOROVOD_VERSION}" in c.argv]
    assert len(horovod) == 1, "one pip install of horovod==${HOROVOD_VERSION}"
    index, command = horovod[0]
    declared = build.instructions.index(build.of("ARG")[0])
    assert declared < index, "the ARG is declared before the RUN that uses it"
    # Same HOROVOD_WITH*/WITHOUT* flags in the command's environment, the same pip flags.
    assert command.env == script_build.env
    assert {"HOROVOD_WITH_TENSORFLOW", "HOROVOD_WITH_GLOO"} <= {k for k, v in command.env.items() if v == "1"}
    assert {"--no-build-isolation", "--no-deps"} <= set(command.argv) & set(script_build.argv)
    requirements = [i for i, c in pip_installs(build) if "-r" in c.argv]
    assert requirements and max(requirements) < index, "Horovod is compiled against the TensorFlow already installed"
    checks = [c for i, c in run_commands(build) if i == index and c.argv[:2] == ["horovodrun", "--check-build"]]
    assert checks and checks[0].after == "&&", "the build fails when Horovod lacks TensorFlow or Gloo"


def test_runtime_environment_is_the_venv_the_spark_profile_names(stages):
    build, runtime = stages
    venvs = [c.argv[-1] for _, c in run_commands(build) if c.argv[1:3] == ["-m", "venv"]]
    assert venvs == ["/opt/venv"]
    assert ("/opt/venv", ["/opt/venv"]) in [(dest, sources) for _, flags, sources, dest in copies(runtime) if flags.get("from")]
    env = runtime.env()
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == "/opt/venv/bin/python"
    profile = spark_profile("spark-docker.conf")
    assert profile["spark.pyspark.python"] == profile["spark.pyspark.driver.python"] == env["PYSPARK_PYTHON"]


def test_cmd_is_an_exec_form_array_and_there_is_no_entrypoint(stages, compose):
    runtime = stages[1]
    assert not runtime.of("ENTRYPOINT"), "compose commands run as written (spark-class, spark-submit)"
    (cmd,) = runtime.of("CMD")
    assert cmd.exec_form == ["spark-submit", "--version"]
    # Every program a container starts is a script the pinned pyspark puts in the venv's bin/.
    scripts = {str(f).rsplit("/", 1)[1] for f in importlib.metadata.files("pyspark") if str(f).startswith("../../../bin/")}
    programs = {cmd.exec_form[0]} | {service["command"][0] for service in compose["services"].values()}
    assert programs <= scripts, programs - scripts


def test_exposed_ports_are_the_ones_the_cluster_listens_on(stages, compose):
    exposed = {int(port.split("/")[0]) for ins in stages[1].of("EXPOSE") for port in ins.args.split()}
    services = compose["services"]
    master = services[MASTER]["command"]
    listening = {int(_option(master, "--port")), int(_option(master, "--webui-port"))}
    listening |= {int(_option(services[name]["command"], "--webui-port")) for name in WORKERS}
    assert listening <= exposed, listening - exposed


def test_dockerignore_keeps_what_the_dockerfile_copies(stages):
    ignore = [line.strip() for line in _read("docker", "Dockerfile.dockerignore").splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "everything is excluded, then the needed paths are let back in"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in stages:
        for _, flags, sources, _ in copies(stage):
            if "from" not in flags:
                for source in sources:
                    assert source.rstrip("/") in kept, f"COPY {source} but the .dockerignore excludes it"
                    assert os.path.exists(os.path.join(REPO, source)), source


# --- the compose file ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(DOCKER, "docker-compose.yml"), encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _mount(volume: str, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume, after compose's interpolation."""
    parts = interpolate(volume, env or {}).split(":")
    assert len(parts) in (2, 3), f"cannot parse volume {volume!r}"
    return parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"


def _depends_on(service: dict) -> dict[str, str]:
    """depends_on as name → condition, from the list or the mapping form."""
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: spec.get("condition", "service_started") for name, spec in value.items()}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_compose_defines_the_cluster_services_from_one_image(compose):
    services = compose["services"]
    assert set(services) == {MASTER, *WORKERS, SUBMIT}
    for name, service in services.items():
        assert service["image"] == services[MASTER]["image"]
        build = service["build"]
        dockerfile = os.path.normpath(os.path.join(DOCKER, build["context"], build["dockerfile"]))
        assert dockerfile == os.path.join(DOCKER, "Dockerfile")
        assert os.path.normpath(os.path.join(DOCKER, build["context"])) == REPO, "the .dockerignore expects the repo root"
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(word, str) for word in command), \
            f"{name}: the command is an exec-form list, not a shell string"
        assert service.get("hostname", name) == name
    assert services[MASTER]["command"][:2] == ["spark-class", MASTER_CLASS]
    assert _option(services[MASTER]["command"], "--host") == MASTER
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:2] == ["spark-class", WORKER_CLASS]
        assert _option(command, "--host") == name, "the master reaches a worker by its service name"


def test_services_start_in_dependency_order_after_a_healthy_master(compose):
    services = compose["services"]
    graph = {name: set(_depends_on(service)) for name, service in services.items()}
    for name, needs in graph.items():
        assert needs <= set(services), f"{name} depends on unknown {needs - set(services)}"
    order = list(graphlib.TopologicalSorter(graph).static_order())   # raises CycleError on a cycle
    assert order[0] == MASTER and order[-1] == SUBMIT, order
    for name in WORKERS:
        assert _depends_on(services[name]) == {MASTER: "service_healthy"}
    assert set(_depends_on(services[SUBMIT])) == set(WORKERS)
    # service_healthy needs a healthcheck: the master's web UI, on the port it serves it on.
    check = services[MASTER]["healthcheck"]["test"]
    assert isinstance(check, list) and check[:2] == ["CMD", "curl"]
    url = urlsplit(check[-1])
    assert url.hostname == "localhost" and url.port == int(_option(services[MASTER]["command"], "--webui-port"))


def test_published_ports_are_the_masters_web_ui_on_loopback_only(compose):
    services = compose["services"]
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} must not listen on every interface"
            published[name] = int(container_port)
    assert published == {MASTER: int(_option(services[MASTER]["command"], "--webui-port"))}


def test_every_variable_has_a_default(compose):
    variables = {(name, operator, default) for text in _strings(compose) for name, operator, default in compose_variables(text)}
    assert {name for name, _, _ in variables} == {"DATA", "RUN_ID"}
    assert all(operator == ":-" and default for _, operator, default in variables), variables


def test_data_is_mounted_read_only_and_runs_shared_where_spark_runs(compose):
    services = compose["services"]
    data, runs = {}, {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, mode = _mount(volume)
            if target == "/data":
                assert mode == "ro", f"{name}: {volume} must be read-only"
                data[name] = source
            elif target == "/runs":
                assert mode == "rw"
                runs[name] = source
    # Executors decode the images (workers); the driver lists them (submit).
    assert set(data) == set(runs) == {*WORKERS, SUBMIT}
    # By default the same X-rays the tests read; DATA=... replaces them everywhere.
    assert {os.path.normpath(os.path.join(DOCKER, source)) for source in data.values()} == {SHARED_CXR3}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if _mount(volume)[1] == "/data":
                assert _mount(volume, {"DATA": "/srv/xrays"})[0] == "/srv/xrays"
    # Executors write the dataset and Horovod rank 0 the checkpoints: one named volume for all.
    assert set(runs.values()) == {"runs"} and "runs" in compose["volumes"]


def test_submit_runs_the_pipeline_on_the_compose_cluster(compose, stages):
    services = compose["services"]
    master = services[MASTER]["command"]
    submit = parse_spark_submit(services[SUBMIT]["command"])
    url = urlsplit(submit.options["--master"])
    assert (url.scheme, url.hostname, url.port) == ("spark", MASTER, int(_option(master, "--port")))
    for name in WORKERS:
        assert services[name]["command"][2] == submit.options["--master"], f"{name} joins another master"
    assert "--deploy-mode" not in submit.options, "client mode: the driver runs in the submit container"
    assert submit.conf["spark.driver.host"] == services[SUBMIT]["hostname"], "executors connect back by name"
    # The files it names are in the image (COPY'd to the WORKDIR) and in the repository.
    runtime = stages[1]
    for path in (submit.options["--properties-file"], submit.application, _option(submit.app_args, "--config")):
        source = image_path(runtime, path)
        assert source is not None, f"{path} is not copied into the image"
        assert os.path.isfile(source), source
    assert submit.options["--properties-file"] == "conf/spark-docker.conf"
    assert submit.application == "jobs/pipeline.py"
    # The job accepts its arguments, as compose interpolates them.
    args = parse_args([interpolate(word, {}) for word in submit.app_args])
    assert args.input == ["/data"]
    assert args.run_dir == "/runs/compose-demo"
    assert parse_args([interpolate(word, {"RUN_ID": "nightly-1"}) for word in submit.app_args]).run_dir == "/runs/nightly-1"


def _bytes(size: str) -> int:
    units = {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
    size = size.strip().lower().rstrip("b")
    return int(float(size[:-1]) * units[size[-1]]) if size[-1] in units else int(size)


def test_an_executor_fits_in_a_worker(compose):
    profile = spark_profile("spark-docker.conf")
    for name in WORKERS:
        command = compose["services"][name]["command"]
        assert int(profile["spark.executor.cores"]) <= int(_option(command, "--cores"))
        assert _bytes(profile["spark.executor.memory"]) <= _bytes(_option(command, "--memory")), \
            f"{name}: an executor of {profile['spark.executor.memory']} never starts on {_option(command, '--memory')}"
        assert int(profile["spark.task.cpus"]) <= int(profile["spark.executor.cores"])


@pytest.mark.parametrize("profile", ["spark-standalone.conf", "spark-docker.conf"])
def test_spark_profiles_agree_with_the_local_one(profile):
    local, other = spark_profile("spark-local.conf"), spark_profile(profile)
    for conf in (local, other):
        assert "spark.master" not in conf, "never set spark.master in a profile: it overrides --master"
    for key in ("spark.driver.memory", "spark.driver.extraJavaOptions", "spark.task.maxFailures",
                "spark.sql.execution.arrow.pyspark.enabled", "spark.ui.showConsoleProgress"):
        assert other.get(key) == local[key], f"{profile}: {key} is {other.get(key)!r}, spark-local.conf has {local[key]!r}"
