"""lamemo_ds/config/load.py: strict YAML loading, `--set a.b=v` overrides, and errors that name
the dotted path and what is allowed; every shipped configs/*.yaml loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lamemo_ds.config import ConfigError, RunConfig, dump_config, load_config
from lamemo_ds.config.load import parse_override
from lamemo_ds.model import LaMemoLM

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"debug", "wt103_base", "enwik8_base", "text8_base"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg  # what a run folder saves reloads to the same tree
    with torch.device("meta"):  # the model section builds a model (no memory allocated)
        assert LaMemoLM(cfg.model).num_parameters() > 0


def test_reference_config_values():
    cfg = load_config(Path(CONFIGS[0]).parent / "wt103_base.yaml")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.d_head, m.d_inner) == (16, 410, 10, 41, 2100)
    assert (m.segment_len, m.mem_len, m.cutoffs) == (150, 150, (20000, 40000, 200000))
    assert cfg.optim.lr == pytest.approx(2.5e-4) and cfg.train.grad_clip == pytest.approx(0.25)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layer: 3\n  cutoffs: [5, 9]\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["model.n_layer=4", "optim.lr=1e-4", "train.seed=7",
                             "model.memory=xl", "eval.mem_len=null", "optim.betas=[0.8, 0.9]"])
    assert cfg.model.n_layer == 4  # the override wins over the file
    assert cfg.model.cutoffs == (5, 9)  # lists become tuples; untouched keys survive
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.seed == 7 and cfg.model.memory == "xl" and cfg.eval.mem_len is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data == RunConfig().data  # sections absent from the file take their defaults
    later = load_config(path, ["model.n_layer=4", "model.n_layer=6"])
    assert later.model.n_layer == 6  # repeated --set: the last one wins


@pytest.mark.parametrize("text", ["1e-3", "2E-4", "3e5", "0.5"])
def test_float_fields_accept_every_float_spelling(text):
    """PyYAML reads '1e-3' (no dot) as text; a float field still takes it."""
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == pytest.approx(float(text))


def test_integers_are_accepted_where_floats_are_expected():
    cfg = load_config(None, ["model.dropout=0", "optim.lr=1"])
    assert cfg.model.dropout == 0.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override,path,hint", [
    ("model.n_layr=3", "model.n_layr", "allowed keys:"),  # unknown key -> the allowed keys
    ("trian.seed=3", "trian", "allowed keys:"),  # unknown section
    ("model.memory=lstm", "model.memory", "'lamemo' | 'xl' | 'none'"),  # bad choice
    ("model.variant=signed", "model.variant", "'signed_distance'"),
    ("train.max_steps=many", "train.max_steps", "expected an integer"),  # bad type
    ("model.n_layer=2.5", "model.n_layer", "expected an integer"),
    ("model.pre_lnorm=3", "model.pre_lnorm", "expected true or false"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("optim.betas=[0.9]", "optim.betas", "expected 2 values"),
    ("model.cutoffs=7", "model.cutoffs", "expected a list"),
    ("model.cutoffs=[4, x]", "model.cutoffs[1]", "expected an integer"),
    ("eval.mem_len=long", "eval.mem_len", "int | None"),
    ("train=5", "train", "expected a mapping"),
    ("model.dropout=1.5", "model.dropout", "must be in [0, 1)"),  # bad value (validate)
    ("model.d_model=7", "model.d_model", "must be even"),
    ("model.cutoffs=[9, 5]", "model.cutoffs", "strictly increasing"),
    ("parallel.zero_stage=4", "parallel.zero_stage", "must be 0, 1, 2 or 3"),
])
def test_bad_values_name_the_dotted_path_and_what_is_allowed(override, path, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and hint in msg, msg


def test_cross_field_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match=r"^model\.variant: .*set model\.memory=lamemo"):
        load_config(None, ["model.memory=xl", "model.variant=unmasked_window"])
    with pytest.raises(ConfigError, match=r"^parallel\.zero_stage: .*pipeline"):
        load_config(None, ["parallel.pipeline_stages=2", "parallel.zero_stage=3"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.max_steps")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    assert parse_override("a.b.c= [1, 2]") == (["a", "b", "c"], [1, 2])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- model\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  n_layer: 2\n  typo_key: 1\n")
    with pytest.raises(ConfigError, match=r"^model\.typo_key: unknown key"):
        load_config(nested)
