"""Runs a search: ``python -m evolve_jax.main --flagfile=configs/quickstart.flags``.

Flags become a frozen RunConfig here; everything else is the library (evolve_jax.loop.run).
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import signal
import sys

from absl import app, flags, logging

from evolve_jax import search_space, storage
from evolve_jax.agents.base import backend_factory
from evolve_jax.cli import parse_flags
from evolve_jax.config import LLMConfig, RunConfig, parse_edit_mix
from evolve_jax.sampling import SAMPLERS, SamplerConfig, make_sampler

_SEARCH_SPACE = flags.DEFINE_string(
    "search_space", None, "Installed search space name, or 'package.module:factory'."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the history lives: a path or gs:// URL.")
_STEPS = flags.DEFINE_integer("steps", 10, "Evolution steps after the seed step.", lower_bound=0)
_SEED = flags.DEFINE_integer(
    "seed", 0,
    "Seed of every random draw; same flags + seed = same run. From 0 to 4294967 (the evaluation "
    "seeds, seed*1000+i, must be below 2**32).",
)  # fmt: skip
_SAMPLER = flags.DEFINE_enum("sampler", "ucb1", list(SAMPLERS), "Parent sampler.")
_NUM_REFERENCES = flags.DEFINE_integer(
    "num_references", 2, "Reference nodes shown with each parent.", lower_bound=0
)
_UCB_C = flags.DEFINE_float("ucb_c", 1.414, "UCB1 exploration constant.", lower_bound=0)
_NUM_ISLANDS = flags.DEFINE_integer("num_islands", 5, "Islands (sampler=islands).", lower_bound=1)
_MIGRATION_INTERVAL = flags.DEFINE_integer(
    "migration_interval", 10, "Steps between ring migrations.", lower_bound=1
)
_MIGRATION_RATE = flags.DEFINE_float(
    "migration_rate", 0.1, "Share of each island that migrates.", lower_bound=0, upper_bound=1
)
_EXPLORATION = flags.DEFINE_float(
    "exploration", 0.2, "Islands: chance of a random member.", lower_bound=0, upper_bound=1
)
_EXPLOITATION = flags.DEFINE_float(
    "exploitation", 0.6, "Islands: chance of the best member.", lower_bound=0, upper_bound=1
)
_AGENTS = flags.DEFINE_string(
    "agents", "offline", "Agent backend: offline, gemini, or 'package.module:factory'."
)
_RESEARCHER_MODEL = flags.DEFINE_string(
    "researcher_model", LLMConfig.researcher_model, "Gemini model of the Researcher."
)
_ENGINEER_MODEL = flags.DEFINE_string(
    "engineer_model", LLMConfig.engineer_model, "Gemini model of the Engineer's repairs."
)
_ANALYZER_MODEL = flags.DEFINE_string(
    "analyzer_model", LLMConfig.analyzer_model, "Gemini model of analyses and lessons."
)
_JUDGE_MODEL = flags.DEFINE_string(
    "judge_model", None, "Gemini model of the optional judge (with --judge_weight > 0)."
)
_JUDGE_WEIGHT = flags.DEFINE_float(
    "judge_weight", 0.0, "Share of the fitness given to the judge's [0, 1] score.",
    lower_bound=0, upper_bound=1,
)  # fmt: skip
_EMBEDDING_MODEL = flags.DEFINE_string(
    "embedding_model", LLMConfig.embedding_model, "Embedding model (novelty, retrieval)."
)
_EMBEDDING_DIMS = flags.DEFINE_integer(
    "embedding_dims", LLMConfig.embedding_dims, "Embedding size kept.", lower_bound=1
)
_GEMINI_BASE_URL = flags.DEFINE_string(
    "gemini_base_url", None, "API endpoint (proxy, gateway); default: GOOGLE_GEMINI_BASE_URL."
)
_VERTEX = flags.DEFINE_bool("vertex", False, "Use Vertex AI instead of a Gemini API key.")
_VERTEX_PROJECT = flags.DEFINE_string("vertex_project", None, "Vertex AI project.")
_VERTEX_LOCATION = flags.DEFINE_string("vertex_location", None, "Vertex AI location.")
_LLM_ATTEMPTS = flags.DEFINE_integer(
    "llm_attempts", LLMConfig.attempts, "HTTP attempts per call (408, 429, 5xx, timeouts).",
    lower_bound=1,
)  # fmt: skip
_LLM_RETRY_DELAY = flags.DEFINE_float(
    "llm_retry_delay_s", LLMConfig.initial_delay_s, "First retry delay (doubles).", lower_bound=0
)
_LLM_TIMEOUT = flags.DEFINE_float(
    "llm_timeout_s", LLMConfig.timeout_s, "Timeout of one HTTP attempt.", lower_bound=0
)
_MAX_OUTPUT_TOKENS = flags.DEFINE_integer(
    "max_output_tokens", LLMConfig.max_output_tokens, "Output-token limit per call.", lower_bound=1
)
_THINKING_BUDGET = flags.DEFINE_integer(
    "thinking_budget", None, "Thinking-token budget per call (default: the model's)."
)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (default: model's).")
_PRICES_FILE = flags.DEFINE_string(
    "prices_file", None, "JSON of USD per 1M tokens (default: evolve_jax/agents/prices.json)."
)
_PROMPTS_DIR = flags.DEFINE_string(
    "prompts_dir", None, "Directory of prompt templates (default: evolve_jax/agents/prompts)."
)
_LLM_RECORD = flags.DEFINE_string(
    "llm_record", None, "Where calls and embeddings are recorded (default: WORKDIR/llm_record)."
)
_PROMPT_BUDGET = flags.DEFINE_integer(
    "prompt_budget_tokens", LLMConfig.prompt_budget_tokens,
    "Bound of a prompt's variable part (tokens, estimated at 4 characters each).", lower_bound=0,
)  # fmt: skip
_AGENT_CONCURRENCY = flags.DEFINE_integer(
    "agent_concurrency", LLMConfig.concurrency, "Proposals requested at once.", lower_bound=1
)
_OFFLINE_SHARE = flags.DEFINE_float(
    "offline_share", 0.0, "Share of children made by the offline operators instead.",
    lower_bound=0, upper_bound=1,
)  # fmt: skip
_MAX_REASKS = flags.DEFINE_integer(
    "max_reasks", LLMConfig.max_reasks, "Re-asks after an unusable answer.", lower_bound=0
)
_NOVELTY_THRESHOLD = flags.DEFINE_float(
    "novelty_threshold", LLMConfig.novelty_threshold,
    "Embedding cosine above which a proposal is sent back.", lower_bound=0, upper_bound=1,
)  # fmt: skip
_NOVELTY_RETRIES = flags.DEFINE_integer(
    "novelty_retries", LLMConfig.novelty_retries, "Send-backs per proposal.", lower_bound=0
)
_EDIT_MIX = flags.DEFINE_string(
    "edit_mix", "diff=0.7,rewrite=0.2,crossover=0.1",
    "Code mode: share of slots asking for SEARCH/REPLACE edits, a rewrite of the EVOLVE-BLOCKs, "
    "or a crossover of two parents.",
)  # fmt: skip
_BUDGET_USD = flags.DEFINE_float(
    "budget_usd", None, "Stop at a step boundary once the LLM cost reaches this.", lower_bound=0
)
_IMPLAUSIBLE_GAIN = flags.DEFINE_float(
    "implausible_gain",
    0.25,
    "Flag a child whose stage-0 primary metric beats the best trusted node's by more than this "
    "fraction of that value's magnitude (a likely harness exploit): it is kept out of parent "
    "selection until re-measured ok at stage 1. A number > 0; inf turns the check off.",
)
_SAMPLES_PER_STEP = flags.DEFINE_integer(
    "samples_per_step", 4, "Children proposed per step.", lower_bound=1
)
_CONCURRENCY = flags.DEFINE_integer(
    "concurrency", 1, "Evaluation threads per device group.", lower_bound=1
)
_EVAL_SEEDS = flags.DEFINE_integer(
    "eval_seeds", 1, "Seeds per candidate (paired with the baseline).", lower_bound=1
)
_PROMOTE_TOP_K = flags.DEFINE_integer(
    "promote_top_k",
    0,
    "After every step, the best k nodes so far (and the baseline) are evaluated at the costlier "
    "stages, unless promoted already.",
    lower_bound=0,
)
_RUN_NAME = flags.DEFINE_string("run_name", "main", "Names this run's nodes in a shared history.")
_RETRIEVAL_K = flags.DEFINE_integer("retrieval_k", 5, "Cognition items per design.", lower_bound=1)
_MAX_ITEM_CHARS = flags.DEFINE_integer(
    "max_item_chars", 600, "Length bound of a retrieved item.", lower_bound=1
)
_MAX_REPAIRS = flags.DEFINE_integer(
    "max_repairs", 2, "Repair attempts per candidate.", lower_bound=0
)
_SPACE_OPT = flags.DEFINE_multi_string(
    "space_opt", [], "key=value option passed to the search space (repeatable)."
)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Split the CPU into N devices (testing sharding).", lower_bound=0
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join several processes into one search with jax.distributed (process 0 runs the agents, "
    "every process evaluates a share): 'auto' when --coordinator_address/--num_processes are "
    "given or Slurm or a TPU slice announces more than one process; 'on' always; 'off' never.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (default: detected)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (default: detected).", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: detected).", lower_bound=0
)
_JOIN_TIMEOUT = flags.DEFINE_integer(
    "join_timeout_s", 300, "Seconds to wait for every process to join.", lower_bound=1
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Seconds without a heartbeat after which a process counts as dead (JAX's coordination "
    "service); process 0 then re-deals the evaluations it held.",
    lower_bound=1,
)
_EVAL_TIMEOUT = flags.DEFINE_float(
    "eval_timeout_s",
    None,
    "Deadline of one evaluation, from its start on a device group: past it the candidate is "
    "recorded as timed out and the late answer dropped (default: none).",
    lower_bound=1.0,
)
_SCHEDULE = flags.DEFINE_enum(
    "schedule",
    "steps",
    ["steps", "async"],
    "steps: each step's children are designed from the history as the step began and recorded "
    "when all are evaluated (same flags and seed, same history); async: every free device "
    "group gets a child designed from the history as it stands (README, 'Schedules').",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "",
    "Keep compiled programs in this directory (JAX's persistent cache), so a program compiled "
    "once (a resumed run, another process, a re-run) is loaded, not compiled again. Empty: off.",
)
_PLATFORM = flags.DEFINE_enum(
    "platform",
    "any",
    ["any", "cpu", "gpu", "tpu"],
    "Stop before any work unless JAX's default backend is this one ('any' runs on what it finds).",
)
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic",
    True,
    "On GPU, have XLA use deterministic implementations (--xla_gpu_deterministic_ops).",
)
_ALLOW_WEAK_SANDBOX = flags.DEFINE_bool(
    "allow_weak_sandbox",
    False,
    "Run code mode even where a sandbox cannot get a filesystem view of its own (not root, and "
    "no unprivileged user namespaces): programs then write wherever this user may and can read "
    "this process's environment, API key included, through /proc. Off: such a run stops first.",
)


def config_from_flags() -> RunConfig:
    options = []
    for option in _SPACE_OPT.value:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--space_opt={option!r} is not key=value")
        options.append((key, value))
    return RunConfig(
        search_space=_SEARCH_SPACE.value,
        workdir=_WORKDIR.value,
        steps=_STEPS.value,
        seed=_SEED.value,
        schedule=_SCHEDULE.value,
        eval_timeout_s=_EVAL_TIMEOUT.value if _EVAL_TIMEOUT.value is not None else math.inf,
        sampler=SamplerConfig(
            name=_SAMPLER.value,
            num_references=_NUM_REFERENCES.value,
            ucb_c=_UCB_C.value,
            num_islands=_NUM_ISLANDS.value,
            migration_interval=_MIGRATION_INTERVAL.value,
            migration_rate=_MIGRATION_RATE.value,
            exploration=_EXPLORATION.value,
            exploitation=_EXPLOITATION.value,
        ),
        agents=_AGENTS.value,
        samples_per_step=_SAMPLES_PER_STEP.value,
        concurrency=_CONCURRENCY.value,
        eval_seeds=_EVAL_SEEDS.value,
        promote_top_k=_PROMOTE_TOP_K.value,
        run_name=_RUN_NAME.value,
        retrieval_k=_RETRIEVAL_K.value,
        max_item_chars=_MAX_ITEM_CHARS.value,
        max_repairs=_MAX_REPAIRS.value,
        space_options=tuple(options),
        budget_usd=_BUDGET_USD.value,
        implausible_gain=_IMPLAUSIBLE_GAIN.value,
        llm=LLMConfig(
            researcher_model=_RESEARCHER_MODEL.value,
            engineer_model=_ENGINEER_MODEL.value,
            analyzer_model=_ANALYZER_MODEL.value,
            judge_model=_JUDGE_MODEL.value,
            judge_weight=_JUDGE_WEIGHT.value,
            embedding_model=_EMBEDDING_MODEL.value,
            embedding_dims=_EMBEDDING_DIMS.value,
            base_url=_GEMINI_BASE_URL.value,
            vertex=_VERTEX.value,
            project=_VERTEX_PROJECT.value,
            location=_VERTEX_LOCATION.value,
            attempts=_LLM_ATTEMPTS.value,
            initial_delay_s=_LLM_RETRY_DELAY.value,
            timeout_s=_LLM_TIMEOUT.value,
            max_output_tokens=_MAX_OUTPUT_TOKENS.value,
            thinking_budget=_THINKING_BUDGET.value,
            temperature=_TEMPERATURE.value,
            prices_file=_PRICES_FILE.value,
            prompts_dir=_PROMPTS_DIR.value,
            record_dir=_LLM_RECORD.value,
            prompt_budget_tokens=_PROMPT_BUDGET.value,
            concurrency=_AGENT_CONCURRENCY.value,
            offline_share=_OFFLINE_SHARE.value,
            max_reasks=_MAX_REASKS.value,
            novelty_threshold=_NOVELTY_THRESHOLD.value,
            novelty_retries=_NOVELTY_RETRIES.value,
            edit_mix=parse_edit_mix(_EDIT_MIX.value),
        ),
    )


def request_determinism() -> None:
    """Asks XLA for deterministic GPU ops; XLA reads the flag when a backend starts, so this
    runs before anything (a search space's factory included) can start one."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _DETERMINISTIC.value and "xla_gpu_deterministic_ops" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_gpu_deterministic_ops=true".strip()


def join_cluster() -> None:
    """Splits the CPU if asked and joins the job's other processes, if any; exits 2 when it
    cannot. Runs first: JAX must not have started a backend (importing bm25s starts one)."""
    import jax

    from evolve_jax.evaluation import cluster

    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
    if _COMPILATION_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
        # Every training program is worth keeping; the default skips those under 1 s.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        cluster.initialize(
            _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
            _JOIN_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value,
        )  # fmt: skip
    except cluster.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_devices() -> list:
    """Configures JAX's devices from the flags; returns them, or exits 2 on the wrong platform."""
    import jax

    backend, devices = jax.default_backend(), jax.local_devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    if _PLATFORM.value not in ("any", backend):
        print(
            f"error: --platform={_PLATFORM.value} but JAX's backend is {backend} ({kinds}); "
            f"install the {'cuda' if _PLATFORM.value == 'gpu' else 'tpu'} extra, or pass "
            "--platform=any to run on what there is",
            file=sys.stderr,
        )
        sys.exit(2)
    logging.info("JAX backend %s: %d device(s), %s", backend, len(devices), kinds)
    return devices


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("search_space", "workdir"):
        if not flags.FLAGS[name].value:
            print(f"error: --{name} is required", file=sys.stderr)
            sys.exit(2)
    request_determinism()
    join_cluster()
    # Everything that can be wrong with the input is checked before any work is done.
    try:
        config = config_from_flags()
        storage.check_workdir(config.workdir)
        storage.check_credentials(config.workdir)
        storage.check_epath(config.workdir)
        space = search_space.load(config.search_space, **dict(config.space_options))
        make_sampler(config.sampler, "max", space.descriptors())  # e.g. map_elites without axes
        # A backend's own checks (credentials, prices, prompt templates) also come first.
        preflight = getattr(backend_factory(config.agents), "preflight", None)
        if preflight is not None:
            preflight(config.llm, space)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.INFO)
    # JAX says at INFO that it found no TPU on every machine without one: not news.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    if space.code_spec() is None:
        setup_devices()
    else:
        # Code mode: sandboxed workers own the accelerators; this process keeps JAX on the CPU.
        from evolve_jax.evaluation import cluster, workers

        workers.keep_controller_off_accelerators()
        if cluster.current().num_processes > 1:
            print("error: code mode runs in one process (--distributed=off)", file=sys.stderr)
            sys.exit(2)
        if _PLATFORM.value != "any":
            message = "--platform applies to genome mode; in code mode workers use what they find"
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        from evolve_jax.evaluation import sandbox

        if not sandbox.isolation_support()["fs_private"] and not _ALLOW_WEAK_SANDBOX.value:
            message = (
                "code mode needs sandboxes with a filesystem view of their own: run as root or "
                "where unprivileged user namespaces are allowed, or pass --allow_weak_sandbox "
                "(README, 'The sandbox', says what it gives up)"
            )
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    from evolve_jax.agents.engineer import InfrastructureFailure
    from evolve_jax.evaluation import cluster, scheduler
    from evolve_jax.loop import LoopError, run
    from evolve_jax.memory.cognition import CognitionError
    from evolve_jax.memory.history import HistoryError
    from evolve_jax.report import page

    if cluster.current().leader:
        print(f"report (rewritten every step): {page.url(config.workdir)}", flush=True)
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        summary = run(config, space)
    except (LoopError, HistoryError, CognitionError, InfrastructureFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except scheduler.Interrupted:
        _stopped(config)
    print(summary.report)
    if summary.failure is not None:
        print(f"error: {summary.failure}", file=sys.stderr)
        sys.exit(1)


def _on_interrupt(signum, frame) -> None:
    """First Ctrl-C: stop at the next safe point (the loop checks before each commit and while
    it waits for evaluations); a second: stop at once."""
    del signum, frame
    from evolve_jax.evaluation import scheduler

    if scheduler.STOP.is_set():
        print("\nstopped at once; the same command continues the run", file=sys.stderr)
        os._exit(130)
    scheduler.STOP.set()
    print(
        "\nstopping at the next safe point (Ctrl-C again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


def _stopped(config: RunConfig) -> None:
    """Says how far the run got and how to go on, then exits 130 without waiting for the
    evaluations still running (their work is redone when the run continues)."""
    from evolve_jax.memory.history import History

    mine = [n for n in History(config.workdir).nodes() if n.origin.get("run") == config.run_name]
    print(
        f"interrupted: run {config.run_name!r} has {len(mine)} node(s) recorded in "
        f"{config.workdir}; run the same command to continue it",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
