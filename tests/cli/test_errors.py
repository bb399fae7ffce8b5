"""Bad input: exit code 2 and ONE line that names the flag to change."""

import re
import socket
import subprocess
import sys

import pytest

from shoal.cli.main import main
from shoal.coordinator.state_file import StateFile
from tests.conftest import shoal

BAD_TRAIN_FLAGS = [
    (["--task", "mnist"], "--task"),
    (["--strategy", "gossip"], "--strategy"),
    (["--workers", "0"], "--workers"),
    (["--workers", "4", "--batch-size", "2"], "--batch-size"),
    (["--output", "/nonexistent-dir/results.json"], "--output"),
    (["--output", "/proc/version"], "--output"),
    (["--save-model", "/nonexistent-dir/m.pt"], "--save-model"),
    (["--sample-log", "/"], "--sample-log"),
    (["--kill", "one@two"], "--kill"),
    (["--kill", "5@3", "--workers", "2"], "--kill"),
    (["--hang", "1-3"], "--hang"),
    (["--hang", "3@3", "--workers", "2"], "--hang"),
    (["--lose-answer", "1@3:commit"], "--lose-answer"),  # it has one phase: agreed
    (["--lose-answer", "1@3", "--strategy", "async"], "--lose-answer"),
    (["--kill", "1@3:agree"], "--kill"),
    (["--kill", "1@3:agreed", "--strategy", "async"], "--kill"),
    (["--min-workers", "3", "--workers", "2"], "--min-workers"),
    (["--epochs", "1", "--steps", "3"], "--steps"),
    (["--workers", "two"], "--workers"),
    (["--lr", "-1"], "--lr"),
    (["--lr-schedule", "linear"], "--lr-schedule"),
    (["--lr-warmup", "-1"], "--lr-warmup"),
    (["--steps", "10", "--lr-warmup", "10"], "--lr-warmup"),
    (["--epochs", "1", "--lr-warmup", "1000"], "--lr-warmup"),  # digits: 23 steps an epoch
    (["--compress", "zip"], "--compress"),
    (["--powersgd-rank", "0"], "--powersgd-rank"),
    (["--sync-every", "0"], "--sync-every"),
    (["--outer-lr", "0"], "--outer-lr"),
    (["--outer-momentum", "1"], "--outer-momentum"),
    (["--workers-per-host", "0"], "--workers-per-host"),
    (["--slowdown", "1x3"], "--slowdown"),
    (["--slowdown", "1=0.5"], "--slowdown"),
    (["--slowdown", "4=2", "--workers", "2"], "--slowdown"),
    (["--max-staleness", "-1"], "--max-staleness"),
    (["--strategy", "async", "--compress", "int8"], "--compress"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--strategy", "async", "--warmup-steps", "5"], "--warmup-steps"),
    (["--variance-refresh", "-1"], "--variance-refresh"),
    (["--compress", "int8", "--warmup-steps", "5", "--variance-refresh", "5"], "--variance-refresh"),
    (["--compress", "onebit", "--variance-refresh", "5"], "--variance-refresh"),  # no warm-up
    (["--strategy", "diloco", "--compress", "onebit", "--warmup-steps", "5", "--variance-refresh", "5"],
     "--variance-refresh"),
    (["--checkpoint-dir", "/proc/version"], "--checkpoint-dir"),
    (["--checkpoint-dir", "/tmp", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["--checkpoint-dir", "/tmp", "--checkpoint-keep", "0"], "--checkpoint-keep"),
    (["--checkpoint-dir", "/tmp", "--strategy", "async"], "--checkpoint-dir"),
    (["--resume", "/nonexistent-dir"], "--resume"),
    (["--lr", "inf"], "--lr"),
    (["--strategy", "diloco", "--outer-lr", "inf"], "--outer-lr"),
    (["--seed", "99999999999999999999"], "--seed"),  # overflowed the sampler's 64-bit seed
    (["--slowdown", "1=inf"], "--slowdown"),
    (["--heartbeat-timeout", "inf"], "--heartbeat-timeout"),
    (["--host", "8.8.8.8"], "--host"),  # not this machine's: binding it hung
    (["--host", "no-such-host.invalid"], "--host"),
    (["--output", "same.out", "--save-model", "same.out"], "--save-model"),
    (["--output", ""], "--output"),
    (["--batch-size", "100000"], "--batch-size"),  # digits has 1,437 training samples
    # options the chosen strategy never reads, and flags that need another one
    (["--sync-every", "10"], "--sync-every"),
    (["--strategy", "localsgd", "--outer-lr", "0.5"], "--outer-lr"),
    (["--max-staleness", "3"], "--max-staleness"),
    (["--zero-replicas", "1"], "--zero-replicas"),
    (["--workers-per-host", "2"], "--workers-per-host"),
    (["--compress", "int8", "--powersgd-rank", "8"], "--powersgd-rank"),
    (["--token", "t"], "--token"),
    (["--max-restarts", "5"], "--max-restarts"),
    (["--checkpoint-every", "5"], "--checkpoint-every"),
    (["--steps", "3", "--kill", "1@3"], "--kill"),  # steps 0-2: it would never fire
    # the standalone coordinator owns membership: flags for an embedded one are refused
    (["--coordinator", "127.0.0.1:1", "--token", "t", "--min-workers", "2"], "--min-workers"),
    (["--coordinator", "127.0.0.1:1", "--token", "t", "--heartbeat-timeout", "9"], "--heartbeat-timeout"),
    (["--coordinator", "127.0.0.1:1", "--token", "t", "--max-workers", "3"], "--max-workers"),
    (["--coordinator", "127.0.0.1:1", "--token", "t", "--host", "0.0.0.0"], "--host"),
]

BAD_BENCH_FLAGS = [
    (["wan", "--task", "mnist"], "--task"),
    (["wan", "--hosts", "1"], "--hosts"),
    (["wan", "--mbit", "0"], "--mbit"),
    (["wan", "--only", "gossip"], "--only"),
    (["wan", "--plot", "/nonexistent-dir/p.png"], "--plot"),
    (["straggler", "--workers", "1"], "--workers"),
    (["straggler", "--factor", "0.5"], "--factor"),
    (["straggler", "--task", "mnist"], "--task"),
    (["straggler", "--factor", "inf"], "--factor"),
    (["straggler", "--target-loss", "nan"], "--target-loss"),
    (["wan", "--target-loss", "nan"], "--target-loss"),
    (["straggler", "--markdown", "/nonexistent-dir/s.md"], "--markdown"),
    (["checkpoint", "--every", "0"], "--every"),
    (["checkpoint", "--steps", "10", "--every", "20"], "--every"),
    (["checkpoint", "--json", "/nonexistent-dir/c.json"], "--json"),
    (["overhead", "--task", "mnist"], "--task"),
    (["overhead", "--steps", "10", "--warmup", "9"], "--steps"),
    (["overhead", "--pairs", "0"], "--pairs"),
    (["recovery", "--workers", "1"], "--workers"),
    (["recovery", "--steps", "100", "--kill-step", "100"], "--kill-step"),
    (["recovery", "--plot", "/nonexistent-dir/r.png"], "--plot"),
    (["scaling", "--workers", "0"], "--workers"),
    (["scaling", "--task", "mnist"], "--task"),
]


BAD_COORDINATOR_FLAGS = [
    (["--linger", "-5"], "--linger"),  # crashed when the job ended
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
    (["--host", "8.8.8.8"], "--host"),
    (["--token", ""], "--token"),
]


def run_main(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args,flag", BAD_TRAIN_FLAGS)
def test_bad_train_flags_exit_2_with_one_line(capsys, args, flag):
    code, out, err = run_main(capsys, "train", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert flag in lines[0]
    assert out == ""


@pytest.mark.parametrize("args,flag", BAD_BENCH_FLAGS)
def test_bad_bench_flags_exit_2_with_one_line(capsys, args, flag):
    code, out, err = run_main(capsys, "bench", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], err


@pytest.mark.parametrize("args,flag", BAD_COORDINATOR_FLAGS)
def test_bad_coordinator_flags_exit_2_with_one_line(capsys, args, flag):
    code, _, err = run_main(capsys, "coordinator", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err


def test_a_coordinator_state_file_it_cannot_use_exits_2_with_one_line(capsys, tmp_path):
    """Before it listens: a file it could not write, one that is not a state, or the state of
    a job with another token (which would hand that job's record to whoever has this one)."""
    state = tmp_path / "state.json"
    cases = [(["--state", str(tmp_path / "missing" / "state.json")], "--state: cannot write")]
    state.write_text('{"format": 2, "token_sha256": "0"}\n{"state": {}}\n')
    cases += [(["--state", str(state), "--token", "mine"], "--token: "),
              (["--state", str(state)], "--token: ")]  # a random token is another token
    (tmp_path / "garbage.json").write_text("{\n{}\n")
    (tmp_path / "other.json").write_text('{"results": []}\n')
    cases += [(["--state", str(tmp_path / "garbage.json")], "--state: "),
              (["--state", str(tmp_path / "other.json")], "is not a shoal coordinator's state")]
    held = StateFile(str(tmp_path / "held.jsonl"), "t")
    held.load()  # as a running coordinator of that file does
    cases.append((["--state", str(tmp_path / "held.jsonl"), "--token", "t"], "in use by another coordinator"))
    for args, line in cases:
        code, out, err = run_main(capsys, "coordinator", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and line in err and out == "", err
    held.close()


BAD_CHAOS_FLAGS = [
    (["--compress", "bogus"], "--compress"),
    (["--compress", "int8", "--strategy", "zero"], "--compress"),  # as shoal train refuses it
    (["--compress", "int8", "--task", "digits"], "--task"),  # checked by a distance to the optimum
    (["--strategy", "async", "--task", "digits"], "--task"),
    (["--launcher", "run", "--strategy", "async", "--task", "digits"], "--task"),  # checked by the optimum
    (["--launcher", "run", "--compress", "int8", "--task", "charlm"], "--task"),
    (["--launcher", "nodes"], "--launcher"),
    (["--launcher", "run", "--steps", "100"], "--steps"),  # a node started again needs steps left
    (["--link-mbit", "10"], "--link-mbit"),  # shoal train's trials run on one launcher, no hosts
    (["--launcher", "run", "--link-mbit", "0"], "--link-mbit"),
    (["--launcher", "run", "--ballast-mb", "1", "--task", "digits"], "--ballast-mb"),  # not a sum of squares
    (["--launcher", "run", "--ballast-mb", "-1"], "--ballast-mb"),
]


@pytest.mark.parametrize("args,flag", BAD_CHAOS_FLAGS)
def test_bad_chaos_flags_exit_2_with_one_line(capsys, args, flag):
    code, out, err = run_main(capsys, "chaos", "--trials", "1", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert out == ""


@pytest.mark.parametrize("args,prog", [
    (["train", "--bogus", "1"], "shoal train:"),
    (["bench", "wan", "--bogus"], "shoal bench wan:"),
    (["chaos", "--bogus"], "shoal chaos:"),
    (["coordinator", "--bogus"], "shoal coordinator:"),
    (["export", "checkpoints", "--out", "m.safetensors", "--bogus"], "shoal export:"),
])
def test_an_unknown_flag_is_named_by_the_command_it_was_given_to(capsys, args, prog):
    code, out, err = run_main(capsys, *args)
    assert code == 2
    assert err.startswith(f"{prog} error: unrecognized arguments: --bogus"), err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_a_coordinator_port_in_use_exits_2_with_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_main(capsys, "coordinator", "--port", str(taken.getsockname()[1]))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--port: cannot listen" in err, err


def test_a_checkpoint_with_broken_metadata_is_one_line_for_resume_and_export(capsys, tmp_path):
    checkpoint = tmp_path / "step-000000004"
    checkpoint.mkdir()
    for meta in ["garbage", "[1]", "{}"]:  # were: a traceback, an AttributeError, 'task None'
        (checkpoint / "meta.json").write_text(meta)
        code, _, err = run_main(capsys, "train", "--resume", str(checkpoint))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err, err
        code, _, err = run_main(capsys, "export", str(tmp_path), "--out", str(tmp_path / "m.safetensors"))
        *warnings, last = err.strip().splitlines()  # the skipped checkpoint is named, then why none
        assert code == 2 and last.startswith("shoal export: error: DIR: ") and len(warnings) <= 1, err
    # an export into the checkpoint it reads would destroy it
    code, _, err = run_main(capsys, "export", str(checkpoint), "--out", str(checkpoint / "meta.json"))
    assert code == 2 and "--out" in err and (checkpoint / "meta.json").read_text() == "{}"


def test_resuming_from_a_directory_without_checkpoints_exits_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == [
        f"shoal train: error: --resume: no usable checkpoint in {str(tmp_path)!r}"]
    (tmp_path / "step-000000010").mkdir()
    code, _, err = run_main(capsys, "train", "--checkpoint-dir", str(tmp_path))
    assert code == 2 and "holds another job's checkpoints" in err and "--resume" in err
    code, _, err = run_main(capsys, "export", str(tmp_path), "--out", "/nonexistent-dir/m.safetensors")
    assert code == 2 and "--out" in err


def test_bad_run_flags_exit_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "run", "--nproc-per-node", "0", "examples/plain_ddp.py")
    assert code == 2 and "--nproc-per-node" in err
    code, _, err = run_main(capsys, "run", str(tmp_path / "missing.py"))
    assert code == 2 and "missing.py" in err
    code, _, err = run_main(capsys, "run", "--no-python", "shoal-no-such-program")
    assert code == 2 and "not a file or a program on PATH" in err
    here = ["--master-addr", "127.0.0.1"]
    joining = ["--coordinator", "127.0.0.1:1", "--token", "t"]
    for flags, named in [([*here, "--nnodes", "2", "--node-rank", "2"], "--node-rank"),
                         (["--nnodes", "1:4"], "--nnodes"),  # torchrun's elastic range
                         (["--nnodes", "2", "--standalone"], "--standalone"),
                         ([*here, "--nnodes", "2", "--master-port", "0"], "--master-port"),
                         (["--nnodes", "2"], "--master-addr"),  # 127.0.0.1 would split the job
                         (["--nproc-per-node", "many"], "--nproc-per-node"),
                         (["--nproc_per_node", "2", "--min-workers", "3"], "--min-workers"),
                         (["--master-addr", "192.0.2.1"], "--master-addr"),  # not this machine's
                         (["--rdzv-endpoint", "127.0.0.1:x"], "--rdzv-endpoint"),
                         (["--rdzv-endpoint", "127.0.0.1", "--master-port", "5"], "--rdzv-endpoint"),
                         (["--rdzv-backend", "etcd"], "--rdzv-backend"),
                         (["--max-restarts", "-1"], "--max-restarts"),
                         (["--token", "t"], "--token"),
                         (["--coordinator", "127.0.0.1:1"], "--token"),
                         (["--coordinator", "127.0.0.1", "--token", "t"], "--coordinator"),
                         (["-m"], "-m"),  # a file name is no module name
                         (["-m", "--no-python"], "--no-python"),
                         (["--no-python"], "--no-python"),  # not executable
                         *[([*joining, *flags], named) for flags, named in [
                             (["--nnodes", "2"], "--nnodes"), (["--node-rank", "0"], "--node-rank"),
                             (["--master-port", "29500"], "--master-port"),
                             (["--rdzv-endpoint", "h:1"], "--rdzv-endpoint"),
                             (["--rdzv-backend", "c10d"], "--rdzv-backend"),
                             (["--rdzv-id", "x"], "--rdzv-id"), (["--join-timeout", "9"], "--join-timeout"),
                             (["--min-workers", "2"], "--min-workers"),
                             (["--heartbeat-timeout", "9"], "--heartbeat-timeout"),
                             (["--max-restarts", "-1"], "--max-restarts")]]]:
        code, _, err = run_main(capsys, "run", *flags, "examples/plain_ddp.py")
        assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, (flags, err)


def test_a_run_master_port_in_use_exits_2_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = shoal("run", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                       "--master-port", str(taken.getsockname()[1]), "examples/plain_ddp.py", timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shoal run: error: --master-port: cannot listen on 127.0.0.1:"), line


def test_the_real_command_exits_2_with_one_line():
    result = shoal("train", "--task", "mnist", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "shoal train: error: --task: unknown task 'mnist' (choose from quadratic, quadratic-sgd, ackley, digits, charlm)"
    ]


@pytest.mark.parametrize("standalone", [False, True], ids=["embedded", "standalone-coordinator"])
def test_an_option_only_the_workers_can_refuse_exits_2_with_one_line(standalone):
    """digits trains with SGD, which 1-bit Adam's --variance-refresh cannot refresh: the
    workers find out (the optimizer exists only there) and the launcher says it once, with
    its own coordinator or joining a standalone one."""
    joining, coordinator = [], None
    if standalone:
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli.main", "coordinator", "--port", "0", "--token", "t0k",
             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        address = re.search(r"listening on http://(\S+)", coordinator.stdout.readline()).group(1)
        joining = ["--coordinator", address, "--token", "t0k"]
    try:
        result = shoal("train", "--task", "digits", "--workers", "2", "--steps", "4", "--compress", "onebit",
                       "--warmup-steps", "2", "--variance-refresh", "2", *joining, timeout=120)
        # the standalone coordinator ends the job itself (after --linger) and calls it bad input too
        coordinator_exit = coordinator and (coordinator.wait(timeout=60), coordinator.communicate()[1])
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.kill()
            coordinator.communicate(timeout=30)
    reason = ("--variance-refresh: refreshes 1-bit Adam's variance: it needs an Adam or AdamW "
              "optimizer, not SGD")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "[worker" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"shoal train: error: {reason}"
    if standalone:
        returncode, stderr = coordinator_exit
        lines = stderr.strip().splitlines()  # its log of generations, then the one error line
        assert (returncode, lines[-1]) == (2, f"shoal coordinator: error: {reason}")
        assert all("error" not in line and "Traceback" not in line for line in lines[:-1]), stderr
