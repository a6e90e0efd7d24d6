"""chai: Clustered Head Attention (Agarwal et al., ICML 2024) and its baselines as a research framework."""

from chai import method_defaults

__version__ = "0.1.0"

# Every method's settings, read from its dataclass, as the Hydra node conf/method/<name>.yaml starts from: first
# thing, so that every place that composes conf/ (run.py, tests, scripts, the report) has it. No torch imported.
method_defaults.register()
