"""consolidated -> `--to deepspeed` with another layout (ZeRO-3, 2 processes) -> `lamemo train`
resumes from it, and its first step's loss equals the source model's loss on that batch."""

from __future__ import annotations

import pytest
import torch
from train_support import losses, run_ranks, write_config

from lamemo_ds.config import load_config
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.data.streams import OrderedStreams
from lamemo_ds.model import LaMemoLM


@pytest.mark.distributed
@pytest.mark.slow
def test_converted_checkpoint_resumes_with_the_source_loss(tmp_path, corpus, lamemo):
    data = corpus
    cfg_path = write_config(tmp_path / "src.yaml", data, tmp_path / "unused",
                            parallel={"zero_stage": 0},
                            train={"max_steps": 6, "log_interval": 1})
    run_cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = LaMemoLM(run_cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    write_target("consolidated", Loaded(model=model, source="t", run_config=run_cfg),
                 tmp_path / "src", quiet=True)
    out = tmp_path / "resharded"
    # in-process: the command itself starts the writer ranks (torchrun)
    r = lamemo("convert", "--from", "consolidated", str(tmp_path / "src"), "--to", "deepspeed",
               str(out), "--set", "parallel.zero_stage=3", "--world-size", "2", "--step", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "write ZeRO-3, 2 process(es), step 5" in r.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000005"

    ranks = run_ranks(["-m", "lamemo_ds.cli", "train", "--config", str(out / "config.yaml")])
    for r in ranks:
        assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from" in ranks[0].stdout
    got = losses(out)
    assert min(got) == 6  # the first step after the resume is step 6

    # the same first batch, all 4 streams at once, fresh memory, source weights
    loader = OrderedStreams(str(data), "train", seg_len=run_cfg.model.segment_len, rows=4,
                            loop=True, seed=run_cfg.train.seed)
    batch = next(loader)
    loader.close()
    with torch.no_grad():
        want = model(batch.input, None, targets=batch.target).loss.item()
    assert got[6] == pytest.approx(want, rel=1e-5)
