from prism_ray.engine.batching import budget_batches


def test_batches_sorted_by_length_within_budget():
    lengths = [50, 10, 300, 20, 40, 30]
    batches = budget_batches(lengths, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert [2] in batches  # longer than the budget: a batch of its own


def test_max_batch_size():
    assert budget_batches([1] * 5, token_budget=1000, max_batch_size=2) == [[0, 1], [2, 3], [4]]
