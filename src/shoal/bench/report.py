"""Benchmark output: Markdown tables and PNG plots (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path

from shoal.bench._runs import loss_text

__all__ = ["checkpoint_markdown", "memory_markdown", "overhead_markdown", "plot_curves", "plot_overhead",
           "plot_recovery", "plot_scaling", "recovery_markdown", "scaling_markdown", "straggler_markdown",
           "wan_markdown"]


def _kilobytes(value: float) -> str:
    return f"{value / 1e3:,.1f}"


def _reference(runs):
    """The allreduce run, which the others are compared with (None if it failed)."""
    return next((r for r in runs if r.label == "allreduce" and r.error is None), None)


def _to_target(run) -> str:
    return "not reached" if run.seconds_to_target is None else f"{run.seconds_to_target:.1f}"


def _sooner(reference, run, digits: int) -> str:
    if reference and reference.seconds_to_target and run.seconds_to_target:
        return f"{reference.seconds_to_target / run.seconds_to_target:.{digits}f}x"
    return "-"


def _eval_loss(run) -> float | None:
    return run.eval.get("eval_loss", run.eval.get("loss"))


def wan_markdown(settings, runs, *, command: str, when: str, plot: str | None) -> str:
    reference = _reference(runs)
    rows = []
    for run in runs:
        if run.error:
            rows.append(f"| {run.label} | failed: {run.error} |||||||||")
            continue
        fewer = (f"{reference.payload_bytes_per_step / run.payload_bytes_per_step:.1f}x"
                 if reference and run.payload_bytes_per_step else "-")
        rows.append(
            f"| {run.label} | {_kilobytes(run.payload_bytes_per_step)} | {fewer} | "
            f"{_kilobytes(run.wire_bytes_per_step)} | {run.steps} | {run.train_seconds:.1f} | "
            f"{loss_text(run.final_train_loss)} | {loss_text(_eval_loss(run))} | {_to_target(run)} | "
            f"{_sooner(reference, run, 1)} |")
    figure = f"\n![loss against wall time]({plot})\n" if plot else ""
    return f"""## Slow network: strategies side by side

{settings.task}, {settings.hosts} hosts (network namespaces) with one worker each, every link
limited to {settings.mbit:g} Mbit/s each way with `tbf`; {settings.steps} steps, seed
{settings.seed}; target: smoothed training loss (mean of 10 steps) <= {settings.target_loss:g}.
{when}. Regenerate with:

    {command}

Payload is what each worker handed to collectives per step (counted by shoal); wire is what
each worker host's interface sent per step (the kernel's counter: every protocol, headers
and heartbeats included). A ring all-reduce sends about 2(N-1)/N times its payload, and
so do int8 and 1-bit Adam (a compressed reduce-scatter, then an all-gather of the encoded
sums); onebit on gradients all-gathers, N-1 times its payload; PowerSGD's all-reduces are
so small that headers and heartbeats are a large part of its wire. 1-bit Adam's payload is
the mean over the run: its warm-up steps send fp32 gradients, the others onebit's payload.
Eval loss is the task's held-out loss at the end.

| run | payload kB/step | fewer than fp32 | wire kB/step | steps | train s | final train loss | eval loss | s to target | sooner than allreduce |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
{_bound_text(settings, runs)}{figure}"""


def _bound_text(settings, runs) -> str:
    from shoal.bench.wan import communication_bound

    bound = communication_bound(settings, runs)
    if bound is None:
        return ""
    n = settings.hosts
    return f"""
Communication bound of allreduce: compute {bound['compute_seconds'] * 1e3:.1f} ms/step (the run with
unlimited links) + 2({n}-1)/{n} x payload / {settings.mbit:g} Mbit/s = {bound['transfer_seconds'] * 1e3:.1f} ms
gives a bound of **{bound['bound_seconds'] * 1e3:.1f} ms/step**; allreduce achieved
**{bound['achieved_seconds'] * 1e3:.1f} ms/step**, **{bound['ratio']:.2f}x** the bound (step times
after the first 10 steps).
"""


def straggler_markdown(settings, runs, *, command: str, when: str, plot: str | None) -> str:
    reference = _reference(runs)
    rows = []
    for run in runs:
        if run.error:
            rows.append(f"| {run.label} | failed: {run.error} ||||||")
            continue
        rows.append(f"| {run.label} | {run.steps} | {run.train_seconds:.1f} | {loss_text(run.final_train_loss)} | "
                    f"{loss_text(_eval_loss(run))} | {_to_target(run)} | {_sooner(reference, run, 2)} |")
    figure = f"\n![loss against wall time, one straggler]({plot})\n" if plot else ""
    return f"""## One slow worker: async against allreduce

