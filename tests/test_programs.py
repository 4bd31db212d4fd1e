"""Code-mode programs: EVOLVE-BLOCK parsing, frame checks and strict SEARCH/REPLACE edits."""

import pytest

from evolve_jax import programs
from evolve_jax.config import LLMConfig, parse_edit_mix
from evolve_jax.programs import Edit, EditError, Program, ProgramError
from evolve_jax.search_space import CodeSpec, GenomeError

TEMPLATE = """\
import math

# EVOLVE-BLOCK-START
def area(r):
    return 0.0
# EVOLVE-BLOCK-END


def harness():
    return area(1.0)
"""

PARENT = TEMPLATE.replace(
    "def area(r):\n    return 0.0\n",
    "def area(r):\n    return math.pi * r * r\n\n\ndef scale(r):\n    return r * 1.0\n",
)
SPEC = CodeSpec(TEMPLATE, "template.py", "define area(r)")


def test_parse_round_trips_and_finds_the_block():
    program = Program.parse(PARENT)
    assert program.source == PARENT
    assert len(program.blocks) == 1 and "math.pi" in program.blocks[0]
    first, last = program.block_lines()[0]
    assert PARENT.splitlines()[first - 1] == "def area(r):"
    assert PARENT.splitlines()[last - 1] == "    return r * 1.0"


@pytest.mark.parametrize(
    "source, message",
    [
        ("x = 1\n", "has no EVOLVE-BLOCK"),
        ("# EVOLVE-BLOCK-START\nx = 1\n", "never closed"),
        ("x = 1\n# EVOLVE-BLOCK-END\n", "line 2: an unopened EVOLVE-BLOCK-END"),
        (
            "# EVOLVE-BLOCK-START\n# EVOLVE-BLOCK-START\n# EVOLVE-BLOCK-END\n",
            "line 2: a nested EVOLVE-BLOCK-START",
        ),
    ],
)
def test_bad_markers_are_named(source, message):
    with pytest.raises(ProgramError, match=message):
        Program.parse(source, where="template t.py")


def test_a_template_without_markers_is_refused_naming_its_file():
    with pytest.raises(ProgramError, match=r"template nowhere\.py has no EVOLVE-BLOCK"):
        programs.load_template(CodeSpec("x = 1\n", "nowhere.py", ""))


def test_an_edit_inside_the_block_applies():
    edited = programs.apply_edits(Program.parse(PARENT), [Edit("return r * 1.0", "return r * 2.0")])
    assert "return r * 2.0" in edited.source
    assert edited.source.replace("r * 2.0", "r * 1.0") == PARENT


def test_edits_apply_in_order_each_to_the_previous_result():
    edited = programs.apply_edits(
        Program.parse(PARENT),
        [Edit("r * 1.0", "r * 3.0"), Edit("r * 3.0", "r * 4.0")],
    )
    assert "r * 4.0" in edited.source


def test_an_edit_with_no_match_is_refused_with_the_nearest_lines():
    with pytest.raises(EditError, match="does not occur") as error:
        programs.apply_edits(Program.parse(PARENT), [Edit("return math.pi * r ** 2", "x")])
    # The nearest lines come with their line numbers, so the model can copy them exactly.
    assert "return math.pi * r * r" in str(error.value)
    assert " 5 | " in str(error.value)


def test_an_edit_matching_twice_is_refused_with_both_lines():
    with pytest.raises(EditError, match=r"occurs 2 times \(lines 4, 8\)"):
        programs.apply_edits(Program.parse(PARENT), [Edit("(r):\n    return ", "(r):\n    x = 1")])


def test_an_edit_outside_the_block_is_refused():
    with pytest.raises(EditError, match="outside the EVOLVE-BLOCKs"):
        programs.apply_edits(Program.parse(PARENT), [Edit("return area(1.0)", "return 99.0")])


def test_an_edit_straddling_a_marker_is_refused():
    with pytest.raises(EditError, match="outside the EVOLVE-BLOCKs"):
        programs.apply_edits(
            Program.parse(PARENT), [Edit("return r * 1.0\n# EVOLVE-BLOCK-END", "pass")]
        )


