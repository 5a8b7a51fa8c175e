"""The DIRE_* variables: on/off ones accept 1/true/yes/on and 0/false/no/off/empty, in any case,
and refuse anything else in one line naming the variable and its value, for every reader."""
import pytest

from dire_plugin.errors import DiReInputError
from dire_plugin.io.environ import env_flag

ON = ["1", "true", "yes", "on", "TRUE", "Yes", " on "]
OFF = ["", "0", "false", "no", "off", "False", "NO"]
BAD = ["maybe", "2", "-1", "enable", "disabled", "y", "n"]


@pytest.mark.parametrize("value", ON)
def test_on_spellings(monkeypatch, value):
    monkeypatch.setenv("DIRE_TEST_FLAG", value)
    assert env_flag("DIRE_TEST_FLAG") is True


@pytest.mark.parametrize("value", OFF)
def test_off_spellings_and_unset(monkeypatch, value):
    monkeypatch.setenv("DIRE_TEST_FLAG", value)
    assert env_flag("DIRE_TEST_FLAG") is False
    monkeypatch.delenv("DIRE_TEST_FLAG")
    assert env_flag("DIRE_TEST_FLAG") is False


@pytest.mark.parametrize("value", BAD)
def test_anything_else_is_one_line_naming_variable_and_value(monkeypatch, value):
    monkeypatch.setenv("DIRE_TEST_FLAG", value)
    with pytest.raises(DiReInputError) as e:
        env_flag("DIRE_TEST_FLAG")
    text = str(e.value)
    assert text.startswith(f"DIRE_TEST_FLAG={value!r} is not one of 1/true/yes/on or 0/false/no/off or empty")
    assert "\n" not in text


@pytest.mark.parametrize("value, off", [("false", False), ("no", False), ("off", False), ("0", False),
                                        ("true", True), ("yes", True), ("on", True), ("1", True)])
def test_dire_disable_reads_the_same_spellings(monkeypatch, value, off):
    from dire_plugin.activation.startup import disabled

    monkeypatch.setenv("DIRE_DISABLE", value)
    assert disabled() is off


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_dire_disable_refuses_other_values(monkeypatch, value):
    from dire_plugin.activation.startup import disabled

    monkeypatch.setenv("DIRE_DISABLE", value)
    with pytest.raises(DiReInputError, match=f"DIRE_DISABLE='{value}' is not one of"):
        disabled()


def test_a_bad_shim_redirect_table_is_one_line_naming_it(monkeypatch):
    from dire_plugin.upstream import shim

    monkeypatch.setenv(shim.ENV_REDIRECT, "{not json")
    with pytest.raises(DiReInputError, match=r"DIRE_SHIM_REDIRECT='\{not json' is not a JSON object"):
        shim.install()
    assert not shim.installed()
