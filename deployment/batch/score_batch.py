"""Azure ML batch deployment entry script: ``init()`` loads the model once, ``run(mini_batch)``
answers every row of the files in a mini-batch. All logic lives in ``blip2.batch``.

Input: a ``uri_folder`` of CSV files written by ``DataFrame({"image": [...], "text": [...]})
.to_csv(path)`` (image cells: public URLs or base64) and/or image files, which are all asked
BLIP2_BATCH_QUESTION (empty: a caption).

Output (``output_action: append_row`` into ``predictions.csv``, no header): one line per row,
``row_number_per_file, text, file_name``. A row that fails has the text
``ERROR[<code>]: <message>``; a file that cannot be read gives one such line with row
number -1. Neither fails the mini-batch. An error that fails a whole chunk (the model, a
deadline) raises, so Azure retries the mini-batch (``retry_settings``).

Environment: the service's BLIP2_* settings (see the README) plus BLIP2_BATCH_QUESTION,
BLIP2_BATCH_PARAMETERS (JSON generation parameters) and BLIP2_BATCH_CHUNK (rows per model
call, default 64). AZUREML_MODEL_DIR is set by Azure.
"""

import logging
import sys
from pathlib import Path

# The deployment's code is the repository root (code_configuration.code); make sure the
# blip2 package next to this script's grandparent folder is importable however Azure starts us.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from blip2.batch import BatchOptions, run_mini_batch  # noqa: E402
from blip2.config import Settings  # noqa: E402
from blip2.logs import setup_logging  # noqa: E402

_service = None
_options = None


def init():
    """Validate the settings (ValueError names a bad variable), then load the model once."""
    global _service, _options
    setup_logging()
    settings = Settings.from_env()
    _options = BatchOptions.from_env(caps=settings.caps)
    from blip2.service import Service

    _service = Service.from_settings(settings)
    logging.getLogger("blip2").info("Ready for batch scoring (%d rows per chunk)", _options.chunk_size)


def run(mini_batch):
    """A list of file paths -> a DataFrame ``row_number_per_file, text, file_name``."""
    return run_mini_batch(_service, mini_batch, _options)


def shutdown():
    """Stop the service's threads. Azure does not call this; tests and local runs do."""
    global _service
    if _service is not None:
        _service.close()
        _service = None
