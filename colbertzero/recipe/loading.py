"""Reading recipes: YAML (safe, duplicate keys refused), ``extends:`` chains, ``${VAR}`` / ``${VAR:-default}``,
paths made absolute against the file that wrote them, dotted command-line overrides; one clear message for anything
wrong, naming the file and the field."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import Cluster, Recipe, RecipeError

# Shipped cluster profiles: `cluster: <name>` reads clusters/<name>.yaml of the project.
CLUSTERS_DIR = Path(__file__).resolve().parents[2] / "clusters"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise RecipeError(f"{where}: environment variable ${{{var}}} is not set (set it or write "
                              f"${{{var}:-default}})")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("__replace__"):
            out[k] = deep_merge(out[k], v)
        else:
            if isinstance(v, dict):
                v = {kk: vv for kk, vv in v.items() if kk != "__replace__"}
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base loader says what is wrong with it
                continue
            if first != key_node.start_mark.line + 1:
                raise RecipeError(f"{self.name}: key {key!r} is written twice, on lines {first} and "
                                  f"{key_node.start_mark.line + 1}; keep one of them")
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; give the recipe's YAML file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping at top level, got {type(data).__name__}")
    return data


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself ({' -> '.join(map(str, seen + (path,)))})")
    data = _read_yaml(path)
    _absolutize(data, path.parent)
    _cluster_as_mapping(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _load_raw((path.parent / parent), seen + (path,))
    merged = deep_merge(base, data)
    # `phases: {name: null}` in a derived recipe drops that phase (e.g. pipeline (b) skips `unsupervised`).
    if isinstance(merged.get("phases"), dict):
        merged["phases"] = {k: v for k, v in merged["phases"].items() if v is not None}
    return merged


# Fields holding filesystem paths, made absolute relative to the file that wrote them (so `extends` works).
_PATH_KEYS = {"path", "queries_path", "documents_path", "shards_dir", "input", "corpus", "out"}


def _is_local_ref(s: str) -> bool:
    return s.startswith(("./", "../", "/", "~", "${"))


def _absolutize(node: Any, base: Path, key: str | None = None, parent_key: str | None = None) -> None:
    if isinstance(node, dict):
        for k, v in list(node.items()):
            if isinstance(v, str) and (k in _PATH_KEYS or (k == "init" and _is_local_ref(v))):
                node[k] = _abs(v, base)
            elif isinstance(v, list) and k in ("beir", "in_training"):
                node[k] = [_abs(x, base) if isinstance(x, str) else x for x in v]
            else:
                _absolutize(v, base, k, key)
    elif isinstance(node, list):
        for v in node:
            _absolutize(v, base, key, parent_key)


def _abs(v: str, base: Path) -> str:
    # Expand ${VAR:-default} first so a relative default is anchored to the file that wrote it.
    p = Path(os.path.expanduser(_expand(v, "path")))
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected dotted.path=value, e.g. phases.supervised.lr=1e-5")
    key, _, raw = text.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override {text!r}: empty name in the dotted path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # `key=query: ` is the string "query: ", not a mapping; only explicit {…}/[…] build structures.
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw
    # YAML 1.1 reads 00:10:00 as the base-60 integer 600; a value written with ':' is a time or a string.
    if isinstance(value, int) and ":" in raw:
        value = raw.strip()
    # YAML reads 1e-5 as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            pass
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(keys[:i])} is not a mapping")
            if k not in node:
                if k in ("phases",) or (i == 1 and keys[0] == "phases"):
                    have = ", ".join(node) if isinstance(node, dict) else ""
                    raise RecipeError(f"override {text!r}: no {'.'.join(keys[: i + 1])} (have: {have})")
                node[k] = {}
            node = node[k]
        if not isinstance(node, dict):
            raise RecipeError(f"override {text!r}: {'.'.join(keys[:-1])} is not a mapping")
        node[keys[-1]] = value
    return data


def _floats(node: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string; recipes mean a number."""
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+", node):
        return float(node)
    return node


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "str", "InitFrom")))
        msg = e["msg"]
        msg = re.sub(r"^Value error, ", "", msg)
        msg = msg.replace("Input should be greater than", "must be >").replace(
            "Input should be less than", "must be <"
        )
        msg = msg.replace("Extra inputs are not permitted", "unknown field (check its spelling in docs/recipes.md)")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return f"{where}: invalid recipe\n" + "\n".join(dict.fromkeys(lines))


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    data = _floats(_expand(data, "recipe"))
    # expanded ${VAR:-relative} defaults still need anchoring
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where)) from None
    return r


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, cluster: str | None = None) -> Recipe:
    """``cluster``: a profile's name or path (`--cluster`), in place of the recipe's `cluster.profile`."""
    path = Path(path)
    data = _load_raw(path)
    data = apply_overrides(data, ([f"cluster.profile={cluster}"] if cluster else []) + (overrides or []))
    data = _expand(data, "recipe")
    _absolutize(data, path.resolve().parent)
    provenance = resolve_cluster(data)
    r = recipe_from_dict(data, str(path))
    r.source_path = str(path.resolve())
    r.provenance = provenance
    return r


