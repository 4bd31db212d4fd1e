"""Code mode of the linear-attention space: a program's TokenMixer, checked and trained sandboxed.

The program (``programs/template.py`` with its EVOLVE-BLOCK filled) defines ``TokenMixer``; the
rest of the model (embedding, MLPs, depth, width) is the frame genome's. The program runs only in
sandboxed workers (``evolve_jax.evaluation.harness``), jobs of ``worker``:

* ``check``: import, the interface (class, call, output and state shapes), then the checks
  genomes get (parameter budget, shapes, causality by perturbing later inputs at batch 1 and at
  each stage's training batch, sub-quadratic cost). A cheap filter: the program shares the
  worker's process and could patch them.
* ``train``: genome-mode training on the batches the controller sends (the worker never reads
  the corpus); the parameters come back, fixed before the held-out inputs leave the controller.
* ``outputs``: logits at the held-out positions, on the inputs sent only then.
* ``verify``, in a second, fresh worker: logits from the returned parameters on the held-out
  windows with everything after a secret cut replaced (``harness.SuffixSwap``).

The controller computes every metric from the logits of ``outputs`` and keeps them only if,
before each cut, they equal the ``verify`` worker's: a program that reads later tokens when
scored (a non-causal mixer, a patched harness) fails as "non-causal when scored". Byte-LM inputs
hold the targets shifted by one, so only this check, not secrecy, stops a program from reading
them. It also counts the returned parameters against the budget itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolve_jax.evaluation import harness
from evolve_jax.search_space import EvalResult

PROGRAMS = os.path.join(os.path.dirname(__file__), "programs")
TEMPLATE = os.path.join(PROGRAMS, "template.py")
SEED_PROGRAMS = ("linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet")
ENTRY = "TokenMixer"
TARGET = "search_spaces.linear_attention.code_mode:worker"
_EVAL_BATCH = 64
# Largest change in a log-probability before a cut that still counts as equal: float32 noise
# between two processes is far below it, and reading the future within it gains nothing.
CAUSAL_TOLERANCE = 1e-3
_PARAM = re.compile(r"param:(\d{1,4}):(\w{1,100}(?:/\w{1,100}){0,20})", re.ASCII)


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
    shared: bool = False  # every seed's windows are the same (byte LM): one suffix swap for all


def score_logits(logits: Any, held: HeldOut, vocab: int) -> tuple[dict[int, tuple], str | None]:
    """Per-seed (mean cross-entropy, accuracy, {group metric: accuracy}) of the worker's
    logits; or an error."""
    shape = (*held.targets.shape, vocab)
    if not isinstance(logits, np.ndarray) or logits.shape != shape:
        got = getattr(logits, "shape", type(logits).__name__)
        return {}, f"outputs: logits of shape {got}, expected {shape}"
    if not np.all(np.isfinite(logits)):
        return {}, "outputs: the logits hold non-finite values"
    logp = harness.log_softmax(logits)
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


def _returned_params(reply: harness.Reply, num_seeds: int) -> dict[str, np.ndarray]:
    """The parameter arrays of a ``train`` reply, validated: ``param:<seed index>:<path>``,
    floating point, finite, the same paths and shapes for every seed."""
    params = {}
    paths: list[dict[str, tuple]] = [{} for _ in range(num_seeds)]
    for name in reply.arrays:
        found = _PARAM.fullmatch(name)
        if found is None or int(found[1]) >= num_seeds:
            raise harness.BadReply(f"outputs: unexpected array {name[:80]!r}")
        array = reply.array(name)
        params[name] = array
        paths[int(found[1])][found[2]] = array.shape
    if not paths[0] or any(p != paths[0] for p in paths):
        raise harness.BadReply("outputs: the seeds' parameters differ in names or shapes")
    return params


def _nested(params: dict[str, np.ndarray], seed_index: int) -> dict:
    """One seed's parameters as ``nnx.to_pure_dict`` nests them (list indices as ints)."""
    out: dict = {}
    for name, array in params.items():
        found = _PARAM.fullmatch(name)
        if int(found[1]) != seed_index:
            continue
        node = out
        *parents, leaf = [int(k) if k.isdigit() else k for k in found[2].split("/")]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    return out


