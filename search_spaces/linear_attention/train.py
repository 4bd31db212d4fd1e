"""Training and evaluation of one architecture over several seeds at once.

The seeds of a candidate are its population: their parameters, data streams and optimiser
states are stacked on a leading axis, sharded over the devices with ``shard_map`` (see
``evolve_jax.evaluation.population``) and vmapped within each device. The whole training run
is one ``lax.scan`` inside one compiled program: no per-step dispatch, no host round trips.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from evolve_jax.evaluation.population import evaluate_population
from search_spaces.linear_attention import data, model


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training budget. Every learning rate is trained, stacked beside the seeds; per seed,
    the one with the lowest mean training loss over the last ``select_fraction`` of the steps
    is kept (training batches are fresh data, so this never looks at the held-out set)."""

    steps: int
    batch_size: int
    learning_rates: tuple[float, ...] = (3e-3,)
    weight_decay: float = 0.1
    warmup: int = 50
    decay_to: float = 0.0  # final learning rate as a fraction of the peak (cosine decay)
    finite_probe_steps: int = 5  # the "finite loss after a few steps" check
    select_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """MQAR at one length and several numbers of pairs; every batch holds equal shares of each
    and the accuracy is the mean over them (Zoology and MAD average over difficulties too)."""

    vocab_size: int = 512
    seq_len: int = 64
    num_pairs: tuple[int, ...] = (4, 8, 16)
    test_examples: int = 256  # per number of pairs


@dataclasses.dataclass(frozen=True)
class ByteLMConfig:
    seq_len: int = 128
    val_batches: int = 4
    corpus_paths: tuple[str, ...] = ()


# Parameters left out of weight decay: the Mamba2 decay's A_log and dt_bias (Mamba2 marks them
# _no_weight_decay; decaying them pulls the initial near-1 decay towards fast forgetting) and the
# output gate's bias (decaying it pulls the identity-initialised gate towards silu(0) = 0).
_NO_WEIGHT_DECAY = (("A_log",), ("dt_bias",), ("g_proj", "bias"))


def _weight_decay_mask(params):
    def decayed(path, _):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return not any(names[-len(tail) :] == tail for tail in _NO_WEIGHT_DECAY)

    return jax.tree_util.tree_map_with_path(decayed, params)


def _optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """AdamW with a warmup-cosine schedule peaking at 1: the caller scales the updates by its
    learning rate (a traced value, so one compiled program trains every learning rate).

    It runs on all parameters raveled into one vector (the same arithmetic, element by element;
    the clipping norm sums in another order): a few dozen ops per step instead of a few per
    parameter array (Gated DeltaNet's stage-0 training, 2 CPU cores, single noisy runs: compile
    24-28 s instead of about 30 s, measured while the program still drew its own parameters).
    ``params`` (arrays or shapes) fixes which elements weight decay reaches.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        1.0,
        min(cfg.warmup, max(cfg.steps - 1, 1)),
        max(cfg.steps, 2),
        end_value=cfg.decay_to,
    )
    sizes_and_decays = [
        (leaf.size, cfg.weight_decay if decayed else 0.0)
        for leaf, decayed in zip(
            jax.tree.leaves(params), jax.tree.leaves(_weight_decay_mask(params)), strict=True
        )
    ]

    def add_decay(updates_N, state, params_N):  # AdamW's decoupled decay, masked per element
        # Built from broadcasts, so the program holds no parameter-sized constant.
        decay_N = jnp.concatenate([jnp.full(n, d, params_N.dtype) for n, d in sizes_and_decays])
        return updates_N + decay_N * params_N, state

    return optax.flatten(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.scale_by_adam(),
            optax.GradientTransformation(lambda _: optax.EmptyState(), add_decay),
            optax.scale_by_learning_rate(schedule),
        )
    )


def _masked_xent(logits_BTV, targets_BT) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy over target positions, accuracy there)."""
    mask = targets_BT != data.IGNORE_INDEX
    safe = jnp.where(mask, targets_BT, 0)
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = jnp.maximum(mask.sum(), 1)
    correct = (jnp.argmax(logits_BTV, -1) == safe) & mask
    return jnp.sum(nll * mask) / count, correct.sum() / count


