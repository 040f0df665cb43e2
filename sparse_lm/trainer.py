"""The training loop: data → model → sparse AdamW steps → logs, evaluations and checkpoints.

One optimizer step (docs/method.md §2), for step n → n + 1 at progress t = (n + 1) / max_steps:
  1. forward/backward over the micro-batches (DDP averages gradients across processes),
  2. divide all gradients by their global RMS (or clip),
  3. Adam with the sharkfin learning rate, dense moments,
  4. project every sparse parameter to its scheduled k,
  5. decoupled weight decay on the (now sparse) weights.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sparse_lm import checkpoint, distributed
from sparse_lm.backends import Accelerator, install
from sparse_lm.config import Config, Precision, to_yaml
from sparse_lm.data.cache import TokenData, prepare
from sparse_lm.data.loader import ChunkSampler, train_batch, val_batches
from sparse_lm.errors import UserError
from sparse_lm.fsutil import write_text
from sparse_lm.hostmem import keep_freed_memory
from sparse_lm.metrics import RunLogger, Throughput, format_duration
from sparse_lm.model import GPT
from sparse_lm.optim import build_optimizer, decay_params, decay_weights, normalize_gradients
from sparse_lm.resume import check_changes, find_resume
from sparse_lm.roles import role
from sparse_lm.schedule import lr_multiplier
from sparse_lm.sparsity import Plan, Sparsifier

log = logging.getLogger("sparse_lm")

# bf16 dense peak of the GPUs we report MFU for (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Run:
    """Everything one training run holds."""

    cfg: Config
    run_dir: Path
    dist: distributed.Dist
    data: TokenData
    model: GPT  # the plain module (state dicts, sparsity)
    train_model: torch.nn.Module  # the same, possibly compiled and DDP-wrapped
    optimizer: torch.optim.Optimizer
    sparsifier: Sparsifier
    accel: Accelerator  # which kernels run the sparse matmuls, AbsTopK and the projection
    sampler: ChunkSampler
    micro: int  # sequences per forward pass per process
    accum: int  # forward passes per process per optimizer step
    step: int = 0
    resume_notes: list = field(default_factory=list)  # lines to log about settings changed on resume
    params: list = field(init=False)  # every parameter (gradient normalisation)
    decay: list = field(init=False)  # those weight decay applies to
    final_density: float = field(init=False)  # hidden-matrix density at the end (the learning-rate factor)

    def __post_init__(self):
        self.params = list(self.model.parameters())
        self.decay = decay_params(self.model)
        self.final_density = self.sparsifier.density("hidden", self.cfg.train.max_steps)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.ctx_len

    def autocast(self):
        dtype = autocast_dtype(self.cfg, self.dist.device)
        return nullcontext() if dtype is None else torch.autocast(self.dist.device.type, dtype=dtype)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    p = cfg.train.precision
    if p == Precision.bf16 or (p == Precision.auto and device.type == "cuda"):
        return torch.bfloat16
    return None


def micro_batching(cfg: Config, world: int) -> tuple[int, int]:
    """(sequences per forward pass per process, gradient-accumulation steps) for the global train.batch_size.

    The global batch, and so the run's results, never depend on the number of processes; micro_batch_size=auto
    picks the largest divisor of the per-process batch within train.micro_batch_tokens.
    """
    t = cfg.train
    if t.batch_size % world:
        raise UserError(f"train.batch_size={t.batch_size} must be a multiple of the number of processes ({world})")
    per_process = t.batch_size // world
    if t.micro_batch_size == "auto":
        cap = max(1, t.micro_batch_tokens // cfg.model.ctx_len)
        micro = max(d for d in range(1, min(per_process, cap) + 1) if per_process % d == 0)
    else:
        micro = t.micro_batch_size
        if per_process % micro:
            raise UserError(
                f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={micro} × {world} process(es) "
                f"(or leave train.micro_batch_size=auto)"
            )
    return micro, per_process // micro


def check_config(cfg: Config, dist: distributed.Dist) -> tuple[int, int]:
    """Validate what field ranges cannot; return (micro-batch size, gradient-accumulation steps)."""
    k = cfg.kernels
    wanted = [f"kernels.{key}=triton" for key, v in (("backend", k.backend), ("abstopk", k.abstopk), ("select", k.select)) if v.value == "triton"]
    if wanted and dist.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"{', '.join(wanted)} needs a CUDA device (train.device={cfg.train.device} gives {dist.device}); use kernels=default on CPU")
    return micro_batching(cfg, dist.world)


def setup(cfg: Config, run_dir: Path, hydra_files: dict[str, str] | None = None) -> Run:
    """Check everything that can be checked, then build the run (restored from a checkpoint when resuming).

    `hydra_files` (name -> text) are written to <run_dir>/.hydra/ once the start is accepted, so a refused start
    never overwrites the record of the run already there.
    """
    dist = distributed.init(cfg.train.device)
    if dist.device.type == "cpu":
        keep_freed_memory()  # measured on CPU steps only (docs/benchmarks.md)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    batching = check_config(cfg, dist)
    with torch.device("meta"):  # model and sparsity settings fail here, before any data work
        Sparsifier(GPT(cfg.model), cfg.sparsity, cfg.train.max_steps)
    resume_from = find_resume(cfg, run_dir)
    notes = check_changes(cfg, resume_from) if resume_from is not None else []

    # The main process builds the token cache; the others wait, then read it (or stop with it, if it failed).
    failure = None
    if dist.is_main:
        try:
            data = prepare(cfg.data)
        except UserError as e:
            failure = e
    if distributed.any_rank(failure is not None, dist):  # also the barrier the others wait at
        raise failure or UserError("preparing the token cache failed on the main process (its message says why)")
    if not dist.is_main:
        data = prepare(cfg.data)
    if data.meta["vocab_size"] > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {data.meta['vocab_size']} tokens but model.vocab_size={cfg.model.vocab_size}")
    run = build_run(cfg, run_dir, dist, data, batching)
    run.resume_notes = notes
    if resume_from is not None:
        restore(run, resume_from)
    if dist.is_main and hydra_files:  # only now is the start accepted
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        for name, text in hydra_files.items():
            write_text(run_dir / ".hydra" / name, text)
    run.accel.after_step(run.sparsifier.plan(run.step))
    if cfg.train.compile:
        run.train_model = torch.compile(run.train_model)
    if dist.enabled:
        run.train_model = DDP(run.train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return run


def build_run(cfg: Config, run_dir: Path, dist: distributed.Dist, data: TokenData, batching: tuple[int, int]) -> Run:
    """Model, sparsifier, kernels and optimizer at step 0 (also used by sparse_lm.bench)."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(dist.device)
    sparsifier = Sparsifier(model, cfg.sparsity, cfg.train.max_steps)
    compute_dtype = autocast_dtype(cfg, dist.device) or torch.float32
    micro, accum = batching
    accel = install(model, sparsifier, cfg.kernels, compute_dtype, tokens=micro * cfg.model.ctx_len)
    optimizer = build_optimizer(model, cfg.optim)
    sampler = ChunkSampler(data.train, cfg.model.ctx_len, cfg.train.seed)
    return Run(cfg, run_dir, dist, data, model, model, optimizer, sparsifier, accel, sampler, micro, accum)


