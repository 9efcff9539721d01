"""The container set-up: docker-compose.yml, its CPU variant compose/cpu.yml, the two
Dockerfiles under compose/ and .dockerignore.

No container engine runs on the test machines, so the files are checked statically: the
compose-spec schema, the farm's own ``Config`` for every ``FARM_*`` variable, the CLI's
own argparse parser for every ``farm ...`` command, the repository tree for everything the
images copy, and the references inside the compose model. Each checker returns a list of
problems; ``test_checkers_catch_broken_copies`` feeds each one a deliberately broken copy
to show that it would fail. The one-shot set-up commands (bucket, demo model) also run as
they are written, against a real S3 server and a real Redis server, with the packages of
the ``workers`` extra made unimportable as in the torch-free API image.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import flower.options  # noqa: F401  (defines Flower's command-line options)
import pytest
import redis
import yaml
from tornado.options import options as tornado_options

from farm.cli import build_parser
from farm.config import PREFIX, Config
from farm.models import ModelRegistry, probe_engine
from farm.redis_client import connection_limits
from storage import open_store
from storage.models import sha256_file
from tests.servers import MotoServer, RedisServer
from workers.demo import DEMO_MODEL_NAME, demo_checkpoint_path
from workers.launcher import parse_devices

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "compose" / "cpu.yml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
FARM_VARS = {PREFIX + f.name.upper() for f in fields(Config)}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

Project = dict[str, Any]


# -- reading the files ------------------------------------------------------------------


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$`` in every
    string of a loaded file, with ``env`` as the environment."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        got = env.get(name)
        if op == ":-" and not got or op == "-" and got is None:
            return default
        if op in (":?", "?") and not got:
            raise ValueError(f"${{{name}}} is required: {default}")
        return got or ""

    return _VAR.sub(sub, value)


def variables_without_default(value: Any) -> list[str]:
    """``${VAR}`` references that are empty unless the user sets VAR."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in variables_without_default(item)]
    if isinstance(value, list):
        return [v for item in value for v in variables_without_default(item)]
    if not isinstance(value, str):
        return []
    return [m.group(0) for m in _VAR.finditer(value) if m.group(0) != "$$" and not m.group(2)]


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of a later file into an earlier one: mappings merge, sequences
    append (unique), ``command``/``entrypoint``/``healthcheck.test`` and scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list):
        if key in ("command", "entrypoint", "test"):
            return override
        return base + [v for v in override if v not in base]
    return override


def load_project(*paths: Path, env: dict[str, str] | None = None) -> Project:
    """The compose model of ``docker compose -f A -f B ...`` (interpolated, merged)."""
    project: Project = {}
    for path in paths:
        project = merge(project, interpolate(yaml.safe_load(path.read_text()), env or {}))
    return project


def services(project: Project) -> dict[str, dict[str, Any]]:
    return project.get("services") or {}


def started(project: Project) -> dict[str, dict[str, Any]]:
    """The services that ``docker compose up`` starts with no profile given."""
    return {n: s for n, s in services(project).items() if not s.get("profiles")}


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    # compose writes YAML booleans as true/false; a key without a value is left unset
    return {k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in env.items() if v is not None}  # fmt: skip


def argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def service_argv(svc: dict[str, Any], dockerfile_text: str | None) -> list[str]:
    """What the container runs: entrypoint + command, the image's CMD where none is set."""
    command = argv(svc.get("command"))
    if not command and dockerfile_text is not None:
        cmds = [rest for kw, rest in dockerfile_instructions(dockerfile_text) if kw == "CMD"]
        command = argv(yaml.safe_load(cmds[-1])) if cmds else []
    return argv(svc.get("entrypoint")) + command


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def dockerfile_of(svc: dict[str, Any], root: Path) -> Path | None:
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = root / build.get("context", ".")
    return context / build.get("dockerfile", "Dockerfile")


def image_dockerfiles(project: Project, root: Path) -> dict[str, Path]:
    """Image name -> the Dockerfile a service builds it from."""
    out: dict[str, Path] = {}
    for svc in services(project).values():
        path = dockerfile_of(svc, root)
        if path is not None and svc.get("image"):
            out[svc["image"]] = path
    return out


def dockerfile_text_of(svc: dict[str, Any], project: Project, root: Path) -> str | None:
    path = dockerfile_of(svc, root) or image_dockerfiles(project, root).get(svc.get("image", ""))
    return path.read_text() if path is not None and path.is_file() else None


def copies(text: str) -> list[tuple[list[str], str, str]]:
    """(sources, destination, WORKDIR at the time) of each COPY/ADD from the context."""
    out = []
    workdir = "/"
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "FROM":
            workdir = "/"
        elif keyword == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif keyword in ("COPY", "ADD"):
            args = yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue  # from another stage or image, not from the context
            paths = [a for a in args if not a.startswith("--")]
            out.append((paths[:-1], paths[-1], workdir))
    return out


