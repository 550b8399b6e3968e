"""The recipe schema (pydantic): every field, its default and its check; the rules for names and for strings that
reach generated scripts; the one parser of Slurm durations. Field meanings: docs/recipes.md."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PHASE_KINDS = ("unsupervised", "supervised", "distillation")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field path."""


# A name that becomes a folder or part of a job name: letters, digits, '_', '.', '-', not '.'/'..', no leading '-'.
_SAFE_NAME = re.compile(r"(?!\.{1,2}$)(?!-)[A-Za-z0-9_.\-]+")
# C0 and C1 controls and Unicode's line and paragraph separators: whatever some reader takes for the end of a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def safe_name(v: str, what: str) -> str:
    """The one rule for names used as path components and in job names."""
    if not _SAFE_NAME.fullmatch(v):
        raise ValueError(f"{what} {v!r}: letters, digits, '_', '.', '-' only, not '.' or '..', not starting with '-' "
                         "(it names a folder and a Slurm job)")
    return v


def no_control_characters(v, what: str):
    """The one rule for strings that reach a generated script or a command line: no newline, tab or other control
    character (a newline in an #SBATCH line would end it and start shell code). Lists are checked item by item."""
    for item in v if isinstance(v, list) else [v]:
        if isinstance(item, str) and _CONTROL.search(item):
            raise ValueError(f"{what} {item!r}: control characters (newline, tab, …) are not allowed here")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InitFrom(_Strict):
    """``init: {from: <phase>}``: start from that phase's exported model (resolved through the manifest)."""

    from_: str = Field(alias="from")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HubFiles(_Strict):
    """Where a source's files come from on the Hugging Face Hub (`colbertzero fetch`): a dataset repository, its
    config and split (the files `data/<split>-*` of the default config, `<config>/<split>-*` otherwise), or `files`,
    a glob inside the repository. The source path ends with the same glob."""

    repo: str
    config: str = "default"
    split: str | None = None
    revision: str | None = None
    files: str | None = None

    @field_validator("repo", "config", "split", "revision", "files")
    @classmethod
    def _one_line(cls, v, info):
        return no_control_characters(v, f"hub.{info.field_name}")


class Source(_Strict):
    """One raw data source. ``columns`` maps the shape's roles to the file's column names."""

    name: str
    path: str  # JSONL file, Parquet file, or a `datasets` save_to_disk folder
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    weight: float | None = Field(default=None, gt=0)
    columns: dict[str, str] = Field(default_factory=dict)
    # Distillation only: the text tables that document/query ids refer to. When absent, the rows carry text
    # (``documents`` list + ``scores`` list) and ids are made by hashing the text.
    queries_path: str | None = None
    documents_path: str | None = None
    max_rows: int | None = Field(default=None, gt=0)
    # Hub coordinates of `path` (and of `queries_path` / `documents_path`), for `colbertzero fetch`.
    hub: dict[Literal["path", "queries_path", "documents_path"], HubFiles] | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return safe_name(v, "source name")


class Data(_Strict):
    sources: list[Source] = Field(min_length=1)
    shards_dir: str  # where `colbertzero prepare` writes the tokenized shards of this phase (one folder per source)
    sampling: Literal["proportional", "weights", "uniform"] = "proportional"
    rows_per_shard: int = Field(default=100_000, gt=0)
    max_negatives: int = Field(default=10, ge=0)  # supervised: hard negatives kept per row
    # supervised, per source: keep the fewest negatives any row has (the paper's script), pad short rows with their
    # own negatives, or refuse rows with fewer than the most any row has; every negative dropped is counted
    negatives: Literal["fewest", "pad", "refuse"] = "fewest"
    # supervised: prepare refuses a source whose policy drops more than this fraction of the negatives its rows hold
    # within max_negatives (what max_negatives itself cuts is the recipe's choice, counted but not held against it)
    max_drop_fraction: float = Field(default=0.05, ge=0, le=1)
    docs_per_query: int = Field(default=32, gt=0)  # distillation: scored documents per query
    length_bucketing: bool = False
    epochs: float = Field(default=1.0, gt=0)
    # Rows expected over all sources, for planning before `prepare` has counted them (the shard index wins).
    expected_rows: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _weights(self) -> "Data":
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        if self.sampling == "weights" and any(s.weight is None for s in self.sources):
            missing = [s.name for s in self.sources if s.weight is None]
            raise ValueError(f"sampling 'weights' needs a weight on every source; missing on {missing}")
        return self


