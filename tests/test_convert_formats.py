"""Consolidated / reference conversions through the CLI: round trips, sharding, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.consolidated import load_model_folder, load_weights
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.model import LaMemoLM

TINY = ModelConfig(vocab_size=61, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                   dropout=0.0, segment_len=8, mem_len=8)
ADAPTIVE = ModelConfig(vocab_size=61, n_layer=1, n_head=2, d_model=16, d_head=8, d_inner=32,
                       dropout=0.0, segment_len=8, mem_len=8, cutoffs=(20, 40), div_val=2)


def trained_like(cfg: ModelConfig, seed: int = 0) -> LaMemoLM:
    torch.manual_seed(seed)
    model = LaMemoLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # break init symmetries (zero biases etc.)
    return model.eval()


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.unit
@pytest.mark.parametrize("cfg", [TINY, ADAPTIVE], ids=["full", "adaptive"])
def test_consolidated_stores_tied_weights_once_and_reloads(cfg, tmp_path):
    model = trained_like(cfg)
    write_target("consolidated", Loaded(model=model, source="test"), tmp_path / "c", quiet=True)
    tensors, meta = load_weights(tmp_path / "c")
    assert not any(k.startswith("crit.out_layers.") and k.endswith(".weight") for k in tensors)
    assert json.loads(meta["lamemo_tied"])
    back, _ = load_model_folder(tmp_path / "c")
    same_tensors(model, back)
    assert back.crit.out_layers[0].weight is back.word_emb.emb_layers[0].weight


@pytest.mark.unit
def test_sharded_weights_have_an_index_and_reload(tmp_path, lamemo):
    model = trained_like(TINY)
    files = write_target("consolidated", Loaded(model=model, source="t"), tmp_path / "c",
                         max_shard_bytes=4096, dtype=torch.bfloat16, quiet=True)
    assert "model.safetensors.index.json" in files and len(files) > 4
    back, data = load_model_folder(tmp_path / "c")
    assert data["dtype"] == "bfloat16" and next(back.parameters()).dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "c" / victim).unlink()
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "c"), "--to", "hf",
               str(tmp_path / "h"))
    assert r.returncode == 1 and victim in r.stderr and not (tmp_path / "h").exists()


@pytest.mark.integration
def test_reference_round_trip_through_the_cli(tmp_path, lamemo):
    model = trained_like(TINY)
    write_target("consolidated", Loaded(model=model, source="t"), tmp_path / "a", quiet=True)
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "a"), "--to", "reference",
               str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "ref" / "reference.pt").is_file()
    ref_sd = torch.load(tmp_path / "ref" / "reference.pt", weights_only=True)
    assert "layers.0.dec_attn.q_net.weight" in ref_sd and "r_r_bias_future" in ref_sd
    # a bare reference file needs the model shape
    r = lamemo("convert", "--from", "reference", str(tmp_path / "ref" / "reference.pt"), "--to",
               "consolidated", str(tmp_path / "b"))
    assert r.returncode != 0 and "--config" in r.stderr and not (tmp_path / "b").exists()
    sets = [f"model.{k}={v}" for k, v in [("vocab_size", 61), ("n_layer", 2), ("n_head", 2),
            ("d_model", 16), ("d_head", 8), ("d_inner", 32), ("segment_len", 8),
            ("mem_len", 8), ("dropout", 0.0)]]
    r = lamemo("convert", "--from", "reference", str(tmp_path / "ref" / "reference.pt"), "--to",
               "consolidated", str(tmp_path / "b"), *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    back, _ = load_model_folder(tmp_path / "b")
    same_tensors(model, back)
    r = lamemo("convert", "--from", "reference", str(tmp_path / "ref"), "--to", "consolidated",
               str(tmp_path / "c"))  # a folder carries its config.json
    assert r.returncode == 0, r.stderr
    same_tensors(model, load_model_folder(tmp_path / "c")[0])


@pytest.mark.integration
def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, lamemo):
    model = trained_like(TINY)
    write_target("consolidated", Loaded(model=model, source="t"), tmp_path / "a", quiet=True)
    # existing output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "a"), "--to", "hf",
               str(tmp_path / "busy"))
    assert r.returncode == 1 and "--force" in r.stderr
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    # truncated weights
    w = tmp_path / "a" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "a"), "--to", "hf",
               str(tmp_path / "o"))
    assert r.returncode == 1 and "model.safetensors" in r.stderr
    # a config that does not match the tensors
    write_target("consolidated", Loaded(model=model, source="t"), tmp_path / "d", quiet=True)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["lamemo_model"]["d_inner"] = 48
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "d"), "--to", "reference",
               str(tmp_path / "o"))  # the edit fails the export's manifest
    assert r.returncode == 1 and "file config.json" in r.stderr and "--no-verify" in r.stderr
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "d"), "--to", "reference",
               str(tmp_path / "o"), "--no-verify")  # past it, the shapes are checked
    assert r.returncode == 1 and "fc1.weight" in r.stderr and "(48, 16)" in r.stderr
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.unit
def test_one_format_detector_names_every_layout(tmp_path):
    """detect_format is the rule of inspect, verify, eval and record_eval alike."""
    from lamemo_ds.convert.registry import detect_format

    model = trained_like(TINY)
    cons = tmp_path / "cons"
    write_target("consolidated", Loaded(model=model, source="test"), cons, quiet=True)
    hf = tmp_path / "hf"
    write_target("hf", Loaded(model=model, source="test"), hf, quiet=True)
    ref = tmp_path / "ref"
    write_target("reference", Loaded(model=model, source="test"), ref, quiet=True)
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    (step / "deepspeed").mkdir(parents=True)
    (step / "config.json").write_text("{}")  # a step folder stays deepspeed whatever it holds
    assert [detect_format(p) for p in (cons, hf, ref, step, tmp_path / "run",
                                       ref / "reference.pt")] == \
        ["consolidated", "hf", "reference", "deepspeed", "deepspeed", "deepspeed"]


@pytest.mark.unit
def test_export_file_modes_and_no_temp_left(tmp_path):
    """write_target renames its temp folder into place: files world-readable, no temp beside."""
    out = tmp_path / "out"
    write_target("consolidated", Loaded(model=trained_like(TINY), source="test"), out,
                 quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir() if f.is_file())


@pytest.mark.unit
def test_presets_are_the_shipped_configs_and_another_vocabulary_names_its_size():
    """`--preset enwik8_base` is the model of configs/enwik8_base.yaml (one source of truth);
    an authors' checkpoint of another vocabulary is refused naming the setting that fits it."""
    from dataclasses import replace

    from lamemo_ds.config.load import load_config
    from lamemo_ds.config.schema import ConfigError
    from lamemo_ds.convert.reference import from_reference, to_reference
    from lamemo_ds.model.presets import preset

    assert preset("enwik8_base") == load_config("enwik8_base").model
    assert preset("enwik8_base").vocab_size == 257 and preset("text8_base").vocab_size == 29
    with pytest.raises(KeyError, match="'enwik9'.*enwik8_base"):
        preset("enwik9")
    ref = to_reference(trained_like(TINY))
    with pytest.raises(ConfigError, match=r"vocabulary of 61, the config 62: add --set "
                                          r"model.vocab_size=61"):
        from_reference(ref, replace(TINY, vocab_size=62))
    same_tensors(from_reference(ref, TINY), trained_like(TINY))
