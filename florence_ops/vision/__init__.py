"""The vision side: the inputs every inference path reads (`sources`), the feature cache (`cache`), the encoder
that builds it (`encoder`) and the one way the stages open or build it (`stage_cache`)."""
