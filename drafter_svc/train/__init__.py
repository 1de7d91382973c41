"""The DSpark training pipeline: data regeneration, target cache, training, calibration, export."""
