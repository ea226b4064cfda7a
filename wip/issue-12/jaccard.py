"""Median 3-gram Jaccard of test and OOD tickets to their nearest training ticket, old vs new data."""
import statistics, sys
from labkit.data import read_jsonl
from labkit.dataprep import shingles, jaccard

def nearest(queries, train):
    ts = [shingles(e["messages"][1]["content"]) for e in train]
    return [max(jaccard(shingles(q["messages"][1]["content"]), t) for t in ts) for q in queries]

ood = read_jsonl("/work/main/data/ood_tickets.jsonl")
for name, d in [("old", "/work/main/data"), ("new", "/tmp/newdata")]:
    train, test = read_jsonl(f"{d}/train.jsonl"), read_jsonl(f"{d}/test.jsonl")
    t, o = nearest(test, train), nearest(ood, train)
    print(f"{name}: test median {statistics.median(t):.3f} (mean {statistics.mean(t):.3f}, max {max(t):.3f}); "
          f"OOD median {statistics.median(o):.3f} (max {max(o):.3f})")
