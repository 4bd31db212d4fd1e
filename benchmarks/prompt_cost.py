"""Tokens and estimated dollars per step of the gemini backend, from the prompts the code builds.

    python -m benchmarks.prompt_cost [--budget=quickstart|gpu] [--steps=N] [--seeds=0,1,2]

Runs the linear-attention search with ``--agents=gemini`` against the fake Gemini server that
the tests use (evolve_jax/testing/fake_gemini.py), so every prompt is the one a real run would
send at that step: the space's task, schema and operators, the parents' metrics and analyses,
the lessons. Only the training is replaced, by synthetic metrics of the same names, sizes and
per-seed layout (training does not change a prompt's length), so a measurement takes minutes,
not hours.

Measured: prompt tokens per role and step, as characters / 4 (the fake's count; Gemini's
tokenizer differs, JSON often runs denser). Not measured: a live model's answer length and
thinking tokens. Output tokens here are the fake's answers (a genome-sized JSON object), so
dollars are priced at prices.json's rates with that output and no thinking: add
``thinking_tokens x output price`` for a thinking model.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import statistics
import tempfile

import numpy as np
from absl import app, flags, logging

from evolve_jax import loop
from evolve_jax.agents.llm import Prices, Usage
from evolve_jax.config import LLMConfig, RunConfig
from evolve_jax.sampling import SamplerConfig
from evolve_jax.search_space import EvalResult
from evolve_jax.testing.fake_gemini import FakeGemini, answer_for_analyzer_or_judge
from search_spaces.linear_attention import genome
from search_spaces.linear_attention.space import LinearAttentionSpace

_BUDGET = flags.DEFINE_enum("budget", "quickstart", ["quickstart", "gpu"], "Which flagfile.")
_STEPS = flags.DEFINE_integer("steps", 2, "Evolution steps measured.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Run seeds (spread across runs).")

# The search settings of configs/quickstart.flags and configs/gpu.flags that shape prompts.
BUDGETS = {
    "quickstart": dict(samples_per_step=2, eval_seeds=1, promote_top_k=2, sampler="greedy"),
    "gpu": dict(samples_per_step=8, eval_seeds=4, promote_top_k=8, sampler="islands"),
}


class SyntheticSpace(LinearAttentionSpace):
    """The linear-attention space with training replaced by hash-derived metrics: each metric of
    the stage (its name and direction from ``describe()``), a value in a plausible range."""

    def evaluate(self, candidates, stage, seeds, devices):
        metrics_of_stage = self.describe().stage_metrics(stage)
        results = []
        for candidate in candidates:
            metrics = {}
            for seed in seeds:
                h = hashlib.sha256(f"{json.dumps(candidate, sort_keys=True)}{seed}".encode())
                u = int.from_bytes(h.digest()[:4], "little") / 2**32
                metrics[seed] = {
                    m.name: (2.5 - u) if m.direction == "min" else (0.2 + 0.6 * u)
                    for m in metrics_of_stage
                }
            results.append(EvalResult(metrics=metrics))
        return results


ROLE_PREFIXES = (
    ("You are the Researcher", "researcher"),
    ("You are the Engineer", "engineer"),
    ("You are the Analyzer of an automated research loop. Given", "analyzer"),
    ("You are the Analyzer", "lessons"),
    ("You are a reviewer", "judge"),
)


def respond_other(system: str, prompt: str) -> str:
    """The Analyzer's, the lessons' and the judge's answers: short, fixed-shape JSON (the same
    answers as the test suite's fake responder gives these roles)."""
    answer = answer_for_analyzer_or_judge(system, hashlib.sha256(prompt.encode()).digest())
    if answer is None:
        raise ValueError(f"unexpected prompt: {system[:60]}")
    return answer


