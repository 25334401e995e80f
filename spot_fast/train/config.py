"""The run's config and its resolution, as the trainer imports them. They live in
`spot_fast/train_config.py`, below this package, so that the command line can build its options
from TrainConfig without loading the trainer (model, kernels, cache readers)."""
from spot_fast.train_config import (MAX_SEED, RESUME_FREE, SHADOWED, OverrideError, TrainConfig, TrainError,
                                    apply_overrides, check_device, check_distinct_variants, config_diff,
                                    config_keys, encoder_from_manifest, model_config, parse_value)

__all__ = ["MAX_SEED", "RESUME_FREE", "SHADOWED", "OverrideError", "TrainConfig", "TrainError", "apply_overrides",
           "check_device", "check_distinct_variants", "config_diff", "config_keys", "encoder_from_manifest",
           "model_config", "parse_value"]