def train_and_score(
    programs: harness.Programs,
    source: str,
    request: dict,
    training: dict[str, np.ndarray],
    held: HeldOut,
    vocab: int,
    metric_names: tuple[str, str],
    rng: np.random.Generator,
    param_budget: int | None,
) -> tuple[EvalResult, list[dict]]:
    """Trains in a worker, scores its logits on ``held`` here, verifies them in a second
    worker; (result, per-seed nested parameters). Raises harness.JobFailed or BadReply."""
    num_seeds = len(request["seeds"])
    with programs.session(source) as session:
        trained = session.ask({**request, "job": "train"}, training)
        params = _returned_params(trained, num_seeds)
        reported = {
            name: trained.field(name, list) for name in ("final_train_loss", "learning_rate")
        }
        # The held-out inputs leave this process only now, once the parameters are fixed.
        reply = session.ask(
            {"job": "outputs"}, {"inputs": held.inputs, "positions": held.positions}, last=True
        )
        reply.only(["logits"])
        logits = reply.array("logits", (*held.targets.shape, vocab))
    output = session.output()
    if param_budget is not None:
        count = sum(a.size for n, a in params.items() if n.startswith("param:0:"))
        if count > param_budget:
            return EvalResult(
                error=f"param_budget: the returned parameters hold {count:,} values, over the "
                f"budget of {param_budget:,}",
                extra=output,
            ), []
    by_seed, error = score_logits(logits, held, vocab)
    if error is not None:
        return EvalResult(error=error, extra=output), []
    start = time.perf_counter()
    error = _verify(programs, source, request, params, held, logits, vocab, rng)
    output = {**output, "verification_s": time.perf_counter() - start}
    if error is not None:
        return EvalResult(error=error, extra=output), []
    metrics = {}
    for i, seed in enumerate(request["seeds"]):
        loss, accuracy, per_group = by_seed[i]
        values = {**dict(zip(metric_names, (loss, accuracy), strict=True)), **per_group}
        # What the worker says of its training (which learning rate it kept, at what loss): its
        # word, recorded as such; the score above does not depend on it.
        for name, per_seed in reported.items():
            value = per_seed[i] if i < len(per_seed) else None
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            values[name] = float(value) if ok else math.nan
        metrics[seed] = values
    return EvalResult(metrics=metrics, extra=output), [_nested(params, i) for i in range(num_seeds)]


def _verify(programs, source, request, params, held, logits, vocab, rng) -> str | None:
    """None if, before every cut, the scored logits equal a fresh worker's on swapped
    suffixes; else the reason "non-causal when scored: ..."."""
    num_seeds = len(request["seeds"])
    if held.shared:
        swaps = [harness.SuffixSwap.draw(held.inputs[0], held.positions[0], rng)] * num_seeds
    else:
        swaps = [
            harness.SuffixSwap.draw(held.inputs[i], held.positions[i], rng)
            for i in range(num_seeds)
        ]
    inputs = np.stack([s.inputs for s in swaps])
    positions = np.stack([s.positions for s in swaps])
    with programs.session(source) as session:
        reply = session.ask(
            {**request, "job": "verify"},
            {**params, "inputs": inputs, "positions": positions},
            last=True,
        )
        reply.only(["logits"])
        swapped = reply.array("logits", (num_seeds, int(positions[0].sum()), vocab))
    for i, swap in enumerate(swaps):
        change, window = swap.disagreement(logits[i], swapped[i], held.positions[i])
        if not change <= CAUSAL_TOLERANCE:
            return (
                f"non-causal when scored: log-probabilities before a cut changed by {change:.3g} "
                f"when the tokens after it were replaced (held-out window {window}, seed "
                f"{request['seeds'][i]}): the outputs depend on later tokens"
            )
    return None


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


def _mixer_class(value) -> str | None:
    from flax import nnx

    if not isinstance(value, type) or not issubclass(value, nnx.Module):
        return f"the program defines no class {ENTRY}(nnx.Module)"
    return None


def _model_config(request: dict, model_request: dict | None = None):
    from search_spaces.linear_attention import model, program_api

    mixer = harness.entry(ENTRY, _mixer_class)
    m = model_request or request["model"]
    program_api.configure(m["chunk_size"], m["impl"])
    return model.ModelConfig(tuple(request["frame"].items()), **m, mixer=mixer)


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