def _fitter(cfg: model.ModelConfig, train: TrainConfig):
    """``fit(params, lr, batch_of, eval_batches)``: trains ``params`` for ``train.steps`` steps,
    step s's batch (inputs, positions or None, targets) being ``batch_of(s)``, then evaluates on
    ``eval_batches`` (a leading axis N); returns (params, training losses [S], eval loss [N],
    eval accuracy [N])."""
    graphdef, shapes = model.abstract(cfg)
    tx = _optimizer(train, shapes)

    def loss_fn(params, inputs, positions, targets):
        lm = nnx.merge(graphdef, params)
        logits = lm(inputs) if positions is None else lm.logits_at(inputs, positions)
        return _masked_xent(logits, targets)

    def fit(params, lr, batch_of, eval_batches):
        opt_state = tx.init(params)

        def step(carry, s):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch_of(s))
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = jnp.arange(train.steps)
        (params, _), losses_S = jax.lax.scan(step, (params, opt_state), steps)
        eval_loss_N, eval_acc_N = jax.vmap(lambda batch: loss_fn(params, *batch))(eval_batches)
        return params, losses_S, eval_loss_N, eval_acc_N

    return fit


@functools.lru_cache(maxsize=32)  # one function per (model, budget): its compilation is reused
def _trainer(cfg: model.ModelConfig, train: TrainConfig):
    """Per-run training function of one (seed, learning rate), its data in the run.

    A run is (initial params, lr, inputs [S,B,T], positions [S,B,P] or None, targets, eval
    inputs [N,E,T], eval positions, eval targets). With positions, logits are computed only there
    (MQAR supervises a few positions per example: the vocabulary head is then cheap); without,
    everywhere. Returns (params, training losses [S], eval loss [N], eval accuracy [N]).
    """
    fit = _fitter(cfg, train)

    def run(candidate):
        params, lr, *data = candidate
        batches = tuple(data[:3])
        return fit(params, lr, lambda s: jax.tree.map(lambda x: x[s], batches), tuple(data[3:]))

    return run


def _split_windows(windows_W: jax.Array) -> tuple[jax.Array, None, jax.Array]:
    """Byte windows [..., T + 1] (uint8) -> (inputs, no positions, targets), int32 [..., T]."""
    tokens = windows_W.astype(jnp.int32)
    return tokens[..., :-1], None, tokens[..., 1:]


@functools.lru_cache(maxsize=32)
def _byte_lm_trainer(cfg: model.ModelConfig, train: TrainConfig):
    """Per-run byte-LM training function. A run is (initial params, lr, seed index); the data
    come beside the runs, replicated, one uint8 copy per seed rather than int32 inputs and
    targets per run: training windows [Z seeds, S, B, T + 1] and held-out windows [N, B, T + 1],
    the targets being the inputs shifted by one. Each step gathers its own batch."""
    fit = _fitter(cfg, train)

    def run(candidate, windows_ZSBW, val_NBW):
        params, lr, seed_index = candidate
        return fit(
            params, lr, lambda s: _split_windows(windows_ZSBW[seed_index, s]),
            _split_windows(val_NBW),
        )  # fmt: skip

    return run


@dataclasses.dataclass(frozen=True)
class SeedResult:
    metrics: dict[str, float]
    params: Any
    error: str | None = None


def _finish(results, train: TrainConfig, seeds, metric_fn) -> list[SeedResult]:
    """Per seed: the learning rate with the lowest late training loss, its metrics and params.

    A seed fails (finite_loss) only when every learning rate's first steps are non-finite; a
    learning rate that diverges later is never the one kept.
    """
    params, losses_PS, eval_loss_PN, eval_acc_PN = results
    lrs = train.learning_rates
    tail = max(1, round(train.steps * train.select_fraction))
    out = []
    for i, _ in enumerate(seeds):
        runs = [i * len(lrs) + j for j in range(len(lrs))]
        losses = {r: np.asarray(losses_PS[r]) for r in runs}
        sane = [r for r in runs if np.all(np.isfinite(losses[r][: train.finite_probe_steps]))]
        if not sane:
            probe = losses[runs[0]][: train.finite_probe_steps]
            out.append(
                SeedResult({}, None, f"finite_loss: loss {probe.tolist()} in the first steps")
            )
            continue
        late = {r: float(losses[r][-tail:].mean()) for r in sane}
        finite = [r for r in sane if np.isfinite(late[r])] or sane
        best = min(finite, key=lambda r: late[r] if np.isfinite(late[r]) else np.inf)
        metrics = metric_fn(np.asarray(eval_loss_PN[best]), np.asarray(eval_acc_PN[best]))
        metrics["final_train_loss"] = late[best]
        metrics["learning_rate"] = float(lrs[best - runs[0]])
        out.append(SeedResult(metrics, jax.tree.map(lambda x, b=best: x[b], params)))
    return out


