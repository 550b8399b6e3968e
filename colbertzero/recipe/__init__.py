"""Recipes: the single source of truth for a run.

A recipe is YAML: run-wide settings plus an ordered mapping of phases (``phases: {name: {...}}``; YAML mappings keep
their order). A recipe may ``extends:`` another (path relative to itself) and override only what differs, which is
how the paper's ablations are written. Strings may use ``${VAR}`` / ``${VAR:-default}`` (cluster paths such as
``${SCRATCH}``). Relative paths resolve against the recipe file's folder. Command-line overrides are dotted:
``phases.supervised.lr=1e-5``. `schema` holds the fields and their checks, `loading` the reading.
"""

from .loading import (
    apply_overrides,
    deep_merge,
    dump_recipe,
    format_validation_error,
    load_recipe,
    parse_override,
    recipe_from_dict,
)
from .schema import (
    PHASE_KINDS,
    Cadence,
    Cluster,
    Container,
    Data,
    DeepSpeedCfg,
    Eval,
    HubFiles,
    InitFrom,
    Model,
    Phase,
    PrepareResources,
    Prompts,
    Recipe,
    RecipeError,
    Reference,
    Resources,
    Source,
    Watchdog,
    config_hash,
    format_time_limit,
    no_control_characters,
    parse_time_limit,
    safe_name,
)

__all__ = [
    "PHASE_KINDS", "Cadence", "Cluster", "Container", "Data", "DeepSpeedCfg", "Eval", "HubFiles", "InitFrom", "Model",
    "Phase", "PrepareResources", "Prompts", "Recipe", "RecipeError", "Reference", "Resources", "Source", "Watchdog",
    "apply_overrides", "config_hash", "deep_merge", "dump_recipe", "format_time_limit", "format_validation_error",
    "load_recipe", "no_control_characters", "parse_override", "parse_time_limit", "recipe_from_dict", "safe_name",
]
