"""Summarise a mutmut 3 run: killed / survived / timeout ... and the mutation score.

Reads the meta files mutmut writes next to each mutated module (``mutants/**/*.py.meta``), so it
needs no running mutmut and works on a half-finished run (unchecked mutants are counted apart).

    python mutation_report.py                       # counts and score
    python mutation_report.py --list survived       # each survivor: file:line, diff, stable key
    python mutation_report.py --fail-under 95       # exit 1 when the score is lower

score = killed / (total - equivalent). A timeout is not a kill in this score unless
``--count-timeouts`` is given (mutmut's own score counts it as one; always shown as "detected").
Mutants listed in the equivalents file (default ``mutation_equivalents.txt``) are left out of the
total when no test detected them. One entry a line, ``KEY REASON...``; KEY is a mutant id
(``domain.job.xǁGenerationJobǁ_fail__mutmut_3``, valid until the function changes) or the stable
key that ``--list`` prints (``domain/job.py:GenerationJob._fail:1a2b3c4d``: a hash of the changed
lines before and after, so it survives edits elsewhere). ``#`` lines and blank lines are ignored.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# mutmut 3.8 exit code -> status (mutmut/stats.py); anything else is "suspicious".
STATUS_BY_EXIT_CODE = {
    1: "killed",
    3: "killed",
    37: "killed",  # caught by the type checker (none is configured here)
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    -11: "segfault",
    -9: "segfault",
    2: "interrupted",
    None: "not checked",
}
ORDER = [
    "killed",
    "survived",
    "timeout",
    "suspicious",
    "no tests",
    "skipped",
    "segfault",
    "interrupted",
    "not checked",
]
SEPARATOR = "ǁ"  # mutmut's class separator in mangled names
EQUIVALENT_STATUSES = ("survived", "no tests")  # a detected mutant is never equivalent


@dataclass
class Mutant:
    """One mutant and where it lies in the original source."""

    mutant_id: str
    source: Path  # e.g. domain/job.py
    status: str
    qualname: str = ""
    line: int | None = None
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    stable_key: str = ""


def status_of(code: int | None) -> str:
    """The status mutmut shows for an exit code."""
    return STATUS_BY_EXIT_CODE.get(code, "suspicious")


def split_id(mutant_id: str) -> tuple[str, str, int]:
    """``domain.job.xǁGenerationJobǁ_fail__mutmut_3`` -> (module, mangled name, number)."""
    module, _, name = mutant_id.rpartition(".")  # a mangled name never contains a dot
    mangled, _, number = name.rpartition("__mutmut_")
    return module, mangled, int(number)


def qualname_of(mangled: str) -> str:
    """``xǁGenerationJobǁ_fail`` -> ``GenerationJob._fail``; ``x_encode_png`` -> ``encode_png``."""
    if mangled.startswith("x" + SEPARATOR):
        _, cls, method = mangled.split(SEPARATOR, 2)
        return f"{cls}.{method}"
    return mangled[2:]


def functions_by_name(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method of a module by name, and methods also as ``Class.method``."""
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[item.name] = item
                    found[f"{node.name}.{item.name}"] = item
    return found


def diff_bodies(mutant: Mutant, original: list[str], mutated: list[str]) -> int | None:
    """Record the changed lines below the ``def`` line; the index of the first, None if none."""
    matcher = difflib.SequenceMatcher(a=original[1:], b=mutated[1:], autojunk=False)
    first_changed = None
    for tag, a_start, a_end, b_start, b_end in matcher.get_opcodes():
        if tag == "equal":
            continue
        if first_changed is None:
            first_changed = a_start
        mutant.removed += [line.strip() for line in original[1:][a_start:a_end]]
        mutant.added += [line.strip() for line in mutated[1:][b_start:b_end]]
    return first_changed


