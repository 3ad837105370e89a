"""``make test-xen``: boot the real-Xen lab once and report each dom0 test as a test here.

The scenarios live in ``tests/xen/dom0/`` and run inside the lab's dom0 (real Xen 4.17, xl, the
kernel's xen-blkback and nbd, Linux PV guests); this file collects one test per scenario (read from
those files, so none can go missing), boots the lab once for all selected ones, and asserts each
passed in dom0's junit report.  ``-k`` selects scenarios as usual and only those run in dom0.
"""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import need_tool
from tests.xen import lab

DOM0 = Path(__file__).parent / "dom0"
# The whole boot runs in the first scenario's setup: the project's default pytest-timeout (300 s,
# pyproject.toml) would kill QEMU mid-run, so the bound is the lab's own, plus room to report.
LAB_TIMEOUT = float(os.environ.get("XEN_LAB_TIMEOUT", "2400"))


def scenarios() -> list[str]:
    """Node ids of every test function in tests/xen/dom0/, in file order."""
    ids = []
    for path in sorted(DOM0.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                ids.append(f"tests/xen/dom0/{path.name}::{node.name}")
    return ids


@pytest.fixture(scope="session")
def lab_results(request: pytest.FixtureRequest) -> dict[str, ET.Element]:
    for tool in ("qemu-system-x86_64", "grub-mkrescue", "xorriso", "cpio", "depmod", "xl"):
        need_tool(tool)
    selected = [
        item.callspec.params["scenario"]
        for item in request.session.items
        if hasattr(item, "callspec") and "scenario" in item.callspec.params
    ]
    status = lab.boot(selected, timeout=LAB_TIMEOUT)
    junit = lab.RUN / "junit.xml"
    assert junit.exists(), f"the lab produced no report (qemu status {status}); see {lab.RUN}"
    results = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('file') or case.get('classname', '').replace('.', '/') + '.py'}"
        results[f"{name}::{case.get('name')}"] = case
    return results


@pytest.mark.timeout(LAB_TIMEOUT + 600)
@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.split("::")[-1])
def test_scenario(scenario: str, lab_results: dict[str, ET.Element]) -> None:
    case = lab_results.get(scenario)
    assert case is not None, f"{scenario} did not run in dom0; see {lab.RUN}/pytest.log"
    for tag in ("failure", "error", "skipped"):
        problem = case.find(tag)
        if problem is not None:
            pytest.fail(
                f"{tag} in dom0: {problem.get('message')}\n{problem.text or ''}\nlogs: {lab.RUN}",
                pytrace=False,
            )
