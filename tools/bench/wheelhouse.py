#!/usr/bin/env python3
"""The wheels a GPU machine without network needs beyond its image, made here and carried in the tree as `.whl/`.

    python3 tools/bench/wheelhouse.py [build] [--dest .whl]   # download/build them, then `check`
    python3 tools/bench/wheelhouse.py check [--dest .whl]     # pip resolves the whole set offline for the target
    python3 tools/bench/wheelhouse.py build --python 3.11 --dest DIR   # the same set for this machine's Python

The image (`gpu-image.txt` beside this file: its Python and packages, versions where known) is the starting point:
what the project needs (setup.cfg's install_requires, requirements-nodeps.txt, the `gpu` extra) and the requirements
of those, recursively, less what the image has, at the versions constraints.txt pins or this environment runs (the
tested set), else the newest pip finds. Sdists (DeepSpeed) are built here with `--no-build-isolation` and must give
a pure-Python wheel. docs/performance.md, "The GPU run", says how the folder is used; its choices are explained there.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from pip_check import allowed  # noqa: E402 - requirements-nodeps.txt's skips, read by one function

IMAGE = Path(__file__).resolve().parent / "gpu-image.txt"
MANIFEST = "MANIFEST.json"
GOAL_MIB = 40
# pip matches a manylinux tag exactly: name every glibc level the image's (glibc 2.39) loader accepts.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64",
                                                                        "linux_x86_64"]
# Carried although the image has them, at the project's pins (what tools/install.sh gives every user, so the figures
# measure what users run). sentence-transformers: PyLate 1.6.0 cannot build a ColBERT with the image's 6.0.1
# (`Dense.from_sentence_transformers`: KeyError 'activation_function', seen here with torch 2.11.0 and transformers
# 5.17.0). transformers: PyLate 1.6.0 declares transformers<=5.3.0; the image's 5.17.0 ran gpu.py here, but a
# benchmark of ModernBERT under another transformers would time another implementation.
OVER_IMAGE = {"sentence-transformers", "transformers"}
# The image's own builds stay theirs: carrying one of these would replace its CUDA stack.
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|jax.*)$")


class WheelhouseError(Exception):
    pass


def read_image(path: Path = IMAGE) -> tuple[str, dict[str, str | None]]:
    """(python version, {canonical name: version or None}) from gpu-image.txt."""
    python, packages = None, {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("python "):
            python = line.split()[1]
            continue
        name, _, ver = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()):
            raise WheelhouseError(f"{path}:{n}: not a package name: {line!r}; write NAME or NAME==VERSION")
        if ver.strip():
            try:
                Version(ver.strip())
            except InvalidVersion:
                raise WheelhouseError(f"{path}:{n}: {ver.strip()!r} is not a version; write NAME or NAME==VERSION")
        packages[canonicalize_name(name.strip())] = ver.strip() or None
    if not python:
        raise WheelhouseError(f"{path}: no `python X.Y.Z` line: say which Python the image runs")
    return python, packages


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return out


def nodeps(path: Path = ROOT / "requirements-nodeps.txt") -> dict[str, tuple[Requirement, set[str]]]:
    """{name: (requirement, the requirements it is installed without)}, the skips as tools/pip_check.py reads them."""
    reqs = {canonicalize_name(Requirement(x.split("#")[0]).name): Requirement(x.split("#")[0])
            for x in path.read_text().splitlines() if x.split("#")[0].strip()}
    return {n: (reqs[n], skips) for n, skips in allowed(path).items()}


def top_requirements() -> list[Requirement]:
    """What the project asks for: install_requires, the `gpu` extra, and the --no-deps packages."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def lines(text: str) -> list[Requirement]:
        return [Requirement(x.strip()) for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]

    out = lines(cfg["options"]["install_requires"]) + lines(cfg["options.extras_require"]["gpu"])
    return out + [req for req, _ in nodeps().values()]


