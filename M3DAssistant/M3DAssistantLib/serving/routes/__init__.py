"""The HTTP API's routes, one router per resource (as MONAI Label's ``endpoints``), all under ``/v1``:

* :mod:`.health`: ``GET /v1/health``, ``GET /v1/info``;
* :mod:`.volumes`: ``POST /v1/volumes``, ``GET`` / ``DELETE /v1/volumes/{id}``;
* :mod:`.tasks`: ``POST /v1/volumes/{id}/{task}``, one route per streaming task of the registry;
* :mod:`.retrieval`: ``POST /v1/volumes/{id}/retrieve``, ``POST /v1/retrieve`` (M3D-CLIP);
* :mod:`.selfcheck`: ``POST /v1/selfcheck`` (the installation check);
* :mod:`.cancel`: ``POST /v1/cancel``.

Route modules take the server's state through the :func:`~..state.serving_state` dependency. They do not use
``from __future__ import annotations``: FastAPI reads the parameter annotations, some of which are built per task.
"""

from . import cancel, health, retrieval, selfcheck, tasks, volumes

ROUTERS = (health.router, volumes.router, tasks.router, retrieval.router, selfcheck.router, cancel.router)
"""In the order of the OpenAPI schema."""
