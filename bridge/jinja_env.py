"""The Jinja environments templates render in, one a channel type: where templates are found
(the config's folder, then the shipped ones), how every value is escaped for where it lands
(bridge/escape.py's finalize), and which variables a template names. What a template may do
there is bridge/sandbox.py's.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any, TypeVar

import jinja2
import jinja2.bccache
import jinja2.meta
import jinja2.nodes
from jinja2.loaders import split_template_path

from bridge.escape import FINALIZE, TOJSON, as_text, escaped_concat
from bridge.sandbox import ConsoleSandbox, Sandbox

SHIPPED = next(
    p
    for p in (
        Path(__file__).parent / "_templates",  # installed wheel
        Path(__file__).parent.parent / "templates",  # source checkout
    )
    if p.is_dir()
)


# Only names shaped like Tencent's commands pick a per-command template: "digest", "default"
# or a path never do.
COMMAND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*$")


def is_command_name(value: Any) -> bool:
    """The Jinja test `x is command_name`: whether `x` may pick a per-command template. A
    template that includes one by a caller's command (a digest's entries) asks it first."""
    return isinstance(value, str) and COMMAND_NAME.fullmatch(value) is not None


class _Folder(jinja2.FileSystemLoader):
    """A folder of templates; a file that is not UTF-8 is reported like a syntax error, with
    its file and line."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        try:
            return super().get_source(environment, template)
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise jinja2.TemplateSyntaxError(
                "not UTF-8 text", line, template, self._filename(template)
            ) from None

    def _filename(self, template: str) -> str | None:
        for folder in self.searchpath:
            path = os.path.join(folder, *split_template_path(template))
            if os.path.isfile(path):
                return path
        return None


COMPILED_LIMIT = 1000  # templates kept compiled, a channel type
_caching = threading.Lock()
K = TypeVar("K")
V = TypeVar("V")


class _Compiled(jinja2.BytecodeCache):
    """Each template compiled once a process, found again by its file and source: a reload
    builds new environments (bridge/render.py), and compiling one Slack channel's templates
    again took 0.3 s, beside the callbacks. A file whose source has changed is compiled anew."""

    def __init__(self) -> None:
        self._code: dict[str, tuple[str, CodeType]] = {}  # key -> (checksum of the source, code)

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        entry = self._code.get(bucket.key)
        if entry is not None and entry[0] == bucket.checksum:
            bucket.code = entry[1]

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        if bucket.code is not None:
            _keep(self._code, bucket.key, (bucket.checksum, bucket.code))

    def clear(self) -> None:
        with _caching:
            self._code.clear()


def _keep(cache: dict[K, V], key: K, value: V) -> None:
    """`value` under `key`, the oldest entry let go past COMPILED_LIMIT. Under a lock: a reload
    compiles on its thread while the event loop may compile a template at its first use."""
    with _caching:
        if len(cache) >= COMPILED_LIMIT and key not in cache:
            cache.pop(next(iter(cache)))
        cache[key] = value


_COMPILED = {kind: _Compiled() for kind in FINALIZE}  # compiled code depends on the options
_VARIABLES: dict[tuple[str, str], frozenset[str] | None] = {}  # (name, source) -> names


def environments(folder: Path) -> dict[str, jinja2.Environment]:
    """An environment per channel type, each escaping for its own output."""
    loader = jinja2.ChoiceLoader([_Folder(folder), _Folder(SHIPPED)])
    envs: dict[str, jinja2.Environment] = {}
    for kind, finalize in FINALIZE.items():
        # Sandboxed (bridge/sandbox.py): a template is code, and one copied from the internet
        # read every secret the process holds.
        env = (ConsoleSandbox if kind == "console" else Sandbox)(
            loader=loader,
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # escaping is finalize's job, per output kind
            finalize=finalize,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # no stat() per callback; a reload builds a new Renderer
            bytecode_cache=_COMPILED[kind],
        )
        # Jinja joins every captured buffer (a macro's, a set block's, the template's) with it.
        env.concat = escaped_concat  # type: ignore[method-assign]
        env.filters["tojson"] = TOJSON[kind]
        env.filters["as_text"] = as_text
        env.tests["command_name"] = is_command_name
        envs[kind] = env
    return envs


_OTHER_TEMPLATES = (jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                    jinja2.nodes.Extends)  # fmt: skip


def variables_used(env: jinja2.Environment, name: str) -> frozenset[str] | None:
    """The variables a template names, from its syntax tree; None when it draws on another
    template, whose names it cannot see."""
    assert env.loader is not None
    source, _, _ = env.loader.get_source(env, name)
    if (name, source) in _VARIABLES:  # parsed already, as at an earlier reload
        return _VARIABLES[name, source]
    tree = env.parse(source, name)
    found = (
        None
        if any(True for _ in tree.find_all(_OTHER_TEMPLATES))
        else frozenset(jinja2.meta.find_undeclared_variables(tree))
    )
    _keep(_VARIABLES, (name, source), found)
    return found
