"""The gemini backend: the trio's roles written as prompts to Gemini models.

The Researcher and the Engineer are ``gemini_roles.py``'s (genome mode) or ``coding.py``'s
(code mode). The Analyzer, here, writes an analysis per node and lessons per step, merging a
lesson into an earlier one that says the same; an optional judge's 1-10 score is blended into
the fitness. ``make_gemini`` (the ``gemini`` entry point) checks the setup and builds the trio.
Every call goes through ``llm.LLM``: recorded, replayable, priced.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from absl import logging

from evolve_jax.agents import llm as llm_lib
from evolve_jax.agents.analyzer import OfflineAnalyzer
from evolve_jax.agents.base import AgentEnv, AgentTrio
from evolve_jax.agents.coding import CodeEngineer, CodeResearcher
from evolve_jax.agents.gemini_roles import (
    ANALYSIS_CHARS,
    GeminiEngineer,
    GeminiResearcher,
    Meter,
    Shared,
    compact_json,
    describe_node,
    describe_task,
    fenced,
    program_reason,
    show,
)
from evolve_jax.agents.prompting import ROLES, load_templates
from evolve_jax.config import LLMConfig
from evolve_jax.memory.cognition import Cognition
from evolve_jax.memory.embeddings import EmbeddingStore
from evolve_jax.programs import load_template
from evolve_jax.search_space import SearchSpace

# ---------------------------------------------------------------- Analyzer


class GeminiAnalyzer(OfflineAnalyzer):
    """The offline numbers and lessons, plus the model's analysis, lessons and judgement."""

    def __init__(self, shared: Shared, cognition: Cognition, direction: str, run_name: str):
        super().__init__(cognition, direction)
        self.shared = shared
        self.run_name = run_name

    def analyze(self, proposal, outcome, score, parents, siblings, label=""):
        numbers = super().analyze(proposal, outcome, score, parents, siblings)
        if outcome.status != "ok" and outcome.reason and outcome.reason.startswith("researcher:"):
            return numbers  # nothing ran: the reason says it all
        sign = -1.0 if self.direction == "max" else 1.0
        best = sorted((s for s in siblings if math.isfinite(s[1])), key=lambda s: sign * s[1])[:3]
        variable = {
            # The fenced output (bounded tails) comes before the candidate, so that a cut to the
            # prompt budget, which keeps a section's beginning, never drops its closing fence.
            "node": (
                f"{proposal.name}: {proposal.motivation}\n"
                f"{outcome.status} {program_reason(outcome.reason, outcome.candidate)}; metrics "
                f"by seed {compact_json(outcome.metrics)}; measured: {numbers}"
                + "".join(fenced(f"its {k} (last lines)", v) for k, v in outcome.output.items())
                + f"\ncandidate {show(outcome.candidate)}"
            ),
            "parent": "\n".join(describe_node(p) for p in parents) or "none (a seed)",
            "siblings": "\n".join(f"- {p.name} score {s:.4g}: {show(p.candidate)}" for p, s in best)
            or "none",
        }
        schema = {
            "type": "object",
            "properties": {"analysis": {"type": "string"}},
            "required": ["analysis"],
        }
        try:
            answer = self.shared.ask(
                "analyzer", self.shared.config.analyzer_model, variable, {}, schema, label
            )
            return f"{str(answer.get('analysis', '')).strip()} Measured: {numbers}"
        except (llm_lib.LLMError, llm_lib.AnswerError) as e:
            return f"{numbers} (model analysis unavailable: {e})"

    def judge(self, proposal, outcome, parents, label=""):
        cfg = self.shared.config
        if not cfg.judge_model or cfg.judge_weight == 0:
            return None
        variable = {
            "node": f"{proposal.name}: {proposal.motivation}\ncandidate {show(outcome.candidate)}",
            "parent": "\n".join(describe_node(p) for p in parents) or "none (a seed)",
        }
        schema = {
            "type": "object",
            "properties": {
                "score": {"type": "integer", "minimum": 1, "maximum": 10},
                "reason": {"type": "string"},
            },
            "required": ["score", "reason"],
        }
        record: dict[str, Any] = {"model": cfg.judge_model, "weight": cfg.judge_weight}
        try:
            answer = self.shared.ask("judge", cfg.judge_model, variable, {}, schema, label)
            raw = answer.get("score")
            if not isinstance(raw, (int, float)) or not 1 <= raw <= 10:
                raise llm_lib.AnswerError(f"score {raw!r} is not a number from 1 to 10")
        except (llm_lib.LLMError, llm_lib.AnswerError) as e:
            return {**record, "normalised": None, "error": str(e)}  # recorded, not blended
        # ASI-Arch's mapping of a 1-10 judgement to [0, 1].
        return {
            **record,
            "score": raw,
            "normalised": (raw - 1) / 9,
            "reason": str(answer.get("reason", "")),
        }

    def write_lessons(self, view, step):
        written = super().write_lessons(view, step)
        mine = [
            n for n in view if n.origin.get("run") == self.run_name and n.origin.get("step") == step
        ]
        if step == 0 or not mine:
            return written
        # Only lessons drawn from the nodes of ``view``: a resumed run (whose cognition holds the
        # lessons of later steps too) sends this step's prompt as the first run did.
        self.cognition.restrict(frozenset(n.id for n in view))
        try:
            return self._model_lessons(mine, step, written)
        finally:
            self.cognition.restrict(None)

    def _model_lessons(self, mine, step, written):
        query = " ".join(n.analysis for n in mine)
        existing = self.cognition.retrieve(query, 5, ANALYSIS_CHARS)
        variable = {
            "nodes": "\n".join(describe_node(n) for n in mine),
            "lessons": "\n".join(f"- {i.title}: {i.content}" for i in existing) or "none",
        }
        lesson = {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "content": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "nodes": {"type": "array", "items": {"type": "integer"}},
            },
            "required": ["title", "content", "nodes"],
        }
        schema = {
            "type": "object",
            "properties": {"lessons": {"type": "array", "items": lesson}},
            "required": ["lessons"],
        }
        try:
            answer = self.shared.ask(
                "lessons", self.shared.config.analyzer_model, variable, {}, schema,
                f"{step}/step/lessons",
            )  # fmt: skip
        except (llm_lib.LLMError, llm_lib.AnswerError) as e:
            logging.warning("step %d: no model lessons: %s", step, e)
            return written
        ids = {n.id for n in mine}
        for raw in answer.get("lessons") or []:
            if not isinstance(raw, dict) or not raw.get("title") or not raw.get("content"):
                continue
            written.append(self._merge(raw, ids))
        return written

    def _merge(self, raw: dict, step_ids: set[int]):
        """Adds a lesson, or restates the earlier model lesson that says the same thing."""
        title, content = str(raw["title"]).strip(), str(raw["content"]).strip()
        cited = [i for i in raw.get("nodes") or [] if isinstance(i, int) and i in step_ids]
        nodes = set(cited or step_ids)
        tags = ("lesson", "model", *(str(t) for t in raw.get("tags") or []))
        for item in self.cognition.items():
            if (item.title, item.content) == (title, content):
                return item  # already written (a resumed step replays its answer)
        key = "model:" + hashlib.sha1(title.lower().encode()).hexdigest()[:12]
        same = [
            item
            for item, _ in self.cognition.similar(
                f"{title} {' '.join(tags)} {content}", self.shared.config.novelty_threshold
            )
            if (item.key or "").startswith("model:")
        ]
        if same:
            key = same[0].key
            nodes |= set(same[0].provenance.get("nodes", ()))
        return self.cognition.add_lesson(title, content, nodes=sorted(nodes), tags=tags, key=key)