class Prompts(_Strict):
    enabled: bool = True
    query: str = "search_query: "
    document: str = "search_document: "
    # Prompts eat into the token budget; the paper adds their length to query/document length ("+7").
    extra_length: int = Field(default=7, ge=0)


class Cadence(_Strict):
    log_every: int = Field(default=10, gt=0)
    save_every: int = Field(default=500, gt=0)
    eval_every: int | None = Field(default=None, gt=0)  # optional in-training eval on `eval.in_training`
    keep_last: int = Field(default=3, gt=0)


class Resources(_Strict):
    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=4, ge=0)  # GH200: 4; 0 = CPU tasks (one per `cpu_tasks_per_node`)
    cpu_tasks_per_node: int = Field(default=1, gt=0)  # used only when gpus_per_node == 0
    cpus_per_task: int = Field(default=72, gt=0)
    mem: str | None = None  # e.g. "400G"; None = the partition default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_limit: str = "24:00:00"  # [D-]HH:MM:SS or minutes
    signal_seconds: int = Field(default=300, ge=10)  # warning signal before the time limit (checkpoint time)
    max_requeues: int = Field(default=10, ge=0)
    extra_sbatch: list[str] = Field(default_factory=list)  # e.g. ["--container-image=..."], passed verbatim
    setup: list[str] = Field(default_factory=list)  # shell lines run before each task (module load, venv)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @field_validator("partition", "account", "qos", "constraint", "extra_sbatch")
    @classmethod
    def _sbatch_strings(cls, v, info):
        return no_control_characters(v, f"resources.{info.field_name}")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time_limit(cls, v) -> str:
        v = str(v) if isinstance(v, int) else v  # `time_limit=90` means 90 minutes, as for sbatch
        parse_time_limit(v)
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+[KMGT]?", v):
            raise ValueError(f"mem {v!r}: expected Slurm's form such as '400G' or '64000M'")
        return v


# The fields of `resources` a cluster profile may set for every phase (what is the same for every job on one site).
CLUSTER_RESOURCE_FIELDS = ("gpus_per_node", "cpus_per_task", "mem", "partition", "account", "qos", "constraint",
                           "time_limit", "signal_seconds")


class Container(_Strict):
    """The container every task of the run runs in, applied to the task's `srun` (never to the batch script: the
    batch script, the requeue decision and job submission stay on the host, where Slurm's commands are). Per
    runtime (docs/cluster.md): pyxis `--container-image/--container-mounts/--container-workdir`; cscs-edf
    `--environment=<EDF>` (image = the EDF's name or path; mounts and workdir live in the EDF); apptainer `apptainer
    exec --nv [--bind …] [--pwd …] IMAGE`; slurm-oci Slurm's own `--container=<OCI bundle>`; command: ``command`` as
    the prefix of the task's command line (podman-hpc, shifter, a site's wrapper)."""

    runtime: Literal["pyxis", "cscs-edf", "apptainer", "slurm-oci", "command"]
    image: str | None = None
    mounts: list[str] = Field(default_factory=list)  # host:container[:flags]
    workdir: str | None = None
    command: list[str] = Field(default_factory=list)  # runtime `command` only
    # The interpreter inside the container (a venv made there with --system-site-packages, on the shared
    # filesystem); None: the path of the Python that submits, which then has to exist inside the container too.
    python: str | None = None

    @field_validator("image", "mounts", "workdir", "command", "python")
    @classmethod
    def _one_line(cls, v, info):
        return no_control_characters(v, f"cluster.container.{info.field_name}")

    @model_validator(mode="after")
    def _complete(self) -> "Container":
        if self.runtime == "command":
            if not self.command:
                raise ValueError("cluster.container: runtime 'command' needs `command`, the prefix of the task's "
                                 "command line (e.g. [podman-hpc, run, --gpu, IMAGE])")
            if self.image or self.mounts or self.workdir:
                raise ValueError("cluster.container: runtime 'command' takes the whole prefix in `command`; image, "
                                 "mounts and workdir are for the other runtimes")
        else:
            if not self.image:
                raise ValueError(f"cluster.container: runtime {self.runtime!r} needs `image` ("
                                 + {"pyxis": "an image reference or a .sqsh file",
                                    "cscs-edf": "the EDF's name or path",
                                    "apptainer": "a .sif file or a docker:// reference",
                                    "slurm-oci": "the OCI bundle's folder"}[self.runtime] + ")")
            if self.command:
                raise ValueError(f"cluster.container: `command` is for runtime 'command', not {self.runtime!r}")
            if self.runtime == "cscs-edf" and (self.mounts or self.workdir):
                raise ValueError("cluster.container: with cscs-edf the mounts and the workdir are written in the EDF "
                                 "(its `mounts` and `workdir` entries), not here")
            if self.runtime == "slurm-oci" and (self.mounts or self.workdir):
                raise ValueError("cluster.container: with slurm-oci the mounts and the workdir are the OCI bundle's "
                                 "(its config.json), not here")
        return self


