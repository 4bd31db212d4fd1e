"""Training and evaluation of one architecture over several seeds at once.

The seeds of a candidate are its population: their parameters, data streams and optimiser
states are stacked on a leading axis, sharded over the devices with ``shard_map`` (see
``evolve_jax.evaluation.population``) and vmapped within each device. The whole training run
is one ``lax.scan`` inside one compiled program: no per-step dispatch, no host round trips.
"""

from __future__ import annotations

import dataclasses
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
    steps: int
    batch_size: int
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    decay_to: float = 0.0  # final learning rate as a fraction of the peak (cosine decay)
    finite_probe_steps: int = 5  # the "finite loss after a few steps" check


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 512
    seq_len: int = 64
    num_pairs: int = 8
    test_examples: int = 512


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


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        min(cfg.warmup, max(cfg.steps - 1, 1)),
        max(cfg.steps, 2),
        end_value=cfg.learning_rate * cfg.decay_to,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_weight_decay_mask),
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


def _trainer(cfg: model.ModelConfig, train: TrainConfig):
    """Per-seed training function: (seed, inputs, targets, eval inputs, eval targets) -> out."""
    graphdef, _ = model.abstract(cfg)
    tx = _optimizer(train)

    def loss_fn(params, inputs, targets):
        logits = nnx.merge(graphdef, params)(inputs)
        return _masked_xent(logits, targets)

    def run(candidate):
        seed, inputs_SBT, targets_SBT, eval_inputs, eval_targets = candidate
        _, params = model.init(cfg, jax.random.key(seed))
        opt_state = tx.init(params)

        def step(carry, batch):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses_S = jax.lax.scan(step, (params, opt_state), (inputs_SBT, targets_SBT))
        eval_loss, eval_acc = jax.vmap(lambda i, t: loss_fn(params, i, t))(
            eval_inputs, eval_targets
        )
        return params, losses_S, eval_loss.mean(), eval_acc.mean()

    return run


@dataclasses.dataclass(frozen=True)
class SeedResult:
    metrics: dict[str, float]
    params: Any
    error: str | None = None


def _finish(results, train: TrainConfig, seeds, metric_fn) -> list[SeedResult]:
    params, losses_PS, eval_loss_P, eval_acc_P = results
    out = []
    for i, _ in enumerate(seeds):
        losses = np.asarray(losses_PS[i])
        probe = losses[: train.finite_probe_steps]
        seed_params = jax.tree.map(lambda x, i=i: x[i], params)
        if not np.all(np.isfinite(probe)):
            out.append(
                SeedResult({}, None, f"finite_loss: loss {probe.tolist()} in the first steps")
            )
            continue
        metrics = metric_fn(float(eval_loss_P[i]), float(eval_acc_P[i]))
        metrics["final_train_loss"] = float(losses[-16:].mean())
        out.append(SeedResult(metrics, seed_params))
    return out


def train_mqar(
    cfg: model.ModelConfig,
    task: MQARConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    devices: Sequence[Any],
) -> list[SeedResult]:
    """Trains one architecture on MQAR for every seed; metrics are on held-out examples."""
    streams = []
    for seed in seeds:
        rng = np.random.default_rng([seed, 0])  # the same data for every candidate: paired seeds
        batch = data.make_mqar(
            rng, train.steps * train.batch_size, vocab_size=task.vocab_size,
            seq_len=task.seq_len, num_pairs=task.num_pairs,
        )  # fmt: skip
        test = data.make_mqar(
            np.random.default_rng([seed, 1]), task.test_examples, vocab_size=task.vocab_size,
            seq_len=task.seq_len, num_pairs=task.num_pairs,
        )  # fmt: skip
        shape = (train.steps, train.batch_size, task.seq_len)
        eval_shape = (-1, min(task.test_examples, 256), task.seq_len)
        streams.append(
            (
                np.int32(seed),
                batch.inputs.reshape(shape),
                batch.targets.reshape(shape),
                test.inputs.reshape(eval_shape),
                test.targets.reshape(eval_shape),
            )
        )
    population = jax.tree.map(lambda *xs: np.stack(xs), *streams)
    results = evaluate_population(_trainer(cfg, train), population, devices)
    return _finish(
        results, train, seeds, lambda loss, acc: {"mqar_accuracy": acc, "mqar_loss": loss}
    )


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


def train_byte_lm(
    cfg: model.ModelConfig,
    task: ByteLMConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    devices: Sequence[Any],
    corpus: np.ndarray,
) -> list[SeedResult]:
    """Trains one architecture on byte-level LM; reports validation bits per byte."""
    val_inputs, val_targets = byte_lm_validation(corpus, task, train.batch_size)
    streams = []
    for seed in seeds:
        batches = data.byte_lm_dataset(
            corpus, seq_len=task.seq_len, batch_size=train.batch_size, seed=seed, split="train"
        )
        take = [batches[i] for i in range(train.steps)]
        streams.append(
            (
                np.int32(seed),
                np.stack([b["inputs"] for b in take]),
                np.stack([b["targets"] for b in take]),
                val_inputs,
                val_targets,
            )
        )
    population = jax.tree.map(lambda *xs: np.stack(xs), *streams)
    results = evaluate_population(_trainer(cfg, train), population, devices)
    return _finish(
        results,
        train,
        seeds,
        lambda loss, acc: {"val_bpb": loss / math.log(2), "val_byte_accuracy": acc},
    )
