"""How a batch of images is cut for /dev/shm: whole when the free space is unknown, slices within half the free
space, files when not one image fits (overfilling /dev/shm is SIGBUS, not an error). `mai/core/shm_plan.py`."""

from __future__ import annotations

from hypothesis import given, strategies as st

from mai.core.shm_plan import SHM_SHARE, plan_shm_batches

IMAGE = 224 * 224 * 3  # one uint8 image of CLIP's input size


def test_unknown_free_space_sends_the_batch_whole() -> None:
    assert plan_shm_batches(7, IMAGE, None) == [(0, 7)]


def test_only_half_the_free_space_is_planned_for() -> None:
    assert SHM_SHARE == 0.5
    assert plan_shm_batches(10, IMAGE, 8 * IMAGE) == [(0, 4), (4, 8), (8, 10)]  # 4 images = half of 8
    assert plan_shm_batches(10, IMAGE, 8 * IMAGE + 1) == [(0, 4), (4, 8), (8, 10)]  # a partial image does not count
    assert plan_shm_batches(3, IMAGE, 20 * IMAGE) == [(0, 3)]  # everything fits in one slice


def test_exactly_one_image_fits_or_none_and_the_images_go_as_files() -> None:
    assert plan_shm_batches(3, IMAGE, 2 * IMAGE) == [(0, 1), (1, 2), (2, 3)]  # half the space is exactly one image
    assert plan_shm_batches(3, IMAGE, 2 * IMAGE - 1) is None
    assert plan_shm_batches(3, IMAGE, 0) is None


def test_zero_sized_images_do_not_divide_by_zero() -> None:
    assert plan_shm_batches(4, 0, 3) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # counted as 1 byte each: 1 per slice


@given(count=st.integers(1, 300), image=st.integers(1, 10_000), free=st.integers(0, 2_000_000))
def test_slices_cover_the_batch_in_order_each_within_the_planned_share(count: int, image: int, free: int) -> None:
    plan = plan_shm_batches(count, image, free)
    if free * SHM_SHARE < image:
        assert plan is None
        return
    assert plan is not None and plan[0][0] == 0 and plan[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))  # contiguous, no gap, no overlap
    assert all((hi - lo) * image <= free * SHM_SHARE and hi > lo for lo, hi in plan)
    per_slice = plan[0][1] - plan[0][0]
    assert (per_slice + 1) * image > free * SHM_SHARE or per_slice == count  # as many per slice as fit
