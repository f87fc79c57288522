import pytest
import torch
import torch.nn.functional as F

from opt_train.engine.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_cross_entropy_equals_full_logits_loss_and_grads(chunk):
    torch.manual_seed(0)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    loss = chunked_cross_entropy(h, w, y, chunk, grad_scale=8.0)
    (loss * 8.0).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), y)
    (ref * 8.0).backward()
    # fp32 with the same products summed in another order: ~1e-6 relative.
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_fp16_gradients_survive_with_loss_scale():
    """Per-logit gradients of a mean over many tokens underflow fp16 unless formed scaled."""
    torch.manual_seed(0)
    n = 4096
    h = torch.randn(n, 16).half().requires_grad_()
    w = (torch.randn(1000, 16) * 0.1).half().requires_grad_()
    y = torch.randint(0, 1000, (n,))
    scale = 2.0**14
    (chunked_cross_entropy(h, w, y, 512, grad_scale=scale) * scale).backward()
    ref_h = h.detach().float().requires_grad_()
    ref_w = w.detach().float().requires_grad_()
    (F.cross_entropy(ref_h @ ref_w.t(), y) * scale).backward()
    # fp16 keeps 11 significant bits: rounding one value costs up to 2^-11 (~4.9e-4) relative.
    # Each gradient here is rounded about twice on the way (the per-logit gradient to fp16,
    # the matmul's result to fp16): rtol 2e-3 covers a few such roundings. The weight gradient
    # is summed over 8 chunks whose fp16 partials are rounded before the fp32 sum, so an entry
    # whose partials cancel keeps an absolute error of the partials' size: atol is one fp16
    # ulp (2^-10) of the largest gradient. (Measured: 2e-4 of it for w, 2e-5 for h.)
    for got, want in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
        atol = 2.0**-10 * want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=atol)
    assert torch.count_nonzero(h.grad) > 0.99 * h.numel()
    assert torch.count_nonzero(w.grad) > 0.99 * w.numel()
