import math

import pytest

from dsl_tf import ConstantSchedule, CosineSchedule, LinearSchedule


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999])
def test_cosine_is_equation_2(step):
    s = CosineSchedule(0.5, min_ratio=0.0)
    assert s(step, 1000) == pytest.approx(0.25 * (1 + math.cos(math.pi * step / 1000)), abs=1e-12)


def test_values_of_each_decay():
    assert CosineSchedule(0.4, 0.0)(0, 100) == pytest.approx(0.4)
    assert CosineSchedule(0.4, 0.0)(50, 100) == pytest.approx(0.2)
    assert LinearSchedule(0.4, 0.0)(25, 100) == pytest.approx(0.3)
    assert LinearSchedule(0.4, 0.0)(75, 100) == pytest.approx(0.1)
    assert ConstantSchedule(0.4, 0.0)(75, 100) == pytest.approx(0.4)


def test_floor_and_end():
    s = CosineSchedule(0.5, min_ratio=0.005)
    assert s(99, 100) == pytest.approx(0.005)  # formula gives 1.2e-4, floored
    assert s(100, 100) == 0.0 and s(150, 100) == 0.0  # frozen from end_step on
    assert LinearSchedule(0.5, 0.01)(99, 100) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_ratio": 0.0}, "initial_update_ratio must be in (0, 1], got 0.0"),
        ({"initial_ratio": 1.5}, "initial_update_ratio must be in (0, 1], got 1.5"),
        ({"initial_ratio": 0.3, "min_ratio": 0.4}, "min_update_ratio must be in [0, initial_update_ratio=0.3], got 0.4"),
    ],
)
def test_schedule_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        CosineSchedule(**kwargs)
    assert str(err.value) == message


def test_config_round_trip():
    s = LinearSchedule(0.3, 0.01)
    t = LinearSchedule.from_config(s.get_config())
    assert [t(i, 10) for i in range(12)] == [s(i, 10) for i in range(12)]
