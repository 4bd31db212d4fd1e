"""Code mode of the linear-attention space: a program's TokenMixer, checked and trained sandboxed.

The program (``programs/template.py`` with its EVOLVE-BLOCK filled) defines ``TokenMixer``; the
rest of the model (embedding, MLPs, depth, width) is the frame genome's. Everything that runs
the program happens in a sandboxed worker (``evolve_jax.evaluation.sandbox``):

* ``check``: import, the interface (class, call, output and state shapes), then the checks
  genomes get (parameter budget, shapes, causality by perturbing later inputs, sub-quadratic cost).
* ``train``: training for every seed as in genome mode; then the worker says it is done, the
  controller sends the held-out inputs (never the targets) and the worker answers with logits at
  the positions to score. The controller computes the metrics from those logits, so a program
  that prints a score, writes a results file or patches the worker's metric code changes
  nothing.

Held-out inputs are the ones genome mode measures (a deterministic function of the seed), so
every candidate, code or genome, is compared on the same examples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolve_jax.evaluation import sandbox
from evolve_jax.search_space import CheckFailure, EvalResult

PROGRAMS = os.path.join(os.path.dirname(__file__), "programs")
TEMPLATE = os.path.join(PROGRAMS, "template.py")
SEED_PROGRAMS = ("linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet")
ENTRY = "TokenMixer"
_TARGET = "search_spaces.linear_attention.code_mode:worker"
_EVAL_BATCH = 64


# ------------------------------------------------------------------ controller side


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """What the controller scores on: inputs (sent), positions (sent) and targets (kept)."""

    inputs: np.ndarray  # [S, N, T] int32
    positions: np.ndarray  # [S, N, T] bool
    targets: np.ndarray  # [S, M] int32, M = positions per seed
    # MQAR's numbers of pairs: each target's group [M] and each group's accuracy metric name.
    # Loss and accuracy are then means over the groups, as genome mode computes them.
    groups: np.ndarray | None = None
    group_metrics: tuple[str, ...] = ()


def score_logits(logits: Any, held: HeldOut, vocab: int) -> tuple[dict[int, tuple], str | None]:
    """Per-seed (mean cross-entropy, accuracy, {group metric: accuracy}) of the worker's
    logits; or an error."""
    shape = (*held.targets.shape, vocab)
    if not isinstance(logits, np.ndarray) or logits.shape != shape:
        got = getattr(logits, "shape", type(logits).__name__)
        return {}, f"outputs: logits of shape {got}, expected {shape}"
    logits = logits.astype(np.float64)
    if not np.all(np.isfinite(logits)):
        return {}, "outputs: the logits hold non-finite values"
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, held.targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == held.targets
    if held.groups is None:
        return {
            i: (float(nll[i].mean()), float(correct[i].mean()), {}) for i in range(len(nll))
        }, None
    scores = {}
    for i in range(len(nll)):
        per_group = [
            (nll[i][held.groups == g], correct[i][held.groups == g])
            for g in range(len(held.group_metrics))
        ]
        accuracy = {
            name: float(c.mean())
            for name, (_, c) in zip(held.group_metrics, per_group, strict=True)
        }
        loss = float(np.mean([n.mean() for n, _ in per_group]))
        scores[i] = (loss, float(np.mean(list(accuracy.values()))), accuracy)
    return scores, None


def _failure(report: sandbox.Report, reply: dict | None) -> str:
    if reply and "error" in reply:
        return str(reply["error"])
    return report.reason() or "the worker stopped without an answer"


def run_check(request: dict, limits: sandbox.Limits, env, source: str) -> list[CheckFailure]:
    """The program's static checks in a sandboxed worker."""
    files = {"candidate.py": source}
    reply, report = sandbox.run_once(_TARGET, request, None, limits, files=files, env=env)
    header = reply[0] if reply else None
    if header is None or "failures" not in header:
        return [CheckFailure("sandbox", _failure(report, header))]
    return [CheckFailure(str(c), str(r)) for c, r in header["failures"]]


