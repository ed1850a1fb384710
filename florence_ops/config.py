"""Typed configuration loaded from params.yaml.

Every knob of the pipeline is a field below; its default is params.yaml's value (a test compares them) and
params.yaml documents it. pydantic validates names and types before any stage does work: an unknown key or a value of
the wrong type raises `ConfigError` naming the key (for example `train.grad_accum_steps: expected int, got 'two'`).
Reading the YAML, dotted overrides and the wording of those errors are `florence_ops.params_file`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import StrictBool, StrictFloat, StrictInt, TypeAdapter, ValidationError

from florence_ops.errors import ConfigError
from florence_ops.params_file import apply_overrides, read_yaml, validated, validation_problem

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


@validated
class Paths:
    raw: str = "data/raw"  # download output: each page once, and the questions of each split (Parquet)
    processed: str = "data/processed"  # preprocess output: validated, resized, training-ready
    base_model: str = "models/base"  # download output: the model fine-tuning starts from
    train: str = "models/train"  # train output: fine-tuned model (HF layout) + resumable state
    checkpoints: str = "checkpoints"  # resumable training state (not a DVC output: survives a killed run)
    export: str = "models/export"  # export output: merged model + processor + model card
    vision_cache: str = ".cache/vision_features"  # frozen vision tower outputs, keyed by model+data
    reports: str = "reports"  # metrics, predictions, plots, HTML report
    live: str = "reports/train"  # DVCLive directory of the train stage


@validated
class SyntheticData:
    train_documents: StrictInt = 240
    validation_documents: StrictInt = 40
    test_documents: StrictInt = 20
    questions_per_document: StrictInt = 4

    def __post_init__(self) -> None:
        if min(self.train_documents, self.validation_documents, self.questions_per_document) < 1:
            raise ConfigError("data.synthetic: need at least one train and one validation document and question")


@validated
class HubData:
    dataset: str = "HuggingFaceM4/DocumentVQA"
    revision: str | None = None  # pin a commit sha or tag for reproducible runs
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = None  # DocVQA withholds test answers: list test in data.unlabeled_splits to keep it
    max_samples: StrictInt | None = None  # per split, for quick runs


@validated
class LocalData:
    path: str | None = None  # folder holding annotations.jsonl and the images it names
    validation_fraction: StrictFloat = 0.1  # used only for records without a `split` field
    test_fraction: StrictFloat = 0.1

    def __post_init__(self) -> None:
        if min(self.validation_fraction, self.test_fraction) < 0 or self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("data.local: validation_fraction and test_fraction must be >= 0 and sum to < 1")


@validated
class DataConfig:
    source: Literal["synthetic", "hf", "local"] = "synthetic"
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    hf: HubData = field(default_factory=HubData)
    local: LocalData = field(default_factory=LocalData)
    max_bad_fraction: StrictFloat = 0.01  # preprocess fails when more records than this are quarantined
    max_image_pixels: StrictInt = 100_000_000  # larger images are quarantined as decompression bombs
    num_workers: StrictInt = 0  # processes rendering synthetic pages and preprocessing images; 0 means one per CPU core
    unlabeled_splits: list[str] = field(default_factory=list)  # splits kept without answers (DocVQA's test)
    encode_pages: StrictBool = False  # preprocess also builds train's vision-feature cache (vision/preprocess_build.py)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: expected a fraction in [0, 1], got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0 (0: one per CPU core), got {self.num_workers}")
        if set(self.unlabeled_splits) - {"test"}:
            raise ConfigError(
                f"data.unlabeled_splits: only test may be unlabeled (train and validation need answers to train and "
                f"score on), got {self.unlabeled_splits}"
            )
        if self.source == "local" and not self.local.path:
            raise ConfigError("data.local.path: required when data.source is 'local'")


@validated
class TinyModel:
    """The architecture of Florence-2 at toy size, built from a config: no download, trains on CPU."""

    image_size: StrictInt = 256
    vision_dims: list[StrictInt] = field(default_factory=lambda: [32, 64, 96, 128])
    vision_heads: list[StrictInt] = field(default_factory=lambda: [1, 2, 3, 4])
    d_model: StrictInt = 128
    layers: StrictInt = 2  # encoder layers and decoder layers each
    heads: StrictInt = 4
    ffn_dim: StrictInt = 256
    vocab_size: StrictInt = 1024  # byte-level BPE trained on the synthetic corpus


LOCAL_MODELS = ("tiny", "base-shape", "large-shape")  # built by the download stage, nothing downloaded


@validated
class ModelConfig:
    # 'tiny', 'base-shape' / 'large-shape' (Florence-2-base/-large architecture, random weights, built locally from
    # `reference_files`), a hub id (e.g. florence-community/Florence-2-base-ft) or a local HF directory
    name: str = "tiny"
    revision: str | None = None  # pin a hub commit for reproducible runs
    trust_remote_code: StrictBool = False  # only for the original remote-code checkpoints
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    reference_files: str = "../shared/reference/florence-2-base-ft"  # checkpoint config/tokenizer files for *-shape
    vision_batch_size: StrictInt = 32  # pages per vision-tower call: the cache build, or the tower in the step
    vision_compile: StrictBool = False  # torch.compile the tower's repeated blocks where it runs without gradients
    tiny: TinyModel = field(default_factory=TinyModel)

    def __post_init__(self) -> None:
        if self.vision_batch_size < 1:
            raise ConfigError("model.vision_batch_size must be >= 1")


@validated
class LoraSettings:
    enabled: StrictBool = False
    r: StrictInt = 8
    alpha: StrictInt = 16
    dropout: StrictFloat = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


FREEZABLE = ("vision_tower", "projector", "text_encoder")


@validated
class TrainConfig:
    prompt: str = "<DocVQA>"  # task prefix put before every question
    freeze: list[str] = field(default_factory=lambda: ["vision_tower"])  # parts of FREEZABLE kept fixed
    grad_accum_steps: StrictInt = 1
    max_grad_norm: StrictFloat = 1.0
    weight_decay: StrictFloat = 0.01
    warmup_ratio: StrictFloat = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    precision: Literal["auto", "bf16", "bf16-pure", "fp32"] = "auto"  # auto, bf16: bf16 autocast on CUDA (fp32 on CPU)
    max_question_tokens: StrictInt = 64
    max_answer_tokens: StrictInt = 32
    vision_cache: StrictBool = True  # cache the frozen vision tower's output once per image
    streaming: StrictBool = False  # each process reads its own shards of the processed data, never a split whole
    length_grouping: StrictInt = 1  # batches per pool sorted by question length (1: plain shuffling)
    num_workers: StrictInt = 0  # DataLoader workers
    compile: StrictBool = False  # torch.compile the training step's model and loss (once, dynamic shapes)
    fused_kernels: StrictBool = True  # Triton kernels: encoder elementwise passes, cross-attention (CUDA, no compile)
    gradient_checkpointing: StrictBool = False
    checkpoint_every: StrictInt = 100  # optimizer steps between resumable checkpoints (also at every epoch end)
    eval_every_epoch: StrictBool = True  # validation score each epoch, keeps the best model
    max_eval_questions: StrictInt | None = 64  # validation questions scored each epoch (all: null)
    early_stopping_patience: StrictInt | None = None  # epochs without improvement before stopping
    num_processes: StrictInt = 1  # processes per machine (one per GPU); >1 launches data-parallel training
    distributed: Literal["ddp", "fsdp"] = "ddp"
    num_machines: StrictInt = 1  # machines training together; each runs `florence-ops train --machine-rank R`
    main_process_ip: str | None = None  # machine rank 0's address, reachable by all (null: $MASTER_ADDR)
    main_process_port: StrictInt = 29500  # port of the rendezvous on machine rank 0
    collective_timeout_s: StrictInt = 600  # a collective (all-reduce, barrier) waiting longer ends the run
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"train.freeze: unknown part(s) {unknown}; choose from {list(FREEZABLE)}")
        if min(self.grad_accum_steps, self.checkpoint_every, self.num_processes, self.num_machines) < 1:
            raise ConfigError("train: grad_accum_steps, checkpoint_every, num_processes and num_machines must be >= 1")
        if self.collective_timeout_s < 1 or not 0 < self.main_process_port < 65536:
            raise ConfigError("train: collective_timeout_s must be >= 1 and main_process_port in 1..65535")
        if self.streaming and self.vision_cache and "vision_tower" in self.freeze:
            raise ConfigError(
                "train.streaming: each process reads only its own pages, and the vision cache holds "
                "every page: set train.vision_cache: false (the frozen tower then runs in the step)"
            )
        if self.streaming and self.length_grouping != 1:
            raise ConfigError(
                "train.length_grouping: streaming shuffles each process's row groups, and questions within windows "
                "of them, without grouping by length; set it to 1 with train.streaming"
            )
        if self.precision == "bf16-pure" and (self.distributed == "fsdp" or self.gradient_checkpointing):
            raise ConfigError(
                "train.precision: bf16-pure casts the weights to bf16 for each step, which neither FSDP's sharded "
                "weights nor gradient checkpointing's recomputation sees; use bf16 (autocast) with them"
            )
        if self.lora.enabled and "vision_tower" not in self.freeze:
            raise ConfigError(
                "train.lora.enabled: LoRA adapts the language model only; add vision_tower to train.freeze"
            )

    @property
    def world_size(self) -> int:
        """Processes on all machines together."""
        return self.num_processes * self.num_machines


@validated
class EvalConfig:
    split: str = "validation"
    batch_size: StrictInt = 32
    num_beams: StrictInt = 1
    max_new_tokens: StrictInt | None = None  # answer-token cap (None: train.max_answer_tokens, what training teaches)
    max_questions: StrictInt | None = None  # score a prefix of the split (all: null)
    report_examples: StrictInt = 8  # best and worst examples shown in the HTML report
    num_processes: StrictInt = 1  # >1 shares the questions among that many processes (one per GPU)
    num_workers: StrictInt = 0  # DataLoader workers that decode pages (or read cached features) ahead of the device


@validated
class PromotionConfig:
    metric: str = "anls"  # key of reports/metrics.json compared with the champion's
    margin: StrictFloat = 0.0  # the candidate must beat the champion (none yet: the base model) by more than this
    champion_dir: str = "models/champion"


@validated
class RegistryConfig:
    artifact: str = "florence-docvqa"  # the exported model's name: dvc.yaml `artifacts`, and the GTO tags
    stage: str = "prod"  # the stage a promotion assigns, and what replicas serve
    git_remote: str = ""  # git URL or a remote's name holding the tags ("": this clone only, one machine)
    dvc_remote: str = ""  # DVC remote (a name in .dvc/config) holding the model bytes ("": the default remote)
    poll_interval_s: StrictFloat = 10.0  # seconds between a serving replica's checks for a new assignment
    replica_dir: str = "models/replica"  # where a serving replica keeps the versions it fetched

    def __post_init__(self) -> None:
        if not self.artifact or not self.stage or self.poll_interval_s <= 0:
            raise ConfigError("registry: artifact and stage must be set, poll_interval_s > 0")


@validated
class PredictConfig:
    batch_size: StrictInt = 32  # questions per generate call of `florence-ops predict`
    pdf_dpi: StrictInt = 150  # PDF pages are rendered at this resolution, then resized to the model's input like images

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 36 <= self.pdf_dpi <= 600:
            raise ConfigError("predict: batch_size must be >= 1 and pdf_dpi in [36, 600]")


SERVE_HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the bind addresses LitServe accepts


@validated
class ServeConfig:
    host: str = "127.0.0.1"  # 127.0.0.1: this machine only; 0.0.0.0 or :: expose the server to the network
    port: StrictInt = 8000
    max_batch_size: StrictInt = 64  # requests answered by one generate call
    batch_timeout_s: StrictFloat = 0.0  # 0: a free worker answers what is queued at once; > 0: waits for more
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: StrictInt | None = None  # GPUs used (null: all visible)
    workers_per_device: StrictInt = 1  # model copies per device
    api_servers: StrictInt = 1  # HTTP server processes that parse, validate and decode requests
    request_timeout_s: StrictFloat = 60.0  # a request still queued after this long gets 504
    max_body_bytes: StrictInt = 25_000_000  # larger request bodies get 413
    max_image_pixels: StrictInt = 50_000_000  # larger images get 400 (decompression bombs)
    allow_remote_images: StrictBool = False  # fetch http(s) image URLs (off: only data: URLs)
    api_token_env: str = "FLORENCE_OPS_API_TOKEN"  # env variable holding the bearer token; unset or empty: no token
    reload_interval_s: StrictFloat = 2.0  # seconds between checks of the model directory for a new model (0: never)
    header_timeout_s: StrictFloat = 10.0  # a client that has not sent a request's headers after this long gets 408
    body_timeout_s: StrictFloat = 60.0  # a request whose body has not arrived whole after this long gets 408
    max_connections: StrictInt = 1000  # open connections per HTTP process; more are answered 503 and closed

    def __post_init__(self) -> None:
        if self.host not in SERVE_HOSTS:
            raise ConfigError(f"serve.host: expected one of {list(SERVE_HOSTS)}, got {self.host!r}")
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"serve.port: expected 1024..65535, got {self.port}")
        if min(self.max_batch_size, self.workers_per_device, self.api_servers, self.max_body_bytes) < 1:
            raise ConfigError("serve: max_batch_size, workers_per_device, api_servers, max_body_bytes must be >= 1")
        if min(self.batch_timeout_s, self.reload_interval_s) < 0:
            raise ConfigError("serve: batch_timeout_s and reload_interval_s must be >= 0")
        if min(self.header_timeout_s, self.body_timeout_s) <= 0 or self.max_connections < 1:
            raise ConfigError("serve: header_timeout_s and body_timeout_s must be > 0, max_connections >= 1")
        if self.batch_timeout_s >= self.request_timeout_s:
            raise ConfigError("serve.batch_timeout_s must be less than serve.request_timeout_s")


@validated
class ScheduleConfig:
    cron: str = "0 3 * * 1"  # weekly, Monday 03:00
    timezone: str = "UTC"


@validated
class Params:
    lr: StrictFloat = 0.001  # peak learning rate of AdamW (after warmup)
    epochs: StrictInt = 40  # passes over the training split
    batch_size: StrictInt = 16  # per optimizer step, across processes (global batch)
    seed: StrictInt = 1234
    paths: Paths = field(default_factory=Paths)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("lr must be > 0, epochs and batch_size >= 1")
        if self.batch_size % (self.train.world_size * self.train.grad_accum_steps):
            raise ConfigError("batch_size must be divisible by train.num_processes * train.num_machines * "
                              "train.grad_accum_steps (processes on all machines, micro-batches per step)")  # fmt: skip
        budget = self.train.max_answer_tokens  # one answer-token budget: what training teaches, decoding can emit
        if self.evaluate.max_new_tokens is None:
            self.evaluate.max_new_tokens = budget
        elif self.evaluate.max_new_tokens < budget:
            raise ConfigError(
                f"evaluate.max_new_tokens ({self.evaluate.max_new_tokens}) is below train.max_answer_tokens ({budget}):"
                " answers the model was trained to give would be cut; raise it or set it to null"
            )


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params.yaml (plus dotted-key overrides) into `Params`."""
    return from_dict(Params, apply_overrides(read_yaml(path) or {}, overrides or {}))


def from_dict(cls: type[T], data: Any) -> T:
    """Build config class `cls` from plain data (parsed YAML); `ConfigError` names the first bad key."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as error:
        raise ConfigError(validation_problem(error, cls)) from None


def pick(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of dotted `keys` (a section or a single setting) as plain data, reading nothing else."""
    picked = {}
    for key in keys:
        value = params
        for name in key.split("."):
            value = getattr(value, name)
        picked[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return picked


def to_dict(params: Params) -> dict[str, Any]:
    """The params as plain data, for checkpoints, model cards and reports."""
    return dataclasses.asdict(params)