def image_path(text: str, container_path: str, context: Path) -> Path | None:
    """The file of the build context that ends up at ``container_path`` in the image."""
    found: Path | None = None
    for sources, dest, workdir in copies(text):
        target = posixpath.normpath(posixpath.join(workdir, dest))
        for src in sources:
            into_dir = len(sources) > 1 or dest.endswith("/")
            src_path = context / src
            at = target
            if into_dir and not src_path.is_dir():
                at = posixpath.join(target, posixpath.basename(src.rstrip("/")))
            if container_path == at or container_path.startswith(at.rstrip("/") + "/"):
                candidate = src_path / posixpath.relpath(container_path, at)
                if candidate.exists():
                    found = candidate  # a later COPY wins, as in the image
    return found


# -- .dockerignore ----------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = posixpath.normpath(pattern.strip().lstrip("/"))
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(f"^{out}$")


def dockerignored(path: str, ignore_text: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context:
    the last pattern that matches it or one of its parent folders decides, ``!`` keeps."""
    patterns = []
    for line in ignore_text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            patterns.append((keep, _ignore_regex(line[1:] if keep else line)))
    parts = posixpath.normpath(path).split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for keep, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not keep
    return excluded


@functools.cache
def shipped_files() -> tuple[str, ...]:
    """The project's files: tracked, or new and not ignored by git."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return tuple(line for line in out.splitlines() if (ROOT / line).is_file())


# -- checkers ---------------------------------------------------------------------------


def schema_problems(*paths: Path) -> list[str]:
    proc = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]


@functools.cache
def _check_storage_url(url: str) -> None:
    """ValueError unless the farm's storage opens ``url`` (an S3 one is opened, which makes
    no request; a local one is only parsed, since opening it creates the folder)."""
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        open_store(url)
    elif scheme not in ("", "file"):
        raise ValueError(f"unsupported storage URL scheme {scheme!r} in {url!r}")


def env_problems(env: dict[str, str], where: str, project: Project) -> list[str]:
    problems = [f"{where}: {k} is no farm setting (farm config lists them)"
                for k in sorted(env) if k.startswith(PREFIX) and k not in FARM_VARS]  # fmt: skip
    try:
        cfg = Config.from_env(env)
        connection_limits(cfg)
        _check_storage_url(cfg.storage_url)
    except ValueError as exc:
        return [*problems, f"{where}: {exc}"]
    names = set(services(project))
    for var, url in (("FARM_REDIS_URL", env.get("FARM_REDIS_URL")),
                     ("AWS_ENDPOINT_URL", env.get("AWS_ENDPOINT_URL"))):  # fmt: skip
        if url and urlsplit(url).hostname not in names:
            problems.append(f"{where}: {var}={url} names no service of {sorted(names)}")
    return problems


def farm_env_problems(project: Project, root: Path = ROOT) -> list[str]:
    """Every FARM_* variable is a Config field, the values parse, the hosts are services."""
    problems = []
    for name, svc in services(project).items():
        env = service_env(svc)
        if any(k.startswith(PREFIX) for k in env):
            problems += env_problems(env, f"service {name}", project)
    for path in {p for p in image_dockerfiles(project, root).values() if p.is_file()}:
        env = {}
        for keyword, rest in dockerfile_instructions(path.read_text()):
            if keyword == "ENV":
                env.update(item.split("=", 1) for item in shlex.split(rest) if "=" in item)
        problems += env_problems(env, path.name, project)
    return problems


def parse_farm(args: list[str]) -> tuple[Any, str]:
    """The farm CLI's own parser on ``args``: (namespace or None, what it printed)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        try:
            return build_parser().parse_args(args), ""
        except SystemExit:
            return None, err.getvalue().strip()


def _flower_options() -> set[str]:
    """Flower's command-line options (tornado options that ``flower.options`` defines)."""
    return {name.replace("-", "_") for name in tornado_options._options}


def command_problems(project: Project, root: Path = ROOT) -> list[str]:
    """Every ``farm ...`` command parses with the CLI's parser and names what exists in
    its image; Python scripts and ``-c`` code compile; Flower's flags are its own."""
    problems = []
    for name, svc in services(project).items():
        text = dockerfile_text_of(svc, project, root)
        cmd = service_argv(svc, text)
        checks = [cmd]
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
            checks.append(test[1:] if test[0] == "CMD" else shlex.split(test[1]))
        for words in checks:
            problems += [f"service {name}: {p}" for p in _command_problems(words, text, root)]
    return problems


