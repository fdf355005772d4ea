"""Third-party plugins: found through the ``dqr`` entry-point group, with no
config change, and reported clearly when they clash or break.

End to end, the example package kept in docs/examples/ is pip-installed into
a fresh venv and used through that venv's ``dqr``: its backend type serves a
``dqr run``, and its relabel step runs beside the built-in XNAT rules.

In process, plugins are added to a fresh plugin manager, either registered
programmatically or installed as real distributions (a ``.dist-info`` on
``sys.path``), to show how clashes and broken plugins are reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml

import dqr
from dqr import pluginmanager
from dqr.config import SourceConfig
from dqr.errors import PluginError
from dqr.plugins.testpacs.memory.pacs import MemoryPacs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "dqr-example-plugin"
#: How dqr names an entry-point plugin: "<distribution>:<entry point>".
EXAMPLE_PLUGIN = "dqr-example-plugin:example"
#: Copying these would leak local build state into the install.
NOT_SOURCES = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


# -- helpers ---------------------------------------------------------------------


def run(*command: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["COLUMNS"] = "200"  # rich wraps tables at 80 columns when not on a terminal
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    return result


def table_rows(text: str) -> list[tuple[str, ...]]:
    """The cells of every row of the rich tables in ``text``."""
    return [tuple(cell.strip() for cell in line.split("│")[1:-1]) for line in text.splitlines() if "│" in line]


def flat(text: str) -> str:
    """``text`` with line wrapping undone (rich wraps messages at its console width)."""
    return " ".join(text.split())


def pip_install(python: Path, *packages: Path | str, cwd: Path) -> None:
    """Install ``packages`` and their dependencies into the environment of
    ``python`` with this environment's pip (the new venv needs none of its own).

    Local source trees are built with this environment's setuptools when it
    can (no build requirements fetched); dependencies come from pip's cache
    or the index, as on any machine.
    """
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    if run(*install, "--no-build-isolation", *packages, cwd=cwd, check=False).returncode != 0:
        run(*install, *packages, cwd=cwd)


def copy_dqr_source(destination: Path) -> Path:
    """The files dqr is built from, copied away from the checkout (pip
    builds in the source tree, and others are using this one)."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    for name in ("core", "plugins"):
        shutil.copytree(REPO / name, destination / name, ignore=NOT_SOURCES)
    return destination


# -- end to end, in a venv -----------------------------------------------------------


