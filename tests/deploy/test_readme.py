"""deploy/README.md stays true: the files, modules and make targets it names exist."""

from __future__ import annotations

import importlib.util
import re

from tests.deploy.manifests import DEPLOY, ROOT

README = (DEPLOY / "README.md").read_text()


def test_every_file_it_names_exists() -> None:
    named = set(re.findall(r"`((?:deploy/)?(?:docker|k8s|compose)[\w./-]*)`", README))
    named |= set(re.findall(r"(deploy/[\w./-]+\w)", README))
    assert named
    for name in named:
        path = ROOT / name if name.startswith("deploy/") else DEPLOY / name
        assert path.exists(), f"deploy/README.md names {name}, which is not there"
    for manifest in set(re.findall(r"`([\w.-]+\.yaml)`", README)):
        assert any(DEPLOY.rglob(manifest)), f"deploy/README.md names {manifest}, not in deploy/"


def test_every_module_it_runs_exists() -> None:
    modules = set(re.findall(r"python -m ([\w.]+)", README)) | set(
        re.findall(r"--entrypoint python \w+ -m ([\w.]+)", README)
    )
    assert {"search_service.migrate", "vpm_common.health_probe"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
