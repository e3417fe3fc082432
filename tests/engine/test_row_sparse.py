"""RowSparseBackward: autograd's input gradient, computed only for the rows that receive one."""

import pytest
import torch

from biasmap_engine.row_sparse import RowSparseBackward


def small_net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                              torch.nn.Flatten(2), torch.nn.Linear(9, 5), torch.nn.GELU(), torch.nn.Linear(5, 4))
    return net.requires_grad_(False).double()


def input_grad(net, x, loss, sparse):
    x = x.clone().requires_grad_(True)
    if sparse:
        with RowSparseBackward():
            out = net(x)
    else:
        out = net(x)
    return torch.autograd.grad(loss(out), x)[0]


@pytest.mark.parametrize("rows", [[1], [0, 2], [0, 1, 2]])
def test_the_input_gradient_equals_autograds_when_only_some_rows_reach_the_loss(rows):
    net, x = small_net(), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    loss = lambda out: (out[rows] ** 2).sum()  # noqa: E731
    sparse, dense = input_grad(net, x, loss, True), input_grad(net, x, loss, False)
    assert torch.allclose(sparse, dense, rtol=1e-12, atol=1e-14)
    untouched = [r for r in range(3) if r not in rows]
    assert sparse[untouched].abs().sum() == 0 and sparse[rows].abs().sum() > 0


def test_rows_are_found_per_layer_so_a_row_with_no_gradient_anywhere_costs_nothing():
    calls = []
    net, x = small_net(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    original = torch.nn.grad.conv2d_input
    try:
        torch.nn.grad.conv2d_input = lambda size, *a, **k: calls.append(size[0]) or original(size, *a, **k)
        input_grad(net, x, lambda out: out[1].sum(), True)
    finally:
        torch.nn.grad.conv2d_input = original
    assert calls == [1, 1]  # both convolutions differentiated one row of two


def test_trainable_weights_fall_back_to_ordinary_autograd():
    net = small_net().requires_grad_(True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with RowSparseBackward():
        out = net(x)
    out[0].sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_without_gradients_the_forward_is_unchanged():
    net, x = small_net(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad(), RowSparseBackward():
        inside = net(x)
    assert torch.equal(inside, net(x))
