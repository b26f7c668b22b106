"""The Jinja environments templates render in, one a channel type: where templates are found
(the config's folder, then the shipped ones), how every value is escaped for where it lands
(bridge/escape.py's finalize), and which variables a template names.
"""

from __future__ import annotations

import os
import re
import threading
import types
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any, TypeVar

import jinja2
import jinja2.bccache
import jinja2.filters
import jinja2.meta
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
from jinja2.loaders import split_template_path

from bridge.escape import FINALIZE, TOJSON, as_text, escaped_concat

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


# The most items a template's range() calls give in all, in one render. A loop over
# range(10**12) held start-up, `check` and a reload (its thread at 100% CPU, every
# acknowledgement slower) for good, and so did three loops over range(10000), one in another;
# events' own lists are bounded by the body's size.
RANGE_LIMIT = 10_000
# The most characters a template's `*` makes of a string or list ('x' * 10**9 took 1.4 GB).
REPEAT_LIMIT = 4_194_304


class _Budget(threading.local):
    left = RANGE_LIMIT  # range() items the render being made may still have


_budget = _Budget()


def _range(*args: int) -> range:
    items = range(*args)
    _budget.left -= len(items)
    if _budget.left < 0:
        raise OverflowError(
            f"range() of {len(items)} items: at most {RANGE_LIMIT} in all of a template's"
        )
    return items


class _Template(jinja2.Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        _budget.left = RANGE_LIMIT  # each render its own: templates it includes share it
        return super().render(*args, **kwargs)


# Widths and precisions of 8 digits or more, or given by an argument, in a %-format or a
# str.format field: each made a string of that many characters ('%999999999d' % 1 took 1 GB),
# at `check` already, where Jinja folds a constant expression while compiling.
_WIDE_PERCENT = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d{8}|\d*\.(\*|\d{8}))")
_WIDE_FIELD = re.compile(r"\{[^{}]*:[^{}]*(\d{8}|\{)")
# String methods whose first argument is the length of what they make.
_WIDENING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
LIPSUM_LIMIT = 100  # paragraphs: lipsum(200000) took 7 s and 364 MB


def _wide_percent(text: object) -> bool:
    return isinstance(text, str) and _WIDE_PERCENT.search(text) is not None


def _wide_field(text: object) -> bool:
    return isinstance(text, str) and _WIDE_FIELD.search(text) is not None


def _huge_power(base: Any, exponent: Any) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0:
        return False
    return abs(base) > 1 and exponent * abs(base).bit_length() > 8 * REPEAT_LIMIT


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    """Jinja's `format` filter (a %-format), its widths bounded."""
    if _wide_percent(str(value)):
        raise OverflowError("a format width of 8 digits or from an argument")
    return jinja2.filters.do_format(value, *args, **kwargs)


def _center(value: str, width: int = 80) -> str:
    if width > REPEAT_LIMIT:
        raise OverflowError(f"center() making over {REPEAT_LIMIT} characters")
    return jinja2.filters.do_center(value, width)


def _lipsum(n: int = 5, *args: Any, **kwargs: Any) -> Any:
    if n > LIPSUM_LIMIT:
        raise OverflowError(f"lipsum() of over {LIPSUM_LIMIT} paragraphs")
    return jinja2.utils.generate_lorem_ipsum(n, *args, **kwargs)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's sandbox (below), with what makes a string or a number of any size bounded: `*`,
    `**`, `%` and str.format widths, the widening string methods. Immutable: a template changed
    the event object every channel's template reads (`event.MemberList.clear()`), and the
    event classes for the rest of the process (`event.model_fields.clear()`)."""

    # Intercepted, they are no longer folded at compile time either.
    intercepted_binops = frozenset({"*", "**", "%"})

    filter_blocks = False  # the console's may have them: its escaping is one_line's alone

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        # A filter block works on what its body wrote, escaped already, and what it gives is
        # written as it is: `{% filter striptags %}` turned an escaped `<!channel>` back into a
        # ping, `{% filter upper %}` made `&LT;` of `&lt;`; in JSON, a replace could undo a
        # `\"`. A filter on each value is escaped.
        if not self.filter_blocks and (block := tree.find(jinja2.nodes.FilterBlock)) is not None:
            raise jinja2.TemplateSyntaxError(
                "{% filter %} blocks are not supported: put the filter on each value",
                block.lineno, name, filename,
            )  # fmt: skip
        return tree

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | bytes | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > REPEAT_LIMIT:
                    raise OverflowError(f"'*' making over {REPEAT_LIMIT} items")
        elif operator == "**" and _huge_power(left, right):
            raise OverflowError(f"'**' making a number of over {8 * REPEAT_LIMIT} bits")
        elif operator == "%" and _wide_percent(left):
            raise OverflowError("a format width of 8 digits or from an argument")
        return super().call_binop(context, operator, left, right)

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if type(__obj) is types.BuiltinMethodType and isinstance(__obj.__self__, str):
            name = __obj.__name__
            if name in _WIDENING and any(isinstance(a, int) and a > REPEAT_LIMIT for a in args):
                raise OverflowError(f"str.{name}() making over {REPEAT_LIMIT} characters")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox hands out its own str.format when the attribute is read.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _wide_field(value.__self__):

            def refused(*args: Any, **kwargs: Any) -> str:
                raise OverflowError("a format width of 8 digits or from an argument")

            return refused
        return wrapped


class _Console(_Sandbox):
    """The console's: a digest joins each entry's lines with a filter block. Its output is a log
    line, where one_line has escaped every value already and a filter can undo nothing."""

    filter_blocks = True


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
        # Sandboxed: a template is code, and one copied from the internet reached the process
        # through any function's globals (`lipsum.__globals__`: os, the environment, files,
        # the config and its secrets, a shell). The sandbox refuses every attribute that
        # starts with an underscore and the internals of functions and frames.
        env = (_Console if kind == "console" else _Sandbox)(
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
        env.template_class = _Template
        # Jinja joins every captured buffer (a macro's, a set block's, the template's) with it.
        env.concat = escaped_concat  # type: ignore[method-assign]
        env.globals["range"] = _range
        env.globals["lipsum"] = _lipsum
        env.filters["format"] = _format
        env.filters["center"] = _center
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
