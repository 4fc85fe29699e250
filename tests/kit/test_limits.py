import pytest
from pydantic import ValidationError

from memberhub.kit.limits import parse_rate_limit
from memberhub.settings import Settings


def test_a_rate_limit_is_read_in_limits_notation() -> None:
    item = parse_rate_limit("190/10 seconds")
    assert (item.amount, item.get_expiry()) == (190, 10)


@pytest.mark.parametrize("notation", ["lots", "0/minute", "0 per second", ""])
def test_a_limit_that_cannot_be_read_or_lets_nothing_through_is_refused(notation: str) -> None:
    with pytest.raises(ValueError, match=r"rate limit|allows no request"):
        parse_rate_limit(notation)


@pytest.mark.parametrize(
    "field", ["rate_limit", "unauthenticated_rate_limit", "sign_in_rate_limit"]
)
@pytest.mark.parametrize("notation", ["lots", "0/minute"])
def test_settings_refuse_a_bad_rate_limit_at_start_up(field: str, notation: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: notation})  # type: ignore[arg-type]
