"""Pure helpers of the worker loop."""

import pytest

from rayscale.engine.components.validation import next_evaluation


@pytest.mark.parametrize("seen, every, at, expected", [
    (0, 0, (), None),  # epoch ends only
    (0, 400, (), 400),
    (399, 400, (), 400),
    (400, 400, (), 800),  # just validated at 400
    (430, 400, (), 800),  # the step crossed 400 at 430
    (0, 0, (483, 1449), 483),
    (500, 0, (483, 1449), 1449),
    (1449, 0, (483, 1449), None),  # past the last rung
    (500, 1000, (483, 1449), 1000),  # whichever comes first
    (1000, 1000, (483, 1449), 1449),
])
def test_next_evaluation(seen, every, at, expected):
    assert next_evaluation(seen, every, at) == expected
