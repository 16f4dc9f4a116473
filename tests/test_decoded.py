"""DecodedStates: a hit needs the very same bytes, small blobs are not kept, and the bytes kept are bounded."""

from processors.runtime.decoded import DecodedStates


def test_a_hit_needs_the_same_bytes():
    states: DecodedStates[str] = DecodedStates(min_bytes=4)
    states.put("k", b"state-1", "one")
    assert states.get("k", b"state-1") == "one"
    assert states.get("k", b"state-2") is None  # another writer's bytes: decode them
    assert states.get("other", b"state-1") is None
    assert (states.hits, states.misses) == (1, 2)


def test_small_blobs_are_not_kept_and_a_new_write_replaces_the_old():
    states: DecodedStates[str] = DecodedStates(min_bytes=4)
    states.put("k", b"abc", "small")
    assert states.get("k", b"abc") is None and len(states) == 0
    states.put("k", b"first", "1")
    states.put("k", b"xyz", "2")  # a write too small to keep still drops what the key had
    assert states.get("k", b"first") is None and len(states) == 0


def test_the_bytes_kept_are_bounded_oldest_out_first():
    states: DecodedStates[int] = DecodedStates(max_bytes=100, min_bytes=1)
    for i in range(10):
        states.put(f"k{i}", bytes(30), i)
        assert states.bytes_kept <= 100
    assert len(states) == 3
    assert states.get("k9", bytes(30)) == 9 and states.get("k0", bytes(30)) is None