{settings.task}, {settings.workers} local workers, worker 1 computing {settings.factor:g}x slower
(`--slowdown 1={settings.factor:g}`); {settings.steps} steps of the same global batch, seed
{settings.seed}; target: smoothed training loss (mean of 10 steps) <= {settings.target_loss:g}.
{when}. Regenerate with:

    {command}

| run | steps | train s | final train loss | eval loss | s to target | sooner than allreduce |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
{figure}"""


def checkpoint_markdown(settings, pairs, *, command: str, when: str, plot: str | None) -> str:
    from shoal.bench.checkpoint import summary

    rows = []
    for index, pair in enumerate(pairs, 1):
        if pair.error:
            rows.append(f"| {index} | failed: {pair.error} |||")
            continue
        rows.append(f"| {index} | {pair.plain_step_seconds * 1e3:.1f} | "
                    f"{pair.checkpointed_step_seconds * 1e3:.1f} | {pair.ratio:.3f} |")
    total = summary(pairs)
    overall = (f"Median step-time ratio **{total['median_step_time_ratio']:.3f}**; each checkpoint "
               f"{total['checkpoint_megabytes']:.1f} MB, written at a median "
               f"{total['write_megabytes_per_second']:.0f} MB/s by the writer thread; the training "
               f"thread waited a median {total['blocked_milliseconds']:.1f} ms per save "
               f"({total['saves']} saves)." if total else "No pair finished.")
    return f"""## Checkpoint cost

{settings.task} with {settings.strategy}, {settings.workers} local workers, {settings.steps} steps; a checkpoint every
{settings.every} steps (and at the end), written in the background, against no checkpoints;
{settings.pairs} pairs alternating plain and checkpointed. {when}. Regenerate with:

    {command}

| pair | ms/step plain | ms/step checkpointed | ratio |
| --- | --- | --- | --- |
{chr(10).join(rows)}

{overall}
"""


def memory_markdown(settings, rows, *, command: str, when: str, plot: str | None) -> str:
    lines = []
    for row in rows:
        if row.error:
            lines.append(f"| {row.workers} | {row.replicas} | failed: {row.error} ||||||")
            continue
        mb = {name: {k: v / 1e6 for k, v in getattr(row, name).items()} for name in ("allreduce", "zero")}
        lines.append(f"| {row.workers} | {row.replicas} | {sum(mb['allreduce'].values()):.2f} | "
                     f"{mb['zero']['parameters']:.2f} | "
                     f"{mb['zero']['gradients']:.2f} | {mb['zero']['optimizer']:.2f} | "
                     f"{sum(mb['zero'].values()):.2f} | {row.ratio:.3f} |")
    return f"""## Memory: zero's share of the state

{settings.task}, {settings.steps} steps, seed {settings.seed}; each worker's parameters,
gradients and optimizer state after the last step (results.json's `state_bytes`, the
leader's), with allreduce (everything on every worker) and zero (FSDP2 shards, each on
`--zero-replicas` members). {when}. Regenerate with:

    {command}

