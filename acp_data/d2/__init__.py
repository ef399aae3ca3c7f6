"""detectron2 integration: config keys, datasets, sampler, mapper, loader, evaluation."""