def run_training(
    request: dict,
    limits: sandbox.Limits,
    env,
    source: str,
    held: HeldOut,
    vocab: int,
    metric_names: tuple[str, str],
) -> tuple[EvalResult, dict[int, dict[str, np.ndarray]]]:
    """Trains in a worker, scores its logits on ``held`` here; returns (result, params by seed)."""
    seeds = request["seeds"]
    files = {"candidate.py": source}
    box = sandbox.Sandbox(_TARGET, limits, files=files, env=env)
    try:
        with box:
            box.send(request)
            trained, _ = box.receive()
            if trained.get("trained"):
                # The held-out inputs leave this process only now, after training is over.
                box.send({"job": "outputs"}, {"inputs": held.inputs, "positions": held.positions})
                header, arrays = box.receive()
    except sandbox.SandboxError as e:
        report = box.finish()
        error = report.reason() or f"sandbox: {e}"
        return EvalResult(error=error, timed_out=report.timed_out, extra=_output(report)), {}
    report = box.finish()
    if not trained.get("trained"):
        return EvalResult(error=_failure(report, trained), extra=_output(report)), {}
    if "error" in header:
        return EvalResult(error=str(header["error"]), extra=_output(report)), {}
    by_seed, error = score_logits(arrays.get("logits"), held, vocab)
    if error is not None:
        return EvalResult(error=error, extra=_output(report)), {}
    losses = trained.get("final_train_loss", {})
    rates = trained.get("learning_rate", {})
    metrics = {}
    for i, seed in enumerate(seeds):
        loss, accuracy, per_group = by_seed[i]
        values = {**dict(zip(metric_names, (loss, accuracy), strict=True)), **per_group}
        for name, reported in (("final_train_loss", losses), ("learning_rate", rates)):
            value = reported.get(str(seed))
            values[name] = float(value) if value is not None else math.nan
        metrics[seed] = values
    params: dict[int, dict] = {}
    for name, array in arrays.items():
        if name.startswith("param:"):
            _, seed, path = name.split(":", 2)
            node = params.setdefault(int(seed), {})
            *parents, leaf = [int(k) if k.isdigit() else k for k in path.split("/")]
            for key in parents:  # nnx.to_pure_dict's nesting, list indices as ints
                node = node.setdefault(key, {})
            node[leaf] = array
    return EvalResult(metrics=metrics, extra=_output(report)), params


def _output(report: sandbox.Report) -> dict:
    return {"output": report.output_tail()}


def load_mixer(source: str):
    """The program's TokenMixer class, built by running the program in this process.

    Only for programs from the user's own history (restoring a checkpoint); the search runs
    programs in sandboxed workers.
    """
    import types

    module = types.ModuleType("candidate")
    exec(compile(source, "candidate.py", "exec"), module.__dict__)
    return getattr(module, ENTRY)


# ------------------------------------------------------------------ worker side


def _load(path: str = "candidate.py"):
    spec = importlib.util.spec_from_file_location("candidate", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_config(request: dict, mixer):
    from search_spaces.linear_attention import model, program_api

    m = request["model"]
    program_api.configure(m["chunk_size"], m["impl"])
    return model.ModelConfig(tuple(request["frame"].items()), **m, mixer=mixer)


def _interface(request: dict) -> tuple[Any, list[list[str]]]:
    """(the TokenMixer class, []) or (None, [[check, reason]])."""
    from flax import nnx

    try:
        module = _load()
    except BaseException as e:  # the program's own error, whatever it is, is the reason
        return None, [["import", sandbox.candidate_traceback(e)]]
    mixer = getattr(module, ENTRY, None)
    if not isinstance(mixer, type) or not issubclass(mixer, nnx.Module):
        return None, [["interface", f"the program defines no class {ENTRY}(nnx.Module)"]]
    return mixer, []


def _mixer_shapes(cfg) -> str | None:
    """The interface's promise about outputs, checked on abstract values."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    g = cfg.g
    D, H, K = cfg.d_model, g["num_heads"], g["head_dim"] * cfg.width_multiplier
    x = jax.ShapeDtypeStruct((2, 16, D), jnp.float32)

    def call(x_BTD):
        out = cfg.mixer(D, H, K, rngs=nnx.Rngs(params=0))(x_BTD)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"{ENTRY}.__call__ must return (y, state), not {type(out).__name__}")
        return out

    y, state = jax.eval_shape(call, x)
    if y.shape != (2, 16, D):
        return f"{ENTRY} returned y of shape {y.shape}, expected {(2, 16, D)} for x {x.shape}"
    if len(state.shape) != 4 or state.shape[:3] != (2, H, K):
        return f"{ENTRY} returned a state of shape {state.shape}, expected (2, {H}, {K}, V)"
    return None


def _check(request: dict) -> list[list[str]]:
    from search_spaces.linear_attention import checks

    mixer, failures = _interface(request)
    if failures:
        return failures
    cfg = _model_config(request, mixer)
    budget, seq_len = request["checks"]["param_budget"], request["checks"]["seq_len"]
    try:
        if (bad := _mixer_shapes(cfg)) is not None:
            return [["interface", bad]]
        found = [checks.check_param_budget(cfg, budget), checks.check_shapes(cfg, seq_len)]
        if not any(found):
            found.append(checks.check_causality(cfg, seq_len))
            found.append(checks.check_subquadratic(cfg, 4 * cfg.chunk_size))
    except Exception as e:
        return [["interface", sandbox.candidate_traceback(e)]]
    return [[f.check, f.reason] for f in found if f is not None]


def _train(request: dict):
    """Per-seed SeedResults of genome-mode training, with the program's mixer."""
    import jax

    from search_spaces.linear_attention import data, train

    mixer, failures = _interface(request)
    if failures:
        raise RuntimeError(f"{failures[0][0]}: {failures[0][1]}")
    cfg = _model_config(request, mixer)
    seeds, task = request["seeds"], request["task"]
    budget = request["budget"]
    budget = train.TrainConfig(**{**budget, "learning_rates": tuple(budget["learning_rates"])})
    # The worker's own held-out set is tiny: its numbers are not the ones recorded (the
    # controller scores the worker's logits on its own held-out set).
    if request["task_kind"] == "mqar":
        task = {**task, "num_pairs": tuple(task["num_pairs"]), "test_examples": 8}
        mqar = train.MQARConfig(**task)
        return cfg, train.train_mqar(cfg, mqar, budget, seeds, jax.devices())
    corpus = data.load_corpus(request["corpus"] or None)
    lm = train.ByteLMConfig(task["seq_len"], val_batches=1)
    return cfg, train.train_byte_lm(cfg, lm, budget, seeds, jax.devices(), corpus)


def _logits_at(cfg, params, inputs_NT: np.ndarray, positions_NT: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    from search_spaces.linear_attention import model

    graphdef, _ = model.abstract(cfg)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    out = []
    for start in range(0, len(inputs_NT), _EVAL_BATCH):
        logits = np.asarray(forward(params, inputs_NT[start : start + _EVAL_BATCH]), np.float32)
        out.append(logits[positions_NT[start : start + _EVAL_BATCH]])
    return np.concatenate(out)


def _flat_params(params) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf) for path, leaf in flat
    }


