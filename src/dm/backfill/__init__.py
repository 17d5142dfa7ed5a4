"""``dm.batched``: keyset batches, their tuning, back-off predicates and progress."""
