"""PNG plots from the benchmark JSON files (each plot is skipped when its JSON is not given).

  python3 -m benchmarks.plot --train train.json --decode decode.json --mqar mqar.json --out-dir plots/
"""
import argparse
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend


def _series(rows: list[dict], key, x: str, y: str) -> dict[str, list[tuple]]:
  """{label: sorted [(x, y)]} over rows that have y (failed cases are left out); `key` is a row field
  or a function of the row giving the series label."""
  out = collections.defaultdict(list)
  for row in rows:
    if row.get(y) is not None:
      out[row[key] if isinstance(key, str) else key(row)].append((row[x], row[y]))
  return {k: sorted(v) for k, v in out.items()}


def _plot(series: dict, title: str, xlabel: str, ylabel: str, path: str, logx: bool = True,
          logy: bool = False) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, points in series.items():
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o", label=name)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train", help="benchmarks/train_throughput.py --out JSON")
  parser.add_argument("--decode", help="benchmarks/decode.py --out JSON")
  parser.add_argument("--mqar", help="benchmarks/mqar.py --out JSON")
  parser.add_argument("--out-dir", default="benchmarks/plots")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  if args.train:
    data = json.load(open(args.train))
    _plot(_series(data["rows"], "model", "seq", "tokens_per_s"),
          f"Training throughput, {data['tokens_per_step']} tokens/step ({data['device']})",
          "sequence length", "tokens/s", os.path.join(args.out_dir, "train_throughput.png"))
  if args.decode:
    data = json.load(open(args.decode))
    label = lambda row: f"{row['model']} (batch {row['batch']})"
    _plot(_series(data["rows"], label, "context", "latency_ms"), f"Decoding ({data['device']})",
          "context (tokens)", "ms per token", os.path.join(args.out_dir, "decode_latency.png"))
  if args.mqar:
    data = json.load(open(args.mqar))
    by_task = collections.defaultdict(list)
    for row in data["rows"]:
      by_task[(row["seq"], row["pairs"])].append(row)
    for (seq, pairs), rows in sorted(by_task.items()):
      _plot(_series(rows, "model", "state_bytes", "accuracy"),
            f"MQAR, seq {seq}, {pairs} pairs ({data['device']})", "decode state (bytes)",
            "accuracy", os.path.join(args.out_dir, f"mqar_{seq}_{pairs}.png"))


if __name__ == "__main__":
  main()
