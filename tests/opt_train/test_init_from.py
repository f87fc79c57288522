"""model.init_from: an HF directory's weights start a fresh run, checked and sharded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opt_train.config import ModelConfig
from opt_train.model.init_from import InitFromError, load_init_weights
from opt_train.model.opt import OPT
from opt_train.tools.hf_export import save_hf
from tests.multirank import spawn

CFG = ModelConfig(vocab_size=96, n_layers=2, n_heads=4, d_model=32, max_positions=64)


def _exported(tmp_path, cfg: ModelConfig = CFG, **export) -> tuple[OPT, object]:
    """A model with weights far from any init, saved as an HF directory."""
    src = OPT(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    out = tmp_path / "hf"
    if export:
        from opt_train.config import ExportConfig

        save_hf(src, cfg, out, export=ExportConfig(**export))
    else:
        save_hf(src, cfg, out)
    return src, out


def test_init_from_loads_every_weight_of_a_sharded_export(tmp_path):
    src, hf_dir = _exported(tmp_path, max_shard_size="20KB")  # several files + index
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 2
    model = OPT(CFG)
    load_init_weights(model, dataclasses.replace(CFG, init_from=str(hf_dir)))
    for (name, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_shape_mismatch_is_refused_naming_each_key(tmp_path):
    _, hf_dir = _exported(tmp_path)
    other = dataclasses.replace(CFG, d_model=64, n_layers=3, ffn_dim=100, init_from=str(hf_dir))
    with pytest.raises(InitFromError) as e:
        load_init_weights(OPT(dataclasses.replace(other, init_from=None)), other)
    msg = str(e.value)
    assert f"model.d_model: configured 64, {hf_dir} has 32" in msg
    assert f"model.n_layers: configured 3, {hf_dir} has 2" in msg
    assert f"model.ffn_dim: configured 100, {hf_dir} has 128" in msg
    assert "model.vocab_size" not in msg


def test_pickled_weights_are_refused(tmp_path):
    _, hf_dir = _exported(tmp_path)
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(InitFromError, match=r"found pytorch_model.bin: pickled weights are never"):
        load_init_weights(OPT(CFG), dataclasses.replace(CFG, init_from=str(hf_dir)))


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(InitFromError, match="no config.json"):
        load_init_weights(OPT(CFG), dataclasses.replace(CFG, init_from=str(tmp_path)))


def _load_sharded(rank: int, world: int, hf_dir: str, tp: int) -> None:
    from opt_train.config import ParallelConfig
    from opt_train.parallel.apply import parallelize
    from opt_train.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(ParallelConfig(tp=tp), world)
    mesh, _ = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = OPT(CFG)
    parallelize(model, dims, mesh, "fp32", "off", False)
    model.to_empty(device="cpu")
    load_init_weights(model, dataclasses.replace(CFG, init_from=hf_dir))
    ref = OPT(CFG)
    load_init_weights(ref, dataclasses.replace(CFG, init_from=hf_dir))  # checked above
    for name, p in model.named_parameters():
        local = p.to_local()
        if name == "embed_tokens.weight":
            assert local.numel() < p.numel()  # this rank read its shard only
        torch.testing.assert_close(p.full_tensor(), ref.state_dict()[name], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("tp", [1, 2], ids=["fsdp2", "tp2"])
def test_init_from_fills_fsdp2_and_tp_shards_on_two_ranks(tmp_path, tp):
    _, hf_dir = _exported(tmp_path, max_shard_size="30KB")
    spawn(_load_sharded, 2, str(hf_dir), tp)
