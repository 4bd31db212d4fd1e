"""The research loop: sample, learn, design, experiment, analyze, record (DESIGN.md "The loop").

Step 0 evaluates the search space's named seeds (the baseline among them); each later step
proposes ``samples_per_step`` children from the history as it stood when the step began,
hands them to the Engineer in one call (the search space's ``evaluate`` decides how they share
the devices), and commits each node atomically. Every random draw comes
from ``(seed, step, slot)``, so a run killed at any moment and started again with the same
command recomputes the same proposals, skips the nodes already committed, and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from evolve_jax import report, storage
from evolve_jax.agents.base import AgentEnv, DesignContext, Outcome, Proposal, make_agents
from evolve_jax.agents.engineer import RuleEngineer
from evolve_jax.config import RunConfig
from evolve_jax.evaluation import cluster, compile_clock, sandbox, scheduler, workers
from evolve_jax.evaluation.layout import queue_group_size
from evolve_jax.fitness import Fitness
from evolve_jax.memory.cognition import Cognition, load_seed_file
from evolve_jax.memory.history import History, Node, SlotTaken, worst_score
from evolve_jax.memory.lease import Lease
from evolve_jax.report import page
from evolve_jax.sampling import awaiting_remeasure, make_sampler, sampleable
from evolve_jax.search_space import SearchSpace, fingerprint, load

# The flags that say what a run is: resuming it with other values would mix two searches (other
# measurements, other random draws, other slots or models), so it is refused. The others of
# RunConfig.shaping_flags tune later designs and may change on resume (a warning says so).
IDENTITY_FLAGS = frozenset({
    "search_space", "space_opt", "seed", "eval_seeds", "samples_per_step", "schedule", "agents",
    "sampler", "num_islands", "researcher_model", "engineer_model", "analyzer_model",
    "embedding_model", "embedding_dims",
})  # fmt: skip


class LoopError(RuntimeError):
    """The run cannot go on; the message says why."""


@dataclasses.dataclass(frozen=True)
class RunSummary:
    workdir: str
    nodes: list[Node]
    best: Node | None
    direction: str
    report: str
    # Why the run, though it ran to its end, did not search (the driver then exits 1).
    failure: str | None = None


class ResearchLoop:
    def __init__(self, config: RunConfig, space: SearchSpace | None = None):
        self.config = config
        self.space = space or load(config.search_space, **dict(config.space_options))
        self.task = self.space.describe()
        self.history = History(config.workdir)
        self.space.bind(config.workdir)
        direction = "max" if self.space.baseline() else self.task.primary.direction
        self.direction = self.history.initialise(self.space.name, direction)["direction"]
        seed_file = self.space.cognition_seed()
        self.cognition = Cognition(
            load_seed_file(seed_file) if seed_file else (), history=self.history
        )
        self.sampler = make_sampler(
            config.sampler, self.direction, self.space.descriptors(), config.run_name
        )
        if self.space.code_spec() is not None:
            # Programs run in sandboxed workers, which own the accelerators (workers.py).
            workers.keep_controller_off_accelerators()
            # ... and see none of the run's files (history, checkpoints, reports).
            if (local := storage.local_path(config.workdir)) is not None:
                sandbox.hide(local)
        self.devices = jax.local_devices()  # the other processes evaluate on theirs
        self.agents = make_agents(
            config.agents,
            AgentEnv(
                space=self.space,
                history=self.history,
                cognition=self.cognition,
                direction=self.direction,
                devices=self.devices,
                concurrency=config.concurrency,
                max_repairs=config.max_repairs,
                workdir=config.workdir,
                run_name=config.run_name,
                llm=config.llm,
                eval_timeout_s=config.eval_timeout_s,
            ),
        )
        self._started = time.perf_counter()
        self._compiled = compile_clock.seconds()  # compile seconds already counted
        self._spent = 0.0  # USD of LLM calls recorded for this run
        self._evaluated = 0  # candidates evaluated by this process (for the ETA)
        self._primary: dict[int, float | None] = {}  # node id -> stage-0 primary metric mean
        self._remaining = 0
        # (step, slot) -> node id of this run's slots filled by a node since quarantined
        # (History.quarantine): claimed, so never redone; the node is left out.
        self._quarantined: dict[tuple[int, int], int] = {}
        self._lease: Lease | None = None  # the run's lease, held while run() runs
        self._budget_said = False
        self._fingerprints: dict[int, str] = {}  # node id -> fingerprint of its candidate
        self._async_recorded = 0  # children of this run recorded (or quarantined), async

    def _check_lease(self, before: str) -> None:
        """Raises LeaseLost (naming the run, why, and ``before``) if this process has lost the
        run's lease: another process drives the run now, or may; Interrupted if the user asked
        the run to stop."""
        if scheduler.STOP.is_set():
            raise scheduler.Interrupted(f"interrupted before {before}")
        if self._lease is not None:
            self._lease.check(before)

    # ------------------------------------------------------------------ helpers

    # The helpers read the nodes loaded so far; each step refreshes from the store once.

    def _mine(self) -> dict[tuple[int, int], Node]:
        run = self.config.run_name
        return {
            (n.origin["step"], n.origin["slot"]): n
            for n in self.history.nodes(refresh=False)
            if n.origin.get("run") == run
        }

    def _view(self, step: int) -> list[Node]:
        """The history as it stood when ``step`` began (this run's later nodes left out)."""
        run = self.config.run_name
        return [
            n
            for n in self.history.nodes(refresh=False)
            if not (n.origin.get("run") == run and n.origin.get("step", 0) >= step)
        ]

    def _baseline_node(self) -> Node | None:
        name = self.space.baseline()
        if name is None:
            return None
        slot = list(self.space.seeds()).index(name)
        return self._mine().get((0, slot))

    def _fitness(self, stage: int) -> Fitness:
        metrics = self.task.stage_metrics(stage)
        if self.space.baseline() is None:
            return Fitness(metrics)
        base = self._baseline_node()
        if base is None or not base.ok:
            raise LoopError(f"the baseline seed {self.space.baseline()!r} has no successful result")
        if stage == 0:
            by_seed = base.metrics[self.task.stages[0].name]
        else:
            record = base.stages.get(stage)
            if record is None or record["status"] != "ok":
                raise LoopError(f"the baseline has no successful result at stage {stage}")
            by_seed = record["metrics"]
        return Fitness(metrics, baseline=by_seed)

    def _score(self, outcome: Outcome, fitness: Fitness) -> tuple[Outcome, float, dict]:
        if outcome.status != "ok":
            return outcome, worst_score(self.direction), {}
        score, stats = fitness.score(outcome.metrics)
        if not math.isfinite(score):
            outcome = dataclasses.replace(outcome, status="failed", reason=stats.get("error"))
            return outcome, worst_score(self.direction), stats
        return outcome, score, stats

    def _best(self) -> Node | None:
        """The best node so far, leaving out nodes flagged implausible and not yet re-measured."""
        ok = [n for n in self.history.cached().values() if sampleable(n)]
        return self.sampler.ranked(ok)[0] if ok else None

    def _primary_mean(self, by_seed: dict) -> float | None:
        """The mean over seeds of stage 0's primary metric; None unless every seed has a
        finite value."""
        name = self.task.stage_metrics(0)[0].name
        values = [m.get(name) for m in by_seed.values()]
        if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return None
        return float(np.mean(values))

    def _implausible(
        self, step: int, slot: int, outcome: Outcome, visible: frozenset[int] | None = None
    ) -> dict | None:
        """The flag of a child whose stage-0 primary metric beats the best trusted value by
        more than ``implausible_gain`` of that value's magnitude; None when it does not.

        Trusted: the ok nodes not awaiting re-measurement (``sampling.sampleable``) of the
        history as it stood when ``step`` began, and this step's earlier slots (in ``async``:
        of the nodes its design saw, ``visible``); the same committed history gives the same
        decision, in a resumed run too. The gain is the
        improvement in the metric's direction over ``|best|``; against a best of exactly 0 any
        improvement is an infinite gain (stored as null).
        """
        threshold = self.config.implausible_gain
        if step == 0 or outcome.status != "ok" or not math.isfinite(threshold):
            return None
        metric = self.task.stage_metrics(0)[0]
        value = self._primary_mean(outcome.metrics)
        if value is None:
            return None
        run, stage0 = self.config.run_name, self.task.stages[0].name
        sign = 1.0 if metric.direction == "max" else -1.0
        best: tuple[float, int] | None = None  # (signed value, -id): larger is better
        for node in self.history.nodes(refresh=False):
            o = node.origin
            if visible is not None:
                if node.id not in visible:
                    continue  # its design did not see it
            elif o.get("run") == run and (o.get("step", 0), o.get("slot", 0)) >= (step, slot):
                continue  # recorded after this slot (or it is this slot)
            if not sampleable(node):
                continue
            if node.id not in self._primary:
                self._primary[node.id] = self._primary_mean(node.metrics.get(stage0, {}))
            mean = self._primary[node.id]
            if mean is not None and (best is None or (sign * mean, -node.id) > best):
                best = (sign * mean, -node.id)
        if best is None:
            return None
        best_value, best_node = sign * best[0], -best[1]
        improvement = sign * (value - best_value)
        if best_value != 0:
            gain = improvement / abs(best_value)
        else:
            gain = math.inf if improvement > 0 else 0.0
        if not gain > threshold:
            return None
        return {
            "metric": metric.name,
            "value": value,
            "best": best_value,
            "best_node": best_node,
            "gain": gain,
            "threshold": threshold,
        }

    def _descriptor(self, candidate: Any) -> list[float]:
        try:
            return [float(v) for v in self.space.describe_genome(candidate)]
        except Exception:
            return []

    def _record(
        self,
        step: int,
        slot: int,
        proposal: Proposal,
        outcome: Outcome,
        fitness: Fitness,
        siblings: list[tuple[Proposal, float]],
        design_seconds: float,
        visible: frozenset[int] | None = None,
    ) -> Node:
        outcome, score, stats = self._score(outcome, fitness)
        parents = [self.history.get(p) for p in proposal.parents]
        label = f"{step}/{slot}"
        analyzer = self.agents.analyzer
        judgement = (
            analyzer.judge(proposal, outcome, parents, label=label)
            if outcome.status == "ok"
            else None
        )
        if judgement is not None and math.isfinite(score):
            # Blended only into [0, 1] baseline-normalised scores (the backend checks this).
            stats["measured_score"] = score
            weight = judgement["weight"]
            score = (1 - weight) * score + weight * judgement["normalised"]
        analysis = analyzer.analyze(proposal, outcome, score, parents, siblings, label=label)
        stats = {**stats, "repairs": outcome.repairs}
        if outcome.attempts:
            stats["repair_attempts"] = [dict(a) for a in outcome.attempts]
        if outcome.output:
            stats["output"] = dict(outcome.output)
        if proposal.notes:
            stats["design"] = dict(proposal.notes)
        if judgement is not None:
            stats["judge"] = judgement
        implausible = self._implausible(step, slot, outcome, visible)
        if implausible is not None:
            stats["implausible"] = implausible
        if self.agents.cost is not None:
            stats["llm"] = self.agents.cost.take_slot(step, slot)
            self._spent += stats["llm"]["usd"]
        self._check_lease(f"committing step {step} slot {slot}")
        try:
            node = self.history.append(
                parents=list(proposal.parents),
                search_space=self.space.name,
                name=proposal.name,
                motivation=proposal.motivation,
                candidate=outcome.candidate,
                status=outcome.status,
                reason=outcome.reason,
                metrics={self.task.stages[0].name: outcome.metrics} if outcome.metrics else {},
                score=score,
                stats=stats,
                analysis=analysis,
                timings={"design": design_seconds, "evaluate": outcome.seconds},
                island=proposal.island,
                created=time.time(),
                operator=proposal.operator,
                origin={"run": self.config.run_name, "step": step, "slot": slot},
                descriptor=self._descriptor(outcome.candidate),
                cognition_ids=list(proposal.cognition_ids),
            )
        except SlotTaken as e:
            # Another writer (a process that had the lease before it went stale) committed
            # this slot first: its node stands, this one is dropped.
            logging.warning("step %d slot %d: %s; keeping it and moving on", step, slot, e)
            node = self.history.get(e.node_id)
            siblings.append((proposal, node.score))
            return node
        siblings.append((proposal, score))
        if implausible is not None:
            remeasured = self.config.promote_top_k > 0 and len(self.task.stages) > 1
            logging.warning(
                "step %d slot %d | %s (node %d) flagged implausible: %s %.4g against the best "
                "%.4g (node %d), a relative gain of %.3g > %.3g; kept out of parent selection %s",
                step, slot, node.name, node.id, implausible["metric"], implausible["value"],
                implausible["best"], implausible["best_node"], implausible["gain"],
                implausible["threshold"],
                "until re-measured ok at stage 1" if remeasured
                else "for good (no promotion to a costlier stage re-measures it)",
            )  # fmt: skip
        self._log(step, slot, node)
        return node

    def _log(self, step: int, slot: int, node: Node) -> None:
        self._evaluated += 1
        self._remaining = max(self._remaining - 1, 0)
        elapsed = time.perf_counter() - self._started
        eta = elapsed / self._evaluated * self._remaining
        best = self._best()
        best_text = f"{best.score:.4g} ({best.name})" if best else "none"
        reason = f" [{node.reason}]" if node.reason else ""
        cost = ""
        if "llm" in node.stats:
            llm = node.stats["llm"]
            cost = f" | llm {llm['prompt_tokens']}+{llm['output_tokens'] + llm['thinking_tokens']}"
            cost += f" tok ${llm['usd']:.4f}, run ${self._spent:.4f}"
        logging.info(
            "step %d/%d slot %d | %s | %s%s | score %.4g | best %s%s | elapsed %s | eta %s",
            step, self.config.steps, slot, node.name, node.status, reason, node.score,
            best_text, cost, report.clock(elapsed), report.clock(eta),
        )  # fmt: skip

    # ------------------------------------------------------------------ steps

    def seed_step(self) -> None:
        """Step 0: evaluates the named seeds (baseline included) not yet in the history."""
        seeds = list(self.space.seeds().items())
        self.history.refresh()
        mine = self._mine()
        todo = [
            slot
            for slot in range(len(seeds))
            if (0, slot) not in mine and (0, slot) not in self._quarantined
        ]
        if not todo:
            return
        baseline = self.space.baseline()
        if baseline is not None and baseline not in dict(seeds):
            raise LoopError(f"baseline {baseline!r} is not one of the seeds")
        proposals = [
            Proposal(
                name=name,
                motivation=f"seed candidate {name!r} of {self.space.name}",
                candidate=genome,
                operator=None,
                parents=(),
                island=slot % self.config.sampler.num_islands,
            )
            for slot, (name, genome) in enumerate(seeds)
        ]
        outcomes = self.agents.engineer.run(
            [proposals[s].candidate for s in todo], {}, 0, self.config.eval_seed_list
        )
        self._record_usage(0, 0)
        by_slot = dict(zip(todo, outcomes, strict=True))
        fitness = Fitness(self.task.stage_metrics(0))
        if baseline is not None:
            base_slot = [name for name, _ in seeds].index(baseline)
            if base_slot in by_slot:  # record the baseline first: every score depends on it
                todo = [base_slot] + [s for s in todo if s != base_slot]
                outcome = by_slot[base_slot]
                if outcome.status != "ok":
                    raise LoopError(
                        f"baseline seed {baseline!r} {outcome.status}: {outcome.reason}"
                    )
                fitness = Fitness(self.task.stage_metrics(0), baseline=outcome.metrics)
            else:
                fitness = self._fitness(0)
        done = sorted((n.id, slot) for (step, slot), n in mine.items() if step == 0)
        siblings = [(proposals[slot], mine[(0, slot)].score) for _, slot in done]
        for slot in todo:
            self._record(0, slot, proposals[slot], by_slot[slot], fitness, siblings, 0.0)

    def evolve_step(self, step: int) -> None:
        """One step: sample, learn, design every slot; evaluate and record the missing ones."""
        cfg = self.config
        self.history.refresh()
        mine = self._mine()
        todo = [
            s
            for s in range(cfg.samples_per_step)
            if (step, s) not in mine and (step, s) not in self._quarantined
        ]
        view = self._view(step)
        pool = [n for n in view if sampleable(n)]  # flagged nodes wait for re-measurement
        if not pool:
            raise LoopError("no successful node to sample from: every seed failed (see history)")
        self.sampler.sync(self.history, view, step)
        self.agents.researcher.sync(view)
        known = self._known(view)
        proposals: list[Proposal] = []
        design_seconds = []
        width = max(1, self.agents.researcher.batch_size)
        self.cognition.restrict(frozenset(n.id for n in view))
        for first in range(0, cfg.samples_per_step, width):
            # A batch of slots is designed at once; each sees the proposals of earlier batches,
            # so the proposals do not depend on the order in which a batch's answers arrive.
            start = time.perf_counter()
            contexts = []
            for slot in range(first, min(first + width, cfg.samples_per_step)):
                rng = np.random.default_rng([cfg.seed, step, slot])
                selection = self.sampler.select(pool, rng, slot)
                query = " ".join(n.analysis for n in (selection.parent, *selection.references))
                lessons = self.cognition.retrieve(query, cfg.retrieval_k, cfg.max_item_chars)
                contexts.append(
                    DesignContext(
                        step=step,
                        slot=slot,
                        selection=selection,
                        lessons=tuple(lessons),
                        siblings=tuple(proposals),
                        known=frozenset(known),
                        rng=rng,
                    )
                )
            proposals.extend(self.agents.researcher.propose_batch(contexts))
            design_seconds += [(time.perf_counter() - start) / len(contexts)] * len(contexts)
        self.cognition.restrict(None)
        if todo:
            runnable = [s for s in todo if proposals[s].failure is None]
            outcomes = dict(
                zip(
                    runnable,
                    self.agents.engineer.run(
                        [proposals[s].candidate for s in runnable],
                        known,
                        0,
                        cfg.eval_seed_list,
                        labels=[f"{step}/{s}" for s in runnable],
                    ),
                    strict=True,
                )
            )
            self._record_usage(step, 0)
            for s in todo:
                if proposals[s].failure is not None:
                    status, reason = proposals[s].failure
                    outcomes[s] = Outcome(status, reason, {}, proposals[s].candidate)
            fitness = self._fitness(0)
            siblings = [
                (proposals[s], mine[(step, s)].score)
                for s in range(cfg.samples_per_step)
                if (step, s) in mine
            ]
            for slot in todo:
                self._record(
                    step, slot, proposals[slot], outcomes[slot], fitness, siblings,
                    design_seconds[slot],
                )  # fmt: skip
        self.agents.analyzer.write_lessons(self._view(step + 1), step)
        self._record_step_cost(step)

    # ------------------------------------------------------------------ async schedule

    def evolve_async(self) -> None:
        """``--schedule=async``: the ``steps * samples_per_step`` children of the run, each
        designed when a device group is free, from the history as it stands then, and recorded
        as soon as its evaluation is done. Child k takes step ``1 + k // samples_per_step`` and
        slot ``k % samples_per_step`` (its seeds and name); a "generation" is complete when
        that many more children are recorded: lessons are written and the top nodes promoted
        (as evaluations in the same queue). Before a child is evaluated its design is recorded
        (``records/designs``: the node ids it saw, which of their stage results, the lessons it
        retrieved), so a resumed run designs a child that was in flight again from that
        record, and commits nothing twice."""
        cfg = self.config
        width = cfg.samples_per_step
        engineer = self.agents.engineer
        queue = engineer.scheduler
        seeds = cfg.eval_seed_list
        runs = self.space.runs_per_candidate(0, seeds)
        self.history.refresh()
        mine = self._mine()
        designs = dict(self.history.records("designs"))
        children = [
            k
            for k in range(cfg.steps * width)
            if (1 + k // width, k % width) not in mine
            and (1 + k // width, k % width) not in self._quarantined
        ]
        self._async_recorded = sum(1 for step, _ in mine if step >= 1) + sum(
            1 for step, _ in self._quarantined if step >= 1
        )
        generation = self._async_recorded // width
        in_flight: dict[int, tuple[Proposal, Any, frozenset[int], float]] = {}
        promoting: dict[tuple[int, int], Any] = {}  # (node id, stage) -> Attempt, then Outcome
        batches: list[tuple[int, list[Node]]] = []  # promotions submitted, not yet recorded
        self._generation_done(generation, promoting, batches)
        while children or in_flight or promoting:
            if children and not self._over_budget():
                free = queue.free_lanes(runs) or (0 if queue.outstanding else 1)
                batch, children = children[:free], children[free:]
                if batch:
                    self._design_async(batch, designs, in_flight)
            for done in queue.wait() if queue.outstanding else []:
                kind, key = done.evaluation.tag
                attempt = promoting[key] if kind == "promotion" else in_flight[key][1]
                finished = engineer.finish(attempt, done.result, done.seconds)
                if not isinstance(finished, Outcome):  # repaired, or the infrastructure failed
                    engineer.submit(finished, tag=(kind, key))
                elif kind == "promotion":
                    promoting[key] = finished
                else:
                    proposal, _, visible, design_seconds = in_flight.pop(key)
                    self._record_async(key, proposal, finished, visible, design_seconds)
            while self._async_recorded // width > generation:
                generation += 1
                self._generation_done(generation, promoting, batches)
            self._record_finished_promotions(promoting, batches)
            if not children and not in_flight and not promoting:
                break
            if self._over_budget() and not in_flight and not promoting:
                break
        self._record_usage(generation, 1)  # what ran after the last generation's end

    def _over_budget(self) -> bool:
        budget = self.config.budget_usd
        if budget is None or self._spent < budget:
            return False
        if not self._budget_said:
            self._budget_said = True
            logging.info(
                "budget reached: $%.4f of $%.4f spent on LLM calls; designing no more children",
                self._spent, budget,
            )  # fmt: skip
        return True

    def _design_async(self, batch: list[int], designs: dict, in_flight: dict) -> None:
        """Designs children ``batch`` (in one call, so a model designs them concurrently) and
        submits each; a child whose design was recorded by an earlier process is designed
        again from that record."""
        cfg = self.config
        start = time.perf_counter()
        contexts, views = self._async_contexts(batch, designs)
        proposals = self._propose(contexts, views)
        seconds = (time.perf_counter() - start) / len(batch)
        for k, context, proposal, view in zip(batch, contexts, proposals, views, strict=True):
            visible = frozenset(n.id for n in view)
            key = f"{cfg.run_name}/{context.step:06d}/{context.slot:04d}"
            if key not in designs:
                designs[key] = {
                    "visible": _ranges(sorted(visible)),
                    # Stage results change a node's standing (a flagged node re-measured ok
                    # may be a parent): which ones the design saw.
                    "stages": sorted([n.id, s] for n in view for s in n.stages),
                    "lessons": [i.id for i in context.lessons],
                }
                self.history.write_record("designs", key, designs[key])
            if proposal.failure is not None:
                status, reason = proposal.failure
                outcome = Outcome(status, reason, {}, proposal.candidate)
                self._record_async(k, proposal, outcome, visible, seconds)
                continue
            known = self._known(view)
            label = f"{context.step}/{context.slot}"
            started = self.agents.engineer.start(
                proposal.candidate, known, 0, cfg.eval_seed_list, label
            )
            if isinstance(started, Outcome):
                self._record_async(k, proposal, started, visible, seconds)
                continue
            in_flight[k] = (proposal, started, visible, seconds)
            self.agents.engineer.submit(started, tag=("child", k))

    def _async_contexts(
        self, batch: list[int], designs: dict
    ) -> tuple[list[DesignContext], list[list[Node]]]:
        """The design context of each child of ``batch`` and the nodes it sees: those of its
        design record if there is one, else the history as it stands."""
        cfg = self.config
        width = cfg.samples_per_step
        now = self.history.nodes(refresh=False)
        by_id = {n.id: n for n in now}
        items = {i.id: i for i in self.cognition.items()}
        contexts, views = [], []
        for k in batch:
            step, slot = 1 + k // width, k % width
            record = designs.get(f"{cfg.run_name}/{step:06d}/{slot:04d}")
            if record is not None:
                seen = {tuple(pair) for pair in record["stages"]}
                view = [
                    dataclasses.replace(
                        by_id[i],
                        stages={s: r for s, r in by_id[i].stages.items() if (i, s) in seen},
                    )
                    for i in _expand(record["visible"])
                    if i in by_id  # less any quarantined since
                ]
            else:
                view = now
            pool = [n for n in view if sampleable(n)]
            if not pool:
                raise LoopError(
                    "no successful node to sample from: every seed failed (see history)"
                )
            self.sampler.sync(self.history, view, step)  # per child: select counts pending visits
            rng = np.random.default_rng([cfg.seed, step, slot])
            selection = self.sampler.select(pool, rng, slot)
            if record is not None:
                lessons = [items[i].clipped(cfg.max_item_chars) for i in record["lessons"]]
            else:
                self.cognition.restrict(frozenset(by_id))
                query = " ".join(n.analysis for n in (selection.parent, *selection.references))
                lessons = self.cognition.retrieve(query, cfg.retrieval_k, cfg.max_item_chars)
                self.cognition.restrict(None)
            known = frozenset(self._known(view))
            contexts.append(DesignContext(step, slot, selection, tuple(lessons), (), known, rng))
            views.append(view)
        return contexts, views

    def _known(self, view: list[Node]) -> dict[str, int]:
        """Fingerprint -> node id over ``view`` (each node's fingerprint computed once)."""
        for n in view:
            if n.id not in self._fingerprints:
                self._fingerprints[n.id] = fingerprint(n.candidate)
        return {self._fingerprints[n.id]: n.id for n in view}

    def redesign(self, step: int, slot: int) -> Proposal:
        """Child (``step``, ``slot``) of an async run designed again from its design record
        (what a resumed run does for a child that was in flight); KeyError without one."""
        cfg = self.config
        key = f"{cfg.run_name}/{step:06d}/{slot:04d}"
        designs = dict(self.history.records("designs"))
        if key not in designs:
            raise KeyError(f"no design record {key}")
        self.history.refresh()
        k = (step - 1) * cfg.samples_per_step + slot
        contexts, views = self._async_contexts([k], {key: designs[key]})
        return self._propose(contexts, views)[0]

    def _propose(self, contexts: list[DesignContext], views: list[list[Node]]) -> list[Proposal]:
        """The Researcher's proposals, one batch per run of contexts that share a view (its
        learned statistics are rebuilt from the view before each)."""
        proposals: list[Proposal] = []
        first = 0
        while first < len(contexts):
            last = first + 1
            while last < len(contexts) and views[last] is views[first]:
                last += 1
            self.agents.researcher.sync(views[first])
            proposals += self.agents.researcher.propose_batch(contexts[first:last])
            first = last
        return proposals

    def _record_async(
        self, k: int, proposal: Proposal, outcome: Outcome, visible: frozenset[int], seconds: float
    ) -> None:
        width = self.config.samples_per_step
        step, slot = 1 + k // width, k % width
        self._record(step, slot, proposal, outcome, self._fitness(0), [], seconds, visible)
        self._async_recorded += 1

    def _generation_done(self, generation: int, promoting: dict, batches: list) -> None:
        """What follows ``generation`` complete generations of children (0: the seeds):
        lessons from the history as it stands, and the promotions it calls for, submitted to
        the queue (the devices need not wait for them)."""
        view = self.history.nodes(refresh=False)
        if generation >= 1:
            self._record_usage(generation, 0)  # everything the queue ran meanwhile
            self.agents.analyzer.write_lessons(view, generation)
            self._record_step_cost(generation)
            self._write_page(live=True)
        for stage, todo in self._promotions(view, busy=frozenset(promoting)):
            for node in todo:
                attempt = self.agents.engineer.start(
                    node.candidate, {}, stage, self.config.eval_seed_list
                )
                promoting[(node.id, stage)] = attempt
                if not isinstance(attempt, Outcome):  # an Outcome: its schema no longer holds
                    self.agents.engineer.submit(attempt, tag=("promotion", (node.id, stage)))
            batches.append((stage, todo))

    def _record_finished_promotions(self, promoting: dict, batches: list) -> None:
        """Records each promotion batch whose evaluations are all done, in submission order."""
        while batches:
            stage, todo = batches[0]
            outcomes = [promoting[(n.id, stage)] for n in todo]
            if not all(isinstance(o, Outcome) for o in outcomes):
                return
            batches.pop(0)
            self._record_promotions(stage, todo, outcomes)
            for n in todo:
                del promoting[(n.id, stage)]

    def _record_usage(self, step: int, stage: int) -> None:
        """Logs and records (once) how busy the devices were while ``step`` evaluated at
        ``stage``: busy device-seconds over the device-seconds the evaluation took; and the
        seconds this process spent compiling since the last record."""
        compiled = compile_clock.seconds()
        if compiled > self._compiled:
            self.history.write_record(
                "compile",
                f"{self.config.run_name}/{step:06d}/{stage:02d}",
                {"seconds": compiled - self._compiled, "scope": "process 0"},
            )
        self._compiled = compiled
        usage = self.agents.engineer.take_usage()
        if not usage.get("available_device_seconds"):
            return
        runs = self.space.runs_per_candidate(stage, self.config.eval_seed_list)
        usage["layout"] = {
            "devices": len(self.devices),
            "group_size": queue_group_size(len(self.devices), runs),
            "runs_per_candidate": runs,
        }
        per = ", ".join(
            f"process {p} {100 * u['utilisation']:.0f}%" for p, u in usage["processes"].items()
        )
        logging.info(
            "step %d stage %d: %d evaluation(s) in group(s) of %d of %d device(s), %d run(s) "
            "each; device utilisation %.0f%% (%.1f of %.1f device-s; %s)",
            step, stage, usage["evaluations"], usage["layout"]["group_size"], len(self.devices),
            runs, 100 * usage["utilisation"], usage["busy_device_seconds"],
            usage["available_device_seconds"], per,
        )  # fmt: skip
        self.history.write_record(
            "utilisation", f"{self.config.run_name}/{step:06d}/{stage:02d}", usage
        )

    def _record_step_cost(self, step: int) -> None:
        """Writes the cost of ``step`` not charged to a node (lessons, embeddings) once."""
        if self.agents.cost is None:
            return
        usage = self.agents.cost.take_step(step)
        key = f"{self.config.run_name}/{step:06d}"
        if usage["calls"] and self.history.write_record("llm_step_usage", key, usage):
            self._spent += usage["usd"]

    def spent_usd(self) -> float:
        """This run's LLM cost so far, as recorded in the history (nodes and steps)."""
        run = self.config.run_name
        nodes = sum(
            n.stats.get("llm", {}).get("usd", 0.0)
            for n in self.history.nodes(refresh=False)
            if n.origin.get("run") == run
        )
        steps = sum(
            v["usd"] for k, v in self.history.records("llm_step_usage") if k.startswith(f"{run}/")
        )
        return nodes + steps

    def promote(self, step: int) -> None:
        """Evaluates the top ``promote_top_k`` nodes (and the baseline) at the costlier stages,
        and the nodes flagged implausible and not yet evaluated at stage 1, at stage 1.

        It runs after every step; nodes already promoted are not evaluated again. Flagged
        nodes take no place in the top k; with ``promote_top_k`` 0 nothing is promoted, so
        they are never re-measured.

        The ranking is of the history as it stood at the end of ``step``, so a resumed run
        promotes what the uninterrupted run did.
        """
        for stage, todo in self._promotions(self._view(step + 1)):
            outcomes = self.agents.engineer.run(
                [n.candidate for n in todo], {}, stage, self.config.eval_seed_list
            )
            self._record_usage(step, stage)
            self._record_promotions(stage, todo, outcomes)

    def _promotions(self, view: list[Node], busy=frozenset()) -> list[tuple[int, list[Node]]]:
        """(stage, nodes) to evaluate at each costlier stage, ranked on ``view``; nodes already
        evaluated at a stage (or in ``busy``, pairs of node id and stage) are left out."""
        k = self.config.promote_top_k
        if k == 0 or len(self.task.stages) < 2:
            return []
        chosen = self.sampler.ranked([n for n in view if sampleable(n)])[:k]
        flagged = [n for n in view if n.ok and awaiting_remeasure(n) and 1 not in n.stages]
        base = self._baseline_node()
        if base is not None:
            chosen = [base] + [n for n in chosen if n.id != base.id]
        batches = []
        for stage in range(1, len(self.task.stages)):
            todo = [n for n in chosen if stage not in n.stages]
            if stage == 1:
                todo += flagged  # never among the chosen: those are trusted nodes
            todo = [n for n in todo if (n.id, stage) not in busy]
            if todo:
                batches.append((stage, todo))
        return batches

    def _record_promotions(self, stage: int, todo: list[Node], outcomes: list[Outcome]) -> None:
        """Records the stage-``stage`` results of ``todo`` (the baseline's first: the others'
        scores are measured against it)."""
        base = self._baseline_node()
        order = sorted(range(len(todo)), key=lambda i: base is None or todo[i].id != base.id)
        for i in order:
            node, outcome = self.history.get(todo[i].id), outcomes[i]
            if base is not None and node.id == base.id and outcome.status != "ok":
                raise LoopError(f"baseline failed at stage {stage}: {outcome.reason}")
            fitness = self._fitness(stage) if base is None or node.id != base.id else None
            if fitness is None:
                fitness = Fitness(self.task.stage_metrics(stage), baseline=outcome.metrics)
            outcome, score, stats = self._score(outcome, fitness)
            self._check_lease(f"recording node {node.id}'s result at stage {stage}")
            self.history.add_stage_result(
                node.id,
                stage,
                {
                    "stage": stage,
                    "stage_name": self.task.stages[stage].name,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "metrics": outcome.metrics,
                    "score": score,
                    "stats": stats,
                    "seconds": outcome.seconds,
                    "created": time.time(),
                },
            )
            logging.info(
                "promoted %s to stage %d (%s): %s score %.4g (stage 0: %.4g)",
                node.name, stage, self.task.stages[stage].name, outcome.status, score,
                node.score,
            )  # fmt: skip
            if "implausible" in node.stats and stage == 1:
                logging.info(
                    "%s (node %d), flagged implausible, re-measured at stage 1: %s",
                    node.name, node.id,
                    "ok, it may be a parent now" if outcome.status == "ok"
                    else "not ok, it stays out of parent selection",
                )  # fmt: skip

    def run(self) -> RunSummary:
        """Runs (or resumes) the search, holding the run's lease throughout (lease.py); raises
        LeaseLost at the first check (before a step, a commit, the report) after losing it."""
        with Lease(self.history, self.config.run_name) as lease:
            self._lease = lease
            try:
                return self._run()
            finally:  # ended, well or not: the page stops reloading itself
                self._lease = None
                if (close := getattr(self.agents.engineer, "close", None)) is not None:
                    close()
                if not lease.lost:  # else the page is the new holder's to write
                    self._write_page(live=False)

    def _check_same_run(self) -> None:
        """Raises LoopError, naming each difference, when the run was started with other
        values of the flags that say what it is (``IDENTITY_FLAGS``): resuming would mix two
        searches in one run. Other shaping flags may change; a warning names them."""
        cfg = self.config
        described = dict(self.history.records("runs")).get(cfg.run_name)
        if described is None:
            return
        recorded = described.get("flags")
        if recorded is None:  # a run described before flags were recorded: its schedule only
            recorded = {"schedule": described.get("settings", {}).get("schedule", "steps")}
        now = json.loads(json.dumps(cfg.shaping_flags()))  # as stored: lists, not tuples

        def text(name: str, value: Any) -> str:
            if name == "space_opt":
                return " ".join(f"--space_opt={v}" for v in value) or "no --space_opt"
            return f"--{name}={'' if value is None else value}"

        differ = [n for n in sorted(set(recorded) | set(now)) if recorded.get(n) != now.get(n)]
        tuned = [n for n in differ if n not in IDENTITY_FLAGS]
        if tuned:
            logging.warning(
                "resuming %r with %s (it was started with %s): the designs from now on use them",
                cfg.run_name, " ".join(text(n, now.get(n)) for n in tuned),
                " ".join(text(n, recorded.get(n)) for n in tuned),
            )  # fmt: skip
        changed = [n for n in differ if n in IDENTITY_FLAGS]
        if changed:
            was = " ".join(text(n, recorded.get(n)) for n in changed)
            asked = " ".join(text(n, now.get(n)) for n in changed)
            raise LoopError(
                f"run {cfg.run_name!r} in {cfg.workdir} was started with {was}; this command "
                f"has {asked}. Resuming would mix two searches: start a new run with another "
                f"--run_name or --workdir, or resume with the run's own flags (--steps may "
                f"change: more steps extend the run)"
            )

    def _describe_run(self) -> None:
        """Records once what the report needs beyond the nodes: how each stage is measured,
        the run's settings and the prior knowledge the search started from."""
        cfg = self.config
        self.history.write_record(
            "runs",
            cfg.run_name,
            {
                "started": time.time(),
                "task": {
                    "title": self.task.title,
                    "stages": [
                        {
                            "name": stage.name,
                            "description": stage.description,
                            "metrics": [dataclasses.asdict(m) for m in self.task.stage_metrics(i)],
                        }
                        for i, stage in enumerate(self.task.stages)
                    ],
                },
                "settings": {
                    "agents": cfg.agents,
                    "sampler": cfg.sampler.name,
                    "steps": cfg.steps,
                    "schedule": cfg.schedule,
                    "samples_per_step": cfg.samples_per_step,
                    "eval_seeds": cfg.eval_seeds,
                    "promote_top_k": cfg.promote_top_k,
                    "implausible_gain": cfg.implausible_gain,  # inf (off) is stored as null
                    "space_options": [list(o) for o in cfg.space_options],
                },
                "flags": cfg.shaping_flags(),
                "prior_knowledge": [
                    {"id": i.id, "title": i.title, "source": i.source, "tags": list(i.tags)}
                    for i in self.cognition.items()
                    if i.source != "analyzer"
                ],
            },
        )

    def _write_page(self, live: bool) -> None:
        """Rewrites the HTML report (whole, atomically); a failure to write it is logged, not
        raised: the search matters more than its picture."""
        try:
            page.write(self.config.workdir, live=live, history=self.history)
        except Exception as e:  # any error in the report leaves the run going
            logging.warning("could not write the HTML report: %s", e)

    def _run(self) -> RunSummary:
        cfg = self.config
        self._check_same_run()
        self._describe_run()
        self.history.refresh()
        mine = self._mine()
        quarantined = self.history.quarantined()
        if quarantined:
            claims = self.history.slot_claims(cfg.run_name)
            self._quarantined = {k: i for k, i in claims.items() if i in quarantined}
            for (step, slot), node_id in sorted(self._quarantined.items()):
                logging.warning(
                    "node %d (step %d slot %d) is quarantined (quarantine/%010d): left out, and "
                    "its slot is not redone", node_id, step, slot, node_id,
                )  # fmt: skip
        total = len(self.space.seeds()) + cfg.steps * cfg.samples_per_step
        self._remaining = total - len(mine) - len(self._quarantined)
        if mine:
            logging.info(
                "resuming %r: %d of %d nodes already recorded", cfg.run_name, len(mine), total
            )
        self.seed_step()
        self.agents.analyzer.write_lessons(self._view(1), 0)
        self._record_step_cost(0)
        if cfg.schedule == "steps":
            self.promote(0)  # async queues these with the first children
        self._write_page(live=True)
        self._spent = self.spent_usd()
        if cfg.schedule == "async":
            self.evolve_async()
        for step in range(1, cfg.steps + 1) if cfg.schedule == "steps" else ():
            if cfg.budget_usd is not None and self._spent >= cfg.budget_usd:
                logging.info(
                    "budget reached: $%.4f of $%.4f spent on LLM calls; stopping before step %d",
                    self._spent, cfg.budget_usd, step,
                )  # fmt: skip
                break
            self._check_lease(f"step {step}")
            self.evolve_step(step)
            self.promote(step)
            self._write_page(live=True)
        self._check_lease("writing the run's report")
        nodes = self.history.nodes()
        self.history.refresh_stages()
        text = report.render(nodes, self.direction, self.task, cfg.top_k_report, cfg.workdir)
        if (utilisation := report.utilisation_line(self.history, cfg.run_name)) is not None:
            text += "\n" + utilisation
        if self.agents.cost is not None:
            text += "\n" + report.cost_line(nodes, self.history, cfg.run_name, cfg.budget_usd)
        if quarantined:
            ids = ", ".join(map(str, quarantined))
            text += f"\nquarantined, left out: node(s) {ids} (python -m evolve_jax.history "
            text += f"--workdir={cfg.workdir} --quarantined)"
        report.save(cfg.workdir, text)
        return RunSummary(
            cfg.workdir, nodes, self._best(), self.direction, text, self._no_search(nodes)
        )

    def _no_search(self, nodes: list[Node]) -> str | None:
        """Says so when every child of this run failed calling the model (an unreachable API,
        a wrong key or address): the run spent its compute on the seeds alone."""
        run = self.config.run_name
        children = [n for n in nodes if n.origin.get("run") == run and n.origin.get("step", 0)]
        failed = [n for n in children if n.status == "failed" and (n.reason or "").startswith(
            "researcher: ")]  # fmt: skip
        if not children or len(failed) < len(children):
            return None
        return (
            f"every child of run {run!r} ({len(children)}) failed calling the model, so nothing "
            f"was searched (first: {failed[0].reason}); check the API's address, the key and "
            "the network, then start another --run_name (these slots are recorded as failed)"
        )


def run(config: RunConfig, space: SearchSpace | None = None) -> RunSummary:
    """Runs (or resumes) the search described by ``config``; returns its summary.

    In a job of several processes (``evaluation/cluster.py``) process 0 runs the search and the
    others evaluate what its work queue deals them until it is done.
    """
    job = cluster.current()
    if not job.leader:
        return _serve(config, space, job)
    try:
        return ResearchLoop(config, space).run()
    finally:
        job.stop_workers()


def _serve(config: RunConfig, space: SearchSpace | None, job: cluster.Cluster) -> RunSummary:
    space = space or load(config.search_space, **dict(config.space_options))
    space.bind(config.workdir)  # checkpoints of promoted candidates land in the same workdir
    devices = jax.local_devices()
    engineer = RuleEngineer(space, devices, config.concurrency, config.max_repairs)
    evaluated = job.serve(engineer.evaluate_one, len(devices), engineer.concurrency)
    job.leave()
    text = (
        f"process {job.process_id} of {job.num_processes}: evaluated {evaluated} candidate(s) "
        f"for process 0, which records them (report: {config.workdir})"
    )
    return RunSummary(config.workdir, [], None, "max", text)


def _ranges(ids: Sequence[int]) -> list[list[int]]:
    """Sorted ids as [first, last] runs (a design's view is usually one or two)."""
    out: list[list[int]] = []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _expand(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [i for first, last in ranges for i in range(first, last + 1)]


def same_history(a: Sequence[Node], b: Sequence[Node]) -> bool:
    """Whether two histories hold the same nodes, ignoring wall-clock fields."""

    def strip(node: Node) -> dict:
        record = node.to_json()
        for key in ("created", "timings"):
            record.pop(key)
        return record

    return [strip(n) for n in a] == [strip(n) for n in b]
