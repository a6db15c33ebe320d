"""Contracts and gradients of the unrolled networks, and registry persistence."""

import pytest
import torch

from models import GDNetConfig, GradientDescentNet, ModelError, build_model, load_model, save_model
from operators.linear import Diagonal


def _masked_identity(mask: torch.Tensor) -> Diagonal:
    """A stand-in measurement operator: keep the entries where mask is 1 (complex)."""
    return Diagonal(mask.to(torch.complex64), ndim=2)


@pytest.mark.parametrize("shape", [(2, 17, 23), (1, 8, 8)])
def test_output_shape_dtype_at_odd_sizes(shape):
    g = torch.Generator().manual_seed(0)
    net = GradientDescentNet(GDNetConfig(n_iter=2, features=4))
    op = _masked_identity((torch.rand(shape, generator=g) > 0.5).float())
    y = torch.randn(shape, generator=g, dtype=torch.complex64)
    x = net(y, op)
    assert x.shape == shape and x.dtype == torch.complex64


def test_gradients_reach_input_and_every_parameter():
    g = torch.Generator().manual_seed(1)
    net = GradientDescentNet(GDNetConfig(n_iter=3, features=4))
    # Non-zero last layers so every parameter is on the gradient path.
    with torch.no_grad():
        for reg in net.regularizers:
            reg.net[-1].weight.normal_(0, 0.1, generator=g)
    op = _masked_identity((torch.rand(2, 12, 12, generator=g) > 0.3).float())
    y = torch.randn(2, 12, 12, generator=g, dtype=torch.complex64, requires_grad=True)
    net(y, op).abs().sum().backward()
    assert y.grad is not None and torch.all(torch.isfinite(torch.view_as_real(y.grad)))
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_untrained_network_is_plain_gradient_descent_and_scale_invariant():
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(1, 10, 10, generator=g) > 0.5).float()
    op = _masked_identity(mask)
    y = torch.randn(1, 10, 10, generator=g, dtype=torch.complex64) * mask
    net = GradientDescentNet(GDNetConfig(n_iter=2, features=4))
    x = net(y, op)
    # With zero-initialised regularisers and unit steps, GD from Aᴴy on a projector stays at Aᴴy.
    assert torch.allclose(x, op.adjoint(y), atol=1e-6)
    assert torch.allclose(net(10 * y, op), 10 * x, atol=1e-5)


def test_registry_round_trip_through_safetensors(tmp_path):
    net = build_model("unrolled_gd", {"n_iter": 2, "features": 4})
    with torch.no_grad():
        net.steps.fill_(0.37)
    save_model(net, "unrolled_gd", {"n_iter": 2, "features": 4}, tmp_path / "m")
    loaded, spec = load_model(tmp_path / "m")
    assert spec == {"name": "unrolled_gd", "kwargs": {"features": 4, "n_iter": 2}}
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_registry_errors_name_the_choices(tmp_path):
    with pytest.raises(ModelError, match=r"unknown model 'unet9'; expected one of \[.*'unrolled_gd'.*\]"):
        build_model("unet9")
    with pytest.raises(ModelError, match="bad keyword arguments"):
        build_model("unrolled_gd", {"n_iterz": 2})
    with pytest.raises(ModelError, match="missing model.json"):
        load_model(tmp_path)


def test_real_images_and_a_ct_operator_give_real_output_and_gradients():
    from operators.ct import ParallelBeam, sparse_view_angles

    op = ParallelBeam((16, 16), sparse_view_angles(12))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 16, 16, generator=g)
    y = op.forward(x)
    net = GradientDescentNet(GDNetConfig(n_iter=3, features=4))
    with torch.no_grad():
        for reg in net.regularizers:
            reg.net[-1].weight.normal_(0, 0.1, generator=g)
    out = net(y, op)
    assert out.shape == (2, 16, 16) and out.dtype == torch.float32
    out.abs().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_untrained_network_descends_on_an_operator_of_large_norm():
    """The step is normalised by ‖A‖²: plain GD from FBP lowers the data residual instead of diverging."""
    from operators.ct import ParallelBeam, sparse_view_angles

    op = ParallelBeam((24, 24), sparse_view_angles(18))
    assert op.norm() > 5
    x = torch.zeros(1, 24, 24)
    x[:, 6:18, 8:16] = 1.0
    y = op.forward(x)
    net = GradientDescentNet(GDNetConfig(n_iter=4, features=4))
    fbp = op.pseudo_inverse(y)
    with torch.no_grad():
        out = net(y, op)
    residual = lambda z: float(torch.linalg.vector_norm(op.forward(z) - y))  # noqa: E731
    assert residual(out) < residual(fbp)


def test_conv_regulariser_takes_real_and_complex_images():
    from models.unrolled import ConvRegularizer

    reg = ConvRegularizer(features=4)
    with torch.no_grad():
        reg.net[-1].weight.fill_(0.01)
    real = torch.randn(2, 8, 8)
    assert reg(real).dtype == torch.float32 and reg(real).shape == real.shape
    as_complex = reg(real.to(torch.complex64))
    torch.testing.assert_close(reg(real), as_complex.real)  # a real image is x + 0i
