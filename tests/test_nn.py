"""The binary building blocks: exact forward math and the straight-through gradients."""
import pytest
import torch
import torch.nn.functional as F

from bimatting_triton.nn import BiConv2d, BinaryActivation, BinaryWeightSTE, LearnableBias, SignSTE, binarize_weight


def test_sign_forward_keeps_zero():
    x = torch.tensor([-2.0, -0.5, 0.0, -0.0, 0.3, 1.0, 7.0])
    assert torch.equal(SignSTE.apply(x), torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))


def test_sign_backward_is_hardtanh_ste():
    x = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0001, 4.0], requires_grad=True)
    grad_out = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    BinaryActivation()(x).backward(grad_out)
    # |x| <= 1 passes the gradient (both ends included), |x| > 1 stops it; sign(0) still passes.
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]))


def test_binary_weight_forward():
    w = torch.tensor([[1.0, 3.0, -2.0, 2.0]]).view(1, 4, 1, 1)  # mean 1 -> w_c = [0, 2, -3, 1]
    bw = binarize_weight(w)
    alpha = (0 + 2 + 3 + 1) / 4
    assert torch.equal(bw.flatten(), torch.tensor([0.0, alpha, -alpha, alpha]))


def test_binary_weight_backward_is_clamp_ste():
    w_c = torch.tensor([-1.5, -1.0, 0.0, 0.4, 1.0, 2.5]).view(1, 6, 1, 1).requires_grad_()
    grad_out = torch.arange(1.0, 7.0).view(1, 6, 1, 1)
    BinaryWeightSTE.apply(w_c).backward(grad_out)
    assert torch.equal(w_c.grad.flatten(), torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))


def test_binary_weight_gradient_matches_published_formula():
    """Gradient w.r.t. the latent weight equals the published ``- clamp.detach() + clamp`` trick."""
    torch.manual_seed(1)
    w = (torch.randn(5, 3, 3, 3) * 1.5).requires_grad_()
    grad_out = torch.randn(5, 3, 3, 3)
    binarize_weight(w).backward(grad_out)

    w_ref = w.detach().clone().requires_grad_()
    w_c = w_ref - w_ref.mean(dim=(1, 2, 3), keepdim=True)
    alpha = w_c.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    clipped = torch.clamp(w_c, -1.0, 1.0)
    ref = alpha * torch.sign(w_c).detach() - clipped.detach() + clipped
    ref.backward(grad_out)
    assert torch.allclose(w.grad, w_ref.grad, rtol=0, atol=1e-6)
    assert torch.allclose(binarize_weight(w), ref, rtol=0, atol=1e-6)


def test_biconv2d_equals_conv_of_binarized_weight():
    torch.manual_seed(2)
    conv = BiConv2d(5, 7, 3, stride=2, bias=True)
    x = torch.randn(2, 5, 9, 11)
    expected = F.conv2d(x, binarize_weight(conv.weight), conv.bias, stride=2, padding=1)
    assert torch.equal(conv(x), expected)
    assert conv.channel_threshold.shape == (1, 5, 1, 1)
    assert conv.padding == (1, 1)


def test_biconv2d_rejects_non_zero_padding():
    with pytest.raises(ValueError, match="padding_mode"):
        BiConv2d(4, 4, 3, padding_mode="reflect")


def test_learnable_bias():
    lb = LearnableBias(3)
    assert lb.bias.shape == (1, 3, 1, 1) and torch.count_nonzero(lb.bias) == 0
    with torch.no_grad():
        lb.bias.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    x = torch.zeros(2, 3, 2, 2, requires_grad=True)
    y = lb(x)
    assert torch.equal(y[0, :, 0, 0], torch.tensor([1.0, -2.0, 0.5]))
    y.sum().backward()
    assert torch.equal(lb.bias.grad.flatten(), torch.full((3,), 8.0))
