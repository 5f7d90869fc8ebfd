"""docker/: the image and the compose cluster agree with both stacks and with each other.

No Docker engine is needed here (scripts/test_docker.sh, `make test-docker`, builds and runs them): the
compose file is read with yaml.safe_load, the Dockerfile with tests/structure.py's instruction parser, the
shell in its RUN lines, docker/install_horovod.sh and scripts/setup_env.sh as simple commands.
"""
from __future__ import annotations

import graphlib
import importlib.metadata
import os
import posixpath
import re
import shutil
import subprocess
import sys
from string import Template
from urllib.parse import urlsplit

import pytest
import yaml

from jobs.pipeline import parse_args
from tests.structure import (Command, Instruction, Stage, dockerfile_stages, interpolate, compose_variables,
                             parse_dockerfile, parse_spark_submit, shell_commands, shell_script_commands)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(REPO, "docker")
SHARED_CXR3 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cxr3"))   # as in conftest.py
MASTER, WORKERS, SUBMIT = "spark-master", ("spark-worker-1", "spark-worker-2"), "submit"
MASTER_CLASS, WORKER_CLASS = "org.apache.spark.deploy.master.Master", "org.apache.spark.deploy.worker.Worker"
# The build args of each stack, as the Dockerfile's header and scripts/test_docker.sh give them.
STACK_ARGS = {"pinned": {}, "current": {"BASE": "python:3.12-slim-bookworm", "REQUIREMENTS": "requirements-current.txt",
                                        "HOROVOD_VERSION": ""}}


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
def instructions() -> list[Instruction]:
    return parse_dockerfile(_read("docker", "Dockerfile"))


@pytest.fixture(scope="module")
def stages(instructions) -> list[Stage]:
    parsed = dockerfile_stages(instructions)
    assert len(parsed) == 2, [stage.base for stage in parsed]
    return parsed


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Every ARG's default, the global ones (before the first FROM) and the stages' alike."""
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            defaults.update(ins.pairs())
    return defaults


def base_image(stage: Stage, args: dict[str, str]) -> str:
    return Template(stage.base).substitute(args)


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


def copies(stage: Stage, args: dict[str, str] | None = None) -> list[tuple[int, dict, list[str], str]]:
    """(index, flags, sources with build args substituted, destination resolved against WORKDIR) of each COPY."""
    result = []
    for ins in stage.of("COPY"):
        flags, words = ins.flags_and_words()
        destination = posixpath.normpath(posixpath.join(stage.workdir(before=ins), words[-1]))
        sources = [Template(word).substitute(args) if args is not None else word for word in words[:-1]]
        result.append((stage.instructions.index(ins), flags, sources, destination))
    return result


def image_path(stage: Stage, path: str, args: dict[str, str] | None = None) -> str | None:
    """The repository file that a path in the image (absolute, or relative to the final WORKDIR)
    comes from, through the stage's COPYs from the build context; None when no COPY puts it there."""
    target = posixpath.normpath(posixpath.join(stage.workdir(), path))
    for _, flags, sources, destination in copies(stage, args):
        for source in sources if "from" not in flags else ():
            if os.path.isdir(os.path.join(REPO, source)):          # a folder's contents go into the destination
                if target.startswith(destination + "/"):
                    return os.path.join(REPO, source, posixpath.relpath(target, destination))
            elif target in (destination, posixpath.join(destination, posixpath.basename(source))):
                return os.path.join(REPO, source)
    return None


def horovod_script() -> list[Command]:
    return shell_script_commands(_read("docker", "install_horovod.sh"))


def horovod_runs(stage: Stage) -> list[tuple[int, Command]]:
    return [(i, c) for i, c in run_commands(stage) if c.argv[:2] == ["bash", "/tmp/horovod/install_horovod.sh"]]


