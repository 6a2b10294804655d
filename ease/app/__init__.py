"""The Hydra application around the library: schemas, config-to-object builders, the run function."""
