"""Sequential (next-item) recommenders: SASRec, BERT4Rec, GRU4Rec and a pooling baseline, on one base class."""

from recforge.models.sequential.base import SequenceNet, SequentialRecommender
from recforge.models.sequential.bert4rec import BERT4Rec
from recforge.models.sequential.gru4rec import GRU4Rec
from recforge.models.sequential.pooling import Pooling
from recforge.models.sequential.sasrec import SASRec

__all__ = ["BERT4Rec", "GRU4Rec", "Pooling", "SASRec", "SequenceNet", "SequentialRecommender"]
