"""What every entry point does first: join the other processes, tame the logs."""

import logging

from absl import logging as absl_logging

from mmjax import distributed

# Libraries whose INFO lines drown the run's own (orbax logs every file it writes).
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/array_record/")


class _DropChattyInfo(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def init_process() -> None:
  distributed.maybe_initialize()
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  handler.addFilter(_DropChattyInfo())