def target_env(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=".".join(python.split(".")[:2]), python_full_version=python, sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", os_name="posix")
    return env


def _target_args(python: str) -> list[str]:
    short = "".join(python.split(".")[:2])
    args = ["--only-binary=:all:", "--python-version", short, "--implementation", "cp", "--abi", f"cp{short}",
            "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def _pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True,
                          text=True, env=env)


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _fetch(req: str, python: str, dest: Path) -> Path:
    """One wheel for the target, downloaded; or built here from its sdist when it must be pure Python."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        r = _pip("download", "--no-deps", "-q", *_target_args(python), "-d", tmp, req)
        if r.returncode != 0:
            if "No matching distribution" not in r.stderr:
                raise WheelhouseError(f"pip download {req} failed:\n{r.stderr.strip()[-2000:]}")
            # No wheel for the target: an sdist (DeepSpeed) builds here against this environment's torch, without
            # its own build environment (which would fetch another torch); its ops are built later, just in time.
            r = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, req,
                     env={**os.environ, "DS_BUILD_OPS": "0"})
            if r.returncode != 0:
                raise WheelhouseError(f"no wheel of {req} for the target and its sdist did not build:\n"
                                      f"{r.stderr.strip()[-2000:]}")
        (built,) = Path(tmp).glob("*.whl")
        tags = parse_wheel_filename(built.name)[3]
        if any(t.platform != "any" for t in tags) and not any(t.platform in PLATFORMS for t in tags):
            raise WheelhouseError(f"{built.name}: built for this machine, not the target: carry a wheel made for it")
        shutil.move(built, dest / built.name)
        return dest / built.name


def _choose(name: str, spec: str, chosen_pins: dict[str, str]) -> str:
    """The requirement to fetch: the pinned version, else this environment's when it fits, else pip's newest."""
    if name in chosen_pins:
        return f"{name}=={chosen_pins[name]}"
    try:
        here = version(name)
        if not spec or Version(here) in Requirement(f"{name}{spec}").specifier:
            return f"{name}=={here}"
    except PackageNotFoundError:
        pass
    return f"{name}{spec}"


def build(dest: Path, python: str | None = None, progress=print) -> dict:
    image_python, image = read_image()
    python = python or image_python
    env = target_env(python)
    want_pins, skip = pins(), nodeps()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        wheels: dict[str, dict] = {}
        extras: dict[str, set[str]] = {}  # the extras each carried package was asked for, its requirements followed
        todo = [(req, "colbertzero") for req in top_requirements()]
        while todo:
            req, by = todo.pop(0)
            name = canonicalize_name(req.name)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if name in skip.get(canonicalize_name(by), (None, set()))[1]:
                continue
            if name in image and name not in OVER_IMAGE and name not in wheels:
                have = image[name]
                if have is None or req.specifier.contains(have, prereleases=True):
                    continue  # the image's meets it (or its version is unknown: gpu.sh reports it there)
                progress(f"[wheelhouse] the image's {name} {have} does not meet {by}'s {req}: carried")
            if NEVER.match(name):
                raise WheelhouseError(f"{name} (required by {by}) is not in {IMAGE.name}; the image's CUDA stack "
                                      "is never carried: say what the image has")
            if name not in wheels:
                path = _fetch(_choose(name, str(req.specifier), want_pins), python, tmp)
                progress(f"[wheelhouse] {path.name} ({path.stat().st_size / 2**20:.1f} MiB) for {by}")
                wheels[name] = {"name": name, "version": str(parse_wheel_filename(path.name)[1]), "file": path.name,
                                "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                "required_by": []}
            wheels[name]["required_by"].append(by)
            new = ({""} | set(req.extras)) - extras.get(name, set())
            extras.setdefault(name, set()).update(new)
            if not new or name in skip:  # a --no-deps package's needs are the project's own (setup.cfg)
                continue
            for r in wheel_requires(tmp / wheels[name]["file"]):
                sub = Requirement(r)
                if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in new):
                    sub.marker = None
                    todo.append((sub, name))
        manifest = {"target": {"python": python, "platforms": PLATFORMS[0] + " … " + PLATFORMS[-1]},
                    "image": IMAGE.name, "wheels": sorted(wheels.values(), key=lambda w: -w["bytes"]),
                    "bytes": sum(w["bytes"] for w in wheels.values())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stub_wheel(folder: Path, name: str, ver: str) -> None:
    """A metadata-only wheel standing in for an image package in the offline resolution (the image itself is not
    here); it declares no requirements: the image satisfies its own."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{ver}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: colbertzero\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def check(dest: Path, python: str | None = None) -> dict:
    """pip's own resolver, offline, for the target: the project's requirements against `.whl` plus the image.

    The image's packages enter as metadata-only stand-ins at the versions gpu-image.txt gives; where it gives none,
    at this environment's version (the tested one), reported as assumed. A requirement an image package does not
    meet fails the check: carry that package (OVER_IMAGE) or say why not."""
    image_python, image = read_image()
    python = python or image_python
    manifest = json.loads((dest / MANIFEST).read_text())
    skip = nodeps()
    env = target_env(python)
    reqs, assumed = [], {}
    for req in top_requirements():
        name = canonicalize_name(req.name)
        if name in skip or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        reqs.append(str(req))
    for name, (_, skipped) in skip.items():  # what a --no-deps package needs, less what it goes without on purpose
        for r in wheel_requires(dest / next(w["file"] for w in manifest["wheels"] if w["name"] == name)):
            sub = Requirement(r)
            if canonicalize_name(sub.name) not in skipped and (sub.marker is None or sub.marker.evaluate(env)):
                sub.marker = None
                reqs.append(str(sub))
    with tempfile.TemporaryDirectory() as stubs, tempfile.TemporaryDirectory() as target:
        for name, ver in image.items():
            if name in OVER_IMAGE:
                continue
            if ver is None:
                try:
                    ver = assumed[name] = version(name)
                except PackageNotFoundError:
                    continue  # unknown and not here: nothing may require it (pip then says so)
            _stub_wheel(Path(stubs), name, ver)
        report = Path(target) / "report.json"
        r = _pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(dest),
                 "--find-links", stubs, *_target_args(python), "--target", str(Path(target) / "site"),
                 "--report", str(report), "-q", *reqs)
        if r.returncode != 0:
            raise WheelhouseError(f"offline resolution for CPython {python} failed:\n{r.stderr.strip()[-3000:]}")
        plan = json.loads(report.read_text())["install"]
        r2 = _pip("install", "--dry-run", "--ignore-installed", "--no-index", "--no-deps", "--find-links", str(dest),
                  *_target_args(python), "--target", str(Path(target) / "site2"), "-q",
                  *[f"{w['name']}=={w['version']}" for w in manifest["wheels"]])
        if r2.returncode != 0:
            raise WheelhouseError(f"a carried wheel does not install on CPython {python}:\n{r2.stderr.strip()[-3000:]}")
    carried = {w["name"] for w in manifest["wheels"]}
    from_whl = sorted(canonicalize_name(p["metadata"]["name"]) for p in plan if str(dest.resolve()) in
                      p["download_info"]["url"])
    from_image = sorted(canonicalize_name(p["metadata"]["name"]) for p in plan if stubs in p["download_info"]["url"])
    unused = sorted(carried - set(from_whl) - set(skip))
    return {"python": python, "ok": True, "requirements": len(reqs), "from_wheelhouse": len(from_whl),
            "from_image": from_image, "image_versions_assumed": {n: assumed[n] for n in from_image if n in assumed},
            "carried_not_needed": unused}


