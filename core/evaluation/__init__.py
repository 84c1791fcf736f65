"""Running a model over an evaluation set (captions, VQA, retrieval) and scoring it with vlbridge.metrics."""
