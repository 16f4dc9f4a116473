"""The runtime shared by every processor: what makes a pure step a crash-safe Kafka processor.

A processor declares its state (`state.StateSpec`: key, codec, time to live, kept decoded or not) and its
timers, and computes each batch through a `batch.Batch`; the runtime does the rest.

- `ingest`: a consumer-group loop taking batches from one input topic (offsets committed after a batch).
- `batch`: `Batch`, what a processor works through: its states (loaded in one round trip, written only
  when their bytes changed), timers, outputs, further writes, the clock and a version source.
- `writes`: `Writes`, every write a commit can make, recorded per batch (`WriteBatch`) and replayed onto
  the Redis transaction (`RedisWrites`) or onto the in-memory twin (`MemoryRedis`).
- `state`: `StateSpec` and the per-partition state store whose commit is a compare-and-set on an
  applied-offset watermark (`RedisStateStore`, and `MemoryStateStore` on the twin for unit tests).
- `decoded`: the decoded values of large states a worker last wrote, reused while their bytes match.
- `producer`: the batch producer (and its memory twin) and `Outputs`, the records a batch produces.
- `runner`: `ProcessorRunner`, the order of effects that makes at-least-once delivery exactly-once in
  effect, the timers, and the isolation of poison records.
- `clock`: the wall clock the runner reads and the partition stream clock that drives timers.
- `backoff`: the one retry-with-backoff loop. `cost`: CPU per part of the work.

The runtime knows no application topic or key: its callers give it their dead-letter topic and prefix.
"""
