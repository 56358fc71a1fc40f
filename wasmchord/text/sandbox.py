"""A Jinja2 sandbox with limits, for chat templates: a template is code from a model file.

jinja2.sandbox keeps a template from reaching Python internals, but not from running for hours or
building a 10 GB string. Here every place where template code makes a value checks it first:
binary operators (`call_binop`), calls of functions, methods and macros (`call`), filters (wrapped),
`~` concatenation and list, tuple and dict literals (through a code generator that routes them to
the environment), attribute and item access (only the clock), and the output (rendered in chunks).
Each check looks at the clock, and at sizes, measured as the characters a value would print as (a
list shared many times counts each time, so that no value can print as more than the limit). The
limits are in `TemplateLimits`; each overrun raises `GenerationError` saying which was passed.
"""

from __future__ import annotations

import re
import time
from collections import ChainMap
from dataclasses import dataclass
from functools import wraps

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import GenerationError


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one rendering of a chat template."""

    seconds: float = 5.0              # wall-clock time
    output_chars: int = 4_000_000     # the rendered prompt (more than any context holds)
    value_chars: int = 4_000_000      # one value the template makes (a string, a list...), as printed
    built_chars: int = 64_000_000     # all the values it makes, together


DEFAULT_LIMITS = TemplateLimits()
_WIDTH = re.compile(r"\d{7,}")  # a run of digits in a format string: a width or precision of 10^6 and more
_MAX_DEPTH = 64


def _size(v, memo: dict, depth: int = 0) -> int:
    """Characters `v` prints as, about: strings by length, containers by their items (each counted as
    often as it appears, so shared ones are not free), anything else as a few."""
    if isinstance(v, (str, bytes)):
        return len(v)
    if not isinstance(v, (list, tuple, dict, set, frozenset)):
        return 8
    key = id(v)
    if key in memo:
        return memo[key]
    if depth > _MAX_DEPTH:
        raise GenerationError(f"chat template: a value nests more than {_MAX_DEPTH} levels deep")
    items = [x for kv in v.items() for x in kv] if isinstance(v, dict) else v
    n = memo[key] = 2 + sum(_size(x, memo, depth + 1) + 4 for x in items)  # quotes, comma, space
    return n


class _Codegen(CodeGenerator):
    """Jinja's code generator, with `~` and list, tuple and dict literals checked by the environment."""

    def visit_Concat(self, node, frame):
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _checked(self, visit, node, frame):
        if getattr(node, "ctx", "load") != "load":  # an assignment target
            return visit(node, frame)
        self.write("environment.checked(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._checked(super().visit_List, node, frame)

    def visit_Tuple(self, node, frame):
        self._checked(super().visit_Tuple, node, frame)

    def visit_Dict(self, node, frame):
        self.write("environment.checked(")
        super().visit_Dict(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox whose renderings stay within `limits` (one environment per rendering: the
    clock and the count of characters built start when it is made)."""

    code_generator_class = _Codegen
    intercepted_binops = frozenset(["*", "+", "**", "%"])

    def __init__(self, limits: TemplateLimits = DEFAULT_LIMITS, **options):
        super().__init__(**options)
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.built = 0
        self._known: dict = {}  # sizes of the rendering's variables, which live as long as it does
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # ------------------------------------------------------------------------------------ checks
    def tick(self):
        if time.monotonic() > self.deadline:
            raise GenerationError(f"chat template: rendering took more than {self.limits.seconds:g} s")

    def _memo(self):
        return ChainMap({}, self._known)

    def _fail(self, what: str, n: int):
        raise GenerationError(f"chat template: {what} would make a value of about {n:,} characters, more than "
                              f"the limit of {self.limits.value_chars:,}")

    def _expect(self, what: str, n: int):
        """A value of about n characters is about to be made."""
        if n > self.limits.value_chars:
            self._fail(what, n)

    def checked(self, value, what="a literal"):
        """A value the template made: within the size of one value and the total built so far."""
        self.tick()
        n = _size(value, self._memo())
        self._expect(what, n)
        self.built += n
        if self.built > self.limits.built_chars:
            raise GenerationError(f"chat template: it built more than {self.limits.built_chars:,} characters "
                                  f"of values in all")
        return value

    def _check_args(self, what, args, kwargs):
        self.tick()
        memo = self._memo()
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.value_chars:
                self._fail(f"{what} with argument {a}", abs(a))
            self._expect(f"{what} of a value", _size(a, memo))

    def checked_concat(self, parts):
        memo = self._memo()
        self._expect("'~'", sum(_size(p, memo) for p in parts))
        return self.checked("".join([str(p) for p in parts]), "'~'")

    # ------------------------------------------------------------------------------------ hooks
    def call_binop(self, context, operator, left, right):
        self.tick()
        memo = self._memo()
        sl, sr = _size(left, memo), _size(right, memo)
        if operator == "*" and isinstance(right, int) and not isinstance(left, (int, float)):
            self._expect("'*'", sl * max(right, 0))
        elif operator == "*" and isinstance(left, int) and not isinstance(right, (int, float)):
            self._expect("'*'", sr * max(left, 0))
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            self._expect("'*'", (abs(left).bit_length() + abs(right).bit_length()) // 3)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            self._expect("'**'", abs(left).bit_length() * max(right, 0) // 3)
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right)
        self._expect(f"'{operator}'", sl + sr)
        return self.checked(super().call_binop(context, operator, left, right), f"'{operator}'")

    def _check_format(self, fmt: str, args):
        m = _WIDTH.search(fmt)
        if m:
            self._fail(f"a format with width {m.group()}", int(m.group()))
        self._check_args("a format", args if isinstance(args, tuple) else (args,), {})

    def wrap_str_format(self, value):
        f = super().wrap_str_format(value)
        if f is not None:
            self._check_format(value.__self__, ())
        return f

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's spelling)
        what = f"calling {getattr(__obj, '__name__', type(__obj).__name__)}"
        owner = getattr(__obj, "__self__", None)
        __self._check_args(what, args if owner is None else (owner, *args), kwargs)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            __self._expect(what, _replaced(owner, args[0], args[1]))
        elif isinstance(owner, str) and name == "join" and args:
            items = list(args[0])
            __self._expect(what, sum(_size(x, {}) for x in items) + len(owner) * len(items))
            args = (items, *args[1:])
        return __self.checked(super().call(__context, __obj, *args, **kwargs), what)

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def _bounded_filter(self, name, f):
        passes_context = getattr(f, "jinja_pass_arg", None) is not None
        what = f"the {name} filter"

        @wraps(f)
        def bounded(*args, **kwargs):
            head, args = (args[:1], args[1:]) if passes_context else ((), args)
            if args and name in ("join", "sum") and not isinstance(args[0], (str, list, tuple, dict)):
                args = (list(args[0]), *args[1:])  # a generator: measured before it is joined
            self._check_args(what, args, kwargs)
            if args:
                self._expect(what, _filter_estimate(name, args, kwargs, self.limits))
            return self.checked(f(*head, *args, **kwargs), what)
        return bounded

    # ------------------------------------------------------------------------------------ rendering
    def render_bounded(self, source: str, **variables) -> str:
        """Render `source` in chunks, stopping once the output passes `limits.output_chars`."""
        out, n = [], 0
        _size(variables, self._known)
        for chunk in self.from_string(source).generate(**variables):
            self.tick()
            n += len(chunk)
            if n > self.limits.output_chars:
                raise GenerationError(f"chat template: the rendered prompt passes the limit of "
                                      f"{self.limits.output_chars:,} characters")
            out.append(chunk)
        return "".join(out)


def _replaced(s, old, new) -> int:
    if not isinstance(s, str) or not isinstance(old, str) or not isinstance(new, str):
        return 0
    return len(s) + (len(s) // max(len(old), 1) + 1) * len(new)


def _filter_estimate(name, args, kwargs, limits) -> int:
    """The size of a filter's result, for the filters whose result can be far larger than their input."""
    value, rest = args[0], list(args[1:]) + list(kwargs.values())
    if name == "replace" and len(rest) >= 2:
        return _replaced(value, rest[0], rest[1])
    if name == "indent" and isinstance(value, str):
        width = rest[0] if rest else 4
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * width
    if name == "tojson":
        indent = rest[0] if rest and isinstance(rest[0], int) else 0
        return _size(value, {}) * (1 + indent * _depth(value))
    if name == "join" and isinstance(value, (list, tuple)):
        sep = rest[0] if rest and isinstance(rest[0], str) else ""
        return sum(_size(x, {}) for x in value) + len(sep) * len(value)
    if name == "format" and isinstance(value, str):
        m = _WIDTH.search(value)
        return int(m.group()) if m else 0
    return 0


def _depth(v, d=0) -> int:
    if d > _MAX_DEPTH or not isinstance(v, (list, tuple, dict)):
        return d
    items = v.values() if isinstance(v, dict) else v
    return max((_depth(x, d + 1) for x in items), default=d + 1)
