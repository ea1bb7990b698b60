"""The queue that waits for a link (stagetx.linkqueue): order, both bounds, the half kept for a turn."""

from __future__ import annotations

from stagetx.linkqueue import LinkQueue


def test_items_keep_their_order_and_their_bytes_are_counted_in_and_out() -> None:
    queue: LinkQueue[bytes] = LinkQueue(10, 1 << 20, len)
    queue.extend([b"a", b"bb", b"ccc"])
    assert (list(queue), queue.bytes, queue[0]) == ([b"a", b"bb", b"ccc"], 6, b"a")
    assert queue.popleft() == b"a" and queue.bytes == 5
    assert queue.take() == [b"bb", b"ccc"] and queue.bytes == 0 and not queue


def test_either_bound_refuses_and_room_ends_at_half_of_each() -> None:
    by_count: LinkQueue[bytes] = LinkQueue(4, 1 << 20, len)
    by_count.extend([b"x", b"x"])
    assert by_count.limit_reached() is None and not by_count.has_room()  # 2 of 4: half
    by_count.extend([b"x", b"x"])
    assert by_count.limit_reached() == "4"
    by_bytes: LinkQueue[bytes] = LinkQueue(100, 2 << 20, len)
    by_bytes.append(b"x" * ((1 << 20) - 1))
    assert by_bytes.has_room()
    by_bytes.append(b"x")  # 1 MiB: half
    assert not by_bytes.has_room() and by_bytes.limit_reached() is None
    by_bytes.append(b"x" * (1 << 20))
    assert by_bytes.limit_reached() == "2 MiB"
