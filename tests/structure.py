"""Small parsers for the tests of docker/ and examples/: a Dockerfile as instructions, a shell line as
simple commands, a spark-submit command line as options, application and arguments, a compose
string as interpolated. Enough of each format for the files in this repository, no more; none of
them is part of the library.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from string import Template

# --- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str           # upper case: FROM, RUN, COPY, ...
    args: str              # the rest of the instruction, continuation lines joined
    line: int              # 1-based line of the keyword in the Dockerfile

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of RUN/CMD/ENTRYPOINT/... in exec form; None for the shell form."""
        if self.args.startswith("["):
            try:
                value = json.loads(self.args)
            except json.JSONDecodeError:
                return None
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return value
        return None

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """Leading ``--name=value`` flags (COPY --from=build) and the remaining words."""
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words

    def pairs(self) -> dict[str, str]:
        """ENV / ARG / LABEL as key → value (``ENV KEY value`` legacy form too; ARG without default → '')."""
        words = shlex.split(self.args)
        if self.keyword == "ENV" and words and "=" not in words[0]:
            return {words[0]: " ".join(words[1:])}
        return {key: value for key, _, value in (word.partition("=") for word in words)}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV, each value expanded with the ENV before it ($PATH of the base stays as written)."""
        env: dict[str, str] = {}
        for ins in self.of("ENV"):
            for key, value in ins.pairs().items():
                env[key] = Template(value).safe_substitute(env)
        return env

    def workdir(self, before: Instruction | None = None) -> str:
        """WORKDIR in effect at ``before`` (at the end of the stage when None); '/' if never set."""
        current = "/"
        for ins in self.instructions:
            if ins is before:
                break
            if ins.keyword == "WORKDIR":
                current = ins.args if ins.args.startswith("/") else current.rstrip("/") + "/" + ins.args
        return current


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, as Docker reads them: comment lines dropped (inside continuations
    too), a trailing backslash joins the next line, the keyword upper-cased."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def dockerfile_stages(instructions: list[Instruction]) -> list[Stage]:
    """The build stages: ``FROM image [AS name]`` and the instructions up to the next FROM.
    Instructions before the first FROM (global ARGs) are not in any stage."""
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            _, words = ins.flags_and_words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {ins.line}: FROM {ins.args}"
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
    return stages


# --- shell ---------------------------------------------------------------------------------------

SEPARATORS = ("&&", "||", ";", "|", "&")


@dataclass
class Command:
    """One simple command: leading NAME=value assignments, the words, the redirections, and the
    operator that joins it to the command before it (None for the first one of a line)."""
    env: dict[str, str]
    argv: list[str]
    redirects: list[tuple[str, str]]
    after: str | None


def _is_assignment(word: str) -> bool:
    name, sep, _ = word.partition("=")
    return bool(sep) and name.isidentifier()


def shell_commands(line: str) -> list[Command]:
    """Split one shell line into simple commands with shlex (quotes respected). Command
    substitutions stay inside the word they are quoted in; subshells and groups are not modelled."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = list(lexer)
    commands: list[Command] = []
    words: list[str] = []
    redirects: list[tuple[str, str]] = []
    joiner: str | None = None

    def close(next_joiner: str | None) -> None:
        nonlocal words, redirects, joiner
        env = {}
        while words and _is_assignment(words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        commands.append(Command(env, words, redirects, joiner))
        words, redirects, joiner = [], [], next_joiner

    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in SEPARATORS:
            close(token)
        elif token and set(token) <= set("<>&"):  # a redirection: >, >>, <, >&, ...
            fd = words.pop() if words and words[-1].isdigit() else ""
            assert index + 1 < len(tokens), f"redirection {token} without a target in {line!r}"
            redirects.append((fd + token, tokens[index + 1]))
            index += 1
        else:
            words.append(token)
        index += 1
    if words or redirects:
        close(None)
    return commands


def shell_script_commands(text: str) -> list[Command]:
    """Every simple command of a script: continuation lines joined, comment lines dropped."""
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            commands.extend(shell_commands(line))
    return commands


# --- spark-submit --------------------------------------------------------------------------------


@dataclass
class SparkSubmit:
    options: dict[str, str]      # --master, --properties-file, ... → value
    conf: dict[str, str]         # every --conf key=value
    application: str
    app_args: list[str]


def parse_spark_submit(argv: list[str]) -> SparkSubmit:
    """``spark-submit [--option value]... application [app args]``: every option used here takes a value."""
    assert argv and argv[0].rsplit("/", 1)[-1] == "spark-submit", argv
    options, conf = {}, {}
    index = 1
    while index < len(argv) and argv[index].startswith("--"):
        name, value = argv[index], argv[index + 1]
        if name == "--conf":
            key, sep, setting = value.partition("=")
            assert sep, f"--conf {value} is not key=value"
            conf[key] = setting
        else:
            options[name] = value
        index += 2
    assert index < len(argv), f"no application in {argv}"
    return SparkSubmit(options, conf, argv[index], argv[index + 1:])


# --- compose interpolation -----------------------------------------------------------------------


def compose_variables(value: str) -> list[tuple[str, str, str | None]]:
    """(name, operator, default) of each ``${NAME}`` / ``${NAME:-default}`` / ``${NAME-default}``
    in a compose string; operator is '' when there is no default."""
    found = []
    start = value.find("${")
    while start != -1:
        end = value.index("}", start)
        body = value[start + 2:end]
        for operator in (":-", "-", ""):
            if operator and operator in body:
                name, default = body.split(operator, 1)
                break
        else:
            name, default = body, None
        found.append((name, operator, default))
        start = value.find("${", end)
    return found


def interpolate(value: str, env: dict[str, str]) -> str:
    """What docker compose makes of a string: ``${NAME:-d}`` is d when NAME is unset or empty,
    ``${NAME-d}`` only when it is unset, ``${NAME}`` is '' when unset."""
    out, start = [], 0
    position = value.find("${")
    while position != -1:
        end = value.index("}", position)
        (name, operator, default), = compose_variables(value[position:end + 1])
        use_default = name not in env or (operator == ":-" and not env[name])
        out.append(value[start:position])
        out.append((default or "") if use_default else env[name])
        start = end + 1
        position = value.find("${", start)
    out.append(value[start:])
    return "".join(out)
