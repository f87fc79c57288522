import pytest
import torch

from opt_train.config import ModelConfig
from opt_train.loss import lm_loss
from opt_train.model import OPT
from opt_train.parallelize import apply_ac


def loss_and_grads(model: OPT, x: torch.Tensor):
    model.zero_grad()
    loss = lm_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    cfg = ModelConfig(
        vocab_size=128, d_model=32, n_heads=4, n_layers=3, dropout=0.1, attention_dropout=0.0
    )
    torch.manual_seed(0)
    plain = OPT(cfg)
    ckpt = OPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_ac(ckpt, mode)
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    want_loss, want = loss_and_grads(plain, x)
    torch.manual_seed(5)  # same dropout masks: recomputation must replay them
    got_loss, got = loss_and_grads(ckpt, x)
    assert torch.equal(got_loss, want_loss)
    for name, g in want.items():
        match = [v for k, v in got.items() if k.replace("_checkpoint_wrapped_module.", "") == name]
        assert len(match) == 1, name
        torch.testing.assert_close(match[0], g, rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_activation_checkpoint_mode_is_rejected():
    with pytest.raises(ValueError, match="activation_checkpoint"):
        apply_ac(OPT(ModelConfig(vocab_size=64, d_model=32, n_heads=4)), "some")
