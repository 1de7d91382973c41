"""The verifier: the target model, acceptance, verification scheduling and the decode loop."""