# ---------------------------------------------------------------- the backend


def preflight(config: LLMConfig, space: SearchSpace):
    """Checks what can be wrong before any work; raises ValueError saying what to fix."""
    credentials = llm_lib.resolve_credentials(config)
    prices = llm_lib.Prices(config.prices_file)
    prices.require(list(config.models().values()))
    templates = load_templates(config.prompts_dir, list(ROLES))
    if space.code_spec() is not None:
        load_template(space.code_spec())  # raises ProgramError naming the template file
    if config.judge_weight > 0 and space.baseline() is None:
        raise ValueError(
            "--judge_weight > 0 needs a search space with a baseline: the judge's [0, 1] score is "
            "blended only into baseline-normalised scores, which share its scale"
        )
    return credentials, prices, templates


def make_gemini(env: AgentEnv) -> AgentTrio:
    """The gemini trio; raises ValueError (CredentialsError, PricesError, PromptError) first."""
    config = env.llm or LLMConfig()
    credentials, prices, templates = preflight(config, env.space)
    record = llm_lib.record_url(config, env.workdir)
    calls = llm_lib.CallRecord(record + "/calls")
    client = llm_lib.LLM(config, credentials, calls, prices)
    embedder = llm_lib.RecordedEmbedder(client, EmbeddingStore(record), calls, "embeddings")
    env.cognition.set_embedder(embedder)
    shared = Shared(config, client, templates, embedder, env.space, describe_task(env.space))
    logging.info(
        "gemini agents: researcher %s, engineer %s, analyzer %s%s; calls recorded under %s",
        config.researcher_model, config.engineer_model, config.analyzer_model,
        f", judge {config.judge_model} (weight {config.judge_weight})" if config.judge_model
        else "",
        record,
    )  # fmt: skip
    if env.space.code_spec() is not None:
        researcher, engineer = CodeResearcher(shared, env.direction), CodeEngineer(shared, env)
    else:
        researcher, engineer = GeminiResearcher(shared, env.direction), GeminiEngineer(shared, env)
    return AgentTrio(
        researcher=researcher,
        engineer=engineer,
        analyzer=GeminiAnalyzer(shared, env.cognition, env.direction, env.run_name),
        cost=Meter(client.ledger, embedder),
    )


make_gemini.preflight = preflight