def _command_problems(cmd: list[str], dockerfile: str | None, root: Path) -> list[str]:
    if not cmd:
        return []
    program = posixpath.basename(cmd[0])
    if program == "farm":
        args, err = parse_farm(cmd[1:])
        if args is None:
            return [f"{shlex.join(cmd)!r} does not parse: {err.splitlines()[-1]}"]
        if args.cmd in ("worker", "up", "demo"):
            try:
                parse_devices(args.devices, gpus=1, cores=4)
            except ValueError as exc:
                return [f"{shlex.join(cmd)!r}: {exc}"]
        if args.cmd == "models" and args.models_cmd == "add":
            local = image_path(dockerfile or "", args.path, root)
            if local is None or not local.is_file():
                return [f"{args.path} is not in the image (no COPY puts it there)"]
            try:
                engine = probe_engine(local)
            except ValueError as exc:
                return [f"{args.path}: {exc}"]
            if engine != "sd1":  # the only family `farm models add` takes yet
                return [f"{args.path} is a {engine} checkpoint, not sd1"]
        return []
    if program.startswith("python"):
        if cmd[1:2] == ["-c"]:
            try:
                compile(cmd[2], "<-c>", "exec")
            except SyntaxError as exc:
                return [f"python -c code does not compile: {exc}"]
        elif len(cmd) > 1 and cmd[1].startswith("/"):
            local = image_path(dockerfile or "", cmd[1], root)
            if local is None:
                return [f"{cmd[1]} is not in the image (no COPY puts it there)"]
            try:
                compile(local.read_text(), str(local), "exec")
            except SyntaxError as exc:
                return [f"{cmd[1]} does not compile: {exc}"]
        return []
    if program == "celery" and "flower" in cmd:
        app = cmd[cmd.index("-A") + 1] if "-A" in cmd else ""
        problems = [] if app and importlib.util.find_spec(app) else [f"no Celery app {app!r}"]
        known = _flower_options()
        for flag in cmd[cmd.index("flower") + 1 :]:
            option = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
            if flag.startswith("--") and option not in known:
                problems.append(f"Flower has no option {flag}")
        return problems
    return []


def build_problems(project: Project, root: Path = ROOT) -> list[str]:
    """Build contexts and Dockerfiles exist; build args are ARGs of their Dockerfile."""
    problems = []
    for name, svc in services(project).items():
        path = dockerfile_of(svc, root)
        if path is None:
            continue
        if not path.parent.is_dir() or not path.is_file():
            problems.append(f"service {name}: no Dockerfile {path}")
            continue
        declared = {rest.split("=", 1)[0] for kw, rest in dockerfile_instructions(path.read_text())
                    if kw == "ARG"}  # fmt: skip
        args = (svc["build"].get("args") or {}) if isinstance(svc["build"], dict) else {}
        for arg in args if isinstance(args, dict) else [a.split("=", 1)[0] for a in args]:
            if arg not in declared:
                problems.append(f"service {name}: build arg {arg} is no ARG of {path.name}")
    return problems


def copy_problems(
    text: str, context: Path, ignore_text: str, shipped: tuple[str, ...]
) -> list[str]:
    """Every COPY/ADD source exists in the context and .dockerignore keeps it, and every
    project file under a copied folder too."""
    problems = []
    for sources, _dest, _workdir in copies(text):
        for src in sources:
            matches = sorted(context.glob(src.rstrip("/"))) if src.strip("/") else [context]
            if not matches:
                problems.append(f"COPY {src}: not in the build context")
            for match in matches:
                rel = match.relative_to(context).as_posix()
                if match.is_dir():
                    left_out = [
                        f
                        for f in shipped
                        if f.startswith(rel + "/") and dockerignored(f, ignore_text)
                    ]
                    problems += [f"COPY {src}: .dockerignore leaves out {f}" for f in left_out]
                elif dockerignored(rel, ignore_text):
                    problems.append(f"COPY {src}: .dockerignore leaves it out")
    return problems


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in the RUN instructions, in order."""
    out = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    out.append(words[i + 2 :])
                    break
    return out


def _requirement_names(reqs: list[str]) -> tuple[str, ...]:
    return tuple(re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs)


@functools.cache
def workers_extra() -> tuple[str, ...]:
    """Distribution names of the ``workers`` extra in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _requirement_names(project["optional-dependencies"]["workers"])