def restore(run: Run, ckpt: Path) -> None:
    state = checkpoint.load(ckpt, map_location=run.dist.device)
    if state["state"].get("tokenizer_hash") != run.data.meta["tokenizer_hash"]:
        raise UserError(
            f"{ckpt} was trained with tokenizer {str(state['state'].get('tokenizer_hash'))[:12]}, but the data of this "
            f"config ({run.data.dir}) uses {run.data.meta['tokenizer_hash'][:12]}; resume with the same data settings"
        )
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt} does not fit the model of this config (compare its config.yaml):\n{e}") from None
    run.optimizer.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    run.step = state["state"]["step"]
    log.info(f"resumed from {ckpt} at step {run.step}")


def train_step(run: Run) -> tuple[torch.Tensor, dict]:
    """Take optimizer step run.step → run.step + 1. Returns the mean loss and step statistics."""
    cfg, dist = run.cfg, run.dist
    n = run.step + 1
    total = torch.zeros((), device=dist.device)
    for micro in range(run.accum):
        x, y = train_batch(run.sampler, run.step, micro, dist.rank, dist.world, run.micro, run.accum)
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        last = micro == run.accum - 1
        with (run.train_model.no_sync() if dist.enabled and not last else nullcontext()), run.autocast():
            _, loss = run.train_model(x, y)
        (loss / run.accum).backward()
        total += loss.detach()

    norm, _ = normalize_gradients(run.params, cfg.optim.grad_norm, cfg.optim.grad_eps)
    plan = run.sparsifier.plan(n)  # the one place this step's densities and k's are computed
    lr = cfg.optim.lr * lr_multiplier(n / cfg.train.max_steps, cfg.optim.warmup, plan.density["hidden"], run.final_density)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.sparsifier.apply(plan)
    decay_weights(run.decay, cfg.optim.weight_decay, lr)
    run.accel.after_step(plan)
    run.step = n
    return total / run.accum, {"lr": lr, "plan": plan, "grad_norm": norm}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    cfg, dist = run.cfg, run.dist
    run.model.eval()
    sums = torch.zeros(2, device=dist.device)
    for x, y in val_batches(run.data.val, cfg.model.ctx_len, cfg.train.eval_sequences, run.micro, dist.rank, dist.world):
        with run.autocast():
            _, loss = run.model(x.to(dist.device), y.to(dist.device))
        sums += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=dist.device)])
    run.model.train()
    distributed.all_reduce_sum(sums, dist)
    if sums[1] == 0:
        return {}
    val_loss = (sums[0] / sums[1]).item()
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / run.data.val_bytes_per_token}


