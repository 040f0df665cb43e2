"""Typed configuration schemas for every entry point.

The dataclasses below are registered in Hydra's ConfigStore, so the YAML groups under `conf/` are validated
against them: a mistyped key or a value of the wrong type fails at composition, before any work starts.
Defaults are the reference values of SPEC §1–§3 (the `paper` preset); the `tiny` preset overrides sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_lm.roles import SITES



class Norm(Enum):
    rms = "rms"
    layer = "layer"


class Activation(Enum):
    gelu = "gelu"
    relu = "relu"


class PosEmb(Enum):
    none = "none"
    learned = "learned"


class Source(Enum):
    stdlib = "stdlib"  # the running interpreter's standard library (no network)
    dir = "dir"  # any directory of .py files
    hf = "hf"  # a Hugging Face dataset through `datasets`


class Anneal(Enum):
    linear = "linear"  # linear in density (reference)
    exp = "exp"  # geometric in density


class GradNorm(Enum):
    normalize = "normalize"  # always divide by (rms + eps) (reference)
    clip = "clip"  # divide only when rms > 1
    none = "none"


class Backend(Enum):
    dense = "dense"  # dense matmuls on the masked weights (the reference implementation's way)
    torch_sparse = "torch_sparse"  # torch CSR (cuSPARSE on GPU)
    triton = "triton"  # our SpMM kernels whenever a matrix is sparse
    auto = "auto"  # triton at or below the crossover density, dense above it (dense on CPU)


class OpImpl(Enum):
    torch = "torch"  # the reference: torch.topk (+ scatter)
    triton = "triton"  # our fused kernel (CUDA)


class Precision(Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    ctx_len: int = 256
    n_layer: int = 8
    d_model: int = 1024
    d_head: int = 16  # n_head = d_model // d_head
    d_mlp: int = 4096
    norm: Norm = Norm.rms
    activation: Activation = Activation.gelu
    pos_emb: PosEmb = PosEmb.none
    attn_sink: bool = True
    bigram: bool = True
    afrac: float = 0.25  # AbsTopK keeps floor(afrac * dim) entries per token
    topk_sites: list[str] = field(default_factory=lambda: list(SITES))
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: Source = Source.stdlib
    path: Optional[str] = None  # source=dir: the directory to read
    include: str = "*.py"  # fnmatch pattern on relative paths (* also matches /)
    # fnmatch patterns (relative paths) to leave out. The default keeps the stdlib's own code: no test suites, no
    # installed packages, no pydoc_data (750 KB of English prose in a string) or encodings (generated codec tables).
    exclude: list[str] = field(
        default_factory=lambda: [
            "test/*", "*/test/*", "*/tests/*", "*/idle_test/*", "site-packages/*", "dist-packages/*", "pydoc_data/*", "encodings/*"
        ]
    )
    hf_name: Optional[str] = None  # source=hf: dataset name or builder ("json", "parquet", ...)
    hf_config: Optional[str] = None
    hf_data_files: Optional[str] = None
    hf_split: str = "train"
    hf_text_column: str = "content"
    hf_path_column: Optional[str] = "path"  # used for the train/val split when present
    hf_streaming: bool = True
    max_docs: Optional[int] = None
    max_bytes: Optional[int] = None
    val_fraction: float = 0.05  # split by file (hash of the path), not by offset
    vocab_size: int = 2048
    tokenizer_sample_bytes: int = 50_000_000  # cap on text used to train the BPE (peak RAM ~60x)
    cache_dir: Optional[str] = None  # default: $SPARSE_LM_CACHE or ~/.cache/sparse_lm


@dataclass
class SparsityConfig:
    enabled: bool = True
    hidden_density: float = 1 / 64  # every hidden weight matrix
    embed_density: float = 1 / 16  # token and positional embedding, unembedding
    bias_density: float = 1 / 16  # only when sparsify_biases
    sparsify_biases: bool = False  # the paper's text says yes; the released script leaves them dense
    min_per_neuron: int = 4  # j: nonzeros each neuron keeps in every matrix touching it
    anneal_start: float = 0.01  # fraction of total steps
    anneal_end: float = 0.5
    anneal: Anneal = Anneal.linear


@dataclass
class OptimConfig:
    lr: float = 1.28e-2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # unusually large on purpose
    weight_decay: float = 0.1  # decoupled, applied after the projection
    warmup: float = 0.01  # fraction of total steps
    grad_norm: GradNorm = GradNorm.normalize
    grad_eps: float = 1e-5


@dataclass
class TrainConfig:
    max_steps: int = 244_140  # 32B tokens at 512 x 256 tokens per step
    batch_size: int = 512  # sequences per optimizer step, over all processes
    micro_batch_size: int = 32  # sequences per forward pass per process (gradient accumulation)
    log_interval: int = 10
    eval_interval: int = 500
    eval_batches: int = 20  # micro-batches of validation data per evaluation
    ckpt_interval: int = 1000
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    resume: Optional[str] = None  # null | auto | <run dir or checkpoint dir>
    exit_interval: Optional[int] = None  # checkpoint and exit once step % exit_interval == 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    compile: bool = False


@dataclass
class KernelsConfig:
    backend: Backend = Backend.dense  # matmuls of the sparse hidden matrices
    crossover: float = 0.04  # auto: a matrix at or below this density uses the Triton SpMM
    calibrate: bool = False  # auto: measure the crossover per matrix shape at start-up (CUDA), cached on disk
    abstopk: OpImpl = OpImpl.torch  # activation AbsTopK
    select: OpImpl = OpImpl.torch  # top-k selection of the weight projection


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # run directory or checkpoint directory
    prompt: str = "def "
    max_new_tokens: int = 200
    num_samples: int = 1
    temperature: float = 0.8
    top_k: Optional[int] = 50
    seed: int = 0
    device: str = "auto"


@dataclass
class BenchConfig:
    """`python -m kernels.bench`: each op against its references, or whole training steps (mode=train)."""

    mode: str = "ops"  # ops | train
    device: str = "auto"
    dtype: str = "bf16"  # on CUDA; the CPU runs fp32
    # ops on CUDA: [out, in] of the MLP matrices at d_model 1024 and 2048 (d_mlp = 4 d_model), 65,536 tokens
    tokens: int = 65536
    shapes: list[list[int]] = field(default_factory=lambda: [[4096, 1024], [1024, 4096], [8192, 2048], [2048, 8192]])
    densities: list[float] = field(default_factory=lambda: [0.1, 0.03, 0.01, 0.003, 0.001])
    select_shape: list[int] = field(default_factory=lambda: [4096, 4096])  # 16.8M entries
    select_density: float = 1 / 64
    abstopk_dims: list[int] = field(default_factory=lambda: [1024, 4096, 8192])
    afrac: float = 0.25
    # ops on the CPU: the reference backends at small shapes
    cpu_tokens: int = 2048
    cpu_shapes: list[list[int]] = field(default_factory=lambda: [[512, 128], [128, 512]])
    cpu_select_shape: list[int] = field(default_factory=lambda: [512, 512])
    cpu_abstopk_dims: list[int] = field(default_factory=lambda: [128, 512])
    warmup_ms: int = 25
    rep_ms: int = 100
    # mode=train: training steps at the final density, one run per kernels setting, in one process
    train_overrides: list[str] = field(default_factory=lambda: ["preset=paper", "train.compile=false"])
    # The fp32 run is the yardstick for "bf16 noise": how far the reference itself moves with precision.
    train_kernels: list[str] = field(default_factory=lambda: ["kernels=default", "kernels=fast", "kernels=default train.precision=fp32"])
    cpu_train_overrides: list[str] = field(
        default_factory=lambda: ["preset=tiny", "train.batch_size=8", "train.micro_batch_size=8"]
    )
    cpu_train_kernels: list[str] = field(default_factory=lambda: ["kernels=default", "kernels.backend=torch_sparse"])
    train_steps: int = 20  # timed steps per setting (after 3 warm-up steps); a setting may hold several overrides
    compare_steps: int = 200  # steps from scratch whose losses are compared between settings (0: skip)
    cpu_compare_steps: int = 20
    # mode=versus: this checkout against another git revision, both on the CPU, in turns, in one process
    baseline: str = "HEAD"  # any git revision of this repository
    versus_overrides: list[str] = field(default_factory=list)  # applied to both sides' default config
    versus_steps: Optional[int] = None  # default: the whole schedule (train.max_steps)
    versus_chunk: int = 10  # steps each side takes per turn
    versus_noise_steps: int = 100  # steps of the 1-ulp fp32-noise yardstick
    versus_check_every: int = 25  # compare the projection's survivors with the baseline's every this many steps


@dataclass
class EdgeConventions:
    """Which connections count as circuit edges besides nonzero weights between kept nodes (circuits/edges.py)."""

    qk_pairs: bool = True  # a kept q channel and the kept k channel it meets in the dot product
    embedding: bool = True  # wte entries of the task's tokens on residual channels the circuit reads
    unembedding: bool = True  # lm_head entries of the two answers on residual channels the circuit writes
    residual: bool = False  # a kept write and a later kept read of the same residual channel


@dataclass
class PruneConfig:
    """`python -m sparse_lm.prune checkpoint=<run dir or checkpoint> tasks=all` (SPEC §5)."""

    checkpoint: str = MISSING
    tasks: Any = "all"  # all, one task name, or a list [name, ...]
    out_dir: Optional[str] = None  # default: <run dir>/circuits/<checkpoint name>
    target: float = 0.15  # held-out task loss per side a circuit must reach
    n_train: int = 1000
    n_test: int = 200
    n_calib: int = 256  # training pairs the logit scale/shift is fitted on
    steps: int = 400  # mask-training steps per task
    batch_pairs: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-3
    lam: float = 1e-4  # penalty per kept node
    tau_init: float = 0.1
    mean_sequences: int = 64  # pretraining sequences the ablation means are taken over
    seed: int = 0
    device: str = "cpu"
    random_init: bool = False  # also prune a random-init model of the same shape and sparsity (control)
    check: bool = True  # necessity: ablate the circuit from the full model, which should then fail
    edges: EdgeConventions = field(default_factory=EdgeConventions)


@dataclass
class InspectConfig:
    checkpoint: str = MISSING  # run directory or checkpoint directory


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="inspect_schema", node=InspectConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="prune_schema", node=PruneConfig)


def to_object(cfg: DictConfig | Config) -> Config:
    """Resolve a composed DictConfig into typed dataclasses (enums as Enum members)."""
    if isinstance(cfg, Config):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def load_yaml(path) -> Config:
    """Read a config written by `to_yaml` (e.g. the one stored in every checkpoint)."""
    return to_object(OmegaConf.load(path))
