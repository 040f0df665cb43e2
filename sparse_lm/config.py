"""Typed configuration schemas for every entry point.

The dataclasses below are registered in Hydra's ConfigStore, so the YAML groups under `conf/` are validated
against them: a mistyped key or a value of the wrong type fails at composition, before any work starts.
The defaults are the reference run (docs/method.md §1–§3, the `paper` preset); the files under conf/ state only
what they change, and numeric fields carry their valid range, checked before any work starts (`check_ranges`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_lm.errors import UserError
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


def ranged(default=MISSING, lo=None, hi=None, *, lo_open=False, hi_open=False, factory=None):
    """A field whose value (or each value of a list) must lie in [lo, hi] (open ends where asked); None passes."""
    meta = {"range": (lo, hi, lo_open, hi_open)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = dict(lo=0, lo_open=True)
FRACTION = dict(lo=0, hi=1)  # [0, 1]
DENSITY = dict(lo=0, hi=1, lo_open=True)  # (0, 1]


@dataclass
class ModelConfig:
    vocab_size: int = ranged(2048, 1)
    ctx_len: int = ranged(256, 1)
    n_layer: int = ranged(8, 1)
    d_model: int = ranged(1024, 1)
    d_head: int = ranged(16, 1)  # n_head = d_model // d_head
    d_mlp: int = ranged(4096, 1)
    norm: Norm = Norm.rms
    # None: torch's default, the reference's (RMSNorm: the dtype's machine epsilon; LayerNorm: 1e-5). RMSNorm checkpoints
    # made before this field existed were trained with 1e-6 and load with it (load_yaml).
    norm_eps: Optional[float] = ranged(None, **POSITIVE)
    bias: bool = True  # biases in c_attn, c_proj and c_fc (the reference's `bias`)
    activation: Activation = Activation.gelu
    pos_emb: PosEmb = PosEmb.none
    attn_sink: bool = True
    bigram: bool = True
    afrac: float = ranged(0.25, **DENSITY)  # AbsTopK keeps floor(afrac * dim) entries per token
    topk_sites: list[str] = field(default_factory=lambda: list(SITES))
    init_std: float = ranged(0.02, **POSITIVE)


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
    max_docs: Optional[int] = ranged(None, 1)
    max_bytes: Optional[int] = ranged(None, 1)
    val_fraction: float = ranged(0.05, 0, 1, hi_open=True)  # split by file (hash of the path), not by offset
    vocab_size: int = ranged(2048, 257, 65536)  # 256 bytes + <|endoftext|> at least; uint16 token cache at most
    tokenizer_sample_bytes: int = ranged(50_000_000, 1)  # cap on text used to train the BPE (peak RAM ~60x)
    cache_dir: Optional[str] = None  # default: $SPARSE_LM_CACHE or ~/.cache/sparse_lm


@dataclass
class SparsityConfig:
    enabled: bool = True
    hidden_density: float = ranged(1 / 64, **DENSITY)  # every hidden weight matrix
    embed_density: float = ranged(1 / 16, **DENSITY)  # token and positional embedding, unembedding
    bias_density: float = ranged(1 / 16, **DENSITY)  # only when sparsify_biases
    sparsify_biases: bool = False  # the paper's text says yes; the released script leaves them dense
    min_per_neuron: int = ranged(4, 0)  # j: nonzeros each neuron keeps in every matrix touching it
    anneal_start: float = ranged(0.01, **FRACTION)  # fraction of total steps
    anneal_end: float = ranged(0.5, **FRACTION)
    anneal: Anneal = Anneal.linear


@dataclass
class OptimConfig:
    lr: float = ranged(1.28e-2, **POSITIVE)
    beta1: float = ranged(0.9, 0, 1, hi_open=True)
    beta2: float = ranged(0.95, 0, 1, hi_open=True)
    eps: float = ranged(0.1, **POSITIVE)  # unusually large on purpose
    weight_decay: float = ranged(0.1, 0)  # decoupled, applied after the projection
    warmup: float = ranged(0.01, 0, 1, hi_open=True)  # fraction of total steps
    grad_norm: GradNorm = GradNorm.normalize
    grad_eps: float = ranged(1e-5, **POSITIVE)


class Calibration(Enum):
    """How a candidate circuit's held-out task loss is judged against the target (docs/method.md §5)."""

    raw = "raw"  # the logits as they are (the paper's order: calibrate once, after the search)
    fixed = "fixed"  # one logit scale and shift, fitted on the full model, applied to every candidate
    per_candidate = "per_candidate"  # refitted for every candidate: lenient (random-init models pass with it)


