"""Every config under conf/ composes against the typed schema, and builds what it describes."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from omegaconf import OmegaConf

from sparse_lm.config import (BenchConfig, Config, DataConfig, DecomposeConfig, FrontierConfig, InspectConfig, PlateausConfig, KernelsConfig, ModelConfig, OptimConfig,
                              PruneConfig, SampleConfig, SparsityConfig, ToyConfig, TrainConfig, register_configs, to_object)
from sparse_lm.errors import UserError
from sparse_lm.model import GPT
from sparse_lm.sparsity import Sparsifier
from sparse_lm.trainer import micro_batching

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


TOOL_GROUPS = {"frontier", "decompose"}  # groups of a tool's config, not of train.py's (test_frontier, test_decompose compose them)


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in TOOL_GROUPS):
        for option in sorted(group.glob("*.yaml")):
            yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_group_option_composes_and_builds(override):
    extra = ["data.path=/tmp"] if override == "data=dir" else []
    if override.endswith("=paper"):  # paper densities are sized for the paper model
        extra.append("preset=paper")
    cfg = compose_train(*extra, override)
    assert isinstance(cfg, Config)
    with torch.device("meta"):
        model = GPT(cfg.model)
    Sparsifier(model, cfg.sparsity, cfg.train.max_steps)  # densities fit the j-rule for this model
    micro, accum = micro_batching(cfg, world=1)
    assert micro * accum == cfg.train.batch_size and micro * cfg.model.ctx_len <= cfg.train.micro_batch_tokens


def test_auto_micro_batches_keep_the_global_batch_and_explicit_ones_must_divide_it():
    tiny, paper = compose_train(), compose_train("preset=paper")
    assert micro_batching(tiny, 1) == (32, 1) and micro_batching(tiny, 2) == (16, 1)  # 4096 tokens fit 16,384
    assert micro_batching(paper, 1) == (64, 8) and micro_batching(paper, 8) == (64, 1)  # 64 x 256 = 16,384 tokens
    assert micro_batching(compose_train("train.batch_size=30", "train.micro_batch_tokens=2048"), 1) == (15, 2)
    with pytest.raises(UserError, match="train.batch_size=32 must be a multiple of train.micro_batch_size=5"):
        micro_batching(compose_train("train.micro_batch_size=5"), 1)
    with pytest.raises(UserError, match="multiple of the number of processes"):
        micro_batching(tiny, 3)


def test_presets_hold_the_reference_values():
    paper = compose_train("preset=paper")
    m, s, o, t = paper.model, paper.sparsity, paper.optim, paper.train
    assert (m.n_layer, m.d_model, m.d_head, m.d_mlp, m.ctx_len, m.vocab_size) == (8, 1024, 16, 4096, 256, 2048)
    assert (s.hidden_density, s.embed_density, s.min_per_neuron, s.anneal_start, s.anneal_end) == (1 / 64, 1 / 16, 4, 0.01, 0.5)
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay) == (1.28e-2, 0.9, 0.95, 0.1, 0.1)
    assert t.batch_size * m.ctx_len == 512 * 256 and paper.name == "paper"
    tiny = compose_train()
    assert tiny.name == "tiny" and tiny.model.d_model < 1024 and tiny.train.max_steps < 10_000
    assert compose_train("preset=paper", "sparsity=dense", "model.n_layer=2").sparsity.enabled is False


@pytest.mark.parametrize("override", ["train.max_stepz=3", "train.max_steps=abc", "model.norm=batch", "sparsity.anneal=cosine"])
def test_bad_overrides_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_train(override)


def test_tool_configs_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sample = compose("sample", overrides=["checkpoint=runs/tiny", "top_k=null"])
        assert sample.checkpoint == "runs/tiny" and sample.top_k is None and SampleConfig(**sample).temperature == 0.8
        assert compose("inspect", overrides=["checkpoint=x"]).checkpoint == "x"
        plateaus = to_object(compose("plateaus", overrides=["checkpoint=x", "compare=[a,b]"]), PlateausConfig)
        assert plateaus.compare == ["a", "b"] and plateaus.levels == [0.1, 0.5, 1.0]


SCHEMAS = {"model": ModelConfig, "data": DataConfig, "sparsity": SparsityConfig, "optim": OptimConfig, "train": TrainConfig,
           "kernels": KernelsConfig}
TOOLS = {"sample.yaml": SampleConfig, "inspect.yaml": InspectConfig, "bench.yaml": BenchConfig, "prune.yaml": PruneConfig,
         "frontier.yaml": FrontierConfig, "plateaus.yaml": PlateausConfig, "decompose.yaml": DecomposeConfig,
         **{f"{g}/{p.name}": schema for g, schema in (("frontier", FrontierConfig), ("decompose", DecomposeConfig))
            for p in (CONF / g).glob("*.yaml")}}


def repeated_defaults(values, schema, prefix: str) -> list[str]:
    """Keys of `values` (a yaml node) set to the schema's default; interpolations and ??? never count."""
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    plain = OmegaConf.to_container(OmegaConf.create(values), resolve=False)
    return [f"{prefix}{k}" for k, v in plain.items() if k in defaults and v == defaults[k]]


