"""The CI rule for data-dependent tests: skip locally with a reason, fail under CI=true."""

import pytest
from conftest import SHARED_DATA, require_shared_data


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_missing_data_fails_under_ci(tmp_path, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_shared_data(tmp_path / "absent")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_data_skips_locally(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match=r"absent .*not present"):
        require_shared_data(tmp_path / "absent")


def test_present_folder_is_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_shared_data(tmp_path) == tmp_path
    assert SHARED_DATA.parts[-2:] == ("shared", "data")  # relative to the repo, not the machine
