"""The gemini backend in code mode: the Researcher edits programs, the Engineer repairs them.

Each slot asks for one kind of change, drawn from ``LLMConfig.edit_mix``: SEARCH/REPLACE
``diff`` edits of the parent's EVOLVE-BLOCKs, a ``rewrite`` of the blocks, or a ``crossover``
that rewrites the blocks from two parents. An answer that cannot be used (not JSON, text that is
not Unicode, an edit that does not apply: no match, several matches, outside the blocks, a
marker line written or the frame otherwise broken) is sent back with the reason (and, for a
SEARCH that does not occur, the parent's nearest lines), a bounded number of times
(``max_reasks``), then the slot is recorded as invalid with the last error. The Engineer asks
for edits that fix a failed syntax, import or static check, or a failed run, with the check's
reason or the trimmed traceback; its edits are checked the same way, and every attempt is
recorded with its reason.
"""

from __future__ import annotations

from typing import Any

from evolve_jax.agents import llm as llm_lib
from evolve_jax.agents.base import DesignContext
from evolve_jax.agents.gemini_roles import (
    Design,
    GeminiEngineer,
    GeminiResearcher,
    checked,
    program_reason,
    show,
)
from evolve_jax.config import EDIT_KINDS
from evolve_jax.programs import (
    EditError,
    Program,
    ProgramError,
    apply_edits,
    check_frame,
    load_template,
    parse_edits,
)
from evolve_jax.search_space import Genome

_STRING = {"type": "string"}
_EDITS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"search": _STRING, "replace": _STRING},
        "required": ["search", "replace"],
    },
}
SCHEMAS = {
    "diff": {
        "type": "object",
        "properties": {"name": _STRING, "motivation": _STRING, "edits": _EDITS},
        "required": ["name", "motivation", "edits"],
    },
    "rewrite": {
        "type": "object",
        "properties": {
            "name": _STRING,
            "motivation": _STRING,
            "blocks": {"type": "array", "items": _STRING},
        },
        "required": ["name", "motivation", "blocks"],
    },
}
SCHEMAS["crossover"] = SCHEMAS["rewrite"]
REPAIR_SCHEMA = {
    "type": "object",
    "properties": {"diagnosis": _STRING, "edits": _EDITS},
    "required": ["diagnosis", "edits"],
}

_REQUESTS = {
    "diff": (
        "Change the parent (node {parent}) with SEARCH/REPLACE edits. Answer in the edits format."
    ),
    "rewrite": (
        "Rewrite the parent's (node {parent}) EVOLVE-BLOCKs in full, keeping what works and "
        "changing the mechanism you expect to help. Answer in the blocks format."
    ),
    "crossover": (
        "Combine the parent (node {parent}) and the reference (node {other}): one program with "
        "the best mechanisms of both. Answer in the blocks format."
    ),
}


def operator_name(kind: str) -> str:
    return f"gemini_{kind}"


def _program(candidate: Genome) -> Program:
    return Program.parse(candidate["source"])