def test_both_stages_from_the_base_arg_and_no_compilers_in_the_runtime(instructions, stages):
    build, runtime = stages
    args = arg_defaults(instructions)
    assert build.base == runtime.base == "${BASE}", "one base image, chosen by the BASE build arg"
    assert instructions[0].keyword == "ARG" and "BASE" in instructions[0].pairs(), "BASE is a global ARG"
    assert base_image(build, args) == "python:3.11-slim-bookworm", "the default is the pinned stack's Python"
    assert base_image(build, STACK_ARGS["current"]).startswith("python:3.12-")
    assert build.name == "build" and runtime.name is None
    for _, flags, _, _ in copies(runtime):
        if "from" in flags:
            assert flags["from"] == build.name, "COPY --from names the build stage"
    # Compilers are installed only by the Horovod script, only when it compiles, only in the build stage.
    script_packages = {word for c in horovod_script() if c.argv[:2] == ["apt-get", "install"]
                       for word in c.argv[2:] if not word.startswith("-")}
    assert {"g++", "make", "cmake"} <= script_packages
    assert horovod_runs(build) and not horovod_runs(runtime)
    for stage in stages:
        assert not {"g++", "gcc", "make", "cmake"} & set(apt_packages(stage)), "compilers only when Horovod compiles"
    # SPARK_HOME is a link the build stage makes to the venv's pyspark, whichever Python the base has.
    links = [c.argv for _, c in run_commands(build) if c.argv[:2] == ["ln", "-s"]]
    assert links and links[0][-1] == runtime.env()["SPARK_HOME"] == "/opt/venv/spark"
    assert "import os, pyspark" in links[0][2]


def test_runtime_has_java_17_only(stages):
    packages = apt_packages(stages[1])
    assert "openjdk-17-jre-headless" in packages
    assert [p for p in packages if p.startswith("openjdk-")] == ["openjdk-17-jre-headless"], packages


