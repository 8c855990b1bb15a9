"""The package's imports flow one way: entry points -> training / evaluation / conversion -> the
model and state factory -> models, pruning, ssm -> kernels. A cycle, even one held together by
an import inside a function, fails here."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "toppax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imported(node, module: str, is_package: bool) -> list[str]:
  """Dotted names an import statement may load (for ``from a import b``: ``a`` and ``a.b``)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ""
  if node.level:
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - node.level + 1]
    base = ".".join(package + ([base] if base else []))
  return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
  """``{module: modules it imports}`` over every import statement, at module level or inside
  functions. Importing ``a.b.c`` also runs the ``a.b`` package's ``__init__``."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target in _imported(node, name, path.name == "__init__.py"):
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if not target or not target.startswith(PACKAGE + "."):
          continue
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
          dep = ".".join(parts[:i])
          # A module's own package is running already when the module is imported.
          if dep in modules and dep != name and not name.startswith(dep + "."):
            deps.add(dep)
    graph[name] = deps
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = 0
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      v, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[v] = min(low[v], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        component = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          component.append(w)
          if w == v:
            break
        if len(component) > 1:
          out.append(sorted(component))
  return out


def _path(graph, component):
  """One cycle through ``component``, for the failure message."""
  start = component[0]
  members = set(component)
  path, seen = [start], {start}
  while True:
    nxt = next(d for d in sorted(graph[path[-1]]) if d in members)
    if nxt in seen:
      return " -> ".join(path[path.index(nxt):] + [nxt])
    path.append(nxt)
    seen.add(nxt)


def test_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert _path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
  graph = import_graph()
  # toppax.main imports the work it dispatches to inside main(): those edges must be seen.
  assert "toppax.train" in graph["toppax.main"]
  assert "toppax.models" in graph["toppax.factory"]


def test_no_import_cycles():
  graph = import_graph()
  found = [_path(graph, c) for c in cycles(graph)]
  assert not found, "import cycles in toppax:\n  " + "\n  ".join(found)