def _runs(
    cfg: model.ModelConfig, seeds: Sequence[int], train: TrainConfig, streams: Sequence[tuple]
):
    """The population: one run per (seed, learning rate), seed-major; a seed's runs share its
    initial parameters (``model.initializer``) and its data."""
    init = model.initializer(cfg)
    runs = [
        (params, np.float32(lr), *stream)
        for seed, stream in zip(seeds, streams, strict=True)
        for params in [init(jax.random.key(seed))]  # drawn once per seed
        for lr in train.learning_rates
    ]
    return jax.tree.map(lambda *xs: np.stack(xs), *runs)


def sparse_targets(batch: data.MQARBatch, width: int):
    """(inputs [N,T], positions [N,width], targets [N,width]): the supervised positions first,
    in order, padded with unsupervised ones (target IGNORE_INDEX)."""
    positions = np.argsort(~batch.target_mask, axis=1, kind="stable")[:, :width]
    targets = np.take_along_axis(batch.targets, positions, axis=1)
    return batch.inputs, positions.astype(np.int32), targets


def mqar_examples(task: MQARConfig, seed: int, split: int, per_group: int) -> list[tuple]:
    """Per number of pairs, ``per_group`` examples as ``sparse_targets`` triples; split 0 is
    training data, 1 the test set. The same for every candidate: comparisons are paired."""
    width = max(task.num_pairs)
    out = []
    for pairs in task.num_pairs:
        batch = data.make_mqar(
            np.random.default_rng([seed, split, pairs]), per_group,
            vocab_size=task.vocab_size, seq_len=task.seq_len, num_pairs=pairs,
        )  # fmt: skip
        out.append(sparse_targets(batch, width))
    return out


def train_mqar(
    cfg: model.ModelConfig,
    task: MQARConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    devices: Sequence[Any],
) -> list[SeedResult]:
    """Trains one architecture on MQAR for every seed and learning rate; metrics are on
    held-out examples: ``mqar_accuracy`` (mean over the numbers of pairs) and one
    ``mqar_accuracy_p{pairs}`` each."""
    groups = len(task.num_pairs)
    if train.batch_size % groups:
        raise ValueError(
            f"MQAR batch {train.batch_size} does not split evenly over {groups} numbers of pairs"
        )
    share = train.batch_size // groups
    streams = []
    for seed in seeds:
        per_pairs = mqar_examples(task, seed, 0, train.steps * share)
        # Step s's batch: examples s*share .. (s+1)*share of every number of pairs.
        inputs, positions, targets = (
            np.concatenate([g[i].reshape(train.steps, share, -1) for g in per_pairs], axis=1)
            for i in range(3)
        )
        test = mqar_examples(task, seed, 1, task.test_examples)
        streams.append(
            (inputs, positions, targets, *(np.stack([g[i] for g in test]) for i in range(3)))
        )
    results = evaluate_population(_trainer(cfg, train), _runs(cfg, seeds, train, streams), devices)

    def metrics(loss_G, acc_G):
        out = {f"mqar_accuracy_p{p}": float(a) for p, a in zip(task.num_pairs, acc_G, strict=True)}
        return {"mqar_accuracy": float(acc_G.mean()), "mqar_loss": float(loss_G.mean()), **out}

    return _finish(results, train, seeds, metrics)


