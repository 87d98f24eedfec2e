"""The import graph keeps the services apart (milliseconds, no servers).

Read with ``ast`` from every module of ``parley/``, ``services/`` and ``tests/``, every import
statement counts, wherever it is (a function's lazy import too), as does
``importlib.import_module`` of a literal name. Two rules:

* Outside the service packages (``parley/``, ``tests/``, and ``services/openapi.py``) nothing
  imports a service's ``domain`` or ``repository`` module: management commands and the tests
  go through ``services/<name>/admin.py``, the runners through each service's ``app``
  (``create_app``), and pure rules through modules such as ``services/messages/rules.py``.
* A service package (a directory of ``services/`` with an ``__init__.py``) imports no other
  service package.

``services/__init__.py`` and ``services/openapi.py`` belong to no service: any module may
import them. ``services/openapi.py`` is the one place that reads every service's HTTP models
(from their ``app`` modules) to describe the whole API, so, like ``parley/allinone.py``, it
may import every service's ``app``; the first rule applies to it as to ``parley/``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("parley", "services", "tests")
# A service's modules that only the service itself may import.
PRIVATE = frozenset({"domain", "repository"})


@dataclass(frozen=True)
class Module:
    name: str  # dotted: services.auth.admin
    path: str  # for messages: services/auth/admin.py
    imports: frozenset[str]  # every module name it imports (dotted, absolute)


def module_name(relative: Path) -> tuple[str, bool]:
    """The dotted name of a module file (relative to the root) and whether it is a package's
    ``__init__``."""
    parts = list(relative.with_suffix("").parts)
    package = parts[-1] == "__init__"
    if package:
        parts.pop()
    return ".".join(parts), package


def imported_names(source: str, name: str, *, package: bool = False) -> frozenset[str]:
    """Every module ``source`` (the module ``name``) imports. ``from a.b import c`` counts as
    both ``a.b`` and ``a.b.c`` (``c`` may be a submodule); relative imports are resolved."""
    found: set[str] = set()
    here = name if package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and _called(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return frozenset(found)


def _called(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def scan(root: Path = ROOT, tops: Iterable[str] = SCANNED) -> list[Module]:
    modules = []
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            name, package = module_name(relative)
            imports = imported_names(path.read_text(), name, package=package)
            modules.append(Module(name, relative.as_posix(), imports))
    return modules


def service_of(module: str, services: frozenset[str]) -> str | None:
    """The service package a dotted module name belongs to, if any."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "services" and parts[1] in services:
        return parts[1]
    return None


def violations(modules: Iterable[Module], services: frozenset[str]) -> list[str]:
    """Every import that breaks a rule, as ``path: imports module (why)``: one line per
    imported module (``from m import a, b`` is one import of ``m``)."""
    found = []
    for module in modules:
        own = service_of(module.name, services)
        # The service-level module each import reaches: services.<name>.<module>.
        reached = sorted({".".join(i.split(".")[:3]) for i in module.imports})
        for imported in reached:
            theirs = service_of(imported, services)
            if theirs is None:
                continue
            if own is None:
                private = imported.split(".")[2:]
                if private and private[0] in PRIVATE:
                    found.append(
                        f"{module.path}: imports {imported} (a service's {private[0]} is its"
                        f" own: use services/{theirs}/admin.py or its create_app)"
                    )
            elif theirs != own:
                found.append(
                    f"{module.path}: imports {imported} (the {own} service imports no other"
                    " service)"
                )
    return found


def service_packages(root: Path = ROOT) -> frozenset[str]:
    return frozenset(p.parent.name for p in (root / "services").glob("*/__init__.py"))


# ---- the tree ---------------------------------------------------------------------------------


def test_the_tree_keeps_the_services_apart() -> None:
    services = service_packages()
    assert {"auth", "customer", "groups", "messages"} <= services
    modules = scan()
    assert len(modules) > 50 and any(m.name == "tests.conftest" for m in modules)
    assert violations(modules, services) == []


def test_the_management_commands_and_the_harness_use_the_admin_interfaces() -> None:
    """Not a rule, a check that the scan sees what it should: the imports it reads are there."""
    by_name = {m.name: m for m in scan()}
    assert "services.auth.admin" in by_name["parley.cli"].imports
    assert "services.customer.admin" in by_name["parley.cli"].imports
    assert "services.auth.admin" in by_name["tests.conftest"].imports
    # A service's own modules import its domain and repository (relative imports resolved).
    assert "services.auth.repository" in by_name["services.auth.admin"].imports


# ---- the rules on samples (each must be caught) ---------------------------------------------

SERVICES = frozenset({"auth", "customer", "groups", "messages"})


def sample(name: str, source: str, *, package: bool = False) -> list[str]:
    path = name.replace(".", "/") + ("/__init__.py" if package else ".py")
    module = Module(name, path, imported_names(source, name, package=package))
    return violations([module], SERVICES)


def test_a_test_or_command_importing_a_domain_or_repository_is_flagged() -> None:
    for source in (
        "from services.auth.domain import AuthDomain",
        "from services.customer.repository import INDEXES as X",
        "import services.groups.repository",
        "import services.messages.domain as d",
        "from services.auth import domain",
        "from services.auth import admin, repository",
        "def later():\n    from services.groups.domain import GroupsDomain\n",
        "import importlib\nimportlib.import_module('services.auth.repository')",
    ):
        for name in ("tests.test_sample", "parley.sample", "services.openapi"):
            found = sample(name, source)
            assert len(found) == 1, (name, source, found)
            assert found[0].startswith(name.replace(".", "/") + ".py: imports services.")


def test_a_service_importing_another_service_is_flagged() -> None:
    for name, source in (
        ("services.messages.domain", "from services.groups.repository import Group"),
        ("services.messages.app", "from services.groups.admin import GroupsAdmin"),
        ("services.customer.app", "import services.auth.app"),
        ("services.auth", "from services.customer import admin"),  # its __init__
        ("services.groups.admin", "def f():\n    import services.messages.rules\n"),
    ):
        found = sample(name, source, package=name.count(".") == 1)
        assert found and "imports no other service" in found[0], (name, source, found)


def test_allowed_imports_are_not_flagged() -> None:
    for name, source in (
        ("tests.test_sample", "from services.auth.admin import AuthAdmin"),
        ("tests.test_sample", "from services.messages.rules import member_notifications"),
        ("tests.test_sample", "from services.openapi import APIS"),
        ("tests.test_sample", "from .conftest import Stack"),
        ("parley.allinone", "from services.groups.app import create_app"),
        ("services.openapi", "from services.auth.app import API"),
        ("services.auth.app", "from .repository import INDEXES\nfrom .domain import AuthDomain"),
        ("services.auth.app", "def doc():\n    from services.openapi import document\n"),
        ("services.auth.app", "from services.auth.domain import AuthDomain"),
        ("services.groups.domain", "from shared.events import GroupCreated"),
    ):
        assert sample(name, source) == [], (name, source)


def test_relative_imports_are_resolved() -> None:
    assert imported_names("from .repository import X", "services.auth.admin") == {
        "services.auth.repository",
        "services.auth.repository.X",
    }
    assert imported_names("from . import domain", "services.auth", package=True) == {
        "services.auth",
        "services.auth.domain",
    }
    assert imported_names("from ..groups import repository", "services.auth.app") >= {
        "services.groups.repository"
    }
    assert sample("services.messages.app", "from ..groups import repository")  # caught too
