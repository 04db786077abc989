"""Azure ML entry script: ``init()`` loads the model once per worker, ``run()`` answers /score.

All logic lives in the ``blip2`` package; this file only wires it to azmlinfsrv.
"""

import logging

from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

from blip2.config import Settings
from blip2.handler import handle
from blip2.logs import setup_logging

_service = None


def init():
    """Read settings from the environment, load and warm up the model. Raises with a clear message."""
    global _service
    setup_logging()
    from blip2.service import Service

    _service = Service.from_settings(Settings.from_env())
    logging.getLogger("blip2").info("Ready to serve /score")


@rawhttp
def run(request):
    status, body = handle(_service, request)
    if status == 200:  # azmlinfsrv sends a plain value as JSON with 200, without logging a line for it
        return body
    return AMLResponse(body, status, json_str=True)
