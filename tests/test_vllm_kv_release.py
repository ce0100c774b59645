"""The KV-only release plan for vLLM builds without ``release_kv_cache_memory``: the cumem allocations
that hold KV-cache tensor memory are released, the engine metadata that shares them
(vllm-project/vllm#53343) is listed to be preserved (copied out and back), allocations of metadata
alone stay mapped. Pure planning, no vLLM needed."""

from __future__ import annotations

from compilepass.standby.rollout.vllm.kv_release import KV_TAG, plan_release

MiB = 1 << 20


def seg(addr, size, *blocks):
    """A snapshot segment; a block is (address, size, state) or (address, size, state, requested_size)."""
    return {"address": addr, "total_size": size,
            "blocks": [{"address": b[0], "size": b[1], "state": b[2], **({"requested_size": b[3]} if len(b) > 3 else {})}
                       for b in blocks]}


def test_allocations_with_kv_are_released_and_their_metadata_preserved():
    kv = [(0x1000_0000, 0x1000_0000 + 64 * MiB), (0x2000_0000, 0x2000_0000 + 64 * MiB)]
    allocations = [
        (0x1000_0000, 64 * MiB, KV_TAG),           # one KV tensor, exactly its segment
        (0x2000_0000, 66 * MiB, KV_TAG),           # a KV tensor plus an engine block in the rounding slack
        (0x3000_0000, 2 * MiB, KV_TAG),            # block tables allocated inside the kv_cache pool
        (0x4000_0000, 512 * MiB, "weights"),       # never touched
        (0x5000_0000, 2 * MiB, KV_TAG),            # torch does not know this extent
    ]
    snapshot = [
        seg(0x1000_0000, 64 * MiB, (0x1000_0000, 64 * MiB, "active_allocated")),
        seg(0x2000_0000, 66 * MiB, (0x2000_0000, 64 * MiB, "active_allocated"),
            (0x2000_0000 + 64 * MiB, 1536 * 1024, "active_allocated"), (0x2000_0000 + 65 * MiB + 512 * 1024, 512 * 1024, "inactive")),
        seg(0x3000_0000, 2 * MiB, (0x3000_0000, 4096, "active_allocated"), (0x3000_1000, 2 * MiB - 4096, "inactive")),
        seg(0x4000_0000, 512 * MiB, (0x4000_0000, 512 * MiB, "active_allocated")),
        seg(0x5000_0000, 4 * MiB, (0x5000_0000, 4 * MiB, "active_allocated")),
    ]
    plan = plan_release(allocations, snapshot, kv)
    assert plan.release == [0x1000_0000, 0x2000_0000]
    assert plan.release_bytes == 130 * MiB
    assert plan.kv_bytes == 128 * MiB and plan.kv_bytes_covered == 128 * MiB
    # the engine block in the second allocation's slack is preserved; the free block is not copied
    assert plan.preserve == [(0x2000_0000 + 64 * MiB, 0x2000_0000 + 64 * MiB + 1536 * 1024)]
    assert plan.preserve_bytes == 1536 * 1024
    assert 0x2000_0000 not in plan.kept
    assert "no KV-cache tensor in it" in plan.kept[0x3000_0000]  # metadata alone: stays mapped
    assert "no segment of this extent" in plan.kept[0x5000_0000]
    assert 0x4000_0000 not in plan.kept  # other tags are not even considered


def test_a_segment_shared_by_two_kv_tensors_and_free_slack_is_released():
    kv = [(100 * MiB, 130 * MiB), (130 * MiB, 160 * MiB)]  # adjacent tensors merge into one range
    allocations = [(100 * MiB, 62 * MiB, KV_TAG)]
    snapshot = [seg(100 * MiB, 62 * MiB, (100 * MiB, 30 * MiB, "active_allocated"),
                    (130 * MiB, 30 * MiB, "active_pending_free"), (160 * MiB, 2 * MiB, "inactive"))]
    plan = plan_release(allocations, snapshot, kv)
    assert plan.release == [100 * MiB] and not plan.kept and plan.kv_bytes_covered == 60 * MiB
    assert plan.preserve == [] and plan.preserve_bytes == 0


def test_nothing_releasable_when_the_pool_holds_no_kv_block():
    plan = plan_release([(0, 2 * MiB, KV_TAG)], [seg(0, 2 * MiB, (0, 2 * MiB, "inactive"))], [(10 * MiB, 20 * MiB)])
    assert plan.release == [] and "no live block" in plan.kept[0]


def test_an_unsplit_block_longer_than_its_kv_tensor_is_still_the_kv_cache():
    """torch leaves a large block unsplit when the slack is under 1 MiB, so the block's ``size`` runs
    past the KV tensor (seen on the H200 with vLLM 0.26 at qwen3-0.6b shapes): the allocation is
    released; with ``requested_size`` nothing is preserved, without it only the slack is."""
    kv_end = 200 * MiB + 70 * MiB + 4096
    kv = [(200 * MiB, kv_end)]
    allocations = [(200 * MiB, 72 * MiB, KV_TAG)]
    with_requested = [seg(200 * MiB, 72 * MiB, (200 * MiB, 72 * MiB, "active_allocated", kv_end - 200 * MiB))]
    plan = plan_release(allocations, with_requested, kv)
    assert plan.release == [200 * MiB] and plan.preserve == [] and plan.kv_bytes_covered == kv_end - 200 * MiB
    without = [seg(200 * MiB, 72 * MiB, (200 * MiB, 72 * MiB, "active_allocated"))]
    plan = plan_release(allocations, without, kv)
    assert plan.release == [200 * MiB] and plan.preserve == [(kv_end, 272 * MiB)]


def test_metadata_beside_the_kv_tensor_in_one_block_is_preserved_exactly():
    kv = [(10 * MiB, 12 * MiB)]
    snapshot = [seg(8 * MiB, 6 * MiB, (8 * MiB, 6 * MiB, "active_allocated"))]
    plan = plan_release([(8 * MiB, 6 * MiB, KV_TAG)], snapshot, kv)
    assert plan.preserve == [(8 * MiB, 10 * MiB), (12 * MiB, 14 * MiB)] and plan.preserve_bytes == 4 * MiB
