"""The chaos suite, short and seeded: every fault kind once, each checked against the promises."""

from shoal.reliability.chaos import KINDS, ChaosSettings, plan_trials, run_chaos, summarize


def test_the_plan_is_seeded_and_covers_every_kind():
    settings = ChaosSettings(trials=len(KINDS), seed=5, steps=120)
    plans = plan_trials(settings)
    assert [p.kind for p in plans] == list(KINDS)
    assert [p.faults for p in plans] == [p.faults for p in plan_trials(settings)]
    assert plans[0].faults != plan_trials(ChaosSettings(trials=1, seed=6, steps=120))[0].faults


def test_short_chaos_run_keeps_every_promise():
    settings = ChaosSettings(trials=4, seed=1, steps=150, workers=3)
    outcomes = run_chaos(settings, report=lambda line: None)
    summary = summarize(outcomes)
    assert summary["failures"] == []
    assert summary["passed"] == 4
    assert all(o.recovery_seconds for o in outcomes)  # every trial recorded its recovery