| workers | zero replicas | allreduce MB/worker | zero parameters MB | zero gradients MB | zero optimizer MB | zero MB/worker | zero / allreduce |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
"""


def plot_curves(runs, path: str | Path, *, title: str) -> bool:
    """Loss against wall time, one line per run. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        if run.curve:
            seconds, losses = zip(*run.curve)
            axes.plot(seconds, losses, label=run.label)
    axes.set_xlabel("wall time (s)")
    axes.set_ylabel("training loss (mean of 10 steps)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def overhead_markdown(settings, pairs, *, command: str, when: str, plot: str | None) -> str:
    from shoal.bench.overhead import summary

    rows, numbers = [], {}
    for pair in pairs:
        index = numbers[pair.task] = numbers.get(pair.task, 0) + 1
        if pair.error:
            rows.append(f"| {pair.task} | {index} | failed: {pair.error} |||")
            continue
        rows.append(f"| {pair.task} | {index} | {pair.torch_step_seconds * 1e3:.2f} | "
                    f"{pair.shoal_step_seconds * 1e3:.2f} | {pair.ratio:.3f} |")
    overall = "; ".join(f"{task}: median ratio **{row['median_ratio']:.3f}** ({row['torch_ms']:.2f} ms/step "
                        f"torch, {row['shoal_ms']:.2f} shoal)" for task, row in summary(pairs).items())
    figure = f"\n![step time, torch and shoal]({plot})\n" if plot else ""
    return f"""## Overhead against torchrun + DDP

The same model, data and global batch (each task's default) on {settings.workers} local workers,
trained by the plain DDP script `shoal.bench.torch_ddp` under `torchrun --standalone` and by
`shoal train --strategy allreduce`; {settings.steps} steps per run, the first {settings.warmup} not
timed; {settings.pairs} pairs per task, alternating torch and shoal. {when}. Regenerate with:

    {command}

| task | pair | torch ms/step | shoal ms/step | shoal/torch |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{overall or "No pair finished."}
{figure}"""


def recovery_markdown(settings, pairs, *, command: str, when: str, plot: str | None) -> str:
    from shoal.bench.recovery import summary

    rows = []
    for index, pair in enumerate(pairs, 1):
        if pair.error:
            rows.append(f"| {index} | failed: {pair.error} |||||||")
            continue
        for tool, run in (("torchrun", pair.torch), ("shoal", pair.shoal)):
            rows.append(f"| {index} | {tool} | {run.lost_in_run_seconds:.2f} | {run.undisturbed_seconds:.2f} | "
                        f"{run.disturbed_seconds:.2f} | {run.lost_seconds:.2f} | {run.steps_redone} | "
                        f"{run.model_difference:.1e} |")
    total = summary(pairs)
    if total:
        ratio = total["ratio_torch_to_shoal"]
        torch_lost, shoal_lost = (total[t]["median_lost_in_run_seconds"] for t in ("torch", "shoal"))
        overall = (f"Median time lost in the run: torchrun **{torch_lost:.2f} s** and "
                   f"{total['torch']['steps_redone']} steps redone, shoal **{shoal_lost:.2f} s** and "
                   f"{total['shoal']['steps_redone']} steps redone"
                   + (f" (torchrun/shoal **{ratio:.1f}x**)" if ratio else "") + ". Whole commands: torchrun "
                   f"{total['torch']['median_lost_seconds']:.2f} s, shoal {total['shoal']['median_lost_seconds']:.2f} s "
                   f"(median). shoal's own record, death to the next committed step: "
                   f"{total['shoal_recovery_seconds']:.2f} s (median).")
    else:
        overall = "No pair finished."
    figure = f"\n![time lost to one killed worker]({plot})\n" if plot else ""
    return f"""## Recovery: a killed worker, shoal against torchrun's restart

{settings.task}, {settings.workers} local workers, {settings.steps} steps; worker {settings.kill_rank}
SIGKILLed at the start of step {settings.kill_step}. torchrun: rank 0 checkpoints every
{settings.checkpoint_every} steps, `--max-restarts 1` restarts every worker, which resume from
the newest checkpoint (torchrun's other settings are its defaults). shoal: `--kill
{settings.kill_rank}@{settings.kill_step}`, no checkpoints. *Lost in the run*: from the death
to the end of the killed step, less one median step. *Whole*: the command with the kill
minus the same command without it, start to exit. {when}. Regenerate with:

    {command}

| pair | tool | lost in the run s | undisturbed s | with a kill s | lost, whole s | steps redone | model vs undisturbed |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{overall}
{figure}"""


def scaling_markdown(settings, rows, *, command: str, when: str, plot: str | None) -> str:
    from shoal.bench.scaling import device_label

    lines = []
    for row in rows:
        if row.error:
            lines.append(f"| {row.workers} | failed: {row.error} ||")
            continue
        efficiency = f"{row.efficiency:.2f}" if row.efficiency is not None else "-"
        lines.append(f"| {row.workers} | {row.samples_per_second:.1f} | {efficiency} |")
    figure = f"\n![samples per second against workers]({plot})\n" if plot else ""
    return f"""## Scaling on one machine

{settings.task}, its default global batch, {settings.steps} steps per run, the first
{settings.warmup} not timed; {device_label()}. Efficiency is the rate over N times the
1-worker rate. {when}. Regenerate with:

    {command}

| workers | samples/s | efficiency |
| --- | --- | --- |
{chr(10).join(lines)}
{figure}"""


def _bars(path, title: str, ylabel: str, bars: dict[str, float]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.bar(list(bars), list(bars.values()), color="#4c72b0")
    for index, value in enumerate(bars.values()):
        axes.annotate(f"{value:.2f}", (index, value), ha="center", va="bottom")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_overhead(pairs, path, *, title: str) -> bool:
    from shoal.bench.overhead import summary

    bars = {}
    for task, row in summary(pairs).items():
        bars[f"{task}\ntorch"], bars[f"{task}\nshoal"] = row["torch_ms"], row["shoal_ms"]
    return _bars(path, title or "median step time", "ms per step", bars)


def plot_recovery(pairs, path, *, title: str) -> bool:
    from shoal.bench.recovery import summary

    total = summary(pairs)
    bars = {tool: total[key]["median_lost_in_run_seconds"] for tool, key in
            (("torchrun restart", "torch"), ("shoal", "shoal"))} if total else {}
    return _bars(path, title or "time lost to one killed worker (in the run)", "seconds", bars)


def plot_scaling(rows, path, *, title: str) -> bool:
    bars = {f"{r.workers} worker(s)": r.samples_per_second for r in rows if r.error is None}
    return _bars(path, title or "throughput", "samples per second", bars)