def worker(channel: sandbox.Channel) -> None:
    """Sandbox target: one ``check`` or ``train`` request (see the module docstring)."""
    request, _ = channel.receive()
    if request["job"] == "check":
        channel.send({"failures": _check(request)})
        return
    try:
        cfg, per_seed = _train(request)
    except Exception as e:
        channel.send({"error": sandbox.candidate_traceback(e)})
        return
    errors = [r.error for r in per_seed if r.error]
    if errors:
        channel.send({"error": errors[0]})
        return
    seeds = request["seeds"]
    reported = {
        name: {str(s): r.metrics[name] for s, r in zip(seeds, per_seed, strict=True)}
        for name in ("final_train_loss", "learning_rate")
    }
    channel.send({"trained": True, **reported})
    _, arrays = channel.receive()
    inputs, positions = arrays["inputs"], arrays["positions"]
    logits = np.stack(
        [_logits_at(cfg, r.params, inputs[i], positions[i]) for i, r in enumerate(per_seed)]
    )
    out = {"logits": logits}
    if request.get("return_params"):
        for seed, r in zip(seeds, per_seed, strict=True):
            out.update({f"param:{seed}:{k}": v for k, v in _flat_params(r.params).items()})
    channel.send({"outputs": True}, out)


def held_out_mqar(task, seeds: Sequence[int]) -> HeldOut:
    """Genome mode's MQAR test examples (``task`` a ``train.MQARConfig``) for each seed, split
    into what is sent and what is kept."""
    from search_spaces.linear_attention import data, train

    inputs, masks, targets = [], [], []
    for seed in seeds:
        per_pairs = train.mqar_examples(task, seed, 1, task.test_examples)
        seed_inputs = np.concatenate([g[0] for g in per_pairs])
        positions, sparse = (np.concatenate([g[i] for g in per_pairs]) for i in (1, 2))
        supervised = sparse != data.IGNORE_INDEX
        mask = np.zeros(seed_inputs.shape, bool)
        rows = np.broadcast_to(np.arange(len(mask))[:, None], positions.shape)
        mask[rows[supervised], positions[supervised]] = True
        inputs.append(seed_inputs.astype(np.int32))
        masks.append(mask)
        # Positions come in increasing order per example, as mask indexing reads them.
        targets.append(sparse[supervised].astype(np.int32))
    groups = np.concatenate(
        [np.full(task.test_examples * pairs, g) for g, pairs in enumerate(task.num_pairs)]
    )
    names = tuple(f"mqar_accuracy_p{pairs}" for pairs in task.num_pairs)
    return HeldOut(np.stack(inputs), np.stack(masks), np.stack(targets), groups, names)


def held_out_bytes(windows: tuple[np.ndarray, np.ndarray], seeds: Sequence[int]) -> HeldOut:
    """The byte-LM validation windows (the same for every seed), split likewise."""
    from search_spaces.linear_attention import data

    inputs = windows[0].reshape(-1, windows[0].shape[-1]).astype(np.int32)
    targets = windows[1].reshape(inputs.shape)
    mask = targets != data.IGNORE_INDEX
    n = len(seeds)
    return HeldOut(
        np.stack([inputs] * n),
        np.stack([mask] * n),
        np.stack([targets[mask].astype(np.int32)] * n),
    )
