"""Reading and steering representations: directions and probes, steering vectors evaluated
against a prompting baseline, LinEAS, subspace interventions (DAS) and the illusion check."""
