"""Kafka I/O: the tick contract, codecs, feeds, the stream worker and the archiver."""
