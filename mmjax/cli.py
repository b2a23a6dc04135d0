"""What every entry point does first: join the other processes, tame the logs."""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmjax import compilation_cache, distributed

# Libraries whose INFO lines drown the run's own (orbax logs every file it writes).
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/array_record/")


_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "JAX's persistent compilation cache: 'on' (the folder under ~/.cache/mmjax), a folder, "
    f"or 'off'; default from ${compilation_cache.ENV} (off when unset)")


class _DropChattyInfo(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def init_process() -> None:
  distributed.maybe_initialize()
  compilation_cache.enable(_COMPILATION_CACHE.value)  # off when several processes run
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  handler.addFilter(_DropChattyInfo())


def experiment_flags(workdir_help: str):
  """--config=experiments/NAME.py[:ARGS] (with --config.KEY=VALUE) and --workdir=DIR."""
  config = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def run(body) -> None:
  """app.run(body()) after init_process; positional arguments are an error."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    init_process()
    body()
  app.run(main)
