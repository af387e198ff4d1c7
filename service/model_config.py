"""A model's Triton configuration (``config.pbtxt``), read by protobuf into Triton's ``ModelConfig``.

The same file configures Triton, so it is parsed by the real message definition (vendored in
``service/protos``), never by pattern matching: a commented-out line is a comment, and a
malformed file is an error with the parser's own message.

What the service takes from it, and how it combines with the ``CONVSERVE_*`` settings:

- ``max_batch_size`` is the largest batch the *model* accepts (Triton's meaning): the batcher
  forms batches of at most the smaller of it and ``CONVSERVE_MAX_BATCH_SIZE``. Absent or 0, the
  model sets no limit (every model served here has a batch dimension).
- ``dynamic_batching.max_queue_delay_microseconds`` (when non-zero) and ``version_policy``
  override ``CONVSERVE_MAX_QUEUE_DELAY_US`` and ``CONVSERVE_VERSION_POLICY`` for that model;
  those settings apply where the file is silent, and their defaults where they are unset.
- ``output[].label_filename`` marks the class-probabilities output of a multi-output model.
- ``parameters { key: "rollout" value { string_value: "canary" } }`` overrides ``CONVSERVE_ROLLOUT`` for the
  model (:mod:`service.rollout`), and ``rollout_min_agreement`` its ``CONVSERVE_ROLLOUT_MIN_AGREEMENT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from service.batching import BatchingConfig
from service.protos.model_config_pb2 import ModelConfig
from service.settings import ROLLOUT_MODES, Settings

CONFIG_FILE = "config.pbtxt"


class ConfigError(ValueError):
    """config.pbtxt exists but cannot be used; the message says why, in the parser's words."""


def read_model_config(model_dir: Path) -> ModelConfig | None:
    """The model's config.pbtxt as a ``ModelConfig`` message, or None when it has none."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{CONFIG_FILE} cannot be read ({exc.__class__.__name__})") from None
    try:
        config = text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{CONFIG_FILE} is malformed: {exc}") from None
    if "rollout" in config.parameters:
        mode = config.parameters["rollout"].string_value.strip().lower()
        if mode not in ROLLOUT_MODES:
            raise ConfigError(f"{CONFIG_FILE}: parameter rollout must be one of {', '.join(ROLLOUT_MODES)}, "
                              f"got {config.parameters['rollout'].string_value[:32]!r}")
    if "rollout_min_agreement" in config.parameters:
        text = config.parameters["rollout_min_agreement"].string_value
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1:
            raise ConfigError(f"{CONFIG_FILE}: parameter rollout_min_agreement must be a number from 0 to 1, "
                              f"got {text[:32]!r}")
    return config


def config_version_policy(config: ModelConfig | None) -> str | None:
    """The file's version policy in the settings' notation (``latest:N``, ``all``, ``specific:1,3``)."""
    if config is None or not config.HasField("version_policy"):
        return None
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return "all"
    if choice == "specific":
        return "specific:" + ",".join(str(v) for v in policy.specific.versions)
    if choice == "latest":
        return f"latest:{max(1, policy.latest.num_versions)}"
    return None


def probabilities_output(config: ModelConfig | None) -> str | None:
    """The output the file gives labels to (``label_filename``): the class probabilities."""
    if config is None:
        return None
    labelled = [o.name for o in config.output if o.label_filename]
    return labelled[0] if len(labelled) == 1 else None


@dataclass(frozen=True)
class ModelSettings:
    """What one model runs with, and where each value came from (for the load log)."""

    batching: BatchingConfig
    version_policy: str
    sources: dict[str, str]


def _source(settings: Settings, field: str) -> str:
    return "environment" if field in settings.model_fields_set else "default"


def model_settings(config: ModelConfig | None, settings: Settings) -> ModelSettings:
    """Combine a model's config.pbtxt with the service settings (see the module docstring)."""
    sources: dict[str, str] = {}
    policy = config_version_policy(config)
    if policy is not None:
        sources["version_policy"] = CONFIG_FILE
    else:
        policy, sources["version_policy"] = settings.version_policy, _source(settings, "version_policy")

    if not settings.batching:
        sources.update(max_batch_size="batching off", max_queue_delay_us="batching off")
        batching = BatchingConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=settings.max_queue_size,
                                  timeout_s=settings.request_timeout_seconds,
                                  queue_target_s=settings.queue_target_seconds, on_loop=settings.batches_on_loop)
        return ModelSettings(batching, policy, sources)

    max_batch, sources["max_batch_size"] = settings.max_batch_size, _source(settings, "max_batch_size")
    if config is not None and 0 < config.max_batch_size < max_batch:
        max_batch = config.max_batch_size
        sources["max_batch_size"] = f"{CONFIG_FILE} (the model's limit)"
    delay, sources["max_queue_delay_us"] = settings.max_queue_delay_us, _source(settings, "max_queue_delay_us")
    if config is not None and config.dynamic_batching.max_queue_delay_microseconds:
        delay = config.dynamic_batching.max_queue_delay_microseconds
        sources["max_queue_delay_us"] = CONFIG_FILE
    batching = BatchingConfig(max_batch_size=max_batch, max_queue_delay_us=delay,
                              max_queue_size=settings.max_queue_size, timeout_s=settings.request_timeout_seconds,
                              queue_target_s=settings.queue_target_seconds, on_loop=settings.batches_on_loop)
    return ModelSettings(batching, policy, sources)
