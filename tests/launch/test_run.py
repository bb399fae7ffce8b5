"""`shoal run`: unmodified torchrun scripts, elastic scripts, and failures that name the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import REPO, shoal


def test_plain_ddp_example_completes():
    """(e) the torchrun-style gloo script runs unchanged."""
    result = shoal("run", "--nproc-per-node", "2", str(REPO / "examples" / "plain_ddp.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[worker 0] epoch 1: loss" in result.stdout


def test_torchrun_environment_is_complete(tmp_path):
    script = tmp_path / "env.py"
    script.write_text(
        "import os\n"
        "names = 'RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR "
        "MASTER_PORT TORCHELASTIC_RUN_ID'.split()\n"
        "print(' '.join(f'{n}={os.environ[n]}' for n in names))\n"
    )
    result = shoal("run", "--nproc-per-node", "3", str(script))
    assert result.returncode == 0, result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if "RANK=" in line)
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert line.startswith(f"[worker {rank}] RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=3 ")


def test_a_module_runs_as_python_m_runs_it(tmp_path):
    """`shoal run -m pkg.train ARGS`, as torchrun's -m: the module is found from the current
    directory, runs as __main__ with its arguments, and imports its package's modules."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("WHERE = 'from pkg.helper'\n")
    (package / "train.py").write_text(
        "import os, sys\n"
        "from pkg.helper import WHERE\n"
        "if __name__ == '__main__':\n"
        "    print(f\"RANK={os.environ['RANK']} {WHERE} {sys.argv[1:]} {os.path.basename(sys.argv[0])}\")\n")
    result = shoal("run", "--nproc-per-node", "2", "-m", "pkg.train", "--lr", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if "RANK=" in line)
    assert lines == [f"[worker {rank}] RANK={rank} from pkg.helper ['--lr', '3'] train.py" for rank in (0, 1)]


def test_a_program_runs_as_it_is_with_no_python_and_goes_with_its_launcher(tmp_path):
    """`shoal run --no-python PROGRAM ARGS`, as torchrun's: a shell script gets torchrun's
    environment and its arguments. Run in place of shoal's runner, it still dies with a
    launcher that is SIGKILLed (the kernel's death signal outlives exec)."""
    program = tmp_path / "train.sh"
    program.write_text('#!/bin/sh\necho "RANK=$RANK WORLD_SIZE=$WORLD_SIZE args=$*"\n'
                       '[ -n "$HOLD" ] && echo $$ > "$HOLD.$RANK" && exec sleep 120\nexit 0\n')
    program.chmod(0o755)
    result = shoal("run", "--nproc-per-node", "2", "--no-python", "./train.sh", "a", "b", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if "RANK=" in line)
    assert lines == [f"[worker {rank}] RANK={rank} WORLD_SIZE=2 args=a b" for rank in (0, 1)]
    hold = tmp_path / "pid"
    launcher = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "run", "--nproc-per-node", "2",
                                 "--no-python", str(program)], env={**os.environ, "HOLD": str(hold)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = [int(wait_for_file(Path(f"{hold}.{rank}")).read_text()) for rank in (0, 1)]
    finally:
        launcher.kill()
        launcher.wait()
    programs = []
    for pid in pids:
        try:
            programs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:  # gone already
            continue
    assert psutil.wait_procs(programs, timeout=10)[1] == []


def wait_for_file(path: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.05)
    return path


def plain_script_where_rank_1_gives_up(path):
    """Rank 1 exits 1 at once; every other rank would sleep for two minutes."""
    path.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit('rank 1 gives up')\n"
        "time.sleep(120)\n"
    )
    return path


def test_a_failing_plain_script_fails_the_command_and_names_the_worker(tmp_path):
    script = plain_script_where_rank_1_gives_up(tmp_path / "fail.py")
    result = shoal("run", "--nproc-per-node", "2", str(script), timeout=60)
    assert result.returncode == 1
    assert "[worker 1] rank 1 gives up" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "shoal run: failed: worker 1 (rank 1) exited with code 1")


