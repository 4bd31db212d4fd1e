"""Code-mode candidates: programs whose EVOLVE-BLOCKs may change, and the edits that change them.

A search space in code mode ships a template: a program whose changeable parts sit between a
line ``# EVOLVE-BLOCK-START`` and a line ``# EVOLVE-BLOCK-END``. Everything outside the blocks
(the frame) is fixed: the imports and the interface the harness relies on. A candidate is the
JSON object ``{"source": program text}``, so the history, fingerprints and novelty checks treat
it like any genome.

Edits are strict. A SEARCH/REPLACE edit applies only where its SEARCH text occurs exactly once
(overlapping occurrences counted), inside one block, and only if the program it makes parses
back into the same frame and the same blocks (a REPLACE that writes a marker line, or drops the
newline before an END marker, does not); otherwise it raises ``EditError`` with the reason (and,
for a SEARCH that does not occur, the parent's nearest lines), so the model can be asked again.
An edit is never skipped, fuzzily matched or turned into a rewrite.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

from evolve_jax.search_space import CodeSpec, GenomeError

START = "EVOLVE-BLOCK-START"
END = "EVOLVE-BLOCK-END"
_MARKER = re.compile(rf"^\s*#\s*({START}|{END})\s*$")
_NEAREST_LINES = 8


class ProgramError(ValueError):
    """A template or program whose EVOLVE-BLOCK structure is wrong."""


class EditError(ValueError):
    """An edit that does not apply; the message says why and shows the nearest lines."""


@dataclasses.dataclass(frozen=True)
class Program:
    """Source split into frame segments and blocks: frame[0] block[0] frame[1] ... frame[n]."""

    frame: tuple[str, ...]
    blocks: tuple[str, ...]

    @classmethod
    def parse(cls, source: str, where: str = "the program") -> Program:
        frame, blocks, current, inside = [], [], [], False
        for number, line in enumerate(source.splitlines(keepends=True), start=1):
            match = _MARKER.match(line)
            if match is None:
                current.append(line)
                continue
            if (match.group(1) == START) == inside:
                problem = "a nested" if inside else "an unopened"
                raise ProgramError(f"{where}, line {number}: {problem} {match.group(1)} marker")
            if inside:  # END: the block is done; the marker line starts the next frame part
                blocks.append("".join(current))
                current = [line]
            else:  # START: the marker line ends this frame part
                frame.append("".join([*current, line]))
                current = []
            inside = not inside
        if inside:
            raise ProgramError(f"{where}: an {START} marker is never closed by {END}")
        frame.append("".join(current))
        if not blocks:
            raise ProgramError(
                f"{where} has no EVOLVE-BLOCK: mark each part that may change with a line "
                f"'# {START}' before it and a line '# {END}' after it"
            )
        return cls(tuple(frame), tuple(blocks))

    @property
    def source(self) -> str:
        parts = [self.frame[0]]
        for block, frame in zip(self.blocks, self.frame[1:], strict=True):
            parts += [block, frame]
        return "".join(parts)

    def with_blocks(self, blocks: Sequence[str]) -> Program:
        if len(blocks) != len(self.blocks):
            raise EditError(
                f"the program has {len(self.blocks)} EVOLVE-BLOCK(s); the answer gave {len(blocks)}"
            )
        # Each block ends with a newline, so the END marker stays on a line of its own.
        fixed = tuple(b if not b or b.endswith("\n") else b + "\n" for b in blocks)
        for i, block in enumerate(fixed, start=1):
            _no_marker(block, f"block {i} of the answer")
        return Program(self.frame, fixed)

    def block_lines(self) -> list[tuple[int, int]]:
        """(first, last) 1-based source line of each block's content."""
        spans, line = [], 1
        for frame, block in zip(self.frame, self.blocks, strict=False):
            line += frame.count("\n")
            spans.append((line, line + block.count("\n") - 1))
            line += block.count("\n")
        return spans


def check_frame(template: Program, program: Program) -> None:
    """Raises ProgramError when ``program`` changed anything outside its blocks."""
    if len(template.blocks) != len(program.blocks):
        raise ProgramError(
            f"the program has {len(program.blocks)} EVOLVE-BLOCK(s), the template "
            f"{len(template.blocks)}"
        )
    for i, (want, got) in enumerate(zip(template.frame, program.frame, strict=True)):
        if want != got:
            w, g = want.splitlines(), got.splitlines()
            pairs = enumerate(zip(w, g, strict=False))
            at = next((k for k, (a, b) in pairs if a != b), min(len(w), len(g)))
            where = "before the first block" if i == 0 else f"after block {i}"
            shown = g[at] if at < len(g) else "<missing>"
            raise ProgramError(
                f"the code outside the EVOLVE-BLOCKs changed ({where}, its line {at + 1}: "
                f"{shown.strip()!r}); only the code between the markers may change"
            )


@dataclasses.dataclass(frozen=True)
class Edit:
    search: str
    replace: str


def _numbered(lines: Sequence[str], first: int) -> str:
    return "\n".join(f"{first + i:4d} | {line}" for i, line in enumerate(lines))


def nearest_lines(source: str, search: str) -> str:
    """The window of ``source`` most like ``search``, with line numbers (for a re-ask)."""
    lines = source.splitlines()
    want = search.strip("\n").splitlines() or [""]
    size = min(max(len(want), 1), len(lines))
    best, best_ratio = 0, -1.0
    for start in range(0, max(len(lines) - size + 1, 1)):
        ratio = difflib.SequenceMatcher(
            None, "\n".join(want), "\n".join(lines[start : start + size]), autojunk=False
        ).ratio()
        if ratio > best_ratio:
            best, best_ratio = start, ratio
    lo, hi = max(best - 1, 0), min(best + size + 1, len(lines), best + _NEAREST_LINES)
    return _numbered(lines[lo:hi], lo + 1)