class Cluster(_Strict):
    """Where the run's jobs run: what a site's documentation says every job there needs. Written in a profile
    (`clusters/<name>.yaml`, `cluster: <name or path>` in a recipe, `--cluster` on the command line); the recipe's
    own values win over the profile's. Fields: docs/cluster.md."""

    name: str
    file: str | None = None  # the profile it was read from
    description: str = ""
    resources: dict[str, Any] = Field(default_factory=dict)  # defaults of every phase's resources
    setup: list[str] = Field(default_factory=list)  # shell lines before every job's tasks (module load …)
    environment: dict[str, str] = Field(default_factory=dict)  # exported for every task (NCCL / libfabric)
    srun_args: list[str] = Field(default_factory=list)  # added to every task's srun (e.g. --mpi=pmi2)
    container: Container | None = None
    # NCCL networks ("AWS Libfabric", "IB") a multi-node GPU phase must use: any other (a fallback to TCP
    # sockets) stops the phase with the settings to fix.
    require_network: list[str] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict)  # setting -> the public page it comes from

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return safe_name(v, "cluster name")

    @field_validator("setup", "srun_args", "require_network")
    @classmethod
    def _lines(cls, v, info):
        return no_control_characters(v, f"cluster.{info.field_name}")

    @field_validator("environment", mode="before")
    @classmethod
    def _env(cls, v):
        if not isinstance(v, dict):
            return v  # pydantic says what is wrong with it
        for k, value in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"cluster.environment: {k!r} is not a variable name")
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"cluster.environment.{k}: {value!r}: a string or a number")
            no_control_characters(str(value), f"cluster.environment.{k}")
        return {k: str(value) for k, value in v.items()}  # YAML's `1` is exported as written

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(CLUSTER_RESOURCE_FIELDS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not set by a cluster profile (it may set "
                             f"{', '.join(CLUSTER_RESOURCE_FIELDS)}; the rest belongs to each phase)")
        Resources.model_validate(v)  # each value checked by the phase field's own rule
        return v


class PrepareResources(_Strict):
    """The CPU job that tokenizes shards (a Slurm array: each task takes a share of every source's shards)."""

    array_tasks: int = Field(default=4, gt=0)
    workers: int = Field(default=8, gt=0)  # processes per array task
    cpus_per_task: int | None = Field(default=None, gt=0)  # None: the first phase's (fits its partition)
    mem: str | None = None
    partition: str | None = None  # None = the first phase's partition
    account: str | None = None
    qos: str | None = None
    time_limit: str = "04:00:00"
    extra_sbatch: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, v: str) -> str:
        parse_time_limit(v)
        return v

    @field_validator("partition", "account", "qos", "mem", "extra_sbatch")
    @classmethod
    def _sbatch_strings(cls, v, info):
        return no_control_characters(v, f"prepare.{info.field_name}")