@functools.cache
def core_dependencies() -> tuple[str, ...]:
    """Distribution names that ``pip install .`` brings in (pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _requirement_names(project["dependencies"])


def install_problems(text: str, workers: bool, core: tuple[str, ...] | None = None) -> list[str]:
    """The API image installs the package without the ``workers`` extra, nothing of it,
    and the package's own dependencies hold none of it either; the worker image installs
    a torch build first, then the package with ``workers``."""
    installs = pip_installs(text)
    package = [i for i, words in enumerate(installs)
               if any(re.fullmatch(r"\.(\[[^\]]*\])?", w) for w in words)]  # fmt: skip
    if not package:
        return ["no `pip install .` of the package"]
    names = [re.match(r"[A-Za-z0-9_.-]*", w).group(0).lower() for ws in installs for w in ws]
    with_extra = any("workers" in w for w in installs[package[-1]])
    if not workers:
        problems = ["the package is installed with its workers extra"] if with_extra else []
        problems += [f"installs {n} (workers extra)" for n in workers_extra() if n in names]
        core = core_dependencies() if core is None else core
        return problems + [f"`pip install .` brings in {n} (workers extra): it is a dependency"
                           for n in workers_extra() if n in core]  # fmt: skip
    torch = [i for i, words in enumerate(installs)
             if any(w.startswith("torch==") or w == "torch" for w in words)]  # fmt: skip
    problems = [] if with_extra else ["the package is installed without its workers extra"]
    if not torch or torch[0] > package[-1]:
        problems.append("no torch build is installed before the package")
    elif not any(w.startswith("--index-url") or w.startswith("--extra-index-url")
                 for w in installs[torch[0]]):  # fmt: skip
        problems.append("the torch install names no wheel index (TORCH_INDEX_URL)")
    return problems


def _named_volumes(svc: dict[str, Any]) -> list[str]:
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type", "volume") == "volume" and v.get("source"):
                out.append(v["source"])
        elif ":" in v and not v.split(":", 1)[0].startswith(("/", ".", "~", "$")):
            out.append(v.split(":", 1)[0])
    return out


def published_ports(svc: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(host ip, protocol, host port, container port) of each published port."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            if p.get("published"):
                out.append((p.get("host_ip", "0.0.0.0"), p.get("protocol", "tcp"),
                            int(p["published"]), int(p["target"])))  # fmt: skip
            continue
        spec, _, proto = str(p).partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2:
            ip = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((ip, proto or "tcp", int(parts[-2]), int(parts[-1])))
    return out


def reference_problems(project: Project) -> list[str]:
    """depends_on names defined services with a sound condition; named volumes are
    declared; no two started services publish the same host port."""
    problems = []
    svcs = services(project)
    declared = set(project.get("volumes") or {})
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {} for d in deps}
        for dep, how in deps.items():
            cond = how.get("condition", "service_started")
            if dep not in svcs:
                problems.append(f"service {name} depends on {dep}, which is not defined")
            elif cond not in DEPENDS_CONDITIONS:
                problems.append(f"service {name}: unknown condition {cond} for {dep}")
            elif cond == "service_healthy" and not _has_healthcheck(svcs[dep]):
                problems.append(f"service {name} waits for {dep} to be healthy: it has no check")
            elif cond == "service_completed_successfully" and not _is_one_shot(svcs[dep]):
                problems.append(f"service {name} waits for {dep} to complete: it restarts")
        for vol in _named_volumes(svc):
            if vol not in declared:
                problems.append(f"service {name}: volume {vol} is not declared")
    seen: list[tuple[str, str, int, str]] = []
    for name, svc in started(project).items():
        for ip, proto, host, _target in published_ports(svc):
            for other_ip, other_proto, other_host, other in seen:
                same_ip = "0.0.0.0" in (ip, other_ip) or ip == other_ip
                if same_ip and (proto, host) == (other_proto, other_host):
                    problems.append(f"port {host}/{proto} is published by {other} and {name}")
            seen.append((ip, proto, host, name))
    return problems


def _has_healthcheck(svc: dict[str, Any]) -> bool:
    health = svc.get("healthcheck") or {}
    return bool(health.get("test")) and not health.get("disable")


def _is_one_shot(svc: dict[str, Any]) -> bool:
    replicas = (svc.get("deploy") or {}).get("replicas", 1)
    return svc.get("restart", "no") in ("no", "on-failure") and replicas == 1


def _option(cmd: list[str], flag: str) -> str | None:
    if flag in cmd and cmd.index(flag) + 1 < len(cmd):
        return cmd[cmd.index(flag) + 1]
    for word in cmd:
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def exposure_problems(project: Project, root: Path = ROOT) -> list[str]:
    """The API listens on all interfaces of its container, on the port it publishes;
    so does Flower, behind authentication."""
    problems = []
    for name, svc in services(project).items():
        cmd = service_argv(svc, dockerfile_text_of(svc, project, root))
        targets = {t for *_, t in published_ports(svc)}
        if cmd[:2] == ["farm", "api"]:
            cfg = Config.from_env(service_env(svc))
            if cfg.api_host != "0.0.0.0":
                problems.append(f"service {name}: the API listens on {cfg.api_host}, not 0.0.0.0")
            if cfg.api_port not in targets:
                problems.append(f"service {name}: port {cfg.api_port} is not published")
        if cmd[:1] == ["celery"] and "flower" in cmd:
            port = int(_option(cmd, "--port") or 5555)
            if (_option(cmd, "--address") or "0.0.0.0") != "0.0.0.0":
                problems.append(f"service {name}: Flower listens on {_option(cmd, '--address')}")
            if port not in targets:
                problems.append(f"service {name}: Flower's port {port} is not published")
            problems += [f"service {name}: {p}" for p in _flower_env_problems(service_env(svc))]
    return problems


def _flower_env_problems(env: dict[str, str]) -> list[str]:
    """Flower reads FLOWER_<option> and ignores the names it does not know: a typo would
    leave its UI open to anyone who reaches the port."""
    known = {"FLOWER_" + o.upper() for o in _flower_options()} | {"FLOWER_UNAUTHENTICATED_API"}
    problems = [f"{k} is no Flower option" for k in sorted(env)
                if k.startswith("FLOWER_") and k not in known]  # fmt: skip
    if not (env.get("FLOWER_BASIC_AUTH") or env.get("FLOWER_AUTH")):
        problems.append("Flower runs without authentication (FLOWER_BASIC_AUTH)")
    return problems


def redis_problems(project: Project) -> list[str]:
    """The Redis that FARM_REDIS_URL names keeps its append-only file on a volume."""
    hosts = {urlsplit(service_env(s)["FARM_REDIS_URL"]).hostname
             for s in services(project).values() if "FARM_REDIS_URL" in service_env(s)}  # fmt: skip
    if not hosts:
        return ["no service sets FARM_REDIS_URL"]
    problems = []
    for host in sorted(hosts):
        svc = services(project).get(host)
        if svc is None:
            problems.append(f"FARM_REDIS_URL names {host}, no service")
            continue
        cmd = argv(svc.get("command"))
        if _option(cmd, "--appendonly") != "yes":
            problems.append(f"service {host} runs without --appendonly yes: {shlex.join(cmd)}")
        data_dir = _option(cmd, "--dir") or "/data"
        mounts = {v.split(":")[1] if isinstance(v, str) else v.get("target")
                  for v in svc.get("volumes") or []}  # fmt: skip
        if data_dir not in mounts:
            problems.append(f"service {host}: its --dir {data_dir} is on no volume")
    return problems


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return reservations.get("devices") or []


def gpu_problems(project: Project, gpu: bool, root: Path = ROOT) -> list[str]:
    """The started workers reserve NVIDIA GPUs (``gpu``) or none at all, and their
    ``--devices`` fit that."""
    workers = {}
    for name, svc in started(project).items():
        cmd = service_argv(svc, dockerfile_text_of(svc, project, root))
        if cmd[:2] == ["farm", "worker"]:
            workers[name] = _option(cmd, "--devices") or "auto"
    if not workers:
        return ["no worker service starts"]
    problems = []
    for name, devices in workers.items():
        reserved = _gpu_devices(services(project)[name])
        nvidia = [
            d
            for d in reserved
            if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        ]
        if gpu and not nvidia:
            problems.append(f"service {name}: no NVIDIA GPU reserved")
        if gpu and not devices.startswith(("auto", "cuda")):
            problems.append(f"service {name}: --devices {devices} on a GPU node")
        if not gpu and reserved:
            problems.append(f"service {name}: reserves devices {reserved} in the CPU variant")
        if not gpu and not devices.startswith("cpu"):
            problems.append(f"service {name}: --devices {devices} without a GPU")
    for name, svc in started(project).items():
        if not gpu and name not in workers and _gpu_devices(svc):
            problems.append(f"service {name}: reserves devices in the CPU variant")
    return problems


# -- the files as they are --------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_project() -> Project:
    return load_project(COMPOSE)


@pytest.fixture(scope="module")
def cpu_project() -> Project:
    return load_project(COMPOSE, CPU_OVERRIDE)


@pytest.fixture(params=["gpu", "cpu"])
def project(request: pytest.FixtureRequest, gpu_project: Project, cpu_project: Project) -> Project:
    return gpu_project if request.param == "gpu" else cpu_project


def test_files_validate_against_the_compose_spec():
    assert schema_problems(COMPOSE, CPU_OVERRIDE) == []


def test_every_variable_has_a_default_so_up_needs_no_env_file():
    for path in (COMPOSE, CPU_OVERRIDE):
        assert variables_without_default(yaml.safe_load(path.read_text())) == [], path


def test_farm_variables_are_config_fields_and_parse(project):
    assert farm_env_problems(project) == []
    # the stack really is configured through them, not through the defaults
    env = service_env(services(project)["api"])
    assert urlsplit(env["FARM_STORAGE_URL"]).scheme == "s3"
    assert env["AWS_ENDPOINT_URL"].startswith("http://minio:")


def test_commands_parse_with_the_farm_cli(project):
    assert command_problems(project) == []
    farm_cmds = {n: service_argv(s, dockerfile_text_of(s, project, ROOT))[:3]
                 for n, s in services(project).items()}  # fmt: skip
    assert farm_cmds["api"][:2] == ["farm", "api"]
    assert farm_cmds["scheduler"][:2] == ["farm", "scheduler"]
    assert farm_cmds["register-model"] == ["farm", "models", "add"]


def test_builds_exist_and_copy_only_what_the_context_holds(project):
    assert build_problems(project) == []
    ignore = (ROOT / ".dockerignore").read_text()
    dockerfiles = set(image_dockerfiles(project, ROOT).values())
    assert {p.name for p in dockerfiles} == {"Dockerfile.api", "Dockerfile.worker"}
    for path in dockerfiles:
        assert copy_problems(path.read_text(), ROOT, ignore, shipped_files()) == [], path.name


def test_api_image_has_no_torch_and_the_worker_image_has(gpu_project):
    images = image_dockerfiles(gpu_project, ROOT)
    api = images[services(gpu_project)["api"]["image"]]
    worker = images[services(gpu_project)["worker"]["image"]]
    assert install_problems(api.read_text(), workers=False) == []
    assert install_problems(worker.read_text(), workers=True) == []


def test_references_resolve_and_ports_do_not_collide(project):
    assert reference_problems(project) == []
    assert exposure_problems(project) == []


def test_redis_keeps_its_append_only_file(project):
    assert redis_problems(project) == []


def test_gpu_worker_by_default_and_cpu_worker_in_the_cpu_variant(gpu_project, cpu_project):
    assert gpu_problems(gpu_project, gpu=True) == []
    assert gpu_problems(cpu_project, gpu=False) == []
    assert "worker" not in started(cpu_project)  # the GPU worker stays off on a laptop


def test_schedulers_run_as_replicas(gpu_project):
    assert services(gpu_project)["scheduler"]["deploy"]["replicas"] >= 2


def test_cpu_worker_has_the_farm_environment_of_the_default_file(gpu_project, cpu_project):
    """compose/cpu.yml cannot reach the YAML anchor of docker-compose.yml: its worker's
    settings must not drift from the rest of the farm's."""
    gpu_env = service_env(services(gpu_project)["worker"])
    cpu_env = service_env(services(cpu_project)["worker-cpu"])
    assert cpu_env == gpu_env


