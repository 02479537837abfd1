"""The engine: trainer, validator, predictor, exporter and their shared machinery."""
