import pytest

from opt_train.config import ModelConfig
from opt_train.model.opt import OPT
from opt_train.parallel.apply import apply_ac

# Loss and gradients equal with and without checkpointing, dropout masks replayed:
# test_model_cpu_paths.py::test_activation_checkpointing_replays_attention_and_residual_dropout_masks


def test_unknown_activation_checkpoint_mode_is_rejected():
    with pytest.raises(ValueError, match="activation_checkpoint"):
        apply_ac(OPT(ModelConfig(vocab_size=64, d_model=32, n_heads=4)), "some")