def flops_per_token(run: Run, plan: Plan) -> tuple[float, float]:
    """(dense-equivalent, effective) training FLOPs per token.

    Dense counts 6 FLOPs per matmul weight (the hidden matrices and the unembedding); effective counts what the
    exact sparse method must do: forward and dX over the nonzeros only (2 + 2 per nonzero), dW dense (2 per
    weight). Attention scores add 12·L·T·d.
    """
    attn = 12 * run.cfg.model.n_layer * run.cfg.model.ctx_len * run.cfg.model.d_model
    dense, nnz = 0, 0
    for name, p in run.model.named_parameters():
        if role(name).matmul:
            dense += p.numel()
            nnz += plan.k.get(name, p.numel())
    return 6 * dense + attn, 2 * dense + 4 * nnz + attn


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mean_loss_checked(run: Run, loss: torch.Tensor) -> float:
    """The loss averaged over processes; raises on every process if it or any weight is not finite.

    Called before logging and before saving, so a diverged run stops without writing a broken checkpoint.
    """
    weights = torch.stack(torch._foreach_norm([p.detach() for p in run.model.parameters()])).sum()
    values = torch.stack([loss.detach().float(), weights.float()])
    distributed.all_reduce_sum(values, run.dist)
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"loss or weights are not finite at step {run.step}; stopping before any checkpoint is written")
    return values[0].item() / run.dist.world


