"""The CPU's thread count: num_threads as a setting (checked, the same logits at every count), and
the tuner that picks it by timing decode steps (cpu/thread_tuner.h), driven here by made-up step
times: an idle machine, one where another process takes a core (rare long stalls at the higher
count), the load going away again, and a machine whose fastest count is in the middle."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_tokens

import mixtral_ext
from mixtral_ext import _C
from mixtral_ext.synthetic import DEMO_CONFIG


def drive(tuner, steps: int, seconds_at) -> list[int]:
    """Runs `steps` decode steps whose time seconds_at(threads, step) gives; returns the count each ran."""
    ran = []
    for step in range(steps):
        ran.append(tuner.threads)
        tuner.record(seconds_at(tuner.threads, step))
    return ran


def idle(threads: int, step: int) -> float:  # two threads 1.5 ms, one 2.2 ms, a little noise
    return (1.5e-3 if threads == 2 else 2.2e-3) * (1 + 0.05 * np.sin(step))


def busy(threads: int, step: int) -> float:  # beside a busy process: two threads stall for 120 ms in 1 step of 25
    if threads == 1:
        return 2.2e-3
    return 0.12 if step % 25 == 7 else 2.0e-3


def test_tuner_keeps_every_core_on_an_idle_machine():
    tuner = _C.ThreadTuner(2)
    ran = drive(tuner, 5000, idle)
    assert tuner.best == 2
    assert ran.count(1) < 0.02 * len(ran)  # the tries of one thread grow rarer


def test_tuner_leaves_a_count_that_stalls_and_comes_back_when_the_load_goes():
    tuner = _C.ThreadTuner(2)
    ran = drive(tuner, 5000, busy)
    assert tuner.best == 1
    assert ran[:100].count(1) > 40  # two stalls, and it is gone
    stalled_tries = sum(1 for step, t in enumerate(ran[100:], 100) if t == 2 and step % 25 == 7)
    assert stalled_tries <= 6  # a try that stalls waits twice as long for the next
    drive(tuner, 2 * _C.ThreadTuner.max_wait + 100, idle)
    assert tuner.best == 2


def test_tuner_follows_counts_whose_speeds_swap():
    """A count that lost its tries is judged anew on each try, so a change of load is followed."""
    tuner = _C.ThreadTuner(2)
    drive(tuner, 3000, idle)
    assert tuner.best == 2
    drive(tuner, _C.ThreadTuner.max_wait + 100, lambda threads, step: 3.0e-3 if threads == 2 else 1.5e-3)
    assert tuner.best == 1


def test_tuner_finds_the_fastest_count_between_the_ends():
    tuner = _C.ThreadTuner(16)
    cost = {16: 3.0e-3, 8: 2.0e-3, 4: 1.2e-3, 2: 1.8e-3, 1: 3.5e-3}
    ran = drive(tuner, 3000, lambda threads, step: cost[threads])
    assert tuner.best == 4
    assert ran[-1000:].count(4) > 950


def test_tuner_with_one_thread_has_nothing_to_try():
    tuner = _C.ThreadTuner(1)
    assert set(drive(tuner, 200, busy)) == {1} and tuner.best == 1
    with pytest.raises(mixtral_ext.MixtralError, match="at least one thread"):
        _C.ThreadTuner(0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2", 5000])
def test_num_threads_must_be_a_positive_integer(bad):
    with pytest.raises(mixtral_ext.SettingError, match="num_threads"):
        mixtral_ext.Engine.synthetic(DEMO_CONFIG, max_context=64, num_threads=bad)


def test_every_thread_count_gives_the_same_logits():
    """Each row of each op is one thread's work, so the count changes nothing, bit for bit."""
    prompt = random_tokens(40, DEMO_CONFIG.vocab_size)
    logits = {}
    for num_threads in (None, 1, 2, 3):
        with mixtral_ext.Engine.synthetic(DEMO_CONFIG, max_context=128, num_threads=num_threads) as engine:
            assert engine.num_threads == (num_threads or _C.ThreadTuner.available_threads)
            with engine.new_sequence() as seq:
                rows = [seq.append(prompt)] + [seq.append([t]) for t in prompt[:20]]
            logits[num_threads] = np.stack(rows)
    for num_threads in (1, 2, 3):
        np.testing.assert_array_equal(logits[num_threads], logits[None])


def test_num_threads_from_numpy_and_on_the_cli(capsys):
    with mixtral_ext.Engine.synthetic(DEMO_CONFIG, max_context=64, num_threads=np.int64(1)) as engine:
        assert engine.num_threads == 1
        assert engine.generate([1, 2, 3], max_tokens=3, temperature=0).usage.completion_tokens == 3
    from mixtral_ext.__main__ import main

    main(["bench", "--new-tokens", "4", "--prompt-tokens", "8", "--num-threads", "1"])
    assert "decode" in capsys.readouterr().out