def _cluster_as_mapping(data: dict, base: Path) -> None:
    """`cluster: alps` is `cluster: {profile: alps}`; a profile written as a path is read relative to its file."""
    c = data.get("cluster")
    if isinstance(c, str):
        c = data["cluster"] = {"profile": c}
    if isinstance(c, dict) and isinstance(c.get("profile"), str) and _is_profile_path(c["profile"]):
        c["profile"] = _abs(c["profile"], base)


def _is_profile_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".yaml", ".yml"))


def profile_path(ref: str) -> Path:
    """A profile's name (clusters/<name>.yaml of the project) or path."""
    if _is_profile_path(ref):
        return Path(os.path.expanduser(ref)).resolve()
    path = CLUSTERS_DIR / f"{ref}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))
        raise RecipeError(f"cluster profile {ref!r}: no {path}; shipped profiles: {', '.join(have) or 'none'} (or "
                          "give a profile's path)")
    return path


def load_cluster(ref: str) -> Cluster:
    """A cluster profile by name or path, on its own (commands outside a recipe: `beir --cluster`)."""
    data = {"cluster": {"profile": ref}}
    resolve_cluster(data)
    return Cluster.model_validate(data["cluster"])


def resolve_cluster(data: dict) -> dict[str, str]:
    """Read the recipe's cluster profile (`cluster.profile`) under its own settings, and give every phase the
    profile's resources where the phase does not set them. Returns {field: where its value came from}; a recipe
    that was resolved already (a run dir's recipe.yaml) is left as it is."""
    c = data.get("cluster")
    if c is None:
        return {}
    if not isinstance(c, dict):
        raise RecipeError(f"cluster: {c!r}: a profile's name or path, or a mapping (docs/cluster.md)")
    if "profile" not in c:
        return {}
    ref = str(c["profile"])
    file = profile_path(ref)
    profile = _expand(_read_yaml(file), f"{file}: cluster")
    own = {k: v for k, v in c.items() if k != "profile"}
    merged = deep_merge({"name": file.stem, **profile}, own)
    merged["file"] = str(file)
    try:
        cluster = Cluster.model_validate(merged)
    except ValidationError as e:
        text = format_validation_error(e, f"{file} (cluster profile {ref!r})")
        raise RecipeError(text.replace("invalid recipe", "invalid cluster profile").replace("\n  ", "\n  cluster.")
                          .replace("docs/recipes.md", "docs/cluster.md")) from None
    data["cluster"] = cluster.model_dump(mode="json")
    where = f"cluster {cluster.name} ({file})"
    provenance = {f"cluster.{k}": ("recipe" if k in own else where) for k in merged if k not in ("name", "file")}
    for name, phase in (data.get("phases") or {}).items():
        if not isinstance(phase, dict):
            continue
        res = phase.setdefault("resources", {})
        if not isinstance(res, dict):
            continue
        for key, value in cluster.resources.items():
            field = f"phases.{name}.resources.{key}"
            if key in res:
                provenance[field] = "recipe"
            else:
                res[key] = value
                provenance[field] = ("recipe's cluster.resources" if key in (own.get("resources") or {})
                                     else where)
    return provenance


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)
