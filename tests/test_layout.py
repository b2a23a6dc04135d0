"""The layout that docs/architecture.md describes holds: models/ imports neither
train/ nor data/, data/ imports no model, nothing in the library imports
benchmarks/ or research/, and every Task family registers its tasks."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(), str(path))
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


@pytest.mark.parametrize("package, forbidden", [
    ("mmjax/models", ("mmjax.train", "mmjax.data")),
    ("mmjax/data", ("mmjax.models", "mmjax.train")),
    ("mmjax", ("benchmarks", "research", "experiments")),
])
def test_imports_point_one_way(package, forbidden):
  bad = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    hits = sorted(m for m in _imports(path)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))
    if hits:
      bad[str(path.relative_to(ROOT))] = hits
  assert not bad, f"imports against the layout of docs/architecture.md: {bad}"


def test_every_family_registers_its_tasks():
  from mmjax.train import tasks
  assert {"clip", "vit", "convnet", "mae", "lm", "llava"} <= set(tasks.TASKS)
  for name, cls in tasks.TASKS.items():
    for member in ("init", "loss", "batch_spec", "train_batches", "evaluate",
                   "flops_per_example"):
      assert callable(getattr(cls, member, None)), (name, member)
  with pytest.raises(ValueError, match="unknown task 'nope'.*known"):
    tasks.build_task(type("C", (), {"task": "nope"})())


def _pages():
  return [ROOT / "README.md", ROOT / "BUILD.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_link_only_to_what_exists():
  """Every relative link and picture of README, BUILD.md and docs/ names a file
  of the repository, and every `python -m NAME` they show is a module here."""
  import importlib.util
  import re
  missing = []
  for page in _pages():
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if target.startswith(("http://", "https://", "#")):
        continue
      path = (page.parent / target.split("#")[0]).resolve()
      if not path.exists():
        missing.append(f"{page.relative_to(ROOT)} -> {target}")
    for module in set(re.findall(r"python -m ([\w.]+)", text)):
      if module not in ("venv", "pip", "pytest") and importlib.util.find_spec(module) is None:
        missing.append(f"{page.relative_to(ROOT)}: python -m {module}")
  assert not missing, missing


def test_no_page_labels_a_number_with_its_run():
  """Outside research/, numbers carry their command and machine, not the run
  that made them; and nothing points to design files outside the repository."""
  import re
  bad = []
  for path in [*_pages(), *sorted(ROOT.glob("mmjax/**/*.py")), *sorted(ROOT.glob("benchmarks/*"))]:
    if path.is_file():
      for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
        if (re.search(r"(?i)\bsession \d", line)
            or re.search(r"\b(ARCHITECTURE|REFERENCE|STYLE)\.md", line)):
          bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
  assert not bad, bad
