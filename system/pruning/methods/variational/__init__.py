"""The complexity-aware variational method (docs/method.md section 1): its config, its layer-gate
estimators and the method itself."""

from system.pruning.methods.variational.config import VariationalConfig
from system.pruning.methods.variational.method import Variational

__all__ = ["Variational", "VariationalConfig"]