def respond(request: dict) -> str:
    """The fake's answers: a Researcher's child (or an Engineer's repair) is a typed mutation of
    the prompt's parent, with a motivation of a typical length; the other roles as in
    ``respond_other``."""
    system = request["systemInstruction"]["parts"][0]["text"]
    prompt = "".join(c["parts"][0]["text"] for c in request["contents"])
    if system.startswith("You are the Engineer"):
        parent = json.loads(prompt.split("# Candidate\n", 1)[1].split("\n", 1)[0])
    elif system.startswith("You are the Researcher"):
        parent = json.loads(re.search(r"Parent: .*?\n  candidate: (\{.*?\})\n", prompt, re.S)[1])
    else:
        return respond_other(system, prompt)
    rng = np.random.default_rng(list(hashlib.sha256(prompt.encode()).digest()[:8]))
    names = sorted(n for n, op in genome.OPERATORS.items() if op.arity == 1)
    op = names[int(rng.integers(len(names)))]
    child = genome.OPERATORS[op].fn(rng, [parent])
    motivation = (
        f"Apply {op} to the parent: the lessons suggest that this group of genes limits recall "
        "on MQAR at this width, and the references that changed it scored higher; the change "
        "keeps the parameter count within budget and the mixer sub-quadratic."
    )
    if system.startswith("You are the Engineer"):
        return json.dumps({"diagnosis": f"{op} away from the failure", "candidate": child})
    return json.dumps({"name": op, "motivation": motivation, "candidate": child})


def measure(budget: str, steps: int, seed: int) -> dict[int, dict[str, Usage]]:
    """Usage by step and role ("researcher", "engineer", "analyzer", "lessons", "embeddings")."""
    settings = BUDGETS[budget]
    with tempfile.TemporaryDirectory() as tmp, FakeGemini(respond) as server:
        space = SyntheticSpace()
        config = RunConfig(
            search_space="linear_attention",
            workdir=os.path.join(tmp, "run"),
            steps=steps,
            seed=seed,
            sampler=SamplerConfig(name=settings["sampler"], num_islands=3),
            agents="gemini",
            samples_per_step=settings["samples_per_step"],
            eval_seeds=settings["eval_seeds"],
            promote_top_k=settings["promote_top_k"],
            llm=LLMConfig(base_url=server.url, attempts=1),
        )
        summary = loop.run(config, space)
        prices = Prices()
        by_step: dict[int, dict[str, Usage]] = collections.defaultdict(
            lambda: collections.defaultdict(Usage)
        )
        # Requests carry no step: attribute them in order, a step ending with its lessons call.
        step = 0
        for request in server.requests:
            body = request["body"]
            if request["method"] == "batchEmbedContents":
                chars = sum(len(r["content"]["parts"][0]["text"]) for r in body["requests"])
                usage = Usage(calls=1, prompt_tokens=-(-chars // 4))
                role = "embeddings"
            else:
                system = body["systemInstruction"]["parts"][0]["text"]
                text = system + "".join(c["parts"][0]["text"] for c in body["contents"])
                answer = respond(body)
                usage = Usage(
                    calls=1, prompt_tokens=-(-len(text) // 4), output_tokens=-(-len(answer) // 4)
                )
                role = next(r for prefix, r in ROLE_PREFIXES if system.startswith(prefix))
                if role == "researcher" and step == 0:
                    step = 1
            usage.usd = prices.cost(request["model"], usage)
            by_step[step][role].add(usage)
            if role == "lessons":
                step += 1
        del summary
        return by_step


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    os.environ["GEMINI_API_KEY"] = "unused-by-the-local-fake"  # never leaves this machine
    per_step = collections.defaultdict(list)  # role -> [(prompt tokens, output tokens, usd)]
    for seed in map(int, _SEEDS.value):
        by_step = measure(_BUDGET.value, _STEPS.value, seed)
        for step in range(1, _STEPS.value + 1):
            for role, usage in by_step[step].items():
                per_step[role].append(
                    (usage.calls, usage.prompt_tokens, usage.output_tokens, usage.usd)
                )
            total = Usage()
            for usage in by_step[step].values():
                total.add(usage)
            per_step["step total"].append(
                (total.calls, total.prompt_tokens, total.output_tokens, total.usd)
            )
    print(
        f"budget {_BUDGET.value}: per evolution step, mean (min-max) over "
        f"{len(_SEEDS.value)} seeds x {_STEPS.value} steps"
    )
    print(f"{'role':>12}  {'calls':>10}  {'prompt tokens':>22}  {'output tokens':>18}  {'USD':>22}")
    for role, rows in per_step.items():
        cols = []
        for i, fmt in ((0, "{:.1f}"), (1, "{:.0f}"), (2, "{:.0f}"), (3, "{:.4f}")):
            values = [r[i] for r in rows]
            cols.append(
                f"{fmt.format(statistics.mean(values))} "
                f"({fmt.format(min(values))}-{fmt.format(max(values))})"
            )
        print(f"{role:>12}  {cols[0]:>10}  {cols[1]:>22}  {cols[2]:>18}  {cols[3]:>22}")


if __name__ == "__main__":
    app.run(main)
