"""docs/plugins.md stays true to the code.

- Every hook in :mod:`dqr.hookspecs` has a section (a heading naming it), and
  every hook a heading names exists.
- Python blocks marked runnable are executed. The convention: a fenced
  ```` ```python ```` block directly preceded by the line ``<!-- test -->``.
  Each block runs on its own, in a fresh namespace, in an empty temporary
  working directory, with a fresh plugin manager, and with the example
  plugin's source importable (as if it were installed).
- Blocks preceded by ``<!-- file: PATH -->`` show a file of the docs tree
  (PATH relative to docs/) and must be that file, verbatim: the worked
  example's code on the page is the code that is tested.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dqr import hookspecs, pluginmanager

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PLUGINS_MD = DOCS / "plugins.md"
EXAMPLE = DOCS / "examples" / "dqr-example-plugin"
EXAMPLE_MODULE = "dqr_example_plugin"

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*)$")


@dataclass(frozen=True)
class CodeBlock:
    line: int
    """1-based line of the opening fence."""
    language: str
    marker: str
    """The HTML comment on the line before the fence, if any ("test", "file: PATH")."""
    code: str

    @property
    def id(self) -> str:
        return f"{PLUGINS_MD.name}:{self.line}"


def code_blocks(text: str) -> list[CodeBlock]:
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        before = MARKER.match(lines[index - 1]) if index else None
        code = "".join(line + "\n" for line in lines[index + 1 : end])
        blocks.append(CodeBlock(index + 1, opening.group(1), before.group(1) if before else "", code))
        index = end + 1
    return blocks


def headings(text: str) -> list[str]:
    # Fenced code can hold lines starting with "#" (comments): skip it.
    found, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line) or line.rstrip() == "```":
            in_code = not in_code
        elif not in_code and (match := HEADING.match(line)):
            found.append(match.group(1))
    return found


TEXT = PLUGINS_MD.read_text(encoding="utf-8")
BLOCKS = code_blocks(TEXT)
RUNNABLE = [block for block in BLOCKS if block.marker == "test"]
SHOWN_FILES = [block for block in BLOCKS if block.marker.startswith("file:")]
HOOKS_IN_HEADINGS = sorted({name for heading in headings(TEXT) for name in re.findall(r"\bdqr_\w+", heading)})


# -- hooks ------------------------------------------------------------------------


@pytest.mark.parametrize("hook", hookspecs.hook_names())
def test_hook_has_a_section_in_plugins_md(hook: str) -> None:
    assert any(re.search(rf"\b{hook}\b", heading) for heading in headings(TEXT)), (
        f"docs/plugins.md has no section for the hook {hook}: add a heading '### {hook}' "
        "saying when it is called, its arguments and what it returns"
    )


@pytest.mark.parametrize("hook", HOOKS_IN_HEADINGS)
def test_hook_with_a_section_in_plugins_md_exists(hook: str) -> None:
    assert hook in hookspecs.hook_names(), f"docs/plugins.md documents {hook}, which dqr.hookspecs does not define"


# -- code blocks ------------------------------------------------------------------


def test_plugins_md_has_runnable_examples() -> None:
    # Guards the convention itself: a renamed marker would silently test nothing.
    assert RUNNABLE


def test_every_code_block_marker_is_known() -> None:
    unknown = [f"{block.id}: <!-- {block.marker} -->" for block in BLOCKS if block.marker not in ("", "test")
               and not block.marker.startswith("file:")]

    assert not unknown, "unknown markers (use '<!-- test -->' or '<!-- file: PATH -->'): " + ", ".join(unknown)


@pytest.fixture
def docs_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Where a documentation example runs: an empty working directory, the
    example plugin importable from its source, and a plugin manager that the
    example may change but never leaks to other tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    # Importing from the source tree must not write __pycache__ into the
    # checkout (others work in it).
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    pluginmanager.reset()
    yield
    pluginmanager.reset()
    for name in [n for n in sys.modules if n == EXAMPLE_MODULE or n.startswith(EXAMPLE_MODULE + ".")]:
        del sys.modules[name]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_runnable_example_runs(block: CodeBlock, docs_sandbox: None) -> None:
    assert block.language == "python", f"{block.id}: only python blocks can be marked runnable"
    # Padding keeps line numbers: a traceback points at the line in plugins.md.
    code = compile("\n" * block.line + block.code, str(PLUGINS_MD), "exec")
    exec(code, {"__name__": "docs_example"})


@pytest.mark.parametrize("block", SHOWN_FILES, ids=[block.marker[5:].strip() for block in SHOWN_FILES])
def test_shown_file_is_the_file_verbatim(block: CodeBlock) -> None:
    path = DOCS / block.marker[5:].strip()

    assert block.code == path.read_text(encoding="utf-8"), (
        f"{block.id} differs from {path.relative_to(REPO)}: copy the file into the block"
    )


# -- the architecture page and the configuration page ---------------------------------

ARCHITECTURE_MD = DOCS / "architecture.md"
CONFIGURATION_MD = DOCS / "configuration.md"
CORE = REPO / "core"


def test_the_architecture_page_lists_every_core_module():
    text = ARCHITECTURE_MD.read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w/]+(?:\.py)?)` \|", text, re.MULTILINE))
    modules = {p.name for p in CORE.glob("*.py")} | {f"{p.name}/" for p in CORE.iterdir() if (p / "__init__.py").exists()}
    modules -= {"__init__.py"}
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md"


def _documented_keys() -> set[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    # `key`, `section.key` or a key of a `{type: ..., key: ...}` example
    return {word for code in re.findall(r"`([^`\n]+)`", text) for word in re.findall(r"[a-z_][a-z0-9_]*", code)}


def _config_models():
    from dqr.config import Limits, MatchingOptions, SeriesFilter, SiteConfig

    yield from (SiteConfig, Limits, MatchingOptions, SeriesFilter)
    for registered in (*pluginmanager.backend_types().values(), *pluginmanager.destination_types().values(),
                       *pluginmanager.executor_types().values()):
        yield registered.config_model


def _nested_models(model):
    from pydantic import BaseModel

    yield model
    for field in model.model_fields.values():
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate is not model:
                yield from _nested_models(candidate)


def test_every_config_key_of_every_registered_model_is_documented():
    documented = _documented_keys()
    keys = {
        (model.__name__, name)
        for top in _config_models()
        for model in _nested_models(top)
        for name in model.model_fields
    }
    missing = sorted(f"{model}.{name}" for model, name in keys if name not in documented)
    assert missing == [], "config keys no page in docs/ documents (as `key`)"