def test_extra_ca_certificates_reach_the_build_stage_only(stages):
    build, runtime = stages
    (certs,) = [(i, dest) for i, _, sources, dest in copies(build) if sources == ["docker/certs/"]]
    assert certs[1] == "/usr/local/share/ca-certificates"
    updates = [i for i, c in run_commands(build) if c.argv == ["update-ca-certificates"]]
    assert updates and updates[0] > certs[0]
    assert build.env()["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    assert not [s for _, _, s, _ in copies(runtime) if "docker/certs/" in s]


@pytest.mark.parametrize("stack, requirements", [("pinned", "requirements.txt"), ("current", "requirements-current.txt")])
def test_requirements_are_installed_before_the_code_is_copied(instructions, stages, stack, requirements):
    build = stages[0]
    args = {**arg_defaults(instructions), **STACK_ARGS[stack]}
    (copied,) = [i for i, _, sources, _ in copies(build, args) if sources == [requirements]]
    installs = [(i, c) for i, c in pip_installs(build) if c.argv[1] == "install" and "-r" in c.argv]
    assert len(installs) == 1, "one pip install -r of the stack's requirements"
    index, command = installs[0]
    # The file pip reads, from the WORKDIR the RUN runs in, is the stack's requirements file COPY'd there.
    read = command.argv[command.argv.index("-r") + 1]
    in_image = posixpath.join(build.workdir(before=build.instructions[index]), read)
    assert image_path(build, in_image, args) == os.path.join(REPO, requirements)
    code = [i for i, _, sources, _ in copies(build) if {"covid_spark", "setup.py"} & set(sources)]
    assert copied < index < min(code), "requirements are installed before the code is copied (a code change keeps that layer)"
    # The package is installed from a wheel built after the code is copied.
    wheel = [i for i, c in pip_installs(build) if c.argv[1] == "wheel" and "." in c.argv]
    assert wheel and min(wheel) > max(code)


def test_a_code_change_leaves_the_venv_layers_to_the_cache(stages):
    """The build stage installs nothing into /opt/venv once the code is copied; the runtime stage copies the
    venv, then the wheel, and installs the wheel: a code change rebuilds only the small layers after."""
    build, runtime = stages
    code = min(i for i, _, sources, _ in copies(build) if {"covid_spark", "setup.py"} & set(sources))
    assert not [c for i, c in pip_installs(build) if i > code and c.argv[1] == "install"]
    from_build = [(i, sources, dest) for i, flags, sources, dest in copies(runtime) if flags.get("from") == "build"]
    (venv_at,) = [i for i, sources, dest in from_build if sources == ["/opt/venv"]]
    (wheel_at, wheel_dir) = [(i, dest) for i, sources, dest in from_build if sources == ["/dist"]][0]
    installs = [(i, c) for i, c in pip_installs(runtime) if c.argv[1] == "install"]
    assert len(installs) == 1 and venv_at < wheel_at < installs[0][0]
    assert [a for a in installs[0][1].argv if a.endswith(".whl")] == [f"{wheel_dir}/covid_spark-*.whl"]


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
    setup = shell_script_commands(_read("scripts", "setup_env.sh"))
    (setup_version,) = [c.env["HOROVOD_VERSION"] for c in setup if "HOROVOD_VERSION" in c.env and not c.argv]
    (setup_build,) = [c for c in setup if "horovod==$HOROVOD_VERSION" in c.argv]
    args = {}
    for ins in build.of("ARG"):
        args.update(ins.pairs())
    assert args["HOROVOD_VERSION"] == setup_version
    (run,) = horovod_runs(build)
    index, command = run
    assert command.argv[2:] == ["${HOROVOD_VERSION}", "/tmp/horovod"]
    declared = build.instructions.index(next(ins for ins in build.of("ARG") if "HOROVOD_VERSION" in ins.pairs()))
    assert declared < index, "the ARG is declared before the RUN that uses it"
    # The script and the cached wheels are COPY'd to the folder it is given, before it runs.
    (copied,) = [(i, sources, dest) for i, _, sources, dest in copies(build) if "docker/install_horovod.sh" in sources]
    assert copied[0] < index and copied[2] == "/tmp/horovod" and "docker/wheels/" in copied[1]
    # In the script: the same HOROVOD_WITH*/WITHOUT* flags and pip flags as setup_env.sh, then the check.
    script = horovod_script()
    (compile_,) = [c for c in script if "horovod==$HOROVOD_VERSION" in c.argv]
    assert compile_.env == setup_build.env
    assert {"HOROVOD_WITH_TENSORFLOW", "HOROVOD_WITH_GLOO"} <= {k for k, v in compile_.env.items() if v == "1"}
    assert {"--no-build-isolation", "--no-deps"} <= set(compile_.argv) & set(setup_build.argv)
    assert script[0].argv == ["set", "-euo", "pipefail"], "the build fails when a step of the script fails"
    checks = [c for c in script if c.argv[:2] == ["horovodrun", "--check-build"]]
    assert checks and script.index(checks[0]) > script.index(compile_), "checked after it is installed"
    requirements = [i for i, c in pip_installs(build) if "-r" in c.argv]
    assert requirements and max(requirements) < index, "Horovod is built against the TensorFlow already installed"


def test_horovod_script_installs_nothing_for_an_empty_version(tmp_path):
    """The current stack's build arg HOROVOD_VERSION= : the script says so and succeeds, touching nothing."""
    done = subprocess.run([shutil.which("bash"), os.path.join(DOCKER, "install_horovod.sh"), "", str(tmp_path)],
                          capture_output=True, text=True, timeout=30, env={"PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "horovod: not installed (HOROVOD_VERSION is empty)"


def test_runtime_environment_is_the_venv_the_spark_profile_names(stages):
    build, runtime = stages
    venvs = [c.argv[-1] for _, c in run_commands(build) if c.argv[1:3] == ["-m", "venv"]]
    assert venvs == ["/opt/venv"]
    assert ("/opt/venv", ["/opt/venv"]) in [(dest, sources) for _, flags, sources, dest in copies(runtime) if flags.get("from")]
    env = runtime.env()
    assert env["PATH"].split(":")[0] == "/opt/venv/bin" == build.env()["PATH"].split(":")[0]
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
    commands = [cmd.exec_form] + [service["command"] for service in compose["services"].values()]
    # The submit command runs spark-submit under docker/run_as_runs_owner.sh, COPY'd onto the PATH.
    wrapper = "run_as_runs_owner.sh"
    assert image_path(runtime, posixpath.join("/usr/local/bin", wrapper)) == os.path.join(DOCKER, wrapper)
    programs = {command[1] if command[0] == wrapper else command[0] for command in commands}
    assert programs <= scripts, programs - scripts


def test_exposed_ports_are_the_ones_the_cluster_listens_on(stages, compose):
    exposed = {int(port.split("/")[0]) for ins in stages[1].of("EXPOSE") for port in ins.args.split()}
    services = compose["services"]
    master = services[MASTER]["command"]
    listening = {int(_option(master, "--port")), int(_option(master, "--webui-port"))}
    listening |= {int(_option(services[name]["command"], "--webui-port")) for name in WORKERS}
    assert listening <= exposed, listening - exposed


@pytest.mark.parametrize("stack", sorted(STACK_ARGS))
def test_dockerignore_keeps_what_the_dockerfile_copies(instructions, stages, stack):
    # At the context's root, where the classic builder reads it too (BuildKit's Dockerfile.dockerignore is not).
    ignore = [line.strip() for line in _read(".dockerignore").splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "everything is excluded, then the needed paths are let back in"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    args = {**arg_defaults(instructions), **STACK_ARGS[stack]}
    for stage in stages:
        for _, flags, sources, _ in copies(stage, args):
            if "from" not in flags:
                for source in sources:
                    assert source.rstrip("/") in kept, f"COPY {source} but the .dockerignore excludes it"
                    assert os.path.exists(os.path.join(REPO, source)), source
    # The build-context folders exist in a clone; what is put in them is never committed.
    gitignore = _read(".gitignore").splitlines()
    assert {"docker/wheels/*.whl", "docker/certs/*.crt"} <= set(gitignore)


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
    assert _depends_on(services[SUBMIT]) == {name: "service_healthy" for name in WORKERS}
    # service_healthy needs a healthcheck: each one polls the web UI on the port it serves it on, with the
    # image's python (the image has no curl).
    for name in (MASTER, *WORKERS):
        check = services[name]["healthcheck"]["test"]
        assert isinstance(check, list) and check[:3] == ["CMD", "python", "-c"], check
        (url,) = re.findall(r"'(http://[^']+)'", check[3])
        assert urlsplit(url).hostname == "localhost"
        assert urlsplit(url).port == int(_option(services[name]["command"], "--webui-port"))
        compile(check[3], f"{name} healthcheck", "exec")


def test_healthcheck_fails_where_nothing_answers_and_passes_where_the_ui_does():
    """The master's check, run here against a port where nothing listens and against a served /json/."""
    import http.server
    import socket
    import threading
    with open(os.path.join(DOCKER, "docker-compose.yml"), encoding="utf-8") as handle:
        check = yaml.safe_load(handle)["services"][MASTER]["healthcheck"]["test"][3]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def run(port: int) -> int:
            code = check.replace("localhost:8080/json/", f"127.0.0.1:{port}/")
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode
        assert run(closed) != 0
        assert run(server.server_address[1]) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_published_ports_are_the_masters_web_ui_on_loopback_only(compose):
    services = compose["services"]
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = interpolate(port, {}).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} must not listen on every interface"
            published[name] = int(container_port)
    assert published == {MASTER: int(_option(services[MASTER]["command"], "--webui-port"))}


def test_every_variable_has_a_default(compose):
    variables = {(name, operator, default) for text in _strings(compose) for name, operator, default in compose_variables(text)}
    assert {name for name, _, _ in variables} == {"IMAGE", "DATA", "RUNS", "RUN_ID", "WEBUI_PORT"}
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
    # Executors write the dataset and Horovod rank 0 the checkpoints: one host folder (bind mount) for all,
    # by default the repository's runs/ (as `make demo`'s); RUNS=... replaces it.
    assert {os.path.normpath(os.path.join(DOCKER, source)) for source in runs.values()} == {os.path.join(REPO, "runs")}
    assert {_mount(volume, {"RUNS": "/srv/runs"})[0] for name in runs for volume in services[name]["volumes"]
            if _mount(volume)[1] == "/runs"} == {"/srv/runs"}
    assert "volumes" not in compose, "no named volume: nothing is left behind by `down`"


def test_submit_runs_the_pipeline_on_the_compose_cluster(compose, stages):
    services = compose["services"]
    master = services[MASTER]["command"]
    wrapper, *spark_submit = services[SUBMIT]["command"]
    assert wrapper == "run_as_runs_owner.sh", "what the run writes is handed to the runs folder's owner"
    submit = parse_spark_submit(spark_submit)
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


def test_the_docker_test_submits_what_the_compose_file_does(compose):
    """scripts/test_docker.sh runs the submit service with the compose file's command, shortened to a few
    epochs: the same master, properties, driver host, job and config."""
    script = shell_script_commands(_read("scripts", "test_docker.sh"))
    runs = [c.argv[c.argv.index("compose"):] for c in script if "compose" in c.argv]   # `if ! compose run ...`
    (run,) = [argv for argv in runs if argv[:2] == ["compose", "run"] and SUBMIT in argv]
    options, service, wrapper = run[2:run.index(SUBMIT)], SUBMIT, run[run.index(SUBMIT) + 1]
    assert "--use-aliases" in options, "the executors reach the driver by the service's name"
    assert "--rm" in options and "-T" in options
    assert wrapper == compose["services"][service]["command"][0] == "run_as_runs_owner.sh"
    tested = parse_spark_submit(run[run.index(SUBMIT) + 2:])
    composed = parse_spark_submit(compose["services"][SUBMIT]["command"][1:])
    assert (tested.options, tested.conf, tested.application) == (composed.options, composed.conf, composed.application)
    tested_args = parse_args([word.replace("$EPOCHS", "2") for word in tested.app_args])   # the script's variables
    composed_args = parse_args(composed.app_args)
    assert tested_args.epochs is not None and composed_args.epochs is None
    assert (tested_args.input, tested_args.config) == (composed_args.input, composed_args.config)
    assert tested_args.set == ["train.batch_size=$BATCH_SIZE"], "only the batch size is changed besides the epochs"
