"""The block queue picture: a watcher sees the staggered diagonal of block_pipeline."""

from clipmesh.progress import queue_picture


def test_queue_picture_draws_the_diagonal_oldest_first():
    assert queue_picture({}, 4) == ""
    # blocks 3..6 one step apart: the oldest nearly done, the newest just entered
    assert queue_picture({3: 4, 4: 3, 5: 2, 6: 1}, 4) == "b3 █▆▄▂ b6"
    many = {b: 4 for b in range(30)}
    assert queue_picture(many, 4, width=5) == "b25 █████ b29"  # only the newest blocks