def plain_script_resuming_from_its_checkpoint(path: Path) -> Path:
    """A torchrun DDP script as elastic torchrun scripts are written: it saves a checkpoint
    after every step and resumes from it when started again. Arguments: the checkpoint, and
    the step at which rank 1 exits 1 (10: after the last) in attempt 0, or in every attempt
    with a third argument. Rank 0 prints which attempt ended it, from which step, and the
    weights' sum."""
    path.write_text("""\
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
state, fail_at, always = Path(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3


def maybe_fail(step):
    if rank == 1 and step == fail_at and (always or attempt == 0):
        while step == 10 and not state.with_suffix(".ended").exists():
            time.sleep(0.05)  # after the last step: once rank 0 has ended well
        time.sleep(1 if step == 10 else 0)
        print(f"rank 1 fails at step {step}", flush=True)
        os._exit(1)


torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
start = 0
if state.exists():
    saved = torch.load(state)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    start = saved["step"]
for step in range(start, 10):
    maybe_fail(step)
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(step * world + rank))
    loss = ddp(inputs).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0:
        partial = state.with_suffix(".partial")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1},
                   partial)
        os.replace(partial, state)
    dist.barrier()  # step + 1's checkpoint is on disk before either goes on
dist.destroy_process_group()
if rank == 0:
    print(f"attempt {attempt} of {os.environ['TORCHELASTIC_MAX_RESTARTS']} from step {start}: "
          f"{model.weight.sum().item():.8f}", flush=True)
    state.with_suffix(".ended").touch()
maybe_fail(10)
""")
    return path


