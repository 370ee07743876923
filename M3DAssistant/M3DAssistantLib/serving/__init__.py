"""Serving M3D over HTTP: ``m3d serve`` and its client.

* :mod:`.protocol`: what travels between client and server (volume ids, masks, results, errors);
* :mod:`.client`: :class:`~.client.M3DClient`, the engine's task methods over HTTP (standard library + numpy);
* :mod:`.server`: ``m3d serve`` (``python -m M3DAssistantLib.serving``): options, token, bind, ready line;
* :mod:`.app`: the FastAPI app factory, with :mod:`.guard`, :mod:`.routes`, :mod:`.schemas`, :mod:`.responses`,
  :mod:`.volume_store`, :mod:`.engine_queue` and :mod:`.state`.

Nothing is imported here: Slicer's process imports the client, which must not pull in FastAPI or torch.
"""
