"""Prompt templates: one file per role, a static system part first, a bounded variable part.

A template file has two sections, ``[system]`` then ``[prompt]``, with ``$name`` placeholders
(``string.Template``). The system part holds only what is the same for every call of a run
(role, task, schema), so consecutive calls share a long prefix and Gemini's implicit prefix
caching can apply. The variable parts are cut to a token budget (4 characters a token, an
estimate) with an explicit marker where text was cut.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence
from importlib import resources

CHARS_PER_TOKEN = 4

# Role -> (placeholders of [system], placeholders of [prompt]); every one must appear.
ROLES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "researcher": (
        frozenset({"task", "schema", "operators"}),
        frozenset({"parents", "lessons", "siblings", "failures", "operator_stats"}),
    ),
    "engineer": (frozenset({"task", "schema"}), frozenset({"candidate", "failure", "attempts"})),
    "analyzer": (frozenset({"task"}), frozenset({"node", "parent", "siblings"})),
    "lessons": (frozenset({"task"}), frozenset({"nodes", "lessons"})),
    "judge": (frozenset({"task"}), frozenset({"node", "parent"})),
    "researcher_code": (
        frozenset({"task", "interface", "template"}),
        frozenset({"parents", "lessons", "siblings", "failures", "operator_stats", "request"}),
    ),
    "engineer_code": (
        frozenset({"task", "interface"}),
        frozenset({"candidate", "failure", "attempts"}),
    ),
}


class PromptError(ValueError):
    """A template that is missing or malformed; the message names the file."""


def cut(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, marked where it was cut."""
    if len(text) <= max_chars:
        return text
    marker = "\n[... {} characters cut to fit the prompt budget ...]"
    keep = max(max_chars - len(marker.format(len(text))), 0)
    return text[:keep] + marker.format(len(text) - keep)


def fit(sections: Mapping[str, str], budget_tokens: int) -> dict[str, str]:
    """Cuts the sections so that together they fit ``budget_tokens``.

    Water-filling: a section shorter than an equal share keeps all of its text and leaves the
    rest of its share to the longer ones, so only the longest sections are cut.
    """
    budget = budget_tokens * CHARS_PER_TOKEN
    if sum(len(t) for t in sections.values()) <= budget:
        return dict(sections)
    limits: dict[str, int] = {}
    remaining = dict(sections)
    while remaining:
        share = budget // len(remaining)
        small = {k: t for k, t in remaining.items() if len(t) <= share}
        if not small:
            limits.update({k: share for k in remaining})
            break
        for k, t in small.items():
            limits[k] = len(t)
            budget -= len(t)
            del remaining[k]
    return {k: cut(t, limits[k]) for k, t in sections.items()}


@dataclasses.dataclass(frozen=True)
class Prompt:
    system: str
    user: str


class Template:
    """One role's template, checked when loaded."""

    def __init__(self, role: str, directory: str | None = None):
        if role not in ROLES:
            raise PromptError(f"no prompt role {role!r} (known: {', '.join(ROLES)})")
        self.role = role
        base = resources.files("evolve_jax.agents") / "prompts" if directory is None else None
        self.path = str(base / f"{role}.txt") if base is not None else f"{directory}/{role}.txt"
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise PromptError(f"prompt template {self.path!r} cannot be read: {e}") from e
        head, sep, rest = text.partition("[system]\n")
        system, sep2, user = rest.partition("\n[prompt]\n")
        if not sep or not sep2 or head.strip():
            raise PromptError(
                f"prompt template {self.path!r} must be a [system] section then a [prompt] section"
            )
        self.system = self._check(system, ROLES[role][0], "[system]")
        self.user = self._check(user, ROLES[role][1], "[prompt]")

    def _check(self, text: str, names: frozenset[str], section: str) -> string.Template:
        template = string.Template(text)
        if not template.is_valid():
            raise PromptError(f"prompt template {self.path!r}, {section}: a stray '$' (write $$)")
        found = set(template.get_identifiers())
        if found != names:
            problems = []
            if names - found:
                problems.append(f"missing ${', $'.join(sorted(names - found))}")
            if found - names:
                problems.append(f"unknown ${', $'.join(sorted(found - names))}")
            raise PromptError(f"prompt template {self.path!r}, {section}: {'; '.join(problems)}")
        return template

    def render(
        self, static: Mapping[str, str], variable: Mapping[str, str], budget_tokens: int
    ) -> Prompt:
        """The prompt, with the variable parts cut to ``budget_tokens`` together."""
        return Prompt(
            system=self.system.substitute(static),
            user=self.user.substitute(fit(variable, budget_tokens)),
        )


def load_templates(directory: str | None, roles: Sequence[str]) -> dict[str, Template]:
    return {role: Template(role, directory) for role in roles}