def test_no_config_file_repeats_a_default_of_its_schema():
    """A config file states only what it changes: a value equal to the schema's default is noise that can drift."""
    repeats = []
    for group, schema in SCHEMAS.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            values = OmegaConf.load(path) or OmegaConf.create({})
            repeats += repeated_defaults(values, schema, f"{path.relative_to(CONF)}: ")
    for path in sorted((CONF / "preset").glob("*.yaml")):
        values = OmegaConf.load(path)
        top = {k: v for k, v in OmegaConf.to_container(values).items() if k != "defaults" and k not in SCHEMAS}
        repeats += repeated_defaults(top, Config, f"{path.relative_to(CONF)}: ")
    for name, schema in TOOLS.items():
        values = OmegaConf.load(CONF / name)
        rest = {k: v for k, v in OmegaConf.to_container(values).items() if k not in ("defaults", "hydra")}
        repeats += repeated_defaults(rest, schema, f"{name}: ")
    assert repeats == []
    # The check can fail: a file that restates a default is caught.
    assert repeated_defaults(OmegaConf.create({"lr": 1.28e-2, "eps": 0.2}), OptimConfig, "") == ["lr"]


def test_the_schema_defaults_are_the_paper_preset():
    assert compose_train("preset=paper") == Config(name="paper", model=ModelConfig(vocab_size=2048))


@pytest.mark.parametrize("override, message", [
    ("model.afrac=0", "model.afrac=0.0 is out of range: it must be in (0, 1]"),
    ("train.batch_size=0", "train.batch_size=0 is out of range"),
    ("optim.lr=-1", "optim.lr=-1.0 is out of range"),
    ("optim.lr=inf", "optim.lr=inf is out of range"),
    ("optim.beta2=1", "optim.beta2=1.0 is out of range: it must be in [0, 1)"),
    ("sparsity.anneal_end=1.5", "sparsity.anneal_end=1.5 is out of range"),
    ("data.val_fraction=1", "data.val_fraction=1.0 is out of range"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be auto or an integer"),
    ("train.micro_batch_size=big", "train.micro_batch_size='big' must be auto or an integer"),
    ("train.eval_sequences=0", "train.eval_sequences=0 is out of range"),
    ("optim.eps=inf", "optim.eps=inf is out of range"),
    ("model.init_std=nan", "model.init_std=nan is out of range"),
])
def test_numeric_fields_outside_their_range_are_refused_by_name(override, message):
    with pytest.raises(UserError) as e:
        compose_train(override)
    assert message in str(e.value)


def test_every_numeric_field_of_every_schema_has_a_range():
    from dataclasses import fields, is_dataclass

    missing = []
    for schema in (Config, SampleConfig, BenchConfig, PruneConfig, InspectConfig, DecomposeConfig, ToyConfig):
        stack = [(schema, schema.__name__)]
        while stack:
            cls, prefix = stack.pop()
            for f in fields(cls):
                default = f.default_factory() if callable(f.default_factory) else f.default
                if is_dataclass(default):
                    stack.append((type(default), f"{prefix}.{f.name}"))
                elif "int" in str(f.type) or "float" in str(f.type):
                    if "range" not in f.metadata and f.name != "micro_batch_size":  # auto or int: checked on its own
                        missing.append(f"{prefix}.{f.name}")
    assert missing == []


@pytest.mark.parametrize("schema, field, value", [
    (PruneConfig, "n_test", 0), (PruneConfig, "target", 0.0), (PruneConfig, "tau_init", 2.0), (SampleConfig, "temperature", -1.0),
    (SampleConfig, "top_k", 0), (BenchConfig, "densities", [0.1, 0.0]),
])
def test_tool_fields_are_range_checked_too(schema, field, value):
    with pytest.raises(UserError, match=f"{field}="):
        to_object(OmegaConf.merge(OmegaConf.structured(schema), {"checkpoint": "x", field: value}) if hasattr(schema, "checkpoint")
                  else OmegaConf.merge(OmegaConf.structured(schema), {field: value}), schema)
