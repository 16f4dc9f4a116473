"""The runtime shared by every processor: what makes a pure step a crash-safe Kafka processor.

- `ingest`: a consumer-group loop taking batches from one input topic (offsets committed after a batch).
- `producer`: the batch producer and `Outputs`, the records a batch produces, per topic and partition.
- `state`: the per-partition state store whose commit is a compare-and-set on an applied-offset
  watermark (Redis, and an in-memory twin for unit tests).
- `runner`: `ProcessorRunner`, the order of effects that makes at-least-once delivery exactly-once in effect.
- `clock`: the partition stream clock that drives timers.
- `backoff`: the one retry-with-backoff loop.
"""
