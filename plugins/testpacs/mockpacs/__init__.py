"""``dqr mock-pacs``: serve the in-memory PACS over real DIMSE (a pynetdicom
Query/Retrieve SCP) and over HTTP (QIDO-RS/WADO-RS), with fault injection.

The config is YAML::

    source:                 # a memory source: path or synthetic
      synthetic: {patients: 4}
    dimse:                  # optional: see dqr.plugins.testpacs.mockpacs.dimse_server
      port: 11112
      aet: MOCKPACS
    dicomweb:               # optional: see dqr.plugins.testpacs.mockpacs.http_server
      port: 8042
    store:                  # optional: a Storage SCP to send to (dqr.plugins.testpacs.mockpacs.store_scp)
      port: 11113
    stow:                   # optional: a STOW-RS server (dqr.plugins.testpacs.mockpacs.stow_server)
      port: 8043

Each server module defines its own pydantic ``Config`` (ports, AE titles,
destinations, faults) and a server class with ``start()``/``stop()``.
"""

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer

import dqr

#: section name -> module serving it; each has ``Config`` and ``serve(pacs, config)``.
SERVERS = {
    "dimse": "dqr.plugins.testpacs.mockpacs.dimse_server",
    "dicomweb": "dqr.plugins.testpacs.mockpacs.http_server",
    "store": "dqr.plugins.testpacs.mockpacs.store_scp",
    "stow": "dqr.plugins.testpacs.mockpacs.stow_server",
}


def load_mock_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """Read a mock-PACS config: the memory PACS and each server's config.

    Read like the site config (:func:`dqr.yamlsafe.load_yaml_file`): every
    problem is listed at once with its line, as a :class:`ConfigError`.
    """
    from pydantic import ValidationError

    from dqr.config import unknown_key_problem, validation_problems
    from dqr.errors import ConfigError, Problem
    from dqr.plugins.testpacs.memory import MemorySourceConfig, load_pacs
    from dqr.yamlsafe import load_yaml_file

    file = str(path)
    document = load_yaml_file(path)
    data, lines = document.data, document.lines
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(file, "the config must be a mapping of sections (source, dimse, dicomweb)", 1))
    problems = list(document.problems)
    valid = ["source", *SERVERS]
    for key in data:
        if key not in valid:
            problems.append(unknown_key_problem(str(key), valid, file, lines.get((key,))))

    def section(key: str, model: Any, raw: Any, extra: dict[str, Any] | None = None) -> Any:
        if not isinstance(raw, dict):
            problems.append(Problem(file, f"{key}: expected a mapping of keys to values", lines.get((key,))))
            return None
        try:
            return model.model_validate({**(extra or {}), **raw})
        except ValidationError as exc:
            problems.extend(validation_problems(exc, model, file, lines, prefix=(key,)))
            return None

    source = section("source", MemorySourceConfig, data.get("source") or {"synthetic": {}}, {"type": "memory"})
    servers = {}
    for key, module_name in SERVERS.items():
        if key in data:
            server = section(key, importlib.import_module(module_name).Config, data[key] or {})
            if server is not None:
                servers[key] = server
    if problems:
        raise ConfigError(problems)
    try:
        pacs = load_pacs(source, path.parent)
    except ConfigError as exc:
        raise ConfigError([Problem(file, p.message, lines.get(("source",))) for p in exc.problems]) from exc
    return pacs, servers


@dqr.hookimpl
def dqr_register_commands(app):
    from dqr.cli import handle_errors  # the CLI is loading its commands: already imported

    @app.command("mock-pacs", rich_help_panel="Test PACS")
    @handle_errors
    def mock_pacs(
        config: Annotated[Path, typer.Option("--config", "-c", help="Mock PACS YAML config.")],
    ) -> None:
        """Serve an in-memory PACS over DIMSE and/or DICOMweb until Ctrl-C.

        Example: dqr mock-pacs --config configs/mock-pacs.yaml
        """
        import threading

        pacs, configs = load_mock_config(config)
        started = []
        try:
            for section, server_config in configs.items():
                server = importlib.import_module(SERVERS[section]).serve(pacs, server_config)
                started.append(server)
                typer.echo(f"{section}: {server.describe()}")
            if not started:
                typer.echo("nothing to serve: add a `dimse:`, `dicomweb:`, `store:` or `stow:` section", err=True)
                raise typer.Exit(2)
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            for server in started:
                server.stop()
