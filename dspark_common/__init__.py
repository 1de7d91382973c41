"""Code shared by every dspark-serve service: domain types, errors, sampling math, settings, the
wire codec and generated stubs. Nothing here owns state or a model."""
