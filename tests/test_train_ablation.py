"""bench/train_ablation.py: each variant trains about --steps steps, and the table says how many."""
import argparse

from bench import train_ablation


def test_each_variant_trains_the_steps_asked_for_in_epochs_of_50_at_most():
    assert [train_ablation.schedule(s) for s in (2, 50, 120, 300)] == [(2, 1), (50, 1), (50, 2), (50, 6)]
    args = argparse.Namespace(dataset="d.h5", val_dataset="v.h5", start="pt/demo.pt", crop=128, steps=2)
    flags = train_ablation.train_flags(args, "supervised")
    assert flags[flags.index("--epoch_size") + 1] == "16" and flags[flags.index("--epochs") + 1] == "1"  # 2 batches
