"""The cell zoo and layers. Every cell is a `pararnn.Cell`: no solver code lives here."""
from .contractive import bound_recurrent_weights
from .deltanet import DeltaNet, DeltaProduct
from .elman import Elman
from .gru import GRU
from .layers import CELLS, ResidualBlock, SequenceModel, SequenceModelConfig, make_cell
from .lru import LRU
from .lstm import LSTM
from .paragru import ParaGRU
from .paralstm import ParaLSTM
from .ssm import ComplexSSM, SelectiveSSM

__all__ = ["CELLS", "ComplexSSM", "DeltaNet", "DeltaProduct", "Elman", "GRU", "LRU", "LSTM", "ParaGRU", "ParaLSTM",
           "ResidualBlock", "SelectiveSSM", "SequenceModel", "SequenceModelConfig", "bound_recurrent_weights", "make_cell"]
