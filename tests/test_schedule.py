import pytest

from loraprune import CubicSchedule


def test_endpoints_and_monotone():
    s = CubicSchedule(start=10, end=50, every=7)
    assert s.fraction(0) == 0.0 and s.fraction(10) == 0.0
    assert s.fraction(50) == 1.0 and s.fraction(80) == 1.0
    values = [s.fraction(t) for t in range(0, 60)]
    assert values == sorted(values)
    # closed form at the midpoint: 1 - (1/2)^3
    assert s.fraction(30) == pytest.approx(0.875)


def test_final_step_is_always_an_update():
    s = CubicSchedule(start=0, end=23, every=10)
    assert s.update_steps() == [10, 20, 23]
    assert not s.is_update(24)


def test_for_run_fractions():
    s = CubicSchedule.for_run(100, 0.1, 0.8, 5)
    assert (s.start, s.end, s.every) == (10, 80, 5)
    assert CubicSchedule.for_run(1).end == 1


@pytest.mark.parametrize("kw", [dict(start=5, end=5), dict(start=-1, end=3), dict(start=0, end=3, every=0)])
def test_bad_schedules(kw):
    with pytest.raises(ValueError):
        CubicSchedule(**kw)
