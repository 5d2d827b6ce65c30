"""The BentoML service of vqdiff (`service.app.VQDiff`); start it from the repository root with
``bentoml serve``. Nothing heavy is imported here."""
