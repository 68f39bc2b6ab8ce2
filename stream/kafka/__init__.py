"""The Kafka data plane: the record-batch format, fetch and produce clients."""