class SourceIndex:
    """Parsed original and mutated files, to locate each mutant's change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, tuple[list[str], dict]] = {}

    def _parsed(self, path: Path) -> tuple[list[str], dict]:
        if path not in self._cache:
            text = path.read_text(encoding="utf-8")
            self._cache[path] = (text.splitlines(), functions_by_name(ast.parse(text)))
        return self._cache[path]

    def _segment(self, path: Path, name: str) -> list[str] | None:
        """The lines of a function from its ``def`` line (decorators left out) to its end."""
        lines, functions = self._parsed(path)
        node = functions.get(name)
        if node is None:
            return None
        return lines[node.lineno - 1 : node.end_lineno]

    def locate(self, mutant: Mutant) -> None:
        """Fill in qualname, the changed lines, the original line number and the stable key."""
        _, mangled, _ = split_id(mutant.mutant_id)
        mutant.qualname = qualname_of(mangled)
        mutated_file = self.root / "mutants" / mutant.source
        suffix = mutant.mutant_id.rpartition(".")[2]
        try:
            original = self._segment(mutated_file, f"{mangled}__mutmut_orig")
            mutated = self._segment(mutated_file, suffix)
        except (OSError, SyntaxError):
            original = mutated = None
        if original is None or mutated is None:
            mutant.stable_key = f"{mutant.source}:{mutant.qualname}:?"
            return
        first_changed = diff_bodies(mutant, original, mutated)
        if first_changed is None:  # the change is on the def line itself (a default value)
            first_changed = -1
            name = mutant.qualname.rpartition(".")[2]
            mutant.removed = [original[0].strip().replace(f"{mangled}__mutmut_orig", name)]
            mutant.added = [mutated[0].strip().replace(suffix, name)]
        try:
            source_functions = self._parsed(self.root / mutant.source)[1]
            node = source_functions.get(mutant.qualname)
            if node is not None:
                mutant.line = node.lineno + 1 + first_changed
        except (OSError, SyntaxError):
            pass
        digest = hashlib.sha1(
            ("\n".join(mutant.removed) + "\n=>\n" + "\n".join(mutant.added)).encode()
        ).hexdigest()[:8]
        mutant.stable_key = f"{mutant.source}:{mutant.qualname}:{digest}"


def load_mutants(root: Path) -> list[Mutant]:
    """Every mutant recorded under ``root/mutants``."""
    mutants: list[Mutant] = []
    base = root / "mutants"
    for meta_path in sorted(base.rglob("*.py.meta")):
        source = meta_path.relative_to(base).with_suffix("")  # drop .meta
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for mutant_id, code in meta["exit_code_by_key"].items():
            mutants.append(Mutant(mutant_id=mutant_id, source=source, status=status_of(code)))
    return mutants


def load_equivalents(path: Path) -> dict[str, str]:
    """KEY -> reason from the equivalents file (empty when it does not exist)."""
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, reason = line.partition(" ")
        if not reason.strip():
            print(f"warning: {path}:{number}: {key} has no reason", file=sys.stderr)
        entries[key] = reason.strip()
    return entries


def disambiguate(mutants: list[Mutant]) -> None:
    """Two identical changes in one function get #2, #3... so every stable key is unique."""
    seen: Counter[str] = Counter()
    for mutant in sorted(mutants, key=lambda m: split_id(m.mutant_id)[2]):
        seen[mutant.stable_key] += 1
        if seen[mutant.stable_key] > 1:
            mutant.stable_key += f"#{seen[mutant.stable_key]}"


def locate_all(root: Path, mutants: list[Mutant]) -> None:
    """Line, diff and stable key of every mutant."""
    index = SourceIndex(root)
    by_function: defaultdict[tuple[Path, str], list[Mutant]] = defaultdict(list)
    for mutant in mutants:
        index.locate(mutant)
        by_function[(mutant.source, mutant.qualname)].append(mutant)
    for group in by_function.values():
        disambiguate(group)


@dataclass
class Equivalents:
    """The mutants the equivalents file takes out of the total, and its entries that do not fit."""

    mutants: list[Mutant] = field(default_factory=list)
    detected: list[Mutant] = field(default_factory=list)  # listed, yet killed or timed out
    unmatched: list[str] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        """Ids of the mutants taken out of the total."""
        return {mutant.mutant_id for mutant in self.mutants}


def match_equivalents(mutants: list[Mutant], entries: dict[str, str]) -> Equivalents:
    """Only a mutant that no test detected can be equivalent; the others are reported."""
    found = Equivalents()
    matched: set[str] = set()
    for mutant in mutants:
        key = next((k for k in (mutant.mutant_id, mutant.stable_key) if k in entries), None)
        if key is None:
            continue
        matched.add(key)
        if mutant.status in EQUIVALENT_STATUSES:
            found.mutants.append(mutant)
        else:
            found.detected.append(mutant)
    found.unmatched = sorted(set(entries) - matched)
    return found


def percent(part: int, whole: int) -> float:
    """part / whole in percent; 0 for an empty whole."""
    return 100.0 * part / whole if whole else 0.0


def print_modules(mutants: list[Mutant], equivalents: Equivalents, scored: tuple[str, ...]) -> None:
    """One line of counts and score per mutated module."""
    per_module: defaultdict[Path, Counter[str]] = defaultdict(Counter)
    for mutant in mutants:
        per_module[mutant.source][mutant.status] += 1
        per_module[mutant.source]["all"] += 1
    for mutant in equivalents.mutants:
        per_module[mutant.source]["equivalent"] += 1
    print(f"{'module':<26}{'total':>6}{'killed':>7}{'surv.':>6}{'t/o':>5}{'other':>6}", end="")
    print(f"{'equiv':>6}{'score':>8}")
    for source in sorted(per_module):
        c = per_module[source]
        other = c["all"] - c["killed"] - c["survived"] - c["timeout"]
        share = percent(sum(c[s] for s in scored), c["all"] - c["equivalent"])
        print(f"{str(source):<26}{c['all']:>6}{c['killed']:>7}{c['survived']:>6}", end="")
        print(f"{c['timeout']:>5}{other:>6}{c['equivalent']:>6}{share:>7.1f}%")