class Ablation(Enum):
    """What a pruned node's activation becomes."""

    mean = "mean"  # its mean over pretraining data
    zero = "zero"
    resample = "resample"  # its value at the same position of another pretraining context


CONTROLS = ("random_init", "redrawn", "nonsense", "ablations", "frozen_norms")


class ResumeChanges(Enum):
    refuse = "refuse"  # a resume whose trajectory-defining settings differ from the checkpoint's stops at once
    allow = "allow"  # continue with the new settings; the change is logged


@dataclass
class TrainConfig:
    max_steps: int = ranged(244_140, 1)  # 32B tokens at 512 x 256 tokens per step
    batch_size: int = ranged(512, 1)  # sequences per optimizer step, over all processes
    # Sequences per forward pass per process (the rest is gradient accumulation), or auto: the largest that
    # divides the per-process batch within micro_batch_tokens. A memory knob: results do not depend on it.
    micro_batch_size: Any = "auto"
    micro_batch_tokens: int = ranged(16384, 1)  # auto's cap, in tokens per forward pass
    log_interval: int = ranged(10, 1)
    eval_interval: int = ranged(1000, 1)
    eval_sequences: int = ranged(1280, 1)  # validation sequences per evaluation, the same ones every time
    ckpt_interval: int = ranged(2000, 1)
    keep_last: int = ranged(3, 1)  # checkpoints kept; older ones are deleted
    resume: Optional[str] = None  # null | auto | <run dir or checkpoint dir>
    resume_changes: ResumeChanges = ResumeChanges.refuse
    exit_interval: Optional[int] = ranged(None, 1)  # checkpoint and exit once step % exit_interval == 0
    seed: int = ranged(0, 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    compile: bool = True


@dataclass
class KernelsConfig:
    backend: Backend = Backend.dense  # matmuls of the sparse hidden matrices
    crossover: float = ranged(0.04, **DENSITY)  # auto: a matrix at or below this density uses the Triton SpMM
    calibrate: bool = False  # auto: measure the crossover per matrix shape at start-up (CUDA), cached on disk
    abstopk: OpImpl = OpImpl.torch  # activation AbsTopK
    select: OpImpl = OpImpl.torch  # top-k selection of the weight projection
    # A sparse c_fc writes the MLP's hidden activations along tokens (feature-major), the layout in which c_proj's SpMM
    # gathers whole segments; GELU and AbsTopK keep it, and the backward pass mirrors it (docs/benchmarks.md).
    mlp_feature_major: bool = False


@dataclass
class Config:
    """`python train.py`: the defaults are the reference run (preset=paper); conf/ states what other options change."""

    name: str = "paper"
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
    max_new_tokens: int = ranged(200, 0)
    num_samples: int = ranged(1, 1)
    temperature: float = ranged(0.8, 0)  # 0: greedy
    top_k: Optional[int] = ranged(50, 1)
    seed: int = ranged(0, 0)
    device: str = "auto"


@dataclass
class BenchConfig:
    """`python -m sparse_lm.bench`: each op against its references (ops), training steps (train), or versus a revision."""

    mode: str = "ops"  # ops | train | versus | profile
    device: str = "auto"
    dtype: str = "bf16"  # on CUDA; the CPU runs fp32
    # ops on CUDA: [out, in] of the MLP matrices at d_model 1024 and 2048 (d_mlp = 4 d_model), 65,536 tokens
    tokens: int = ranged(65536, 1)
    shapes: list[list[int]] = ranged(lo=1, factory=lambda: [[4096, 1024], [1024, 4096], [8192, 2048], [2048, 8192]])
    densities: list[float] = ranged(**DENSITY, factory=lambda: [0.1, 0.03, 0.01, 0.003, 0.001])
    select_shape: list[int] = ranged(lo=1, factory=lambda: [4096, 4096])  # 16.8M entries
    select_density: float = ranged(1 / 64, **DENSITY)
    abstopk_dims: list[int] = ranged(lo=1, hi=8192, factory=lambda: [1024, 4096, 8192])
    afrac: float = ranged(0.25, **DENSITY)
    # ops on the CPU: the reference backends at small shapes
    cpu_tokens: int = ranged(2048, 1)
    cpu_shapes: list[list[int]] = ranged(lo=1, factory=lambda: [[512, 128], [128, 512]])
    cpu_select_shape: list[int] = ranged(lo=1, factory=lambda: [512, 512])
    cpu_abstopk_dims: list[int] = ranged(lo=1, hi=8192, factory=lambda: [128, 512])
    warmup_ms: int = ranged(25, 0)
    rep_ms: int = ranged(100, 1)
    # mode=train: training steps at the final density, one run per kernels setting, in one process
    train_overrides: list[str] = field(default_factory=lambda: ["preset=paper", "train.compile=false"])
    # The fp32 run is the yardstick for "bf16 noise": how far the reference itself moves with precision.
    train_kernels: list[str] = field(default_factory=lambda: ["kernels=default", "kernels=fast", "kernels=default train.precision=fp32"])
    cpu_train_overrides: list[str] = field(default_factory=lambda: ["preset=tiny", "train.batch_size=8"])
    cpu_train_kernels: list[str] = field(default_factory=lambda: ["kernels=default", "kernels.backend=torch_sparse"])
    train_steps: int = ranged(20, 1)  # timed steps per setting (after 3 warm-up steps); a setting may hold several overrides
    compare_steps: int = ranged(200, 0)  # steps from scratch whose losses are compared between settings (0: skip)
    cpu_compare_steps: int = ranged(20, 0)
    # mode=versus: this checkout against another git revision, both on the CPU, in turns, in one process
    baseline: str = "HEAD"  # any git revision of this repository
    versus_overrides: list[str] = field(default_factory=list)  # applied to both sides' default config
    versus_steps: Optional[int] = ranged(None, 1)  # default: the whole schedule (train.max_steps)
    versus_chunk: int = ranged(10, 1)  # steps each side takes per turn
    versus_noise_steps: int = ranged(100, 1)  # steps of the 1-ulp fp32-noise yardstick
    versus_check_every: int = ranged(25, 1)  # compare the projection's survivors with the baseline's every this many steps
    versus_processes: bool = True  # each side in a process of its own (malloc's state is per process); false: all in this one
    # mode=profile: per-op CPU time of training steps (this checkout, and `baseline` unless it is HEAD)
    profile_step: int = ranged(400, 0)  # the schedule position profiled (the tiny preset's final density)
    profile_steps: int = ranged(5, 1)


@dataclass
class EdgeConventions:
    """Which connections count as circuit edges besides nonzero weights between kept nodes (circuits/edges.py)."""

    qk_pairs: bool = True  # a kept q channel and the kept k channel it meets in the dot product
    embedding: bool = True  # wte entries of the task's tokens on residual channels the circuit reads
    unembedding: bool = True  # lm_head entries of the two answers on residual channels the circuit writes
    residual: bool = False  # a kept write and a later kept read of the same residual channel


@dataclass
class PruneConfig:
    """`python -m sparse_lm.prune checkpoint=<run dir or checkpoint> tasks=all` (docs/method.md §5)."""

    checkpoint: str = MISSING
    tasks: Any = "all"  # all, one task name, or a list [name, ...]
    out_dir: Optional[str] = None  # default: <run dir>/circuits/<checkpoint name>
    overwrite: bool = False  # replace the results of an earlier invocation in out_dir
    target: float = ranged(0.15, **POSITIVE)  # held-out task loss per side a circuit must reach
    n_train: int = ranged(1000, 1)
    n_test: int = ranged(200, 1)
    n_calib: int = ranged(256, 1)  # training pairs the logit scale/shift is fitted on
    steps: int = ranged(400, 1)  # mask-training steps per task
    batch_pairs: int = ranged(16, 1)
    lr: float = ranged(3e-3, **POSITIVE)
    weight_decay: float = ranged(1e-3, 0)
    lam: float = ranged(1e-4, 0)  # penalty per kept node
    tau_init: float = ranged(0.1, -1, 1)
    mean_sequences: int = ranged(64, 1)  # pretraining sequences the ablation means are taken over
    # A directory of .py files to take them from instead of the checkpoint's data (encoded with the model's own
    # tokenizer). A model converted from the reference format defaults to the embedded corpus.
    means_data: Optional[str] = None
    seed: int = ranged(0, 0)
    device: str = "cpu"
    calibration: Calibration = Calibration.raw  # how candidates (and the full model) are judged: raw | fixed | per_candidate
    ablation: Ablation = Ablation.mean  # mean | zero | resample
    frozen_norms: bool = False  # norms of the pruned forward use the unpruned forward's scales on the same input
    # The faithfulness battery: all, or a list of CONTROLS. random_init / redrawn: the same search on a random-init
    # model / on the trained sparsity pattern with new random values; nonsense: the task with coin-flip labels;
    # ablations: the search again under the other ablation modes; frozen_norms: the circuit re-checked with frozen norms.
    # A circuit is trusted only when all of them ran (controls=all, check=true) and it passed (circuits/battery.py).
    controls: Any = field(default_factory=list)
    seeds: int = ranged(1, 1)  # mask seeds (seed, seed + 1, ...): spread of the edge count, overlap of the node sets
    node_effects: int = ranged(400, 0)  # circuits up to this many nodes get each node's ablation effect (HTML page)
    check: bool = True  # necessity: ablate the circuit from the full model, which should then fail
    edges: EdgeConventions = field(default_factory=EdgeConventions)


class Stage(Enum):
    """How far `python -m sparse_lm.frontier` goes."""

    all = "all"  # train what is missing, prune what is unpruned, collect
    train = "train"  # train what is missing, collect (no pruning)
    collect = "collect"  # the table and picture of what exists (no training, no pruning)


@dataclass
class FrontierConfig:
    """`python -m sparse_lm.frontier frontier=cpu`: train a grid of runs, prune each, plot loss against circuit size.

    Runs: every size × hidden density × seed (sparse, `steps` long) and every size in `dense_sizes` × `dense_steps`
    × seed (`sparsity=dense`), each an ordinary `train.py` run in <sweep_dir>/runs/<name> (docs/frontier.md).
    """

    name: str = MISSING  # the preset's name (frontier=cpu: "cpu")
    sweep_dir: str = "runs/frontier-${name}"
    train_overrides: list[str] = field(default_factory=list)  # train.py overrides shared by every run (preset, data, ...)
    sizes: dict[str, list[str]] = field(default_factory=dict)  # size label -> train.py overrides (model.d_model=...)
    densities: list[float] = ranged(**DENSITY, factory=list)  # sparsity.hidden_density of the sparse runs
    steps: int = ranged(1000, 1)  # train.max_steps of the sparse runs
    seeds: list[int] = ranged(lo=0, factory=lambda: [0, 1])  # train.seed: every point is trained once per seed
    dense_sizes: Optional[list[str]] = None  # sizes that get dense baselines (null: every size)
    dense_steps: list[int] = ranged(lo=1, factory=list)  # train.max_steps of the dense baselines
    prune_overrides: list[str] = field(default_factory=list)  # sparse_lm.prune overrides for every final checkpoint
    # Hydra launcher of the training and pruning jobs: basic (one after another, here), submitit_local (parallel
    # processes), submitit_slurm (cluster jobs); hydra.launcher.* settings go in launcher_overrides.
    launcher: str = "basic"
    launcher_overrides: list[str] = field(default_factory=list)
    stage: Stage = Stage.all


@dataclass
class PlateausConfig:
    """`python -m sparse_lm.plateaus checkpoint=<run> [compare=[<run>, ...]]` (docs/plateaus.md)."""

    checkpoint: str = MISSING
    compare: list[str] = field(default_factory=list)  # more models, same protocol and prompts; differences reported
    random_init: bool = True  # also each model's random-init copy (same shape and densities): the no-plateau control
    site: Optional[str] = None  # where to perturb (default: the residual stream entering layer 1, "1.resid_pre")
    readout: Optional[str] = None  # the late site of the L2/cosine read-outs (default: the last layer's resid_post)
    n_prompts: int = ranged(256, 2)  # validation contexts: their activations give the mean and covariance
    n_bases: int = ranged(64, 1)  # curves per base kind and direction
    ctx: int = ranged(16, 1)  # tokens per context; the last position is perturbed
    steps: int = ranged(21, 2)  # points per path (one forward row each)
    levels: list[float] = ranged(**POSITIVE, factory=lambda: [0.1, 0.5, 1.0])  # KL thresholds (nats)
    bootstrap: int = ranged(1000, 1)
    seed: int = ranged(0, 0)
    out_dir: Optional[str] = None  # default: <first run dir>/plateaus/<checkpoint name>
    overwrite: bool = False
    device: str = "cpu"


class Toy(Enum):
    tms = "tms"  # toy model of superposition
    resid_mlp = "resid_mlp"  # residual MLP computing more ReLUs than it has neurons


@dataclass
class ToyConfig:
    """A toy target with a known mechanism (sparse_lm/decompose/toys.py); trained first, then decomposed."""

    kind: Toy = Toy.tms
    n_features: int = ranged(40, 1)
    n_hidden: int = ranged(10, 1)  # TMS hidden width
    tied: bool = True  # TMS: W2 = W1ᵀ
    hidden_identity: bool = False  # TMS: a frozen identity matrix between the two
    d_embed: int = ranged(1000, 1)  # residual MLP: width of the residual stream
    d_mlp: int = ranged(50, 1)  # residual MLP: neurons per layer
    n_layers: int = ranged(1, 1)  # residual MLP: layers
    feature_probability: float = ranged(0.05, **DENSITY)
    value_range: list[float] = ranged(factory=lambda: [0.0, 1.0])  # [lo, hi]: an active feature's value is uniform in it
    steps: int = ranged(10_000, 1)  # training of the toy itself
    batch_size: int = ranged(1024, 1)
    lr: float = ranged(5e-3, **POSITIVE)
    seed: int = ranged(0, 0)


class Method(Enum):
    spd = "spd"  # stochastic parameter decomposition
    apd = "apd"  # attribution-based parameter decomposition


class Init(Enum):
    random = "random"  # random unit directions scaled by their overlap with the target (published)
    ground_truth = "ground_truth"  # a toy's known pieces (the oracle start; TMS only)


@dataclass
class DecomposeConfig:
    """`python -m sparse_lm.decompose decompose=tms_40_10` (docs/decompose.md). Either `toy` or `checkpoint`."""

    method: Method = Method.spd
    toy: Optional[ToyConfig] = None  # decompose this toy (trained first, kept in out_dir/toy.pt) ...
    checkpoint: Optional[str] = None  # ... or this trained model (run dir or checkpoint)
    modules: list[str] = field(default_factory=lambda: ["linear1", "linear2"])  # the nn.Linear layers to decompose
    C: int = ranged(200, 1)  # subcomponents per matrix (SPD) or components (APD)
    init: Init = Init.random
    pattern: bool = False  # restrict every subcomponent to the target's nonzero entries (weight-sparse targets)
    steps: int = ranged(10_000, 1)
    batch_size: int = ranged(4096, 1)  # toy inputs, or token sequences of `ctx` for a checkpoint
    ctx: int = ranged(64, 2)  # tokens per sequence (checkpoint targets)
    lr: float = ranged(1e-3, **POSITIVE)  # AdamW, cosine decay to 0
    seed: int = ranged(0, 0)
    # Loss coefficients (docs/decompose.md). Faithfulness, the mean squared error over the decomposed weights (both
    # methods): null takes the published choice, 0 for SPD with the delta component (which replaces it), else 1.
    faithfulness: Optional[float] = ranged(None, 0)
    # SPD
    delta_component: bool = True  # the residual W − ΣW_c joins every masked pass under a uniform random mask (spd.py)
    stochastic_recon: float = ranged(1.0, 0)
    stochastic_recon_layerwise: float = ranged(1.0, 0)
    importance_minimality: float = ranged(1e-4, 0)
    p: float = ranged(2.0, **POSITIVE)  # exponent of the importance minimality loss
    ci_hidden: int = ranged(16, 1)  # width of each subcomponent's causal-importance MLP
    n_mask_samples: int = ranged(1, 1)
    warmup_steps: int = ranged(200, 0)  # faithfulness-only warmup of the subcomponents
    warmup_lr: float = ranged(0.01, **POSITIVE)
    # APD
    topk: float = ranged(1.0, **POSITIVE)  # batch top-k: components kept per input, on average over the batch
    minimality: float = ranged(1.0, 0)  # coefficient of the top-k reconstruction loss
    simplicity: float = ranged(1.0, 0)  # coefficient of the Schatten-p loss
    schatten_p: float = ranged(0.9, **POSITIVE)
    m: Optional[int] = ranged(None, 1)  # inner width of each APD component (null: min(d_in, d_out), full rank)
    # run
    eval_interval: int = ranged(1000, 1)
    ckpt_interval: int = ranged(1000, 1)
    out_dir: Optional[str] = None  # default: runs/decompose-<name> (a toy) or <run>/decompose/<checkpoint> (a model)
    # A circuit of the same checkpoint (<run>/circuits/<step>/<task>.json from python -m sparse_lm.prune): after the
    # fit, compare the task's important subcomponents with it (sparse_lm/decompose/circuit.py)
    circuit: Optional[str] = None
    name: str = "decompose"
    overwrite: bool = False
    device: str = "cpu"


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
    cs.store(name="frontier_schema", node=FrontierConfig)
    cs.store(name="plateaus_schema", node=PlateausConfig)
    cs.store(name="decompose_schema", node=DecomposeConfig)


def flatten(value) -> list:
    return [x for v in value for x in flatten(v)] if isinstance(value, list) else [value]


def check_ranges(obj, prefix: str = "") -> None:
    """Raise a UserError naming the first field whose value lies outside its declared range."""
    for f in fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            check_ranges(value, name + ".")
            continue
        if "range" not in f.metadata or value is None:
            continue
        lo, hi, lo_open, hi_open = f.metadata["range"]
        for v in flatten(value):
            bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
            if bad or not math.isfinite(v):  # no field takes inf or NaN
                low = "-inf" if lo is None else f"{lo:g}"
                high = "inf" if hi is None else f"{hi:g}"
                raise UserError(f"{name}={value} is out of range: it must be in {'(' if lo_open or lo is None else '['}{low}, "
                                f"{high}{')' if hi_open or hi is None else ']'}")
    if isinstance(obj, TrainConfig):
        mb = obj.micro_batch_size
        if mb != "auto" and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
            raise UserError(f"{prefix}micro_batch_size={mb!r} must be auto or an integer ≥ 1")


def to_object(cfg: DictConfig | Config, schema=Config):
    """Resolve a composed DictConfig into typed dataclasses (enums as Enum members), with every range checked."""
    obj = cfg if isinstance(cfg, schema) else OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    check_ranges(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def known_keys(raw, schema_node) -> tuple[dict, list[str]]:
    """`raw` without the keys `schema_node` does not have (settings of an older version), and those keys."""
    kept, dropped = {}, []
    for key, value in raw.items():
        if key not in schema_node:
            dropped.append(key)
        elif isinstance(value, dict) and OmegaConf.is_config(schema_node[key]):
            kept[key], inner = known_keys(value, schema_node[key])
            dropped += [f"{key}.{k}" for k in inner]
        else:
            kept[key] = value
    return kept, dropped


LEGACY_NORM_EPS = 1e-6  # the RMSNorm epsilon of every checkpoint written before model.norm_eps existed
NOTED: set[str] = set()  # configs whose legacy epsilon was already noted in this process


def load_yaml(path) -> Config:
    """Read a config written by `to_yaml` (e.g. the one stored in every checkpoint).

    Keys this version no longer has (e.g. `train.eval_batches` of older checkpoints) are dropped; their meaning
    is covered by the fields that replaced them, at their defaults.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
    except Exception as e:  # a truncated or overwritten file
        raise UnreadableConfig(f"{path}: not a readable config ({type(e).__name__}: {e})") from None
    kept, _ = known_keys(raw, OmegaConf.structured(Config))
    model = kept.get("model")
    if isinstance(model, dict) and "norm_eps" not in model and model.get("norm", "rms") == "rms":
        model["norm_eps"] = LEGACY_NORM_EPS  # LayerNorm always had torch's default, which null still means
        if str(path) not in NOTED:
            NOTED.add(str(path))
            print(f"note: {path} predates model.norm_eps; its RMSNorm was trained with eps {LEGACY_NORM_EPS}, which is used",
                  file=sys.stderr)
    try:
        return to_object(OmegaConf.create(kept))
    except UserError as e:
        raise UserError(f"{path}: does not fit this version of sparse_lm: {e}") from None
    except Exception as e:  # omegaconf's validation: a type this version's schema does not take
        raise UserError(f"{path}: does not fit this version of sparse_lm ({type(e).__name__}: {str(e).splitlines()[0]})") from None


class UnreadableConfig(UserError):
    """A config file that does not parse (truncated, overwritten): the file is damaged, not just old."""
