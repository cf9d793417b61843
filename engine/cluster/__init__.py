"""Scale-out of the engine on Ray: batch evaluation over N engine actors (``engine.cluster.eval``)."""
