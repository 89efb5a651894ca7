"""Prove that train_dopsd_full.py shares every line it has in common with train_dopsd_lora.py, unchanged.

The copy contract, for each top-level statement of the copy (train_dopsd_full.py) against its source
(train_dopsd_lora.py):

- A function, class or assignment whose name the source also defines is preceded by one marker line:

      # Copied from train_dopsd_lora.NAME        it must equal the source's NAME character for character
      # Own version of train_dopsd_lora.NAME     it differs on purpose (what full fine-tuning does differently)

  A name only the copy defines (resolve_trainable) needs no marker. The marked copies are diffusers' "# Copied
  from" convention; the second marker makes every other shared name a visible decision.
- Every name it imports, the source imports from the same module under the same name (the copy may import fewer).
- Every other statement (the --help shortcut, logging setup, `if __name__ == "__main__"`) appears in the source
  too, the same and in the same order. The module docstring is the copy's own.

Nobody edits a copy by hand: change the source, then run

    python utils/check_copies.py --fix      # rewrite every "Copied from" block from its source
    python utils/check_copies.py            # exit 1, naming each broken rule, if any
"""

import argparse
import ast
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# (Copied from|Own version of) (\w+)\.(\w+)\s*$")


def block_names(node):
    """The names a top-level statement defines (def, class, assignment), else []."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []


def top_level_blocks(source):
    """name -> (first line, last line), 0-based inclusive, decorators included, for top-level defs and assignments."""
    blocks = {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        for name in block_names(node):
            blocks[name] = (first, node.end_lineno - 1)
    return blocks


def imported_names(tree):
    """{name bound by an import: (module, imported name)} for the top-level imports of a module."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (alias.name if alias.asname else
                                                                    alias.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                names[alias.asname or alias.name] = ("." * node.level + (node.module or ""), alias.name)
    return names


def other_statements(tree):
    """The top-level statements that are neither imports, definitions nor the module docstring, as comparable text."""
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return [(node.lineno, ast.dump(node)) for node in body
            if not isinstance(node, (ast.Import, ast.ImportFrom)) and not block_names(node)]


def check_copies(copy_path, fix=False, root=ROOT):
    """Problems found in one copying file (an empty list when it keeps the contract); with fix, rewrite the
    "Copied from" blocks from their sources (the other rules need a person's decision)."""
    copy_path = Path(copy_path)
    text = copy_path.read_text()
    lines = text.splitlines(keepends=True)
    copy_tree = ast.parse(text)
    copy_blocks = top_level_blocks(text)
    problems, replacements, marked = [], [], set()
    sources = {}
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        kind, module, name = match.groups()
        if module not in sources:
            source_file = Path(root) / f"{module}.py"
            if not source_file.exists():
                problems.append(f"{copy_path.name}:{index + 1}: no source file {module}.py")
                continue
            source_text = source_file.read_text()
            sources[module] = (source_text.splitlines(keepends=True), top_level_blocks(source_text),
                               ast.parse(source_text))
        source_lines, source_blocks, _ = sources[module]
        if name not in source_blocks:
            problems.append(f"{copy_path.name}:{index + 1}: {module}.py defines no top-level {name}")
            continue
        block = copy_blocks.get(name)
        if block is None or block[0] != index + 1:
            problems.append(f"{copy_path.name}:{index + 1}: the marker for {name} is not followed by {name}")
            continue
        marked.add(name)
        if kind == "Own version of":
            continue
        first, last = source_blocks[name]
        expected = source_lines[first: last + 1]
        if lines[block[0]: block[1] + 1] != expected:
            problems.append(f"{copy_path.name}:{index + 2}: {name} differs from {module}.{name}")
            replacements.append((block, expected))

    source_module = "train_dopsd_lora"
    if source_module not in sources:
        source_text = (Path(root) / f"{source_module}.py").read_text()
        sources[source_module] = (None, top_level_blocks(source_text), ast.parse(source_text))
    _, source_blocks, source_tree = sources[source_module]
    for name, (first, _) in sorted(copy_blocks.items(), key=lambda item: item[1]):
        if name in source_blocks and name not in marked:
            problems.append(f"{copy_path.name}:{first + 1}: {name} is also defined in {source_module}.py: mark it"
                            f" '# Copied from {source_module}.{name}' or '# Own version of {source_module}.{name}'")
    source_imports = imported_names(source_tree)
    for name, origin in imported_names(copy_tree).items():
        if source_imports.get(name) != origin:
            module, imported = origin
            what = f"from {module} import {imported}" if imported else f"import {module}"
            problems.append(f"{copy_path.name}: '{what}' (as {name}) is not imported so by {source_module}.py")
    source_statements = [dump for _, dump in other_statements(source_tree)]
    position = 0
    for line_number, dump in other_statements(copy_tree):
        try:
            position = source_statements.index(dump, position) + 1
        except ValueError:
            problems.append(f"{copy_path.name}:{line_number}: this statement is not in {source_module}.py (or not"
                            " in the same order)")

    if fix and replacements:
        for (first, last), expected in sorted(replacements, reverse=True):
            lines[first: last + 1] = expected
        copy_path.write_text("".join(lines))
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    parser.add_argument("files", nargs="*", default=[ROOT / "train_dopsd_full.py"])
    args = parser.parse_args()
    problems = [p for path in args.files for p in check_copies(path, fix=args.fix)]
    for problem in problems:
        print(("fixed: " if args.fix and " differs from " in problem else "") + problem)
    if problems and not args.fix:
        print("run `python utils/check_copies.py --fix` to rewrite the copies from their sources")
        sys.exit(1)
    if not problems:
        print("all copies match their sources")


if __name__ == "__main__":
    main()
