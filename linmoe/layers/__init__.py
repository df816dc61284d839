"""Model layers; `LSM_LAYERS` maps each `model.lsm` name to its layer class."""
from linmoe.layers.based import Based
from linmoe.layers.bla import BasicLinearAttention
from linmoe.layers.deltanet import DeltaNet
from linmoe.layers.gated_deltanet import GatedDeltaNet
from linmoe.layers.gateloop import GateLoop
from linmoe.layers.gla import GatedLinearAttention
from linmoe.layers.gsa import GatedSlotAttention
from linmoe.layers.hgrn2 import HGRN2
from linmoe.layers.lightning import LightningAttention
from linmoe.layers.mamba import Mamba
from linmoe.layers.mamba2 import Mamba2
from linmoe.layers.mom import MixtureOfMemories
from linmoe.layers.rebased import Rebased
from linmoe.layers.retnet import Retention
from linmoe.layers.rwkv6 import RWKV6
from linmoe.layers.rwkv7 import RWKV7
from linmoe.layers.s4 import S4D
from linmoe.layers.titans import Titans
from linmoe.layers.ttt import TTTLinear

LSM_LAYERS = {
    "bla": BasicLinearAttention,
    "lightning": LightningAttention,
    "retnet": Retention,
    "gla": GatedLinearAttention,
    "based": Based,
    "rebased": Rebased,
    "hgrn2": HGRN2,
    "gateloop": GateLoop,
    "gsa": GatedSlotAttention,
    "mamba2": Mamba2,
    "s4": S4D,
    "mamba": Mamba,
    "rwkv6": RWKV6,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "ttt": TTTLinear,
    "titans": Titans,
    "rwkv7": RWKV7,
    "mom": MixtureOfMemories,
}
