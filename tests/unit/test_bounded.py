"""Caches and log-once sets that empty themselves when full: never above their limit, hits served
as from a dict, and a log-once item new again after the set emptied."""

from __future__ import annotations

from stagetx.bounded import BoundedDict, OnceSet


def test_a_bounded_dict_never_holds_more_than_its_limit() -> None:
    cache: BoundedDict[int, str] = BoundedDict(3)
    sizes = []
    for key in range(10):  # endless distinct keys, as from a peer making them up
        if key not in cache:
            cache.put(key, str(key))
        sizes.append(len(cache))
    assert max(sizes) == 3
    assert sizes == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def test_a_new_key_while_full_empties_the_dict_then_is_kept() -> None:
    cache: BoundedDict[str, int] = BoundedDict(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.put("c", 3) == 3  # put returns what it stored
    assert dict(cache) == {"c": 3}
    assert cache.get("a") is None and "b" not in cache


def test_hits_are_served_as_from_a_dict_until_it_empties() -> None:
    cache: BoundedDict[str, list[int]] = BoundedDict(4)
    value = cache.put("a", [1])
    cache.put("b", [2])
    for _ in range(100):  # reads neither grow nor empty it
        assert cache.get("a") is value and cache["b"] == [2] and "a" in cache
    assert len(cache) == 2 and cache.limit == 4
    assert isinstance(cache, dict)


def test_a_once_set_says_first_once_per_item() -> None:
    seen: OnceSet[str] = OnceSet(10)
    answers = [seen.first(item) for item in ["x", "y", "x", "x", "y", "z"]]
    assert answers == [True, True, False, False, False, True]
    assert seen == {"x", "y", "z"}


def test_a_once_set_says_first_again_after_it_emptied() -> None:
    seen: OnceSet[str] = OnceSet(2)
    assert seen.first("a") and seen.first("b")
    assert not seen.first("a")  # held: no room needed
    assert seen.first("c")  # full: emptied, then "c" kept
    assert seen == {"c"}
    assert seen.first("a")  # forgotten with the rest: first again
    assert not seen.first("c")


def test_a_once_set_never_holds_more_than_its_limit() -> None:
    seen: OnceSet[int] = OnceSet(5)
    sizes = []
    for item in range(23):
        assert seen.first(item)
        sizes.append(len(seen))
    assert max(sizes) == 5
    assert sizes[:7] == [1, 2, 3, 4, 5, 1, 2] and len(seen) == 3  # 23 items: emptied four times