def save(run: Run, loss: torch.Tensor) -> None:
    mean_loss_checked(run, loss)
    if run.dist.is_main:
        state = {
            "tokens": run.step * run.tokens_per_step,
            "tokenizer_hash": run.data.meta["tokenizer_hash"],
            "corpus_hash": run.data.meta["corpus_hash"],
            "data_dir": str(run.data.dir),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = checkpoint.save(
            run.run_dir / "checkpoints", run.step, run.model, run.optimizer, state, to_yaml(run.cfg), run.data.tokenizer_path, run.cfg.train.keep_last
        )
        log.info(f"saved checkpoint {path}")
    distributed.barrier(run.dist)


def log_step(run: Run, logger: RunLogger, meter: Throughput, loss: torch.Tensor, stats: dict) -> dict:
    """Write one training row (averaged over processes) to every sink; return it."""
    n = run.step
    loss_value = mean_loss_checked(run, loss)
    tps = meter.tokens_per_sec(run.tokens_per_step)
    plan = stats["plan"]
    row = {"step": n, "loss": loss_value, "lr": stats["lr"], "density": plan.density["hidden"], "tokens_per_sec": tps,
           "grad_norm": stats["grad_norm"].item(), "tokens": n * run.tokens_per_step}
    scalars = {"train/loss": loss_value, "lr": stats["lr"], "grad_norm": row["grad_norm"], "tokens_per_sec": tps}
    if run.dist.is_main:
        # What the weights hold (a sparse bias may hold fewer than its k), counted with one host sync.
        counts = torch.stack([(sp.param != 0).sum() for sp in run.sparsifier.params]).tolist() if run.sparsifier.params else []
        for sp, count in zip(run.sparsifier.params, counts):
            scalars[f"density/{sp.name}"] = count / sp.param.numel()
        peak = peak_flops(run.dist.device)
        if peak:
            dense, effective = flops_per_token(run, plan)
            per_gpu = tps / run.dist.world  # tps counts every process's tokens; peak is one GPU's
            scalars.update({"mfu/dense_equivalent": per_gpu * dense / peak, "mfu/effective": per_gpu * effective / peak})
    logger.write(row, scalars)
    logger.progress(row, meter.eta(n, run.cfg.train.max_steps))
    meter.restart()
    return row


def log_eval(run: Run, logger: RunLogger) -> dict:
    metrics = evaluate(run)
    if metrics:
        logger.write({"step": run.step, **metrics}, {"val/loss": metrics["val_loss"], "val/bpb": metrics["val_bpb"]})
        logger.info(f"step {run.step} | val loss {metrics['val_loss']:.4f} | val bpb {metrics['val_bpb']:.4f}")
    return metrics


@contextmanager
def stop_requests():
    """Turn the first SIGTERM/SIGINT into a request to stop after the current step (with a checkpoint).

    A second signal acts as usual, so pressing Ctrl-C twice still interrupts at once.
    """
    request = {"signal": None}
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig, _frame):
        request["signal"] = sig
        signal.signal(sig, previous[sig])

    for s in previous:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(cfg: Config, run_dir: Path, hydra_files: dict[str, str] | None = None) -> dict:
    """Train until train.max_steps (or a stop request); return the last logged metrics."""
    run = setup(cfg, Path(run_dir), hydra_files)
    t = cfg.train
    logger = RunLogger(run.run_dir, run.step, t.max_steps, run.dist.is_main)
    meter = Throughput(run.step)
    n_params = sum(p.numel() for p in run.model.parameters())
    logger.info(
        f"run dir {run.run_dir} | {n_params / 1e6:.2f}M parameters | {run.dist.world} process(es) on {run.dist.device} | "
        f"{run.accum} micro-batch(es) of {run.micro} × {cfg.model.ctx_len} tokens per process per step"
    )
    if run.resume_notes:
        for line in run.resume_notes:
            logger.info(line)
        logger.write({"step": run.step, "resume_changes": run.resume_notes})
    last: dict = {}
    try:
        with stop_requests() as request:
            while run.step < t.max_steps:
                loss, stats = train_step(run)
                meter.step()
                n, final = run.step, run.step == t.max_steps
                if n % t.log_interval == 0 or final:
                    last.update(log_step(run, logger, meter, loss, stats))
                if n % t.eval_interval == 0 or final:
                    last.update(log_eval(run, logger))
                    meter.restart()  # evaluation time does not count against tokens/s
                stop = distributed.any_rank(request["signal"] is not None, run.dist)
                exiting = stop or (t.exit_interval is not None and n % t.exit_interval == 0)
                if n % t.ckpt_interval == 0 or final or exiting:
                    save(run, loss)
                    meter.restart()
                if exiting and not final:
                    why = "a stop signal" if stop else f"train.exit_interval={t.exit_interval}"
                    logger.info(f"stopping at step {n} because of {why}; continue with train.resume=auto")
                    break
            if run.step >= t.max_steps:
                logger.info(f"done: {run.step} steps in {format_duration(meter.elapsed())}")
    finally:
        logger.close()
        distributed.shutdown(run.dist)
    return last