def test_overlapping_matches_count_as_several():
    parent = Program.parse(TEMPLATE.replace("    return 0.0\n", "    x = 1\n" * 3))
    with pytest.raises(EditError, match=r"occurs 2 times \(lines 5, 6\)"):
        programs.apply_edits(parent, [Edit("    x = 1\n    x = 1\n", "    x = 2\n")])


MARKER_PAIR = "# EVOLVE-BLOCK-END\nleaked = 1\n# EVOLVE-BLOCK-START\n"


def test_an_edit_writing_a_marker_pair_is_refused_when_applied():
    parent = Program.parse(PARENT)
    edit = Edit("    return r * 1.0\n", "    return r * 1.0\n" + MARKER_PAIR)
    with pytest.raises(EditError, match=r"edit 1 of 1: REPLACE writes a marker line"):
        programs.apply_edits(parent, [edit])
    with pytest.raises(EditError, match=r"block 1 of the answer writes a marker line"):
        programs.load_template(SPEC).with_blocks(["def area(r):\n    return 1.0\n" + MARKER_PAIR])


def test_an_edit_joining_code_to_the_end_marker_is_refused_when_applied():
    # Without its newline, the block's last line runs into "# EVOLVE-BLOCK-END".
    with pytest.raises(EditError, match=r"breaks the EVOLVE-BLOCK frame.*never closed"):
        programs.apply_edits(
            Program.parse(PARENT), [Edit("    return r * 1.0\n", "    return r * 2.0")]
        )


def test_validate_refuses_a_source_that_is_not_unicode_with_a_reason():
    lone = PARENT.replace("return r * 1.0", "return '\ud800'")
    with pytest.raises(GenomeError, match=r"syntax: the source cannot be compiled.*surrogate"):
        programs.validate_source(SPEC, {"source": lone})


def test_empty_search_and_malformed_edits_are_refused():
    with pytest.raises(EditError, match="SEARCH is empty"):
        programs.apply_edits(Program.parse(PARENT), [Edit("  \n", "x")])
    with pytest.raises(EditError, match="no edits"):
        programs.apply_edits(Program.parse(PARENT), [])
    with pytest.raises(EditError, match="not a list"):
        programs.parse_edits({"search": "a"})
    with pytest.raises(EditError, match="edit 1 has no string 'replace'"):
        programs.parse_edits([{"search": "a"}])


def test_a_rewrite_must_give_every_block():
    template = programs.load_template(SPEC)
    with pytest.raises(EditError, match="1 EVOLVE-BLOCK"):
        template.with_blocks(["a = 1", "b = 2"])
    rewritten = template.with_blocks(["def area(r):\n    return 1.0"])
    assert programs.validate_source(SPEC, {"source": rewritten.source})


def test_validate_refuses_a_changed_frame_and_names_the_line():
    changed = PARENT.replace("return area(1.0)", "return 3.0")
    with pytest.raises(GenomeError, match=r"outside the EVOLVE-BLOCKs changed.*return 3\.0"):
        programs.validate_source(SPEC, {"source": changed})


def test_validate_reports_a_syntax_error_with_its_line():
    broken = PARENT.replace("return r * 1.0", "return r *")
    with pytest.raises(GenomeError, match=r"syntax: line 9: invalid syntax"):
        programs.validate_source(SPEC, {"source": broken})


def test_validate_refuses_what_is_not_a_program_object():
    for bad in ({"x": 1}, {"source": 3}, "text", {"source": PARENT, "extra": 1}):
        with pytest.raises(GenomeError):
            programs.validate_source(SPEC, bad)


def test_edit_mix_parses_and_refuses_unknown_kinds():
    assert parse_edit_mix("diff=1,crossover=0.5") == (("diff", 1.0), ("crossover", 0.5))
    assert dict(LLMConfig(edit_mix="rewrite=1").edit_mix) == {"rewrite": 1.0}
    with pytest.raises(ValueError, match="not KIND=WEIGHT"):
        parse_edit_mix("patch=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_edit_mix("diff=lots")
    with pytest.raises(ValueError, match="must not all be 0"):
        LLMConfig(edit_mix="diff=0")
