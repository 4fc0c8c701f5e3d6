"""transformers' chat-template sandbox with a budget: what one render may run and build.

Jinja's sandbox stops escapes, not cost: `{% for i in range(100000) %}{% for j in range(100000) %}` runs for hours,
`'a' * 8000000000` or `x.center(10**10)` asks for gigabytes. A model directory is input like any other, so every render
here is bounded: loop iterations and calls (the only ways a template repeats work), wall time as a backstop, and the
size of every string or list an operator, call, filter, `~` or the output builds.
Exceeding the budget raises `RenderBudgetError`.
"""

import functools
import re
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterable, Sized

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A rendering of any real conversation is far below 16 M characters; one that reaches it is a template blowing up.
MAX_CHARS = 1 << 24
# Loop iterations and calls one render may run: a 100-turn conversation through a real chat template runs hundreds.
MAX_STEPS = 1 << 20
MAX_SECONDS = 10.0


class RenderBudgetError(Exception):
    """A render ran too long or built something too large."""


class _Budget(threading.local):
    """The steps and deadline left to the render running in this thread (none outside `budget()`)."""

    steps: int | None = None
    lines: int = 0
    seconds: float = 0.0
    deadline: float = 0.0

    def spend(self) -> None:
        if self.steps is None:
            return
        self.steps -= 1
        if self.steps < 0:
            raise RenderBudgetError(f"it runs more than {self.lines:,} loop iterations and calls")
        if self.steps % 4096 == 0 and time.monotonic() > self.deadline:
            raise RenderBudgetError(f"it runs longer than {self.seconds:g} s")


_BUDGET = _Budget()


def _counted(items):
    """A loop's items, each one step of the render's budget."""
    for item in items:
        _BUDGET.spend()
        yield item


@contextmanager
def budget(steps: int = MAX_STEPS, seconds: float = MAX_SECONDS):
    """Bound the loop iterations, calls and wall time of the renders inside this block (in this thread)."""
    saved = (_BUDGET.steps, _BUDGET.lines, _BUDGET.seconds, _BUDGET.deadline)
    _BUDGET.steps, _BUDGET.lines, _BUDGET.seconds, _BUDGET.deadline = steps, steps, seconds, time.monotonic() + seconds
    try:
        yield
    finally:
        _BUDGET.steps, _BUDGET.lines, _BUDGET.seconds, _BUDGET.deadline = saved


def _too_large(size: int, what: str, unit: str = "items") -> None:
    if size > MAX_CHARS:
        raise RenderBudgetError(f"it builds {what} of {size:,} {unit} (the bound is {MAX_CHARS:,})")


def _check_number(value: object) -> None:
    """An integer argument is a size or width somewhere (center, ljust, indent, truncate…): bound it."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
        raise RenderBudgetError(f"it passes {value:.3g} as a size (the bound is {MAX_CHARS:,})")


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)\}")


def _check_format(fmt: str) -> None:
    """Widths and precisions written into a %- or {}-format string ('%9999999999s', '{:>9999999999}')."""
    numbers = [n for field in _PERCENT_FIELD.findall(fmt) for n in field if n]
    numbers += [n for spec in _BRACE_SPEC.findall(fmt) for n in re.findall(r"\d+", spec)]
    for number in numbers:
        _check_number(int(number[:12]))


def _length(value: object) -> int:
    return len(value) if isinstance(value, Sized) else 0


def _check_grown(name: str, base: object, args: tuple, kwargs: dict) -> None:
    """The result sizes of the string operations that multiply their input (replace, join, expandtabs)."""
    if not isinstance(base, str):
        return
    if name in ("replace", "expandtabs"):
        new = args[1] if name == "replace" and len(args) > 1 else kwargs.get("new", " ")
        tab = args[0] if name == "expandtabs" and args else kwargs.get("tabsize", 8)
        grow = _length(new) if name == "replace" else (tab if isinstance(tab, int) else 8)
        _too_large(len(base) * max(grow, 1) + len(base), "a string")
    elif name in ("format", "format_map"):
        _check_format(base)
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        _too_large(sum(map(_length, args[0])) + len(base) * len(args[0]), "a string")


def _bounded_filter(name: str, function):
    """A Jinja filter whose size arguments, format string or joined/replaced result are bounded."""
    @functools.wraps(function)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            _check_number(value)
        values = [a for a in args if isinstance(a, (str, list, tuple, dict))]
        if values and name == "format":
            _check_format(values[0])
        elif values and name == "replace" and len(values) >= 3:
            _check_grown("replace", str(values[0]), tuple(values[1:3]), {})
        elif values and name == "join":
            items = list(values[0]) if isinstance(values[0], (list, tuple)) else []
            separator = values[1] if len(values) > 1 and isinstance(values[1], str) else ""
            _check_grown("join", separator, (items,), {})
        return function(*args, **kwargs)
    return bounded


class _BoundedCodeGenerator(CodeGenerator):
    """Every `for` loop's items are counted against the budget, and `a ~ b` joins through the environment's bounded
    join (Jinja's own `str_join` has no hook)."""

    def visit_For(self, node, frame) -> None:
        counted = nodes.Call(nodes.EnvironmentAttribute("counted"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(nodes.For(node.target, counted, node.body, node.else_, node.test, node.recursive,
                                    lineno=node.lineno), frame)

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded_concat(parts: Iterable) -> str:
    """`"".join` of the pieces as strings, refusing once they pass MAX_CHARS (the output, macro bodies, `~`)."""
    out, size = [], 0
    for part in parts:
        text = str(part)
        size += len(text)
        _too_large(size, "a text")
        out.append(text)
    return "".join(out)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' immutable sandbox whose operators, calls, filters and joins refuse to build more than
    MAX_CHARS; `budget()` bounds the steps and time of one render."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator
    concat = staticmethod(_bounded_concat)
    counted = staticmethod(_counted)

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context, operator: str, left, right):
        """`*`, `**`, `+` and `%` with their result size checked before it is built."""
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _too_large(len(seq) * max(times, 0), "a repetition")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            _too_large(abs(left).bit_length() * max(right, 0) // 8, "a number", "bytes")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _too_large(len(left) + len(right), "a sequence")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            for value in right if isinstance(right, tuple) else (right,):
                _check_number(value)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        """A call (one step of the budget) whose size arguments and, for string methods that multiply their input,
        result are bounded."""
        _BUDGET.spend()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level: its items are counted too
            args = (_counted(args[0]), *args[1:])
        for value in (*args, *kwargs.values()):
            _check_number(value)
        method = getattr(__obj, "__wrapped__", __obj)
        _check_grown(getattr(method, "__name__", ""), getattr(method, "__self__", None), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)
