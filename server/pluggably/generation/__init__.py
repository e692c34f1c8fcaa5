"""Generation: the servicers, the proto converters, validation against the target model
(dataplane) and routing with aliases and fallbacks (router)."""
