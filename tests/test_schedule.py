"""Algorithm 1 as a pure function of the optimizer step, and its validation."""

import pytest

from epas_lightning.schedule import SharingSchedule, resolve_target


def test_targets_resolve_deepest_first():
    assert resolve_target(3, 12) == (11, 10, 9)
    assert resolve_target(0.5, 12) == (11, 10, 9, 8, 7, 6)
    assert resolve_target(5 / 22, 22) == (21, 20, 19, 18, 17)
    assert resolve_target([7, 6, 5], 12) == (7, 6, 5)


@pytest.mark.parametrize(
    "target,match",
    [
        (12, "between 1 and n_layer - 1"),
        (0, "between 1 and n_layer - 1"),
        (0.01, "rounds down to 0"),
        (1.0, r"in \(0, 1\)"),
        ([11, 10, 0], "layer 0 can never share"),
        ([11, 9], "contiguous"),
        ([9, 10, 11], "contiguous"),
        ([], "empty"),
        (True, "count, a fraction or a list"),
    ],
)
def test_invalid_targets_are_explained(target, match):
    with pytest.raises(ValueError, match=match):
        resolve_target(target, 12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"growth": 0}, "growth must be >= 1"),
        ({"interval": 0}, "interval must be >= 1"),
        ({"growth": 4}, "not a multiple of growth=4"),
        ({"start_step": -1}, "start_step must be >= 0"),
    ],
)
def test_invalid_schedules_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharingSchedule.build(12, 6, **kwargs)


def test_growth_follows_algorithm_1():
    s = SharingSchedule.build(12, 0.5, growth=2, interval=10)
    assert s.start_step == 10 and s.n_stages == 3 and s.final_step == 30
    assert s.shared_layers_at(0) == [] and s.shared_layers_at(9) == []
    assert s.shared_layers_at(10) == [10, 11] and s.shared_layers_at(19) == [10, 11]
    assert s.shared_layers_at(20) == [8, 9, 10, 11]
    assert s.shared_layers_at(30) == [6, 7, 8, 9, 10, 11] == s.shared_layers_at(10**6)


def test_start_step_shifts_the_first_stage():
    s = SharingSchedule.build(4, 2, growth=1, interval=5, start_step=0)
    assert [len(s.shared_layers_at(t)) for t in (0, 4, 5, 9, 10)] == [1, 1, 2, 2, 2]


def test_region_only_grows():
    s = SharingSchedule.build(22, 5, growth=1, interval=3, start_step=2)
    sizes = [len(s.shared_layers_at(t)) for t in range(40)]
    assert sizes == sorted(sizes) and sizes[-1] == 5
    assert all(set(s.shared_layers_at(t)) <= set(s.shared_layers_at(t + 1)) for t in range(40))
