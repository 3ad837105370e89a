"""``make test-xen`` boots the lab in the first scenario's setup: the project's default
pytest-timeout (pyproject.toml) must not cut that boot short (it killed QEMU after 300 s)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.xen import test_lab


def test_lab_scenarios_outlast_the_lab_not_the_default_timeout() -> None:
    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    default = float(config["tool"]["pytest"]["ini_options"]["timeout"])
    marks = [m for m in test_lab.test_scenario.pytestmark if m.name == "timeout"]
    assert marks, "test_scenario has no timeout of its own: the default one kills the lab"
    assert marks[0].args[0] > max(default, test_lab.LAB_TIMEOUT)