@dataclass(frozen=True)
class Venv:
    python: Path
    dqr: Path
    example: Path
    """The copy of the example package that was installed (with its tests)."""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A venv of its own -- isolated from this one and from the base
    interpreter -- with dqr (from this checkout), its dependencies, pytest and
    the example plugin installed into it, as a user would install them.

    Not one that sees system site packages: made from inside a venv, that sees the *base*
    interpreter's packages, not this venv's, so the test would pass only
    where dqr happens to be installed in the base Python.
    """
    root = tmp_path_factory.mktemp("venv")
    # No pip of its own (ensurepip is the slow part): this pip installs into it.
    run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root)
    python = root / "bin" / "python"
    source = copy_dqr_source(tmp_path_factory.mktemp("dqr-source") / "dqr")
    example = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, example, ignore=NOT_SOURCES)
    pip_install(python, source, example, "pytest", cwd=root)
    return Venv(python, root / "bin" / "dqr", example)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory away from the repo."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def export(venv: Venv, work: Path) -> Path:
    """A ZIP export of the synthetic cohort that ``dqr demo-data`` writes."""
    run(venv.dqr, "demo-data", work / "cohort", cwd=work)
    return Path(shutil.make_archive(str(work / "export"), "zip", work / "cohort"))


@dataclass(frozen=True)
class ZipRun:
    result: subprocess.CompletedProcess[str]
    archive: Path
    labels: dict[str, tuple[str, str]]
    """StudyInstanceUID -> the (Subject, Session) its CSV row asked for."""
    expected_instances: int


@pytest.fixture(scope="module")
def zip_run(venv: Venv, work: Path, export: Path) -> ZipRun:
    """``dqr run`` on a ``type: zip`` source, two studies relabeled."""
    cohort = MemoryPacs.from_folder(work / "cohort")
    studies = sorted(cohort.find("STUDY", {}), key=lambda s: s["StudyInstanceUID"])[:2]
    labels = {s["StudyInstanceUID"]: (f"Subj{i}", f"Subj{i}_V1") for i, s in enumerate(studies, 1)}
    csv_lines = ["Study Instance UID,Subject,Session"]
    csv_lines += [f"{uid},{subject},{session}" for uid, (subject, session) in labels.items()]
    (work / "queries.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    config = {
        "project": "Trial",
        "sources": {"export": {"type": "zip", "path": export.name}},
        "archive": "archive",
        "csv": "queries.csv",
    }
    (work / "site.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result = run(venv.dqr, "run", "--config", work / "site.yaml", cwd=work, check=False)
    expected = sum(int(s["NumberOfStudyRelatedInstances"]) for s in studies)
    return ZipRun(result, work / "archive" / "Trial", labels, expected)


@pytest.fixture(scope="module")
def stored(zip_run: ZipRun) -> list[tuple[Path, pydicom.Dataset]]:
    """Every file the run stored, read back."""
    return [(path, pydicom.dcmread(path)) for path in sorted(zip_run.archive.rglob("*.dcm"))]


def session_of(path: Path, archive: Path) -> tuple[str, str]:
    """The (subject, session) directories a stored file is under."""
    subject, session, *_ = path.relative_to(archive).parts
    return subject, session


@pytest.mark.slow
def test_dqr_plugins_lists_the_example_plugin(venv: Venv, work: Path) -> None:
    result = run(venv.dqr, "plugins", cwd=work)

    assert EXAMPLE_PLUGIN in [row[0] for row in table_rows(result.stdout)]


@pytest.mark.slow
def test_dqr_plugins_lists_zip_as_a_backend_type_of_the_example_plugin(venv: Venv, work: Path) -> None:
    result = run(venv.dqr, "plugins", cwd=work)

    assert ("zip", EXAMPLE_PLUGIN) in table_rows(result.stdout)


@pytest.mark.slow
def test_plugin_command_prints_one_query_row_per_study_of_the_export(
    venv: Venv, work: Path, export: Path
) -> None:
    result = run(venv.dqr, "zip-studies", export, cwd=work)

    header, *rows = result.stdout.splitlines()
    assert header.startswith("Study Instance UID,")
    assert len(rows) == len(MemoryPacs.from_folder(work / "cohort").study_uids())


@pytest.mark.slow
def test_run_on_a_zip_source_exits_zero(zip_run: ZipRun) -> None:
    assert zip_run.result.returncode == 0, zip_run.result.stderr


@pytest.mark.slow
def test_run_on_a_zip_source_stores_every_instance_of_the_selected_studies(
    zip_run: ZipRun, stored: list[tuple[Path, pydicom.Dataset]]
) -> None:
    assert {ds.StudyInstanceUID for _, ds in stored} == set(zip_run.labels)
    assert len(stored) == zip_run.expected_instances


@pytest.mark.slow
def test_stored_files_carry_the_plugins_time_point_id(
    zip_run: ZipRun, stored: list[tuple[Path, pydicom.Dataset]]
) -> None:
    for path, ds in stored:
        _, session = zip_run.labels[ds.StudyInstanceUID]
        assert ds.ClinicalTrialTimePointID == session, path


@pytest.mark.slow
def test_stored_files_carry_the_builtin_xnat_relabeling(
    zip_run: ZipRun, stored: list[tuple[Path, pydicom.Dataset]]
) -> None:
    for path, ds in stored:
        subject, session = zip_run.labels[ds.StudyInstanceUID]
        assert (str(ds.PatientName), ds.PatientID) == (subject, subject), path
        assert (ds.StudyID, ds.AccessionNumber) == (session, session), path
        assert session_of(path, zip_run.archive) == (subject, session)


@pytest.mark.slow
def test_manifest_keeps_the_time_point_ids_original_value(
    zip_run: ZipRun, stored: list[tuple[Path, pydicom.Dataset]]
) -> None:
    manifests = {path.parent.parent / "manifest.jsonl" for path, _ in stored}
    records = [json.loads(line) for manifest in manifests for line in manifest.read_text().splitlines()]

    assert len(records) == zip_run.expected_instances
    # The synthetic data has no time point: the original value is "absent".
    assert all(record["replaced"]["ClinicalTrialTimePointID"] == "" for record in records)


@pytest.mark.slow
def test_example_plugins_own_test_suite_passes_when_installed(venv: Venv) -> None:
    # Its tests are the docs' "testing a plugin" section made real: they
    # import the installed package and find it through dqr's plugin manager.
    run(venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=venv.example)


# -- in process: clashes and broken plugins ---------------------------------------------


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """A plugin manager rebuilt on first use, and forgotten afterwards so
    that what a test registered never leaks into the next test."""
    pluginmanager.reset()
    yield
    pluginmanager.reset()


@pytest.fixture
def install_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_plugins: None
) -> Iterator[Callable[[str, str], None]]:
    """``install_distribution(name, module_source)``: a real installed
    distribution (``.dist-info`` with a ``dqr`` entry point named
    ``example``) and its module, on ``sys.path`` for this test only.

    No monkeypatching of importlib.metadata: dqr finds it as it would find
    any pip-installed plugin.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(name: str, module_source: str) -> None:
        module = name.replace("-", "_")
        (site / f"{module}.py").write_text(module_source, encoding="utf-8")
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[dqr]\nexample = {module}\n", encoding="utf-8")
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def registers_backend(type_name: str) -> str:
    """Source of a plugin module that registers one backend type."""
    return (
        "import dqr\n"
        "from dqr.config import SourceConfig\n\n"
        "@dqr.hookimpl\n"
        "def dqr_register_backends(register):\n"
        f"    register({type_name!r}, lambda config, context: None, SourceConfig)\n"
    )


