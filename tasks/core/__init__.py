"""What every stage shares: the params schema (config), artifact paths, file IO, problems and
prompts, code extraction, model loading and the metrics."""