# -- each checker catches a broken copy -------------------------------------------------


def _svc(name: str, **changes: Any) -> Callable[[Project], None]:
    def mutate(project: Project) -> None:
        for key, value in changes.items():
            services(project)[name][key] = value

    return mutate


def _env(name: str, **env: str) -> Callable[[Project], None]:
    def mutate(project: Project) -> None:
        services(project)[name]["environment"] = {**service_env(services(project)[name]), **env}

    return mutate


def _no_gpu(project: Project) -> None:
    del services(project)["worker"]["deploy"]


def _gpu_on_cpu_worker(project: Project) -> None:
    services(project)["worker-cpu"]["deploy"] = copy.deepcopy(services(project)["worker"]["deploy"])


def _add_model_cmd(path: str) -> list[str]:
    return ["farm", "models", "add", path, "--name", "demo-shapes"]


ASSET = "/opt/farm/src/workers/demo/assets/"
BROKEN: list[tuple[str, str, Callable[[Project], None], Callable[[Project], list[str]], str]] = [
    ("env-typo", "gpu", _env("api", FARM_REDIS_ULR="redis://redis:6379/0"), farm_env_problems,
     "FARM_REDIS_ULR is no farm setting"),
    ("env-value", "gpu", _env("api", FARM_API_PORT="eighty"), farm_env_problems, "FARM_API_PORT"),
    ("env-timeout", "gpu", _env("worker", FARM_REDIS_TIMEOUT="0"), farm_env_problems,
     "FARM_REDIS_TIMEOUT"),
    ("env-storage", "gpu", _env("api", FARM_STORAGE_URL="s4://farm"), farm_env_problems,
     "scheme"),
    ("env-host", "cpu", _env("worker-cpu", FARM_REDIS_URL="redis://valkey:6379/0"),
     farm_env_problems, "names no service"),
    ("cmd-flag", "gpu", _svc("worker", command=["farm", "worker", "--gpus", "all"]),
     command_problems, "does not parse"),
    ("cmd-sub", "gpu", _svc("api", command="farm serve"), command_problems, "does not parse"),
    ("cmd-name", "gpu", _svc("register-model", command=["farm", "models", "add", ASSET + "x"]),
     command_problems, "required"),
    ("cmd-devices", "cpu", _svc("worker-cpu", command=["farm", "worker", "--devices", "gpu:0"]),
     command_problems, "--devices"),
    ("cmd-path", "gpu", _svc("register-model", command=_add_model_cmd(ASSET + "gone.bin")),
     command_problems, "is not in the image"),
    ("cmd-script", "gpu", _svc("bucket", command=["python", "/opt/farm/bin/nothing.py"]),
     command_problems, "is not in the image"),
    ("cmd-health", "gpu", _svc("api", healthcheck={"test": ["CMD", "python", "-c", "import ("]}),
     command_problems, "does not compile"),
    ("cmd-flower", "gpu", _svc("flower", command=["celery", "-A", "farm.flower_app", "flower",
                                                 "--prot=5555"]),
     command_problems, "no option --prot"),
    ("build-file", "gpu", _svc("worker", build={"context": ".", "dockerfile": "compose/Nope"}),
     build_problems, "no Dockerfile"),
    ("build-arg", "cpu", _svc("worker-cpu", build={"context": ".",
                                                  "dockerfile": "compose/Dockerfile.worker",
                                                  "args": {"TORCH_INDX_URL": "x"}}),
     build_problems, "TORCH_INDX_URL"),
    ("depends-name", "gpu", _svc("api", depends_on={"reddis": {"condition": "service_healthy"}}),
     reference_problems, "reddis, which is not defined"),
    ("depends-health", "gpu", _svc("api", depends_on={"scheduler": {
        "condition": "service_healthy"}}), reference_problems, "it has no check"),
    ("depends-oneshot", "gpu", _svc("api", depends_on={"minio": {
        "condition": "service_completed_successfully"}}), reference_problems, "it restarts"),
    ("volume", "gpu", _svc("worker", volumes=["model-cahce:/var/cache/farm/models"]),
     reference_problems, "model-cahce is not declared"),
    ("ports", "gpu", _svc("flower", ports=["8000:5555"]), reference_problems, "port 8000/tcp"),
    ("api-host", "gpu", _env("api", FARM_API_HOST="127.0.0.1"), exposure_problems, "0.0.0.0"),
    ("api-port", "gpu", _env("api", FARM_API_PORT="8080"), exposure_problems, "8080"),
    ("flower-auth", "gpu", _env("flower", FLOWER_BASIC_AUTH="", FLOWER_BASICAUTH="farm:x"),
     exposure_problems, "FLOWER_BASICAUTH is no Flower option"),
    ("flower-host", "gpu", _svc("flower", command=["celery", "-A", "farm.flower_app", "flower",
                                                  "--address=127.0.0.1", "--port=5555"]),
     exposure_problems, "Flower listens on 127.0.0.1"),
    ("aof", "gpu", _svc("redis", command=["valkey-server", "--appendonly", "no"]),
     redis_problems, "--appendonly yes"),
    ("aof-volume", "gpu", _svc("redis", volumes=[]), redis_problems, "on no volume"),
    ("no-gpu", "gpu", _no_gpu, lambda p: gpu_problems(p, gpu=True), "no NVIDIA GPU"),
    ("cpu-gpu", "cpu", _gpu_on_cpu_worker, lambda p: gpu_problems(p, gpu=False), "reserves"),
]  # fmt: skip


