"""Each compressor in a real gloo group of one: its payload size, its round-trip error, and
error feedback making the accumulated error vanish."""

import pytest
import torch
import torch.distributed as dist

from shoal.compression import COMPRESSORS

N = 10_000


@pytest.fixture(scope="module", autouse=True)
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def gradient(step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("name, factor", [("fp16", 1.95), ("int8", 3.9), ("onebit", 25.0),
                                          ("powersgd", 10.0)])
def test_payload_is_smaller_than_fp32_by_the_promised_factor(name, factor):
    compressor = COMPRESSORS[name](powersgd_rank=4)
    compressor.sum(gradient(0), "g")
    assert 4 * N / compressor.bytes_sent >= factor


@pytest.mark.parametrize("name, bound", [("none", 0.0), ("fp16", 1e-3), ("int8", 0.02),
                                         ("onebit", 1.0), ("powersgd", 1.0)])
def test_one_round_trip_error_is_bounded(name, bound):
    compressor = COMPRESSORS[name](powersgd_rank=4)
    g = gradient(1)
    error = float((compressor.sum(g, "g") - g).norm() / g.norm())
    assert error <= bound


@pytest.mark.parametrize("name", ["int8", "onebit", "powersgd"])
def test_error_feedback_makes_the_accumulated_error_vanish(name):
    """Sum over T steps of what was sent vs of the true gradients: the gap is only the last
    residual, so relative to the total it shrinks like 1/T."""
    compressor = COMPRESSORS[name](powersgd_rank=4)
    sent, true = torch.zeros(N), torch.zeros(N)
    gaps = {}
    for step in range(200):
        g = gradient(step) + 1.0  # a consistent direction, as gradients have
        sent += compressor.sum(g, "g")
        compressor.commit()
        true += g
        if step + 1 in (20, 200):
            gaps[step + 1] = float((sent - true).norm() / true.norm())
    assert gaps[200] < gaps[20] / 3
    assert gaps[200] < 0.05
    assert float((sent - true - (-compressor._residuals["g"])).norm()) < 1e-2 * float(true.norm())


def test_a_rolled_back_step_leaves_the_residual_as_it_was():
    compressor = COMPRESSORS["int8"]()
    compressor.sum(gradient(0), "g")
    compressor.commit()
    before = compressor._residuals["g"].clone()
    compressor.sum(gradient(1), "g")
    compressor.rollback()  # the step failed: it will be redone
    assert torch.equal(compressor._residuals["g"], before)
