"""Each compressor in a real gloo group of one: its payload size, its round-trip error, and
error feedback making the accumulated error vanish; int8 and onebit on four real processes."""

import subprocess
import sys
import textwrap

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


def test_powersgd_approximates_each_matrix_apart():
    """A gradient whose every matrix has rank <= r comes back exact from one power
    iteration, and vectors are sent whole; over the buffer seen as one matrix it would not."""
    parts = [("a.weight", torch.Size([60, 90])), ("a.bias", torch.Size([60])),
             ("b.weight", torch.Size([30, 60]))]
    low_rank = torch.Generator().manual_seed(3)
    pieces = [torch.randn(60, 4, generator=low_rank) @ torch.randn(4, 90, generator=low_rank),
              torch.randn(60, generator=low_rank),
              torch.randn(30, 2, generator=low_rank) @ torch.randn(2, 60, generator=low_rank)]
    g = torch.cat([piece.reshape(-1) for piece in pieces])
    per_matrix = COMPRESSORS["powersgd"](powersgd_rank=4)
    assert float((per_matrix.sum(g, "g", parts=parts) - g).norm() / g.norm()) < 1e-5
    assert per_matrix.bytes_sent == 4 * ((60 + 90) * 4 + 60 + (30 + 60) * 4)
    one_matrix = COMPRESSORS["powersgd"](powersgd_rank=4)
    assert float((one_matrix.sum(g, "g") - g).norm() / g.norm()) > 0.1


@pytest.mark.parametrize("name", ["int8", "onebit", "powersgd"])
def test_a_residual_is_not_added_to_a_new_layout_of_its_key(name):
    """DDP re-orders a generation's buckets after its first step: the same key, the same
    size, other parameters in each place. What was owed for the old places is dropped,
    not added to whatever lies there now."""
    first = [("x", torch.Size([50, 50])), ("y", torch.Size([25, 100]))]
    reordered = list(reversed(first))
    compressor = COMPRESSORS[name](powersgd_rank=2)
    compressor.sum(gradient(0)[:5000], "bucket0", parts=first)
    compressor.commit()
    fresh = COMPRESSORS[name](powersgd_rank=2)
    assert torch.equal(compressor.sum(gradient(1)[:5000], "bucket0", parts=reordered),
                       fresh.sum(gradient(1)[:5000], "bucket0", parts=reordered))
    compressor.commit()
    again = compressor.sum(gradient(2)[:5000], "bucket0", parts=reordered)  # same layout: owed
    assert not torch.equal(again, fresh.sum(gradient(2)[:5000], "bucket0", parts=reordered))


MEMBER = textwrap.dedent("""
    import os, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from shoal.compression import COMPRESSORS

    port, rank, world, name, reduce_scatter, out = (int(sys.argv[1]), int(sys.argv[2]),
                                                    int(sys.argv[3]), sys.argv[4],
                                                    sys.argv[5] == "1", sys.argv[6])
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)  # four members share the machine's cores
    compressor = COMPRESSORS[name]()
    compressor.reduce_scatter = reduce_scatter
    sent, record = torch.zeros(%(n)d), {}
    for step in range(%(steps)d):
        g = torch.randn(%(n)d, generator=torch.Generator().manual_seed(1000 * rank + step))
        total = compressor.sum(g + rank, "g")  # members pull in different directions
        compressor.commit()
        sent += total
        if step == 0:
            record["first"] = total
            record["first_bytes"] = compressor.bytes_sent
        if step + 1 in (10, %(steps)d):
            record[f"sent{step + 1}"] = sent.clone()
    record["residual"] = compressor._residuals["g"]
    torch.save(record, out)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as shoal's workers leave (shoal._exit): torch 2.13's gloo teardown can abort
""") % {"n": N + 3, "steps": 100}  # N + 3: chunks of unequal length, padding in play


def true_sums(world: int, steps: int) -> torch.Tensor:
    return sum(torch.randn(N + 3, generator=torch.Generator().manual_seed(1000 * rank + step)) + rank
               for rank in range(world) for step in range(steps))


@pytest.mark.parametrize("name, reduce_scatter, factor, bound", [
    ("int8", True, 3.9, 0.02),
    ("onebit", False, 25.0, 0.5),  # gradients: an all-gather of every member's signs
    ("onebit", True, 25.0, 0.5),  # 1-bit Adam's momentum: the sum re-encoded in signs
])
def test_four_members_get_one_sum_and_lose_nothing(tmp_path, name, reduce_scatter, factor, bound):
    """On 4 real processes (reduce-scatter and all-gather, or all-gather), every member gets
    the same sum and hands collectives about one encoding's bytes, and what the encodings
    dropped is held in the residuals, so the accumulated error vanishes."""
    world = 4
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    members = [subprocess.Popen([sys.executable, "-c", MEMBER, str(store.port), str(rank), str(world),
                                 name, str(int(reduce_scatter)), str(tmp_path / f"{rank}.pt")])
               for rank in range(world)]
    assert [member.wait(timeout=120) for member in members] == [0] * world
    records = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]

    for record in records[1:]:  # one result, bit for bit, on every member
        assert torch.equal(record["sent100"], records[0]["sent100"])
    for record in records:
        assert 4 * (N + 3) / record["first_bytes"] >= factor

    first_true = true_sums(world, 1)
    assert float((records[0]["first"] - first_true).norm() / first_true.norm()) <= bound

    # Conservation: what was delivered plus what every member still owes is what was put in.
    owed = sum(record["residual"] for record in records)
    total = true_sums(world, 100)
    assert float((records[0]["sent100"] + owed - total).norm() / total.norm()) < 1e-5
    gap = {steps: float((records[0][f"sent{steps}"] - true_sums(world, steps)).norm()
                        / true_sums(world, steps).norm()) for steps in (10, 100)}
    assert gap[100] < gap[10] / 3
    assert gap[100] < 0.05