class Watchdog(_Strict):
    """A step far slower than usual is a hang: the rank dumps its stacks and leaves to be requeued."""

    step_factor: float = Field(default=20.0, gt=1)  # × the running median step time …
    min_seconds: float = Field(default=900.0, gt=0)  # … and at least this (the first steps warm up)
    collective_timeout_s: int = Field(default=1800, gt=0)  # torch.distributed's own timeout of a collective


class DeepSpeedCfg(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only


class _HelperJob(_Strict):
    """Resources of a one-task helper job (an evaluation, a derive step's array task); its strings reach #SBATCH
    lines, so they follow the rule for those."""

    _where: ClassVar[str] = ""
    partition: str | None = None  # None: the cluster's default partition
    time_limit: str = "1:00:00"
    cpus_per_task: int | None = Field(default=None, gt=0)  # None: the phase's own (derive: the prepare job's)
    mem: str | None = None

    @field_validator("partition", "time_limit", "mem")
    @classmethod
    def _strings(cls, v, info):
        no_control_characters(v, f"{cls._where}.{info.field_name}")
        if info.field_name == "time_limit":
            parse_time_limit(v)
        return v


@dataclass(frozen=True)
class HelperRequest:
    """What one helper job (an in-training evaluation, a derive step's array task) asks for, its defaults resolved;
    ``where`` names its recipe fields. `Recipe.eval_request` / `Recipe.derive_request` are the one rule for them."""

    where: str
    partition: str | None
    time_limit: str
    cpus_per_task: int
    gpus: int
    mem: str | None


class EvalJob(_HelperJob):
    """The job (Slurm) or background process (local) that scores an in-training export off the training ranks."""

    _where: ClassVar[str] = "eval.job"
    gpus: int | None = Field(default=None, ge=0)  # None: 1 when the phase runs on GPUs, else 0
    # After the phase, rank 0 waits this long for its evaluation jobs still queued or running; then they are
    # cancelled and recorded as abandoned (no job of a run outlives it). Its GPUs are held while it waits.
    wait_s: int = Field(default=600, ge=0)


class Eval(_Strict):
    beir: list[str] = Field(default_factory=list)  # BEIR-layout or NanoBEIR-parquet folders, run after the phase
    in_training: list[str] = Field(default_factory=list)  # small sets for `cadence.eval_every`
    # job: rank 0 writes an export and a separate job/process scores it while training goes on;
    # inline: rank 0 scores in the training process while the other ranks wait
    where: Literal["job", "inline"] = "job"
    job: EvalJob = Field(default_factory=EvalJob)
    max_corpus: int | None = Field(default=None, gt=0)  # subsample the corpus (keeps every judged document)
    batch_size: int = Field(default=32, gt=0)
    # eval.beir, as `colbertzero beir` runs it (docs/reproducing.md, step 6)
    lengths: Literal["pylate-beir", "model"] = "pylate-beir"
    dtype: Literal["float16", "float32"] = "float16"
    shard_docs: int = Field(default=250_000, gt=0)


class Reference(_Strict):
    """The paper's figures for this pipeline, printed beside ours in plans and reports."""

    beir_ndcg10: float | None = None
    gpu_hours: float | None = None
    hardware: str | None = None
    per_dataset: dict[str, float] = Field(default_factory=dict)
    note: str | None = None


class Phase(_Strict):
    kind: Literal["unsupervised", "supervised", "distillation"]
    init: str | InitFrom
    data: Data
    # optimisation
    lr: float = Field(gt=0)
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(default=None, ge=0)  # wins over warmup_ratio when set
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    global_batch_size: int = Field(gt=0)  # queries per optimizer step, over all ranks and accumulation
    gradient_accumulation: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # caps the epoch-derived step count
    # loss
    temperature: float = Field(default=1.0, gt=0)
    learnable_temperature: bool = False
    gradcache_mini_batch: int | None = Field(default=None, gt=0)  # None = no GradCache
    gather_across_ranks: bool = True
    # What the optimizer sees: the gradient of the global-mean loss (1), or that times the world size or the global
    # batch, as PyLate's gathered Contrastive / CachedContrastive give it (docs/reproducing.md: with clipping at
    # max_grad_norm these are different updates, and the paper's were the scripts').
    loss_scale: Literal[1, "world_size", "global_batch"] = 1
    # model inputs
    query_length: int = Field(default=32, gt=1)
    document_length: int = Field(default=180, gt=1)
    prompts: Prompts = Field(default_factory=Prompts)
    seed: int = 42
    bf16: bool = True  # on GPU; CPU always runs fp32
    # MaxSim in the loss: PyLate's torch scores, or late-interaction-kernels' fused kernel (CUDA, `.[gpu]`); auto =
    # the kernel when it runs on the phase's device. Chosen once per phase and recorded (colbertzero/scoring.py).
    scores_backend: Literal["auto", "torch", "lik"] = "auto"
    cadence: Cadence = Field(default_factory=Cadence)
    resources: Resources = Field(default_factory=Resources)
    deepspeed: DeepSpeedCfg = Field(default_factory=DeepSpeedCfg)
    watchdog: Watchdog = Field(default_factory=Watchdog)
    eval: Eval = Field(default_factory=Eval)
    budget_gpu_hours: float | None = Field(default=None, gt=0)
    reference: Reference = Field(default_factory=Reference)

    @property
    def effective_query_length(self) -> int:
        return self.query_length + (self.prompts.extra_length if self.prompts.enabled else 0)

    @property
    def effective_document_length(self) -> int:
        return self.document_length + (self.prompts.extra_length if self.prompts.enabled else 0)

    @property
    def eval_jobs_used(self) -> bool:
        """Does the phase start evaluation jobs (in-training evaluation off the training ranks)?"""
        return bool(self.cadence.eval_every and self.eval.in_training and self.eval.where == "job")

    @property
    def init_from(self) -> str | None:
        return self.init.from_ if isinstance(self.init, InitFrom) else None

    def gradient_scale(self, world_size: int) -> float:
        """The factor on the global-mean gradient that ``loss_scale`` asks for, with this many ranks. A contrastive
        problem is one accumulation group: ``global_batch`` is the queries scored together."""
        if self.loss_scale == "world_size":
            return float(world_size)
        if self.loss_scale == "global_batch":
            return float(self.global_batch_size // self.gradient_accumulation)
        return 1.0

    @property
    def micro_batch_per_rank(self) -> int:
        """Queries each rank handles per accumulation step."""
        return self.global_batch_size // (self.resources.world_size * self.gradient_accumulation)


class Model(_Strict):
    """Run-wide ColBERT settings (PyLate's names); the same for every phase so checkpoints chain."""

    embedding_size: int = Field(default=128, gt=0)
    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_punctuation: bool = True
    # The encoder's attention kernel (transformers' attn_implementation); None = transformers' choice for the model.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None

    @model_validator(mode="after")
    def _flash_unpadding(self) -> "Model":
        if self.attn_implementation == "flash_attention_2" and self.do_query_expansion \
                and not self.attend_to_expansion_tokens:
            raise ValueError(
                "attn_implementation flash_attention_2 with query expansion and attend_to_expansion_tokens false: "
                "ModernBERT unpads its inputs under flash attention, and the [MASK] expansion tokens (attention mask "
                "0) come out as zeros (PyLate issues #109, #125), so the model trains on empty query tokens. Use "
                "sdpa, or set model.attend_to_expansion_tokens: true")
        return self


class DeriveStep(_HelperJob):
    """A `colbertzero mine` or `score` run the phases' data comes from (docs/own-data.md): run before prepare (local)
    or submitted as an array ahead of it (Slurm); skipped once its output is complete."""

    _where: ClassVar[str] = "derive"
    name: str
    kind: Literal["mine", "score"]
    out: str
    args: dict[str, Any]  # the command's settings by field name: input, name, retriever, teacher, margin, …
    shards: int = Field(default=1, gt=0)  # query ranges: Slurm array tasks
    time_limit: str = "04:00:00"
    gpus: int = Field(default=0, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return safe_name(v, "derive step name")


class Recipe(_Strict):
    name: str
    description: str = ""
    model: Model = Field(default_factory=Model)
    phases: dict[str, Phase] = Field(min_length=1)
    budget_gpu_hours: float | None = Field(default=None, gt=0)  # for the whole run
    allow_prompt_mismatch: bool = False
    prepare: PrepareResources = Field(default_factory=PrepareResources)
    derive: list[DeriveStep] = Field(default_factory=list)  # mine / score before prepare, in this order
    cluster: Cluster | None = None  # the site's profile, resolved (recipe/loading.py)
    reference: Reference = Field(default_factory=Reference)
    # Where training metrics go besides phases/<phase>/logs/train.jsonl (each when its package is installed).
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    # where the recipe came from (set by load_recipe; not part of the hash)
    source_path: str | None = Field(default=None, exclude=True)
    # {field: "recipe" or the cluster profile it came from}, for the settings a profile touches (load_recipe)
    provenance: dict[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return safe_name(v, "recipe name")

    @model_validator(mode="after")
    def _chain(self) -> "Recipe":
        names = list(self.phases)
        for i, (name, ph) in enumerate(self.phases.items()):
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"phases.{name}: phase names may hold letters, digits, '_' and '-' only")
            src = ph.init_from
            if src is not None and src not in names[:i]:
                raise ValueError(
                    f"phases.{name}.init.from: {src!r} is not an earlier phase (earlier: {names[:i] or 'none'})"
                )
        return self

    def eval_request(self, phase_name: str) -> HelperRequest:
        """An in-training evaluation job of the phase: the phase's CPUs and (on GPUs) one GPU unless set."""
        ph = self.phase(phase_name)
        job = ph.eval.job
        gpus = job.gpus if job.gpus is not None else (1 if ph.resources.gpus_per_node else 0)
        return HelperRequest(f"phases.{phase_name}.eval.job", job.partition, job.time_limit,
                             job.cpus_per_task or ph.resources.cpus_per_task, gpus, job.mem)

    def prepare_request(self) -> HelperRequest:
        """A task of the prepare array: partition and CPUs of the first phase unless set."""
        pr, first = self.prepare, next(iter(self.phases.values())).resources
        return HelperRequest("prepare", pr.partition or first.partition, pr.time_limit,
                             pr.cpus_per_task or first.cpus_per_task, 0, pr.mem)

    def derive_request(self, i: int) -> HelperRequest:
        """A task of derive step ``i``'s array: the prepare job's CPUs unless set."""
        step = self.derive[i]
        return HelperRequest(f"derive[{i}]", step.partition, step.time_limit,
                             step.cpus_per_task or self.prepare_request().cpus_per_task, step.gpus, step.mem)

    def phase(self, name: str) -> Phase:
        if name not in self.phases:
            raise RecipeError(f"recipe {self.name!r} has no phase {name!r}; phases: {', '.join(self.phases)}")
        return self.phases[name]

    def resolved(self) -> dict[str, Any]:
        """Plain data as resolved (what the manifest stores and the hash covers)."""
        return self.model_dump(mode="json", by_alias=True)

    def hash(self) -> str:
        return config_hash(self.resolved())


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_TL = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+)(?:\.\d+)?)?$")


def parse_time_limit(v: str | int) -> int:
    """A Slurm duration → seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, as `--time` takes and squeue /
    sacct print them (their fractions of a second are dropped). The one parser of Slurm durations."""
    s = str(v).strip()
    m = _TL.match(s)
    if not m:
        raise ValueError(f"time limit {v!r}: expected Slurm's form such as '24:00:00', '2-00:00:00' or '90'")
    d, a, b, c = m.groups()
    if d is not None:  # D-HH[:MM[:SS]]
        return int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if b is None:  # MM
        return int(a) * 60
    if c is None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 3600 + int(b) * 60 + int(c)


def format_time_limit(seconds: int) -> str:
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"
