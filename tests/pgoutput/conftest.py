"""Run every decoder test twice: with the C tuple parser and with the pure-Python one."""

from __future__ import annotations

import pytest

from walex.pgoutput import decoder


@pytest.fixture(autouse=True, params=["c", "python"])
def tuple_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c":
        if decoder._c_parse_tuple is None:
            pytest.skip("the C accelerator walex.pgoutput._tuple is not built")
        monkeypatch.delenv("WALEX_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
    return request.param

