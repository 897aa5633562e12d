"""Routing configs that cannot learn or do nothing are refused in one line."""
import pytest

from moe_train.config import ConfigError, load_config


@pytest.mark.parametrize("override, needle", [
    (["moe.router=expert_choice", "moe.capacity_factor=9"], "moe.capacity_factor (9.0) must be <="),
])
def test_refused_in_one_line_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("override", [
    ["moe.router=expert_choice", "moe.capacity_factor=8"],
])
def test_accepted(override):
    load_config(None, override)
