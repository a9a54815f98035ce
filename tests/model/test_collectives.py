"""The collectives module: identity without a group, exact results on 2 gloo ranks, and the
only place of the package that calls torch.distributed collectives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import run_gloo_ranks
from gckd_ray.model import collectives

PACKAGE = Path(collectives.__file__).resolve().parents[1]
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
               "reduce_scatter", "gather", "scatter", "all_to_all", "barrier", "send", "recv",
               "isend", "irecv", "broadcast_object_list", "all_gather_object")


def test_no_module_but_collectives_calls_a_torch_distributed_collective():
    call = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {m.group(0)}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "collectives.py"
                 for m in call.finditer(path.read_text())]
    assert offenders == []
    # and the pattern does find the real calls
    assert call.search(Path(collectives.__file__).read_text())


def test_single_process_is_the_identity():
    x = torch.arange(6.0).view(3, 2)
    assert collectives.rank_and_world() == (0, 1)
    for fn in (collectives.all_gather_no_grad, collectives.all_gather_with_grad,
               collectives.all_reduce_sum, collectives.all_reduce_mean, collectives.broadcast):
        assert torch.equal(fn(x), x)
    assert collectives.all_gather_many([x, x.long()])[1].dtype == torch.long


def _rank_results(rank: int) -> dict[str, torch.Tensor]:
    x = torch.full((2, 3), float(rank + 1))  # integer-valued: sums are exact in float32
    grad_in = torch.tensor([[float(rank)]], requires_grad=True)
    gathered = collectives.all_gather_with_grad(grad_in)  # (2, 1)
    (gathered * torch.tensor([[1.0], [10.0]])).sum().backward()
    return {"gather": collectives.all_gather_no_grad(x),
            "many": collectives.all_gather_many([x[:1], torch.tensor([rank])])[1],
            "sum": collectives.all_reduce_sum(x), "mean": collectives.all_reduce_mean(x),
            "broadcast": collectives.broadcast(torch.tensor([rank + 7])),
            "grad": grad_in.grad, "untouched": x}


@pytest.mark.slow
def test_two_gloo_ranks_give_exact_results_and_leave_inputs_alone():
    ranks = run_gloo_ranks(_rank_results, 2)
    for rank, out in enumerate(ranks):
        assert torch.equal(out["gather"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        assert out["many"].tolist() == [0, 1]
        assert torch.equal(out["sum"], torch.full((2, 3), 3.0))
        assert torch.equal(out["mean"], torch.full((2, 3), 1.5))
        assert out["broadcast"].tolist() == [7]
        # d/dx_r of sum_j c_j x_j over both ranks' losses: each rank's loss weights row r by
        # c_r, and the two ranks' gradients are summed: 2 * c_r.
        assert out["grad"].tolist() == [[2.0 * (1.0, 10.0)[rank]]]
        assert torch.equal(out["untouched"], torch.full((2, 3), float(rank + 1)))