class BackendPlugin:
    """A plugin object registering backend types (no factory is ever called)."""

    def __init__(self, *type_names: str) -> None:
        self.type_names = type_names

    @dqr.hookimpl
    def dqr_register_backends(self, register: Callable[..., None]) -> None:
        for name in self.type_names:
            register(name, lambda config, context: None, SourceConfig)


def test_two_distributions_with_the_same_entry_point_name_are_both_loaded(
    install_distribution: Callable[[str, str], None],
) -> None:
    # pluggy's own loader skips an entry-point name it has seen: one of
    # these would silently vanish.
    install_distribution("site-plugin-a", registers_backend("type-a"))
    install_distribution("site-plugin-b", registers_backend("type-b"))

    names = pluginmanager.plugin_names()

    assert {"site-plugin-a:example", "site-plugin-b:example"} <= set(names)


def test_two_distributions_registering_one_backend_type_is_an_error_naming_both(
    install_distribution: Callable[[str, str], None],
) -> None:
    install_distribution("site-plugin-a", registers_backend("site-type"))
    install_distribution("site-plugin-b", registers_backend("site-type"))

    with pytest.raises(PluginError) as error:
        pluginmanager.backend_types()

    assert "site-plugin-a:example" in str(error.value)
    assert "site-plugin-b:example" in str(error.value)


def test_a_plugin_claiming_a_builtin_backend_type_is_an_error_naming_both(fresh_plugins: None) -> None:
    pluginmanager.get_plugin_manager().register(BackendPlugin("memory"), name="site-memory")

    with pytest.raises(PluginError) as error:
        pluginmanager.backend_types()

    assert "dqr.plugins.testpacs.memory" in str(error.value)
    assert "site-memory" in str(error.value)


def test_unknown_backend_type_exits_2_listing_the_available_types(
    fresh_plugins: None, site: Callable[..., Path], write_csv: Callable[..., Path], dqr: Callable[..., object]
) -> None:
    pluginmanager.get_plugin_manager().register(BackendPlugin("static"), name="site-static")
    config = site(source={"type": "no-such-type"})
    csv = write_csv("Patient ID\nPAT00001\n")

    result = dqr("run", "--config", config, "--csv", csv)

    assert result.exit_code == 2
    message = flat(result.output)
    assert "unknown backend type 'no-such-type'" in message
    # Built-in and plugin types alike.
    assert f"available: {', '.join(sorted(pluginmanager.backend_types()))}" in message
    assert "static" in pluginmanager.backend_types()


def test_broken_entry_point_exits_2_naming_the_plugin(
    install_distribution: Callable[[str, str], None], dqr: Callable[..., object]
) -> None:
    install_distribution("site-broken", "import a_module_that_is_not_installed\n")

    result = dqr("plugins")

    assert result.exit_code == 2
    message = flat(result.output)
    assert "site-broken:example (site_broken) failed to load" in message
    assert "a_module_that_is_not_installed" in message