# ---------------------------------------------------------------- on the GPU machine (tools/bench/gpu.sh, gpu.py)
def _site() -> Path | None:
    site = os.environ.get("COLBERTZERO_GPU_SITE")  # where gpu.sh installed .whl/
    return Path(site).resolve() if site else None


def provenance(names) -> dict[str, str]:
    """{name: "VERSION (.whl)" | "VERSION (image)" | "absent"}: which copy of each package this Python imports."""
    from importlib.metadata import distribution

    site, out = _site(), {}
    for name in names:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            out[name] = "absent"
            continue
        where = Path(dist.locate_file("")).resolve()
        out[name] = f"{dist.version} ({'.whl' if site and where.is_relative_to(site) else 'image' if site else 'here'})"
    return out


def unmet(dest: Path | None = None) -> list[str]:
    """Requirements of the carried wheels that this Python's packages do not meet (they were installed --no-deps);
    the skips of requirements-nodeps.txt excepted."""
    from importlib.metadata import distribution

    if _site() is None and dest is None:
        return []  # not a gpu.sh run: the packages here came from tools/install.sh, which pip check judges
    dest = dest or Path(os.environ.get("COLBERTZERO_WHEELHOUSE") or ROOT / ".whl")
    if not dest.is_absolute():
        dest = ROOT / dest
    if not (dest / MANIFEST).exists():
        return []
    skip = nodeps()
    env = default_environment()
    out = []
    for w in json.loads((dest / MANIFEST).read_text())["wheels"]:
        try:
            requires = distribution(w["name"]).requires or []
        except PackageNotFoundError:
            out.append(f"{w['name']} is carried but not installed")
            continue
        for r in requires:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            if canonicalize_name(req.name) in skip.get(w["name"], (None, set()))[1]:
                continue
            try:
                have = version(req.name)
            except PackageNotFoundError:
                out.append(f"{w['name']} needs {req}: absent")
                continue
            if not req.specifier.contains(have, prereleases=True):
                out.append(f"{w['name']} needs {req}: {have} here")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", nargs="?", default="build", choices=["build", "check"])
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p.add_argument("--python", default=None, help="target CPython X.Y[.Z] (default: the image's, gpu-image.txt)")
    args = p.parse_args(argv)
    dest = Path(args.dest).resolve()
    try:
        if args.action == "build":
            m = build(dest, args.python)
            size = m["bytes"] / 2**20
            print(f"[wheelhouse] {len(m['wheels'])} wheels, {size:.1f} MiB in {dest} "
                  f"({'within' if size <= GOAL_MIB else 'OVER'} the {GOAL_MIB} MiB goal)")
        if not (dest / MANIFEST).exists():
            raise WheelhouseError(f"{dest} has no {MANIFEST}: run `python3 tools/bench/wheelhouse.py build` first")
        res = check(dest, args.python)
        assumed = ", ".join(f"{k} {v}" for k, v in res["image_versions_assumed"].items()) or "none"
        print(f"[wheelhouse] offline resolution for CPython {res['python']} x86-64: ok — {res['requirements']} "
              f"requirements met by {res['from_wheelhouse']} carried wheels and {len(res['from_image'])} image "
              f"packages (image versions assumed as tested here: {assumed})")
        if res["carried_not_needed"]:
            print(f"[wheelhouse] carried but not needed: {', '.join(res['carried_not_needed'])}")
    except WheelhouseError as e:
        print(f"wheelhouse: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