def _line_of(source: str, offset: int) -> int:
    return source.count("\n", 0, offset) + 1


def _occurrences(source: str, search: str) -> list[int]:
    """Every offset where ``search`` starts in ``source``, overlapping occurrences included."""
    starts, at = [], source.find(search)
    while at >= 0:
        starts.append(at)
        at = source.find(search, at + 1)
    return starts


def _no_marker(text: str, what: str) -> None:
    """Raises EditError when ``text`` (new block content) holds an EVOLVE-BLOCK marker line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if _MARKER.match(line):
            raise EditError(
                f"{what} writes a marker line ({line.strip()!r}, its line {number}); the "
                "markers belong to the fixed frame: write only code, no marker lines"
            )


def _same_frame(before: Program, after: Program, label: str) -> None:
    """Raises EditError unless ``after``'s source parses back into its own frame and blocks,
    with the frame of ``before``: the check the harness makes later, made when the edit is."""
    try:
        parsed = Program.parse(after.source)
        check_frame(before, parsed)
    except ProgramError as e:
        raise EditError(f"{label}: the edited program breaks the EVOLVE-BLOCK frame: {e}") from e
    if parsed != after:
        raise EditError(
            f"{label}: the edited program no longer parses into the same blocks (a block must "
            "end with a newline, so that its END marker stays on a line of its own)"
        )


def apply_edits(program: Program, edits: Sequence[Edit]) -> Program:
    """``program`` with every edit applied in order; raises EditError for the first that fails."""
    if not edits:
        raise EditError("the answer has no edits")
    for number, edit in enumerate(edits, start=1):
        source = program.source
        label = f"edit {number} of {len(edits)}"
        if not edit.search.strip():
            raise EditError(f"{label}: SEARCH is empty; copy the exact lines to replace")
        starts = _occurrences(source, edit.search)
        if not starts:
            raise EditError(
                f"{label}: SEARCH does not occur in the parent (it must match exactly, whitespace "
                f"included). The parent's nearest lines:\n{nearest_lines(source, edit.search)}"
            )
        if len(starts) > 1:
            lines = ", ".join(str(_line_of(source, s)) for s in starts)
            raise EditError(
                f"{label}: SEARCH occurs {len(starts)} times (lines {lines}); include more of "
                "the surrounding lines so that it matches exactly once"
            )
        begin, end = starts[0], starts[0] + len(edit.search)
        offset = len(program.frame[0])
        for i, block in enumerate(program.blocks):
            if offset <= begin and end <= offset + len(block):
                local = begin - offset
                text = block[:local] + edit.replace + block[local + len(edit.search) :]
                edited = Program(
                    program.frame, (*program.blocks[:i], text, *program.blocks[i + 1 :])
                )
                _no_marker(text, f"{label}: REPLACE")
                _same_frame(program, edited, label)
                program = edited
                break
            offset += len(block) + len(program.frame[i + 1])
        else:
            raise EditError(
                f"{label}: SEARCH matches at line {_line_of(source, begin)}, which is outside "
                f"the EVOLVE-BLOCKs (lines {program.block_lines()}); only the code between the "
                "markers may change"
            )
    return program


def parse_edits(raw: Any) -> list[Edit]:
    """Edits from a model's JSON answer: a list of {"search", "replace"} objects."""
    if not isinstance(raw, list):
        raise EditError("'edits' is not a list of {search, replace} objects")
    edits = []
    for number, item in enumerate(raw, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("search"), str):
            raise EditError(f"edit {number} is not an object with a string 'search'")
        if not isinstance(item.get("replace"), str):
            raise EditError(f"edit {number} has no string 'replace'")
        edits.append(Edit(item["search"], item["replace"]))
    return edits


# ----------------------------------------------------------------- candidates


def source_schema() -> dict[str, Any]:
    """The JSON schema of a code-mode candidate."""
    return {
        "type": "object",
        "properties": {"source": {"type": "string"}},
        "required": ["source"],
    }


def load_template(spec: CodeSpec) -> Program:
    """The template's program; raises ProgramError naming the file when its markers are wrong."""
    return Program.parse(spec.template, where=f"template {spec.path}")


def validate_source(spec: CodeSpec, candidate: Any) -> dict[str, str]:
    """The canonical candidate; raises GenomeError for a bad shape, frame or syntax."""
    if not isinstance(candidate, dict) or set(candidate) != {"source"}:
        raise GenomeError('a code-mode candidate is a JSON object {"source": program text}')
    source = candidate["source"]
    if not isinstance(source, str):
        raise GenomeError("'source' is not a string")
    try:
        check_frame(load_template(spec), Program.parse(source))
    except ProgramError as e:
        raise GenomeError(str(e)) from e
    try:
        compile(source, "candidate.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        shown = f"\n    {e.text.rstrip()}" if e.text else ""
        raise GenomeError(f"syntax: line {e.lineno}: {e.msg}{shown}") from e
    except (ValueError, RecursionError, MemoryError) as e:
        # A lone surrogate (UnicodeEncodeError), a null byte on older Pythons (ValueError), or
        # nesting too deep for the compiler: not Python either, so a reason, never a crash.
        raise GenomeError(f"syntax: the source cannot be compiled ({type(e).__name__}: {e})") from e
    return {"source": source}
