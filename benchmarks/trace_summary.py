"""Where one profiled step's device time goes: a `jax.profiler.trace` directory -> time by model part.

Each kernel event of the trace (the GPU plane's stream lines, else its "XLA Ops" line; the host's XLA
threads on CPU) is matched by its HLO instruction name to the compiled module's text, whose
metadata holds the JAX name stack (e.g. `.../transpose(jvp(LinearMoELM))/layers/block_0/moe/...`),
and the instruction's text says whether it is a matmul, a Pallas/Triton kernel or cuDNN attention.
Parts (first rule that matches): MoE grouped matmuls (kernels and matmuls under `moe/`), MoE routing
and data movement (the rest of `moe/`), norms (`*norm` modules), mixer kernels (Pallas/Triton or cuDNN
under `mixer/`), mixer projections (matmuls under `mixer/`), mixer elementwise (the rest of `mixer/`),
embedding/head/loss (with the loss and its gradient outside the model), optimizer (the rest outside
the model: gradient norm, AdamW, update), other. Each part's time is split into forward, recompute
(the rematerialized forward inside the backward pass: `rematted_computation`) and backward (the rest
under `transpose(`). Loop and call ops are left out (their bodies' ops are counted).
"""
import collections
import glob
import os
import re

from jax.profiler import ProfileData

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MATMUL = ("gemm", "__cublas", " dot(", "convolution(")
_KERNEL = ("triton", "__gpu$xla.gpu", "cudnn", "mosaic")
_CONTROL = re.compile(r"\b(while|conditional|call)\(")
PHASES = ("forward", "recompute", "backward")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (JAX name stack, instruction text)} of a compiled module's text."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(match.group(2))
      ops[match.group(1)] = (op_name.group(1) if op_name else "", match.group(2))
  return ops


def part(op_name: str, text: str) -> str:
  """The model part of one HLO op (see the module docstring)."""
  segments = op_name.split("/")
  is_matmul = any(m in text for m in _MATMUL) or segments[-1] == "dot_general"
  is_kernel = any(k in text for k in _KERNEL)
  if "moe" in segments:
    return "MoE grouped matmuls" if is_matmul or is_kernel else "MoE routing, sort, gather"
  if any(s.endswith("norm") for s in segments):
    return "norms"
  if "mixer" in segments:
    return "mixer kernels" if is_kernel else "mixer projections" if is_matmul else "mixer elementwise"
  if any(s in segments for s in ("lm_head", "embed")) or "cross_entropy" in op_name:
    return "embedding, head, loss"
  if "LinearMoELM" not in op_name:
    return "embedding, head, loss" if "jvp(" in op_name else "optimizer, grad norm, update"
  return "other"


def phase(op_name: str) -> str:
  """forward, recompute or backward (see the module docstring)."""
  if "rematted_computation" in op_name:
    return "recompute"
  return "backward" if "transpose(" in op_name else "forward"


def device_events(xplane_path: str) -> list[tuple[str | None, float]]:
  """(HLO instruction name or None where the event names none, duration in ms) of every kernel of a
  trace file: the device planes' stream lines (the host's XLA threads on CPU), else, where no stream
  event names its HLO op, the "XLA Ops" line."""
  planes = list(ProfileData.from_file(xplane_path).planes)  # iterators, like their lines
  devices = [p for p in planes if p.name.startswith("/device:")]
  streams, ops_line = [], []
  for plane in devices or [p for p in planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      if line.name.startswith(("Stream", "tf_XLA")) or line.name == "XLA Ops":
        events = [(dict(e.stats).get("hlo_op"), e.duration_ns / 1e6) for e in line.events]
        if line.name == "XLA Ops":
          ops_line += [(name or e.name, ms) for (name, ms), e in zip(events, line.events)]
        else:  # the host's threads also hold spans around whole executions: named ops only there
          streams += [(name and str(name), ms) for name, ms in events if name or devices]
  if not any(name for name, _ in streams):
    streams = ops_line
  return [(name and name.lstrip("%"), ms) for name, ms in streams]


def summarize_trace(trace_dir: str, hlo_text: str, top: int = 15) -> dict:
  """{"device_ms", "by_part": {part: {phase: ms}}, "top_ops": [[ms, part, name, stack]]} of the one
  step traced under `trace_dir` (phases: PHASES)."""
  path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)  # the newest, where the directory holds earlier traces
  ops = hlo_ops(hlo_text)
  by_part = collections.defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
  by_op, unattributed = collections.Counter(), 0.0
  for name, ms in device_events(path):
    if name is None:
      unattributed += ms
      continue
    op_name, text = ops.get(name, ("", ""))
    if not _CONTROL.search(text):
      by_part[part(op_name, text)][phase(op_name)] += ms
      by_op[name] += ms
  top_ops = [[round(ms, 3), part(*ops.get(name, ("", ""))), name, ops.get(name, ("", ""))[0][-160:]]
             for name, ms in by_op.most_common(top)]
  return {"device_ms": sum(by_op.values()), "unattributed_ms": unattributed, "by_part": dict(by_part),
          "top_ops": top_ops}


def format_summary(summary: dict) -> str:
  """A printable table of `summarize_trace`'s result."""
  total = summary["device_ms"] or 1.0
  lines = [f"  device time {summary['device_ms']:.1f} ms (+ {summary['unattributed_ms']:.1f} ms naming no "
           "HLO op): part, ms in " + ", ".join(PHASES) + ", share"]
  for name, ms in sorted(summary["by_part"].items(), key=lambda kv: -sum(kv[1].values())):
    lines.append(f"  {name:>30} " + " ".join(f"{ms[p]:>9.1f}" for p in PHASES)
                 + f" {100 * sum(ms.values()) / total:>5.1f}%")
  lines += [f"  {ms:>9.2f} ms {p:>28} {name} {stack[-90:]}" for ms, p, name, stack in summary["top_ops"]]
  return "\n".join(lines)
