"""Every config under conf/ composes against the typed schema, and builds what it describes."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from sparse_lm.config import Config, SampleConfig, register_configs, to_object
from sparse_lm.model import GPT
from sparse_lm.sparsity import Sparsifier

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
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
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0


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
