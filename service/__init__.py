"""BentoML services of vqdiff: a TRK gateway (`service.gateway`) in front of a batching model service
(`service.model_service`). Start them from the repository root with ``bentoml serve``.

Nothing heavy is imported here: ``service.app`` is the entry point.
"""
