"""``dqr mock-pacs``: serve the in-memory PACS over real DIMSE (a pynetdicom
Query/Retrieve SCP) and over HTTP (QIDO-RS/WADO-RS), with fault injection.

The config is YAML::

    source:                 # a memory source: path or synthetic
      synthetic: {patients: 4}
    dimse:                  # optional: see dqr.plugins.mockpacs.dimse_server
      port: 11112
      aet: MOCKPACS
    dicomweb:               # optional: see dqr.plugins.mockpacs.http_server
      port: 8042
    store:                  # optional: a Storage SCP to send to (dqr.plugins.mockpacs.store_scp)
      port: 11113
    stow:                   # optional: a STOW-RS server (dqr.plugins.mockpacs.stow_server)
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
    "dimse": "dqr.plugins.mockpacs.dimse_server",
    "dicomweb": "dqr.plugins.mockpacs.http_server",
    "store": "dqr.plugins.mockpacs.store_scp",
    "stow": "dqr.plugins.mockpacs.stow_server",
}


def load_mock_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """Read a mock-PACS config: the memory PACS and each server's config."""
    import yaml

    from dqr.errors import ConfigError
    from dqr.plugins.memory import MemorySourceConfig, load_pacs

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(data) - {"source", *SERVERS}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}; valid: source, {', '.join(SERVERS)}", file=str(path))
    source = MemorySourceConfig.model_validate({"type": "memory", **(data.get("source") or {"synthetic": {}})})
    pacs = load_pacs(source, path.parent)
    servers = {}
    for section, module_name in SERVERS.items():
        if section in data:
            module = importlib.import_module(module_name)
            servers[section] = module.Config.model_validate(data[section] or {})
    return pacs, servers


@dqr.hookimpl
def dqr_register_commands(app):
    @app.command("mock-pacs", rich_help_panel="Test PACS")
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
