"""The Dockerfile, .dockerignore and docker-compose.yml, read against what they must do.

No Docker engine runs here, so the files are parsed and checked: the compose file against the
official Compose Specification schema, the Dockerfile instruction by instruction.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.validators import validator_for

from adapters.fonts import DEJAVU_CANDIDATES
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(Settings.model_fields)
NOT_SETTINGS = {
    "PATH",
    "HF_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "DEBIAN_FRONTEND",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "NVIDIA_REQUIRE_CUDA",
    "LD_LIBRARY_PATH",
}
"""Environment variables of the image that are not the worker's settings."""
GLIBC_OF_DEBIAN = {"bullseye": (2, 31), "bookworm": (2, 36), "trixie": (2, 41)}
"""The glibc of each Debian release a python:<minor>-slim-<release> base may be."""


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions (continuations joined, comments dropped), by stage."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # also inside a continued instruction, as Docker reads it
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    instructions, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


def args_of(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults, for resolving ``${NAME}`` in FROM and RUN lines."""
    found = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            found[name.strip()] = value.strip()
    return found


def resolve(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), text)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    found = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                name, _, value = pair.partition("=")
                found[name] = value
    return found


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not the exec form: {args}"
    return parsed


def constraints_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def seconds(duration: str) -> float:
    """A compose duration such as ``10m`` or ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


# --- Dockerfile ---------------------------------------------------------------------------------


def test_multi_stage_the_runtime_takes_only_the_built_venv(
    instructions: list[Instruction],
) -> None:
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2 and froms[0].args.endswith(" AS build")
    copies = [i.args for i in final_stage(instructions) if i.keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    assert "/opt/venv/bin" in env_of(final_stage(instructions))["PATH"]


def bases(instructions: list[Instruction]) -> list[str]:
    variables = args_of(instructions)
    return [resolve(i.args.split()[0], variables) for i in instructions if i.keyword == "FROM"]


def manylinux_glibc(distribution: str) -> tuple[int, int]:
    """The glibc an installed wheel needs: the newest of its WHEEL's manylinux tags."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    needs = []
    for line in (metadata.distribution(distribution).read_text("WHEEL") or "").splitlines():
        if not line.startswith("Tag:"):
            continue
        platform = line.split(":", 1)[1].strip().split("-")[-1]
        for tag in platform.split("."):
            if match := re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag):
                needs.append((int(match.group(1)), int(match.group(2))))
            elif tag.split("_")[0] in legacy:
                needs.append(legacy[tag.split("_")[0]])
    assert needs, f"{distribution} is not installed from a manylinux wheel"
    return max(needs)


def test_the_image_runs_the_python_minor_that_ci_lints_and_tests(
    instructions: list[Instruction],
) -> None:
    minor = args_of(instructions)["PYTHON_MINOR"]
    assert re.fullmatch(r"3\.\d+", minor), minor
    (base,) = set(bases(instructions))  # both stages: the venv links to the base's interpreter
    assert re.fullmatch(rf"python:{re.escape(minor)}-slim-[a-z]+", base), base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["pylint"]["main"]["py-version"] == minor
    assert pyproject["tool"]["black"]["target-version"] == [f"py{minor.replace('.', '')}"]
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert not re.search(r"apt-get install [^&]*\bpython3", runs), "a second Python in the image"
    assert "sys.version_info" in runs and "${PYTHON_MINOR}" in runs  # the build checks it too
    if os.environ.get("CI"):  # .ci/run: the interpreter running these tests is the one CI tests
        assert minor == f"{sys.version_info.major}.{sys.version_info.minor}", (
            f"the image runs Python {minor}, CI tests {sys.version_info.major}."
            f"{sys.version_info.minor}: change PYTHON_MINOR in the Dockerfile"
        )


def test_the_bases_glibc_runs_the_native_wheels(instructions: list[Instruction]) -> None:
    (base,) = set(bases(instructions))
    release = base.rsplit("-", 1)[-1]
    assert release in GLIBC_OF_DEBIAN, f"{base}: add the glibc of Debian {release}"
    # The local wheels stand for the image's: the same pins, torch the same tags as its CUDA build.
    for distribution in ("c2pa-python", "torch"):
        needs = manylinux_glibc(distribution)
        assert needs <= GLIBC_OF_DEBIAN[release], f"{distribution} needs glibc {needs}, {base}"


def test_torch_is_the_projects_pin_built_for_the_cuda_the_driver_check_asks_for(
    instructions: list[Instruction],
) -> None:
    variables = args_of(instructions)
    cuda = variables["CUDA_VERSION"]
    assert re.fullmatch(r"\d+\.\d", cuda), cuda
    index = variables["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}"
    assert variables["TORCH_VERSION"] == constraints_pin("torch")
    runs = " ".join(resolve(i.args, variables) for i in instructions if i.keyword == "RUN")
    assert f'--index-url "{index}" "torch=={constraints_pin("torch")}"' in runs
    assert "-c constraints.txt" in runs and "+cu" in runs  # the rest pinned; CUDA torch checked
    stage = final_stage(instructions)
    assert any(i.keyword == "ARG" and i.args == "CUDA_VERSION" for i in stage)
    env = {name: resolve(value, variables) for name, value in env_of(stage).items()}
    assert env["NVIDIA_REQUIRE_CUDA"] == f"cuda>={cuda}"
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    users = [i.args for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000


def test_healthcheck_stopsignal_port_and_command(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    by_keyword = {i.keyword: i.args for i in stage}
    health = by_keyword["HEALTHCHECK"]
    options, _, command = health.partition("CMD")
    assert exec_form(command.strip()) == ["python", "-m", "app", "health"]
    assert re.search(r"--start-period=\d+m", options), "the model load needs a start period"
    assert by_keyword["STOPSIGNAL"] == "SIGTERM"
    assert by_keyword["EXPOSE"] == env_of(stage)["METRICS_PORT"] == "9100"
    assert exec_form(by_keyword["CMD"]) == ["python", "-m", "app", "worker"]
    entrypoint = exec_form(by_keyword["ENTRYPOINT"])
    assert entrypoint in ([], ["/usr/bin/tini", "--"])


def test_dejavu_fonts_where_the_signature_code_looks(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    installs = " ".join(i.args for i in stage if i.keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\bfonts-dejavu-core\b", installs)
    font = env_of(stage).get("SIGNATURE_FONT_PATH", DEJAVU_CANDIDATES[0])
    assert font in DEJAVU_CANDIDATES


def test_model_lora_and_compile_caches_are_volumes_owned_by_the_user(
    instructions: list[Instruction],
) -> None:
    stage = final_stage(instructions)
    env = env_of(stage)
    volumes = [v for i in stage if i.keyword == "VOLUME" for v in exec_form(i.args)]
    assert env["HF_HOME"] in volumes
    for directory in (env["LORA_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"]):
        assert any(
            directory == v or directory.startswith(v.rstrip("/") + "/") for v in volumes
        ), directory
    runs = " ".join(i.args for i in stage if i.keyword == "RUN")
    user = [i.args for i in stage if i.keyword == "USER"][-1]
    for volume in volumes:
        assert re.search(rf"chown -R {re.escape(user)} [^&]*{re.escape(volume)}", runs), volume


def test_the_images_environment_names_are_real_settings(instructions: list[Instruction]) -> None:
    for name in env_of(final_stage(instructions)):
        if name not in NOT_SETTINGS:
            assert name.lower() in SETTINGS, f"{name} is not a setting"


# --- .dockerignore ------------------------------------------------------------------------------


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, enough for these patterns: last match wins, ``!`` re-includes, a
    pattern matches a path or any folder above it, ``**/`` matches at any depth."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        options = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        hit = any(
            fnmatch.fnmatchcase(candidate, option)
            or (option.startswith("**/") and fnmatch.fnmatchcase(candidate, "*/" + option[3:]))
            for candidate in candidates
            for option in options
        )
        if hit:
            result = not negate
    return result


def test_dockerignore_keeps_secrets_and_clutter_out_but_not_what_the_image_needs(
    instructions: list[Instruction],
) -> None:
    patterns = ignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/conftest.py",
        "output/x.png",
        ".cache/tiny-sd/unet",
        "app/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v",
        "styles/lora.safetensors",
        "model.ckpt",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the build"
    assert not ignored(".env.example", patterns)
    sources = [
        source
        for i in instructions
        if i.keyword == "COPY" and not i.args.startswith("--from")
        for source in i.args.split()[:-1]
    ]
    assert "app" in sources and "constraints.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), f"{source} is copied but ignored"
        for file in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []:
            relative = file.relative_to(ROOT).as_posix()
            assert "__pycache__" in relative or not ignored(relative, patterns), relative


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator = validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = dict(compose, services={**compose["services"], "bad": {"stop_grace": "1m"}})
    assert list(validator.iter_errors(broken)), "the schema check must be able to fail"


def test_rabbitmq_with_management_and_minio_with_the_buckets(compose: dict[str, Any]) -> None:
    services = compose["services"]
    rabbit = services["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:3[.\d]*-management", rabbit["image"])
    assert {"5672:5672", "15672:15672"} <= set(rabbit["ports"])
    assert "healthcheck" in rabbit and "healthcheck" in services["minio"]
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    env = init["environment"]
    media = SETTINGS["aws_storage_bucket_name"].default
    assert env["MEDIA_BUCKET"].endswith(f":-{media}}}")
    # The worker needs no models bucket; the local stack makes one and names it to the worker,
    # with the same default on both sides.
    assert SETTINGS["s3_models_bucket"].default is None
    worker_models = compose["x-worker"]["environment"]["S3_MODELS_BUCKET"]
    assert env["MODELS_BUCKET"] == worker_models == "${S3_MODELS_BUCKET:-stylelicense-models}"
    script = "\n".join(init["command"])
    assert 'mc mb --ignore-existing "local/$$MEDIA_BUCKET" "local/$$MODELS_BUCKET"' in script


SCALE_PROFILES = {"scale": ("worker-a", "worker-b"), "scale-cpu": ("worker-cpu-a", "worker-cpu-b")}
"""The profiles that run two workers on one queue, and their services."""


def assert_runs_the_worker(worker: dict[str, Any]) -> None:
    """What every worker service of the stack shares: the image, .env, the stack's services."""
    assert worker["build"]["context"] == "."
    assert worker["env_file"][0]["path"] == ".env"
    assert seconds(worker["stop_grace_period"]) >= 300
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["RABBITMQ_HOST"] == "rabbitmq"
    assert worker["environment"]["AWS_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name in worker["environment"]:
        assert name.lower() in SETTINGS, f"{name} is not a setting"


def published_ports(worker: dict[str, Any]) -> list[tuple[int, int]]:
    """(host, container) for each ``HOST:CONTAINER`` port mapping."""
    pairs = []
    for mapping in worker["ports"]:
        host, _, container = str(mapping).rpartition(":")
        pairs.append((int(host), int(container)))
    return pairs


def gpu_device_ids(worker: dict[str, Any]) -> list[str]:
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    return device.get("device_ids", [])


def test_the_worker_gets_a_gpu_and_a_cpu_fallback_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    gpu_device_ids(gpu)
    assert "deploy" not in cpu and cpu["environment"]["MODEL_DEVICE"] == "cpu"
    for worker in (gpu, cpu):
        assert_runs_the_worker(worker)
        assert "9100:9100" in worker["ports"]


def test_the_scale_profiles_run_two_workers_of_the_same_image_on_the_same_queue(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    single = [services["worker"], services["worker-cpu"]]
    queue = SETTINGS["rabbitmq_queue"].default
    assert {w["environment"]["RABBITMQ_QUEUE"] for w in single} == {
        f"${{RABBITMQ_QUEUE:-{queue}}}"
    }, "the single workers consume the queue the backend (and `app submit`) publish to"
    for profile, names in SCALE_PROFILES.items():
        in_profile = [name for name, s in services.items() if profile in s.get("profiles", [])]
        assert sorted(in_profile) == sorted(names), profile
        workers = [services[name] for name in names]
        for worker in workers:
            assert_runs_the_worker(worker)
            assert worker["image"] == single[0]["image"] == single[1]["image"]
            assert worker["build"] == single[0]["build"]
            assert (
                worker["environment"]["RABBITMQ_QUEUE"]
                == single[0]["environment"]["RABBITMQ_QUEUE"]
            )


def test_each_scaled_worker_serves_metrics_on_its_own_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    single_host_ports = {
        host for name in ("worker", "worker-cpu") for host, _ in published_ports(services[name])
    }
    for profile, names in SCALE_PROFILES.items():
        metrics_ports, host_ports = [], []
        for name in names:
            worker = services[name]
            port = int(worker["environment"]["METRICS_PORT"])
            mappings = published_ports(worker)
            assert [container for _, container in mappings] == [port], (name, mappings, port)
            metrics_ports.append(port)
            host_ports.append(mappings[0][0])
        assert len(set(metrics_ports)) == len(names), (profile, metrics_ports)
        assert len(set(host_ports)) == len(names), (profile, host_ports)
        assert not single_host_ports & set(host_ports), "clashes with a single worker's port"


def test_the_gpu_scale_workers_reserve_one_distinct_gpu_each(compose: dict[str, Any]) -> None:
    services = compose["services"]
    reserved = [gpu_device_ids(services[name]) for name in SCALE_PROFILES["scale"]]
    assert all(len(ids) == 1 for ids in reserved), reserved
    assert len({ids[0] for ids in reserved}) == len(reserved), reserved
    for name in SCALE_PROFILES["scale"]:
        # Inside its container the reserved GPU is the only one, index 0: a CUDA_VISIBLE_DEVICES
        # naming the host's index would hide it.
        assert "CUDA_VISIBLE_DEVICES" not in services[name]["environment"]
    for name in SCALE_PROFILES["scale-cpu"]:
        worker = services[name]
        assert "deploy" not in worker and worker["environment"]["MODEL_DEVICE"] == "cpu"