@pytest.mark.parametrize(
    "which, mutate, checker, expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_checkers_catch_broken_copies(which, mutate, checker, expected, gpu_project, cpu_project):
    broken = copy.deepcopy(gpu_project if which == "gpu" else cpu_project)
    assert checker(broken) == []  # the file as it is passes
    mutate(broken)
    problems = checker(broken)
    assert any(expected in p for p in problems), problems


def test_schema_check_catches_a_broken_file(tmp_path):
    broken = COMPOSE.read_text().replace("    depends_on: *redis-ready\n", "    depend_on: x\n", 1)
    assert broken != COMPOSE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    problems = schema_problems(tmp_path / "docker-compose.yml")
    assert problems and "depend_on" in problems[0]


def test_copy_check_catches_missing_sources_and_ignored_files():
    api = (ROOT / "compose" / "Dockerfile.api").read_text()
    ignore = (ROOT / ".dockerignore").read_text()
    files = shipped_files()
    missing = api.replace("COPY storage/ storage/", "COPY storag/ storage/")
    assert copy_problems(missing, ROOT, ignore, files) == ["COPY storag/: not in the build context"]
    no_farm = ignore.replace("!farm/\n", "")
    assert any("leaves out farm/cli.py" in p for p in copy_problems(api, ROOT, no_farm, files))
    no_model = ignore + "**/*.safetensors\n"
    problems = copy_problems(api, ROOT, no_model, files)
    assert any("demo-shapes.safetensors" in p for p in problems), problems
    no_readme = ignore.replace("!README.md\n", "")
    assert copy_problems(api, ROOT, no_readme, files) == [
        "COPY README.md: .dockerignore leaves it out"
    ]


def test_dockerignore_follows_dockers_rules():
    ignore = "*\n!farm/\nfarm/secret.txt\n**/__pycache__\n!keep/**/x.py\n"
    assert dockerignored(".git/config", ignore)
    assert dockerignored("tests/test_a.py", ignore)
    assert not dockerignored("farm/cli.py", ignore)
    assert dockerignored("farm/secret.txt", ignore)
    assert dockerignored("farm/api/__pycache__/app.cpython-311.pyc", ignore)
    assert not dockerignored("keep/a/b/x.py", ignore)


def test_install_check_catches_torch_in_the_api_image_and_none_in_the_worker():
    api = (ROOT / "compose" / "Dockerfile.api").read_text()
    worker = (ROOT / "compose" / "Dockerfile.worker").read_text()
    assert install_problems(api.replace("pip install .", 'pip install ".[workers]"'), False) == [
        "the package is installed with its workers extra"
    ]
    assert install_problems(api.replace("pip install .", "pip install . numpy"), False) == [
        "installs numpy (workers extra)"
    ]
    assert install_problems(api, False, core=(*core_dependencies(), "torch")) == [
        "`pip install .` brings in torch (workers extra): it is a dependency"
    ]
    assert install_problems(worker.replace('".[workers]"', "."), True) == [
        "the package is installed without its workers extra"
    ]
    no_torch = re.sub(r"RUN pip install --index-url[^\n]*\n", "", worker)
    assert no_torch != worker
    assert install_problems(no_torch, True) == ["no torch build is installed before the package"]


def test_interpolation_and_merge_follow_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$HOME", env) == "x d  d $HOME"
    assert variables_without_default(["${A}", "${B:-b}", "$C", "$$D"]) == ["${A}", "$C"]
    merged = merge({"s": {"command": ["a"], "ports": ["1:1"], "x": 1}},
                   {"s": {"command": ["b"], "ports": ["2:2"]}})  # fmt: skip
    assert merged == {"s": {"command": ["b"], "ports": ["1:1", "2:2"], "x": 1}}


# -- the one-shot services, run as written ----------------------------------------------

BLOCKER = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not in the API image (workers extra)")
sys.meta_path.insert(0, NotInImage())
mode, target, *rest = sys.argv[2:]
if mode == "-c":
    exec(compile(target, "<-c>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = [target, *rest]
    (runpy.run_module if mode == "-m" else runpy.run_path)(target, run_name="__main__")
"""


def _run_in_api_image(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a container command here with the workers extra unimportable: ``farm X`` as
    ``-m farm.cli X``, ``python -c CODE`` as it is, and every path in the image (a script,
    a checkpoint) as the file of the repository that the Dockerfile copies there."""
    modules = {m.replace("-", "_") for m in workers_extra()}
    text = (ROOT / "compose" / "Dockerfile.api").read_text()
    words = [str(image_path(text, w, ROOT) or w) if w.startswith("/") else w for w in cmd]
    if words[0] == "farm":
        args = ["-m", "farm.cli", *words[1:]]
    elif words[1] == "-c":
        args = words[1:3]
    else:
        args = ["-p", *words[1:]]
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(sorted(modules)), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_api_image_commands_import_no_workers_package():
    """`farm api`, `farm scheduler` and Flower's app import nothing of the workers extra."""
    code = "import farm.api.__main__, scheduler.service, farm.flower_app"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = _run_in_api_image(["python", "-c", code], env)
    assert proc.returncode == 0, proc.stderr
    proc = _run_in_api_image(["python", "-c", "import torch"], env)
    assert proc.returncode != 0 and "not in the API image" in proc.stderr  # the block holds


def test_one_shots_create_the_bucket_and_register_the_demo_model(gpu_project, tmp_path):
    bucket_svc = services(gpu_project)["bucket"]
    register_svc = services(gpu_project)["register-model"]
    name = f"farm-{uuid.uuid4().hex[:8]}"  # moto keeps buckets per process: one of our own
    with MotoServer() as s3, RedisServer() as r:

        def env_of(svc: dict[str, Any]) -> dict[str, str]:
            env = service_env(svc)
            url = urlsplit(env["FARM_STORAGE_URL"])
            return {
                **env,
                **s3.env,
                "FARM_REDIS_URL": r.url,
                "FARM_STORAGE_URL": url._replace(netloc=name).geturl(),
                "FARM_DATA_DIR": str(tmp_path),
                "FARM_MODEL_CACHE": str(tmp_path / "models"),
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),
            }

        client = boto3.client("s3", **s3.client_kwargs)
        assert name not in [b["Name"] for b in client.list_buckets()["Buckets"]]
        for _ in range(2):  # every `docker compose up` runs it again
            proc = _run_in_api_image(argv(bucket_svc["command"]), env_of(bucket_svc))
            assert proc.returncode == 0, proc.stderr
            assert name in [b["Name"] for b in client.list_buckets()["Buckets"]]

        proc = _run_in_api_image(argv(register_svc["command"]), env_of(register_svc))
        assert proc.returncode == 0, proc.stderr
        env = env_of(register_svc)
        cfg = Config.from_env(env)
        entry = ModelRegistry(redis.Redis.from_url(r.url), cfg.namespace).get(cfg.default_model)
        assert entry is not None and entry.name == DEMO_MODEL_NAME
        assert entry.sha256 == sha256_file(demo_checkpoint_path())
        stored = client.head_object(Bucket=name, Key=entry.key)
        assert stored["ContentLength"] == demo_checkpoint_path().stat().st_size
