"""Model layers; `LSM_LAYERS` maps each `model.lsm` name to its layer class."""
from linmoe.layers.bla import BasicLinearAttention
from linmoe.layers.gla import GatedLinearAttention
from linmoe.layers.lightning import LightningAttention
from linmoe.layers.retnet import Retention

LSM_LAYERS = {
    "bla": BasicLinearAttention,
    "lightning": LightningAttention,
    "retnet": Retention,
    "gla": GatedLinearAttention,
}
