"""What a template may do: Jinja's sandbox, immutable, with what makes a string or a number of
any size bounded (an error naming the template and line, as any render error).

A template is the operator's code, and one copied from the internet reached the process through
any function's globals (`lipsum.__globals__`: os, the environment, files, the config and its
secrets, a shell). The sandbox refuses every attribute that starts with an underscore, the
internals of functions and frames, and any change to what a template is given. What is not
bounded (a loop that writes nothing, over lists one in another) is the README's to say.
"""

from __future__ import annotations

import re
import threading
import types
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils

from bridge.output import OutputBuffer

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


class _BoundedBuffers(jinja2.compiler.CodeGenerator):
    """Jinja's compiled code, with each buffer it collects in a list (a macro's, a `{% set %}`
    or `{% call %}` block's) an output.OutputBuffer, bounded as it is written: a plain list held
    everything written until the block ended."""

    def buffer(self, frame: jinja2.compiler.Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's sandbox (below), with what makes a string or a number of any size bounded: `*`,
    `**`, `%` and str.format widths, the widening string methods. Immutable: a template changed
    the event object every channel's template reads (`event.MemberList.clear()`), and the
    event classes for the rest of the process (`event.model_fields.clear()`)."""

    # Intercepted, they are no longer folded at compile time either.
    intercepted_binops = frozenset({"*", "**", "%"})
    template_class = _Template
    code_generator_class = _BoundedBuffers
    output_buffer = OutputBuffer  # what _BoundedBuffers' code makes each buffer of
    filter_blocks = False  # the console's may have them: its escaping is one_line's alone

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.update(range=_range, lipsum=_lipsum)
        self.filters.update(format=_format, center=_center)

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


class ConsoleSandbox(Sandbox):
    """The console's: a digest joins each entry's lines with a filter block. Its output is a log
    line, where one_line has escaped every value already and a filter can undo nothing."""

    filter_blocks = True
