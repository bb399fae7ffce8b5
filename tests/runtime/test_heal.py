"""Heal across real processes: a member one step behind and a newcomer get the leader's state."""

from __future__ import annotations

import sys
import subprocess
import textwrap

import torch.distributed as dist

WORKER = textwrap.dedent("""
    import sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from shoal.runtime.heal import FRESH, heal

    port, rank, my_step, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3,
                            timeout=timedelta(seconds=30))
    torch.manual_seed(rank)  # every member starts different
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    if my_step != FRESH:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()  # real optimizer state to ship
    state = {"position": my_step}

    def capture():
        return {"position": my_step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}

    def restore(blob):
        state["position"] = int(blob["position"])
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])

    report = heal(my_step, capture, restore)
    torch.save({"position": state["position"], "model": model.state_dict(),
                "optimizer": optimizer.state_dict()["state"], "received": report.received,
                "source": report.source_rank, "bytes": report.bytes}, out)
    dist.destroy_process_group()
    # Leave as shoal's workers do (shoal._exit): torch 2.13's gloo aborts the interpreter's
    # teardown now and then (SIGABRT after the work is done).
    sys.stdout.flush()
    import os
    os._exit(0)
""")


def test_members_behind_and_newcomers_take_the_most_advanced_state(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    steps = [7, 8, -1]  # rank 1 committed one step more; rank 2 is a newcomer
    processes = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(store.port), str(rank), str(step),
                          str(tmp_path / f"{rank}.pt")])
        for rank, step in enumerate(steps)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0, 0]
    import torch

    states = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(3)]
    assert [s["position"] for s in states] == [8, 8, 8]
    assert [s["received"] for s in states] == [True, False, True]
    assert {s["source"] for s in states} == {1} and states[0]["bytes"] > 0
    for state in (states[0], states[2]):
        for name, value in states[1]["model"].items():
            assert torch.equal(state["model"][name], value)
        assert torch.equal(state["optimizer"][0]["exp_avg"], states[1]["optimizer"][0]["exp_avg"])
