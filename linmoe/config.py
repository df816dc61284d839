"""The config schema: every key with its default and meaning, and one validation pass.

Config files in `configs/` start from `default_config()` and change what they need; `train.py` applies
`--config.a.b=value` overrides on top. `validate` runs before anything is compiled and raises a
`ConfigError` whose one-line message names the key, the bad value and what is allowed.
"""
import dataclasses
from typing import Any

import ml_collections

COMPUTE_DTYPES = ("float32", "bfloat16")
KERNEL_IMPLS = ("auto", "naive", "chunked", "pallas")
MESH_AXES = ("data", "fsdp", "expert", "tensor", "sequence")
ROUTERS = ("softmax", "sigmoid")
DISPATCH_MODES = ("dropless", "capacity")
GMM_IMPLS = ("auto", "ragged_dot", "pallas", "mosaic", "reference")
MOM_INNER = ("gla", "deltanet", "gated_deltanet")
# none: keep every activation; block: recompute each block in the backward pass from its input;
# save_matmuls: recompute, but keep the outputs of matmuls without batch dimensions.
REMAT_MODES = ("none", "block", "save_matmuls")


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the key."""


def default_config() -> ml_collections.ConfigDict:
  """All keys a run reads, with defaults for a small CPU model."""
  c = ml_collections.ConfigDict()
  c.workdir = "workdirs/default"  # checkpoints, metrics.jsonl, TensorBoard events, config.json
  c.seed = 0  # parameter init and data order

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: the tokenizer's vocabulary, padded up to a multiple of 128
  m.d_model = 128  # residual width
  m.n_layers = 4  # number of blocks
  m.n_heads = 4  # heads of every mixer; head dim = d_model // n_heads
  m.lsm = "gla"  # the linear sequence model of `L` blocks, a key of linmoe.layers.LSM_LAYERS
  m.pattern = "L"  # block pattern repeated to n_layers: L = LSM block, N = softmax attention
  m.kernel_impl = "auto"  # recurrence implementation, one of KERNEL_IMPLS
  m.chunk_size = 64  # chunk length of the chunked recurrence
  m.compute_dtype = "float32"  # activations and matmuls; parameters and recurrent state stay float32
  m.rope_theta = 10000.0  # rotary base of attention blocks
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.remat = "none"  # activation checkpointing per block, one of REMAT_MODES
  m.scan_layers = False  # run the repeats of `pattern` as one nn.scan (compile time independent of depth)
  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 4  # 0 or 1: a dense SwiGLU MLP instead of MoE
  e.top_k = 2  # experts per token
  e.d_ff = 256  # hidden width of each expert (or of the dense MLP)
  e.router = "softmax"  # "softmax" (Mixtral, Qwen2-MoE) or "sigmoid" (DeepSeek-V3) scores, then top-k
  e.renormalize = True  # rescale the top-k router weights to sum to 1
  e.dispatch = "dropless"  # "dropless" (grouped matmul) or "capacity" (fixed slots per expert)
  e.capacity_factor_train = 1.25  # capacity mode: slots per expert = factor * token slots / experts
  e.capacity_factor_eval = 2.0  # the same outside training (eval, decoding)
  e.num_shared_experts = 0  # experts every token goes through (Qwen2-MoE: 1, DeepSeek: 1-2)
  e.shared_d_ff = 0  # hidden width of each shared expert; 0 = d_ff
  e.shared_expert_gate = False  # sigmoid gate on the shared experts' output (Qwen2-MoE)
  e.gmm_impl = "auto"  # grouped matmul of the dropless mode, one of GMM_IMPLS
  # dtype the expert weights are stored in, one of COMPUTE_DTYPES; "bfloat16" (with compute_dtype
  # bfloat16) skips casting them on every use; the optimizer then keeps fp32 master copies
  e.expert_param_dtype = "float32"
  e.aux_loss_weight = 0.01  # load-balancing loss (Switch/GShard form) weight
  e.z_loss_weight = 0.001  # router z-loss weight

  m.mom = mm = ml_collections.ConfigDict()
  mm.inner = "gla"  # model.lsm = "mom": the LSM of each memory, one of MOM_INNER
  mm.num_memories = 4  # memories per layer
  mm.top_k = 2  # memories each token is routed to
  mm.shared_memory = True  # one more memory that sees every token

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer steps
  t.batch_size = 16  # global batch, in sequences
  t.seq_len = 256  # tokens per sequence
  t.lr = 3e-3  # peak learning rate
  t.min_lr_ratio = 0.1  # final learning rate of the cosine decay, relative to lr
  t.warmup_steps = 50  # linear warmup from 0 to lr
  t.weight_decay = 0.1  # AdamW decoupled weight decay
  t.b1 = 0.9  # AdamW beta1
  t.b2 = 0.95  # AdamW beta2
  t.grad_clip = 1.0  # global-norm clipping threshold
  t.log_every = 10  # steps between metric lines
  t.eval_every = 200  # steps between evaluations (and one at the end)
  t.eval_batches = 8  # held-out batches per evaluation
  t.ckpt_every = 200  # steps between checkpoints (and one at the end)
  t.keep_checkpoints = 3  # how many recent checkpoints to keep

  c.data = d = ml_collections.ConfigDict()
  d.source = "files"  # "files" (read data.path) or "tfds:<name>[:<config>]" (a prepared TFDS dataset)
  d.path = "data/kjv.jsonl.zst"  # file, glob or comma list of .jsonl, .jsonl.zst, .txt
  d.tfds_dir = ""  # TFDS data_dir of a tfds: source; "" = TFDS's default (~/tensorflow_datasets)
  d.text_feature = "text"  # the text feature of a tfds: source's records
  d.eval_split = ""  # tfds: held-out split (e.g. "validation"); "" = hold out eval_fraction of train
  d.tokenizer = "byte"  # "byte", "qwen2" or the path of a Hugging Face tokenizer.json
  d.eval_fraction = 0.02  # share of documents held out for evaluation
  d.loader = "index"  # "index" (batch = pure function of (seed, step)) or "grain" (Grain iterator)
  d.reset_at_doc_boundary = True  # keep packed documents apart in every layer (the batch's segment_ids)

  c.mesh = ms = ml_collections.ConfigDict()
  for axis in MESH_AXES:
    setattr(ms, axis, 1)  # device mesh axis size; the product must equal the device count
  return c


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int
  top_k: int
  d_ff: int
  router: str
  renormalize: bool
  dispatch: str
  capacity_factor_train: float
  capacity_factor_eval: float
  num_shared_experts: int
  shared_d_ff: int
  shared_expert_gate: bool
  gmm_impl: str
  expert_param_dtype: str
  aux_loss_weight: float
  z_loss_weight: float

  def __post_init__(self):
    if not self.shared_d_ff:
      object.__setattr__(self, "shared_d_ff", self.d_ff)


@dataclasses.dataclass(frozen=True)
class MoMConfig:
  inner: str
  num_memories: int
  top_k: int
  shared_memory: bool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section as a hashable dataclass (Flax modules and jit static args need that)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  lsm: str
  pattern: str
  kernel_impl: str
  chunk_size: int
  compute_dtype: str
  rope_theta: float
  norm_eps: float
  remat: str
  scan_layers: bool
  moe: MoEConfig
  mom: MoMConfig

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def layer_kinds(self) -> str:
    """The pattern repeated and cut to n_layers, e.g. "LLLN" for 6 layers -> "LLLNLL"."""
    reps = -(-self.n_layers // len(self.pattern))
    return (self.pattern * reps)[: self.n_layers]

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int) -> "ModelConfig":
    fields = {k: v for k, v in model.to_dict().items() if k not in ("moe", "mom", "vocab_size")}
    return cls(vocab_size=vocab_size, moe=MoEConfig(**model.moe.to_dict()),
               mom=MoMConfig(**model.mom.to_dict()), **fields)


def padded_vocab_size(model: ml_collections.ConfigDict, tokenizer_vocab: int) -> int:
  """`model.vocab_size` if set (it must hold the tokenizer's ids), else the tokenizer's padded to 128."""
  if model.vocab_size:
    if model.vocab_size < tokenizer_vocab:
      _fail("model.vocab_size", model.vocab_size, f"at least the tokenizer's {tokenizer_vocab} ids, or 0")
    return model.vocab_size
  return -(-tokenizer_vocab // 128) * 128


def _fail(key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config error: {key} = {value!r}: {allowed}")


def _check_positive(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
  for key in keys:
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(key, value, "must be a positive integer")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _check_choice(config: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> None:
  value = _get(config, key)
  if value not in allowed:
    _fail(key, value, "must be one of " + ", ".join(allowed))


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Raises ConfigError on the first bad value; checks nothing that needs the data or a compile."""
  _check_positive(config, (
      "model.d_model", "model.n_layers", "model.n_heads", "model.chunk_size", "model.moe.d_ff",
      "train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.eval_every",
      "train.eval_batches", "train.ckpt_every", "train.keep_checkpoints", "model.mom.num_memories",
      *(f"mesh.{axis}" for axis in MESH_AXES)))
  m, t = config.model, config.train
  from linmoe.layers import LSM_LAYERS  # here: the layers import this module
  _check_choice(config, "model.lsm", tuple(LSM_LAYERS))
  _check_choice(config, "model.compute_dtype", COMPUTE_DTYPES)
  _check_choice(config, "model.kernel_impl", KERNEL_IMPLS)
  _check_choice(config, "model.mom.inner", MOM_INNER)
  _check_choice(config, "model.remat", REMAT_MODES)
  if not 1 <= m.mom.top_k <= m.mom.num_memories:
    _fail("model.mom.top_k", m.mom.top_k, f"must be in [1, model.mom.num_memories = {m.mom.num_memories}]")
  _check_choice(config, "model.moe.router", ROUTERS)
  _check_choice(config, "model.moe.dispatch", DISPATCH_MODES)
  _check_choice(config, "model.moe.gmm_impl", GMM_IMPLS)
  _check_choice(config, "model.moe.expert_param_dtype", COMPUTE_DTYPES)
  if not m.pattern or set(m.pattern) - {"L", "N"}:
    _fail("model.pattern", m.pattern, "must be a non-empty string of L (LSM block) and N (attention block)")
  if m.d_model % m.n_heads:
    _fail("model.d_model", m.d_model, f"must be divisible by model.n_heads = {m.n_heads}")
  if m.vocab_size < 0:
    _fail("model.vocab_size", m.vocab_size, "must be 0 (follow the tokenizer) or positive")
  if m.moe.num_experts < 0:
    _fail("model.moe.num_experts", m.moe.num_experts, "must be >= 0 (0 or 1: dense MLP)")
  if m.moe.num_experts > 1 and not 1 <= m.moe.top_k <= m.moe.num_experts:
    _fail("model.moe.top_k", m.moe.top_k, f"must be in [1, model.moe.num_experts = {m.moe.num_experts}]")
  for key in ("model.moe.capacity_factor_train", "model.moe.capacity_factor_eval"):
    if not _get(config, key) > 0:
      _fail(key, _get(config, key), "must be > 0")
  for key in ("model.moe.aux_loss_weight", "model.moe.z_loss_weight", "train.weight_decay",
              "train.warmup_steps", "model.moe.num_shared_experts", "model.moe.shared_d_ff"):
    if _get(config, key) < 0:
      _fail(key, _get(config, key), "must be >= 0")
  if not t.lr > 0:
    _fail("train.lr", t.lr, "must be > 0")
  if not 0 <= t.min_lr_ratio <= 1:
    _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
  from linmoe.data import LOADERS  # here: keeps `import linmoe.config` light
  _check_choice(config, "data.loader", LOADERS)
  if config.data.source != "files" and not config.data.source.startswith("tfds:"):
    _fail("data.source", config.data.source, "must be 'files' or 'tfds:<name>[:<config>]'")
  if not isinstance(config.data.reset_at_doc_boundary, bool):
    _fail("data.reset_at_doc_boundary", config.data.reset_at_doc_boundary, "must be True or False")
  if not 0 < config.data.eval_fraction < 1:
    _fail("data.eval_fraction", config.data.eval_fraction, "must be in (0, 1)")
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  product = 1
  for size in sizes.values():
    product *= size
  if product != device_count:
    _fail("mesh", sizes, f"sizes must multiply to the device count {device_count} (they give {product})")
  _check_mesh_divides(config, sizes)
  batch_shards = sizes["data"] * sizes["fsdp"]
  if t.batch_size % batch_shards:
    _fail("train.batch_size", t.batch_size, f"must be divisible by mesh.data * mesh.fsdp = {batch_shards}")



def _check_mesh_divides(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
  """Each parallel axis must split what it shards into equal parts."""
  m = config.model
  tensor, expert, sequence = sizes["tensor"], sizes["expert"], sizes["sequence"]
  if m.n_heads % tensor:
    _fail("mesh.tensor", tensor, f"must divide model.n_heads = {m.n_heads}")
  if m.moe.d_ff % tensor:
    _fail("mesh.tensor", tensor, f"must divide model.moe.d_ff = {m.moe.d_ff}")
  if m.moe.num_shared_experts and (m.moe.shared_d_ff or m.moe.d_ff) % tensor:
    _fail("mesh.tensor", tensor, f"must divide model.moe.shared_d_ff = {m.moe.shared_d_ff}")
  if expert > 1 and m.moe.num_experts <= 1:
    _fail("mesh.expert", expert, "must be 1 for a dense model (model.moe.num_experts <= 1)")
  if m.moe.num_experts > 1 and m.moe.num_experts % expert:
    _fail("mesh.expert", expert, f"must divide model.moe.num_experts = {m.moe.num_experts}")
  if config.train.seq_len % sequence:
    _fail("mesh.sequence", sequence, f"must divide train.seq_len = {config.train.seq_len}")