def _check(request: dict, arrays: dict) -> tuple[dict, dict]:
    from search_spaces.linear_attention import checks

    del arrays
    cfg = _model_config(request)
    budget, seq_len = request["checks"]["param_budget"], request["checks"]["seq_len"]
    try:
        if (bad := _mixer_shapes(cfg)) is not None:
            raise harness.ProgramFailure("interface", bad)
        found = [checks.check_param_budget(cfg, budget), checks.check_shapes(cfg, seq_len)]
        if not any(found):
            found.append(checks.check_causality(cfg, seq_len))
            for stage in request["checks"]["stages"]:  # each stage's model at its batch
                if found[-1] is not None:
                    break
                stage_cfg = _model_config(request, stage["model"])
                found.append(
                    checks.check_causality(stage_cfg, stage["seq_len"], batch=stage["batch"])
                )
            found.append(checks.check_subquadratic(cfg, 4 * cfg.chunk_size))
    except harness.ProgramFailure:
        raise
    except Exception as e:
        from evolve_jax.evaluation import sandbox

        raise harness.ProgramFailure("interface", sandbox.candidate_traceback(e)) from None
    return {"failures": [[f.check, f.reason] for f in found if f is not None]}, {}


def _train(state: dict, request: dict, arrays: dict) -> tuple[dict, dict]:
    """Genome-mode training with the program's mixer, every seed; the parameters go back."""
    import jax

    from search_spaces.linear_attention import train

    cfg = _model_config(request)
    seeds = request["seeds"]
    budget = request["budget"]
    budget = train.TrainConfig(**{**budget, "learning_rates": tuple(budget["learning_rates"])})
    # The worker's own held-out numbers are not recorded (the controller scores the logits).
    if request["task_kind"] == "mqar":
        task = {**request["task"], "num_pairs": tuple(request["task"]["num_pairs"])}
        mqar = train.MQARConfig(**{**task, "test_examples": 8})
        per_seed = train.train_mqar(cfg, mqar, budget, seeds, jax.devices())
    else:
        windows = arrays["windows"]
        probe = windows[0][:1]  # a training batch stands in for the held-out set here
        per_seed = train.train_byte_lm_on(cfg, budget, seeds, jax.devices(), list(windows), probe)
    errors = [r.error for r in per_seed if r.error]
    if errors:
        return {"error": errors[0]}, {}
    state.update(cfg=cfg, params=[r.params for r in per_seed])
    out = {}
    for i, r in enumerate(per_seed):
        out.update({f"param:{i}:{k}": v for k, v in _flat_params(r.params).items()})
    header = {
        name: [r.metrics[name] for r in per_seed] for name in ("final_train_loss", "learning_rate")
    }
    return header, out


def _outputs(state: dict, request: dict, arrays: dict) -> tuple[dict, dict]:
    del request
    inputs, positions = arrays["inputs"], arrays["positions"]
    logits = np.stack(
        [
            _logits_at(state["cfg"], params, inputs[i], positions[i])
            for i, params in enumerate(state["params"])
        ]
    )
    return {}, {"logits": logits}


def _verify_job(request: dict, arrays: dict) -> tuple[dict, dict]:
    """Logits of the returned parameters on the swapped windows (a fresh worker)."""
    import jax
    from flax import nnx

    from search_spaces.linear_attention import model

    cfg = _model_config(request)
    inputs, positions = arrays.pop("inputs"), arrays.pop("positions")
    logits = []
    for i in range(len(request["seeds"])):
        params = model.initializer(cfg)(jax.random.key(0))
        prefix = f"param:{i}:"
        flat = {k: v for k, v in arrays.items() if k.startswith(prefix)}
        nnx.replace_by_pure_dict(params, _nested(flat, i))
        logits.append(_logits_at(cfg, params, inputs[i], positions[i]))
    return {}, {"logits": np.stack(logits)}


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


def worker(channel) -> None:
    """Sandbox target: the jobs in the module docstring."""
    state: dict = {}
    harness.serve(
        channel,
        {
            "check": _check,
            "train": functools.partial(_train, state),
            "outputs": functools.partial(_outputs, state),
            "verify": _verify_job,
        },
    )


# ------------------------------------------------------------------ held-out data


def held_out_mqar(task, seeds: Sequence[int], split: int = 1) -> HeldOut:
    """MQAR test examples (``task`` a ``train.MQARConfig``) for each seed, split into what is
    sent and what is kept. ``split`` 1 is genome mode's test set; code mode passes a secret
    one, so that a program cannot regenerate the examples and their answers from the seed."""
    from search_spaces.linear_attention import data, train

    inputs, masks, targets = [], [], []
    for seed in seeds:
        per_pairs = train.mqar_examples(task, seed, split, task.test_examples)
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
        shared=True,
    )
