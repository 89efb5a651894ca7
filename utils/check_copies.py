"""Prove that the blocks train_dopsd_full.py shares with train_dopsd_lora.py are still identical.

A shared block in the copy is a top-level function, class or assignment preceded by the marker line

    # Copied from train_dopsd_lora.NAME

and must equal the block NAME of train_dopsd_lora.py character for character (diffusers' "# Copied from"
convention). Nobody edits a copy by hand: change the source, then run

    python utils/check_copies.py --fix      # rewrite every copy from its source
    python utils/check_copies.py            # exit 1, naming each drifted block, if any copy differs
"""

import argparse
import ast
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)\s*$")


def top_level_blocks(source):
    """name -> (first line, last line), 0-based inclusive, decorators included, for top-level defs and assignments."""
    blocks = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            first = node.lineno - 1
        else:
            continue
        for name in names:
            blocks[name] = (first, node.end_lineno - 1)
    return blocks


def check_copies(copy_path, fix=False, root=ROOT):
    """Problems found in one copying file (an empty list when every copy matches); with fix, rewrite the copies."""
    copy_path = Path(copy_path)
    lines = copy_path.read_text().splitlines(keepends=True)
    copy_blocks = top_level_blocks("".join(lines))
    problems, replacements = [], []
    sources = {}
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        module, name = match.groups()
        if module not in sources:
            source_file = Path(root) / f"{module}.py"
            if not source_file.exists():
                problems.append(f"{copy_path.name}:{index + 1}: no source file {module}.py")
                continue
            text = source_file.read_text()
            sources[module] = (text.splitlines(keepends=True), top_level_blocks(text))
        source_lines, source_blocks = sources[module]
        if name not in source_blocks:
            problems.append(f"{copy_path.name}:{index + 1}: {module}.py defines no top-level {name}")
            continue
        block = next(((first, last) for block_name, (first, last) in copy_blocks.items()
                      if first == index + 1 and block_name == name), None)
        if block is None:
            problems.append(f"{copy_path.name}:{index + 1}: the marker for {name} is not followed by {name}")
            continue
        first, last = source_blocks[name]
        expected = source_lines[first: last + 1]
        if lines[block[0]: block[1] + 1] != expected:
            problems.append(f"{copy_path.name}:{index + 2}: {name} differs from {module}.{name}")
            replacements.append((block, expected))
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
        print(("fixed: " if args.fix else "") + problem)
    if problems and not args.fix:
        print("run `python utils/check_copies.py --fix` to rewrite the copies from their sources")
        sys.exit(1)
    if not problems:
        print("all copies match their sources")


if __name__ == "__main__":
    main()