class CodeResearcher(GeminiResearcher):
    model_operators = tuple(operator_name(k) for k in EDIT_KINDS)

    def __init__(self, shared, direction: str):
        super().__init__(shared, direction)
        spec = shared.space.code_spec()
        self.template = load_template(spec)  # raises ProgramError naming the file
        self.mix = dict(self.config.edit_mix)
        self.static = {"interface": spec.interface, "template": spec.template}

    def _variable(self, context: DesignContext) -> dict[str, str]:
        variable = super()._variable(context)
        # Programs are long: siblings and failures are named, not shown.
        variable["siblings"] = (
            "\n".join(f"- {p.name}: {p.motivation}" for p in context.siblings) or "none"
        )
        failures = [n for n in self.view if not n.ok][-6:]
        variable["failures"] = (
            "\n".join(
                f"- {n.name}: {n.status}: {program_reason(n.reason, n.candidate)}" for n in failures
            )
            or "none"
        )
        return variable

    def _kind(self, context: DesignContext) -> str:
        kinds = [k for k in EDIT_KINDS if self.mix.get(k, 0) > 0]
        if not context.selection.references:
            kinds = [k for k in kinds if k != "crossover"] or ["diff"]
        weights = [self.mix.get(k, 0) or 1.0 for k in kinds]
        total = sum(weights)
        return kinds[int(context.rng.choice(len(kinds), p=[w / total for w in weights]))]

    def _design(self, context: DesignContext) -> Design:
        sel = context.selection
        kind = self._kind(context)
        parents = (sel.parent, sel.references[0]) if kind == "crossover" else (sel.parent,)
        variable = self._variable(context)
        variable["request"] = _REQUESTS[kind].format(
            parent=sel.parent.id, other=parents[-1].id if len(parents) > 1 else ""
        )
        prompt = self.shared.templates["researcher_code"].render(
            {"task": self.shared.task, **self.static}, variable, self.config.prompt_budget_tokens
        )
        return Design(prompt, SCHEMAS[kind], operator_name(kind), parents)

    def _check(self, parsed: Any, taken: dict[str, str], design: Design):
        if not isinstance(parsed, dict):
            raise llm_lib.AnswerError("the answer is not a JSON object")
        key = "edits" if design.operator == operator_name("diff") else "blocks"
        missing = [k for k in ("name", "motivation", key) if k not in parsed]
        if missing:
            raise llm_lib.AnswerError(f"the answer lacks {', '.join(missing)}")
        parent = _program(design.parents[0].candidate)
        try:
            if key == "edits":
                program = apply_edits(parent, parse_edits(parsed["edits"]))
            else:
                blocks = parsed["blocks"]
                if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
                    raise EditError("'blocks' is not a list of strings")
                program = self.template.with_blocks(blocks)
            check_frame(self.template, Program.parse(program.source))
        except (EditError, ProgramError) as e:
            raise llm_lib.AnswerError(str(e)) from e
        candidate = {"source": program.source}
        return str(parsed["name"]), str(parsed["motivation"]), self._new(candidate, taken)


class CodeEngineer(GeminiEngineer):
    """Repairs programs with edits; the search space's checks and runs happen in its sandbox."""

    def __init__(self, shared, env):
        super().__init__(shared, env)
        self.static = {"interface": env.space.code_spec().interface}

    @staticmethod
    def _check(parsed: Any, program: Program) -> tuple[dict, Program]:
        if not isinstance(parsed, dict) or "edits" not in parsed:
            raise llm_lib.AnswerError("the answer has no 'edits'")
        try:
            return parsed, apply_edits(program, parse_edits(parsed["edits"]))
        except (EditError, ProgramError) as e:
            raise llm_lib.AnswerError(str(e)) from e

    def fix(self, genome, reason, failures, attempts, label):
        record: dict[str, Any] = {"reason": reason, "by": "model", "edit_errors": []}
        try:
            program = _program(genome)
        except (KeyError, TypeError, ProgramError) as e:
            attempts.append({**record, "error": f"not repairable by edits: {e}"})
            return None
        prompt = self.shared.templates["engineer_code"].render(
            {"task": self.shared.task, **self.static},
            {
                "candidate": show(genome),
                "failure": program_reason(reason, genome),
                "attempts": "\n".join(
                    f"- {program_reason(a.get('reason'), genome)}: "
                    f"{a.get('diagnosis') or a.get('error')}" for a in attempts
                ) or "none",
            },
            self.shared.config.prompt_budget_tokens,
        )  # fmt: skip
        turns = [("user", prompt.user)]
        while True:
            try:
                answer = self.shared.llm.generate(
                    model=self.shared.config.engineer_model, system=prompt.system, turns=turns,
                    schema=REPAIR_SCHEMA, label=label,
                )  # fmt: skip
                parsed, repaired = checked(self._check, answer, program)
            except llm_lib.LLMError as e:
                attempts.append({**record, "error": str(e)})
                return None
            except llm_lib.AnswerError as e:
                record["edit_errors"].append(str(e))
                if len(record["edit_errors"]) > self.shared.config.max_reasks:
                    attempts.append({**record, "error": f"no edit applied: {e}"})
                    return None
                turns += [
                    ("model", answer.text),
                    ("user", f"Your edits were rejected: {e}. Answer again, with it fixed."),
                ]
                continue
            if repaired.source == genome["source"]:
                attempts.append({**record, "error": "the edits changed nothing"})
                return None
            attempts.append({**record, "diagnosis": str(parsed.get("diagnosis", ""))})
            return {"source": repaired.source}