def print_summary(
    mutants: list[Mutant], equivalents: Equivalents, args: argparse.Namespace
) -> float:
    """Counts per module and in all, and the score; returns the score."""
    scored = ("killed", "timeout") if args.count_timeouts else ("killed",)
    print_modules(mutants, equivalents, scored)
    counts = Counter(mutant.status for mutant in mutants)
    total, equivalent = len(mutants), len(equivalents.mutants)
    print(f"\ntotal        {total}")
    for status in ORDER:
        if counts[status] or status in ("killed", "survived", "timeout", "suspicious", "skipped"):
            print(f"{status:<13}{counts[status]}")
    print(f"equivalent   {equivalent}  (listed in {args.equivalents})")
    numerator = sum(counts[s] for s in scored)
    score = percent(numerator, total - equivalent)
    print(f"score        {score:.1f}%  = {' + '.join(scored)} {numerator}", end="")
    print(f" / (total {total} - equivalent {equivalent})")
    detected = percent(counts["killed"] + counts["timeout"], total - equivalent)
    print(f"detected     {detected:.1f}%  (killed + timeout)")
    print_warnings(equivalents)
    return score


def print_warnings(equivalents: Equivalents) -> None:
    """Entries of the equivalents file that match nothing, or a mutant some test detected."""
    if equivalents.unmatched:
        print(
            f"\nwarning: {len(equivalents.unmatched)} equivalents entries match no mutant (stale?):"
        )
        for key in equivalents.unmatched:
            print(f"    {key}")
    if equivalents.detected:
        print(f"\nwarning: {len(equivalents.detected)} listed as equivalent, yet detected:")
        for mutant in equivalents.detected:
            print(f"    {mutant.status}  {mutant.stable_key}  {mutant.mutant_id}")


def print_listing(mutants: list[Mutant], status: str, leave_out: set[str]) -> None:
    """Each mutant of one status with its place, diff and stable key."""
    chosen = [m for m in mutants if m.status == status and m.mutant_id not in leave_out]
    chosen.sort(key=lambda m: (str(m.source), m.line or 0, m.mutant_id))
    print(f"\n--- {status}: {len(chosen)} (equivalents left out) ---")
    for mutant in chosen:
        where = f"{mutant.source}:{mutant.line}" if mutant.line else str(mutant.source)
        print(f"{where}  {mutant.qualname}  {mutant.stable_key}  {mutant.mutant_id}")
        for line in mutant.removed:
            print(f"    - {line}")
        for line in mutant.added:
            print(f"    + {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="folder holding mutants/")
    parser.add_argument("--equivalents", type=Path, default=Path("tools/mutation_equivalents.txt"))
    parser.add_argument(
        "--list",
        action="append",
        default=[],
        metavar="STATUS",
        help="print the mutants of this status (repeatable): survived, timeout, suspicious, ...",
    )
    parser.add_argument(
        "--ids", action="store_true", help="with --list: only the mutant ids, one a line"
    )
    parser.add_argument("--fail-under", type=float, default=None, metavar="PERCENT")
    parser.add_argument(
        "--count-timeouts",
        action="store_true",
        help="score (and --fail-under) counts a timeout as a kill, as mutmut itself does",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the report; 1 when the score is under --fail-under, 2 without mutants/."""
    args = parse_args(argv)
    root = args.root.resolve()
    if not (root / "mutants").is_dir():
        print(f"no mutants/ under {root}: run `mutmut run` first", file=sys.stderr)
        return 2
    mutants = load_mutants(root)
    entries = load_equivalents(args.equivalents)
    if args.list or any(":" in key for key in entries):
        locate_all(root, mutants)
    equivalents = match_equivalents(mutants, entries)

    if args.ids:  # for `mutmut run $(python mutation_report.py --ids --list timeout)`
        for status in args.list:
            for mutant in mutants:
                if mutant.status == status and mutant.mutant_id not in equivalents.ids:
                    print(mutant.mutant_id)
        return 0

    score = print_summary(mutants, equivalents, args)
    for status in args.list:
        print_listing(mutants, status, equivalents.ids)
    if args.fail_under is not None and score < args.fail_under:
        print(f"\nFAIL: score {score:.1f}% is under {args.fail_under}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
