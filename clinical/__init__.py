"""From a model to a clinical answer: a registered head run over a whole slide or a whole CT series,
and score modules that turn per-slice outputs into the clinical number (``clinical.scores``).
Knows the data side and the engine, not MLflow: ``projects.predict`` and the service call it."""