def abstract_byte_lm_population(
    cfg: model.ModelConfig, task: ByteLMConfig, train: TrainConfig, num_seeds: int
) -> tuple[Any, Any, tuple]:
    """(per-run function, population, replicated data), as ShapeDtypeStructs, of
    ``train_byte_lm``: what one candidate's training program takes, for ahead-of-time
    compilation (aot.py)."""
    runs = num_seeds * len(train.learning_rates)

    def spec(*shape, dtype=np.int32):
        return jax.ShapeDtypeStruct((runs, *shape), dtype)

    B, W = train.batch_size, task.seq_len + 1
    params = jax.tree.map(lambda x: spec(*x.shape, dtype=x.dtype), model.abstract(cfg)[1])
    population = (params, spec(dtype=np.float32), spec())
    data = (
        jax.ShapeDtypeStruct((num_seeds, train.steps, B, W), np.uint8),
        jax.ShapeDtypeStruct((task.val_batches, B, W), np.uint8),
    )
    return _byte_lm_trainer(cfg, train), population, data


def byte_lm_validation(
    corpus: np.ndarray, task: ByteLMConfig, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out windows val_bpb is measured on: (inputs, targets), each [N, B, T].

    The same windows for every seed and candidate (paired), and for re-measuring a checkpoint.
    """
    val = data.byte_lm_dataset(
        corpus, seq_len=task.seq_len, batch_size=batch_size, seed=0, split="validation"
    )
    held = [val[i] for i in range(task.val_batches)]
    return np.stack([b["inputs"] for b in held]), np.stack([b["targets"] for b in held])


def evaluate(lm: nnx.Module, inputs_NBT, targets_NBT) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model over batches, as training measures them."""
    graphdef, params = nnx.split(lm)

    @jax.jit
    def per_batch(params, inputs, targets):
        return _masked_xent(nnx.merge(graphdef, params)(inputs), targets)

    pairs = [per_batch(params, i, t) for i, t in zip(inputs_NBT, targets_NBT, strict=True)]
    return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))


def byte_lm_training_windows(
    corpus: np.ndarray, task: ByteLMConfig, train: TrainConfig, seed: int
) -> np.ndarray:
    """Seed ``seed``'s training batches as byte windows [steps, B, T + 1] (uint8): each step's
    inputs are ``[..., :-1]`` and its targets ``[..., 1:]``. Code mode sends these to a worker,
    which never reads the corpus."""
    batches = data.byte_lm_dataset(
        corpus, seq_len=task.seq_len, batch_size=train.batch_size, seed=seed, split="train"
    )
    windows = []
    for i in range(train.steps):
        batch = batches[i]
        windows.append(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
    return np.stack(windows).astype(np.uint8)


def train_byte_lm(
    cfg: model.ModelConfig,
    task: ByteLMConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    devices: Sequence[Any],
    corpus: np.ndarray,
) -> list[SeedResult]:
    """Trains one architecture on byte-level LM; reports validation bits per byte."""
    windows = [byte_lm_training_windows(corpus, task, train, seed) for seed in seeds]
    inputs, targets = byte_lm_validation(corpus, task, train.batch_size)
    validation = np.concatenate([inputs, targets[..., -1:]], axis=-1).astype(np.uint8)
    return train_byte_lm_on(cfg, train, seeds, devices, windows, validation)


def train_byte_lm_on(
    cfg: model.ModelConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    devices: Sequence[Any],
    windows: Sequence[np.ndarray],
    validation: np.ndarray,
) -> list[SeedResult]:
    """``train_byte_lm`` on given data: per seed, windows [steps, B, T + 1]; held-out windows
    [N, B, T + 1] (uint8 both)."""
    runs = _runs(cfg, seeds, train, [(np.int32(i),) for i in range(len(seeds))])
    windows_ZSBW = np.stack([np.asarray(w, np.uint8) for w in windows])
    results = evaluate_population(
        _byte_lm_trainer(cfg, train), runs, devices, windows_ZSBW, np.asarray(validation, np.uint8)
    )
    return _finish(
        results,
        train,
        seeds,
        lambda loss, acc: {
            "val_bpb": float(loss.mean()) / math.log(2),
            "val_byte_accuracy": float(acc.mean()),
        },
    )
