"""The vision side: the inputs every inference path reads (`sources`), the feature cache (`cache`) and the encoder
that builds it (`encoder`)."""