def _undisturbed_weight_sum() -> float:
    """The script's 10 steps on 2 ranks, in this process: DDP's gradient is the mean of the
    ranks' (equal batches), which is the gradient of the mean of their losses."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(10):
        losses = [model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step * 2 + rank))).pow(2).mean()
                  for rank in (0, 1)]
        optimizer.zero_grad()
        (sum(losses) / 2).backward()
        optimizer.step()
    return model.weight.sum().item()


def attempts_ended(stdout: str) -> list[str]:
    """What rank 0 of :func:`plain_script_resuming_from_its_checkpoint` printed as each attempt ended."""
    return [line.split("] ", 1)[1] for line in stdout.splitlines() if "] attempt " in line]


def test_with_max_restarts_a_failed_plain_script_starts_again_as_under_torchrun(tmp_path):
    """Rank 1 fails at step 4: every worker stops and starts again with the next
    TORCHELASTIC_RESTART_COUNT, and the script resumes from its checkpoint to the weights an
    undisturbed run ends with. (Before, --max-restarts needed --coordinator.) The restart
    meets at a store of its own: in the first attempt's, its ranks waited on the dead ones'
    addresses."""
    script = str(plain_script_resuming_from_its_checkpoint(tmp_path / "resuming.py"))
    restarted = shoal("run", "--nproc-per-node", "2", "--max-restarts", "2", script, str(tmp_path / "b.pt"), "4",
                      timeout=120)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    [ended] = attempts_ended(restarted.stdout)
    assert ended.startswith("attempt 1 of 2 from step 4: ")
    assert abs(float(ended.rsplit(" ", 1)[1]) - _undisturbed_weight_sum()) < 1e-6
    assert restarted.stderr.strip().splitlines() == [
        "shoal run: worker 1 (rank 1) exited with code 1; starting every worker again (restart 1 of 2)"]


def test_a_plain_script_that_fails_again_after_its_last_restart_fails_the_command(tmp_path):
    script = str(plain_script_resuming_from_its_checkpoint(tmp_path / "resuming.py"))
    result = shoal("run", "--nproc-per-node", "2", "--max-restarts", "1", script, str(tmp_path / "a.pt"), "4",
                   "always", timeout=120)
    assert result.returncode == 1
    assert result.stdout.count("rank 1 fails at step 4") == 2
    assert result.stderr.strip().splitlines() == [
        "shoal run: worker 1 (rank 1) exited with code 1; starting every worker again (restart 1 of 1)",
        "shoal run: failed: worker 1 (rank 1) exited with code 1 (after 1 restart)"]


def elastic_with_step_hook(path, hook: str):
    """examples/elastic.py whose every step first runs ``hook`` (lines of source, with ``os``,
    ``signal`` and ``time`` imported and ``self`` the trainer's loop): a script file at ``path``."""
    body = "".join(f"    {line}\n" for line in hook.splitlines())
    path.write_text(
        "import os, signal, runpy, time\n"
        "import shoal.runtime.trainer as trainer\n"
        "step = trainer._Loop._step\n"
        "def hooked_step(self, *args):\n"
        f"{body}"
        "    step(self, *args)\n"
        "trainer._Loop._step = hooked_step\n"
        f"runpy.run_path({str(REPO / 'examples' / 'elastic.py')!r}, run_name='__main__')\n"
    )
    return path


def elastic_script_losing_rank_1(path):
    """examples/elastic.py whose rank 1 is SIGKILLed at step 10: a script file at ``path``."""
    return elastic_with_step_hook(path, "if os.environ['RANK'] == '1' and self.position == 10:\n"
                                        "    os.kill(os.getpid(), signal.SIGKILL)")


def elastic_script_losing_rank_1_once(path, rejoin_after: float = 0.0):
    """examples/elastic.py whose rank 1 is SIGKILLed at step 10, once (the first to get
    there; a marker beside ``path`` says it was); started again, it waits ``rejoin_after``
    seconds before it starts."""
    marker = str(path.with_suffix(".killed"))
    elastic_with_step_hook(path, (
        f"if os.environ['RANK'] == '1' and self.position == 10 and not os.path.exists({marker!r}):\n"
        f"    open({marker!r}, 'w').close()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)"))
    path.write_text(f"import os, time\nif os.path.exists({marker!r}):\n    time.sleep({rejoin_after})\n"
                    + path.read_text())
    return path


def test_elastic_example_survives_a_killed_worker(tmp_path):
    script = elastic_script_losing_rank_1(tmp_path / "elastic_kill.py")
    result = shoal("run", "--nproc-per-node", "2", str(script), env={**os.environ, "EPOCHS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "29 steps on 1 worker(s)" in result.stdout
    assert "survived: worker 1 (rank 1) killed by SIGKILL" in result.stderr


def test_with_max_restarts_an_elastic_scripts_failed_worker_alone_starts_again_and_rejoins(tmp_path):
    """Rank 1 of a shoal.train script is SIGKILLed at step 10, once. The job cannot go on
    without it (--min-workers 2): with --max-restarts its launcher starts it again, alone, it
    rejoins under its rank with rank 0's state, and both finish the epoch. (Before,
    --max-restarts needed --coordinator, and the job failed below --min-workers.)"""
    script = elastic_script_losing_rank_1_once(tmp_path / "elastic_kill_once.py")
    result = shoal("run", "--nproc-per-node", "2", "--min-workers", "2", "--max-restarts", "1", str(script),
                   env={**os.environ, "EPOCHS": "1"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "shoal run: starting worker 1 (rank 1) again (restart 1 of 1): it rejoins the job",
        "shoal run: survived: worker 1 (rank 1) killed by SIGKILL"]
    assert "29 steps on 2 worker(s)" in result.stdout


def test_with_max_restarts_an_elastic_worker_lost_before_joining_comes_back_and_is_waited_for(tmp_path):
    """Rank 1 of a shoal.train script exits at once, the first time. Whether its launcher
    took it for a plain script's (no worker had joined: every worker starts again) or an
    elastic one's (it alone starts again), the job then forms with both and ends on both.
    (Before, the coordinator was told of the loss and, after the restart, waited for one
    worker fewer: the job ran on one.)"""
    marker = tmp_path / "exited"
    script = tmp_path / "exits_before_joining.py"
    script.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1' and not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    sys.exit('rank 1 exits before joining')\n"
        f"runpy.run_path({str(REPO / 'examples' / 'elastic.py')!r}, run_name='__main__')\n")
    result = shoal("run", "--nproc-per-node", "2", "--max-restarts", "1", str(script),
                   env={**os.environ, "EPOCHS": "1"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "29 steps on 2 worker(s)" in result.stdout
    assert ("starting every worker again (restart 1 of 1)" in result.stderr
            or "starting worker 1 (rank 1) again (restart 1 of 1)" in result.stderr), result.stderr


def test_a_frozen_worker_is_stopped_while_the_job_goes_on(tmp_path):
    """Rank 1 freezes (SIGSTOP) at step 10. Once the coordinator declared it dead, its
    launcher stops it while the job runs: rank 0 waits at step 20 until the frozen process
    is gone, then finishes. (It used to stay frozen until the job ended, holding its memory,
    its device and its core: rank 0 gave up waiting and the job failed.)"""
    pid_file = tmp_path / "rank1.pid"
    script = elastic_with_step_hook(tmp_path / "elastic_freeze.py", (
        "if os.environ['RANK'] == '1' and self.position == 10:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "if os.environ['RANK'] == '0' and self.position == 20:\n"
        f"    pid, deadline = int(open({str(pid_file)!r}).read()), time.monotonic() + 30\n"
        "    while time.monotonic() < deadline:\n"
        "        try:\n"
        "            os.kill(pid, 0)\n"
        "        except ProcessLookupError:\n"
        "            print('the frozen rank 1 is gone', flush=True)\n"
        "            break\n"
        "        time.sleep(0.05)\n"
        "    else:\n"
        "        raise SystemExit('rank 1 is still frozen')"))
    result = shoal("run", "--nproc-per-node", "2", "--heartbeat-timeout", "2", str(script),
                   env={**os.environ, "EPOCHS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[worker 0] the frozen rank 1 is gone" in result.stdout
    assert "29 steps on 1 worker(s)" in result.stdout
    assert ("survived: worker 1 (rank 1) evicted by the coordinator (hung or cut off), "
            "then stopped here") in result.stderr


def test_a_script_leaves_as_python_would_its_open_files_flushed(tmp_path):
    """Scripts exit without the interpreter's teardown (torch 2.13's gloo aborts it now and
    then): exit handlers still run and a file left open still gets what was written to it."""
    script, written = tmp_path / "leave.py", tmp_path / "written.txt"
    script.write_text(
        "import atexit, sys\n"
        f"handle = open({str(written)!r}, 'w')\n"
        "handle.write('buffered')\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "sys.exit(3)\n"
    )
    result = shoal("run", "--nproc-per-node", "1", str(script))
    assert result.returncode == 1 and "exited with code 3" in result.stderr, result.stderr
    assert "[worker 0] exit handler ran" in result.stdout
    assert written.read_text() == "buffered"


def test_arguments_shoal_train_refuses_in_every_worker_exit_2_with_one_line(tmp_path):
    """1-bit Adam cannot run AMSGrad; the script's workers refuse it, and the command says so once."""
    script = tmp_path / "amsgrad.py"
    script.write_text(
        "import torch\n"
        "import shoal\n"
        "model = torch.nn.Linear(4, 1)\n"
        "optimizer = torch.optim.Adam(model.parameters(), amsgrad=True)\n"
        "data = torch.utils.data.TensorDataset(torch.randn(64, 4))\n"
        "shoal.train(model, optimizer, data, lambda m, b: m(b[0]).sum(), global_batch_size=16, steps=4,\n"
        "            options=shoal.StrategyOptions(compress='onebit', warmup_steps=2))\n"
    )
    result = shoal("run", "--nproc-per-node", "2", str(script), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        ("shoal run: error: --compress: onebit with Adam (1-bit Adam) does not support the "
         "optimizer's amsgrad=True")]
