"""Writes the source of a Triton kernel from Python that reads like the computation.

The scan kernels are unrolled over their states (n separate ``(BD,)`` vectors per thread) and
over the steps of a checkpoint interval. Triton's language has no list of tensors that a loop
can carry, so ``triton_kernels`` runs the kernel's algorithm in Python once per static
configuration over ``Value``s, each of which names one Triton variable: arithmetic on them
appends an assignment to the source (``v12 = v3 * v7``), and ``Src.fori`` writes a ``for`` loop
whose loop-carried variables are the carry's leaves. The result is straight-line Triton code with
one name per value, compiled by ``triton.jit`` from source that ``Src.function`` registers with
``linecache`` (``triton.jit`` and Triton's interpreter read a kernel's source with ``inspect``).
"""
from __future__ import annotations

import itertools
import linecache

import jax


class Value:
  """One variable of the kernel under construction; arithmetic appends its result."""

  __slots__ = ("src", "name")

  def __init__(self, src, name):
    self.src, self.name = src, name

  def __str__(self):
    return self.name

  def _op(self, op, other, reverse=False):
    a, b = (other, self) if reverse else (self, other)
    return self.src.let(f"{lit(a)} {op} {lit(b)}")

  def __add__(self, o): return self._op("+", o)
  def __radd__(self, o): return self._op("+", o, True)
  def __sub__(self, o): return self._op("-", o)
  def __rsub__(self, o): return self._op("-", o, True)
  def __mul__(self, o): return self._op("*", o)
  def __rmul__(self, o): return self._op("*", o, True)
  def __floordiv__(self, o): return self._op("//", o)
  def __and__(self, o): return self._op("&", o)
  def __rand__(self, o): return self._op("&", o, True)
  def __xor__(self, o): return self._op("^", o)
  def __rxor__(self, o): return self._op("^", o, True)
  def __lt__(self, o): return self._op("<", o)
  def __gt__(self, o): return self._op(">", o)
  def __neg__(self): return self.src.let(f"-{self.name}")

  def __bool__(self):
    raise TypeError(f"{self.name} is a value of the kernel, not of the Python that writes it")


def lit(x) -> str:
  """A Value's name or a Python constant as Triton source (floats keep every digit)."""
  if isinstance(x, Value):
    return x.name
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    raise TypeError(f"not a kernel value or number: {x!r}")
  return repr(x)


def is_static(x) -> bool:
  return not isinstance(x, Value)


class Src:
  """The body of one kernel function, built line by line."""

  def __init__(self):
    self.lines = []
    self.depth = 1
    self._ids = itertools.count()

  def emit(self, line):
    self.lines.append("    " * self.depth + line)

  def let(self, expr, prefix="v"):
    """A new variable holding ``expr`` (Triton source)."""
    name = f"{prefix}{next(self._ids)}"
    self.emit(f"{name} = {expr}")
    return Value(self, name)

  def call(self, fn, *args, **kwargs):
    """``fn(args..., key=value...)`` with Values and numbers as arguments; strings pass as they
    are (Triton source: a dtype, a constant)."""
    text = [a if isinstance(a, str) else lit(a) for a in args]
    text += [f"{k}={v if isinstance(v, str) else lit(v)}" for k, v in kwargs.items()]
    return self.let(f"{fn}({', '.join(text)})")

  # Static ints fold in Python, so unrolled code keeps constant indices.
  def minimum(self, a, b):
    return min(a, b) if is_static(a) and is_static(b) else self.call("tl.minimum", a, b)

  def maximum(self, a, b):
    return max(a, b) if is_static(a) and is_static(b) else self.call("tl.maximum", a, b)

  def where(self, cond, a, b):
    return self.call("tl.where", cond, a, b)

  def fori(self, lo, hi, body, carry):
    """A Triton ``for`` loop over ``range(lo, hi)`` (ints): ``body(i, carry) -> carry``, where
    carry is a pytree of Values (lists, tuples, dicts; None leaves nothing). Its leaves become
    the loop-carried variables; returns the carry after the loop."""
    if hi <= lo:
      return carry
    leaves, tree = jax.tree_util.tree_flatten(carry)
    names = [self.let(lit(v), "c").name for v in leaves]
    index = f"i{next(self._ids)}"
    self.emit(f"for {index} in range({lo}, {hi}):")
    self.depth += 1
    inside = jax.tree_util.tree_unflatten(tree, [Value(self, n) for n in names])
    out = jax.tree_util.tree_leaves(body(Value(self, index), inside))
    if len(out) != len(names):
      raise ValueError(f"loop body returned {len(out)} values for a carry of {len(names)}")
    # A carried variable that moves to another slot (a queue shifting) is copied first, so
    # that no assignment below overwrites a value that a later one still reads.
    out = [self.let(v.name) if isinstance(v, Value) and v.name in names else v for v in out]
    for name, value in zip(names, out):
      self.emit(f"{name} = {lit(value)}")
    self.depth -= 1
    return jax.tree_util.tree_unflatten(tree, [Value(self, n) for n in names])

  def function(self, name, params, tag):
    """The kernel as a Python function ``name(*params)`` whose source ``inspect`` can read (it
    is registered with ``linecache`` under a file name that carries ``tag``)."""
    import triton
    import triton.language as tl
    text = "\n".join([f"def {name}({', '.join(params)}):"] + self.lines) + "\n"
    filename = f"<toppax triton kernel {name} {tag}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    scope = {"tl": tl, "triton": triton, "__name__": "toppax_triton_kernels"}
    exec(compile(text, filename, "exec"), scope)   # noqa: S102 - source written above
    fn = scope[name]
    fn.toppax_source = text
    return fn
